"""Reliability: non-finite steps, ill-conditioned curvature, damping extremes,
misuse caught early with a message naming what is wrong, and property-based
checks of the state over widths, batch sizes, dtypes and damping."""

import functools
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import optax_ekfac as oek


class _Net(nn.Module):
    """Two blocks (`hidden`, `head`) and a LayerNorm on the diagonal fallback."""

    hidden: int = 4
    dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, name="hidden", param_dtype=self.dtype)(x)
        h = nn.LayerNorm(name="norm", param_dtype=self.dtype)(jnp.tanh(h))
        return nn.Dense(3, name="head", param_dtype=self.dtype)(h)


def _batch(seed, num_examples=8, width=5, dtype=jnp.float64):
    key_x, key_y = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, (num_examples, width), dtype)
    return x, jax.random.randint(key_y, (num_examples,), 0, 3)


def _curvature(model):
    return oek.Curvature(
        lambda p, x, y: oek.softmax_cross_entropy(model.apply({"params": p}, x), y),
        fisher_type="empirical",
    )


@pytest.fixture(scope="module")
def problem():
    model = _Net()
    x, y = _batch(0)
    params = model.init(jax.random.key(0), x)["params"]
    curvature = _curvature(model)
    layers = curvature.layers(params, x, y)

    @jax.jit
    def first_update(grads, stats, damping):
        # Damping as an argument: one compilation serves every value.
        tx = oek.scale_by_ekfac(layers, damping=damping)
        return tx.update(grads, tx.init(params), stats=stats)

    return dict(
        model=model,
        params=params,
        curvature=curvature,
        layers=layers,
        value_grad_and_stats=jax.jit(curvature.value_grad_and_stats),
        first_update=first_update,
    )


def _grads_and_stats(problem, seed, num_examples=8):
    _, grads, stats = problem["value_grad_and_stats"](
        problem["params"], *_batch(seed, num_examples)
    )
    return grads, stats


# --- non-finite steps ----------------------------------------------------------


def _poisoned(grads, stats, where):
    """The gradients and statistics with one NaN or infinity at `where`."""
    if where == "block gradient":
        grads = {**grads, "head": {**grads["head"]}}
        grads["head"]["kernel"] = grads["head"]["kernel"].at[0, 1].set(jnp.nan)
    elif where == "fallback gradient":
        grads = {**grads, "norm": {**grads["norm"]}}
        grads["norm"]["scale"] = grads["norm"]["scale"].at[2].set(jnp.inf)
    else:
        (call,) = stats.layers["hidden"]
        if where == "layer inputs":
            call = call._replace(inputs=call.inputs.at[3, 0].set(jnp.nan))
        else:
            call = call._replace(output_grads=call.output_grads.at[1, 2].set(-jnp.inf))
        stats = stats._replace(layers={**stats.layers, "hidden": (call,)})
    return grads, stats


WHERE = ["block gradient", "fallback gradient", "layer inputs", "output gradients"]


@pytest.fixture(scope="module")
def skipping(problem):
    """One transformation and its jitted update, which counts its traces."""
    tx = oek.scale_by_ekfac(problem["layers"], eigen_update_every=2, decay=0.9)
    traces = []

    @jax.jit
    def update(grads, state, stats):
        traces.append(1)
        return tx.update(grads, state, stats=stats)

    return dict(init=lambda: tx.init(problem["params"]), update=update, traces=traces)


@pytest.mark.parametrize("where", WHERE)
def test_a_non_finite_step_changes_nothing_but_the_skip_count(problem, skipping, where):
    update = skipping["update"]
    grads, stats = _grads_and_stats(problem, seed=1)
    _, state = update(grads, skipping["init"](), stats)

    bad_grads, bad_stats = _poisoned(*_grads_and_stats(problem, seed=2), where)
    updates, skipped = update(bad_grads, state, bad_stats)

    # The gradients come back as they went in, NaN and all, for
    # optax.apply_if_finite or the caller to reject.
    chex.assert_trees_all_equal(updates, bad_grads)
    assert int(skipped.skipped_steps) == 1
    chex.assert_trees_all_equal(
        skipped._replace(skipped_steps=state.skipped_steps), state
    )


