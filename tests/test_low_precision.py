"""The adaptive `ekfac` with bfloat16 and float16 parameters.

Pinned here:

* a bfloat16 MLP (parameters and computation) on sklearn's digits, trained by
  `oek.ekfac(layers)` with the Monte-Carlo Fisher, ends within a small factor
  of the float32 model's loss, its damping never climbing tenfold (judged
  against float32's resolution, the round-off of its bfloat16 loss rejected
  steps and drove the damping to its maximum), and keeps its dtypes: the
  parameters, updates and velocity bfloat16, the step control's scalars
  float32; a float16 model trains too;
* `LossModel.loss_at` and `curvature_products` of a bfloat16 model in
  float32 (against numpy in float64 from the same bfloat16 logits);
* the round-off rule: a predicted decrease the loss's own dtype can't show
  (below `100 eps |L|`, bfloat16's or float16's `eps`) is not judged (`ρ`
  stays NaN, the damping falls by `ω`, the step is taken), while the same
  decrease of a float32 model's loss is judged.

Float32 here, as users run it (no x64).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import optax_ekfac as oek

BATCH_SIZE = 128
# Judged at float32's resolution, the bfloat16 run's damping climbed to its
# maximum after about 120 steps, once the batch losses were near bfloat16's
# resolution (its loss then ended over 3 times the float32 run's).
STEPS = 130
# The bfloat16 model's final loss may be this many times the float32 one's:
# its parameters can't take steps below their own resolution, which shows
# late in training whatever the optimizer.
LOSS_FACTOR = 2.5


class MLP(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        layer = dict(dtype=self.dtype, param_dtype=self.dtype)
        return nn.Dense(10, **layer)(nn.relu(nn.Dense(128, **layer)(x)))


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    x = (x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)
    rng = np.random.default_rng(1)
    batches = np.stack(
        [rng.choice(len(x), BATCH_SIZE, replace=False) for _ in range(STEPS)]
    )
    return x.astype(np.float32), y.astype(np.int32), batches


def _train(digits, dtype, steps):
    """Trains `MLP(dtype)`; returns the float32 loss of the whole set (the
    parameters evaluated by a float32 model), the dampings (the initial one
    first), and the last parameters, update and state."""
    x, y, batches = digits
    model = MLP(dtype)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x.astype(dtype))
        return oek.softmax_cross_entropy(logits, y)

    params = model.init(jax.random.key(1), x[:1])["params"]
    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    tx = oek.ekfac(curvature.layers(params, x[batches[0]], y[batches[0]]))

    @jax.jit
    def step(params, state, x, y, key):
        _, grads, stats = curvature.value_grad_and_stats(params, x, y, key=key)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    dampings = [float(state.damping)]
    for i, batch in enumerate(batches[:steps]):
        key = jax.random.fold_in(jax.random.key(2), i)
        params, state, updates = step(params, state, x[batch], y[batch], key)
        dampings.append(float(state.damping))
    wide = jax.tree.map(lambda leaf: leaf.astype(jnp.float32), params)
    logits = MLP().apply({"params": wide}, x)
    loss = float(optax.softmax_cross_entropy_with_integer_labels(logits, y).mean())
    return loss, np.array(dampings), params, updates, state


def _dtypes(tree):
    return {leaf.dtype for leaf in jax.tree.leaves(tree)}


@pytest.fixture(scope="module")
def float32_loss(digits):
    return _train(digits, jnp.float32, STEPS)[0]


def test_bfloat16_trains_like_float32(digits, float32_loss):
    loss, dampings, params, updates, state = _train(digits, jnp.bfloat16, STEPS)
    # Never climbing tenfold above where it started, let alone to max_damping.
    assert dampings.max() < 10 * dampings[0], (dampings.max(), dampings.argmax())
    assert np.isfinite(loss) and loss <= LOSS_FACTOR * float32_loss, (
        loss,
        float32_loss,
    )
    for tree in (params, updates, state.velocity):
        assert _dtypes(tree) == {jnp.dtype(jnp.bfloat16)}
    for scalar in (
        state.damping,
        state.learning_rate,
        state.momentum,
        state.reduction_ratio,
        state.model_change,
    ):
        assert scalar.dtype == jnp.float32


def test_float16_trains(digits):
    steps = 30
    loss, dampings, params, updates, state = _train(digits, jnp.float16, steps)
    x, y, _ = digits
    initial = MLP().apply({"params": MLP().init(jax.random.key(1), x[:1])["params"]}, x)
    initial_loss = float(
        optax.softmax_cross_entropy_with_integer_labels(initial, y).mean()
    )
    assert np.isfinite(loss) and loss < 0.1 * initial_loss, (loss, initial_loss)
    assert np.all(np.isfinite(dampings))
    for tree in (params, updates, state.velocity):
        assert _dtypes(tree) == {jnp.dtype(jnp.float16)}
    assert state.damping.dtype == jnp.float32


# ----------------------------------------------------------------------------
# The round-off rule at the loss dtype's resolution.
# ----------------------------------------------------------------------------

INITIAL_DAMPING = 30.0
DAMPING_DECAY = 0.95


def _first_update(dtype):
    """One adaptive update of a linear softmax model in `dtype`, whose large
    initial damping makes a step that lowers the loss by 0.5-1%."""
    model = nn.Dense(3, dtype=dtype, param_dtype=dtype)
    x = jax.random.normal(jax.random.key(0), (16, 4)).astype(dtype)
    y = jnp.arange(16) % 3
    params = model.init(jax.random.key(1), x[:1])["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.ekfac(
        curvature.layers(params, x, y),
        initial_damping=INITIAL_DAMPING,
        damping_decay=DAMPING_DECAY,
    )

    @jax.jit
    def update(params):
        loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, state = tx.update(grads, tx.init(params), params, stats=stats)
        return loss, updates, state

    return update(params)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_a_change_below_the_loss_dtypes_resolution_is_not_judged(dtype):
    loss, updates, state = _first_update(dtype)
    relative_change = float(-state.model_change / loss.astype(jnp.float32))
    eps = float(jnp.finfo(dtype).eps)
    # The predicted decrease: resolvable in float32, not in `dtype`.
    assert 100 * float(jnp.finfo(jnp.float32).eps) < relative_change < 100 * eps, (
        relative_change
    )
    assert np.isnan(state.reduction_ratio)
    np.testing.assert_allclose(state.damping, INITIAL_DAMPING * DAMPING_DECAY)
    assert state.rejected_steps == 0
    assert any(np.any(np.asarray(leaf) != 0) for leaf in jax.tree.leaves(updates))


def test_the_same_change_of_a_float32_loss_is_judged():
    loss, _, state = _first_update(jnp.float32)
    relative_change = float(-state.model_change / loss)
    assert 100 * float(jnp.finfo(jnp.float32).eps) < relative_change < 0.05
    assert np.isfinite(state.reduction_ratio)


# ----------------------------------------------------------------------------
# The loss model of a bfloat16 model: its losses and products in float32.
# ----------------------------------------------------------------------------


def test_loss_model_of_a_bfloat16_model_computes_in_float32():
    """`loss_at` and `curvature_products` take the bfloat16 logits promoted:
    against numpy in float64, from the same bfloat16 logits and tangents."""
    dtype = jnp.bfloat16
    model = MLP(dtype)
    x, y = load_digits(return_X_y=True)
    x, y = jnp.asarray(x[:32] / 16, jnp.float32), jnp.asarray(y[:32])
    params = model.init(jax.random.key(0), x[:1])["params"]

    def logits_at(params):
        return model.apply({"params": params}, x.astype(dtype))

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(logits_at(params), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    _, _, stats = curvature.value_grad_and_stats(params, x, y)
    loss_model = stats.loss_model
    vector = jax.tree.map(
        lambda leaf: jax.random.normal(jax.random.key(3), leaf.shape, dtype), params
    )
    logits, tangent = jax.jvp(logits_at, (params,), (vector,))
    logits, tangent = (np.asarray(a, np.float64) for a in (logits, tangent))
    log_p = logits - logits.max(-1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(-1, keepdims=True))
    p = np.exp(log_p)
    expected_loss = -log_p[np.arange(32), np.asarray(y)].mean()
    # Softmax cross-entropy's Hessian in the logits: diag(p) - p pᵀ.
    expected_product = np.mean((p * tangent**2).sum(-1) - (p * tangent).sum(-1) ** 2)

    loss = jax.jit(loss_model.loss_at)(params)
    product = jax.jit(lambda v: loss_model.curvature_products([v]))(vector)
    assert loss.dtype == jnp.float32 and product.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    # The tangents are bfloat16, rounded a little differently by the library's
    # `jax.linearize` than by the `jax.jvp` here (1e-4 apart); products summed
    # in bfloat16 are 3e-3 off, as is the loss rounded to bfloat16.
    np.testing.assert_allclose(product[0, 0], expected_product, rtol=1e-3)
