"""The adaptive `ekfac` (no learning rate): its loss model and step control.

Pinned here:

* `LossModel.curvature_products` is `Vᵀ G V` with `G = Jᵀ H J` the dense
  Gauss-Newton matrix of the mean loss (softmax cross-entropy, squared error
  and twice it, sigmoid BCE, a `[B, T]` token loss, a masked loss, an nnx
  model), and `LossModel.loss_at` is the mean loss at other parameters;
* the first update is `α Δ`, `Δ = -P_λ g` the `scale_by_ekfac` direction at
  the initial damping, `α` the minimizer of the damped quadratic model;
* a later update is `α Δ + β δ` from the damped 2x2 system, `β` clipped to
  `[0, max_momentum]` (then `α` solved again), or a fixed `momentum`,
  dropped where the model predicts its step uphill;
* where that model promises a decrease larger than the batch's loss (softmax
  cross-entropy on its flat tail), `(α, β)` scaled down to promise the loss
  exactly, in float64 and in a jitted float32 update;
* the Levenberg-Marquardt damping: the reduction ratio `ρ`, the factor
  `ω = damping_decay ** interval` and its direction, the `[1/4, 3/4]` band
  where nothing changes, the `[min_damping, max_damping]` clip, the interval,
  a fixed `damping`, and `λ ω` after a step too small to judge (float32
  against float64);
* a zero gradient is a zero step that still updates the statistics;
* a non-finite step (gradients, statistics, quadratic model or batch loss)
  moves nothing and only counts itself; the errors for bad inputs and
  settings; a jitted float32 run; `optax.inject_hyperparams` on the
  fixed-learning-rate path.

References are dense and built here, in float64: parameters flattened with
`ravel_pytree`, `J = jax.jacobian` of the model's outputs, `H = jax.hessian` of
the mean loss written out in `jnp` as a function of the outputs, `G = Jᵀ H J`,
the 2x2 system solved with `np.linalg.solve`. Only the EKFAC direction `Δ` is
taken from the library (`oek.scale_by_ekfac`, tested elsewhere).

The library's calls are jitted (one compilation each, much faster here than
op-by-op dispatch); the first and second updates of one problem are shared by
the tests (module fixtures).
"""

import dataclasses
import functools
from types import SimpleNamespace
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import optax_ekfac as oek

F64 = dict(param_dtype=jnp.float64)
RTOL = 1e-8


# ----------------------------------------------------------------------------
# Problems: a loss_fn for the library, and the same loss written out by hand
# as `tail(predictions(params))` for the dense reference.
# ----------------------------------------------------------------------------


class MLP(nn.Module):
    """Dense layers with tanh between; works on `[B, F]` and `[B, T, F]`."""

    features: tuple[int, ...] = (6, 3)
    param_dtype: Any = jnp.float64

    @nn.compact
    def __call__(self, x):
        for i, features in enumerate(self.features):
            if i:
                x = jnp.tanh(x)
            x = nn.Dense(features, param_dtype=self.param_dtype)(x)
        return x


class SineNet(nn.Module):
    """A strongly nonlinear regression net: the Gauss-Newton model of a long
    step is poor, so the reduction ratio is small."""

    @nn.compact
    def __call__(self, x):
        hidden = jnp.sin(4.0 * nn.Dense(8, **F64)(x))
        return nn.Dense(1, **F64)(hidden)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity
class Problem:
    """`loss_fn(params, *batch)` for the library; `tail(predictions(params))`,
    the same mean loss, for the reference."""

    params: optax.Params
    batch: tuple
    loss_fn: object
    predictions: object
    tail: object


def normal(seed, shape):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape))


def classes(seed, shape, num_classes=3):
    return jnp.asarray(np.random.default_rng(seed).integers(0, num_classes, shape))


def drawn(abstract, seed=0):
    """Parameters shaped like `abstract` drawn with numpy (nothing to
    compile): kernels `N(0, 1 / fan_in)`, biases `N(0, 0.1²)`."""
    rng = np.random.default_rng(seed)

    def draw(leaf):
        scale = 1 / np.sqrt(leaf.shape[0]) if len(leaf.shape) > 1 else 0.1
        return jnp.asarray(scale * rng.standard_normal(leaf.shape), leaf.dtype)

    return jax.tree.map(draw, abstract)


def init_params(model, x, seed=0):
    return drawn(jax.eval_shape(model.init, jax.random.key(0), x)["params"], seed)