def test_skipped_steps_leave_the_schedule_where_it_was(problem, skipping):
    # Counts do not advance on a skipped step, so the eigen updates (every 2nd
    # update here) and the bias correction continue as if it never happened;
    # a NaN first step must not leave the identity basis in place either.
    good = [_grads_and_stats(problem, seed) for seed in range(10, 14)]
    bad = _poisoned(*_grads_and_stats(problem, seed=20), "output gradients")

    def run(steps):
        state, all_updates = skipping["init"](), []
        for grads, stats in steps:
            updates, state = skipping["update"](grads, state, stats)
            all_updates.append(updates)
        return all_updates, state

    clean_updates, clean_state = run(good)
    interrupted_updates, interrupted_state = run(
        [bad, good[0], bad, good[1], good[2], bad, good[3]]
    )
    assert len(skipping["traces"]) == 1  # one compiled step, finite or not
    assert int(interrupted_state.skipped_steps) == 3
    assert int(interrupted_state.count) == int(clean_state.count) == 4
    chex.assert_trees_all_equal(
        interrupted_state._replace(skipped_steps=clean_state.skipped_steps),
        clean_state,
    )
    kept = [interrupted_updates[i] for i in (1, 3, 4, 6)]
    chex.assert_trees_all_equal(kept, clean_updates)


def test_apply_if_finite_rejects_the_step_and_training_goes_on(problem):
    tx = optax.apply_if_finite(
        oek.ekfac(problem["layers"], learning_rate=0.1, momentum=0.9),
        max_consecutive_errors=5,
    )

    @jax.jit
    def step(params, opt_state, grads, stats):
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = problem["params"], tx.init(problem["params"])
    params, opt_state = step(params, opt_state, *_grads_and_stats(problem, 1))
    bad = _poisoned(*_grads_and_stats(problem, 2), "block gradient")
    rejected_params, rejected_state = step(params, opt_state, *bad)
    chex.assert_trees_all_equal(rejected_params, params)
    chex.assert_trees_all_equal(rejected_state.inner_state, opt_state.inner_state)
    assert int(rejected_state.total_notfinite) == 1
    params, _ = step(rejected_params, rejected_state, *_grads_and_stats(problem, 3))
    chex.assert_tree_all_finite(params)


def test_out_of_range_class_labels_are_refused_not_trained_on():
    """Class indices outside `[0, 10)` (10, or -1 that indexing would read
    as class 9): traced, their loss and gradients are NaN and the adaptive
    `ekfac` skips the step (float32, jitted); concrete, the helper raises
    naming `labels`. A padded term (weight 0) may carry any label."""
    model = nn.Sequential([nn.Dense(8), jnp.tanh, nn.Dense(10)])
    x = jax.random.normal(jax.random.key(1), (16, 5), jnp.float32)
    labels = jax.random.randint(jax.random.key(2), (16,), 0, 10)
    mask = jnp.ones(16, bool)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x, labels, mask):
        logits = model.apply({"params": params}, x)
        return oek.softmax_cross_entropy(logits, labels, weights=mask)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.ekfac(curvature.layers(params, x, labels, mask))

    @jax.jit
    def step(params, state, labels, mask):
        loss, grads, stats = curvature.value_grad_and_stats(params, x, labels, mask)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, loss, grads

    params, state, _, _ = step(params, tx.init(params), labels, mask)  # taken
    for bad in (jnp.full_like(labels, 10), labels.at[3].set(-1)):
        new_params, new_state, loss, grads = step(params, state, bad, mask)
        assert np.isnan(loss) and not np.isfinite(_distance(grads, grads))
        chex.assert_trees_all_equal(new_params, params)
        skipped = state.preconditioner.skipped_steps
        assert new_state.preconditioner.skipped_steps == skipped + 1
        chex.assert_trees_all_equal(
            new_state._replace(
                preconditioner=new_state.preconditioner._replace(skipped_steps=skipped)
            ),
            state,
        )
    padded, padding = labels.at[:4].set(-1), mask.at[:4].set(False)
    padded_params, _, padded_loss, _ = step(params, state, padded, padding)
    other_params, _, other_loss, _ = step(params, state, labels, padding)
    assert np.isfinite(padded_loss) and padded_loss == other_loss
    chex.assert_trees_all_equal(padded_params, other_params)
    assert _distance(padded_params, params) > 0

    logits = jnp.zeros((4, 10))
    with pytest.raises(
        ValueError, match=r"^softmax_cross_entropy: labels .*\[0, 10\).* -1 at \(2,\)"
    ):
        oek.softmax_cross_entropy(logits, jnp.array([0, 9, -1, 3]))
    with pytest.raises(ValueError, match=r"^softmax_cross_entropy: labels .* 10 at"):
        oek.softmax_cross_entropy(logits, np.array([10, 0, 1, 2]))
    losses = oek.softmax_cross_entropy(
        logits, jnp.array([0, 9, -1, 3]), weights=jnp.array([1, 1, 0, 1])
    )
    np.testing.assert_allclose(losses, np.log(10) * np.array([1, 1, 0, 1]), rtol=1e-6)


