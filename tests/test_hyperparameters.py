"""`ekfac` and `ekfac_sgd` as optax optimizers: one name each, arguments that
belong to the other refused, `optax.inject_hyperparams` without
`static_args`, and decoupled weight decay.

The model is float32, as users run it (the suite enables x64 elsewhere).
"""

import functools
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import optax_ekfac as oek


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(nn.tanh(nn.Dense(8)(x)))


def _batch(seed, num_examples=32):
    key_x, key_y = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (num_examples, 5), jnp.float32)
    y = jax.random.randint(key_y, (num_examples,), 0, 3)
    return x, y


@pytest.fixture(scope="module")
def problem():
    model = _Mlp()
    x, y = _batch(0)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    layers = curvature.layers(params, x, y)
    value_grad_and_stats = jax.jit(curvature.value_grad_and_stats)
    return dict(params=params, layers=layers, vgs=value_grad_and_stats)


def _runner(problem, tx):
    """A jitted step of `tx` from `problem`'s parameters."""

    @jax.jit
    def step(params, state, x, y):
        loss, grads, stats = problem["vgs"](params, x, y)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, updates, loss

    return step


def _first_update(problem, tx, params=None):
    params = problem["params"] if params is None else params
    _, grads, stats = problem["vgs"](params, *_batch(1))
    return tx.update(grads, tx.init(params), params, stats=stats)


# --- one name, one optimizer --------------------------------------------------


def test_ekfac_with_a_learning_rate_warns_and_forwards_to_ekfac_sgd(problem):
    layers = problem["layers"]
    with pytest.warns(DeprecationWarning, match="ekfac_sgd"):
        old = oek.ekfac(layers, learning_rate=0.1, momentum=0.9, damping=1e-2)
    # As before the split: no norm_constraint.
    new = oek.ekfac_sgd(layers, 0.1, 0.9, damping=1e-2, norm_constraint=None)
    params = problem["params"]
    old_state, new_state = old.init(params), new.init(params)
    for seed in (1, 2):
        _, grads, stats = problem["vgs"](params, *_batch(seed))
        old_updates, old_state = old.update(grads, old_state, params, stats=stats)
        new_updates, new_state = new.update(grads, new_state, params, stats=stats)
        chex.assert_trees_all_equal(old_updates, new_updates)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        oek.ekfac(layers)
        oek.ekfac_sgd(layers, 0.1)


def test_the_deprecated_learning_rate_works_under_inject_hyperparams(problem):
    params = problem["params"]
    with pytest.warns(DeprecationWarning, match="ekfac_sgd"):
        tx = optax.inject_hyperparams(oek.ekfac)(problem["layers"], learning_rate=0.1)
        state = tx.init(params)
    with pytest.warns(DeprecationWarning, match="ekfac_sgd"):
        _, state, updates, _ = _runner(problem, tx)(params, state, *_batch(1))
    chex.assert_tree_all_finite(updates)


@pytest.mark.parametrize(
    "name, value",
    [
        ("initial_damping", 1e-2),
        ("min_damping", 1e-3),
        ("max_damping", 10.0),
        ("damping_decay", 0.5),
        ("damping_adaptation_interval", 5),
        ("max_momentum", 0.9),
    ],
)
def test_step_control_settings_with_a_learning_rate_are_refused(problem, name, value):
    with pytest.raises(TypeError, match=f"ekfac: {name}=.*adaptive.*ekfac_sgd"):
        oek.ekfac(problem["layers"], learning_rate=0.1, **{name: value})
    # ekfac_sgd has no such argument.
    with pytest.raises(TypeError, match=name):
        oek.ekfac_sgd(problem["layers"], 0.1, **{name: value})