def random_like(tree, seed):
    """A tree of standard normal leaves shaped like `tree`."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), tree
    )


def linen_problem(model, x, labels, loss_of_outputs, tail, params=None):
    if params is None:
        params = init_params(model, x)

    def loss_fn(params, x, labels):
        return loss_of_outputs(model.apply({"params": params}, x), labels)

    def predictions(params):
        return model.apply({"params": params}, x)

    return Problem(params, (x, labels), loss_fn, predictions, tail)


def cross_entropy_tail(labels, weights=1.0):
    """`mean(w (logsumexp(z) - z[y]))` over every leading index."""

    def tail(logits):
        picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
        return jnp.mean(weights * (jax.nn.logsumexp(logits, axis=-1) - picked))

    return tail


def softmax_problem(seed=0, params=None):
    x, labels = normal(seed + 10, (16, 4)), classes(seed + 11, (16,))
    return linen_problem(
        MLP(), x, labels, oek.softmax_cross_entropy, cross_entropy_tail(labels), params
    )


def squared_error_problem(scale=1.0):
    x, targets = normal(20, (12, 4)), normal(21, (12, 2))
    return linen_problem(
        MLP((5, 2)),
        x,
        targets,
        lambda outputs, targets: scale * oek.squared_error(outputs, targets),
        lambda z: scale * jnp.mean(0.5 * jnp.sum((z - targets) ** 2, axis=-1)),
    )


def sigmoid_problem():
    x = normal(30, (12, 4))
    labels = (normal(31, (12, 2)) > 0).astype(jnp.float64)
    return linen_problem(
        MLP((5, 2)),
        x,
        labels,
        oek.sigmoid_binary_cross_entropy,
        # log(1 + e^z) - y z, summed over the outputs of one example.
        lambda z: jnp.mean(jnp.sum(jax.nn.softplus(z) - labels * z, axis=-1)),
    )


def token_problem():
    """A `[B, T]` token loss of a Dense on `[B, T, F]` inputs."""
    x, labels = normal(40, (3, 5, 4)), classes(41, (3, 5))
    return linen_problem(
        MLP((3,)), x, labels, oek.softmax_cross_entropy, cross_entropy_tail(labels)
    )


def masked_problem():
    """A per-example mask applied to the helper's losses."""
    x, labels = normal(50, (10, 4)), classes(51, (10,))
    mask = jnp.array([1.0, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    return linen_problem(
        MLP(),
        x,
        labels,
        lambda logits, labels: mask * oek.softmax_cross_entropy(logits, labels),
        cross_entropy_tail(labels, mask),
    )


def regression_problem(model, num_examples=16, seed=60):
    x, targets = normal(seed, (num_examples, 3)), normal(seed + 1, (num_examples, 1))
    return linen_problem(
        model,
        x,
        targets,
        oek.squared_error,
        lambda z: jnp.mean(0.5 * jnp.sum((z - targets) ** 2, axis=-1)),
    )


LINEN_PROBLEMS = {
    "softmax_cross_entropy": softmax_problem,
    "squared_error": squared_error_problem,
    "twice_squared_error": lambda: squared_error_problem(scale=2.0),
    "sigmoid_binary_cross_entropy": sigmoid_problem,
    "token_loss": token_problem,
    "masked_loss": masked_problem,
}


# ----------------------------------------------------------------------------
# Library calls (jitted) and dense references.
# ----------------------------------------------------------------------------


def statistics(problem):
    """`(grads, stats)` of `value_grad_and_stats` at the problem's params."""
    curvature = oek.Curvature(problem.loss_fn, fisher_type="empirical")
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(
        problem.params, *problem.batch
    )
    return grads, stats


def layers_of(problem):
    return oek.Curvature(problem.loss_fn).layers(problem.params, *problem.batch)


@functools.cache
def jitted_update(tx):
    return jax.jit(
        lambda grads, state, params, stats: tx.update(grads, state, params, stats=stats)
    )


def update(tx, grads, state, params, stats):
    """`tx.update(grads, state, params, stats=stats)`, jitted (once per `tx`
    and tree structure of the inputs)."""
    return jitted_update(tx)(grads, state, params, stats)


def curvature_products(loss_model, vectors):
    return jax.jit(lambda model, vectors: model.curvature_products(vectors))(
        loss_model, vectors
    )


def ekfac_direction(layers, preconditioner_state, grads, stats, damping, **settings):
    """`Δ = -P_λ g`, from `scale_by_ekfac` with the same settings."""
    tx = oek.scale_by_ekfac(layers, damping=damping, **settings)
    directions, _ = update(tx, grads, preconditioner_state, None, stats)
    return jax.tree.map(jnp.negative, directions)


def flat(tree):
    return np.asarray(ravel_pytree(tree)[0])


def dense_ggn(predictions, tail, params):
    """`Jᵀ H J` over the flattened parameters."""
    flat_params, unravel = ravel_pytree(params)

    @jax.jit
    def ggn(flat_params):
        def outputs(p):
            return predictions(unravel(p))

        z = outputs(flat_params)
        jacobian = jax.jacobian(lambda p: outputs(p).reshape(-1))(flat_params)
        hessian = jax.hessian(lambda v: tail(v.reshape(z.shape)))(z.reshape(-1))
        return jacobian.T @ hessian @ jacobian

    return np.asarray(ggn(flat_params))


def problem_ggn(problem):
    return dense_ggn(problem.predictions, problem.tail, problem.params)


@functools.cache
def jitted_mean_loss(problem):
    return jax.jit(lambda params: problem.tail(problem.predictions(params)))


def mean_loss(problem, params):
    """The reference mean loss of the problem's batch at `params`."""
    return float(jitted_mean_loss(problem)(params))


def quadratic_model(ggn, grads, direction, velocity):
    """`C = [Δ δ]ᵀ G [Δ δ]`, `D = [Δ δ]ᵀ [Δ δ]`, `b = gᵀ [Δ δ]`, flattened."""
    vectors = np.stack([flat(direction), flat(velocity)])
    return vectors @ ggn @ vectors.T, vectors @ vectors.T, vectors @ flat(grads)


def predicted_change(curvature, gradient_products, coefficients):
    """`½ wᵀ C w + wᵀ b`, the undamped model's change of the loss."""
    w = np.asarray(coefficients, np.float64)
    n = len(w)
    return w @ curvature[:n, :n] @ w / 2 + w @ gradient_products[:n]


def combination(coefficients, *trees):
    """`Σ_i c_i tree_i`."""
    return jax.tree.map(
        lambda *leaves: sum(c * leaf for c, leaf in zip(coefficients, leaves)),
        *trees,
    )


def first_update_reference(problem, layers, state, grads, stats, damping, **settings):
    """`(Δ, α, model change)` of a first update (`δ = 0`)."""
    direction = ekfac_direction(
        layers, state.preconditioner, grads, stats, damping, **settings
    )
    curvature, inner, gradient_products = quadratic_model(
        problem_ggn(problem),
        grads,
        direction,
        state.velocity,  # zeros
    )
    alpha = -gradient_products[0] / (curvature[0, 0] + damping * inner[0, 0])
    return direction, alpha, predicted_change(curvature, gradient_products, [alpha])


def reference_ratio(problem, updates, change):
    """`ρ = (L(θ + u) - L(θ)) / model change`."""
    new_loss = mean_loss(problem, optax.apply_updates(problem.params, updates))
    return (new_loss - mean_loss(problem, problem.params)) / change


def assert_close(actual, expected, rtol=RTOL, atol=0.0):
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------------------
# Shared updates: a first one on a softmax MLP, and the inputs of a second one
# on another batch at the parameters it reached.
# ----------------------------------------------------------------------------

SETTINGS = dict(decay=0.8, eigen_update_every=3)
INITIAL_DAMPING = 0.5


@functools.cache
def make_ekfac(layers, **adaptation):
    """The adaptive `ekfac` of the shared updates (one per setting, so that
    tests with the same settings share its compiled update)."""
    return oek.ekfac(layers, initial_damping=INITIAL_DAMPING, **SETTINGS, **adaptation)


@pytest.fixture(scope="module")
def first():
    problem = softmax_problem()
    layers = layers_of(problem)
    tx = make_ekfac(layers)
    state = tx.init(problem.params)
    grads, stats = statistics(problem)
    updates, new_state = update(tx, grads, state, problem.params, stats)
    direction, alpha, change = first_update_reference(
        problem, layers, state, grads, stats, INITIAL_DAMPING, **SETTINGS
    )
    return SimpleNamespace(
        problem=problem,
        layers=layers,
        state=state,
        grads=grads,
        stats=stats,
        updates=updates,
        new_state=new_state,
        direction=direction,
        alpha=alpha,
        change=change,
    )


@pytest.fixture(scope="module")
def second(first):
    params = optax.apply_updates(first.problem.params, first.updates)
    problem = softmax_problem(seed=5, params=params)
    state = first.new_state
    grads, stats = statistics(problem)
    direction = ekfac_direction(
        first.layers, state.preconditioner, grads, stats, state.damping, **SETTINGS
    )
    return SimpleNamespace(
        problem=problem,
        state=state,
        damping=float(state.damping),
        grads=grads,
        stats=stats,
        direction=direction,
        ggn=problem_ggn(problem),
    )


def second_update(first, second, state=None, **adaptation):
    """The second update by `make_ekfac(**adaptation)`, from `state` (the
    state after the first update by default)."""
    state = second.state if state is None else state
    tx = make_ekfac(first.layers, **adaptation)
    return update(tx, second.grads, state, second.problem.params, second.stats)


def assert_update(updates, new_state, direction, velocity, coefficients, change):
    chex.assert_trees_all_close(
        updates, combination(coefficients, direction, velocity), rtol=RTOL
    )
    chex.assert_trees_all_close(new_state.velocity, updates)
    assert_close(new_state.learning_rate, coefficients[0])
    assert_close(new_state.momentum, coefficients[1], atol=1e-14)
    assert_close(new_state.model_change, change)


def assert_second_update(updates, new_state, second, velocity, coefficients):
    """`assert_update` of a second update with previous update `velocity`."""
    curvature, _, b = quadratic_model(
        second.ggn, second.grads, second.direction, velocity
    )
    assert_update(
        updates,
        new_state,
        second.direction,
        velocity,
        coefficients,
        predicted_change(curvature, b, coefficients),
    )


# ----------------------------------------------------------------------------
# 1. The loss model.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", LINEN_PROBLEMS)
def test_curvature_products_are_the_dense_gauss_newton_products(name):
    problem = LINEN_PROBLEMS[name]()
    _, stats = statistics(problem)
    vectors = [random_like(problem.params, seed) for seed in (1, 2)]
    stacked = np.stack([flat(v) for v in vectors])
    expected = stacked @ problem_ggn(problem) @ stacked.T
    products = curvature_products(stats.loss_model, vectors)
    assert products.shape == (2, 2)
    assert_close(products, expected)


class NnxMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.hidden = nnx.Linear(4, 5, **F64, rngs=rngs)
        self.head = nnx.Linear(5, 3, **F64, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.hidden(x)))


def test_curvature_products_of_an_nnx_model():
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: NnxMLP(nnx.Rngs(0))))
    model = nnx.merge(graphdef, drawn(abstract))
    x, labels = normal(70, (10, 4)), classes(71, (10,))

    def loss_fn(model, x, labels):
        return oek.softmax_cross_entropy(model(x), labels)

    curvature = oek.nnx.Curvature(loss_fn, fisher_type="empirical")
    _, grads, stats = curvature.value_grad_and_stats(model, x, labels)
    assert isinstance(grads, nnx.State)
    graphdef, params = nnx.split(model, nnx.Param)

    def predictions(params):
        return nnx.merge(graphdef, params)(x)

    vectors = [random_like(grads, seed) for seed in (1, 2)]
    assert all(isinstance(v, nnx.State) for v in vectors)
    stacked = np.stack([flat(v) for v in vectors])
    ggn = dense_ggn(predictions, cross_entropy_tail(labels), params)
    products = curvature_products(stats.loss_model, vectors)
    assert_close(products, stacked @ ggn @ stacked.T)


