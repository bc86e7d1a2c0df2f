"""The curvature is the Fisher of the mean loss `loss_fn` defines.

Token losses `[B, T]` are `N = B * T` loss terms; the factors and scalings
divide by `N`, not by the `B` examples. The reference here is the Newton step
of the mean loss, from `jax.hessian` of a plain function of the parameters
(no library code): on a linear-Gaussian token model the true Fisher is the
Hessian, so K-FAC with the Monte-Carlo Fisher and tiny damping takes the
Newton step, up to the sampling noise. Dividing by `B` instead (the bug this
pins) gives a step `T` times too short; the reshaped twin (`[B * T]` rows)
catches a curvature that depends on the model's reshapes.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ekfac as oek

B, T, F, OUT = 8, 16, 3, 2


class TokenDense(nn.Module):
    """One Dense on `[B, T, F]` token inputs, as written or on `[B * T]` rows."""

    reshape: bool

    @nn.compact
    def __call__(self, x):
        dense = nn.Dense(OUT, name="dense", param_dtype=jnp.float64)
        if not self.reshape:
            return dense(x)
        batch, length, width = x.shape
        return dense(x.reshape(batch * length, width)).reshape(batch, length, OUT)


def _data():
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (B, T, F), jnp.float64) + 0.5
    y = jax.random.normal(key_y, (B, T, OUT), jnp.float64)
    return x, y


def _newton_step(params, x, y):
    """`H⁻¹ g` of the mean token loss, by brute force over a flat vector."""
    flat, unravel = jax.flatten_util.ravel_pytree(params)

    def mean_loss(flat):
        kernel, bias = unravel(flat)["dense"]["kernel"], unravel(flat)["dense"]["bias"]
        predictions = x @ kernel + bias
        return 0.5 * jnp.mean(jnp.sum((predictions - y) ** 2, -1))

    gradient = jax.grad(mean_loss)(flat)
    hessian = jax.hessian(mean_loss)(flat)
    return unravel(np.linalg.solve(hessian, gradient))


def _kfac_update(reshape, num_samples):
    model = TokenDense(reshape=reshape)
    x, y = _data()
    params = model.init(jax.random.key(1), x)["params"]

    def loss_fn(params, x, y):
        return oek.squared_error(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="mc", num_samples=num_samples)
    layers = curvature.layers(params, x, y)
    tx = oek.scale_by_ekfac(layers, damping=1e-8, eigenvalue_correction=False)
    _, grads, stats = curvature.value_grad_and_stats(
        params, x, y, key=jax.random.key(2)
    )
    assert stats.num_terms == B * T
    updates, _ = tx.update(grads, tx.init(params), params, stats=stats)
    return params, (x, y), updates


@pytest.mark.parametrize("reshape", [False, True])
def test_kfac_takes_the_newton_step_of_the_mean_token_loss(reshape):
    params, (x, y), updates = _kfac_update(reshape, num_samples=64)
    newton = _newton_step(params, x, y)
    # 64 samples x 128 tokens of a 2-wide Gaussian: B is I within ~3%.
    for leaf, reference in zip(jax.tree.leaves(updates), jax.tree.leaves(newton)):
        error = np.linalg.norm(leaf - reference) / np.linalg.norm(reference)
        assert error < 0.1, error


def test_the_curvature_does_not_depend_on_a_reshape():
    _, _, as_written = _kfac_update(reshape=False, num_samples=4)
    _, _, reshaped = _kfac_update(reshape=True, num_samples=4)
    chex.assert_trees_all_close(as_written, reshaped, rtol=1e-10)


class Positions(nn.Module):
    """Token embeddings plus learned positions, written in several ways."""

    positions: str

    @nn.compact
    def __call__(self, tokens):
        batch, length = tokens.shape
        hidden = nn.Embed(5, 4, name="tokens")(tokens)
        table = nn.Embed(length, 4, name="positions")
        if self.positions == "arange":
            hidden = hidden + table(jnp.arange(length))
        elif self.positions == "arange[None]":
            hidden = hidden + table(jnp.arange(length)[None])
        elif self.positions == "broadcast":
            hidden = hidden + table(
                jnp.broadcast_to(jnp.arange(length), (batch, length))
            )
        elif self.positions == "time-major":
            hidden = nn.Dense(4, name="mix")(hidden.transpose(1, 0, 2))
            hidden = hidden.transpose(1, 0, 2)
        elif self.positions == "flattened":
            flat = nn.Dense(4, name="mix")(hidden.reshape(batch * length, 4))
            hidden = flat.reshape(batch, length, 4)
        return nn.Dense(5, name="head")(hidden)


def _positions_curvature(positions):
    model = Positions(positions)
    tokens = jax.random.randint(jax.random.key(0), (3, 6), 0, 5)
    params = model.init(jax.random.key(1), tokens)["params"]

    def loss_fn(params, tokens):
        logits = model.apply({"params": params}, tokens)
        return oek.softmax_cross_entropy(logits, tokens)

    return oek.Curvature(loss_fn, fisher_type="empirical"), params, tokens


@pytest.mark.parametrize(
    "positions, layer",
    [("arange", "positions"), ("arange[None]", "positions"), ("time-major", "mix")],
)
def test_a_layer_without_an_example_axis_is_refused_by_name(positions, layer):
    curvature, params, tokens = _positions_curvature(positions)
    with pytest.raises(ValueError, match=f"^{layer}: .*jnp.broadcast_to"):
        curvature.layers(params, tokens)


@pytest.mark.parametrize(
    "positions, layer", [("broadcast", "positions"), ("flattened", "mix")]
)
def test_a_layer_with_an_example_axis_is_accepted(positions, layer):
    curvature, params, tokens = _positions_curvature(positions)
    layers = curvature.layers(params, tokens)
    assert layer in {block.name for block in layers.blocks}


def test_broadcast_positions_get_per_example_output_gradients():
    """Each example's share of the positions' gradient: vmap(grad) of one
    example's summed token losses equals the statistics' per-example
    gradient of the position table."""
    curvature, params, tokens = _positions_curvature("broadcast")
    layers = curvature.layers(params, tokens)
    _, _, stats = curvature.value_grad_and_stats(params, tokens)
    per_example = oek.per_example_gradients(layers, stats, params)

    def example_loss(params, example):
        return curvature.loss_fn(params, example[None]).sum()

    reference = jax.vmap(jax.grad(example_loss), in_axes=(None, 0))(params, tokens)
    chex.assert_trees_all_close(
        per_example["positions"]["embedding"],
        reference["positions"]["embedding"],
        rtol=1e-5,
        atol=1e-6,
    )


def test_nnx_positions_without_an_example_axis_are_refused_by_name():
    from flax import nnx

    class NnxPositions(nnx.Module):
        def __init__(self, rngs):
            self.tokens = nnx.Embed(5, 4, rngs=rngs)
            self.positions = nnx.Embed(6, 4, rngs=rngs)
            self.head = nnx.Linear(4, 5, rngs=rngs)

        def __call__(self, tokens):
            length = tokens.shape[1]
            return self.head(self.tokens(tokens) + self.positions(jnp.arange(length)))

    model = NnxPositions(nnx.Rngs(0))
    tokens = jax.random.randint(jax.random.key(0), (3, 6), 0, 5)

    def loss_fn(model, tokens):
        return oek.softmax_cross_entropy(model(tokens), tokens)

    with pytest.raises(ValueError, match="^positions: .*jnp.broadcast_to"):
        oek.nnx.Curvature(loss_fn).layers(model, tokens)
