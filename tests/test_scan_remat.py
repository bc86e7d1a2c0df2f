"""Captured layers inside nn.remat, jax.checkpoint, nn.scan and nn.vmap.

The reference of a transformed model is its twin written without the
transformation: the same layers unrolled in a Python loop (whose statistics
and updates the brute-force tests pin down), with the parameters mapped layer
by layer. Everything is float64 unless a test says otherwise.
"""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ekfac as oek

VOCABULARY, FEATURES, NUM_LAYERS = 7, 4, 2
BATCH, POSITIONS = 5, 3
SETTINGS = dict(damping=1e-3, max_per_example_elements=40)


class Block(nn.Module):
    """A residual block whose positions interact (so that exact and
    per-position scalings differ); `up` is called twice."""

    @nn.compact
    def __call__(self, x, _=None):
        up = nn.Dense(2 * FEATURES, name="up")
        hidden = jnp.tanh(up(x)) + up(x.mean(1, keepdims=True))
        return x + nn.Dense(FEATURES, name="down")(hidden), None


def _scanned(block):
    return nn.scan(
        block,
        variable_axes={"params": 0},
        split_rngs={"params": True},
        length=NUM_LAYERS,
    )


class Stack(nn.Module):
    """The scanned blocks as one module, for nn.remat around a scan."""

    @nn.compact
    def __call__(self, x):
        return _scanned(Block)(name="blocks")(x, None)[0]


class Model(nn.Module):
    """Embedding, `NUM_LAYERS` blocks laid out as `layout` says, a head."""

    layout: str

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCABULARY, FEATURES, name="embed")(tokens)
        if self.layout in ("unrolled", "remat"):
            block = Block if self.layout == "unrolled" else nn.remat(Block)
            for layer in range(NUM_LAYERS):
                x, _ = block(name=f"block_{layer}")(x)
        elif self.layout == "remat_shared":  # one remat-ed block, called twice
            block = nn.remat(Block)(name="block_0")
            x, _ = block(block(x)[0])
        elif self.layout == "shared":
            block = Block(name="block_0")
            x, _ = block(block(x)[0])
        elif self.layout == "scan":
            x, _ = _scanned(Block)(name="blocks")(x, None)
        elif self.layout == "scan_remat":  # remat inside the scan
            x, _ = _scanned(nn.remat(Block))(name="blocks")(x, None)
        elif self.layout == "remat_scan":  # remat around the scan
            x = nn.remat(Stack)(name="stack")(x)
        return nn.Dense(VOCABULARY, name="head")(x)


def _element(tree, index):
    """Element `index` of every leaf's leading (stacked) axis."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def _batch(seed=0):
    keys = jax.random.split(jax.random.key(seed))
    tokens = jax.random.randint(keys[0], (BATCH, POSITIONS), 0, VOCABULARY)
    targets = jax.random.randint(keys[1], (BATCH, POSITIONS), 0, VOCABULARY)
    return tokens, targets


def _loss_fn(model, checkpointed=False):
    def loss_fn(params, tokens, targets):
        def apply(params):
            return model.apply({"params": params}, tokens)

        if checkpointed:
            apply = jax.checkpoint(apply)
        return oek.softmax_cross_entropy(apply(params), targets)

    return loss_fn


def _stacked_subtree(params):
    return params["blocks"] if "blocks" in params else params["stack"]["blocks"]


def _unrolled(params):
    """A scanned model's params (or updates) in the unrolled twin's layout."""
    stacked = _stacked_subtree(params)
    unrolled = {
        name: value for name, value in params.items() if name not in ("blocks", "stack")
    }
    for layer in range(NUM_LAYERS):
        unrolled[f"block_{layer}"] = _element(stacked, layer)
    return unrolled


def _scanned_params(unrolled, layout):
    """The unrolled twin's params in a scanned layout."""
    stacked = jax.tree.map(
        lambda *layers: jnp.stack(layers),
        *(unrolled[f"block_{layer}"] for layer in range(NUM_LAYERS)),
    )
    params = {
        name: value for name, value in unrolled.items() if not name.startswith("block_")
    }
    if layout == "remat_scan":
        params["stack"] = {"blocks": stacked}
    else:
        params["blocks"] = stacked
    return params


def _init(layout):
    params = Model(layout).init(jax.random.key(1), _batch()[0])["params"]
    return jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)


