"""flax.nnx: `optax_ekfac.nnx.Curvature` against the linen capture and brute force.

Each NNX model has a linen twin whose modules are named like the NNX
attributes, so both have the same parameter paths and the NNX weights are the
linen params as they are (`nnx.to_pure_dict`). The per-example reference is
`jax.vmap(jax.grad(...))` of the NNX loss.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import optax_ekfac as oek
from optax_ekfac._src import blocks, kinds

F64 = dict(param_dtype=jnp.float64)
LINEAR_CALL = nnx.Linear.__dict__["__call__"]
CONV = dict(kernel_size=(3, 3), strides=2, padding="CIRCULAR", feature_group_count=2)


class NnxMLP(nnx.Module):
    """`dense_0` is called twice; the head has no bias."""

    def __init__(self, rngs: nnx.Rngs):
        self.dense_0 = nnx.Linear(5, 5, **F64, rngs=rngs)
        self.head = nnx.Linear(5, 3, use_bias=False, **F64, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.dense_0(jnp.tanh(self.dense_0(x)))))


class LinenMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(5, name="dense_0", **F64)
        hidden = jnp.tanh(shared(jnp.tanh(shared(x))))
        return nn.Dense(3, use_bias=False, name="head", **F64)(hidden)


class NnxConvNet(nnx.Module):
    """A strided, grouped convolution with circular padding."""

    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(2, 4, **CONV, **F64, rngs=rngs)
        self.head = nnx.Linear(36, 3, **F64, rngs=rngs)

    def __call__(self, x):
        x = jnp.tanh(self.conv(x))
        return self.head(x.reshape(x.shape[0], -1))


class LinenConvNet(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = jnp.tanh(nn.Conv(4, **CONV, name="conv", **F64)(x))
        return nn.Dense(3, name="head", **F64)(x.reshape(x.shape[0], -1))


class NnxTied(nnx.Module):
    """Embedding lookups, a LinearGeneral over two axes, a tied `attend`."""

    def __init__(self, rngs: nnx.Rngs):
        self.embed = nnx.Embed(7, 4, **F64, rngs=rngs)
        self.mix = nnx.LinearGeneral((2, 2), 4, axis=(-2, -1), **F64, rngs=rngs)

    def __call__(self, tokens):
        hidden = self.embed(tokens)
        hidden = self.mix(hidden.reshape(hidden.shape[:-1] + (2, 2)))
        return self.embed.attend(jnp.tanh(hidden))


class LinenTied(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4, name="embed", **F64)
        hidden = embed(tokens)
        hidden = hidden.reshape(hidden.shape[:-1] + (2, 2))
        hidden = nn.DenseGeneral(4, axis=(-2, -1), name="mix", **F64)(hidden)
        return embed.attend(jnp.tanh(hidden))


def _batch(name):
    key_x, key_y = jax.random.split(jax.random.key(0))
    if name == "tied":
        # Few tokens, so that some repeat within an example.
        tokens = jax.random.randint(key_x, (4, 3), 0, 4)
        return tokens, jax.random.randint(key_y, (4, 3), 0, 7)
    shape = (6, 5) if name == "mlp" else (4, 5, 5, 2)
    x = jax.random.normal(key_x, shape, jnp.float64)
    return x, jax.random.randint(key_y, shape[:1], 0, 3)


MODELS = {
    "mlp": (NnxMLP, LinenMLP),
    "conv": (NnxConvNet, LinenConvNet),
    "tied": (NnxTied, LinenTied),
}


def nnx_loss(model, x, y):
    return oek.softmax_cross_entropy(model(x), y)


@pytest.fixture(scope="module", params=list(MODELS))
def twins(request):
    """Both captures, per-example gradients and one update, in one compiled
    function per model."""
    nnx_class, linen_class = MODELS[request.param]
    model = nnx_class(nnx.Rngs(1))
    linen_model = linen_class()
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    batch = _batch(request.param)

    def linen_loss(params, x, y):
        return oek.softmax_cross_entropy(linen_model.apply({"params": params}, x), y)

    curvature = oek.nnx.Curvature(nnx_loss, fisher_type="empirical")
    linen_curvature = oek.Curvature(linen_loss, fisher_type="empirical")
    layers = curvature.layers(model, *batch)
    linen_layers = linen_curvature.layers(params, *batch)
    tx = oek.scale_by_ekfac(linen_layers, damping=1e-2)

    @nnx.jit
    def run(model, params, batch):
        loss, grads, stats = curvature.value_grad_and_stats(model, *batch)
        state = nnx.state(model, nnx.Param)
        updates, _ = tx.update(grads, tx.init(state), state, stats=stats)
        linen = linen_curvature.value_grad_and_stats(params, *batch)
        linen_updates, _ = tx.update(linen[1], tx.init(params), params, stats=linen[2])

        graphdef, state, rest = nnx.split(model, nnx.Param, ...)

        def example_loss(state, *example):
            model = nnx.merge(graphdef, state, rest, copy=True)
            return nnx_loss(model, *(e[None] for e in example)).sum()

        per_example = jax.vmap(
            jax.grad(example_loss), in_axes=(None,) + (0,) * len(batch)
        )(state, *batch)
        per_example = blocks.leaves_by_path(per_example)
        # Per block: G_n from the rows, and from vmap(grad).
        block_gradients = {
            block.name: (
                kinds.per_example_block_gradients(
                    block, stats.layers[block.name], jnp.float64
                ),
                jax.vmap(lambda leaves, b=block: kinds.block_matrix(b, leaves))(
                    per_example
                ),
            )
            for block in layers.blocks
        }
        return (loss, grads, stats, updates), linen + (linen_updates,), block_gradients

    nnx_results, linen_results, block_gradients = run(model, params, batch)
    return dict(
        layers=layers,
        linen_layers=linen_layers,
        nnx=nnx_results,
        linen=linen_results,
        block_gradients=block_gradients,
    )


def test_layers_are_the_linen_twins(twins):
    assert twins["layers"] == twins["linen_layers"]
    assert {block.kind for block in twins["layers"].blocks} <= {
        "Dense",
        "DenseGeneral",
        "Conv",
        "Embed",
    }
    assert not twins["layers"].fallback


@pytest.mark.floor
def test_loss_grads_statistics_and_update_equal_linen(twins):
    loss, grads, stats, updates = twins["nnx"]
    linen_loss, linen_grads, linen_stats, linen_updates = twins["linen"]
    assert isinstance(grads, nnx.State)
    assert isinstance(jax.tree.leaves(grads, is_leaf=_is_variable)[0], nnx.Param)
    chex.assert_trees_all_close(loss, linen_loss, rtol=1e-12)
    chex.assert_trees_all_close(nnx.to_pure_dict(grads), linen_grads, rtol=1e-10)
    assert stats.num_terms == linen_stats.num_terms
    chex.assert_trees_all_close(stats.layers, linen_stats.layers, rtol=1e-10)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(updates), linen_updates, rtol=1e-8, atol=1e-12
    )


def test_rows_reproduce_per_example_gradients(twins):
    assert set(twins["block_gradients"]) == {b.name for b in twins["layers"].blocks}
    for from_rows, from_vmap_grad in twins["block_gradients"].values():
        chex.assert_trees_all_close(from_rows, from_vmap_grad, atol=1e-12)


def _is_variable(x):
    return isinstance(x, nnx.Variable)


def test_monte_carlo_fisher_passes_through():
    model = NnxMLP(nnx.Rngs(1))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    x, y = _batch("mlp")
    settings = dict(fisher_type="mc", num_samples=2)
    curvature = oek.nnx.Curvature(nnx_loss, **settings)

    def linen_loss(params, x, y):
        logits = LinenMLP().apply({"params": params}, x)
        return oek.softmax_cross_entropy(logits, y)

    linen_curvature = oek.Curvature(linen_loss, **settings)
    key = jax.random.key(3)

    @nnx.jit
    def run(model, params):
        _, _, stats = curvature.value_grad_and_stats(model, x, y, key=key)
        _, _, linen_stats = linen_curvature.value_grad_and_stats(params, x, y, key=key)
        return stats, linen_stats

    stats, linen_stats = run(model, params)
    (first_call, _) = stats.layers["dense_0"]
    chex.assert_shape(first_call.output_grads, (2 * len(x), 5))
    chex.assert_trees_all_close(stats.layers, linen_stats.layers, rtol=1e-10)
    assert (stats.num_terms, stats.num_samples) == (
        linen_stats.num_terms,
        linen_stats.num_samples,
    )
    with pytest.raises(ValueError, match="fisher_type"):
        oek.nnx.Curvature(nnx_loss, fisher_type="true")


class Classifier(nnx.Module):
    """Layers in an `nnx.List`, a LayerNorm (diagonal fallback), float32."""

    def __init__(self, rngs: nnx.Rngs):
        self.layers = nnx.List(
            [nnx.Linear(8, 16, rngs=rngs), nnx.Linear(16, 4, rngs=rngs)]
        )
        self.norm = nnx.LayerNorm(16, rngs=rngs)

    def __call__(self, x):
        return self.layers[1](self.norm(jax.nn.relu(self.layers[0](x))))


def test_nnx_optimizer_trains_under_one_compile():
    key_x, key_w = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (12, 32, 8), jnp.float32)  # 12 batches of 32
    y = jnp.argmax(x @ jax.random.normal(key_w, (8, 4), jnp.float32), -1)
    model = Classifier(nnx.Rngs(0))
    curvature = oek.nnx.Curvature(nnx_loss, fisher_type="empirical")
    layers = curvature.layers(model, x[0], y[0])
    assert [block.param_paths for block in layers.blocks] == [
        (("layers", "0", "kernel"), ("layers", "0", "bias")),
        (("layers", "1", "kernel"), ("layers", "1", "bias")),
    ]
    assert set(layers.fallback) == {("norm", "scale"), ("norm", "bias")}
    optimizer = nnx.Optimizer(
        model,
        oek.ekfac(layers, 0.05, momentum=0.9, damping=1e-2, eigen_update_every=5),
        wrt=nnx.Param,
    )
    traces = 0

    @nnx.jit
    def train_step(model, optimizer, x, y):
        nonlocal traces
        traces += 1
        loss, grads, stats = curvature.value_grad_and_stats(model, x, y)
        optimizer.update(model, grads, stats=stats)
        return loss

    losses = [float(train_step(model, optimizer, x[i], y[i])) for i in range(len(x))]
    assert traces == 1
    assert int(optimizer.step[...]) == len(x)
    assert int(optimizer.opt_state[0].count[...]) == len(x)
    assert nnx.state(model, nnx.Param)["layers"][0]["kernel"][...].dtype == jnp.float32
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


class Noisy(nnx.Module):
    """BatchNorm and Dropout; float32 (nnx keeps batch statistics float32)."""

    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(3, 4, rngs=rngs)
        self.norm = nnx.BatchNorm(4, rngs=rngs)
        self.dropout = nnx.Dropout(0.5, rngs=rngs)
        self.head = nnx.Linear(4, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.dropout(self.norm(self.hidden(x))))


def test_other_state_is_updated_as_nnx_value_and_grad_does():
    # BatchNorm statistics and the Dropout stream's count change in loss_fn.
    model = Noisy(nnx.Rngs(0, dropout=1))
    twin = nnx.clone(model)
    x, y = _batch("mlp")
    x, y = x[:, :3].astype(jnp.float32), y % 2  # Noisy has two classes
    curvature = oek.nnx.Curvature(nnx_loss, fisher_type="empirical")

    @nnx.jit
    def run(model, twin):
        loss, grads, _ = curvature.value_grad_and_stats(model, x, y)
        reference = nnx.value_and_grad(lambda m: nnx_loss(m, x, y).mean())(twin)
        return (loss, grads), reference

    (loss, grads), (ref_loss, ref_grads) = run(model, twin)
    assert np.isfinite(loss)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-6)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(grads), nnx.to_pure_dict(ref_grads), rtol=1e-5, atol=1e-7
    )
    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
        nnx.to_pure_dict(nnx.state(twin, nnx.BatchStat)),
    )
    assert not np.allclose(model.norm.mean[...], 0)
    assert int(model.dropout.rngs.count[...]) == int(twin.dropout.rngs.count[...]) == 1


class _Remat(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 4, rngs=rngs)

    def __call__(self, x):
        return nnx.remat(lambda layer, x: layer(x))(self.hidden, x)


class _Checkpointed(_Remat):
    """The model's own module, called under jax.checkpoint: named by its path."""

    def __call__(self, x):
        return jax.checkpoint(self.hidden)(x)


