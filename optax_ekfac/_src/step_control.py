"""Step control: the adaptive `ekfac`'s step size, momentum and damping.

Every update (Martens & Grosse, 2015, sections 6.5 and 7; as kfac-jax does):

    Δ = -P_λ g                       the EKFAC direction at the damping λ
    δ = the previous update          (zero at the first)
    u = α Δ + β δ, with (α, β) minimizing the quadratic model
        M(u) = gᵀu + ½ uᵀ (G + λ I) u
    G the exact Gauss-Newton matrix of the batch's mean loss (its products
    from the statistics' `LossModel`): a 2x2 solve. β is kept in
    [0, max_momentum] (α solved again for a clipped β). Where the model
    then predicts a decrease larger than the batch's loss `L`, which the
    library's non-negative losses cannot make, `(α, β)` are scaled down
    until it predicts `L` (`_within_loss`).

Every `damping_adaptation_interval` updates (by default every one) the
damping follows the Levenberg-Marquardt rule, from the reduction ratio of the
same batch's loss against the undamped model,

    ρ = (L(θ + u) - L(θ)) / (gᵀu + ½ uᵀ G u),

    λ ← λ ω if ρ > 3/4,   λ / ω if ρ < 1/4,   ω = damping_decay ** interval,

clipped to `[min_damping, max_damping]`. Two safeguards, measured to be
needed (see the step-control note):

* a step with `ρ ≤ 0.1` (the batch's loss fell by less than a tenth of the
  predicted decrease, rose, or is NaN) is rejected: zero updates, the
  momentum restarted; where the loss rose (`ρ ≤ 0`), or where the previous
  step was rejected too, the damping grows tenfold;
* the previous step is judged on this batch, which it has not seen: if it
  raised this batch's loss by more than 10% (`L(θ) > 1.1 L(θ - δ)`), the
  damping grows as for `ρ < 1/4`. A model fitted to one batch can be accurate
  on it (`ρ ≈ 1`) and wrong for the data: with a batch of one example, the
  step fits that example.

A step whose predicted decrease the loss cannot show (below `100 eps |L|`,
`eps` that of the dtype the loss was computed in, bfloat16's for a bfloat16
model; or a loss of exactly 0: a batch already fitted) is taken without
either test, its `ρ` would be round-off; the damping falls by `ω`, since a
damping much larger than the curvature makes every step that small. With a
fixed momentum, a step the model predicts uphill takes `β = 0` instead.

Whatever the parameters' dtype, the model, its curvature products and inner
products, `(α, β)`, the losses `ρ` compares and the damping are float32 at
least (the loss helpers take a bfloat16 model's predictions promoted, see
`LossModel.loss_at`); the update and the velocity are in the parameters'
dtypes.

The step costs the preconditioner, one linearization of the model's outputs
with two tangents, two products with the loss's Hessian at the outputs and,
on adaptation steps, two forward passes (at `θ + u` and `θ - δ`); a loss
narrower than float32 one more forward pass (at `θ`, in float32).
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ekfac._src import partial, validation
from optax_ekfac._src.loss_model import LossModel
from optax_ekfac._src.options import Adaptation
from optax_ekfac._src.state import ScaleByEkfacState
from optax_ekfac._src.statistics import Statistics
from optax_ekfac._src.weight_decay import decay_terms

_LOWER_RATIO, _UPPER_RATIO = 0.25, 0.75
# A step is taken only if the batch's loss fell by at least this fraction of
# the predicted decrease (a trust-region test): with a batch of one example,
# accepting every step that lowered the loss at all (ρ > 0) let steps whose
# model was off by 10^3-10^6 through, and training blew up.
_MIN_ACCEPTED_RATIO = 0.1
# A step that raised the batch's loss (ρ ≤ 0, rejected), or a second rejected
# step in a row, multiplies the damping by this rather than by 1/ω: its model
# was far off, and a batch that keeps producing such steps has to get one
# accepted before the other batches have lowered the damping again (on the MLP
# benchmark, an outlier example on softmax's flat tail, a large loss and a
# Gauss-Newton curvature of about zero, drew such steps from every batch
# holding it while the others lowered λ by ω, and 1/ω let training stall). A
# single step that lowered the loss by too little (0 < ρ ≤ 0.1) keeps 1/ω:
# tenfold there slowed the CNN benchmark after one such first step.
_REJECTION_DAMPING_GROWTH = 10.0
# Two forward passes (the statistics' and the ratio's) round the same loss
# differently by a few eps · |L|: a predicted change below this many eps · |L|
# is not judged (see `_resolvable`).
_RESOLUTION = 100.0
# The previous step may raise a fresh batch's loss by this fraction before
# the damping grows: beyond it, the step fitted its own batch and hurt the
# data (batch 1); below it, batch-to-batch noise (0.01 slowed batch-256 runs
# late in training; 0.1 does not).
_FRESH_BATCH_TOLERANCE = 0.1


class EkfacState(NamedTuple):
    """State of the adaptive `ekfac`: the preconditioner's, and what the step
    control adapted (log these to see what the optimizer does).

    Attributes:
        preconditioner: the `ScaleByEkfacState` (its `count` and
            `skipped_steps` count the updates).
        velocity: the previous update `δ` (zeros before the first).
        damping: `λ`, used by the preconditioner and the quadratic model at
            the next update.
        learning_rate: `α` of the last update.
        momentum: `β` of the last update.
        reduction_ratio: `ρ` at the last damping adaptation (NaN before it).
        model_change: the quadratic model's predicted change of the loss for
            the last update (negative: a decrease; 0 if it was rejected).
        fresh_batch_change: the relative change of the batch's loss that the
            previous update made, measured at the last adaptation on a batch
            that update had not seen (`(L(θ) - L(θ - δ)) / |L(θ - δ)|`); above
            0.1 the damping grows.
        rejected_steps: updates not taken (zeros returned) because the
            batch's loss at the new parameters fell by less than a tenth of
            the predicted decrease (or rose, or is NaN).
    """

    preconditioner: ScaleByEkfacState
    velocity: optax.Updates
    damping: jax.Array
    learning_rate: jax.Array
    momentum: jax.Array
    reduction_ratio: jax.Array
    model_change: jax.Array
    fresh_batch_change: jax.Array
    rejected_steps: jax.Array


def adaptive(
    make_preconditioner: Callable[[Any], optax.GradientTransformationExtraArgs],
    adaptation: Adaptation,
) -> optax.GradientTransformationExtraArgs:
    """The EKFAC direction with quadratic-model step size and momentum and
    Levenberg-Marquardt damping.

    Args:
        make_preconditioner: `make_preconditioner(damping)` ->
            `scale_by_ekfac(layers, damping=damping, ...)`; called with the
            adapted damping, a traced scalar, at every update.
        adaptation: the settings.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose update takes
        `stats=` and whose state is an `EkfacState`.
    """
    fixed_damping = adaptation.damping is not None
    initial_damping = (
        adaptation.damping if fixed_damping else adaptation.initial_damping
    )

    def init_fn(params: optax.Params) -> EkfacState:
        preconditioner = make_preconditioner(initial_damping).init(params)
        dtype = preconditioner_dtype(preconditioner)
        nan = jnp.full([], jnp.nan, dtype)
        return EkfacState(
            preconditioner=preconditioner,
            velocity=optax.tree.zeros_like(params),
            damping=jnp.asarray(initial_damping, dtype),
            learning_rate=jnp.zeros([], dtype),
            momentum=jnp.zeros([], dtype),
            reduction_ratio=nan,
            model_change=jnp.zeros([], dtype),
            fresh_batch_change=jnp.zeros([], dtype),
            rejected_steps=jnp.zeros([], jnp.int32),
        )

    def update_fn(
        updates: optax.Updates,
        state: EkfacState,
        params: optax.Params | None = None,
        *,
        stats: Statistics | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, EkfacState]:
        del extra_args
        decay = decay_terms(
            params, adaptation.weight_decay, adaptation.mask, validation.EKFAC
        )
        # A fixed damping is read from the settings at every update, so that
        # one changed under `optax.inject_hyperparams` takes effect.
        current_damping = (
            jnp.asarray(adaptation.damping, state.damping.dtype)
            if fixed_damping
            else state.damping
        )
        directions, preconditioner = make_preconditioner(current_damping).update(
            updates, state.preconditioner, None, stats=stats
        )
        # Under optax.multi_transform / optax.masked: the parameters it moves.
        model = partial.restricted_loss_model(_checked_loss_model(stats), updates)
        skipped = preconditioner.skipped_steps != state.preconditioner.skipped_steps
        descent = optax.tree.scale(-1, directions)
        vectors = (descent, state.velocity)
        curvature = model.curvature_products(vectors)
        # The batch's loss in float32 at least (`_judged_loss`), and the
        # precision it was computed in (the round-off rule's).
        loss, loss_eps = _judged_loss(model)
        products = _gram_matrix((updates, *vectors))
        inner_products, gradient_products = products[1:, 1:], products[0, 1:]
        coefficients = _coefficients(
            curvature + current_damping * inner_products,
            gradient_products,
            adaptation,
        )
        coefficients = _within_loss(coefficients, curvature, gradient_products, loss)
        # In the parameters' dtypes (the velocity's): the coefficients, in the
        # curvature state's float32 at least, would promote a bfloat16 update
        # (or a float32 one under float64 inputs), and the next step's
        # directions would no longer fit the parameters' tangents.
        step = optax.tree.cast_like(
            optax.tree.add(
                optax.tree.scale(coefficients[0], descent),
                optax.tree.scale(coefficients[1], state.velocity),
            ),
            state.velocity,
        )
        quadratic, linear = _model_terms(coefficients, curvature, gradient_products)
        model_change = quadratic / 2 + linear
        # A non-finite batch loss (a NaN term whose gradients are finite)
        # would turn off the cap and the trust-region test: skipped too.
        finite = (
            jnp.logical_not(skipped) & jnp.isfinite(model_change) & jnp.isfinite(loss)
        )
        count = state.preconditioner.count
        adapting = finite & (count % adaptation.damping_adaptation_interval == 0)
        due = adapting & _resolvable(model_change, loss, loss_eps)
        ratio, fresh_change = _ratios(model, loss, step, state, model_change, due)
        # The trust-region test: a step whose batch loss fell by a tenth of the
        # predicted decrease or less (or rose, or is NaN) is not taken.
        rejected = due & jnp.logical_not(ratio > _MIN_ACCEPTED_RATIO)
        damping = current_damping
        if not fixed_damping:
            overfitted = jnp.logical_not(fresh_change <= _FRESH_BATCH_TOLERANCE)
            # The previous update was rejected (its model change is zeroed).
            rejected_before = (state.model_change == 0) & (count > 0)
            damping = _levenberg_marquardt(
                damping,
                ratio,
                overfitted,
                due,
                adapting & jnp.logical_not(due),
                rejected_before,
                adaptation,
            )
        step = optax.tree.where(rejected, optax.tree.zeros_like(step), step)
        new_state = EkfacState(
            preconditioner=preconditioner,
            velocity=step,
            damping=damping,
            learning_rate=coefficients[0],
            momentum=coefficients[1],
            reduction_ratio=jnp.where(due, ratio, state.reduction_ratio),
            model_change=jnp.where(rejected, 0, model_change),
            fresh_batch_change=jnp.where(due, fresh_change, state.fresh_batch_change),
            rejected_steps=state.rejected_steps + rejected.astype(jnp.int32),
        )
        # A skipped step moves nothing and keeps the step control's state.
        # The preconditioner decided for its own state (it skips non-finite
        # gradients, statistics or loss), so no select copies its arrays:
        # past that check only the quadratic model can be non-finite, and
        # then the batch's finite statistics are kept. Either way the step
        # counts as skipped once.
        new_state = optax.tree.where(
            finite, new_state, state._replace(preconditioner=preconditioner)
        )
        new_state = new_state._replace(
            preconditioner=preconditioner._replace(
                skipped_steps=jnp.where(
                    finite | skipped,
                    preconditioner.skipped_steps,
                    optax.safe_increment(preconditioner.skipped_steps),
                )
            )
        )
        step = optax.tree.where(finite, step, optax.tree.zeros_like(step))
        if decay is None:
            return step, new_state
        # Decoupled weight decay at the step's own rate: `α` multiplies the
        # EKFAC direction as a learning rate multiplies Adam's, so the update
        # is `u - α weight_decay θ`, as AdamW's `-η (m̂ / √v̂ + weight_decay θ)`.
        # None on a step not taken; never a negative rate, which would grow
        # the weights. Outside the quadratic model and the velocity.
        taken = finite & jnp.logical_not(rejected)
        rate = jnp.where(taken, jnp.maximum(coefficients[0], 0), 0)
        update = optax.tree.add(step, optax.tree.scale(-rate, decay))
        return optax.tree.cast_like(update, step), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def preconditioner_dtype(state: ScaleByEkfacState) -> Any:
    """The dtype the step control computes in: the curvature state's."""
    leaves = jax.tree.leaves(state.blocks)
    return leaves[0].dtype if leaves else jnp.float32