def test_loss_at_is_the_mean_loss_at_other_parameters():
    problem = masked_problem()
    _, stats = statistics(problem)
    other = jax.tree.map(
        lambda p, v: p + 0.3 * v, problem.params, random_like(problem.params, 3)
    )
    assert_close(stats.loss_model.loss, mean_loss(problem, problem.params))
    assert_close(stats.loss_model.loss_at(other), mean_loss(problem, other))
    assert not np.isclose(mean_loss(problem, other), mean_loss(problem, problem.params))


# ----------------------------------------------------------------------------
# 2-3. The step: α, β from the quadratic model.
# ----------------------------------------------------------------------------


def test_first_update_is_the_model_minimizing_multiple_of_the_ekfac_direction(
    first,
):
    assert isinstance(first.state, oek.EkfacState)
    assert 0 < first.alpha and first.change < 0
    assert_update(
        first.updates,
        first.new_state,
        first.direction,
        first.state.velocity,  # zeros
        [first.alpha, 0.0],
        first.change,
    )
    assert first.new_state.momentum == 0
    assert first.new_state.preconditioner.count == 1


def test_second_update_solves_the_damped_two_by_two_model(first, second):
    updates, new_state = second_update(first, second)
    curvature, inner, b = quadratic_model(
        second.ggn, second.grads, second.direction, second.state.velocity
    )
    coefficients = np.linalg.solve(curvature + second.damping * inner, -b)
    assert 0 < coefficients[1] < 0.99  # not clipped
    assert_second_update(
        updates, new_state, second, second.state.velocity, coefficients
    )


def test_momentum_above_max_momentum_is_clipped_and_the_step_size_solved_again(
    first, second
):
    max_momentum = 0.02
    updates, new_state = second_update(first, second, max_momentum=max_momentum)
    curvature, inner, b = quadratic_model(
        second.ggn, second.grads, second.direction, second.state.velocity
    )
    damped = curvature + second.damping * inner
    assert np.linalg.solve(damped, -b)[1] > max_momentum  # the clip matters
    coefficients = [-(b[0] + damped[0, 1] * max_momentum) / damped[0, 0], max_momentum]
    assert_second_update(
        updates, new_state, second, second.state.velocity, coefficients
    )


def test_negative_momentum_is_clipped_to_zero(first, second):
    """A previous update pointing uphill: the unclipped `β` is negative."""
    velocity = jax.tree.map(jnp.negative, second.state.velocity)
    state = second.state._replace(velocity=velocity)
    updates, new_state = second_update(first, second, state)
    curvature, inner, b = quadratic_model(
        second.ggn, second.grads, second.direction, velocity
    )
    damped = curvature + second.damping * inner
    assert np.linalg.solve(damped, -b)[1] < 0  # the clip matters
    coefficients = [-b[0] / damped[0, 0], 0.0]
    assert_second_update(updates, new_state, second, velocity, coefficients)


def test_fixed_momentum_solves_for_the_step_size_alone(first, second):
    updates, new_state = second_update(first, second, momentum=0.5)
    curvature, inner, b = quadratic_model(
        second.ggn, second.grads, second.direction, second.state.velocity
    )
    damped = curvature + second.damping * inner
    coefficients = [-(b[0] + damped[0, 1] * 0.5) / damped[0, 0], 0.5]
    assert_second_update(
        updates, new_state, second, second.state.velocity, coefficients
    )