# --- ill-conditioned and rank-deficient curvature -------------------------------


class _DeadUnits(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.relu(nn.Dense(16, name="hidden")(x))
        return nn.Dense(4, name="head")(h)


STEPS = 1000


@pytest.mark.parametrize("eigenvalue_correction", [True, False])
def test_rank_deficient_float32_layers_train_1000_steps_without_nan(
    eigenvalue_correction,
):
    # A batch of 3 for a 12-wide input with constant and zero columns, and half
    # of the hidden units dead: every factor is rank-deficient, so round-off
    # gives eigh slightly negative eigenvalues (K-FAC's scalings multiply them).
    rng = np.random.default_rng(0)
    x = np.zeros((6, 12), np.float32)
    x[:, :3] = rng.normal(size=(6, 3))
    x[:, 3:6] = 1.0
    y = rng.integers(0, 4, 6).astype(np.int32)
    model = _DeadUnits()
    params = model.init(jax.random.key(0), jnp.asarray(x[:1]))["params"]
    dead = np.arange(16) % 2 == 0
    params["hidden"]["kernel"] = jnp.where(dead, 0.0, params["hidden"]["kernel"])
    params["hidden"]["bias"] = jnp.where(dead, -1.0, params["hidden"]["bias"])
    assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype("float32")}

    curvature = _curvature(model)
    layers = curvature.layers(params, x[:3], y[:3])
    damping, learning_rate = 1e-4, 1e-5
    tx = oek.ekfac(
        layers,
        learning_rate,
        damping=damping,
        eigen_update_every=1,
        eigenvalue_correction=eigenvalue_correction,
    )

    def step(carry, index):
        params, opt_state = carry
        start = (index % 2) * 3
        xs = jax.lax.dynamic_slice_in_dim(jnp.asarray(x), start, 3)
        ys = jax.lax.dynamic_slice_in_dim(jnp.asarray(y), start, 3)
        _, grads, stats = curvature.value_grad_and_stats(params, xs, ys)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        # ‖direction‖ ≤ ‖g‖ / λ: damping bounds the preconditioner.
        direction_norm = optax.tree.norm(updates) / learning_rate
        ratio = direction_norm * damping / optax.tree.norm(grads)
        return (optax.apply_updates(params, updates), opt_state), ratio

    run = jax.jit(lambda c: jax.lax.scan(step, c, jnp.arange(STEPS)))
    (params, opt_state), ratio = run((params, tx.init(params)))

    state = opt_state[0]
    assert bool(jnp.isfinite(ratio).all())
    assert int(state.count) == STEPS and int(state.skipped_steps) == 0
    chex.assert_tree_all_finite((params, state))
    assert float(ratio.max()) <= 1 + 1e-3
    for name, block in state.blocks.items():
        assert float(block.scalings.min()) >= 0, name
        for basis in (block.input_eigenbasis, block.output_eigenbasis):
            np.testing.assert_allclose(basis.T @ basis, np.eye(len(basis)), atol=1e-4)
    # The run did exercise rank deficiency: A has (near-)zero eigenvalues.
    eigenvalues = np.linalg.eigvalsh(np.float64(state.blocks["hidden"].input_factor))
    assert np.sum(eigenvalues < 1e-6 * eigenvalues.max()) >= 8


# --- damping extremes ------------------------------------------------------------


def _curvatures(state):
    """Every scaling and fallback second moment, flat."""
    blocks = [block.scalings for block in state.blocks.values()]
    leaves = jax.tree.leaves((blocks, state.second_moments))
    return np.concatenate([np.ravel(leaf) for leaf in leaves])


def _distance(tree, other):
    return float(optax.tree.norm(optax.tree.sub(tree, other)))