def test_nesterov_is_refused_where_it_means_nothing(problem):
    with pytest.raises(TypeError, match="ekfac: nesterov.*ekfac_sgd"):
        oek.ekfac(problem["layers"], nesterov=True)
    with pytest.raises(ValueError, match="ekfac_sgd: nesterov=True needs a momentum"):
        oek.ekfac_sgd(problem["layers"], 0.1, nesterov=True)
    oek.ekfac_sgd(problem["layers"], 0.1, 0.9, nesterov=True)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(learning_rate=-0.1), "ekfac_sgd: learning_rate must be a number > 0"),
        (dict(learning_rate=0.1, momentum=1.0), "ekfac_sgd: momentum must be"),
        (dict(learning_rate=0.1, damping=0.0), "ekfac_sgd: damping must be > 0"),
        (dict(learning_rate=0.1, weight_decay=-1e-4), "ekfac_sgd: weight_decay"),
        (dict(learning_rate=0.1, norm_constraint=0.0), "ekfac_sgd: norm_constraint"),
        (dict(learning_rate=0.1, decay=1.0), "scale_by_ekfac: decay"),
    ],
)
def test_ekfac_sgd_refuses_bad_values_naming_them(problem, settings, message):
    with pytest.raises(ValueError, match=message):
        oek.ekfac_sgd(problem["layers"], **settings)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(weight_decay=-1e-4), "ekfac: weight_decay must be >= 0"),
        (dict(damping_adaptation_interval=0), "damping_adaptation_interval"),
        (dict(damping_adaptation_interval=jnp.asarray(0)), "adaptation_interval"),
        (dict(damping_adaptation_interval=1.5), "damping_adaptation_interval"),
        (dict(min_damping=jnp.asarray(1.0)), "initial_damping must lie in"),
    ],
)
def test_ekfac_refuses_bad_values_naming_them(problem, settings, message):
    with pytest.raises(ValueError, match=message):
        oek.ekfac(problem["layers"], **settings)


# --- optax.inject_hyperparams -------------------------------------------------


def test_adaptive_ekfac_under_inject_hyperparams_without_static_args(problem):
    layers, params = problem["layers"], problem["params"]
    # A first damping at which the first steps are taken (and momentum used).
    injected = optax.inject_hyperparams(oek.ekfac)(layers, initial_damping=1.0)
    state = injected.init(params)
    for name in ("min_damping", "max_momentum", "damping_adaptation_interval"):
        assert name in state.hyperparams
    interval = state.hyperparams["damping_adaptation_interval"]
    assert jnp.issubdtype(interval.dtype, jnp.integer)
    plain = oek.ekfac(layers, initial_damping=1.0)
    plain_state = plain.init(params)
    step, plain_step = _runner(problem, injected), _runner(problem, plain)
    injected_params = plain_params = params
    momenta = []
    for seed in range(1, 5):
        batch = _batch(seed)
        injected_params, state, updates, _ = step(injected_params, state, *batch)
        plain_params, plain_state, plain_updates, _ = plain_step(
            plain_params, plain_state, *batch
        )
        # float32: the injected values are float32 arrays, the plain ones
        # Python floats.
        chex.assert_trees_all_close(updates, plain_updates, rtol=1e-4, atol=1e-5)
        momenta.append(float(state.inner_state.momentum))
    assert max(momenta) > 0

    # A value changed between steps takes effect at the next one.
    changed = dict(
        state.hyperparams, max_momentum=jnp.asarray(0.0), min_damping=jnp.asarray(5.0)
    )
    _, changed_state, _, _ = step(
        injected_params, state._replace(hyperparams=changed), *_batch(5)
    )
    assert float(changed_state.inner_state.momentum) == 0
    assert float(changed_state.inner_state.damping) >= 5.0
    _, kept_state, _, _ = step(injected_params, state, *_batch(5))
    assert float(kept_state.inner_state.damping) < 5.0


def test_a_fixed_momentum_and_damping_can_be_injected(problem):
    layers, params = problem["layers"], problem["params"]
    injected = optax.inject_hyperparams(oek.ekfac)(layers, momentum=0.5, damping=0.1)
    state = injected.init(params)
    step = _runner(problem, injected)
    _, state, _, _ = step(params, state, *_batch(1))
    _, state, _, _ = step(params, state, *_batch(2))
    np.testing.assert_allclose(state.inner_state.damping, 0.1)
    state.hyperparams["damping"] = jnp.asarray(0.2, jnp.float32)
    _, state, _, _ = step(params, state, *_batch(3))
    np.testing.assert_allclose(state.inner_state.damping, 0.2)


def test_ekfac_sgd_under_inject_hyperparams(problem):
    layers, params = problem["layers"], problem["params"]
    injected = optax.inject_hyperparams(oek.ekfac_sgd)(
        layers, learning_rate=0.1, momentum=0.9, norm_constraint=None
    )
    state = injected.init(params)
    step = _runner(problem, injected)
    plain = oek.ekfac_sgd(layers, 0.1, 0.9, norm_constraint=None)
    _, _, expected, _ = _runner(problem, plain)(params, plain.init(params), *_batch(1))
    _, _, updates, _ = step(params, state, *_batch(1))
    chex.assert_trees_all_close(updates, expected, rtol=1e-4, atol=1e-5)
    # The learning rate changed between steps: the update scales with it.
    halved = dict(state.hyperparams, learning_rate=jnp.asarray(0.05, jnp.float32))
    _, _, half, _ = step(params, state._replace(hyperparams=halved), *_batch(1))
    chex.assert_trees_all_close(half, jax.tree.map(lambda u: u / 2, updates), rtol=1e-6)