def test_a_fixed_momentum_the_model_predicts_uphill_is_dropped(first, second):
    """A previous update pointing uphill and a fixed `β`: with `α` solved for
    alone, the damped model predicts an increase, a step no test could judge;
    the update is `α Δ` with `β = 0`, and the reduction ratio judges it."""
    velocity = jax.tree.map(lambda v: -3 * v, second.state.velocity)
    state = second.state._replace(velocity=velocity)
    updates, new_state = second_update(first, second, state, momentum=0.5)
    curvature, inner, b = quadratic_model(
        second.ggn, second.grads, second.direction, velocity
    )
    damped = curvature + second.damping * inner
    alpha = -(b[0] + damped[0, 1] * 0.5) / damped[0, 0]
    assert predicted_change(damped, b, [alpha, 0.5]) > 0  # uphill with momentum
    coefficients = [-b[0] / damped[0, 0], 0.0]
    assert_second_update(updates, new_state, second, velocity, coefficients)
    assert new_state.model_change < 0 and np.isfinite(new_state.reduction_ratio)


def test_fixed_momentum_is_zero_without_a_previous_update(first, second):
    """`δ = 0` (as at the first update): `β = 0` whatever `momentum` is."""
    zeros = optax.tree.zeros_like(second.state.velocity)
    state = second.state._replace(velocity=zeros)
    updates, new_state = second_update(first, second, state, momentum=0.5)
    curvature, inner, b = quadratic_model(
        second.ggn, second.grads, second.direction, zeros
    )
    coefficients = [-b[0] / (curvature[0, 0] + second.damping * inner[0, 0]), 0]
    assert_second_update(updates, new_state, second, zeros, coefficients)


# ----------------------------------------------------------------------------
# 4. Levenberg-Marquardt damping.
# ----------------------------------------------------------------------------


def test_first_update_adapts_the_damping_from_the_reduction_ratio(first):
    """The first update (count 0) is due; softmax MLP: ρ > 3/4, λ ← λ ω."""
    ratio = reference_ratio(first.problem, first.updates, first.change)
    assert ratio > 0.75
    assert_close(first.new_state.reduction_ratio, ratio, rtol=1e-6)
    omega = 0.9  # the defaults: damping_decay 0.9, every update
    assert_close(first.new_state.damping, INITIAL_DAMPING * omega)


@pytest.mark.parametrize(
    "make_problem, initial_damping, ratio_range, factor",
    [
        # Linear least squares: the quadratic model is exact, ρ = 1.
        (lambda: regression_problem(MLP((1,))), 1.0, (0.75, np.inf), 1),
        # A sine net at a tiny damping: on this batch the Gauss-Newton model
        # over-promises, ρ < 1/4 (checked below).
        (
            lambda: regression_problem(SineNet(), num_examples=8, seed=62),
            1e-4,
            (-np.inf, 0.25),
            -1,
        ),
    ],
    ids=["linear_least_squares", "sine_net"],
)
def test_damping_follows_the_reduction_ratio(
    make_problem, initial_damping, ratio_range, factor
):
    problem = make_problem()
    layers = layers_of(problem)
    interval, decay = 2, 0.8
    tx = oek.ekfac(
        layers,
        initial_damping=initial_damping,
        min_damping=1e-6,
        damping_decay=decay,
        damping_adaptation_interval=interval,
    )
    state = tx.init(problem.params)
    assert np.isnan(state.reduction_ratio)
    grads, stats = statistics(problem)
    updates, new_state = update(tx, grads, state, problem.params, stats)

    direction, alpha, change = first_update_reference(
        problem, layers, state, grads, stats, initial_damping
    )
    candidate = optax.tree.scale(alpha, direction)
    ratio = reference_ratio(problem, candidate, change)
    assert ratio_range[0] < ratio < ratio_range[1]
    assert_close(new_state.reduction_ratio, ratio, rtol=1e-6)
    if ratio > 0:
        assert_close(new_state.damping, initial_damping * (decay**interval) ** factor)
    else:
        assert_close(new_state.damping, initial_damping * 10)
    if ratio > 0.1:
        chex.assert_trees_all_close(updates, candidate, rtol=1e-6)
        assert_close(new_state.model_change, change)
        assert new_state.rejected_steps == 0
    else:
        # A trust-region test: a step whose loss fell by less than a tenth of
        # the predicted decrease is not taken.
        chex.assert_trees_all_equal(updates, optax.tree.zeros_like(updates))
        assert new_state.model_change == 0
        assert new_state.rejected_steps == 1


def with_ratio(problem, stats, updates, change, ratio):
    """The statistics with the loss at the parameters shifted so that an update
    `updates` predicted to change the loss by `change` has reduction ratio
    `ratio` (the update does not depend on that loss)."""
    new_loss = mean_loss(problem, optax.apply_updates(problem.params, updates))
    loss = jnp.asarray(new_loss - ratio * change)
    return stats._replace(loss_model=dataclasses.replace(stats.loss_model, loss=loss))


OMEGA = 0.7**3


@pytest.mark.parametrize(
    "ratio, multiplier",
    [
        (-3.0, 10),
        (0.0, 10),
        (0.05, 1 / OMEGA),
        (0.2, 1 / OMEGA),
        (0.3, 1),
        (0.5, 1),
        (0.7, 1),
        (0.8, OMEGA),
        (4.0, OMEGA),
    ],
)
def test_damping_rule_at_constructed_reduction_ratios(first, ratio, multiplier):
    """`λ ω` above 3/4, `λ / ω` below 1/4, `λ` between, `ω = decay**interval`;
    `10 λ` for a step that raised the loss (`ρ ≤ 0`, rejected)."""
    stats = with_ratio(first.problem, first.stats, first.updates, first.change, ratio)
    tx = make_ekfac(first.layers, damping_decay=0.7, damping_adaptation_interval=3)
    _, new_state = update(tx, first.grads, first.state, first.problem.params, stats)
    assert_close(new_state.reduction_ratio, ratio, rtol=1e-6)
    assert_close(new_state.damping, INITIAL_DAMPING * multiplier)


