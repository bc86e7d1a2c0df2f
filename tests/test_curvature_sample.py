"""Curvature from a bounded sample of the batch (`max_curvature_terms`).

The loss and gradients are the whole batch's; the statistics (factors,
scalings, the fallback's scale aside) are those of the sample's mean loss,
checked in float64 against `jax.vmap(jax.grad(...))` on the sample's rows.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import optax_ekfac as oek

DAMPING = 1e-2
NUM_EXAMPLES = 16


@pytest.fixture(scope="module")
def mlp():
    model = reference.MLP(features=(6, 3), use_bias=(True, True))
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (NUM_EXAMPLES, 5), jnp.float64)
    y = jax.random.randint(key_y, (NUM_EXAMPLES,), 0, 3)
    params, perturbations = reference.init(model, x)

    def loss_of_outputs(logits, labels):
        return -jnp.take_along_axis(
            jax.nn.log_softmax(logits), labels[:, None], axis=-1
        )[:, 0]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    return dict(
        model=model,
        x=x,
        y=y,
        params=params,
        perturbations=perturbations,
        loss_of_outputs=loss_of_outputs,
        loss_fn=loss_fn,
    )


@pytest.mark.parametrize("max_terms, num_sampled", [(6, 6), (7, 7), (1, 1)])
def test_sampled_curvature_is_the_curvature_of_the_sample(mlp, max_terms, num_sampled):
    model, x, y, params = mlp["model"], mlp["x"], mlp["y"], mlp["params"]
    curvature = oek.Curvature(
        mlp["loss_fn"], max_curvature_terms=max_terms, fisher_type="empirical"
    )
    layers = curvature.layers(params, x, y)
    tx = oek.scale_by_ekfac(layers, damping=DAMPING)
    loss, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, x, y)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)

    # Loss and gradients: the whole batch's, from plain autodiff.
    def mean_loss(params):
        return jnp.mean(mlp["loss_of_outputs"](model.apply({"params": params}, x), y))

    expected_loss, expected_grads = jax.value_and_grad(mean_loss)(params)
    chex.assert_trees_all_close(loss, expected_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, expected_grads, rtol=1e-10, atol=1e-14)
    assert stats.num_terms == num_sampled
    assert stats.gradient_terms == NUM_EXAMPLES
    assert stats.loss_model.batch[0].shape[0] == num_sampled

    # The curvature: that of the first `num_sampled` examples' mean loss.
    inputs, output_grads, param_grads = reference.per_example(
        model,
        params,
        mlp["perturbations"],
        mlp["loss_of_outputs"],
        np.asarray(x[:num_sampled]),
        np.asarray(y[:num_sampled]),
    )
    for layer in range(2):
        block = state.blocks[f"dense_{layer}"]
        rows = np.asarray(reference.with_ones(inputs[layer]))
        outputs = np.asarray(output_grads[layer])
        input_factor = rows.T @ rows / num_sampled
        output_factor = outputs.T @ outputs / num_sampled
        chex.assert_trees_all_close(block.input_factor, input_factor, rtol=1e-10)
        chex.assert_trees_all_close(
            block.output_factor, output_factor, rtol=1e-10, atol=1e-15
        )
        block_grads = np.asarray(reference.block_gradients(param_grads, layer, True))
        fisher = block_grads.reshape(num_sampled, -1)
        fisher = fisher.T @ fisher / num_sampled
        input_basis, output_basis, scalings = reference.ekfac_reference(
            input_factor, output_factor, fisher
        )
        if num_sampled > 2:  # eigenvectors are defined where eigenvalues differ
            reference.assert_same_basis(block.input_eigenbasis, input_basis, 1e-6)
        chex.assert_trees_all_close(block.scalings, scalings, rtol=1e-8, atol=1e-14)

        # The update: the sample's curvature applied to the whole batch's gradient.
        layer_grads = expected_grads[f"dense_{layer}"]
        gradient = np.concatenate([layer_grads["kernel"], layer_grads["bias"][None]])
        expected = reference.solve_update(
            np.asarray(block.input_eigenbasis),
            np.asarray(block.output_eigenbasis),
            np.asarray(block.scalings),
            gradient,
            DAMPING,
        )
        got = updates[f"dense_{layer}"]
        chex.assert_trees_all_close(got["kernel"], expected[:-1], rtol=1e-8)
        chex.assert_trees_all_close(got["bias"], expected[-1], rtol=1e-8)


def test_a_batch_within_the_bound_is_used_whole(mlp):
    params, x, y = mlp["params"], mlp["x"], mlp["y"]
    whole = oek.Curvature(
        mlp["loss_fn"], max_curvature_terms="all", fisher_type="empirical"
    )
    _, _, expected = jax.jit(whole.value_grad_and_stats)(params, x, y)
    for rows in (None, NUM_EXAMPLES, 1000):
        curvature = oek.Curvature(
            mlp["loss_fn"], max_curvature_terms=rows, fisher_type="empirical"
        )
        _, _, stats = jax.jit(curvature.value_grad_and_stats)(params, x, y)
        assert stats.num_terms == NUM_EXAMPLES and stats.num_batch_terms is None
        chex.assert_trees_all_close(stats.layers, expected.layers)


class _TokenModel(nn.Module):
    """Embedding, a Dense shared over positions, LayerNorm (a fallback)."""

    @nn.compact
    def __call__(self, tokens):
        hidden = nn.Embed(7, 4, param_dtype=jnp.float64)(tokens)
        hidden = nn.LayerNorm(param_dtype=jnp.float64)(hidden)
        return nn.Dense(7, param_dtype=jnp.float64)(jnp.tanh(hidden))


@pytest.fixture(scope="module")
def tokens():
    model = _TokenModel()
    data = jax.random.randint(jax.random.key(3), (NUM_EXAMPLES, 6), 0, 7)
    params = model.init(jax.random.key(4), data[:1, :-1])["params"]

    def loss_fn(params, windows):
        logits = model.apply({"params": params}, windows[:, :-1])
        return oek.softmax_cross_entropy(logits, windows[:, 1:])  # [B, 5]

    return dict(model=model, data=data, params=params, loss_fn=loss_fn)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_token_losses_count_as_terms(tokens, fisher_type):
    """Five loss terms per sequence: a bound of 17 terms is 3 sequences."""
    params, data = tokens["params"], tokens["data"]
    curvature = oek.Curvature(
        tokens["loss_fn"], fisher_type=fisher_type, max_curvature_terms=17
    )
    key = jax.random.key(5)
    loss, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, data, key=key)
    whole = oek.Curvature(tokens["loss_fn"], fisher_type=fisher_type)
    expected_loss, expected_grads, _ = jax.jit(whole.value_grad_and_stats)(
        params, data, key=key
    )
    chex.assert_trees_all_close((loss, grads), (expected_loss, expected_grads))
    # The sample's statistics are those a capture of the first three sequences
    # gives, with the same key.
    _, _, expected = jax.jit(whole.value_grad_and_stats)(params, data[:3], key=key)
    assert stats.num_terms == 3 * 5 and stats.gradient_terms == NUM_EXAMPLES * 5
    chex.assert_trees_all_close(stats.layers, expected.layers)
    for calls in stats.layers.values():
        for call in calls:
            assert call.inputs.shape[0] == 3


def test_the_fallback_scales_by_the_whole_batchs_terms(tokens):
    """`v = N g²` with `N` the terms the gradient averages, not the sample's."""
    params, data = tokens["params"], tokens["data"]
    curvature = oek.Curvature(
        tokens["loss_fn"], max_curvature_terms=17, fisher_type="empirical"
    )
    layers = curvature.layers(params, data)
    assert layers.fallback
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, data)
    tx = oek.scale_by_ekfac(layers)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
    for path in layers.fallback:
        gradient = grads
        for key in path:
            gradient = gradient[key]
        chex.assert_trees_all_close(
            state.second_moments["/".join(path)],
            NUM_EXAMPLES * 5 * jnp.square(gradient),
            rtol=1e-10,
        )