class _Vmapped(_Remat):
    def __call__(self, x):
        return nnx.vmap(lambda layer, x: layer(x), in_axes=(None, 0))(self.hidden, x)


@pytest.mark.parametrize(
    "model_class, name",
    [(_Checkpointed, "hidden"), (_Vmapped, "hidden")],
)
def test_layers_in_transforms_that_close_over_them_are_refused(model_class, name):
    """Transforms that do not pass a layer its parameters (a closure, a vmap
    over the examples): its calls can't be told apart. (nnx.remat and
    nnx.scan over a stack: tests/test_nnx_scan_remat.py.)"""
    model = model_class(nnx.Rngs(0))
    x = jnp.ones((2, 4))
    curvature = oek.nnx.Curvature(
        lambda model, x: oek.squared_error(model(x), x), fisher_type="empirical"
    )
    message = f"{name}: this Dense layer runs inside a JAX transformation"
    with pytest.raises(ValueError, match=message):
        curvature.layers(model, x)
    with pytest.raises(ValueError, match=message):
        nnx.jit(curvature.value_grad_and_stats)(model, x)
    # Nothing of the capture stays behind: the layers are plain nnx layers.
    assert nnx.Linear.__dict__["__call__"] is LINEAR_CALL
    chex.assert_shape(model(x), (2, 4))