@pytest.mark.parametrize("ratio", [-0.5, 0.05, 0.15])
def test_a_step_whose_loss_fell_by_a_tenth_of_the_prediction_or_less_is_rejected(
    first, ratio
):
    """The trust-region test: `ρ ≤ 0.1` rejects the step (zero updates, zero
    velocity, a zero model change, one more rejected step; ten times the
    damping where the loss rose)."""
    stats = with_ratio(first.problem, first.stats, first.updates, first.change, ratio)
    tx = make_ekfac(first.layers)
    updates, new_state = update(
        tx, first.grads, first.state, first.problem.params, stats
    )
    rejected = ratio <= 0.1
    expected = optax.tree.zeros_like(updates) if rejected else first.updates
    chex.assert_trees_all_close(updates, expected, rtol=RTOL)
    chex.assert_trees_all_close(new_state.velocity, expected, rtol=RTOL)
    assert new_state.rejected_steps == int(rejected)
    assert (new_state.model_change == 0) == rejected
    assert_close(new_state.damping, INITIAL_DAMPING * (10 if ratio < 0 else 1 / 0.9))


@pytest.mark.parametrize(
    "previous_rejected, multiplier", [(False, 1 / 0.9), (True, 10)]
)
def test_a_second_rejection_in_a_row_grows_the_damping_tenfold(
    first, second, previous_rejected, multiplier
):
    """`0 < ρ ≤ 0.1` rejects with `λ / ω` after a taken step, `10 λ` after a
    rejected one."""
    tx = make_ekfac(first.layers)
    state = first.new_state
    if previous_rejected:
        stats = with_ratio(
            first.problem, first.stats, first.updates, first.change, 0.05
        )
        _, state = update(tx, first.grads, first.state, first.problem.params, stats)
        assert state.rejected_steps == 1
    updates, trial = update(
        tx, second.grads, state, second.problem.params, second.stats
    )
    stats = with_ratio(second.problem, second.stats, updates, trial.model_change, 0.05)
    _, new_state = update(tx, second.grads, state, second.problem.params, stats)
    assert_close(new_state.reduction_ratio, 0.05, rtol=1e-5)
    assert new_state.rejected_steps == state.rejected_steps + 1
    assert_close(new_state.damping, state.damping * multiplier, rtol=1e-6)


def previous_parameters_loss(first, second):
    """The second batch's mean loss at the parameters before the first step."""
    return mean_loss(second.problem, first.problem.params)


def test_fresh_batch_change_is_the_previous_steps_effect_on_this_batch(first, second):
    _, new_state = second_update(first, second)
    before = previous_parameters_loss(first, second)
    after = mean_loss(second.problem, second.problem.params)
    assert_close(
        new_state.fresh_batch_change, (after - before) / abs(before), rtol=1e-6
    )


@pytest.mark.parametrize("fresh_change, factor", [(0.2, -1), (0.05, 1)])
def test_damping_grows_when_the_previous_step_raised_a_fresh_batchs_loss(
    first, second, fresh_change, factor
):
    """A previous step that raised this (unseen) batch's loss by more than 10%
    grows the damping, even where this batch's own model is good (ρ > 3/4);
    below 10% the reduction ratio decides."""
    before = previous_parameters_loss(first, second)
    loss = jnp.asarray(before * (1 + fresh_change))
    stats = second.stats._replace(
        loss_model=dataclasses.replace(second.stats.loss_model, loss=loss)
    )
    tx = make_ekfac(first.layers)
    _, new_state = update(tx, second.grads, second.state, second.problem.params, stats)
    assert_close(new_state.fresh_batch_change, fresh_change, rtol=1e-6)
    assert new_state.reduction_ratio > 0.75
    assert_close(new_state.damping, second.damping * 0.9**factor, rtol=1e-6)


def test_a_nan_loss_after_the_step_rejects_it(first):
    """The loss model's loss is NaN away from the statistics' parameters (the
    curvature, taken there, is finite): `ρ` counts as -inf, the step is not
    taken and the damping grows tenfold."""
    model = first.stats.loss_model
    at = jax.tree.leaves(model.params)

    def losses_fn(params, batch):
        moved = jnp.any(
            jnp.stack([jnp.any(p != q) for p, q in zip(jax.tree.leaves(params), at)])
        )
        return model.losses_fn(params, batch) + jnp.where(moved, jnp.nan, 0.0)

    stats = first.stats._replace(
        loss_model=dataclasses.replace(model, losses_fn=losses_fn)
    )
    tx = make_ekfac(first.layers, damping_decay=0.7, damping_adaptation_interval=3)
    updates, new_state = update(
        tx, first.grads, first.state, first.problem.params, stats
    )
    chex.assert_trees_all_equal(updates, optax.tree.zeros_like(updates))
    chex.assert_trees_all_equal(new_state.velocity, optax.tree.zeros_like(updates))
    assert new_state.reduction_ratio == -np.inf
    assert new_state.rejected_steps == 1
    assert_close(new_state.damping, INITIAL_DAMPING * 10)


def fitted_float32_batch(case):
    """A float32 batch whose predicted change is below its loss's round-off:
    `"fitted"`, a cross-entropy of exactly 0 (logits 30 apart; the gradient
    is about 1e-13); `"offset"`, squared errors of 1e-12 under a constant
    loss of 1000 added to each term."""
    labels = jnp.array([0, 1, 2, 1])
    x = jax.nn.one_hot(labels, 3, dtype=jnp.float32)
    model = nn.Dense(3)
    if case == "fitted":
        kernel = 30 * jnp.eye(3, dtype=jnp.float32)

        def loss_fn(params, x, labels):
            return oek.softmax_cross_entropy(model.apply({"params": params}, x), labels)

    else:
        kernel = (1 + 1e-6) * jnp.eye(3, dtype=jnp.float32)

        def loss_fn(params, x, labels):
            outputs = model.apply({"params": params}, x)
            return oek.squared_error(outputs, x) + 1000.0

    return {"kernel": kernel, "bias": jnp.zeros(3, jnp.float32)}, loss_fn, (x, labels)


@pytest.mark.parametrize("case", ["fitted", "offset"])
def test_a_step_below_the_losss_round_off_is_taken_unjudged(case):
    """Where the batch's loss cannot show the predicted decrease (below 100
    eps of the loss, or a loss of exactly 0), `ρ` would be round-off over
    round-off (0 where the fitted batch's loss stays 0, which read as a
    step that raised the loss: rejected and the damping ten times larger):
    the step is taken, the ratio and the counts of rejected and skipped
    steps stay as they were, and the damping falls by `ω`."""
    params, loss_fn, batch = fitted_float32_batch(case)
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.ekfac(curvature.layers(params, *batch))
    loss, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, *batch)
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params, stats=stats)
    if case == "fitted":
        assert loss == 0 and 0 < np.max(np.abs(flat(grads))) < 1e-10
    else:
        assert -new_state.model_change <= 100 * np.finfo(np.float32).eps * loss
    assert_close(new_state.damping, state.damping * 0.9, rtol=1e-6)
    assert np.isnan(new_state.reduction_ratio)
    assert new_state.rejected_steps == 0
    assert new_state.preconditioner.skipped_steps == 0
    assert new_state.model_change < 0
    assert np.all(np.isfinite(flat(updates))) and np.any(flat(updates) != 0)
    chex.assert_trees_all_equal(updates, new_state.velocity)