def test_huge_damping_is_gradient_descent_scaled_by_its_inverse(problem):
    damping = 1e4
    grads, stats = _grads_and_stats(problem, seed=4)
    updates, state = problem["first_update"](grads, stats, damping)
    # U [(UᵀGU) / (S + λ)] Uᵀ - G / λ = -U [(UᵀGU) S / (λ (S + λ))] Uᵀ.
    relative_error = _curvatures(state).max() / damping
    assert relative_error < 1e-3
    error = _distance(optax.tree.scale(damping, updates), grads)
    assert error <= relative_error * float(optax.tree.norm(grads)) * (1 + 1e-9)
    assert error > 0  # not a plain division: the curvature is still there


def test_tiny_damping_gives_the_undamped_ekfac_direction():
    # A regression net on 256 examples: full-rank factors and scalings (a
    # softmax head or a LayerNorm would give directions without curvature).
    model = nn.Sequential(
        [
            nn.Dense(4, param_dtype=jnp.float64),
            jnp.tanh,
            nn.Dense(2, param_dtype=jnp.float64),
        ]
    )
    x, _ = _batch(5, num_examples=256)
    targets = jax.random.normal(jax.random.key(6), (256, 2), jnp.float64)
    params = model.init(jax.random.key(0), x)["params"]
    curvature = oek.Curvature(
        lambda p, x, t: oek.squared_error(model.apply({"params": p}, x), t),
        fisher_type="empirical",
    )
    layers = curvature.layers(params, x, targets)
    _, grads, stats = curvature.value_grad_and_stats(params, x, targets)

    @jax.jit
    def first_update(damping):
        tx = oek.scale_by_ekfac(layers, damping=damping)
        return tx.update(grads, tx.init(params), stats=stats)

    damping = 1e-8
    updates, state = first_update(damping)
    undamped, _ = first_update(1e-300)
    # Entry by entry, c / (S + λ) - c / S = -(c / S) λ / (S + λ).
    relative_error = damping / _curvatures(state).min()
    assert relative_error < 1e-3
    error = _distance(updates, undamped)
    assert error <= relative_error * float(optax.tree.norm(undamped)) * (1 + 1e-6)
    assert error > 0


# --- misuse ------------------------------------------------------------------------


def test_stats_that_do_not_fit_the_layers_are_refused(problem):
    tx = oek.scale_by_ekfac(problem["layers"])
    state = tx.init(problem["params"])
    grads, stats = _grads_and_stats(problem, seed=6)

    def refused(stats, error, match):
        with pytest.raises(error, match=match):
            tx.update(grads, state, stats=stats)

    (hidden,) = stats.layers["hidden"]
    refused(
        stats._replace(layers={**stats.layers, "decoder/Dense_0": (hidden,)}),
        ValueError,
        r"unknown layers \['decoder/Dense_0'\]",
    )
    refused(
        stats._replace(layers={**stats.layers, "hidden": (hidden, hidden)}),
        ValueError,
        "hidden was called 2 times in the stats, 1 in the layers",
    )
    refused(
        stats._replace(layers={**stats.layers, "hidden": hidden}),
        TypeError,
        r"stats.layers\['hidden'\] must be a tuple of LayerStats",
    )
    narrow = hidden._replace(inputs=hidden.inputs[:, :4])
    refused(
        stats._replace(layers={**stats.layers, "hidden": (narrow,)}),
        ValueError,
        "stats for hidden have inputs",
    )
    refused(stats._asdict(), TypeError, "must be the Statistics")


class _Shared(nn.Module):
    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(3, name="shared", param_dtype=jnp.float64)
        return shared(x) + shared(jnp.flip(x, 0))


def test_calls_of_one_module_must_share_the_example_axis():
    model = _Shared()
    x, y = _batch(7)
    params = model.init(jax.random.key(0), x)["params"]
    curvature = _curvature(model)
    tx = oek.scale_by_ekfac(curvature.layers(params, x, y))
    _, grads, stats = curvature.value_grad_and_stats(params, x, y)
    first, second = stats.layers["shared"]
    second = jax.tree.map(lambda a: a[:-1], second)
    with pytest.raises(ValueError, match=r"calls of shared hold \[7, 8\] examples"):
        tx.update(
            grads,
            tx.init(params),
            stats=stats._replace(layers={"shared": (first, second)}),
        )


