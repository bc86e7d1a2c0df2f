"""Data parallelism on several devices: each file of `tests/multidevice` in a process
of its own.

JAX fixes its devices when it starts, and the rest of the suite runs on one,
so the multi-device tests run in a fresh Python with 4 fake CPU devices
(`--xla_force_host_platform_device_count=4`).
"""

import os
import pathlib
import subprocess
import sys

import pytest

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


# One process per file, so that the test run's workers share them out.
@pytest.mark.parametrize("name", MULTIDEVICE_FILES)
def test_multidevice_suite(name):
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ,
        XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count={NUM_DEVICES}",
        JAX_PLATFORMS="cpu",  # fake devices are CPU devices, even beside a GPU
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "multidevice" / name),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-10000:]
    assert " passed" in output and "skipped" not in output, output[-3000:]
