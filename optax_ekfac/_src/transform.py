"""`scale_by_ekfac`, `ekfac` and `ekfac_sgd`: EKFAC as optax transforms.

An update checks its inputs, refreshes the statistics (and, when due, the
eigenbases) of every block (`refresh.py`), preconditions each block's
gradient in its eigenbases (`curvature.precondition`), divides the
parameters no block owns by their diagonal fallback, and skips the step if
the gradients or statistics are not finite. See `curvature.py` for the math.

Parameters no block owns get a diagonal: `g / (v + λ)` with `v` the running
average of `N g²`, which estimates the per-example second moment from the
batch gradient `g` of a mean over `N` loss terms.
"""

import dataclasses
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ekfac._src import kinds, partial, refresh, step_control, validation
from optax_ekfac._src.blocks import Block, Layers, path_names
from optax_ekfac._src.curvature import relative_damping_floor
from optax_ekfac._src.options import (
    ADAPTATION,
    DEFAULTS,
    FIXED_RATE,
    Adaptation,
    FixedRate,
    Options,
    Scalings,
    WeightSharing,
    preconditioner_options,
)
from optax_ekfac._src.state import BlockState, ScaleByEkfacState
from optax_ekfac._src.statistics import Statistics
from optax_ekfac._src.weight_decay import decay_terms


