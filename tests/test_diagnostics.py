"""Diagnostics against brute force: per-example gradients, dense blocks, distances."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import traverse_util

import optax_ekfac as oek
from optax_ekfac._src import blocks

per_example = jax.jit(reference.per_example, static_argnums=(0, 3))
per_example_param_grads = jax.jit(reference.per_example_param_grads, static_argnums=0)
init = jax.jit(reference.init, static_argnums=0)


class _DenseNet(nn.Module):
    """Dense with and without bias, and a LayerNorm that no block owns."""

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(param_dtype=jnp.float64)(
            nn.Dense(6, param_dtype=jnp.float64)(x)
        )
        return nn.Dense(3, use_bias=False, param_dtype=jnp.float64)(jnp.tanh(x))


class _SharedNet(nn.Module):
    """Weight sharing: positions of a sequence, and one module called twice."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(4, name="shared", param_dtype=jnp.float64)
        hidden = shared(jnp.tanh(shared(x)))  # [N, T, 4]
        return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(hidden).mean(1))


class _ConvNet(nn.Module):
    """Strided Conv, grouped Conv, then DenseGeneral over all feature axes."""

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(4, (3, 3), strides=2, param_dtype=jnp.float64)(x)
        x = nn.Conv(4, (2, 2), feature_group_count=2, param_dtype=jnp.float64)(
            jnp.tanh(x)
        )
        return nn.DenseGeneral(3, axis=(-3, -2, -1), param_dtype=jnp.float64)(
            jnp.tanh(x)
        )


class _EmbedNet(nn.Module):
    @nn.compact
    def __call__(self, ids):
        hidden = nn.Embed(7, 4, param_dtype=jnp.float64)(ids)
        return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(hidden).mean(1))


def _inputs(name):
    key = jax.random.key(0)
    if name == "embed":
        return jax.random.randint(key, (6, 5), 0, 7)
    shape = {"dense": (6, 5), "shared": (6, 3, 4), "conv": (6, 7, 7, 2)}[name]
    return jax.random.normal(key, shape, jnp.float64)


MODELS = {
    "dense": _DenseNet(),
    "shared": _SharedNet(),
    "conv": _ConvNet(),
    "embed": _EmbedNet(),
}


def _subtree(tree, paths):
    leaves = blocks.leaves_by_path(tree)
    return traverse_util.unflatten_dict({path: leaves[path] for path in paths})


@pytest.mark.parametrize("name", MODELS)
def test_per_example_gradients_and_variance_match_vmap_grad(name):
    model, x = MODELS[name], _inputs(name)
    y = jax.random.randint(jax.random.key(1), (x.shape[0],), 0, 3)
    params = jax.jit(model.init)(jax.random.key(2), x)["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, x, y)

    gradients, variance = jax.jit(
        lambda stats, params: (
            oek.per_example_gradients(layers, stats, params),
            oek.gradient_variance(layers, stats, params),
        )
    )(stats, params)

    owned = [path for block in layers.blocks for path in block.param_paths]
    expected = _subtree(per_example_param_grads(loss_fn, params, x, y), owned)
    assert set(traverse_util.flatten_dict(gradients)) == set(owned)
    chex.assert_trees_all_close(gradients, expected, rtol=1e-9, atol=1e-13)
    chex.assert_trees_all_close(
        variance, jax.tree.map(lambda g: g.var(0), expected), rtol=1e-9, atol=1e-15
    )
    # From empirical statistics they average to the batch gradient.
    chex.assert_trees_all_close(
        jax.tree.map(lambda g: g.mean(0), gradients),
        _subtree(grads, owned),
        rtol=1e-9,
        atol=1e-14,
    )


def _sampled_labels(loss, model, params, x, stats, num_samples):
    """The labels a Monte-Carlo capture sampled, from its last output gradients."""
    tiled_x = jnp.tile(x, (num_samples,) + (1,) * (x.ndim - 1))
    last = f"dense_{len(model.features) - 1}"
    outputs = model.apply({"params": params}, tiled_x)
    labels = reference.labels_of_output_grads(
        loss, outputs, stats.layers[last][0].output_grads
    )
    return tiled_x, labels


def _brute_force_fisher(model, params, perturbations, loss, x, labels, layer):
    """The exact Fisher of a layer from `jax.vmap(jax.grad(...))` with `labels`."""
    param_grads = per_example(model, params, perturbations, loss, x, labels)[2]
    return reference.dense_fisher(
        reference.block_gradients(param_grads, layer, model.use_bias[layer])
    )


def _capture_and_update(curvature, params, batch, key):
    """Layers, the stats of one batch, and `ekfac`'s state after one update
    with them (a chain: `frobenius_distances` finds the EKFAC state in it)."""
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, *batch, key=key)
    layers = curvature.layers(params, *batch)
    tx = oek.ekfac(layers, learning_rate=0.1)
    _, state = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)
    return layers, stats, state