def test_a_partial_last_batch_is_accepted(problem):
    # Only feature shapes are checked: layers came from 8 examples, this has 5.
    tx = oek.scale_by_ekfac(problem["layers"])
    grads, stats = _grads_and_stats(problem, seed=8, num_examples=5)
    updates, state = tx.update(grads, tx.init(problem["params"]), stats=stats)
    chex.assert_tree_all_finite((updates, state))


def test_gradients_and_state_of_another_model_are_refused(problem):
    tx = oek.scale_by_ekfac(problem["layers"])
    state = tx.init(problem["params"])
    grads, stats = _grads_and_stats(problem, seed=9)
    with pytest.raises(ValueError, match=r"\['extra/kernel'\], which the layers"):
        tx.update({**grads, "extra": {"kernel": jnp.zeros(2)}}, state, stats=stats)
    wide = _Net(hidden=6).init(jax.random.key(0), _batch(0)[0])["params"]
    with pytest.raises(ValueError, match="params hold hidden/kernel of shape"):
        tx.init(wide)
    other = _Net(hidden=6)
    other_layers = _curvature(other).layers(wide, *_batch(0))
    other_state = oek.scale_by_ekfac(other_layers).init(wide)
    with pytest.raises(ValueError, match="scalings of shape .* for hidden"):
        tx.update(grads, other_state, stats=stats)
    with pytest.raises(TypeError, match="jax.eval_shape"):
        tx.update(grads, state._asdict(), stats=stats)


def test_losses_reduced_over_the_batch_are_refused_and_token_losses_are_not():
    model = nn.Sequential([nn.Embed(11, 4, param_dtype=jnp.float64), nn.Dense(11)])
    ids = jax.random.randint(jax.random.key(0), (4, 6), 0, 11)
    params = model.init(jax.random.key(1), ids)["params"]

    def token_losses(params, ids):  # [B, T]: every token is a loss term
        return oek.softmax_cross_entropy(model.apply({"params": params}, ids), ids)

    oek.Curvature(token_losses).layers(params, ids)
    oek.Curvature(lambda p, ids: token_losses(p, ids).reshape(-1)).layers(params, ids)
    for reduced in (
        lambda p, ids: token_losses(p, ids).mean(0),  # [T]
        lambda p, ids: token_losses(p, ids).mean(keepdims=True).reshape(1),
    ):
        with pytest.raises(ValueError, match="reduced over the batch"):
            oek.Curvature(reduced).layers(params, ids)


def _as_python(value):
    return value


def _as_numpy_scalar(value):
    return np.asarray(value)[()]


CONVERSIONS = [_as_python, _as_numpy_scalar, np.asarray, jnp.asarray]
OUT_OF_RANGE = [
    ("damping", -1.0),
    ("damping", 0.0),
    ("damping", float("inf")),
    ("damping", float("nan")),
    ("decay", 1.0),
    ("decay", -0.1),
    ("eigen_update_every", 0),
    ("eigen_update_every", 2.5),
    ("stats_update_every", -1),
    ("max_per_example_elements", 0),
]


@pytest.mark.parametrize("convert", CONVERSIONS)
@pytest.mark.parametrize("name, value", OUT_OF_RANGE)
def test_out_of_range_hyperparameters_are_refused_whatever_their_type(
    problem, name, value, convert
):
    with pytest.raises(ValueError, match=f"{name} must be"):
        oek.scale_by_ekfac(problem["layers"], **{name: convert(value)})


def test_hyperparameters_that_are_not_scalar_numbers_are_refused(problem):
    with pytest.raises(ValueError, match="damping must be a scalar"):
        oek.scale_by_ekfac(problem["layers"], damping=jnp.ones(2))
    with pytest.raises(TypeError, match="optax.inject_hyperparams"):
        oek.scale_by_ekfac(problem["layers"], damping=optax.constant_schedule(1e-3))
    with pytest.raises(ValueError, match="multiple of stats_update_every"):
        oek.scale_by_ekfac(
            problem["layers"],
            eigen_update_every=np.int32(5),
            stats_update_every=jnp.asarray(2),
        )


