"""Bad input and bad numbers, as a user meets them: a non-finite step in the
ready optimizer, `has_aux` mistakes, labels in the wrong layout, and a NaN
loss with finite gradients (docs/bad-inputs.md lists each bad input with its
test)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import optax_ekfac as oek


class _Mlp(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(4)(x)))


def _batch(seed, num_examples=8, width=5):
    # NumPy data: no JAX op to compile outside the steps under test.
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((num_examples, width))
    return jnp.asarray(x), jnp.asarray(rng.integers(0, 3, num_examples))


def _loss_fn(model):
    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    return loss_fn


# --- a non-finite step in the ready optimizer ----------------------------------


@pytest.fixture(scope="module")
def training():
    model = _Mlp()
    x, y = _batch(0)
    params = model.init(jax.random.key(0), x)["params"]
    curvature = oek.Curvature(_loss_fn(model), fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    tx = oek.ekfac(layers, learning_rate=0.05, momentum=0.9, eigen_update_every=2)

    @jax.jit
    def grads_and_stats(params, x, y):
        return curvature.value_grad_and_stats(params, x, y)[1:]

    @jax.jit
    def step(params, opt_state, grads, stats):
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state

    return dict(
        params=params,
        layers=layers,
        init=tx.init,
        grads_and_stats=grads_and_stats,
        step=step,
    )


def _poisoned_step_inputs(training, params, where):
    """Gradients and statistics of a batch with a NaN or infinity at `where`."""
    x, y = _batch(99)
    if where == "batch input":
        return training["grads_and_stats"](params, x.at[2, 1].set(jnp.nan), y)
    grads, stats = training["grads_and_stats"](params, x, y)
    if where == "gradient":
        grads = jax.tree.map(lambda g: g.at[(0,) * g.ndim].set(jnp.inf), grads)
    else:  # only the statistics; the gradients stay finite
        name = training["layers"].blocks[0].name
        (call,) = stats.layers[name]
        call = call._replace(output_grads=call.output_grads.at[0, 0].set(jnp.nan))
        stats = stats._replace(layers={**stats.layers, name: (call,)})
    return grads, stats


@pytest.mark.parametrize("where", ["batch input", "gradient", "statistics"])
def test_ekfac_skips_a_non_finite_step_and_trains_on_as_if_it_never_happened(
    training, where
):
    step, grads_and_stats = training["step"], training["grads_and_stats"]
    params, opt_state = training["params"], training["init"](training["params"])
    for seed in (1, 2):
        grads, stats = grads_and_stats(params, *_batch(seed))
        params, opt_state = step(params, opt_state, grads, stats)

    bad = _poisoned_step_inputs(training, params, where)
    skipped_params, skipped_state = step(params, opt_state, *bad)

    chex.assert_trees_all_equal(skipped_params, params)  # bit for bit
    ekfac_state, sgd_state = skipped_state
    # No NaN, and no zero either, entered the momentum trace.
    chex.assert_trees_all_equal(sgd_state, opt_state[1])
    assert int(ekfac_state.skipped_steps) == int(opt_state[0].skipped_steps) + 1
    chex.assert_trees_all_equal(
        ekfac_state._replace(skipped_steps=opt_state[0].skipped_steps), opt_state[0]
    )

    # The next finite step is the one the optimizer takes without the bad one.
    good = grads_and_stats(params, *_batch(3))
    after_skip, after_skip_state = step(skipped_params, skipped_state, *good)
    clean, clean_state = step(params, opt_state, *good)
    chex.assert_tree_all_finite(after_skip)
    kernel = params["Dense_0"]["kernel"]
    assert not np.array_equal(after_skip["Dense_0"]["kernel"], kernel)
    chex.assert_trees_all_equal(after_skip, clean)
    chex.assert_trees_all_equal(
        after_skip_state[0]._replace(skipped_steps=clean_state[0].skipped_steps),
        clean_state[0],
    )
    chex.assert_trees_all_equal(after_skip_state[1], clean_state[1])
    # The diagnostics still find the EKFAC state inside the ready optimizer's.
    oek.frobenius_distances(training["layers"], good[1], after_skip_state)


def test_scale_by_ekfac_alone_hands_a_skipped_steps_gradients_on(training):
    # Documented: scale_by_ekfac skips its own state update but returns the
    # gradients as they came, for optax.apply_if_finite or the caller.
    tx = oek.scale_by_ekfac(training["layers"])
    state = tx.init(training["params"])
    update = jax.jit(lambda grads, stats: tx.update(grads, state, stats=stats))
    for where in ("gradient", "statistics"):
        grads, stats = _poisoned_step_inputs(training, training["params"], where)
        updates, new_state = update(grads, stats)
        # With finite gradients and NaN statistics: unpreconditioned.
        chex.assert_trees_all_equal(updates, grads)
        assert int(new_state.skipped_steps) == 1


# --- has_aux mistakes ----------------------------------------------------------


FORGOT_HAS_AUX = r"loss_fn returned a tuple.*Curvature\(loss_fn, has_aux=True\)"
NEEDLESS_HAS_AUX = (
    r"Curvature\(has_aux=True\) needs loss_fn to return \(losses, aux\).*"
    r"an array of shape \(8,\)"
)


def _with_aux(loss_fn):
    def loss_and_aux(*args):
        losses = loss_fn(*args)
        return losses, {"mean": jnp.mean(losses)}

    return loss_and_aux


@pytest.mark.parametrize("method", ["layers", "value_grad_and_stats"])
def test_linen_has_aux_mistakes_say_what_to_change(method):
    model = _Mlp()
    x, y = _batch(0)
    params = model.init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=FORGOT_HAS_AUX):
        getattr(
            oek.Curvature(_with_aux(_loss_fn(model)), fisher_type="empirical"),
            method,
        )(params, x, y)
    with pytest.raises(ValueError, match=NEEDLESS_HAS_AUX):
        getattr(
            oek.Curvature(_loss_fn(model), has_aux=True, fisher_type="empirical"),
            method,
        )(params, x, y)


@pytest.mark.parametrize("method", ["layers", "value_grad_and_stats"])
def test_nnx_has_aux_mistakes_say_what_to_change(method):
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    x, y = _batch(0)

    def loss_fn(model, x, y):
        return oek.softmax_cross_entropy(model(x), y)

    with pytest.raises(ValueError, match=FORGOT_HAS_AUX):
        getattr(oek.nnx.Curvature(_with_aux(loss_fn), fisher_type="empirical"), method)(
            model, x, y
        )
    with pytest.raises(ValueError, match=NEEDLESS_HAS_AUX):
        getattr(
            oek.nnx.Curvature(loss_fn, has_aux=True, fisher_type="empirical"), method
        )(model, x, y)


def test_nnx_has_aux_still_passes_aux_through():
    model = nnx.Linear(5, 3, rngs=nnx.Rngs(0))
    x, y = _batch(0)

    def loss_fn(model, x, y):
        return oek.softmax_cross_entropy(model(x), y)

    curvature = oek.nnx.Curvature(
        _with_aux(loss_fn), has_aux=True, fisher_type="empirical"
    )
    (loss, aux), _, _ = nnx.jit(curvature.value_grad_and_stats)(model, x, y)
    np.testing.assert_allclose(aux["mean"], loss)


# --- labels of softmax_cross_entropy ---------------------------------------------


def _logits_and_labels(shape=(8,), num_classes=3):
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(shape + (num_classes,))
    return jnp.asarray(logits), jnp.asarray(rng.integers(0, num_classes, shape))


@pytest.mark.parametrize("shape", [(8,), (2, 4)], ids=["examples", "tokens"])
def test_a_column_of_integer_labels_is_class_indices(shape):
    logits, labels = _logits_and_labels(shape)
    chex.assert_trees_all_equal(
        oek.softmax_cross_entropy(logits, labels[..., None]),
        oek.softmax_cross_entropy(logits, labels),
    )


def test_bool_labels_are_classes_0_and_1():
    logits, labels = _logits_and_labels(num_classes=2)
    chex.assert_trees_all_equal(
        oek.softmax_cross_entropy(logits, labels.astype(bool)),
        oek.softmax_cross_entropy(logits, labels),
    )
    one_hot = jax.nn.one_hot(labels, 2)
    chex.assert_trees_all_close(
        oek.softmax_cross_entropy(logits, one_hot.astype(bool)),
        oek.softmax_cross_entropy(logits, labels),
    )


@pytest.mark.parametrize("column", [False, True], ids=["[N]", "[N, 1]"])
def test_float_class_indices_are_refused_naming_labels(column):
    logits, labels = _logits_and_labels()
    labels = labels.astype(jnp.float32)
    if column:
        labels = labels[:, None]
    with pytest.raises(ValueError, match=r"labels .*astype\(jnp\.int32\).*one-hot"):
        oek.softmax_cross_entropy(logits, labels)


def test_a_column_of_labels_captures_the_same_sampled_statistics():
    # The Monte-Carlo Fisher samples from the logits; the labels only give the
    # loss and gradients.
    model = _Mlp()
    x, y = _batch(0)
    params = model.init(jax.random.key(0), x)["params"]
    curvature = oek.Curvature(_loss_fn(model), fisher_type="mc")
    value_grad_and_stats = jax.jit(curvature.value_grad_and_stats)
    key = jax.random.key(1)
    column_loss, column_grads, column_stats = value_grad_and_stats(
        params, x, y[:, None], key=key
    )
    loss, grads, stats = value_grad_and_stats(params, x, y, key=key)
    chex.assert_trees_all_equal(
        (column_loss, column_grads, column_stats.layers),
        (loss, grads, stats.layers),
    )


@pytest.mark.parametrize("learning_rate", [-0.1, 0.0, jnp.asarray(-1.0), "0.1"])
def test_a_fixed_learning_rate_must_be_positive(learning_rate):
    model = nn.Dense(3)
    x = jnp.ones((4, 2))
    params = model.init(jax.random.key(0), x)["params"]
    layers = oek.Curvature(
        lambda p, x: oek.squared_error(model.apply({"params": p}, x), jnp.zeros((4, 3)))
    ).layers(params, x)
    with pytest.raises(ValueError, match="ekfac: learning_rate must be a number > 0"):
        oek.ekfac(layers, learning_rate=learning_rate)
    # A positive number, an array and a schedule are taken.
    for taken in (0.1, jnp.asarray(0.1), optax.cosine_decay_schedule(0.1, 100)):
        oek.ekfac(layers, learning_rate=taken)


# --- a NaN loss with finite gradients ------------------------------------------


def test_a_nan_loss_with_finite_gradients_skips_the_adaptive_step():
    """A loss term that is NaN without a gradient (here through
    `stop_gradient`) leaves the gradients and statistics finite; the adaptive
    `ekfac` can't judge such a step and skips it, jitted, in float32: the
    parameters and the state stay as they were but for the skip count."""
    model = _Mlp()
    x, y = _batch(0)
    x = x.astype(jnp.float32)
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x, y, offset):
        losses = oek.softmax_cross_entropy(model.apply({"params": params}, x), y)
        return losses + jax.lax.stop_gradient(offset)

    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    no_offset, nan_offset = jnp.zeros(8, jnp.float32), jnp.zeros(8, jnp.float32)
    nan_offset = nan_offset.at[3].set(jnp.nan)
    tx = oek.ekfac(curvature.layers(params, x, y, no_offset))

    @jax.jit
    def step(params, state, offset):
        loss, grads, stats = curvature.value_grad_and_stats(params, x, y, offset)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, loss, grads

    params, state, _, _ = step(params, tx.init(params), no_offset)  # taken
    new_params, new_state, loss, grads = step(params, state, nan_offset)
    assert np.isnan(loss)
    chex.assert_tree_all_finite(grads)
    chex.assert_trees_all_equal(new_params, params)
    skipped = state.preconditioner.skipped_steps
    assert int(new_state.preconditioner.skipped_steps) == int(skipped) + 1
    chex.assert_trees_all_equal(
        new_state._replace(
            preconditioner=new_state.preconditioner._replace(skipped_steps=skipped)
        ),
        state,
    )
