"""Brute-force references compare in float64.

The suite compiles hundreds of small programs, and compiling is most of its
time, so it compiles cheaply:

* less backend (LLVM) optimization (`jax_disable_most_optimizations`): the
  same HLO, fused the same way, compiled about a quarter faster;
* XLA's CPU fusions emitted by its older, direct LLVM emitters rather than
  through MLIR (`--xla_cpu_use_fusion_emitters=false`): the same fused HLO,
  compiled in about half the time. XLA aborts on a flag it does not know, so
  the flag is added only where a fresh process starts with it.

`JAX_DISABLE_MOST_OPTIMIZATIONS=0` turns both off. BLAS gets one thread:
`eigh` on CPU runs in the OpenBLAS that ships with SciPy, whose threads spin
waiting for work while the test run's other worker and XLA's own threads
hold the cores (a batch of 1024 x 1024 eigendecompositions took a minute of
CPU instead of two seconds). The test run's workers and subprocesses (the
multi-device suites, the examples) inherit all of it through the environment.
"""

import os
import subprocess
import sys

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
_CHEAP_COMPILE = os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false")
_LEGACY_FUSION_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_CHECKED = "OPTAX_EKFAC_TESTS_CHECKED_XLA_FLAGS"  # set by the first process


def _xla_starts_with(flag: str) -> bool:
    """Whether XLA starts with `flag` added to `XLA_FLAGS`, in a process of its
    own (an unknown flag aborts the process)."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} {flag}".strip()
    result = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env=dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu"),
        capture_output=True,
    )
    return result.returncode == 0


# Tried once, by the first process (before it starts the test run's workers,
# which inherit the outcome).
if _CHEAP_COMPILE and _CHECKED not in os.environ:
    os.environ[_CHECKED] = "1"
    if _xla_starts_with(_LEGACY_FUSION_EMITTERS):
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} {_LEGACY_FUSION_EMITTERS}".strip()
        )

import jax  # noqa: E402
import pytest  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

# The BLAS libraries loaded before this file (NumPy's, by pytest's plugins)
# read the variables above too late.
threadpool_limits(1, user_api="blas")

jax.config.update("jax_enable_x64", True)
jax.config.update(
    "jax_disable_most_optimizations",
    _CHEAP_COMPILE,
)


# Tests that run for long, most of them in processes of their own: started
# first, so that neither worker is left running one of them alone at the end.
_STARTED_FIRST = (
    "tests/test_sharding.py::test_multidevice_suite",
    "tests/test_examples.py::test_every_example_runs",
    "tests/test_accelerator.py::",
    "tests/test_readme.py::test_the_multi_device_block_trains_on_two_devices",
    "tests/test_benchmarks.py::",
    "tests/test_models.py::",
)


@pytest.hookimpl(trylast=True)  # after pytest groups tests by their fixtures
def pytest_collection_modifyitems(items):
    def rank(item):
        for index, prefix in enumerate(_STARTED_FIRST):
            if item.nodeid.startswith(prefix):
                return index
        return len(_STARTED_FIRST)

    items.sort(key=rank)  # stable: the rest keep their order
