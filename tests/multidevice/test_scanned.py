"""Scanned, rematerialized layers on 4 fake CPU devices (data parallelism).

The stacked blocks' sharded steps equal the single-device steps (float64),
and the distributed eigendecompositions split every stack into one task per
layer, balanced across the devices like unstacked blocks.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P
from test_data_parallel import _assert_same_history, device_shares

import optax_ekfac as oek

NUM_DEVICES, NUM_EXAMPLES, NUM_LAYERS, FEATURES = 4, 16, 3, 4
SETTINGS = dict(damping=1e-2, eigen_update_every=2, max_per_example_elements=60)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, _=None):
        dense = functools.partial(nn.Dense, param_dtype=jnp.float64)
        hidden = jnp.tanh(dense(2 * FEATURES)(x))
        return x + dense(FEATURES)(hidden + hidden.mean(1, keepdims=True)), None


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        x, _ = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            length=NUM_LAYERS,
        )(name="blocks")(x, None)
        # Every position reaches the head on its own: the last block's output
        # gradients span its features (no repeated eigenvalue of its factor,
        # whose eigenbasis would then not be unique).
        return nn.Dense(5, param_dtype=jnp.float64)(x.reshape(x.shape[0], -1))


@functools.cache
def _problem():
    model = Net()
    keys = jax.random.split(jax.random.key(0), 4)
    batches = [
        (
            jax.random.normal(keys[2 * i], (NUM_EXAMPLES, 3, FEATURES), jnp.float64),
            jax.random.randint(keys[2 * i + 1], (NUM_EXAMPLES,), 0, 5),
        )
        for i in range(2)
    ]
    params = model.init(jax.random.key(1), batches[0][0][:1])["params"]

    def loss_fn(params, x, labels):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), labels)

    curvature = oek.Curvature(loss_fn, fisher_type="mc", num_samples=2)
    layers = curvature.layers(params, *batches[0])
    assert [block.stack for block in layers.blocks[:2]] == [(NUM_LAYERS,)] * 2
    return curvature, layers, params, batches


@functools.cache
def _train(axis_type=None, settings=()):
    """Two steps' `(updates, state)` and the step's jaxpr, each run once."""
    curvature, layers, params, batches = _problem()
    tx = oek.scale_by_ekfac(layers, **SETTINGS, **dict(settings))

    @jax.jit
    def step(params, state, batch, key):
        _, grads, stats = curvature.value_grad_and_stats(params, *batch, key=key)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    history = []
    mesh = None
    if axis_type is not None:
        mesh = jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))
        params, state = jax.device_put((params, state), NamedSharding(mesh, P()))
        batches = jax.device_put(batches, NamedSharding(mesh, P("data")))
    with jax.set_mesh(mesh) if mesh is not None else _no_mesh():
        for seed, batch in enumerate(batches):
            params, state, updates = step(params, state, batch, jax.random.key(seed))
            history.append(jax.device_get((updates, state)))
        jaxpr = jax.make_jaxpr(step)(params, state, batches[0], jax.random.key(0))
    return history, jaxpr.jaxpr


class _no_mesh:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


@pytest.mark.parametrize(
    "axis_type, settings",
    [
        (AxisType.Explicit, ()),
        (AxisType.Auto, (("scalings", "per_position"), ("distribute_eigh", False))),
    ],
)
def test_scanned_sharded_steps_equal_single_device_steps(axis_type, settings):
    expected, _ = _train(settings=settings)
    history, _ = _train(axis_type, settings)
    _assert_same_history(history, expected)


def test_distributed_eigh_balances_the_stacked_layers():
    _, jaxpr = _train(AxisType.Explicit)
    shares = device_shares(jaxpr)
    # One task per layer of each stacked factor (up: 5x5 and 8x8, down: 9x9
    # and 4x4), plus the head's two (13x13, 5x5); spread so that no device
    # holds a whole stack.
    per_layer = [(5, 5), (8, 8), (9, 9), (4, 4)]
    expected = sorted(per_layer * NUM_LAYERS + [(13, 13), (5, 5)])
    assert sorted(s for share in shares for s in share) == expected
    assert all(share.count((9, 9)) < NUM_LAYERS for share in shares)
    # Greedy balance: without its smallest task no device is above the least.
    loads = [sum(d[0] ** 3 for d in share) for share in shares]
    for share, load in zip(shares, loads):
        assert load - min(d[0] ** 3 for d in share) <= min(loads), loads