def _stats_and_grads(model, params, fisher_type="empirical", checkpointed=False):
    curvature = (
        oek.Curvature(
            _loss_fn(model, checkpointed), fisher_type=fisher_type, num_samples=2
        )
        if fisher_type == "mc"
        else oek.Curvature(_loss_fn(model, checkpointed), fisher_type="empirical")
    )
    batch = _batch()
    layers = curvature.layers(params, *batch)
    loss, grads, stats = jax.jit(curvature.value_grad_and_stats)(
        params, *batch, key=jax.random.key(2)
    )
    return layers, loss, grads, stats


# --- rematerialization -------------------------------------------------------------


@pytest.mark.parametrize(
    "layout, twin, checkpointed",
    [
        ("remat", "unrolled", False),
        ("remat_shared", "shared", False),
        ("unrolled", "unrolled", True),  # jax.checkpoint around model.apply
    ],
)
def test_remat_statistics_equal_those_without_remat(layout, twin, checkpointed):
    params = _init(twin)
    layers, loss, grads, stats = _stats_and_grads(
        Model(layout), params, checkpointed=checkpointed
    )
    twin_layers, twin_loss, twin_grads, twin_stats = _stats_and_grads(
        Model(twin), params
    )
    assert layers == twin_layers
    chex.assert_trees_all_close(loss, twin_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, twin_grads, rtol=1e-10, atol=1e-14)
    chex.assert_trees_all_close(stats.layers, twin_stats.layers, rtol=1e-10, atol=1e-14)
    # Not zeros: each call's own inputs and output gradients came back.
    for calls in stats.layers.values():
        for call in calls:
            assert np.abs(np.asarray(call.output_grads)).max() > 1e-6


# --- scanned layers equal their unrolled twin --------------------------------------


def _one_update(layout, params, scalings, fisher_type, tx=None):
    model = Model(layout)
    layers, _, grads, stats = _stats_and_grads(model, params, fisher_type)
    tx = tx or oek.scale_by_ekfac(layers, scalings=scalings, **SETTINGS)
    state = tx.init(params)
    updates, state = jax.jit(tx.update)(grads, state, params, stats=stats)
    return layers, updates, state, stats


@pytest.mark.parametrize(
    "layout, scalings, fisher_type",
    [
        ("scan_remat", "exact", "empirical"),
        ("remat_scan", "per_position", "mc"),
    ],
)
def test_scanned_update_equals_the_unrolled_twins(layout, scalings, fisher_type):
    unrolled_params = _init("unrolled")
    params = _scanned_params(unrolled_params, layout)
    chex.assert_trees_all_equal_shapes(params, _init(layout))
    layers, updates, state, stats = _one_update(layout, params, scalings, fisher_type)
    twin_layers, twin_updates, twin_state, twin_stats = _one_update(
        "unrolled", unrolled_params, scalings, fisher_type
    )
    stacked = [block for block in layers.blocks if block.stack]
    assert [block.stack for block in stacked] == [(NUM_LAYERS,)] * 2
    assert [block.num_calls for block in stacked] == [2, 1]  # up, down
    chex.assert_trees_all_close(_unrolled(updates), twin_updates, rtol=1e-8, atol=1e-12)
    # One block per layer: layer l's curvature is the unrolled block_l's.
    for block in stacked:
        for layer in range(NUM_LAYERS):
            twin_name = block.name.replace("stack/blocks", f"block_{layer}").replace(
                "blocks", f"block_{layer}"
            )
            chex.assert_trees_all_close(
                _element(state.blocks[block.name].scalings, layer),
                twin_state.blocks[twin_name].scalings,
                rtol=1e-8,
                atol=1e-12,
            )
    # The diagnostics: per-example gradients [N, L, ...] (examples first).
    per_example = oek.per_example_gradients(layers, stats, params)
    stacked_per_example = _stacked_subtree(per_example)
    per_example = {
        "blocks": jax.tree.map(
            lambda leaf: jnp.moveaxis(leaf, 1, 0), stacked_per_example
        ),
        **{
            name: value
            for name, value in per_example.items()
            if name not in ("blocks", "stack")
        },
    }
    chex.assert_trees_all_close(
        _unrolled(per_example),
        oek.per_example_gradients(twin_layers, twin_stats, unrolled_params),
        rtol=1e-10,
        atol=1e-14,
    )
    distances = oek.frobenius_distances(layers, stats, state)
    chex.assert_shape(distances[stacked[0].name].ekfac, ())