def flat_tail_problem(seed=0, params=None, param_dtype=jnp.float64):
    """Softmax cross-entropy on its flat tail: the output kernel 10 times its
    drawn size and random labels, so that most examples are confidently
    wrong. The sampled Fisher sees about zero curvature there, so the
    direction is long, and the first update's quadratic model (initial
    damping 1e-3) promises a decrease six times the loss."""
    x, labels = normal(seed + 70, (16, 4)), classes(seed + 71, (16,))
    model = MLP(param_dtype=param_dtype)
    x = x.astype(param_dtype)
    if params is None:
        params = init_params(model, x)
        params["Dense_1"]["kernel"] = 10 * params["Dense_1"]["kernel"]
    return linen_problem(
        model, x, labels, oek.softmax_cross_entropy, cross_entropy_tail(labels), params
    )


def sampled_statistics(problem):
    """`(grads, stats)` with the Monte-Carlo Fisher (the key from the batch)."""
    curvature = oek.Curvature(problem.loss_fn, fisher_type="mc")
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(
        problem.params, *problem.batch
    )
    return grads, stats


def shrunk_to_the_loss(coefficients, curvature, gradient_products, loss):
    """`s w`, `s` the smallest positive root of `½ s² wᵀCw + s wᵀb = -L`."""
    w = np.asarray(coefficients, np.float64)
    roots = np.roots([w @ curvature @ w / 2, w @ gradient_products, loss])
    return min(r.real for r in roots if r.real > 0 and abs(r.imag) < 1e-12) * w


@pytest.fixture(scope="module")
def flat_tail():
    problem = flat_tail_problem()
    layers = layers_of(problem)
    tx = oek.ekfac(layers, initial_damping=1e-3)
    state = tx.init(problem.params)
    grads, stats = sampled_statistics(problem)
    updates, new_state = update(tx, grads, state, problem.params, stats)
    return SimpleNamespace(
        problem=problem,
        layers=layers,
        tx=tx,
        state=state,
        grads=grads,
        stats=stats,
        updates=updates,
        new_state=new_state,
    )


def test_a_first_step_promising_more_than_the_loss_is_shrunk_to_promise_it(
    flat_tail,
):
    """`α Δ` scaled by `s < 1` so that the undamped model predicts a change
    of exactly `-L`: the losses are non-negative, so a larger decrease can't
    happen (here the unshrunk model promises 22.7 on a loss of 3.5)."""
    tail = flat_tail
    direction, alpha, change = first_update_reference(
        tail.problem, tail.layers, tail.state, tail.grads, tail.stats, 1e-3
    )
    loss = mean_loss(tail.problem, tail.problem.params)
    assert -change > 5 * loss
    curvature, _, b = quadratic_model(
        problem_ggn(tail.problem), tail.grads, direction, tail.state.velocity
    )
    coefficients = shrunk_to_the_loss([alpha, 0.0], curvature, b, loss)
    assert 0 < coefficients[0] < alpha / 5
    assert tail.new_state.rejected_steps == 0
    assert_update(
        tail.updates,
        tail.new_state,
        direction,
        tail.state.velocity,  # zeros
        coefficients,
        -loss,
    )


def test_a_later_step_promising_more_than_the_loss_shrinks_alpha_and_beta(
    flat_tail,
):
    """The 2x2 solution `(α, β)` is scaled as a whole (both by one `s`)."""
    tail = flat_tail
    params = optax.apply_updates(tail.problem.params, tail.updates)
    problem = flat_tail_problem(seed=2, params=params)
    grads, stats = sampled_statistics(problem)
    damping = float(tail.new_state.damping)
    direction = ekfac_direction(
        tail.layers, tail.new_state.preconditioner, grads, stats, damping
    )
    velocity = tail.new_state.velocity
    curvature, inner, b = quadratic_model(
        problem_ggn(problem), grads, direction, velocity
    )
    solution = np.linalg.solve(curvature + damping * inner, -b)
    loss = mean_loss(problem, problem.params)
    assert 0 < solution[1] < 0.99  # no clipping in play
    assert -predicted_change(curvature, b, solution) > loss
    coefficients = shrunk_to_the_loss(solution, curvature, b, loss)
    updates, new_state = update(tail.tx, grads, tail.new_state, problem.params, stats)
    assert_update(updates, new_state, direction, velocity, coefficients, -loss)


def test_a_float32_step_promising_more_than_the_loss_is_shrunk_to_promise_it():
    """The jitted float32 update users run: its model predicts `-L`."""
    problem = flat_tail_problem(param_dtype=jnp.float32)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(problem.params))
    curvature = oek.Curvature(problem.loss_fn, fisher_type="mc")
    tx = oek.ekfac(curvature.layers(problem.params, *problem.batch))
    loss, grads, stats = jax.jit(curvature.value_grad_and_stats)(
        problem.params, *problem.batch
    )
    _, new_state = jax.jit(tx.update)(
        grads, tx.init(problem.params), problem.params, stats=stats
    )
    assert new_state.model_change.dtype == jnp.float32
    assert_close(new_state.model_change, -loss, rtol=1e-5)
    assert 0 < new_state.learning_rate < 0.02


@pytest.mark.parametrize("ratio", [0.9, 0.1])
def test_adapted_damping_stays_within_its_range(first, ratio):
    """`min_damping = max_damping`: clipped back whichever way it moves."""
    stats = with_ratio(first.problem, first.stats, first.updates, first.change, ratio)
    tx = make_ekfac(
        first.layers, min_damping=INITIAL_DAMPING, max_damping=INITIAL_DAMPING
    )
    _, new_state = update(tx, first.grads, first.state, first.problem.params, stats)
    assert_close(new_state.reduction_ratio, ratio, rtol=1e-6)
    assert new_state.damping == INITIAL_DAMPING


@pytest.mark.parametrize("interval, adapted", [(5, False), (1, True)])
def test_damping_adapts_only_every_interval_updates(first, second, interval, adapted):
    """The second update (count 1) is due with interval 1, not with 5."""
    curvature, inner, b = quadratic_model(
        second.ggn, second.grads, second.direction, second.state.velocity
    )
    coefficients = np.linalg.solve(curvature + second.damping * inner, -b)
    stats = with_ratio(
        second.problem,
        second.stats,
        combination(coefficients, second.direction, second.state.velocity),
        predicted_change(curvature, b, coefficients),
        0.2,
    )
    tx = make_ekfac(
        first.layers, damping_decay=0.5, damping_adaptation_interval=interval
    )
    _, new_state = update(tx, second.grads, second.state, second.problem.params, stats)
    assert new_state.preconditioner.count == 2
    if adapted:
        assert_close(new_state.reduction_ratio, 0.2, rtol=1e-6)
        assert_close(new_state.damping, second.damping / 0.5)
    else:
        assert new_state.reduction_ratio == second.state.reduction_ratio
        assert new_state.damping == second.damping