def test_injected_hyperparameters_are_checked_only_when_concrete(problem):
    params = problem["params"]
    grads, stats = _grads_and_stats(problem, seed=11)
    inject = optax.inject_hyperparams(oek.scale_by_ekfac)
    with pytest.raises(ValueError, match="damping must be"):
        inject(layers=problem["layers"], damping=-1.0).init(params)

    # Scheduled under jit: the values are traced, so they are not checked.
    schedule = optax.linear_schedule(1e-1, 1e-3, transition_steps=10)
    tx = inject(layers=problem["layers"], damping=schedule)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), stats=stats)
    expected, _ = oek.scale_by_ekfac(problem["layers"], damping=1e-1).update(
        grads, tx.init(params).inner_state, stats=stats
    )
    chex.assert_trees_all_close(updates, expected, rtol=1e-6)
    chex.assert_tree_all_finite(state)

    traced = inject(layers=problem["layers"], max_per_example_elements=2**10)
    with pytest.raises(ValueError, match="static_args"):
        jax.jit(traced.update)(grads, traced.init(params), stats=stats)
    static = optax.inject_hyperparams(
        oek.scale_by_ekfac, static_args=("max_per_example_elements",)
    )(layers=problem["layers"], max_per_example_elements=2**10)
    jax.jit(static.update)(grads, static.init(params), stats=stats)


# --- properties --------------------------------------------------------------------


# (input width, hidden width, examples), dtype: a batch narrower than the layers
# (rank-deficient factors) in both dtypes, a one-unit layer, a single example.
# Shapes and dtypes are the only static arguments (each costs a compilation of
# seconds), so four compilations serve every example.
CASES = [
    ((7, 5, 3), jnp.float32),
    ((7, 5, 3), jnp.float64),
    ((2, 1, 16), jnp.float32),
    ((1, 5, 1), jnp.float64),
]


@functools.partial(jax.jit, static_argnames=("shape", "dtype"))
def _three_steps(key, input_scale, constant_columns, damping, *, shape, dtype):
    """Three updates of a fresh `_Net` on random batches of `shape`."""
    width, hidden, num_examples = shape
    key_x, key_y, key_params = jax.random.split(key, 3)
    xs = input_scale * jax.random.normal(key_x, (3, num_examples, width), dtype)
    constant = constant_columns & (jnp.arange(width) % 2 == 0)
    xs = jnp.where(constant, input_scale, xs).astype(dtype)
    ys = jax.random.randint(key_y, (3, num_examples), 0, 3)
    model = _Net(hidden=hidden, dtype=dtype)
    params = model.init(key_params, xs[0])["params"]
    curvature = _curvature(model)
    layers = curvature.layers(params, xs[0], ys[0])
    tx = oek.scale_by_ekfac(layers, damping=damping, decay=0.9, eigen_update_every=2)

    def step(state, batch):
        _, grads, stats = curvature.value_grad_and_stats(params, *batch)
        updates, state = tx.update(grads, state, stats=stats)
        return state, (updates, grads)

    return jax.lax.scan(step, tx.init(params), (xs, ys))


def _assert_symmetric_psd(factor, eps):
    factor = np.float64(factor)
    scale = max(np.abs(factor).max(), np.finfo(np.float64).tiny)
    np.testing.assert_allclose(factor, factor.T, atol=eps * scale)
    assert np.linalg.eigvalsh(factor).min() >= -len(factor) * eps * scale


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(
    case=st.sampled_from(CASES),
    damping=st.floats(-8, 4).map(lambda exponent: 10.0**exponent),
    input_scale=st.floats(-3, 3).map(lambda exponent: 10.0**exponent),
    constant_columns=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_updates_and_state_stay_finite_symmetric_psd_and_bounded(
    case, damping, input_scale, constant_columns, seed
):
    shape, dtype = case
    state, (updates, grads) = _three_steps(
        jax.random.key(seed),
        input_scale,
        constant_columns,
        damping,
        shape=shape,
        dtype=dtype,
    )

    eps = float(jnp.finfo(dtype).eps)
    chex.assert_tree_all_finite((state, updates))
    assert int(state.skipped_steps) == 0
    for block in state.blocks.values():
        assert block.input_factor.dtype == dtype
        _assert_symmetric_psd(block.input_factor, 10 * eps)
        _assert_symmetric_psd(block.output_factor, 10 * eps)
        assert float(block.scalings.min()) >= 0
    assert all(float(v.min()) >= 0 for v in state.second_moments.values())
    # Damping bounds every step: ‖update‖ ≤ ‖g‖ / λ (up to the round-off of
    # the eigenbases' orthogonality).
    update_norms = jax.vmap(optax.tree.norm)(updates)
    grad_norms = jax.vmap(optax.tree.norm)(grads)
    assert np.all(update_norms <= grad_norms / damping * (1 + 1e3 * eps))
