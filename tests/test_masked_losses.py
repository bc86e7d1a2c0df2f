"""Weighted and masked losses: the helpers' `weights`.

Pinned against references written here in float64 (per-term losses in `jnp`,
`jax.vmap(jax.grad(...))` per-sequence gradients, the logits' analytic
cross-entropy gradient `w (softmax(z) - onehot(y))`, dense `Jᵀ H J`) on a
token model `Embed -> Dense -> tanh -> Dense` with a padding mask:

* the loss is `Σ w l / Σ w`, the gradients are its gradients, `num_terms` is
  the number of real tokens;
* the per-sequence gradients and the Fisher block the statistics hold count
  the real tokens only, and so do `scale_by_ekfac`'s output factor and
  scalings after one update;
* padded positions' labels change nothing, and both Fisher types give them
  zero output gradients; the Monte-Carlo Fisher scales a weighted term's
  sampled output gradient by `√w` (its Fisher by `w`);
* the adaptive `ekfac`'s Gauss-Newton products are the dense ones of the
  weighted loss;
* float32 training with a mask, micro-batches and EKFAC on part of the model;
* weights of another shape than the returned losses are refused.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree
from token_model import (
    IDS,
    LENGTHS,
    MASK,
    MODEL,
    PARAMS,
    TARGETS,
    VOCAB,
    masked_loss_fn,
)

import optax_ekfac as oek


def term_losses(params, ids, targets):
    """Reference per-term losses, `logsumexp(z) - z[y]`."""
    logits = MODEL.apply({"params": params}, ids)
    picked = jnp.take_along_axis(logits, targets[..., None], -1)[..., 0]
    return jax.nn.logsumexp(logits, -1) - picked


@jax.jit
def reference_loss(params, weights=MASK):
    weights = jnp.asarray(weights, jnp.float64)
    return jnp.sum(weights * term_losses(params, IDS, TARGETS)) / weights.sum()


@jax.jit
def per_sequence_gradients(params, weights):
    """`∇ Σ_t w_t l_t` of each sequence: `vmap(grad)`."""

    def sequence_loss(params, ids, targets, weights):
        return jnp.sum(weights * term_losses(params, ids[None], targets[None])[0])

    return jax.vmap(jax.grad(sequence_loss), in_axes=(None, 0, 0, 0))(
        params, IDS, TARGETS, jnp.asarray(weights, jnp.float64)
    )


def block_gradients(grads, name):
    """Per-sequence block matrices: kernel rows, then the bias row."""
    layer = grads[name]
    return jnp.concatenate([layer["kernel"], layer["bias"][:, None]], 1)


@pytest.fixture(scope="module")
def captured():
    curvature = oek.Curvature(masked_loss_fn, fisher_type="empirical")
    layers = curvature.layers(PARAMS, IDS, TARGETS, MASK)
    loss, grads, stats = jax.jit(curvature.value_grad_and_stats)(
        PARAMS, IDS, TARGETS, MASK
    )
    return layers, loss, grads, stats


def test_loss_gradients_and_number_of_terms(captured):
    _, loss, grads, stats = captured
    np.testing.assert_allclose(loss, reference_loss(PARAMS), rtol=1e-12)
    expected = jax.jit(jax.grad(reference_loss))(PARAMS)
    chex.assert_trees_all_close(grads, expected, rtol=1e-10)
    assert int(stats.num_terms) == LENGTHS.sum() == 15


def test_per_sequence_gradients_and_fisher_count_real_tokens(captured):
    layers, _, _, stats = captured
    expected = per_sequence_gradients(PARAMS, MASK)
    per_example = jax.jit(oek.per_example_gradients, static_argnums=0)(
        layers, stats, PARAMS
    )
    chex.assert_trees_all_close(per_example, expected, rtol=1e-10, atol=1e-12)
    for block in layers.blocks[1:]:
        flat = block_gradients(expected, block.name).reshape(len(LENGTHS), -1)
        fisher = flat.T @ flat / LENGTHS.sum()
        actual = jax.jit(oek.fisher_block, static_argnums=0)(block, stats)
        np.testing.assert_allclose(actual, fisher, rtol=1e-10, atol=1e-14)


def test_output_factor_and_scalings_count_real_tokens(captured):
    layers, _, grads, stats = captured
    tx = oek.scale_by_ekfac(layers, damping=1e-3)
    _, state = jax.jit(lambda g, s, st: tx.update(g, s, None, stats=st))(
        grads, tx.init(PARAMS), stats
    )
    head = state.blocks["Dense_1"]
    # The logits' gradient of w·l is w (softmax(z) - onehot(y)).
    logits = jax.jit(MODEL.apply)({"params": PARAMS}, IDS)
    output_grads = MASK[..., None] * (
        jax.nn.softmax(logits) - jax.nn.one_hot(TARGETS, VOCAB)
    )
    flat_output_grads = output_grads.reshape(-1, VOCAB)
    np.testing.assert_allclose(
        head.output_factor,
        flat_output_grads.T @ flat_output_grads / LENGTHS.sum(),
        rtol=1e-10,
        atol=1e-14,
    )
    expected = per_sequence_gradients(PARAMS, MASK)
    for name in ("Dense_0", "Dense_1"):
        block = state.blocks[name]
        projected = (
            block.input_eigenbasis.T
            @ block_gradients(expected, name)
            @ block.output_eigenbasis
        )
        np.testing.assert_allclose(
            block.scalings,
            jnp.sum(projected**2, 0) / LENGTHS.sum(),
            rtol=1e-9,
            atol=1e-14,
        )


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_padded_positions_contribute_nothing(fisher_type):
    curvature = oek.Curvature(masked_loss_fn, fisher_type=fisher_type)
    step = jax.jit(curvature.value_grad_and_stats)
    key = jax.random.key(3)
    other_targets = jnp.where(MASK, TARGETS, (TARGETS + 3) % VOCAB)
    loss, grads, stats = step(PARAMS, IDS, TARGETS, MASK, key=key)
    other_loss, other_grads, other_stats = step(
        PARAMS, IDS, other_targets, MASK, key=key
    )
    np.testing.assert_allclose(loss, other_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, other_grads, rtol=1e-12)
    chex.assert_trees_all_close(stats.layers, other_stats.layers, rtol=1e-12)
    num_samples = 1
    for calls in stats.layers.values():
        output_grads = calls[0].output_grads.reshape(num_samples, *MASK.shape, -1)
        assert jnp.all(output_grads[:, ~MASK] == 0)
        assert jnp.any(output_grads[:, MASK] != 0)
    assert int(stats.num_terms) == 15


def test_monte_carlo_fisher_weighs_each_term_by_its_weight():
    """The sampled output gradients of `w·l` are `√w` times those of `l` (same
    labels: same key), so the Fisher is `(1/Σw) Σ w F_n`."""
    weights = jnp.asarray(np.random.default_rng(4).uniform(0.0, 2.0, MASK.shape))
    curvature = oek.Curvature(masked_loss_fn, fisher_type="mc", num_samples=2)
    step = jax.jit(curvature.value_grad_and_stats)
    key = jax.random.key(5)
    loss, _, weighted = step(PARAMS, IDS, TARGETS, weights, key=key)
    _, _, plain = step(PARAMS, IDS, TARGETS, jnp.ones_like(weights), key=key)
    np.testing.assert_allclose(loss, reference_loss(PARAMS, weights), rtol=1e-12)
    np.testing.assert_allclose(weighted.num_terms, weights.sum(), rtol=1e-12)
    scale = jnp.sqrt(weights)[None, ..., None]
    for name, calls in plain.layers.items():
        expected = calls[0].output_grads.reshape(2, *MASK.shape, -1) * scale
        np.testing.assert_allclose(
            weighted.layers[name][0].output_grads.reshape(expected.shape),
            expected,
            rtol=1e-10,
            atol=1e-14,
        )


def test_gauss_newton_products_of_a_weighted_loss(captured):
    """`LossModel.curvature_products` is `Vᵀ Jᵀ H J V`, `H` the Hessian of
    `Σ w l / Σ w` in the logits, for the adaptive `ekfac`."""
    _, _, _, stats = captured
    flat_params, unravel = ravel_pytree(PARAMS)

    @jax.jit
    def dense_ggn(flat_params):
        def logits_of(flat):
            return MODEL.apply({"params": unravel(flat)}, IDS)

        logits = logits_of(flat_params)
        jacobian = jax.jacobian(lambda p: logits_of(p).reshape(-1))(flat_params)

        def tail(flat_logits):
            z = flat_logits.reshape(logits.shape)
            picked = jnp.take_along_axis(z, TARGETS[..., None], -1)[..., 0]
            terms = jax.nn.logsumexp(z, -1) - picked
            return jnp.sum(MASK * terms) / MASK.sum()

        hessian = jax.hessian(tail)(logits.reshape(-1))
        return jacobian.T @ hessian @ jacobian

    ggn = np.asarray(dense_ggn(flat_params))
    rng = np.random.default_rng(6)
    vectors = [
        jax.tree.map(lambda leaf: jnp.asarray(rng.standard_normal(leaf.shape)), PARAMS)
        for _ in range(2)
    ]
    stacked = np.stack([np.asarray(ravel_pytree(v)[0]) for v in vectors])
    products = jax.jit(lambda model, v: model.curvature_products(v))(
        stats.loss_model, vectors
    )
    np.testing.assert_allclose(products, stacked @ ggn @ stacked.T, rtol=1e-9)
    loss_at = jax.jit(lambda model, params: model.loss_at(params))
    np.testing.assert_allclose(
        loss_at(stats.loss_model, PARAMS), reference_loss(PARAMS), rtol=1e-12
    )


def test_float32_masked_training_in_micro_batches_with_partial_ekfac():
    """The float32 path users run, everything at once: a padding mask, two
    micro-batches, EKFAC on the Dense layers and Adam on the embedding,
    `optax_ekfac.TrainState`: the masked loss falls."""
    params = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), PARAMS)
    curvature = oek.Curvature(masked_loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, IDS, TARGETS, MASK)
    labels = {name: "adam" if name == "Embed_0" else "ekfac" for name in params}
    tx = optax.multi_transform(
        {"ekfac": oek.ekfac(layers, learning_rate=0.3), "adam": optax.adam(1e-2)},
        labels,
    )
    state = oek.TrainState.create(apply_fn=MODEL.apply, params=params, tx=tx)
    value_grad_and_stats = oek.accumulated(curvature, num_micro_batches=2)

    @jax.jit
    def train_step(state):
        loss, grads, stats = value_grad_and_stats(state.params, IDS, TARGETS, MASK)
        return state.apply_gradients(grads=grads, stats=stats), loss

    losses = []
    for _ in range(5):
        state, loss = train_step(state)
        losses.append(float(loss))
    assert loss.dtype == jnp.float32
    assert losses[-1] < 0.9 * losses[0]


def test_weights_of_another_shape_are_refused():
    logits = jnp.zeros((2, 3, VOCAB))
    with pytest.raises(ValueError, match="weights must have the losses' shape"):
        oek.softmax_cross_entropy(logits, jnp.zeros((2, 3), int), weights=MASK)

    def reduced(params, ids, targets, mask):
        return masked_loss_fn(params, ids, targets, mask).sum(-1)

    with pytest.raises(ValueError, match="return the helper's weighted losses"):
        oek.Curvature(reduced).layers(PARAMS, IDS, TARGETS, MASK)
