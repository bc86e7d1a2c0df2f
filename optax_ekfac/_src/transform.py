"""`scale_by_ekfac` and `ekfac`: the EKFAC preconditioner as optax transforms.

An update checks its inputs, refreshes the statistics (and, when due, the
eigenbases) of every block (`refresh.py`), preconditions each block's
gradient in its eigenbases (`curvature.precondition`), divides the
parameters no block owns by their diagonal fallback, and skips the step if
the gradients or statistics are not finite. See `curvature.py` for the math.

Parameters no block owns get a diagonal: `g / (v + λ)` with `v` the running
average of `N g²`, which estimates the per-example second moment from the
batch gradient `g` of a mean over `N` loss terms.
"""

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
    Options,
    Scalings,
    WeightSharing,
)
from optax_ekfac._src.state import BlockState, ScaleByEkfacState
from optax_ekfac._src.statistics import Statistics


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
    `ekfac`), since it returns the preconditioned gradient, not a step.

    A step whose gradients or statistics hold a NaN or an infinity is skipped:
    the state stays as it was (factors, eigenbases, scalings, second moments
    and `count`, so the amortization schedule is not shifted) except
    `skipped_steps`, and the gradients are returned as they came (NaN and
    all), for `optax.apply_if_finite` (or the caller) to reject; if only the
    statistics are non-finite, the finite gradients pass through
    unpreconditioned. `ekfac` instead skips the whole step (zero updates,
    `optax.sgd`'s state unchanged). The check is one reduction inside the
    compiled step.

    The update checks that `stats` hold every block's calls with the feature
    shapes of `layers`; the number of examples may change from batch to batch
    (a last partial batch), but all calls of one block must share it.

    Chain order: clipping (`optax.clip_by_global_norm`) goes before it, where
    it clips the gradient and so scales the step by the same factor (after
    it, a threshold chosen for gradients cuts the preconditioned direction,
    often hundreds of times longer, and training nearly stops); weight decay
    (`optax.add_decayed_weights`) after it and before `optax.sgd`, decoupled
    as in AdamW; the learning rate and its schedule in `optax.sgd`;
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
        Options(
            damping=damping,
            decay=decay,
            eigen_update_every=eigen_update_every,
            stats_update_every=stats_update_every,
            eigenvalue_correction=eigenvalue_correction,
            scalings=scalings,
            weight_sharing=weight_sharing,
            max_per_example_elements=max_per_example_elements,
            max_factor_dim=max_factor_dim,
            factor_dtype=factor_dtype,
            eigh_dtype=eigh_dtype,
            distribute_eigh=distribute_eigh,
            axis_name=axis_name,
        )
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
        finite = _all_finite(updates, stats.layers)
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
    momentum: float | None = None,
    nesterov: bool = False,
    damping: float | jax.Array | None = None,
    initial_damping: float = ADAPTATION.initial_damping,
    min_damping: float = ADAPTATION.min_damping,
    max_damping: float = ADAPTATION.max_damping,
    damping_decay: float = ADAPTATION.damping_decay,
    damping_adaptation_interval: int = ADAPTATION.damping_adaptation_interval,
    max_momentum: float = ADAPTATION.max_momentum,
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

    With no `learning_rate` (the recommended use, `ekfac(layers)`), every
    update takes the EKFAC direction `Δ = -P_λ g` and the previous update `δ`,
    and moves by `α Δ + β δ` with `(α, β)` minimizing the quadratic model
    `gᵀu + ½ uᵀ (G + λ I) u` of the batch's loss, `G` its exact Gauss-Newton
    matrix (products from the statistics' `loss_model`: one linearization
    of the model's outputs per step), scaled down where that model promises
    a decrease larger than the batch's (non-negative) loss; the damping `λ`
    follows the Levenberg-Marquardt rule from the reduction ratio of the
    batch's loss every `damping_adaptation_interval` updates (one more
    forward pass).
    This is K-FAC's step control (Martens & Grosse, 2015, sections 6.5 and 7).
    The adapted values are in the state (`EkfacState`) for logging. The loss
    must come from this library's loss helpers, which mark the model's
    outputs.

    With a `learning_rate`, it is `optax.chain(scale_by_ekfac(...),
    optax.sgd(learning_rate, momentum, nesterov))` at a fixed `damping`
    (default 1e-3): nothing adapted, no extra passes.

    Adapted, it takes the updates it gets as the loss's gradient: put
    nothing that changes them before it (its quadratic model and trust-region
    test bound the step, so no clipping), decoupled weight decay after it
    (`optax.add_decayed_weights(-rate)`). Under `optax.multi_transform` or
    `optax.masked` it fits its step to the loss along its own parameters,
    the others held where they are; `accumulated` gives it the whole batch's
    loss model.

    A step whose gradients or statistics (or, adapted, the quadratic model
    or the batch's loss) hold a NaN or an infinity is skipped as a whole:
    the updates are zeros and the state is unchanged except `skipped_steps`
    of the `ScaleByEkfacState`; the decision is made inside the compiled
    step.

    Args:
        layers: the blocks, from `Curvature.layers`.
        learning_rate: None to adapt the step size; or a scalar or an optax
            schedule for plain preconditioned SGD.
        momentum: adapted: None adapts `β`, a number fixes it. With a
            `learning_rate`: heavy-ball momentum, or None for none.
        nesterov: with a `learning_rate`: Nesterov momentum.
        damping: `λ` (see `scale_by_ekfac`). Adapted: None adapts it, a
            number fixes it. With a `learning_rate`: None for 1e-3.
        initial_damping: the adapted damping's first value.
        min_damping, max_damping: the adapted damping's range.
        damping_decay: the adapted damping is multiplied or divided by
            `damping_decay ** damping_adaptation_interval` when it changes
            (multiplied by 10 after a step that raised the loss, or after a
            second rejected step in a row).
        damping_adaptation_interval: updates between damping adaptations.
        max_momentum: the largest adapted `β`.
        decay, eigen_update_every, stats_update_every,
        eigenvalue_correction, scalings, weight_sharing,
        max_per_example_elements, max_factor_dim, factor_dtype, eigh_dtype,
        distribute_eigh, axis_name: as in `scale_by_ekfac`. The numeric ones
            can be scheduled with `optax.inject_hyperparams`, as for
            `optax.adamw`.

    Returns:
        An `optax.GradientTransformationExtraArgs` whose update takes `stats=`.
        Its state is an `EkfacState` (adapted), or that of
        `optax.chain(scale_by_ekfac(...), optax.sgd(...))`:
        `(ScaleByEkfacState, sgd state)`.

    Example:
        >>> tx = optax_ekfac.ekfac(layers)
        >>> opt_state = tx.init(params)
        >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        >>> float(opt_state.damping) > 0
        True
        >>> fixed = optax_ekfac.ekfac(layers, learning_rate=0.1, momentum=0.9)
        >>> scheduled = optax.inject_hyperparams(optax_ekfac.ekfac)(
        ...     layers, learning_rate=0.1, damping=1e-3)
    """

    def preconditioner(damping: Any) -> optax.GradientTransformationExtraArgs:
        return scale_by_ekfac(
            layers,
            damping=damping,
            decay=decay,
            eigen_update_every=eigen_update_every,
            stats_update_every=stats_update_every,
            eigenvalue_correction=eigenvalue_correction,
            scalings=scalings,
            weight_sharing=weight_sharing,
            max_per_example_elements=max_per_example_elements,
            max_factor_dim=max_factor_dim,
            factor_dtype=factor_dtype,
            eigh_dtype=eigh_dtype,
            distribute_eigh=distribute_eigh,
            axis_name=axis_name,
        )

    if learning_rate is None:
        adaptation = validation.checked_adaptation(
            step_control.Adaptation(
                momentum=momentum,
                damping=damping,
                initial_damping=initial_damping,
                min_damping=min_damping,
                max_damping=max_damping,
                damping_decay=damping_decay,
                damping_adaptation_interval=damping_adaptation_interval,
                max_momentum=max_momentum,
            )
        )
        # Built once now so that bad settings are refused here, not when the
        # first update is traced.
        preconditioner(adaptation.damping or adaptation.initial_damping)
        return step_control.adaptive(preconditioner, adaptation)
    validation.check_learning_rate(learning_rate)
    return _skipping_non_finite_steps(
        preconditioner(DEFAULTS.damping if damping is None else damping),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def _skipping_non_finite_steps(
    preconditioner: optax.GradientTransformationExtraArgs,
    optimizer: optax.GradientTransformation,
) -> optax.GradientTransformationExtraArgs:
    """`optax.chain(preconditioner, optimizer)` that skips the preconditioner's
    skipped steps: zero updates, and `optimizer`'s state left as it was.

    The skip is read from the preconditioner's own flag, the increment of its
    `skipped_steps`, so gradients and statistics are checked once. The state
    has `optax.chain`'s structure.
    """
    optimizer = optax.with_extra_args_support(optimizer)

    def init_fn(params: optax.Params) -> tuple[Any, Any]:
        return preconditioner.init(params), optimizer.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        preconditioner_state, optimizer_state = state
        directions, new_preconditioner_state = preconditioner.update(
            updates, preconditioner_state, params, **extra_args
        )
        skipped = (
            new_preconditioner_state.skipped_steps != preconditioner_state.skipped_steps
        )
        # The optimizer runs on every step (one compiled step); `where` drops
        # its result on a skipped one, so no NaN, and no zero either, enters
        # its momentum.
        new_updates, new_optimizer_state = optimizer.update(
            directions, optimizer_state, params, **extra_args
        )
        new_updates = optax.tree.where(
            skipped, optax.tree.zeros_like(new_updates), new_updates
        )
        new_optimizer_state = optax.tree.where(
            skipped, optimizer_state, new_optimizer_state
        )
        return new_updates, (new_preconditioner_state, new_optimizer_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


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
