"""scale_by_ekfac against a dense float64 reference built from per-example grads."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import optax_ekfac as oek

USE_BIAS = (True, False)


def _batch(num_examples, seed):
    key_x, key_y = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (num_examples, 5), jnp.float64)
    y = jax.random.randint(key_y, (num_examples,), 0, 3)
    return x, y


@pytest.fixture(scope="module")
def setup():
    model = reference.MLP(features=(6, 3), use_bias=USE_BIAS)
    x, y = _batch(16, seed=0)
    params, perturbations = reference.init(model, x)

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    value_grad_and_stats = jax.jit(curvature.value_grad_and_stats)

    def references(x, y):
        """Per layer: A, B, exact empirical Fisher, mean gradient, all dense."""
        inputs, output_grads, param_grads = reference.per_example(
            model, params, perturbations, oek.softmax_cross_entropy, x, y
        )
        per_layer = {}
        for layer, use_bias in enumerate(USE_BIAS):
            rows = reference.with_ones(inputs[layer]) if use_bias else inputs[layer]
            block_grads = reference.block_gradients(param_grads, layer, use_bias)
            per_layer[f"dense_{layer}"] = dict(
                input_factor=rows.T @ rows / len(rows),
                output_factor=output_grads[layer].T @ output_grads[layer] / len(rows),
                fisher=reference.dense_fisher(block_grads),
                gradient=block_grads.mean(0),
            )
        return per_layer

    return dict(
        model=model,
        params=params,
        batch=(x, y),
        layers=layers,
        value_grad_and_stats=value_grad_and_stats,
        references=references,
    )


def _update(setup, tx, batch=None, state=None):
    batch = setup["batch"] if batch is None else batch
    _, grads, stats = setup["value_grad_and_stats"](setup["params"], *batch)
    state = tx.init(setup["params"]) if state is None else state
    return tx.update(grads, state, setup["params"], stats=stats)


def _block_update(updates, name):
    leaves = updates[name]
    if "bias" in leaves:
        return jnp.concatenate([leaves["kernel"], leaves["bias"][None]], 0)
    return leaves["kernel"]


@pytest.mark.parametrize("eigenvalue_correction", [True, False])
def test_one_update_equals_the_dense_reference(setup, eigenvalue_correction):
    damping = 1e-2
    tx = oek.scale_by_ekfac(
        setup["layers"], damping=damping, eigenvalue_correction=eigenvalue_correction
    )
    updates, state = _update(setup, tx)

    for name, ref in setup["references"](*setup["batch"]).items():
        block = state.blocks[name]
        chex.assert_trees_all_close(block.input_factor, ref["input_factor"], rtol=1e-10)
        chex.assert_trees_all_close(
            block.output_factor, ref["output_factor"], rtol=1e-10, atol=1e-14
        )
        input_basis, output_basis, scalings = reference.ekfac_reference(
            ref["input_factor"], ref["output_factor"], ref["fisher"]
        )
        reference.assert_same_basis(block.input_eigenbasis, input_basis)
        reference.assert_same_basis(block.output_eigenbasis, output_basis)
        if eigenvalue_correction:
            curvature = reference.dense_block(block)
            chex.assert_trees_all_close(block.scalings, scalings, atol=1e-12)
        else:
            curvature = np.kron(ref["input_factor"], ref["output_factor"])
            chex.assert_trees_all_close(
                reference.dense_block(block), curvature, atol=1e-12
            )
        direction = np.linalg.solve(
            curvature + damping * np.eye(len(curvature)), ref["gradient"].reshape(-1)
        )
        chex.assert_trees_all_close(
            _block_update(updates, name).reshape(-1), direction, rtol=1e-8
        )


def test_ekfac_is_closer_than_kfac_to_the_exact_fisher(setup):
    ekfac_state = _update(setup, oek.scale_by_ekfac(setup["layers"]))[1]
    kfac_state = _update(
        setup, oek.scale_by_ekfac(setup["layers"], eigenvalue_correction=False)
    )[1]
    for name, ref in setup["references"](*setup["batch"]).items():
        ekfac_error = np.linalg.norm(
            reference.dense_block(ekfac_state.blocks[name]) - ref["fisher"]
        )
        kfac_error = np.linalg.norm(
            reference.dense_block(kfac_state.blocks[name]) - ref["fisher"]
        )
        # EKFAC's scalings are the Frobenius-optimal diagonal in KFAC's basis.
        assert ekfac_error < kfac_error, (name, ekfac_error, kfac_error)


def test_one_example_makes_every_block_exact(setup):
    # With one example the Fisher of a block is (a aᵀ) ⊗ (d dᵀ) exactly.
    batch = _batch(1, seed=1)
    state = _update(setup, oek.scale_by_ekfac(setup["layers"]), batch=batch)[1]
    for name, ref in setup["references"](*batch).items():
        chex.assert_trees_all_close(
            reference.dense_block(state.blocks[name]), ref["fisher"], atol=1e-12
        )


def test_running_averages_are_bias_corrected(setup):
    decay = 0.9
    tx = oek.scale_by_ekfac(setup["layers"], decay=decay, eigen_update_every=100)
    first, second = _batch(16, seed=2), _batch(16, seed=3)
    state = _update(setup, tx, batch=first)[1]
    basis_after_first = state.blocks
    state = _update(setup, tx, batch=second, state=state)[1]

    refs = [setup["references"](*batch) for batch in (first, second)]
    for name in refs[0]:
        block = state.blocks[name]
        expected_factor = (
            decay * (1 - decay) * refs[0][name]["input_factor"]
            + (1 - decay) * refs[1][name]["input_factor"]
        ) / (1 - decay**2)
        chex.assert_trees_all_close(block.input_factor, expected_factor, rtol=1e-10)
        # Scalings average in the fixed basis from the first update.
        basis = np.kron(
            basis_after_first[name].input_eigenbasis,
            basis_after_first[name].output_eigenbasis,
        )
        batch_scalings = [np.diag(basis.T @ r[name]["fisher"] @ basis) for r in refs]
        expected_scalings = (
            decay * (1 - decay) * batch_scalings[0] + (1 - decay) * batch_scalings[1]
        ) / (1 - decay**2)
        chex.assert_trees_all_close(
            block.scalings.reshape(-1), expected_scalings, atol=1e-12
        )


def test_eigenbases_change_at_the_first_and_every_kth_update(setup):
    tx = oek.scale_by_ekfac(setup["layers"], eigen_update_every=3)
    state = tx.init(setup["params"])
    changed = []
    for step in range(7):
        previous = state
        _, state = _update(setup, tx, batch=_batch(8, seed=10 + step), state=state)
        block, before = state.blocks["dense_0"], previous.blocks["dense_0"]
        changed.append(
            (
                not np.array_equal(block.input_eigenbasis, before.input_eigenbasis),
                not np.array_equal(block.scalings, before.scalings),
            )
        )
    assert [basis for basis, _ in changed] == [
        True,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    assert all(scalings for _, scalings in changed)


def test_statistics_refresh_every_kth_update(setup):
    tx = oek.scale_by_ekfac(setup["layers"], eigen_update_every=4, stats_update_every=2)
    state = tx.init(setup["params"])
    refreshed, rebased = [], []
    for step in range(6):
        previous = state.blocks["dense_1"]
        _, state = _update(setup, tx, batch=_batch(8, seed=20 + step), state=state)
        block = state.blocks["dense_1"]
        refreshed.append(
            not np.array_equal(block.output_factor, previous.output_factor)
        )
        rebased.append(
            not np.array_equal(block.output_eigenbasis, previous.output_eigenbasis)
        )
        if not refreshed[-1]:
            chex.assert_trees_all_equal(block.scalings, previous.scalings)
    assert refreshed == [True, False, True, False, True, False]
    assert rebased == [True, False, False, False, True, False]
    assert int(state.count) == 6 and int(state.stats_count) == 3


class _WithNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = nn.LayerNorm(name="norm", param_dtype=jnp.float64)(
            nn.Dense(4, name="hidden", param_dtype=jnp.float64)(x)
        )
        return nn.Dense(3, name="head", param_dtype=jnp.float64)(hidden)


def test_unowned_parameters_get_the_diagonal_fallback():
    model = _WithNorm()
    x, y = _batch(8, seed=4)
    params = model.init(jax.random.key(0), x)["params"]
    curvature = oek.Curvature(
        lambda p, x, y: oek.softmax_cross_entropy(model.apply({"params": p}, x), y),
        fisher_type="empirical",
    )
    layers = curvature.layers(params, x, y)
    damping = 1e-3
    tx = oek.scale_by_ekfac(layers, damping=damping)
    _, grads, stats = curvature.value_grad_and_stats(params, x, y)
    updates, state = tx.update(grads, tx.init(params), params, stats=stats)
    for leaf in ("scale", "bias"):
        grad = grads["norm"][leaf]
        # After one update the second moment is N g² of that batch.
        chex.assert_trees_all_close(state.second_moments[f"norm/{leaf}"], 8 * grad**2)
        chex.assert_trees_all_close(
            updates["norm"][leaf], grad / (8 * grad**2 + damping), rtol=1e-12
        )


def test_init_accepts_shape_dtype_structs(setup):
    tx = oek.scale_by_ekfac(setup["layers"])
    abstract = jax.eval_shape(lambda: setup["params"])
    chex.assert_trees_all_equal(tx.init(abstract), tx.init(setup["params"]))


def test_damping_can_be_injected(setup):
    injected = optax.inject_hyperparams(oek.scale_by_ekfac)(
        layers=setup["layers"], damping=1e-3
    )
    state = injected.init(setup["params"])
    state.hyperparams["damping"] = jnp.asarray(0.5)
    updates, _ = _update(setup, injected, state=state)
    expected, _ = _update(setup, oek.scale_by_ekfac(setup["layers"], damping=0.5))
    chex.assert_trees_all_close(updates, expected, rtol=1e-10)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_updates_keep_the_gradients_dtype(dtype):
    model = nn.Dense(3, param_dtype=dtype, dtype=dtype)
    x = jnp.ones((4, 5), dtype)
    y = jnp.array([0, 1, 2, 0])
    params = model.init(jax.random.key(0), x)["params"]
    curvature = oek.Curvature(
        lambda p, x, y: oek.softmax_cross_entropy(model.apply({"params": p}, x), y),
        fisher_type="empirical",
    )
    tx = oek.ekfac_sgd(curvature.layers(params, x, y), learning_rate=0.1)
    _, grads, stats = curvature.value_grad_and_stats(params, x, y)
    updates, state = tx.update(grads, tx.init(params), params, stats=stats)
    chex.assert_trees_all_equal_dtypes(updates, params)
    assert state[0].blocks["(root)"].input_factor.dtype == jnp.float32
    assert all(
        jnp.isfinite(leaf.astype(jnp.float32)).all()
        for leaf in jax.tree.leaves(updates)
    )


def test_ekfac_sgd_unbounded_is_scale_by_ekfac_then_sgd(setup):
    settings = dict(damping=1e-2, eigen_update_every=5)
    alias = oek.ekfac_sgd(setup["layers"], 0.3, norm_constraint=None, **settings)
    chained = optax.chain(
        oek.scale_by_ekfac(setup["layers"], **settings), optax.sgd(0.3)
    )
    chex.assert_trees_all_close(_update(setup, alias)[0], _update(setup, chained)[0])
    direction, _ = _update(setup, oek.scale_by_ekfac(setup["layers"], **settings))
    chex.assert_trees_all_close(
        _update(setup, alias)[0], jax.tree.map(lambda d: -0.3 * d, direction)
    )


def test_ekfac_sgd_bounds_the_steps_curvature_norm(setup):
    """`d · min(1, √(c / (η² gᵀd)))`: the step `η d` scaled down (all leaves
    by one factor) until `η² gᵀd = c`, or left as it is below that."""
    rate, settings = 0.3, dict(damping=1e-2, eigen_update_every=5)
    direction, _ = _update(setup, oek.scale_by_ekfac(setup["layers"], **settings))
    _, grads, _ = setup["value_grad_and_stats"](setup["params"], *setup["batch"])
    squared_norm = rate**2 * float(optax.tree.vdot(grads, direction))
    # One constraint that bounds this step, one that does not.
    assert 1e-3 < squared_norm < 1.0
    for norm_constraint in (1e-3, 1.0):
        tx = oek.ekfac_sgd(
            setup["layers"], rate, norm_constraint=norm_constraint, **settings
        )
        coefficient = min(1.0, np.sqrt(norm_constraint / squared_norm))
        chex.assert_trees_all_close(
            _update(setup, tx)[0],
            jax.tree.map(lambda d, c=coefficient: -rate * c * d, direction),
            rtol=1e-10,
        )


def test_missing_or_foreign_stats_are_refused(setup):
    tx = oek.scale_by_ekfac(setup["layers"])
    state = tx.init(setup["params"])
    _, grads, stats = setup["value_grad_and_stats"](setup["params"], *setup["batch"])
    with pytest.raises(ValueError, match="stats="):
        tx.update(grads, state, setup["params"])
    missing = stats._replace(layers={"dense_0": stats.layers["dense_0"]})
    with pytest.raises(ValueError, match=r"missing stats for \['dense_1'\]"):
        tx.update(grads, state, setup["params"], stats=missing)
    # Stats captured from a wider model under the same layer names.
    wide = reference.MLP(features=(7, 3), use_bias=USE_BIAS)
    wide_params, _ = reference.init(wide, setup["batch"][0])
    wide_stats = oek.Curvature(
        lambda p, x, y: oek.softmax_cross_entropy(wide.apply({"params": p}, x), y),
        fisher_type="empirical",
    ).value_grad_and_stats(wide_params, *setup["batch"])[2]
    with pytest.raises(ValueError, match="stats for dense_0 have inputs"):
        tx.update(grads, state, setup["params"], stats=wide_stats)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(damping=-1.0), "damping"),
        (dict(decay=1.0), "decay"),
        (dict(eigen_update_every=0), "eigen_update_every"),
        (dict(stats_update_every=2, eigen_update_every=3), "multiple"),
    ],
)
def test_bad_hyperparameters_are_refused(setup, settings, message):
    with pytest.raises(ValueError, match=message):
        oek.scale_by_ekfac(setup["layers"], **settings)


def test_decay_is_per_update_when_statistics_are_amortized(setup):
    # Refreshes two updates apart decay by decay**2: the averaging window is
    # counted in updates, whatever stats_update_every is.
    decay, every = 0.9, 2
    tx = oek.scale_by_ekfac(
        setup["layers"], decay=decay, stats_update_every=every, eigen_update_every=100
    )
    batches = [_batch(16, seed=30 + step) for step in range(3)]
    state = tx.init(setup["params"])
    for batch in batches:
        state = _update(setup, tx, batch=batch, state=state)[1]
    refresh_decay = decay**every
    first, third = (setup["references"](*batches[i]) for i in (0, 2))
    for name in first:
        expected = (
            refresh_decay * (1 - refresh_decay) * first[name]["input_factor"]
            + (1 - refresh_decay) * third[name]["input_factor"]
        ) / (1 - refresh_decay**2)
        chex.assert_trees_all_close(
            state.blocks[name].input_factor, expected, rtol=1e-10
        )


def test_ekfac_sgd_under_inject_hyperparams(setup):
    """`optax.inject_hyperparams(oek.ekfac_sgd)` works as for `optax.adamw`: the
    injected learning rate and damping are in the state, and changing them
    changes the update."""
    # No norm constraint, so that the update is proportional to the rate.
    tx = optax.inject_hyperparams(oek.ekfac_sgd)(
        setup["layers"], learning_rate=0.1, damping=1e-3, norm_constraint=None
    )
    params = setup["params"]
    state = tx.init(params)
    assert {"learning_rate", "damping"} <= set(state.hyperparams)
    np.testing.assert_allclose(state.hyperparams["learning_rate"], 0.1)
    np.testing.assert_allclose(state.hyperparams["damping"], 1e-3)

    @jax.jit
    def step(params, state, batch):
        _, grads, stats = setup["value_grad_and_stats"](params, *batch)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, updates

    losses = []
    for seed in range(4):
        batch = _batch(16, seed)
        loss = jnp.mean(
            oek.softmax_cross_entropy(
                setup["model"].apply({"params": params}, batch[0]), batch[1]
            )
        )
        losses.append(float(loss))
        params, state, _ = step(params, state, batch)
    assert np.all(np.isfinite(losses))
    assert int(state.inner_state[0].count) == 4

    # The same step with other injected values gives another update.
    _, _, updates = step(params, state, setup["batch"])
    changed = {
        "learning_rate": state.hyperparams["learning_rate"] * 0.5,
        "damping": state.hyperparams["damping"] * 100,
    }
    for name, value in changed.items():
        hyperparams = dict(state.hyperparams, **{name: value})
        _, _, other = step(
            params, state._replace(hyperparams=hyperparams), setup["batch"]
        )
        differences = jax.tree.map(lambda a, b: jnp.abs(a - b).max(), updates, other)
        assert max(jax.tree.leaves(differences)) > 1e-6, name
    # Halving the learning rate halves the update.
    hyperparams = dict(state.hyperparams, learning_rate=changed["learning_rate"])
    _, _, halved = step(params, state._replace(hyperparams=hyperparams), setup["batch"])
    chex.assert_trees_all_close(halved, jax.tree.map(lambda u: u / 2, updates))
