"""Tests that need several devices, run by `tests/test_sharding.py`.

That test starts pytest on this folder in a process of its own with
`--xla_force_host_platform_device_count=4` in `XLA_FLAGS` (set before JAX
starts), so the rest of the suite keeps one device. In a process without the
flag (the main test run) these tests are not collected.
"""

import os

NUM_DEVICES = 4

if f"--xla_force_host_platform_device_count={NUM_DEVICES}" in os.environ.get(
    "XLA_FLAGS", ""
):
    collect_ignore_glob = []
else:
    collect_ignore_glob = ["test_*.py"]