def test_fixed_damping_is_not_adapted(first):
    tx = oek.ekfac(
        first.layers, damping=INITIAL_DAMPING, damping_adaptation_interval=1, **SETTINGS
    )
    state = tx.init(first.problem.params)
    updates, new_state = update(
        tx, first.grads, state, first.problem.params, first.stats
    )
    assert new_state.damping == INITIAL_DAMPING
    # The ratio is still measured: it decides whether the step is taken.
    assert new_state.reduction_ratio > 0.75
    chex.assert_trees_all_close(updates, first.updates, rtol=RTOL)


# ----------------------------------------------------------------------------
# 5. Non-finite steps.
# ----------------------------------------------------------------------------


def with_nan(tree):
    """`tree` with its first leaf's first entry NaN."""
    leaves, treedef = jax.tree.flatten(tree)
    leaves[0] = leaves[0].at[(0,) * leaves[0].ndim].set(jnp.nan)
    return jax.tree.unflatten(treedef, leaves)


def nan_grads(grads, stats):
    return with_nan(grads), stats


def nan_statistics(grads, stats):
    return grads, stats._replace(layers=with_nan(stats.layers))


def nan_loss_model(grads, stats):
    """Finite gradients, statistics and loss, a NaN quadratic model."""
    model = stats.loss_model
    return grads, stats._replace(
        loss_model=dataclasses.replace(model, params=with_nan(model.params))
    )


def nan_loss(grads, stats):
    """Finite gradients, statistics and quadratic model, a NaN batch loss (a
    loss term that is NaN without a gradient): the cap on the predicted
    decrease and the trust-region test can't judge the step."""
    model = stats.loss_model
    return grads, stats._replace(
        loss_model=dataclasses.replace(model, loss=jnp.full_like(model.loss, jnp.nan))
    )


@pytest.mark.parametrize(
    "corrupt", [nan_grads, nan_statistics, nan_loss_model, nan_loss]
)
def test_non_finite_step_moves_nothing_and_only_counts_itself(first, second, corrupt):
    grads, stats = corrupt(second.grads, second.stats)
    # Due at every update (the settings of the interval test: one compilation).
    tx = make_ekfac(first.layers, damping_decay=0.5, damping_adaptation_interval=1)
    updates, new_state = update(tx, grads, second.state, second.problem.params, stats)

    chex.assert_trees_all_equal(updates, optax.tree.zeros_like(second.problem.params))
    state = second.state
    if corrupt is nan_loss_model:
        # Only the quadratic model is non-finite: the step control's state is
        # kept, and the curvature estimate takes the batch's finite
        # statistics, as the same step with a finite model does.
        _, taken = update(
            tx, second.grads, second.state, second.problem.params, second.stats
        )
        state = state._replace(preconditioner=taken.preconditioner)
        counted = second.state.preconditioner.count
        assert int(taken.preconditioner.count) == int(counted) + 1
    skipped = state.preconditioner.skipped_steps
    assert new_state.preconditioner.skipped_steps == skipped + 1
    rest = new_state._replace(
        preconditioner=new_state.preconditioner._replace(skipped_steps=skipped)
    )
    chex.assert_trees_all_equal(rest, state)


# ----------------------------------------------------------------------------
# 6. Errors (raised while tracing: nothing is compiled).
# ----------------------------------------------------------------------------


def test_statistics_without_a_loss_model_are_refused(first):
    tx = make_ekfac(first.layers)
    stats = first.stats._replace(loss_model=None)
    with pytest.raises(ValueError, match=r"^ekfac: .*loss_model"):
        jax.eval_shape(lambda: tx.update(first.grads, first.state, None, stats=stats))


def test_a_loss_without_the_loss_helpers_is_refused():
    model = MLP()
    x, targets = normal(80, (16, 4)), normal(81, (16, 3))
    params = init_params(model, x)

    def loss_fn(params, x, targets):
        return jnp.sum((model.apply({"params": params}, x) - targets) ** 2, -1)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.ekfac(curvature.layers(params, x, targets))

    def adaptive_step():
        _, grads, stats = curvature.value_grad_and_stats(params, x, targets)
        return tx.update(grads, tx.init(params), params, stats=stats)

    with pytest.raises(ValueError, match=r"^ekfac: .*loss helpers.*squared_error"):
        jax.eval_shape(adaptive_step)


@pytest.mark.parametrize(
    "settings, name",
    [
        (dict(initial_damping=-1.0), "initial_damping"),
        (dict(max_momentum=1.0), "max_momentum"),
        (dict(damping_adaptation_interval=0), "damping_adaptation_interval"),
        (dict(initial_damping=1e5), "initial_damping"),
        (dict(initial_damping=1e-3, min_damping=1e-2), "initial_damping"),
        (dict(damping_decay=1.0), "damping_decay"),
        (dict(momentum=1.0), "momentum"),
    ],
)
def test_bad_settings_are_refused_by_name(first, settings, name):
    with pytest.raises(ValueError, match=rf"^ekfac: {name} must"):
        oek.ekfac(first.layers, **settings)


# ----------------------------------------------------------------------------
# 7. Jitted float32 training.
# ----------------------------------------------------------------------------


def float32_training(num_examples, num_steps=30):
    """`num_steps` jitted `ekfac(layers)` steps; the losses, the final state
    and how many times the step was traced."""
    model = nn.Sequential([nn.Dense(16), jnp.tanh, nn.Dense(3)])
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((num_examples, 5)), jnp.float32)
    teacher = jnp.asarray(rng.standard_normal((5, 3)), jnp.float32)
    labels = jnp.argmax(x @ teacher, axis=-1).astype(jnp.int32)
    params = init_params(model, x)
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))

    def loss_fn(params, x, labels):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), labels)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.ekfac(curvature.layers(params, x, labels))
    traces = []

    @jax.jit
    def train_step(params, state):
        traces.append(1)
        loss, grads, stats = curvature.value_grad_and_stats(params, x, labels)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, loss

    state = tx.init(params)
    losses = []
    for _ in range(num_steps):
        params, state, loss = train_step(params, state)
        losses.append(float(loss))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    return np.array(losses), state, len(traces)


