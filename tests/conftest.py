"""Brute-force references compare in float64.

The suite compiles hundreds of small programs, so it asks XLA for less
backend (LLVM) optimization: the same HLO, fused the same way, compiled
about a quarter faster. Subprocesses (the multi-device suites, the examples)
inherit it through the environment.
"""

import os

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update(
    "jax_disable_most_optimizations",
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False"),
)


# Tests that run for long, most of them in processes of their own: started
# first, so that neither worker is left running one of them alone at the end.
_STARTED_FIRST = (
    "tests/test_sharding.py::test_multidevice_suite",
    "tests/test_examples.py::test_every_example_runs",
    "tests/test_accelerator.py::",
    "tests/test_readme.py::test_the_multi_device_block_runs_on_two_devices",
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
