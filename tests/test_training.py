"""End to end: EKFAC trains an MLP on sklearn's digits, under one compiled step.

The data and the model are float32 on purpose (the other tests enable x64): the
arrays are created as float32 and flax's `param_dtype` default keeps the
parameters float32, so these tests also check that nothing in a training step
silently promotes to float64.
"""

import chex
import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import optax_ekfac as oek

STEPS = 150
BATCH_SIZE = 128
# Adam's best here is lr 2e-2 (3e-2 is unstable, 1e-2 ends ~5x higher). EKFAC, with
# momentum 0.9, was swept over damping 1e-3 .. 2e-2 and lr from damping / 2 to
# damping: lr = damping is best, but 3e-3 diverged on one seed of two, so 2e-3.
# Final train losses (whole set) at this seed: EKFAC 2.6e-4, best Adam 5.3e-4;
# over 6 seeds of data order and init the ratio was 1.8 to 10, so the tests ask
# for 1.25.
ADAM_LEARNING_RATES = (1e-3, 3e-3, 1e-2, 2e-2)
EKFAC_LEARNING_RATE = 2e-3
EKFAC_SETTINGS = dict(damping=2e-3, eigen_update_every=10)
MARGIN = 1.25


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(128)(x)))


@pytest.fixture(scope="module")
def digits():
    """Standardized float32 digits, a fixed sequence of batches, a loss, params."""
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    x, y = x.astype(np.float32), y.astype(np.int32)
    rng = np.random.default_rng(0)
    batches = np.stack(
        [rng.choice(len(x), BATCH_SIZE, replace=False) for _ in range(STEPS)]
    )
    model = MLP()

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    params = model.init(jax.random.key(0), x[:1])["params"]
    # The learning rate and damping above were swept with the empirical Fisher.
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x[batches[0]], y[batches[0]])
    return dict(
        x=x,
        y=y,
        batches=batches,
        loss_fn=loss_fn,
        params=params,
        curvature=curvature,
        layers=layers,
    )


def _train(digits, tx, with_stats):
    """Final loss on the whole set after STEPS steps of one jitted step."""
    loss_fn, curvature = digits["loss_fn"], digits["curvature"]

    @jax.jit
    def step(params, opt_state, x, y):
        if with_stats:
            _, grads, stats = curvature.value_grad_and_stats(params, x, y)
            updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        else:
            grads = jax.grad(lambda p: loss_fn(p, x, y).mean())(params)
            updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params = digits["params"]
    opt_state = tx.init(params)
    x, y = digits["x"], digits["y"]
    for batch in digits["batches"]:
        params, opt_state = step(params, opt_state, x[batch], y[batch])
    chex.assert_trees_all_equal_shapes_and_dtypes(params, digits["params"])
    return float(loss_fn(params, x, y).mean())


@pytest.fixture(scope="module")
def best_adam_loss(digits):
    losses = [
        _train(digits, optax.adam(lr), with_stats=False) for lr in ADAM_LEARNING_RATES
    ]
    return min(losses)


@pytest.mark.parametrize("form", ["ekfac", "chain"])
def test_ekfac_trains_faster_than_adam(digits, best_adam_loss, form):
    if form == "ekfac":
        tx = oek.ekfac(
            digits["layers"], EKFAC_LEARNING_RATE, momentum=0.9, **EKFAC_SETTINGS
        )
    else:
        tx = optax.chain(
            oek.scale_by_ekfac(digits["layers"], **EKFAC_SETTINGS),
            optax.sgd(EKFAC_LEARNING_RATE, momentum=0.9),
        )
    loss = _train(digits, tx, with_stats=True)
    assert loss * MARGIN < best_adam_loss, (loss, best_adam_loss)


def test_a_long_training_loop_compiles_its_step_once(digits):
    curvature = digits["curvature"]
    tx = oek.ekfac(
        digits["layers"],
        EKFAC_LEARNING_RATE,
        momentum=0.9,
        stats_update_every=5,
        **EKFAC_SETTINGS,  # eigen_update_every=10
    )
    traces = 0

    @jax.jit
    def step(params, opt_state, x, y):
        nonlocal traces
        traces += 1
        loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    params = digits["params"]
    opt_state = tx.init(params)
    x, y = digits["x"], digits["y"]
    losses = []
    for batch in digits["batches"][:30]:
        params, opt_state, loss = step(params, opt_state, x[batch], y[batch])
        losses.append(float(loss))
    assert traces == 1
    assert int(opt_state[0].count) == 30
    chex.assert_tree_all_finite(params)
    assert losses[-1] < losses[0]