def test_wrt_leaves_frozen_layers_uncaptured():
    model = NnxMLP(nnx.Rngs(1))
    x, y = _batch("mlp")
    curvature = oek.nnx.Curvature(
        nnx_loss,
        wrt=nnx.All(nnx.Param, nnx.PathContains("head")),
        fisher_type="empirical",
    )
    layers = curvature.layers(model, x, y)
    assert [block.name for block in layers.blocks] == ["head"]
    _, grads, stats = nnx.jit(curvature.value_grad_and_stats)(model, x, y)
    assert set(blocks.leaves_by_path(grads)) == {("head", "kernel")}
    assert set(stats.layers) == {"head"}


class _Shared(nnx.Module):
    """One Linear under two attributes: nnx keeps it (and the state) at one
    path, the first in sorted order."""

    def __init__(self, rngs: nnx.Rngs):
        self.encoder = nnx.Linear(3, 3, rngs=rngs)
        self.decoder = self.encoder
        self.head = nnx.Linear(3, 2, rngs=rngs)

    def __call__(self, x):
        return self.head(self.encoder(jnp.tanh(self.decoder(x))))


def test_a_shared_module_is_one_block_at_its_state_path():
    model = _Shared(nnx.Rngs(0))
    x, y = jnp.ones((4, 3)), jnp.zeros(4, jnp.int32)
    layers = oek.nnx.Curvature(nnx_loss).layers(model, x, y)
    assert [(b.name, b.num_calls) for b in layers.blocks] == [
        ("decoder", 2),
        ("head", 1),
    ]
    assert set(blocks.leaves_by_path(nnx.state(model, nnx.Param))) == {
        path for block in layers.blocks for path in block.param_paths
    }