NUM_SAMPLES = 4


@pytest.fixture(scope="module", params=["empirical", "mc"])
def nonlinear(request):
    """A tanh MLP, its statistics of either Fisher type, one update, and the
    brute-force Fisher of the same type: for "mc", the sampled Fisher of the
    very labels the capture drew."""
    fisher_type = request.param
    model = reference.MLP(features=(5, 3), use_bias=(True, False))
    x = jax.random.normal(jax.random.key(3), (16, 4), jnp.float64)
    y = jax.random.randint(jax.random.key(4), (16,), 0, 3)
    params, perturbations = init(model, x)
    loss = oek.softmax_cross_entropy

    def loss_fn(params, x, y):
        return loss(model.apply({"params": params}, x), y)

    num_samples = NUM_SAMPLES if fisher_type == "mc" else 1
    curvature = oek.Curvature(loss_fn, fisher_type=fisher_type, num_samples=num_samples)
    layers, stats, state = _capture_and_update(
        curvature, params, (x, y), jax.random.key(5)
    )
    if fisher_type == "mc":
        x, y = _sampled_labels(loss, model, params, x, stats, num_samples)
    inputs, output_grads, _ = per_example(model, params, perturbations, loss, x, y)
    references = {}
    for layer, use_bias in enumerate(model.use_bias):
        rows = reference.with_ones(inputs[layer]) if use_bias else inputs[layer]
        references[f"dense_{layer}"] = dict(
            input_factor=rows.T @ rows / len(rows),
            output_factor=output_grads[layer].T @ output_grads[layer] / len(rows),
            fisher=_brute_force_fisher(model, params, perturbations, loss, x, y, layer),
        )
    return dict(layers=layers, stats=stats, state=state, references=references)


def test_dense_blocks_match_the_reference(nonlinear):
    ekfac_state = nonlinear["state"][0]  # ekfac = chain(scale_by_ekfac, sgd)
    for block in nonlinear["layers"].blocks:
        ref = nonlinear["references"][block.name]
        block_state = ekfac_state.blocks[block.name]
        chex.assert_trees_all_close(
            oek.fisher_block(block, nonlinear["stats"]), ref["fisher"], atol=1e-12
        )
        chex.assert_trees_all_close(
            oek.kfac_block(block_state),
            np.kron(ref["input_factor"], ref["output_factor"]),
            atol=1e-12,
        )
        # EKFAC: K-FAC's eigenbasis, the exact Fisher's diagonal in it.
        input_basis, output_basis, scalings = reference.ekfac_reference(
            ref["input_factor"], ref["output_factor"], ref["fisher"]
        )
        basis = np.kron(input_basis, output_basis)
        chex.assert_trees_all_close(
            oek.ekfac_block(block_state),
            basis @ np.diag(scalings.reshape(-1)) @ basis.T,
            atol=1e-12,
        )