# --- weight decay -------------------------------------------------------------


def test_ekfac_sgd_weight_decay_is_adamws(problem):
    """`update = -η (d + weight_decay θ)`: the difference from no decay is
    `-η weight_decay θ`, which shrinks every weight; the mask leaves the
    biases alone."""
    layers, params = problem["layers"], problem["params"]
    rate, weight_decay = 0.1, 0.1
    plain, _ = _first_update(problem, oek.ekfac_sgd(layers, rate))
    decayed, _ = _first_update(
        problem, oek.ekfac_sgd(layers, rate, weight_decay=weight_decay)
    )
    difference = jax.tree.map(jnp.subtract, decayed, plain)
    expected = jax.tree.map(lambda p: -rate * weight_decay * p, params)
    chex.assert_trees_all_close(difference, expected, rtol=1e-5, atol=1e-7)
    for d, p in zip(jax.tree.leaves(difference), jax.tree.leaves(params)):
        assert np.all(np.asarray(d * p) <= 0)  # toward zero

    def not_bias(tree):
        return jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key != "bias", tree
        )

    masked, _ = _first_update(
        problem, oek.ekfac_sgd(layers, rate, weight_decay=weight_decay, mask=not_bias)
    )
    for layer in params:
        chex.assert_trees_all_equal(masked[layer]["bias"], plain[layer]["bias"])
        chex.assert_trees_all_close(
            masked[layer]["kernel"], decayed[layer]["kernel"], rtol=1e-6
        )


def test_adaptive_weight_decay_is_at_the_steps_own_rate(problem):
    """`update = α Δ + β δ - α weight_decay θ`, `α` the adapted step size;
    a step not taken decays nothing."""
    layers, params = problem["layers"], problem["params"]
    weight_decay = 0.1
    # A damping at which this first step is taken.
    plain, plain_state = _first_update(problem, oek.ekfac(layers, initial_damping=1.0))
    decayed, state = _first_update(
        problem, oek.ekfac(layers, initial_damping=1.0, weight_decay=weight_decay)
    )
    assert int(state.rejected_steps) == 0
    alpha = float(state.learning_rate)
    assert alpha > 0
    chex.assert_trees_all_equal(state.velocity, plain_state.velocity)
    difference = jax.tree.map(jnp.subtract, decayed, plain)
    expected = jax.tree.map(lambda p: -alpha * weight_decay * p, params)
    chex.assert_trees_all_close(difference, expected, rtol=1e-4, atol=1e-7)
    for d, p in zip(jax.tree.leaves(difference), jax.tree.leaves(params)):
        assert np.all(np.asarray(d * p) <= 0)  # toward zero

    # At the default initial damping this first step is rejected: no move.
    rejected, state = _first_update(problem, oek.ekfac(layers, weight_decay=0.1))
    assert int(state.rejected_steps) == 1
    chex.assert_trees_all_equal(rejected, optax.tree.zeros_like(params))


@pytest.mark.parametrize("optimizer", ["ekfac", "ekfac_sgd"])
def test_zero_weight_decay_changes_nothing(problem, optimizer):
    layers = problem["layers"]
    make = (
        oek.ekfac
        if optimizer == "ekfac"
        else functools.partial(oek.ekfac_sgd, learning_rate=0.1)
    )
    default, _ = _first_update(problem, make(layers))
    zero, _ = _first_update(problem, make(layers, weight_decay=0.0))
    chex.assert_trees_all_equal(zero, default)
    # Injected (a traced 0): the same numbers.
    injected, _ = _first_update(
        problem, optax.inject_hyperparams(make)(layers, weight_decay=0.0)
    )
    chex.assert_trees_all_close(injected, default, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    "optimizer", [oek.ekfac, lambda layers, **k: oek.ekfac_sgd(layers, 0.1, **k)]
)
def test_weight_decay_without_params_is_refused(problem, optimizer):
    tx = optimizer(problem["layers"], weight_decay=1e-4)
    params = problem["params"]
    _, grads, stats = problem["vgs"](params, *_batch(1))
    with pytest.raises(ValueError, match="weight_decay needs the parameters"):
        tx.update(grads, tx.init(params), stats=stats)