class KindsBlock(nn.Module):
    """A block with a grouped convolution over positions, or an embedding of
    the tokens the scan broadcasts to every layer beside a Dense."""

    kind: str

    @nn.compact
    def __call__(self, x, tokens):
        if self.kind == "grouped_conv":
            hidden = nn.Conv(FEATURES, (3,), feature_group_count=2, name="conv")(x)
        else:
            embedded = nn.Embed(VOCABULARY, FEATURES, name="embed")(tokens)
            hidden = embedded + nn.Dense(FEATURES, name="dense")(x)
        return x + jnp.tanh(hidden), None


class KindsModel(nn.Module):
    kind: str
    scanned: bool

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(VOCABULARY, FEATURES, name="embed")(tokens)
        if self.scanned:
            scan = nn.scan(
                KindsBlock,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=nn.broadcast,
                length=NUM_LAYERS,
            )
            x, _ = scan(self.kind, name="blocks")(x, tokens)
        else:
            for layer in range(NUM_LAYERS):
                x, _ = KindsBlock(self.kind, name=f"block_{layer}")(x, tokens)
        return nn.Dense(VOCABULARY, name="head")(x)


@functools.cache
def _kinds_statistics(kind, scanned):
    """`KindsModel`'s params, layers and `(grads, stats)` of two batches: the
    same for every `max_factor_dim`, so computed once per model."""
    unrolled_params = KindsModel(kind, scanned=False).init(
        jax.random.key(3), _batch()[0]
    )["params"]
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), unrolled_params)
    if scanned:
        params = _scanned_params(params, "scan")
    curvature = oek.Curvature(
        _loss_fn(KindsModel(kind, scanned)), fisher_type="empirical"
    )
    layers = curvature.layers(params, *_batch())
    step = jax.jit(curvature.value_grad_and_stats)
    return params, layers, [step(params, *_batch(seed))[1:] for seed in (0, 1)]


@pytest.mark.parametrize("kind", ["grouped_conv", "embed"])
@pytest.mark.parametrize("max_factor_dim", [None, 2])
def test_grouped_conv_and_embed_in_a_scan_equal_the_unrolled_twins(
    kind, max_factor_dim
):
    """Grouped blocks (a vmap over groups inside the vmap over layers) and
    diagonal input factors (token ids) stacked by a scan: two refreshes of
    the scanned model give the unrolled twin's updates, layer by layer; also
    with block-diagonal factors (`max_factor_dim=2`: the conv's 7-wide input
    side, the embedding's and the Dense's sides in blocks of 2 or 3)."""
    updates = {}
    for scanned in (False, True):
        params, layers, steps = _kinds_statistics(kind, scanned)
        tx = oek.scale_by_ekfac(layers, max_factor_dim=max_factor_dim, **SETTINGS)
        state = tx.init(params)
        update = jax.jit(tx.update)  # one compilation for both updates
        for grads, stats in steps:
            updates[scanned], state = update(grads, state, params, stats=stats)
        if scanned:
            assert [block.stack for block in layers.blocks if block.stack] == [
                (NUM_LAYERS,)
            ] * (1 if kind == "grouped_conv" else 2)
    chex.assert_trees_all_close(
        _unrolled(updates[True]), updates[False], rtol=1e-8, atol=1e-12
    )


def test_adaptive_ekfac_on_a_scanned_model_equals_the_unrolled_twins():
    unrolled_params = _init("unrolled")
    params = _scanned_params(unrolled_params, "scan")
    layers = oek.Curvature(_loss_fn(Model("scan"))).layers(params, *_batch())
    twin_layers = oek.Curvature(_loss_fn(Model("unrolled"))).layers(
        unrolled_params, *_batch()
    )
    _, updates, state, _ = _one_update(
        "scan", params, "exact", "empirical", tx=oek.ekfac(layers)
    )
    _, twin_updates, twin_state, _ = _one_update(
        "unrolled", unrolled_params, "exact", "empirical", tx=oek.ekfac(twin_layers)
    )
    chex.assert_trees_all_close(_unrolled(updates), twin_updates, rtol=1e-8, atol=1e-12)
    chex.assert_trees_all_close(state.damping, twin_state.damping)