def test_linen_params_are_refused():
    params = LinenMLP().init(jax.random.key(0), jnp.ones((1, 5)))["params"]
    with pytest.raises(TypeError, match="use optax_ekfac.Curvature"):
        oek.nnx.Curvature(nnx_loss).layers(params, jnp.ones((2, 5)), jnp.zeros(2))


def test_micro_batches_give_the_whole_batch():
    """`oek.accumulated` of an nnx `Curvature`, two micro-batches of 3
    against one batch of 6: the loss, the gradients (an `nnx.State`), the
    statistics, and the loss model's loss and Gauss-Newton products."""
    model = NnxMLP(nnx.Rngs(1))
    x, y = _batch("mlp")
    curvature = oek.nnx.Curvature(nnx_loss, fisher_type="empirical")
    accumulated = oek.accumulated(curvature, num_micro_batches=2)
    vectors = [
        jax.tree.map(
            lambda p, key=key: jax.random.normal(key, p.shape, p.dtype),
            nnx.state(model, nnx.Param),
        )
        for key in jax.random.split(jax.random.key(5), 2)
    ]

    @nnx.jit
    def run(model):
        def summary(loss, grads, stats):
            loss_model = stats.loss_model
            moved = jax.tree.map(jnp.add, loss_model.params, vectors[0])
            return (
                loss,
                grads,
                stats.layers,
                stats.num_terms,
                loss_model.loss_at(moved),
                loss_model.curvature_products(vectors),
            )

        return (
            summary(*curvature.value_grad_and_stats(model, x, y)),
            summary(*accumulated(model, x, y)),
        )

    whole, micro = run(model)
    loss, grads, layers, num_terms, moved_loss, products = micro
    assert isinstance(grads, nnx.State)
    np.testing.assert_allclose(loss, whole[0], rtol=1e-12)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(grads), nnx.to_pure_dict(whole[1]), rtol=1e-10
    )
    chex.assert_trees_all_close(layers, whole[2], rtol=1e-12)
    assert num_terms == whole[3] == len(x)
    np.testing.assert_allclose(moved_loss, whole[4], rtol=1e-12)
    assert moved_loss != loss
    np.testing.assert_allclose(products, whole[5], rtol=1e-10)


