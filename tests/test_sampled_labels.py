"""The Monte-Carlo Fisher's label draws: keys of every kind, and no PRNG loop.

The capture draws labels with XLA's bit generator, whatever key it is given,
so that a jitted step compiles no threefry loop (on CPU a rolled loop of many
kernels per draw, most of the capture's compile time).
"""

import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ekfac as oek


class _Classifier(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = jnp.tanh(nn.Dense(8)(x))
        return nn.Dense(3)(hidden)


@pytest.fixture(scope="module")
def problem():
    model = _Classifier()
    x = jax.random.normal(jax.random.key(0), (32, 5))
    y = jnp.arange(32) % 3
    params = model.init(jax.random.key(1), x)["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    return curvature, params, x, y


def _output_factor(stats):
    (calls,) = [calls for name, calls in stats.layers.items() if "Dense_1" in name]
    return np.concatenate([np.ravel(call.output_grads) for call in calls])


@pytest.mark.parametrize(
    "make_key",
    [
        lambda seed: jax.random.key(seed),
        lambda seed: jax.random.PRNGKey(seed),
        lambda seed: jax.random.key(seed, impl="rbg"),
        lambda seed: jax.random.key(seed, impl="unsafe_rbg"),
    ],
    ids=["threefry", "raw", "rbg", "unsafe_rbg"],
)
def test_any_key_samples_deterministically(problem, make_key):
    curvature, params, x, y = problem
    step = jax.jit(curvature.value_grad_and_stats)
    *_, first = step(params, x, y, key=make_key(0))
    *_, again = step(params, x, y, key=make_key(0))
    *_, other = step(params, x, y, key=make_key(1))
    chex.assert_trees_all_equal(_output_factor(first), _output_factor(again))
    assert not np.allclose(_output_factor(first), _output_factor(other))


def test_batch_derived_keys_differ_between_batches(problem):
    curvature, params, x, y = problem
    step = jax.jit(curvature.value_grad_and_stats)
    *_, first = step(params, x, y)
    *_, shifted = step(params, x[::-1], y[::-1])
    # Reordered examples: their true-label gradients are a permutation, but
    # the sampled labels are drawn afresh.
    assert not np.allclose(
        np.sort(_output_factor(first)), np.sort(_output_factor(shifted))
    )


def test_sampled_labels_follow_the_predictive_distribution(problem):
    # Output gradients of a sampled label y~: softmax(z) - onehot(y~); their
    # mean over many draws is 0, and each one has exactly one entry p - 1.
    curvature, params, x, y = problem
    many = oek.Curvature(curvature.loss_fn, fisher_type="mc", num_samples=2000)
    *_, stats = jax.jit(many.value_grad_and_stats)(params, x, y, key=jax.random.key(3))
    (call,) = [c for n, cs in stats.layers.items() if "Dense_1" in n for c in cs]
    grads = np.asarray(call.output_grads).reshape(2000, 32, 3)
    chex.assert_trees_all_close(grads.mean(0), np.zeros((32, 3)), atol=0.05)


def test_mc_capture_compiles_no_prng_loop(problem):
    curvature, params, x, y = problem
    # With XLA's default fusion emitters, as users compile it: the suite's
    # cheaper ones (conftest.py) lower every scatter-add to a loop.
    options = (
        {"xla_cpu_use_fusion_emitters": True}
        if "xla_cpu_use_fusion_emitters" in os.environ.get("XLA_FLAGS", "")
        else None
    )
    lowered = jax.jit(curvature.value_grad_and_stats).lower(params, x, y)
    compiled = lowered.compile(compiler_options=options)
    assert " while(" not in compiled.as_text()
