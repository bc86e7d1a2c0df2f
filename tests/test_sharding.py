"""Data parallelism on several devices: the files of `tests/multidevice`, in one
process of their own.

JAX fixes its devices when it starts, and the rest of the suite runs on one,
so the multi-device tests run in a fresh Python with 4 fake CPU devices
(`--xla_force_host_platform_device_count=4`): one for all the files, so that
Python, JAX and the tests' shared modules start once.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUM_DEVICES = 4


MULTIDEVICE_FILES = sorted(
    path.name for path in (ROOT / "tests" / "multidevice").glob("test_*.py")
)


def test_every_multidevice_file_is_run():
    assert set(MULTIDEVICE_FILES) >= {
        "test_benchmark.py",
        "test_data_parallel.py",
        "test_scanned.py",
    }


def test_multidevice_suite():
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ,
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}",
        JAX_PLATFORMS="cpu",  # fake devices are CPU devices, even beside a GPU
    )
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider"]
        + [str(ROOT / "tests" / "multidevice" / name) for name in MULTIDEVICE_FILES],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-10000:]
    assert " passed" in output and "skipped" not in output, output[-3000:]
    # `-rA` names every test that passed: each file ran.
    passed = set(re.findall(r"^PASSED tests/multidevice/(\w+\.py)::", output, re.M))
    assert passed == set(MULTIDEVICE_FILES), output[-3000:]