def test_micro_batches_carry_the_other_state_from_one_to_the_next():
    """BatchNorm statistics and the Dropout stream's count go through the
    micro-batches as through one `value_grad_and_stats` call per
    micro-batch, and end in the model; the loss model evaluates each
    micro-batch with the dropout masks its gradients saw."""
    model = Noisy(nnx.Rngs(0, dropout=1))
    twin = nnx.clone(model)
    x, y = _batch("mlp")
    x, y = x[:, :3].astype(jnp.float32), y % 2  # Noisy has two classes
    curvature = oek.nnx.Curvature(nnx_loss, fisher_type="empirical")
    accumulated = oek.accumulated(curvature, num_micro_batches=2)

    @nnx.jit
    def run(model, twin):
        loss, grads, stats = accumulated(model, x, y)
        loss_model = stats.loss_model
        halves = [
            curvature.value_grad_and_stats(twin, x[i : i + 3], y[i : i + 3])[:2]
            for i in (0, 3)
        ]
        return (loss, grads, loss_model.loss_at(loss_model.params)), halves

    (loss, grads, loss_at), halves = run(model, twin)
    assert np.isfinite(loss)
    np.testing.assert_allclose(loss, (halves[0][0] + halves[1][0]) / 2, rtol=1e-6)
    np.testing.assert_allclose(loss_at, loss, rtol=1e-6)
    chex.assert_trees_all_close(
        nnx.to_pure_dict(grads),
        jax.tree.map(
            lambda a, b: (a + b) / 2,
            nnx.to_pure_dict(halves[0][1]),
            nnx.to_pure_dict(halves[1][1]),
        ),
        rtol=1e-5,
        atol=1e-7,
    )
    chex.assert_trees_all_close(
        nnx.to_pure_dict(nnx.state(model, nnx.BatchStat)),
        nnx.to_pure_dict(nnx.state(twin, nnx.BatchStat)),
    )
    assert int(model.dropout.rngs.count[...]) == int(twin.dropout.rngs.count[...]) == 2