def _checked_loss_model(stats: Any) -> LossModel:
    """The statistics' `LossModel` (the preconditioner checked the rest)."""
    if stats.loss_model is None:
        raise validation.error(
            "ekfac",
            "the adaptive step (no learning_rate) needs the statistics' "
            "loss_model, which Curvature.value_grad_and_stats provides; these "
            "statistics have none. Pass the statistics of value_grad_and_stats, "
            "or use ekfac_sgd (a fixed learning rate).",
        )
    return stats.loss_model


def _inner_products(left: tuple, right: tuple) -> jax.Array:
    """`[len(left), len(right)]` matrix of `<l_i, r_j>` over all leaves, in
    float32 at least (bfloat16 leaves' products are not rounded to it)."""
    left, right = _widened(left), _widened(right)
    return jnp.stack([jnp.stack([optax.tree.vdot(a, b) for b in right]) for a in left])


def _widened(tree: Any) -> Any:
    """`tree`'s leaves promoted to float32 at least."""
    return jax.tree.map(
        lambda leaf: leaf.astype(jnp.promote_types(leaf.dtype, jnp.float32)), tree
    )


def _gram_matrix(vectors: tuple) -> jax.Array:
    """`[k, k]` matrix of `<v_i, v_j>` over all leaves of `k` trees.

    On one device: one matmul of the trees flattened into the rows of a
    `[k, P]` matrix (float32 at least, `Precision.HIGHEST`); a `vdot` per
    leaf and pair would compile a reduction kernel each. Under a mesh
    (`jax.set_mesh`): the `vdot`s, which JAX shards as the leaves are. In
    float32 at least either way: bfloat16 leaves' products are not rounded
    to bfloat16.
    """
    leaves = [jax.tree.leaves(vector) for vector in vectors]
    if not (jax.sharding.get_abstract_mesh().empty and leaves[0]):
        return _inner_products(vectors, vectors)
    dtype = jnp.result_type(*(leaf for tree in leaves for leaf in tree))
    wide = jnp.promote_types(dtype, jnp.float32)
    rows = jnp.stack(
        [
            jnp.concatenate([jnp.ravel(leaf).astype(wide) for leaf in tree])
            for tree in leaves
        ]
    )
    return jnp.matmul(rows, rows.T, precision=jax.lax.Precision.HIGHEST)


