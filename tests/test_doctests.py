"""The docstrings' examples run as doctests.

Every `>>>` example in the package's modules runs, one test per module, in a
namespace holding what the examples leave to the reader: the imports (`jax`,
`jnp`, `np`, `optax`, `optax_ekfac`, `nn` for flax.linen, `nnx` for
flax.nnx) and a small linen classifier with its batch and statistics
(`model`, `params`, `x`, `y`, `loss_fn`, `curvature`, `layers`, `loss`,
`grads`, `stats`). Each docstring gets its own copy of the namespace.

The conftest turns on `jax_enable_x64`, so the examples print nothing whose
text depends on the dtype.
"""

import doctest
import functools
import importlib
import io
import pkgutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ekfac
import optax_ekfac._src

_MODULES = ["optax_ekfac", "optax_ekfac.losses", "optax_ekfac.nnx"] + [
    module.name
    for module in pkgutil.walk_packages(
        optax_ekfac._src.__path__, prefix="optax_ekfac._src."
    )
]


class _MLP(nn.Module):
    """Dense(16)-relu-Dense(3): blocks `Dense_0` and `Dense_1`."""

    @nn.compact
    def __call__(self, x):
        hidden = nn.relu(nn.Dense(16)(x))
        return nn.Dense(3)(hidden)


@functools.cache
def _namespace() -> dict:
    model = _MLP()
    x = jax.random.normal(jax.random.key(0), (32, 8), jnp.float32)
    y = jax.random.randint(jax.random.key(1), (32,), 0, 3)
    params = model.init(jax.random.key(2), x)["params"]

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax_ekfac.softmax_cross_entropy(logits, y)

    curvature = optax_ekfac.Curvature(loss_fn)
    layers = curvature.layers(params, x, y)
    loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
    return dict(
        jax=jax,
        jnp=jnp,
        np=np,
        optax=optax,
        optax_ekfac=optax_ekfac,
        nn=nn,
        nnx=nnx,
        model=model,
        params=params,
        x=x,
        y=y,
        loss_fn=loss_fn,
        curvature=curvature,
        layers=layers,
        loss=loss,
        grads=grads,
        stats=stats,
    )


@pytest.mark.parametrize("module_name", _MODULES)
def test_the_examples_of_a_module_run(module_name):
    module = importlib.import_module(module_name)
    runner = doctest.DocTestRunner(
        optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE
    )
    report = io.StringIO()
    for test in doctest.DocTestFinder().find(module, globs=_namespace()):
        runner.run(test, out=report.write)
    assert runner.failures == 0, report.getvalue()