def test_default_bound_follows_the_widest_factor():
    model = nn.Sequential([nn.Dense(300), nn.tanh, nn.Dense(10)])
    x = jnp.zeros((2, 20))
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x):
        return oek.squared_error(model.apply({"params": params}, x), jnp.zeros((2, 10)))

    layers = oek.Curvature(loss_fn).layers(params, x)
    assert oek.curvature_terms(layers) == 301  # the second layer's inputs, bias too
    narrow = nn.Dense(3)
    narrow_params = narrow.init(jax.random.key(0), x)["params"]
    narrow_layers = oek.Curvature(
        lambda p, x: oek.squared_error(
            narrow.apply({"params": p}, x), jnp.zeros((2, 3))
        )
    ).layers(narrow_params, x)
    assert oek.curvature_terms(narrow_layers) == 256
    # Token losses: at least the terms of 32 sequences.
    assert oek.curvature_terms(narrow_layers, terms_per_example=63) == 32 * 63


@pytest.mark.parametrize("rows", [0, -3, 2.5, "some", True])
def test_a_bad_bound_is_refused(rows):
    with pytest.raises(ValueError, match="max_curvature_terms"):
        oek.Curvature(lambda p, x: x, max_curvature_terms=rows, fisher_type="empirical")


def test_defaults_train_on_a_batch_larger_than_the_bound():
    """float32, as users run: 512 examples, the curvature from 256 of them."""
    model = nn.Sequential([nn.Dense(32), nn.tanh, nn.Dense(4)])
    key_x, key_w = jax.random.split(jax.random.key(7))
    x = jax.random.normal(key_x, (512, 8), jnp.float32)
    y = jnp.argmax(x @ jax.random.normal(key_w, (8, 4), jnp.float32), -1)
    params = model.init(jax.random.key(8), x[:1])["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    layers = curvature.layers(params, x, y)
    tx = oek.ekfac(layers)

    @jax.jit
    def step(params, state):
        loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, loss, stats.num_terms

    state = tx.init(params)
    losses = []
    for _ in range(15):
        params, state, loss, num_terms = step(params, state)
        losses.append(float(loss))
    assert num_terms == 256
    assert losses[-1] < 0.3 * losses[0], losses
    assert int(state.preconditioner.skipped_steps) == 0


def test_the_default_sample_holds_32_sequences_of_token_losses(tokens):
    """20 terms per sequence: the default bound is the terms of 32 of them."""
    data = jax.random.randint(jax.random.key(9), (40, 21), 0, 7)
    curvature = oek.Curvature(tokens["loss_fn"], fisher_type="empirical")
    _, _, stats = jax.jit(curvature.value_grad_and_stats)(tokens["params"], data)
    assert stats.num_terms == 32 * 20 and stats.num_batch_terms == 40 * 20


def test_accumulated_micro_batches_each_give_their_sample(mlp):
    """Two micro-batches of 8, a bound of 3: rows 0-2 and 8-10, the loss and
    gradients of all 16."""
    params, x, y = mlp["params"], mlp["x"], mlp["y"]
    sampled = oek.Curvature(
        mlp["loss_fn"], max_curvature_terms=3, fisher_type="empirical"
    )
    loss, grads, stats = jax.jit(oek.accumulated(sampled, 2))(params, x, y)
    whole = oek.Curvature(
        mlp["loss_fn"], max_curvature_terms="all", fisher_type="empirical"
    )
    expected_loss, expected_grads, _ = jax.jit(whole.value_grad_and_stats)(params, x, y)
    rows = jnp.array([0, 1, 2, 8, 9, 10])
    _, _, expected = jax.jit(whole.value_grad_and_stats)(params, x[rows], y[rows])
    chex.assert_trees_all_close((loss, grads), (expected_loss, expected_grads))
    assert stats.num_terms == 6 and float(stats.num_batch_terms) == NUM_EXAMPLES
    chex.assert_trees_all_close(stats.layers, expected.layers)