def test_ekfac_is_closer_than_kfac_on_a_nonlinear_network(nonlinear):
    # A theorem for the Fisher the statistics hold (empirical, or the sampled
    # Fisher of the same labels): K-FAC's A ⊗ B and EKFAC are both diagonal in
    # U_A ⊗ U_B, and EKFAC's diagonal is the exact Fisher's there, the closest
    # one in Frobenius norm. Against the expected Fisher over labels it is not:
    # EKFAC fits the sampled one, and only approaches the expected one as the
    # samples grow.
    distances = oek.frobenius_distances(
        nonlinear["layers"], nonlinear["stats"], nonlinear["state"]
    )
    ekfac_state = nonlinear["state"][0]
    for block in nonlinear["layers"].blocks:
        fisher = nonlinear["references"][block.name]["fisher"]
        block_state = ekfac_state.blocks[block.name]
        kfac_error = np.linalg.norm(oek.kfac_block(block_state) - fisher)
        ekfac_error = np.linalg.norm(oek.ekfac_block(block_state) - fisher)
        chex.assert_trees_all_close(
            distances[block.name],
            oek.BlockDistances(
                fisher_norm=np.linalg.norm(fisher),
                kfac=kfac_error,
                ekfac=ekfac_error,
                kfac_to_ekfac=np.linalg.norm(
                    oek.kfac_block(block_state) - oek.ekfac_block(block_state)
                ),
            ),
            rtol=1e-9,
        )
        assert ekfac_error < 0.99 * kfac_error, (block.name, ekfac_error, kfac_error)


@pytest.mark.parametrize("fisher_type", ["empirical", "mc"])
def test_one_example_on_a_deep_linear_network_makes_ekfac_exact(fisher_type):
    # One example, one position: every block's Fisher is (a aᵀ) ⊗ mean_s d_s d_sᵀ
    # over the labels used, exactly Kronecker, so EKFAC must reproduce it.
    model = reference.MLP(features=(4, 4, 3), use_bias=(False,) * 3, linear=True)
    x = jax.random.normal(jax.random.key(6), (1, 3), jnp.float64)
    y = jax.random.normal(jax.random.key(7), (1, 3), jnp.float64)
    params, perturbations = init(model, x)
    loss = oek.squared_error

    def loss_fn(params, x, y):
        return loss(model.apply({"params": params}, x), y)

    num_samples = 2000 if fisher_type == "mc" else 1
    curvature = oek.Curvature(loss_fn, fisher_type=fisher_type, num_samples=num_samples)
    _, stats, state = _capture_and_update(curvature, params, (x, y), jax.random.key(8))
    ekfac_state = state[0]
    labels_x, labels = x, y
    if fisher_type == "mc":
        labels_x, labels = _sampled_labels(loss, model, params, x, stats, num_samples)

    for layer in range(3):
        name = f"dense_{layer}"
        ekfac = oek.ekfac_block(ekfac_state.blocks[name])
        fisher = _brute_force_fisher(
            model, params, perturbations, loss, labels_x, labels, layer
        )
        chex.assert_trees_all_close(ekfac, fisher, atol=1e-10)
        if fisher_type == "mc":
            # In a deep linear network with unit-variance Gaussian outputs the
            # true Fisher block is (a aᵀ) ⊗ M Mᵀ, M = W_{l+1} … W_L: d = M ε.
            # EKFAC's is (a aᵀ) ⊗ M (mean_s ε_s ε_sᵀ) Mᵀ, whose squared error
            # has mean |a|⁴ (tr(C)² + |C|²) / S, C = M Mᵀ (Isserlis); allow
            # five times its root.
            (call,) = stats.layers[name]
            a = call.inputs[0]
            downstream = jnp.eye(model.features[layer])
            for later in range(layer + 1, 3):
                downstream = downstream @ params[f"dense_{later}"]["kernel"]
            covariance = downstream @ downstream.T
            true_fisher = np.kron(np.outer(a, a), covariance)
            rms_error = jnp.sum(a**2) * jnp.sqrt(
                (jnp.trace(covariance) ** 2 + jnp.sum(covariance**2)) / num_samples
            )
            assert np.linalg.norm(ekfac - true_fisher) < 5 * rms_error
            assert 5 * rms_error < 0.3 * np.linalg.norm(true_fisher)


def test_frobenius_distances_needs_an_ekfac_state():
    with pytest.raises(ValueError, match="exactly one ScaleByEkfacState"):
        oek.frobenius_distances(
            oek.Layers(blocks=(), fallback=()), None, optax.sgd(0.1).init({})
        )