def _coefficients(
    damped_curvature: jax.Array, gradient_products: jax.Array, adaptation: Adaptation
) -> jax.Array:
    """`(α, β)` minimizing `½ wᵀ C w + wᵀ b`, `C` the damped curvature of
    `(Δ, δ)`, `b` their products with the gradient.

    With no previous update (`δ = 0`) or a fixed momentum, `α` alone; an
    adapted `β` outside `[0, max_momentum]` is clipped and `α` solved again.
    A fixed `β` whose step the model predicts uphill (`δ` raises this
    batch's loss more than `α Δ` can lower it) is replaced by 0: that step
    could not be judged. A zero gradient (`Δ = 0`) gives `α = 0`.
    """
    c = damped_curvature
    b = gradient_products

    def alpha_given(beta):
        # `c[0, 0] = 0` only where `Δ = 0`: then there is nothing to scale.
        solvable = c[0, 0] > 0
        return jnp.where(
            solvable, -(b[0] + c[0, 1] * beta) / jnp.where(solvable, c[0, 0], 1), 0
        )

    if adaptation.momentum is not None:
        beta = jnp.asarray(adaptation.momentum, c.dtype)
        beta = jnp.where(c[1, 1] > 0, beta, 0)
        with_momentum = jnp.stack([alpha_given(beta), beta])
        quadratic, linear = _model_terms(with_momentum, c, b)
        downhill = quadratic / 2 + linear < 0
        without = jnp.stack([alpha_given(jnp.zeros_like(beta)), jnp.zeros_like(beta)])
        return jnp.where(downhill, with_momentum, without)
    determinant = c[0, 0] * c[1, 1] - c[0, 1] ** 2
    solvable = determinant > 1e-6 * c[0, 0] * c[1, 1]
    safe = jnp.where(solvable, determinant, 1)
    beta = jnp.where(solvable, (c[0, 1] * b[0] - c[0, 0] * b[1]) / safe, 0)
    beta = jnp.clip(beta, 0, adaptation.max_momentum)
    return jnp.stack([alpha_given(beta), beta])