def scale_by_ekfac(
    layers: Layers,
    *,
    damping: float | jax.Array = DEFAULTS.damping,
    decay: float = DEFAULTS.decay,
    eigen_update_every: int = DEFAULTS.eigen_update_every,
    stats_update_every: int = DEFAULTS.stats_update_every,
    eigenvalue_correction: bool = DEFAULTS.eigenvalue_correction,
    scalings: Scalings = DEFAULTS.scalings,
    weight_sharing: WeightSharing = DEFAULTS.weight_sharing,
    max_per_example_elements: int | None = DEFAULTS.max_per_example_elements,
    max_factor_dim: int | None = DEFAULTS.max_factor_dim,
    factor_dtype: Any = DEFAULTS.factor_dtype,
    eigh_dtype: Any = DEFAULTS.eigh_dtype,
    distribute_eigh: bool = DEFAULTS.distribute_eigh,
    axis_name: str = DEFAULTS.axis_name,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions gradients with EKFAC (George et al., 2018).

    The update takes the batch statistics as a keyword argument:
    `tx.update(grads, state, params, stats=stats)` with `stats` from
    `Curvature.value_grad_and_stats`. Chain it with a learning rate (or use
    `ekfac_sgd`, or the adaptive `ekfac`), since it returns the
    preconditioned gradient, not a step.

    A step whose gradients or statistics (the batch's loss included, where
    they carry it) hold a NaN or an infinity is skipped:
    the state stays as it was (factors, eigenbases, scalings, second moments
    and `count`, so the amortization schedule is not shifted) except
    `skipped_steps`, and the gradients are returned as they came (NaN and
    all), for `optax.apply_if_finite` (or the caller) to reject; if only the
    statistics are non-finite, the finite gradients pass through
    unpreconditioned. `ekfac` and `ekfac_sgd` instead skip the whole step
    (zero updates, nothing else changed). The check is one reduction inside the
    compiled step.

    The update checks that `stats` hold every block's calls with the feature
    shapes of `layers`; the number of examples may change from batch to batch
    (a last partial batch), but all calls of one block must share it.

    Chain order: clipping (`optax.clip_by_global_norm`) goes before it, where
    it clips the gradient and so scales the step by the same factor (after
    it, a threshold chosen for gradients cuts the preconditioned direction,
    often hundreds of times longer, and training nearly stops); weight decay
    (`optax.add_decayed_weights`) after it and before `optax.sgd`, decoupled
    as in AdamW (or `ekfac_sgd`'s `weight_decay`); the learning rate and its
    schedule in `optax.sgd`;
    `optax.apply_if_finite` around the whole chain. `optax.adam` or `adamw`
    after it is Adam on the preconditioned directions, whose per-coordinate
    normalization, not the curvature, sets the step sizes. Under
    `optax.multi_transform` or `optax.masked` it preconditions the blocks
    whose parameters it receives and ignores the other blocks' statistics;
    under `optax.MultiSteps` it is refused (use `accumulated`); wrappers
    that drop `stats=` (`optax.lookahead`) take `with_stats(tx, stats)`. See
    the README's "Fitting existing training code".

    Args:
        layers: the blocks, from `Curvature.layers`.
        damping: `λ > 0`, added to the scalings (and to the diagonal
            fallback), which bounds the update: `‖update‖ ≤ ‖g‖ / λ`. Much
            larger than the scalings, the update tends to `g / λ` (gradient
            descent scaled by `1 / λ`). Each block uses
            `λ' = max(λ, ρ · max(S))`, `ρ = relative_damping_floor(dtype) =
            100 eps` of the less precise of the state's dtype and `eigh_dtype`
            (float32: 1.2e-5), `max(S)` the block's largest scaling (per group
            of a grouped convolution): round-off
            perturbs every curvature by about `eps · max(S)`, and a damping
            below that divides round-off by almost nothing (float32 errors of
            100% and more at `λ` = 1e-8 with an ill-conditioned factor). With
            the floor, a float32 update is within a few percent of the float64
            one at `λ'`, and `‖update‖ ≤ ‖g‖ / λ'`; where `λ ≥ ρ · max(S)` it
            changes nothing. A tiny `λ` (1e-8) thus gives the undamped EKFAC
            direction where the curvature exceeds `ρ · max(S)`; directions
            with less (a batch smaller than a layer's width, dead units,
            constant inputs) stay bounded by `1 / λ'`. May be scheduled with
            `optax.inject_hyperparams` (scheduled values are not
            range-checked; they are floored the same way).
        decay: running-average decay of factors and scalings per update, in
            `[0, 1)`: with `stats_update_every = k` each refresh decays by
            `decay**k`, so the averages span the same number of updates
            whatever `k` is.
        eigen_update_every: eigendecompose the factors at the first update and
            then every this many updates. A multiple of `stats_update_every`.
        stats_update_every: refresh factors and scalings every this many
            updates; preconditioning happens at every update.
        eigenvalue_correction: `True` for EKFAC; `False` for KFAC, whose
            scalings are the outer product of the factors' eigenvalues.
        scalings: for layers with several positions per example (sequences,
            convolutions, modules called more than once): `"exact"` computes
            the second moments of the per-example gradients in the eigenbasis
            (chunks of examples, bounded by `max_per_example_elements`);
            `"per_position"` treats every position as its own example (two
            matmuls, no per-example tensor; exact when positions don't
            interact, cheaper when `input_dim * output_dim` is large).
            Embeddings always use per-position scalings.
        weight_sharing: how the factors treat positions. `"expand"` (default)
            averages `A` over positions and sums `B` over each example's
            positions: right when each position carries its own loss terms
            (token losses, per-pixel outputs). `"reduce"` sums the positions
            of an example before the outer products (mean of `a`, sum of `d`):
            right when one loss term pools over the positions (a sequence or
            image classifier), and cheaper. Embeddings always use `"expand"`.
        max_per_example_elements: the most elements the per-example projected
            gradients of one chunk may hold (per device, with the batch
            sharded), for `scalings="exact"`; None for `2**22`. It sets array
            shapes, so under `optax.inject_hyperparams` name it in
            `static_args`.
        max_factor_dim: the widest side a Kronecker factor is kept dense
            on, besides a bias row. A side of `d` coordinates with
            `d - 1 > max_factor_dim` (a vocabulary-sized output head) gets a
            block-diagonal factor and eigenbasis, as Shampoo blocks its
            preconditioners: `k = ceil((d - 1) / max_factor_dim)` diagonal
            blocks of one size `b = ceil(d / k)` (see `BlockState`), whose
            curvature between blocks is dropped. Memory `d b` instead of
            `d²`, `k` eigendecompositions of `b x b` instead of one of
            `d x d`, and rotations costing `b / d` of the dense ones'. None
            for 1024, which keeps layers up to 1024 features (and a bias)
            dense; a number at least the widest side keeps every factor
            dense. It sets array shapes, so under `optax.inject_hyperparams`
            name it in `static_args`.
        factor_dtype: dtype of the curvature state; by default each block's
            kernel dtype promoted to at least float32 (bfloat16 activations
            then still give float32 factors).
        eigh_dtype: `jnp.float32` or `jnp.float64` (or their names): the
            dtype the factors are eigendecomposed in (the bases are stored in
            `factor_dtype`); None for the factor dtype. float64 needs
            `jax_enable_x64`. Under `optax.inject_hyperparams`, name it in
            `static_args`.
        distribute_eigh: spread the eigendecompositions over the devices of
            the mesh axis `axis_name` (each decomposes about `1/D` of the
            factors, balanced by cost, and the results are shared) instead of
            every device repeating all of them. Takes the mesh from the
            context (`jax.set_mesh`) when the step is traced; without one, or
            with one device on that axis, every device decomposes everything.
        axis_name: the mesh axis the batch is sharded over (data parallelism).

    Returns:
        An `optax.GradientTransformationExtraArgs`.

    Example:
        >>> tx = optax.chain(
        ...     optax_ekfac.scale_by_ekfac(layers, damping=1e-3),
        ...     optax.sgd(0.1, momentum=0.9))
        >>> opt_state = tx.init(params)
        >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    """
    options = validation.checked_options(
        Options(damping=damping, **preconditioner_options(locals()))
    )
    validation.check_layers(layers)

    def init_fn(params: optax.Params) -> ScaleByEkfacState:
        return _initial_state(partial.restricted(layers, params), params, options)

    def update_fn(
        updates: optax.Updates,
        state: ScaleByEkfacState,
        params: optax.Params | None = None,
        *,
        stats: Statistics | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByEkfacState]:
        del params, extra_args
        # Under optax.multi_transform / optax.masked: the blocks it receives.
        active = partial.restricted(layers, updates)
        stats = partial.restricted_stats(layers, active, stats)
        stats, grads = _checked_inputs(active, updates, state, stats, options)
        # One flag for the whole step, computed in the compiled step: a NaN or
        # an infinity anywhere in the gradients or statistics skips the
        # refresh (no eigh of a NaN factor) and leaves the state as it was.
        finite = _all_finite(updates, stats.layers, _batch_loss(stats))
        schedule = refresh.schedule(state, finite, options)
        blocks, second_moments = refresh.maybe_refreshed(
            active, state, stats, grads, schedule, options
        )
        directions = _preconditioned_blocks(active.blocks, blocks, grads, options)
        directions |= _fallback_directions(second_moments, grads, options.damping)
        # A skipped step hands the gradients on as they came, for
        # `optax.apply_if_finite` (or the caller) to reject.
        new_updates = optax.tree.where(
            finite, _as_tree_of(updates, directions), updates
        )
        new_state = _next_state(state, finite, schedule, blocks, second_moments)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ekfac(
    layers: Layers,
    learning_rate: optax.ScalarOrSchedule | None = None,
    *,
    momentum: float | None = ADAPTATION.momentum,
    nesterov: bool = FIXED_RATE.nesterov,
    damping: float | jax.Array | None = ADAPTATION.damping,
    initial_damping: float = ADAPTATION.initial_damping,
    min_damping: float = ADAPTATION.min_damping,
    max_damping: float = ADAPTATION.max_damping,
    damping_decay: float = ADAPTATION.damping_decay,
    damping_adaptation_interval: int = ADAPTATION.damping_adaptation_interval,
    max_momentum: float = ADAPTATION.max_momentum,
    weight_decay: float = ADAPTATION.weight_decay,
    mask: Any = ADAPTATION.mask,
    decay: float = DEFAULTS.decay,
    eigen_update_every: int = DEFAULTS.eigen_update_every,
    stats_update_every: int = DEFAULTS.stats_update_every,
    eigenvalue_correction: bool = DEFAULTS.eigenvalue_correction,
    scalings: Scalings = DEFAULTS.scalings,
    weight_sharing: WeightSharing = DEFAULTS.weight_sharing,
    max_per_example_elements: int | None = DEFAULTS.max_per_example_elements,
    max_factor_dim: int | None = DEFAULTS.max_factor_dim,
    factor_dtype: Any = DEFAULTS.factor_dtype,
    eigh_dtype: Any = DEFAULTS.eigh_dtype,
    distribute_eigh: bool = DEFAULTS.distribute_eigh,
    axis_name: str = DEFAULTS.axis_name,
) -> optax.GradientTransformationExtraArgs:
    """EKFAC with no tuning: adapted step size, momentum and damping.

    Every update takes the EKFAC direction `Δ = -P_λ g` and the previous
    update `δ`, and moves by `α Δ + β δ` with `(α, β)` minimizing the
    quadratic model `gᵀu + ½ uᵀ (G + λ I) u` of the batch's loss, `G` its
    exact Gauss-Newton matrix (products from the statistics' `loss_model`:
    one linearization of the model's outputs per step), scaled down where
    that model promises a decrease larger than the batch's (non-negative)
    loss; the damping `λ` follows the Levenberg-Marquardt rule from the
    reduction ratio of the batch's loss every `damping_adaptation_interval`
    updates (one more forward pass).
    This is K-FAC's step control (Martens & Grosse, 2015, sections 6.5 and 7).
    The adapted values are in the state (`EkfacState`) for logging. The loss
    must come from this library's loss helpers, which mark the model's
    outputs. For a fixed learning rate (and no extra passes) use `ekfac_sgd`.

    It takes the updates it gets as the loss's gradient: put nothing that
    changes them before it (its quadratic model and trust-region test bound
    the step, so no clipping); weight decay is its `weight_decay` argument.
    Under `optax.multi_transform` or `optax.masked` it fits its step to the
    loss along its own parameters, the others held where they are;
    `accumulated` gives it the whole batch's loss model.

    A step whose gradients, statistics or batch loss hold a NaN or an
    infinity is skipped as a whole: the updates are zeros and the state is
    unchanged except `skipped_steps` of the `ScaleByEkfacState`. One whose
    quadratic model alone is not finite (an overflow in the curvature
    products along the direction) is skipped too, but the batch's finite
    statistics stay in the curvature estimate. The decisions are made inside
    the compiled step.

    Every numeric argument can be scheduled or changed between steps with
    `optax.inject_hyperparams(ekfac)(layers, ...)`, with no `static_args`
    (`max_per_example_elements` and `max_factor_dim`, which set array shapes,
    only as `static_args` when given).

    Args:
        layers: the blocks, from `Curvature.layers`.
        learning_rate: deprecated: use `ekfac_sgd(layers, learning_rate,
            ...)`, to which it forwards (with a `DeprecationWarning`) with
            the behaviour of before: `damping` 1e-3 by default and no
            `norm_constraint`. None (the default): the adaptive optimizer.
        momentum: None adapts `β` in `[0, max_momentum]`; a number fixes it
            (left out of a step the model predicts uphill).
        nesterov: for a deprecated `learning_rate` only (`ekfac_sgd`'s);
            refused otherwise.
        damping: `λ` (see `scale_by_ekfac`): None adapts it, a number fixes
            it.
        initial_damping: the adapted damping's first value.
        min_damping, max_damping: the adapted damping's range.
        damping_decay: the adapted damping is multiplied or divided by
            `damping_decay ** damping_adaptation_interval` when it changes
            (multiplied by 10 after a step that raised the loss, or after a
            second rejected step in a row).
        damping_adaptation_interval: updates between damping adaptations.
        max_momentum: the largest adapted `β`.
        weight_decay: decoupled weight decay, as `optax.adamw`'s at the step's
            own rate: the update is `α Δ + β δ - α · weight_decay · θ`, `α`
            the step size the model chose for the EKFAC direction (as
            AdamW's `-η (Adam's direction + weight_decay θ)`, `η` its learning
            rate). `α` is near 1 once the damping has adapted, so each step
            shrinks the weights by about `weight_decay` (AdamW's
            `learning_rate · weight_decay`). Not part of the quadratic model
            or the momentum; a step not taken decays nothing. Needs `params`
            in `update` unless 0.
        mask: which parameters decay, as `optax.adamw`'s `mask`: a tree of
            bools like the parameters, or a function of the parameters giving
            one; None for all.
        decay, eigen_update_every, stats_update_every,
        eigenvalue_correction, scalings, weight_sharing,
        max_per_example_elements, max_factor_dim, factor_dtype, eigh_dtype,
        distribute_eigh, axis_name: as in `scale_by_ekfac`.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose update takes
        `stats=`, with an `EkfacState`.

    Raises:
        TypeError: for `nesterov=True` without a `learning_rate`, or a
            step-control setting (`min_damping`, ...) with one.

    Example:
        >>> tx = optax_ekfac.ekfac(layers, weight_decay=1e-4)
        >>> opt_state = tx.init(params)
        >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        >>> float(opt_state.damping) > 0
        True
        >>> injected = optax.inject_hyperparams(optax_ekfac.ekfac)(layers)
        >>> opt_state = injected.init(params)
        >>> opt_state.hyperparams["max_momentum"] = 0.9  # from the next step on
    """
    arguments = locals()
    adaptation = Adaptation(**{name: arguments[name] for name in _ADAPTATION_FIELDS})
    options = preconditioner_options(arguments)
    if learning_rate is not None:
        return _deprecated_fixed_rate(
            layers, learning_rate, nesterov, adaptation, options
        )
    if nesterov:
        raise validation.error(
            validation.EKFAC,
            "nesterov=True only applies to ekfac_sgd's fixed momentum; the "
            "adaptive ekfac solves for its momentum at every step. Use "
            "ekfac_sgd(layers, learning_rate, momentum=0.9, nesterov=True), "
            "or leave nesterov out.",
            TypeError,
        )
    adaptation = validation.checked_adaptation(adaptation)

    def preconditioner(damping: Any) -> optax.GradientTransformationExtraArgs:
        return scale_by_ekfac(layers, damping=damping, **options)

    # Built once now so that bad settings are refused here, not when the
    # first update is traced.
    preconditioner(initial_damping if damping is None else damping)
    return step_control.adaptive(preconditioner, adaptation)


_ADAPTATION_FIELDS = tuple(field.name for field in dataclasses.fields(Adaptation))


def _deprecated_fixed_rate(
    layers: Layers,
    learning_rate: optax.ScalarOrSchedule,
    nesterov: bool,
    adaptation: Adaptation,
    options: dict[str, Any],
) -> optax.GradientTransformationExtraArgs:
    """`ekfac(layers, learning_rate, ...)`: `ekfac_sgd` as it was, with a
    `DeprecationWarning`; the step-control settings it has no use for are
    refused."""
    validation.check_learning_rate(learning_rate, validation.EKFAC)
    validation.check_only_adaptive_defaults(adaptation)
    warnings.warn(
        "ekfac(layers, learning_rate=...) is deprecated and will be removed: "
        "use optax_ekfac.ekfac_sgd(layers, learning_rate, momentum, nesterov, "
        "damping=..., ...), which also bounds the step by default "
        "(norm_constraint=None for this behaviour). ekfac(layers), with no "
        "learning_rate, is the adaptive optimizer.",
        DeprecationWarning,
        stacklevel=3,
    )
    return ekfac_sgd(
        layers,
        learning_rate,
        adaptation.momentum,
        nesterov,
        damping=(
            _OLD_FIXED_DAMPING if adaptation.damping is None else adaptation.damping
        ),
        weight_decay=adaptation.weight_decay,
        mask=adaptation.mask,
        norm_constraint=None,
        **options,
    )


# `ekfac(layers, learning_rate)`'s damping before `ekfac_sgd`, kept for its
# deprecation period.
_OLD_FIXED_DAMPING = 1e-3


def ekfac_sgd(
    layers: Layers,
    learning_rate: optax.ScalarOrSchedule,
    momentum: float | None = FIXED_RATE.momentum,
    nesterov: bool = FIXED_RATE.nesterov,
    *,
    damping: float | jax.Array = FIXED_RATE.damping,
    weight_decay: float = FIXED_RATE.weight_decay,
    mask: Any = FIXED_RATE.mask,
    norm_constraint: float | None = FIXED_RATE.norm_constraint,
    decay: float = DEFAULTS.decay,
    eigen_update_every: int = DEFAULTS.eigen_update_every,
    stats_update_every: int = DEFAULTS.stats_update_every,
    eigenvalue_correction: bool = DEFAULTS.eigenvalue_correction,
    scalings: Scalings = DEFAULTS.scalings,
    weight_sharing: WeightSharing = DEFAULTS.weight_sharing,
    max_per_example_elements: int | None = DEFAULTS.max_per_example_elements,
    max_factor_dim: int | None = DEFAULTS.max_factor_dim,
    factor_dtype: Any = DEFAULTS.factor_dtype,
    eigh_dtype: Any = DEFAULTS.eigh_dtype,
    distribute_eigh: bool = DEFAULTS.distribute_eigh,
    axis_name: str = DEFAULTS.axis_name,
) -> optax.GradientTransformationExtraArgs:
    """EKFAC-preconditioned SGD at a fixed (or scheduled) learning rate.

    `optax.sgd(learning_rate, momentum, nesterov)` on the EKFAC directions
    `d = P_λ g` of `scale_by_ekfac` at a fixed `damping`, with decoupled
    weight decay as `optax.adamw`'s, and each direction bounded first:

        d ← d · min(1, √(norm_constraint / (η² gᵀd)))
        m ← momentum · m + d                 (heavy ball; Nesterov if asked)
        update = -η (m + weight_decay · θ)

    `η` the learning rate at this step. `η² gᵀd = η² gᵀ P_λ g` is the squared
    length of the step `η d` measured by the damped curvature it was
    preconditioned with (`(ηd)ᵀ(F + λ)(ηd)`), about twice the change of the
    model's output distribution it makes (a KL divergence): kfac-jax's
    `norm_constraint` and the "KL clipping" of Ba et al. (2017).

    The learning rate and the damping: along a direction of curvature `s`,
    `η d` is `η g / (s + λ)`: a Newton step scaled by `η` where `s ≫ λ`
    (keep `η / (1 - momentum) ≲ 1`: `η = 1` with no momentum is the full
    step of the curvature model), and plain SGD at the rate `η / λ` where
    `s ≪ λ`, which at `λ = 1e-3` is hundreds of times the rate SGD trains
    with. The norm constraint is what makes the small default damping safe:
    it caps every step at `√norm_constraint` in the curvature's norm, so
    those directions cannot run away, and while it binds the step's length
    is set by `norm_constraint`, not by `η`. With `norm_constraint=None`,
    choose `λ ≥ η / η_SGD`, `η_SGD` a learning rate plain SGD trains the
    model with (e.g. `η = 0.03`, `η_SGD = 0.1`: `λ ≥ 0.3`).

    Nothing is adapted and no extra forward pass is made: it needs the
    statistics, not their `loss_model`. A step whose
    gradients or statistics hold a NaN or an infinity is skipped as a whole
    (zero updates, the sgd state unchanged, `skipped_steps` counted).

    Args:
        layers: the blocks, from `Curvature.layers`.
        learning_rate: `η`, a number > 0 or an optax schedule of the step
            count (the steps taken).
        momentum: heavy-ball momentum in `[0, 1)`, or None for none (as
            `optax.sgd`'s).
        nesterov: Nesterov momentum (needs a `momentum`).
        damping: `λ > 0` (see `scale_by_ekfac`).
        weight_decay: decoupled weight decay, as `optax.adamw`'s: `η ·
            weight_decay · θ` subtracted at each step, outside the momentum.
            Needs `params` in `update` unless 0.
        mask: which parameters decay, as `optax.adamw`'s `mask`: a tree of
            bools like the parameters, or a function of the parameters giving
            one; None for all.
        norm_constraint: the largest squared curvature length `η² gᵀd` of a
            step before the momentum (above), or None for no bound (then mind
            the learning rate–damping relation above).
        decay, eigen_update_every, stats_update_every,
        eigenvalue_correction, scalings, weight_sharing,
        max_per_example_elements, max_factor_dim, factor_dtype, eigh_dtype,
        distribute_eigh, axis_name: as in `scale_by_ekfac`.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose update takes
        `stats=`; its state is `(ScaleByEkfacState, optax.sgd's state)`.

    Example:
        >>> tx = optax_ekfac.ekfac_sgd(layers, 0.1, momentum=0.9)
        >>> opt_state = tx.init(params)
        >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        >>> scheduled = optax_ekfac.ekfac_sgd(
        ...     layers, optax.cosine_decay_schedule(0.1, 1000), momentum=0.9,
        ...     weight_decay=1e-4)
        >>> injected = optax.inject_hyperparams(optax_ekfac.ekfac_sgd)(
        ...     layers, learning_rate=0.1)
    """
    arguments = locals()
    validation.check_learning_rate(learning_rate)
    fixed = validation.checked_fixed_rate(
        FixedRate(**{name: arguments[name] for name in _FIXED_RATE_FIELDS})
    )
    preconditioner = scale_by_ekfac(
        layers, damping=damping, **preconditioner_options(arguments)
    )
    return _fixed_rate(preconditioner, learning_rate, fixed)


_FIXED_RATE_FIELDS = tuple(field.name for field in dataclasses.fields(FixedRate))


def _fixed_rate(
    preconditioner: optax.GradientTransformationExtraArgs,
    learning_rate: optax.ScalarOrSchedule,
    fixed: FixedRate,
) -> optax.GradientTransformationExtraArgs:
    """`optax.sgd` on the preconditioner's directions (bounded by
    `norm_constraint`), minus the decoupled weight decay, that skips the
    preconditioner's skipped steps: zero updates, and sgd's state left as it
    was.

    The skip is read from the preconditioner's own flag, the increment of its
    `skipped_steps`, so gradients and statistics are checked once. The state
    has `optax.chain(preconditioner, optax.sgd(...))`'s structure.
    """
    optimizer = optax.with_extra_args_support(
        optax.sgd(learning_rate, momentum=fixed.momentum, nesterov=fixed.nesterov)
    )

    def init_fn(params: optax.Params) -> tuple[Any, Any]:
        return preconditioner.init(params), optimizer.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        preconditioner_state, optimizer_state = state
        decay = decay_terms(
            params, fixed.weight_decay, fixed.mask, validation.EKFAC_SGD
        )
        directions, new_preconditioner_state = preconditioner.update(
            updates, preconditioner_state, params, **extra_args
        )
        skipped = (
            new_preconditioner_state.skipped_steps != preconditioner_state.skipped_steps
        )
        # The schedule's count is the steps taken, as sgd's own count is.
        rate = (
            learning_rate(preconditioner_state.count)
            if callable(learning_rate)
            else learning_rate
        )
        if fixed.norm_constraint is not None:
            directions = _norm_constrained(
                directions, updates, rate, fixed.norm_constraint
            )
        # The optimizer runs on every step (one compiled step); `where` drops
        # its result on a skipped one, so no NaN, and no zero either, enters
        # its momentum.
        new_updates, new_optimizer_state = optimizer.update(
            directions, optimizer_state, params, **extra_args
        )
        if decay is not None:
            new_updates = optax.tree.cast_like(
                optax.tree.add(new_updates, optax.tree.scale(-rate, decay)),
                new_updates,
            )
        new_updates = optax.tree.where(
            skipped, optax.tree.zeros_like(new_updates), new_updates
        )
        new_optimizer_state = optax.tree.where(
            skipped, optimizer_state, new_optimizer_state
        )
        return new_updates, (new_preconditioner_state, new_optimizer_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _norm_constrained(
    directions: optax.Updates, grads: optax.Updates, rate: Any, constraint: Any
) -> optax.Updates:
    """`directions · min(1, √(constraint / (rate² gᵀd)))`: the step
    `rate · d` no longer than `√constraint` in the damped curvature's norm.
    A direction with `gᵀd ≤ 0` (none, or a zero gradient) is left as it is."""
    squared_norm = optax.tree.vdot(grads, directions)
    dtype = jnp.promote_types(squared_norm.dtype, jnp.float32)
    scaled = jnp.asarray(rate, dtype) ** 2 * squared_norm.astype(dtype)
    bounded = scaled > constraint
    coefficient = jnp.where(
        bounded, jnp.sqrt(constraint / jnp.where(bounded, scaled, 1.0)), 1.0
    )
    return optax.tree.cast_like(optax.tree.scale(coefficient, directions), directions)


def _initial_state(
    layers: Layers, params: optax.Params, options: Options
) -> ScaleByEkfacState:
    """Zero statistics and counters, in each parameter's factor dtype."""
    leaves = validation.checked_leaves(layers, params, "params")

    def dtype_of(leaf) -> Any:
        return options.factor_dtype or jnp.promote_types(leaf.dtype, jnp.float32)

    blocks = {
        block.name: refresh.initial_block_state(
            block, dtype_of(leaves[block.param_paths[0]]), options.factor_dim_limit
        )
        for block in layers.blocks
    }
    second_moments = {
        "/".join(path): jnp.zeros(leaves[path].shape, dtype_of(leaves[path]))
        for path in layers.fallback
    }
    # One array per counter: a state holding one buffer twice cannot be
    # donated (jit(..., donate_argnums=...)).
    count, stats_count, scalings_count, skipped_steps = (
        jnp.zeros([], jnp.int32) for _ in range(4)
    )
    return ScaleByEkfacState(
        count, stats_count, scalings_count, skipped_steps, blocks, second_moments
    )


def _checked_inputs(
    layers: Layers, updates: optax.Updates, state: Any, stats: Any, options: Options
) -> tuple[Statistics, dict]:
    """The statistics and the gradients by path, once they and the state fit
    the layers."""
    validation.check_not_under_multi_steps()
    validation.check_stats(layers, stats)
    grads = validation.checked_leaves(layers, updates, "updates")
    validation.check_state(layers, state, grads, options.factor_dim_limit)
    return stats, grads


def _all_finite(*trees: Any) -> jax.Array:
    """Whether no floating-point leaf holds a NaN or an infinity: one scalar.

    The same check as `optax.apply_if_finite`; integer leaves (token ids) are
    always finite. On one device it is one reduction over the leaves
    flattened and concatenated (per dtype), which XLA fuses into one kernel:
    a reduction per leaf compiles a kernel or two per leaf, a large part of a
    small model's compile time. Under a mesh (`jax.set_mesh`) it stays one
    reduction per leaf, so that the batch's sharded statistics are reduced
    where they are rather than gathered into one concatenation.
    """
    leaves = [
        leaf
        for leaf in jax.tree.leaves(trees)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    if jax.sharding.get_abstract_mesh().empty:
        by_dtype: dict[Any, list[jax.Array]] = {}
        for leaf in leaves:
            by_dtype.setdefault(leaf.dtype, []).append(jnp.ravel(leaf))
        leaves = [jnp.concatenate(group) for group in by_dtype.values()]
    checks = [jnp.isfinite(leaf).all() for leaf in leaves]
    return jnp.all(jnp.asarray(checks, bool)) if checks else jnp.asarray(True)


def _batch_loss(stats: Statistics) -> jax.Array | None:
    """The batch's loss where the statistics carry it: a batch whose loss is
    not finite is not learned from, even where its gradients are."""
    return None if stats.loss_model is None else stats.loss_model.loss


def _preconditioned_blocks(
    blocks: tuple[Block, ...],
    states: dict[str, BlockState],
    grads: dict,
    options: Options,
) -> dict:
    """Every block's gradient preconditioned in its eigenbases, as leaves."""
    directions = {}
    for block in blocks:
        block_state = states[block.name]
        gradient = kinds.block_matrix(block, grads)
        floor = relative_damping_floor(block_state.scalings.dtype, options.eigh_dtype)
        direction = kinds.precondition(
            block, block_state, gradient, options.damping, floor
        )
        directions.update(kinds.block_leaves(block, direction, grads))
    return directions


def _fallback_directions(
    second_moments: dict[str, jax.Array], grads: dict, damping: Any
) -> dict:
    """`g / (v + λ)` for the parameters no block owns."""
    directions = {}
    for key, moment in second_moments.items():
        path = tuple(key.split("/"))
        grad = grads[path]
        directions[path] = (grad.astype(moment.dtype) / (moment + damping)).astype(
            grad.dtype
        )
    return directions


def _as_tree_of(updates: optax.Updates, leaves: dict) -> optax.Updates:
    """`leaves` (by path) in the tree structure of `updates`."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
    return jax.tree_util.tree_unflatten(
        treedef, [leaves[path_names(path)] for path, _ in flat]
    )


def _next_state(
    state: ScaleByEkfacState,
    finite: jax.Array,
    schedule: refresh.Schedule,
    blocks: dict[str, BlockState],
    second_moments: dict[str, jax.Array],
) -> ScaleByEkfacState:
    """The state after this update; a skipped one only counts itself."""
    return ScaleByEkfacState(
        count=jnp.where(finite, optax.safe_increment(state.count), state.count),
        stats_count=schedule.stats_count,
        scalings_count=schedule.scalings_count,
        skipped_steps=jnp.where(
            finite, state.skipped_steps, optax.safe_increment(state.skipped_steps)
        ),
        blocks=blocks,
        second_moments=second_moments,
    )