def test_jitted_float32_training_reduces_the_loss():
    losses, state, traces = float32_training(num_examples=64)
    assert traces == 1
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.5 * losses[0]
    for value in (state.damping, state.learning_rate, state.momentum):
        assert value.shape == () and value.dtype == jnp.float32
        assert np.isfinite(value)
    assert state.preconditioner.count == 30
    assert state.preconditioner.skipped_steps == 0


def test_jitted_float32_training_on_one_example_stays_finite():
    losses, state, traces = float32_training(num_examples=1)
    assert traces == 1
    assert np.all(np.isfinite(losses))
    for value in (state.damping, state.learning_rate, state.momentum):
        assert value.shape == () and np.isfinite(value)
    assert state.preconditioner.count + state.preconditioner.skipped_steps == 30


def fresh_batch_training(num_steps, dtype=jnp.float32, input_scale=1.0, **settings):
    """`num_steps` `ekfac(layers, **settings)` steps of `float32_training`'s
    MLP, each on a new batch of 64 (one jitted scan); what the state logged
    after each step, stacked."""
    model = nn.Sequential(
        [nn.Dense(16, param_dtype=dtype), jnp.tanh, nn.Dense(3, param_dtype=dtype)]
    )
    rng = np.random.default_rng(1)
    x = input_scale * rng.standard_normal((num_steps, 64, 5))
    labels = jnp.argmax(x @ rng.standard_normal((5, 3)), axis=-1).astype(jnp.int32)
    x = jnp.asarray(x, dtype)
    params = init_params(model, x[0])

    def loss_fn(params, x, labels):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), labels)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.ekfac(curvature.layers(params, x[0], labels[0]), **settings)

    def train_step(carry, batch):
        params, state = carry
        _, grads, stats = curvature.value_grad_and_stats(params, *batch)
        updates, state = tx.update(grads, state, params, stats=stats)
        logged = state._replace(preconditioner=None, velocity=None)
        return (optax.apply_updates(params, updates), state), logged

    run = jax.jit(
        lambda params: jax.lax.scan(train_step, (params, tx.init(params)), (x, labels))
    )
    return run(params)[1]


def test_a_large_damping_comes_down_through_steps_too_small_to_judge():
    """float32 at `initial_damping=1e4`, inputs of scale 0.1: every step's
    predicted decrease is below the loss's round-off, so no `ρ` judges it;
    the damping falls by `ω` at each, as in float64, where the same steps
    are judged (`ρ ≈ 1 > 3/4`)."""
    steps, settings = 5, dict(input_scale=0.1, initial_damping=1e4)
    float32 = fresh_batch_training(steps, **settings)
    float64 = fresh_batch_training(steps, jnp.float64, **settings)
    assert np.all(np.isnan(float32.reduction_ratio))
    assert np.all(float64.reduction_ratio > 0.75)
    expected = 1e4 * 0.9 ** np.arange(1, steps + 1)
    assert_close(float32.damping, expected, rtol=1e-5)
    assert_close(float64.damping, expected)
    assert np.all(float32.model_change < 0) and np.all(float32.rejected_steps == 0)


def test_a_fixed_momentum_takes_no_step_the_model_predicts_uphill():
    """float32, `momentum=0.9` over 40 fresh batches: where the momentum's
    step is predicted uphill, the update goes without it."""
    logged = fresh_batch_training(40, momentum=0.9)
    assert np.all(logged.model_change <= 0)
    assert np.any(logged.momentum == 0.9) and np.all(logged.rejected_steps < 40)


def test_a_zero_gradient_is_a_zero_step_with_the_statistics_updated():
    """An exactly zero gradient (zero weights and targets): `α = 0`, not
    `0 / 0`; nothing is skipped, and the statistics update the factors."""
    x = jnp.asarray(np.random.default_rng(3).standard_normal((8, 3)), jnp.float32)
    targets = jnp.zeros((8, 2), jnp.float32)
    params = {
        "kernel": jnp.zeros((3, 2), jnp.float32),
        "bias": jnp.zeros(2, jnp.float32),
    }
    model = nn.Dense(2)

    def loss_fn(params, x, targets):
        return oek.squared_error(model.apply({"params": params}, x), targets)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.ekfac(curvature.layers(params, x, targets), momentum=0.9)
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, x, targets)
    assert not np.any(flat(grads))
    state = tx.init(params)
    updates, new_state = jax.jit(tx.update)(grads, state, params, stats=stats)
    assert not np.any(flat(updates))
    assert new_state.preconditioner.count == 1
    assert new_state.preconditioner.skipped_steps == 0
    assert new_state.learning_rate == 0 and new_state.model_change == 0
    rows = np.concatenate([np.asarray(x), np.ones((8, 1))], axis=1)
    assert_close(
        new_state.preconditioner.blocks["(root)"].input_factor,
        rows.T @ rows / 8,
        rtol=1e-5,
        atol=1e-6,
    )


# ----------------------------------------------------------------------------
# 8. The fixed path under inject_hyperparams.
# ----------------------------------------------------------------------------


def test_inject_hyperparams_on_the_fixed_learning_rate_path(first):
    tx = optax.inject_hyperparams(oek.ekfac)(
        first.layers, learning_rate=0.1, damping=1e-3
    )
    state = tx.init(first.problem.params)
    updates, state = update(tx, first.grads, state, first.problem.params, first.stats)
    assert state.hyperparams["learning_rate"] == 0.1
    chex.assert_trees_all_equal_shapes(updates, first.problem.params)
    assert np.all(np.isfinite(flat(updates))) and np.any(flat(updates) != 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_updates_and_velocity_keep_the_parameters_dtype(dtype):
    """The adapted coefficients are float32; the update is not promoted by
    them, so the next step's directions fit the parameters' tangents."""
    model = nn.Sequential(
        [nn.Dense(8, param_dtype=dtype, dtype=dtype), nn.tanh, nn.Dense(3, dtype=dtype)]
    )
    x = jax.random.normal(jax.random.key(0), (16, 4)).astype(dtype)
    y = jnp.arange(16) % 3
    params = model.init(jax.random.key(1), x[:1])["params"]
    params = jax.tree.map(lambda leaf: leaf.astype(dtype), params)

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    tx = oek.ekfac(curvature.layers(params, x, y))

    @jax.jit
    def step(params, state):
        _, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, updates

    state = tx.init(params)
    for _ in range(3):
        params, state, updates = step(params, state)
    for tree in (updates, state.velocity, params):
        assert {leaf.dtype for leaf in jax.tree.leaves(tree)} == {jnp.dtype(dtype)}
    assert int(state.preconditioner.count) == 3