def test_scanned_model_trains_in_float32():
    params = jax.tree.map(lambda x: x.astype(jnp.float32), _init("scan_remat"))
    model = Model("scan_remat")
    curvature = oek.Curvature(_loss_fn(model), fisher_type="empirical")
    layers = curvature.layers(params, *_batch())
    tx = oek.ekfac(layers, learning_rate=0.3)
    state = tx.init(params)

    @jax.jit
    def step(params, state, batch):
        loss, grads, stats = curvature.value_grad_and_stats(params, *batch)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, loss

    losses = []
    for _ in range(8):
        params, state, loss = step(params, state, _batch())
        losses.append(float(loss))
    assert state[0].blocks["blocks/up"].scalings.dtype == jnp.float32
    assert losses[-1] < 0.7 * losses[0]


# --- nn.vmap ensembles -----------------------------------------------------------


class Ensemble(nn.Module):
    """`NUM_MEMBERS` dense members on the same input, averaged."""

    vmapped: bool

    @nn.compact
    def __call__(self, x):
        if self.vmapped:
            members = nn.vmap(
                nn.Dense,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                in_axes=None,
                axis_size=NUM_MEMBERS,
            )(3, name="members")(x)
        else:
            members = jnp.stack(
                [nn.Dense(3, name=f"member_{i}")(x) for i in range(NUM_MEMBERS)]
            )
        return members.mean(0)


NUM_MEMBERS = 2


def test_vmapped_ensemble_is_one_block_per_member():
    x = jax.random.normal(jax.random.key(0), (6, 4))
    y = jax.random.randint(jax.random.key(1), (6,), 0, 3)
    params = Ensemble(True).init(jax.random.key(2), x)["params"]
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float64), params)
    twin_params = {
        f"member_{i}": _element(params["members"], i) for i in range(NUM_MEMBERS)
    }

    def update(vmapped, params):
        model = Ensemble(vmapped)
        curvature = oek.Curvature(
            lambda p, x, y: oek.softmax_cross_entropy(model.apply({"params": p}, x), y),
            fisher_type="empirical",
        )
        layers = curvature.layers(params, x, y)
        tx = oek.scale_by_ekfac(layers, damping=1e-3)

        @jax.jit
        def one_update(params):
            _, grads, stats = curvature.value_grad_and_stats(params, x, y)
            return tx.update(grads, tx.init(params), params, stats=stats)[0]

        return layers, one_update(params)

    layers, updates = update(True, params)
    _, twin_updates = update(False, twin_params)
    assert [block.stack for block in layers.blocks] == [(NUM_MEMBERS,)]
    chex.assert_trees_all_close(
        {f"member_{i}": _element(updates["members"], i) for i in range(NUM_MEMBERS)},
        twin_updates,
        rtol=1e-8,
    )


# --- what stays refused ----------------------------------------------------------


class WeightTied(nn.Module):
    """One Dense applied at every step of a scan (broadcast parameters)."""

    @nn.compact
    def __call__(self, x):
        step = nn.scan(
            lambda module, carry, _: (module(carry), None),
            variable_broadcast="params",
            split_rngs={"params": False},
            length=3,
        )
        return step(nn.Dense(4, name="tied"), x, None)[0]


class OverExamples(nn.Module):
    """nn.vmap over the examples, one set of parameters."""

    @nn.compact
    def __call__(self, x):
        return nn.vmap(
            nn.Dense,
            variable_axes={"params": None},
            split_rngs={"params": False},
        )(4, name="per_example")(x)


class StackedOnAxisOne(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.vmap(
            nn.Dense,
            variable_axes={"params": 1},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=2,
        )(4, name="members")(x).mean(0)


@pytest.mark.parametrize(
    "model, message",
    [
        (WeightTied(), "tied: .*does not pass it its parameters"),
        (OverExamples(), "per_example: .*does not pass it its parameters"),
        (StackedOnAxisOne(), "members: .*stacked on an axis other than the first"),
    ],
)
def test_transforms_sharing_parameters_are_refused_with_what_to_do(model, message):
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(0), x)["params"]
    curvature = oek.Curvature(
        lambda p, x: oek.squared_error(model.apply({"params": p}, x), x),
        fisher_type="empirical",
    )
    with pytest.raises(ValueError, match=message):
        curvature.layers(params, x)
