"""flax.nnx layers inside nnx.remat and nnx.scan over an nnx.vmap-created stack.

The reference is the same model unrolled (a list of blocks called in a
Python loop), with the stacked parameters mapped layer by layer; float64.
"""

import chex
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import optax_ekfac as oek

FEATURES, NUM_LAYERS, BATCH, POSITIONS = 4, 2, 5, 3


class Block(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(FEATURES, 2 * FEATURES, rngs=rngs, param_dtype=jnp.float64)
        self.down = nnx.Linear(
            2 * FEATURES, FEATURES, rngs=rngs, param_dtype=jnp.float64
        )

    def __call__(self, x):
        hidden = self.up(x)
        # Positions interact: exact and per-position scalings differ.
        hidden = jnp.tanh(hidden) + hidden.mean(1, keepdims=True)
        return x + self.down(hidden)


class Model(nnx.Module):
    """`NUM_LAYERS` blocks: a stack applied with nnx.scan (nnx.remat inside
    each step if `remat`), or a list called in a loop (`unrolled`)."""

    def __init__(self, layout: str, rngs: nnx.Rngs):
        self.layout = layout
        if layout == "unrolled":
            self.blocks = nnx.List([Block(rngs) for _ in range(NUM_LAYERS)])
        else:

            @nnx.split_rngs(splits=NUM_LAYERS)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def create(rngs):
                return Block(rngs)

            self.blocks = create(rngs)
        self.head = nnx.Linear(FEATURES, 2, rngs=rngs, param_dtype=jnp.float64)

    def __call__(self, x):
        if self.layout == "unrolled":
            for block in self.blocks:
                x = block(x)
            return self.head(x)

        def step(block, x):
            return block(x)

        if self.layout == "scan_remat":
            step = nnx.remat(step)

        @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
        def body(x, block):
            return step(block, x)

        return self.head(body(x, self.blocks))


def _element(tree, index):
    """Element `index` of every leaf's leading (stacked) axis."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def _batch():
    keys = jax.random.split(jax.random.key(0))
    x = jax.random.normal(keys[0], (BATCH, POSITIONS, FEATURES))
    y = jax.random.normal(keys[1], (BATCH, POSITIONS, 2))
    return x, y


def _twins(layout):
    """A stacked model and its unrolled twin with the same parameters."""
    model = Model(layout, nnx.Rngs(0))
    twin = Model("unrolled", nnx.Rngs(1))
    stacked = nnx.to_pure_dict(nnx.state(model.blocks, nnx.Param))
    for layer in range(NUM_LAYERS):
        nnx.update(twin.blocks[layer], _element(stacked, layer))
    nnx.update(twin.head, nnx.state(model.head, nnx.Param))
    return model, twin


def _unrolled(tree):
    """A stacked model's pure dict in the unrolled twin's layout."""
    return {
        "head": tree["head"],
        "blocks": {
            layer: _element(tree["blocks"], layer) for layer in range(NUM_LAYERS)
        },
    }


def _one_update(model, scalings, fisher_type):
    curvature = oek.nnx.Curvature(
        lambda model, x, y: oek.squared_error(model(x), y), fisher_type=fisher_type
    )
    batch = _batch()
    layers = curvature.layers(model, *batch)
    _, grads, stats = nnx.jit(curvature.value_grad_and_stats)(
        model, *batch, key=jax.random.key(3)
    )
    tx = oek.scale_by_ekfac(layers, scalings=scalings, damping=1e-3)
    params = nnx.state(model, nnx.Param)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
    return layers, nnx.to_pure_dict(updates)


@pytest.mark.parametrize(
    "layout, scalings, fisher_type",
    [("scan", "exact", "mc"), ("scan_remat", "per_position", "empirical")],
)
def test_scanned_stack_update_equals_the_unrolled_twins(layout, scalings, fisher_type):
    model, twin = _twins(layout)
    layers, updates = _one_update(model, scalings, fisher_type)
    _, twin_updates = _one_update(twin, scalings, fisher_type)
    assert {block.name: block.stack for block in layers.blocks} == {
        "blocks/up": (NUM_LAYERS,),
        "blocks/down": (NUM_LAYERS,),
        "head": (),
    }
    chex.assert_trees_all_close(_unrolled(updates), twin_updates, rtol=1e-8)
    # The capture leaves nothing behind on the model.
    assert set(nnx.to_pure_dict(nnx.state(model.blocks.up))) == {"kernel", "bias"}


def test_remat_statistics_equal_those_without_remat():
    model = Model("unrolled", nnx.Rngs(0))

    def loss_fn(model, x, y):
        x = nnx.remat(lambda block, x: block(x))(model.blocks[0], x)
        for block in model.blocks[1:]:
            x = block(x)
        return oek.squared_error(model.head(x), y)

    plain = oek.nnx.Curvature(
        lambda model, x, y: oek.squared_error(model(x), y), fisher_type="empirical"
    )
    rematerialized = oek.nnx.Curvature(loss_fn, fisher_type="empirical")
    _, grads, stats = rematerialized.value_grad_and_stats(model, *_batch())
    _, twin_grads, twin_stats = plain.value_grad_and_stats(model, *_batch())
    chex.assert_trees_all_close(grads, twin_grads, rtol=1e-12)
    chex.assert_trees_all_close(stats.layers, twin_stats.layers, rtol=1e-12)
