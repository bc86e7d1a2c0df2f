"""Brute-force references compare in float64.

The suite compiles hundreds of small programs, so it asks XLA for less
backend (LLVM) optimization: the same HLO, fused the same way, compiled
about a quarter faster. Subprocesses (the multi-device suites, the examples)
inherit it through the environment.
"""

import os

os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update(
    "jax_disable_most_optimizations",
    os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "false", "False"),
)
