"""The eigendecomposition settings on one device: the balanced assignment of
factors to devices, the plain path without a mesh, and `eigh_dtype`.

The multi-device behaviour is in `tests/multidevice` (see `test_sharding.py`).
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import optax_ekfac as oek
from optax_ekfac._src import sharding


@pytest.mark.parametrize(
    "costs, num_devices",
    [
        ([1.0] * 8, 4),
        ([27.0, 8.0, 1000.0, 64.0, 125.0, 343.0, 1.0], 3),
        ([5.0, 5.0], 4),  # more devices than tasks
    ],
)
def test_balanced_assignment_is_greedy_and_complete(costs, num_devices):
    shares = sharding.balanced_assignment(costs, num_devices)
    assert len(shares) == num_devices
    tasks = sorted(task for share in shares for task in share)
    assert tasks == list(range(len(costs)))
    loads = [sum(costs[task] for task in share) for share in shares]
    for share, load in zip(shares, loads):
        if share:
            # Its smallest task went to it while it was the least loaded.
            assert load - min(costs[task] for task in share) <= min(loads)


def test_balanced_assignment_splits_equal_costs_evenly():
    shares = sharding.balanced_assignment([1.0] * 8, 4)
    assert [len(share) for share in shares] == [2, 2, 2, 2]


def test_map_over_axis_without_a_mesh_is_a_comprehension():
    matrices = [jnp.eye(2), 2 * jnp.eye(3)]
    results = sharding.map_over_axis(jnp.trace, matrices, [8, 27], "data")
    assert [float(r) for r in results] == [2.0, 6.0]
    assert sharding.axis_size("data") == 1


@pytest.fixture(scope="module")
def mlp_update():
    model = reference.MLP(features=(6, 3), use_bias=(True, True))
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (32, 5), jnp.float64)
    y = jax.random.randint(key_y, (32,), 0, 3)
    params, _ = reference.init(model, x)

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    _, grads, stats = curvature.value_grad_and_stats(params, x, y)

    def update(**settings):
        tx = oek.scale_by_ekfac(layers, damping=1e-2, **settings)
        return jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)

    return update


def test_float32_eigendecomposition_of_float64_factors(mlp_update):
    updates, state = mlp_update(eigh_dtype=jnp.float32)
    expected_updates, expected_state = mlp_update(eigh_dtype=jnp.float64)
    for name, block in state.blocks.items():
        expected = expected_state.blocks[name]
        # Stored in the factor dtype, decomposed to float32 accuracy.
        assert block.input_eigenbasis.dtype == jnp.float64
        reference.assert_same_basis(
            block.input_eigenbasis, expected.input_eigenbasis, atol=1e-4
        )
        reference.assert_same_basis(
            block.output_eigenbasis, expected.output_eigenbasis, atol=1e-4
        )
    chex.assert_trees_all_close(updates, expected_updates, rtol=1e-3, atol=1e-5)
    # The default decomposes in the factor dtype.
    chex.assert_trees_all_equal(mlp_update(), (expected_updates, expected_state))


def test_eigh_dtype_is_checked():
    layers = oek.Layers(blocks=(), fallback=())
    with pytest.raises(ValueError, match="float32 or jnp.float64"):
        oek.scale_by_ekfac(layers, eigh_dtype=jnp.bfloat16)
    with jax.enable_x64(False):
        with pytest.raises(ValueError, match="jax_enable_x64"):
            oek.scale_by_ekfac(layers, eigh_dtype=jnp.float64)
        oek.scale_by_ekfac(layers, eigh_dtype=jnp.float32)


def test_bfloat16_layers_keep_float32_factors():
    model = reference.MLP(features=(6, 3), use_bias=(True, True))
    x = jax.random.normal(jax.random.key(0), (16, 5)).astype(jnp.bfloat16)
    y = jnp.arange(16) % 3
    params, _ = reference.init(model, x)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    _, grads, stats = curvature.value_grad_and_stats(params, x, y)
    tx = oek.scale_by_ekfac(layers, eigh_dtype=jnp.float64)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
    for block in state.blocks.values():
        assert block.input_factor.dtype == jnp.float32
        assert block.output_eigenbasis.dtype == jnp.float32
    for update in jax.tree.leaves(updates):
        assert update.dtype == jnp.bfloat16
        assert np.all(np.isfinite(np.asarray(update, np.float32)))