def _model_terms(
    coefficients: jax.Array, curvature: jax.Array, gradient_products: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`(wᵀ C w, wᵀ b)`: the undamped model predicts the change
    `½ wᵀ C w + wᵀ b` of the loss for the update with coefficients `w`."""
    # Sums rather than `@`: exact float32 whatever the default matmul
    # precision (TF32 on GPUs, bfloat16 on TPUs).
    quadratic = jnp.sum(jnp.outer(coefficients, coefficients) * curvature)
    return quadratic, jnp.sum(coefficients * gradient_products)


def _within_loss(
    coefficients: jax.Array,
    curvature: jax.Array,
    gradient_products: jax.Array,
    loss: jax.Array,
) -> jax.Array:
    """`(α, β)` shrunk, where needed, so that the model's predicted decrease
    (undamped, as `ρ` judges it) is at most the batch's loss `L`.

    The library's losses are non-negative, so no step can lower their mean by
    more than `L`; a model that predicts more has left the region where it
    holds. It happens with softmax or sigmoid cross-entropy on examples far
    out on the flat tail (a large loss, a Gauss-Newton curvature of about
    zero) and with a batch of one example, whose steps the model says would
    fit it and more. Along the ray `s (α, β)` the predicted change is the
    parabola `½ s² q + s p` (`q ≥ 0`); where it is below `-L` at `s = 1` it
    crosses `-L` first at some `s < 1`, `s = 2 L / (-p + √(p² - 2 q L))`
    (the smaller root, written without cancellation), and the step is scaled
    by that. Where `L ≤ 0` (a loss that is not the helpers') nothing is
    shrunk.
    """
    quadratic, linear = _model_terms(coefficients, curvature, gradient_products)
    limit = loss.astype(coefficients.dtype)
    exceeds = (limit > 0) & (quadratic / 2 + linear < -limit)
    discriminant = jnp.maximum(linear**2 - 2 * quadratic * limit, 0)
    denominator = -linear + jnp.sqrt(discriminant)
    scale = 2 * limit / jnp.where(exceeds, denominator, 1)
    return jnp.where(exceeds, scale * coefficients, coefficients)


def _judged_loss(model: LossModel) -> tuple[jax.Array, jax.Array]:
    """The batch's loss `L` the step control works with, in float32 at least,
    and the machine epsilon of the dtype `loss_fn` computed it in.

    A loss narrower than float32 (a bfloat16 or float16 model's) is computed
    again by `LossModel.loss_at`, as the reduction ratio's losses at other
    parameters are: its predictions promoted, so that `L`, the cap
    `_within_loss` puts on the model's predicted decrease and the ratio are
    not rounded to bfloat16 (whose batch loss is exactly 0 once most
    examples are fitted). The epsilon stays the narrow dtype's: the model's
    predictions, in that dtype, still can't show a change of the loss much
    below its resolution (`_resolvable`).
    """
    loss = model.loss
    eps = jnp.asarray(jnp.finfo(loss.dtype).eps, jnp.float32)
    if jnp.promote_types(loss.dtype, jnp.float32) == loss.dtype:
        return loss, eps
    return model.loss_at(model.params), eps


def _resolvable(model_change: jax.Array, loss: jax.Array, eps: jax.Array) -> jax.Array:
    """Whether the batch's loss can show the predicted change: a decrease
    above the loss's float round-off, `_RESOLUTION · eps · |L|` with `eps`
    that of the dtype the loss was computed in, and a loss that is not
    exactly zero.

    Below that, `ρ` is round-off over round-off. A batch the model already
    fits (a float32 cross-entropy of exactly 0, its gradient 1e-13) predicts
    a change of about 1e-23, sees none, and its `ρ = 0` would reject the step and
    grow the damping tenfold; such a step is tiny, so it is taken unjudged.
    A bfloat16 model's loss (eps 2⁻⁷) resolves far less than a float32
    one's: judged against float32's eps, its round-off rejected steps and
    grew the damping to its maximum.
    """
    loss = jnp.abs(loss).astype(model_change.dtype)
    return (-model_change > _RESOLUTION * eps * loss) & (loss != 0)


def _ratios(model, loss, step, state, model_change, due) -> tuple[jax.Array, jax.Array]:
    """Where `due` (a forward pass at `θ + u` and one at `θ - δ`):

    * `ρ = (L(θ + u) - L(θ)) / model_change`, `-inf` for a NaN loss at `θ + u`;
    * the previous step's relative change of this batch's loss,
      `(L(θ) - L(θ - δ)) / |L(θ - δ)|`; 0 where there was no previous step.

    Elsewhere NaN and 0.
    """
    dtype = model_change.dtype
    had_previous_step = state.model_change < 0

    def ratios():
        # Two forward passes, not one vmapped over the two parameter sets:
        # XLA's CPU backend runs the batched matmuls of the vmap slower.
        new_loss = model.loss_at(optax.apply_updates(model.params, step))
        previous_loss = model.loss_at(
            optax.apply_updates(model.params, optax.tree.scale(-1, state.velocity))
        )
        ratio = (new_loss - loss) / model_change
        ratio = jnp.where(jnp.isnan(ratio), -jnp.inf, ratio)
        fresh_change = (loss - previous_loss) / jnp.abs(previous_loss)
        fresh_change = jnp.where(had_previous_step, fresh_change, 0)
        return ratio.astype(dtype), fresh_change.astype(dtype)

    def not_due():
        return jnp.full([], jnp.nan, dtype), jnp.zeros([], dtype)

    return jax.lax.cond(due, ratios, not_due)


def _levenberg_marquardt(
    damping, ratio, overfitted, due, unjudged, rejected_before, adaptation
) -> jax.Array:
    """The damping after a reduction ratio `ratio` (where `due`): smaller
    where the model predicted the batch's loss well, larger where it did not
    or where the previous step `overfitted` (raised a fresh batch's loss),
    ten times larger where the step raised the loss or is rejected after a
    rejected one. Smaller after a step too small to judge (`unjudged`): a
    large damping makes every step that small, and could never come down."""
    omega = adaptation.damping_decay**adaptation.damping_adaptation_interval
    worse = jnp.logical_not(ratio >= _LOWER_RATIO) | overfitted
    better = (ratio > _UPPER_RATIO) & jnp.logical_not(overfitted)
    # A step that raised the loss (or made it NaN): its model was far off,
    # unlike one that lowered it by too little. A second rejection in a row:
    # growing by 1/ω per step left a batch-of-one CNN for many steps at a loss far
    # above its initial one.
    raised = jnp.logical_not(ratio > 0)
    rejected_again = jnp.logical_not(ratio > _MIN_ACCEPTED_RATIO) & rejected_before
    tenfold = due & (raised | rejected_again)
    new_damping = jnp.select(
        [tenfold, (due & better) | unjudged, due & worse],
        [damping * _REJECTION_DAMPING_GROWTH, damping * omega, damping / omega],
        damping,
    )
    new_damping = jnp.clip(new_damping, adaptation.min_damping, adaptation.max_damping)
    return new_damping.astype(damping.dtype)
