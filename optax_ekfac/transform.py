"""`scale_by_ekfac` and `ekfac`: the EKFAC preconditioner as optax transforms.

Per block, from the rows of a batch of examples `n` with positions `p` each
(input rows `a`, output rows `d`, see `layers.py`) and a loss averaged over
`N` loss terms:

    A ← EMA  mean_{n,p} a aᵀ                 input factor
    B ← EMA  (1/N) Σ_{n,p} d dᵀ              output factor
    U_A, U_B = eigh(A), eigh(B)              every `eigen_update_every` updates
    S ← EMA  (1/N) Σ_n (U_Aᵀ G_n U_B)²        scalings, G_n = Σ_p a dᵀ
    G ↦ U_A [(U_Aᵀ G U_B) / (S + λ')] U_Bᵀ    λ' = max(λ, ρ max S), ρ = 100 eps

`N` is the number of loss terms the loss averages (`Statistics.num_terms`,
times the label samples of a Monte-Carlo Fisher), not the number of
examples: the curvature is the Fisher of the mean loss `loss_fn` defines, so
`[B, T]` token losses divide by `B * T`, and the same model written on
`[B * T]` rows gets the same factors. With one loss term and one position per
example (an MLP) `A ⊗ B` is K-FAC's estimate of the Fisher
`(1/N) Σ_n vec(G_n) vec(G_n)ᵀ`. With weight sharing (sequences, image
positions, a module called twice) `A` averages over positions and `B` sums
over each example's positions: the KFAC-expand convention (Eschenhagen et
al., 2023), whose `A ⊗ B` is the Fisher when positions are independent;
`weight_sharing="reduce"` is KFAC-reduce (positions summed per example before
the outer products). The scalings are the exact second moments of the
per-example gradients in the eigenbasis (`scalings="exact"`, per-example
tensors in memory-bounded chunks) or, treating every position as its own
example, `(1/N) Σ_{n,p} (U_Aᵀa)² (U_Bᵀd)²ᵀ`: two matmuls
(`scalings="per_position"`, identical when `P = 1`).

The running averages are bias-corrected, so after the first update they hold
exactly the first batch's estimates; the scalings restart whenever the basis
changes. Factors and scalings are refreshed every `stats_update_every`
updates; both periods are `lax.cond`s on the count, so one compiled step
serves every step. KFAC is the same path with `S = outer(eigvals(A),
eigvals(B))`.

Parameters no block owns get a diagonal: `g / (v + λ)` with `v` the running
average of `N g²`, which estimates the per-example second moment from the
batch gradient `g` of a mean over `N` loss terms.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optax_ekfac import distributed
from optax_ekfac import layers as layers_lib
from optax_ekfac.capture import Statistics
from optax_ekfac.layers import Block, Layers, LayerStats

_DEFAULT_MAX_PER_EXAMPLE_ELEMENTS = 2**22
# The damping is at least this many machine epsilons times a block's largest
# scaling (`relative_damping_floor`), chosen by benchmarks/float32_eigh.py.
_RELATIVE_DAMPING_FLOOR_EPS = 100


class BlockState(NamedTuple):
    """The curvature of one block.

    A grouped convolution stacks its groups on a leading axis of every field.

    Attributes:
        input_factor: `A`, `(input_dim, input_dim)`; for an embedding the
            diagonal of `A`, `(input_dim,)`.
        output_factor: `B`, `(output_dim, output_dim)`.
        input_eigenbasis: `U_A`, eigenvectors of `A` in its columns; None for
            an embedding (the identity).
        output_eigenbasis: `U_B`, eigenvectors of `B` in its columns.
        scalings: `S`, `(input_dim, output_dim)`: the curvature along each
            pair of eigenvectors, before damping.
    """

    input_factor: jax.Array
    output_factor: jax.Array
    input_eigenbasis: jax.Array | None
    output_eigenbasis: jax.Array
    scalings: jax.Array


class ScaleByEkfacState(NamedTuple):
    """State of `scale_by_ekfac`: arrays only, so it checkpoints as a pytree.

    `orbax.checkpoint` saves and restores it (restore into
    `jax.eval_shape(tx.init, params)`); an embedding's `input_eigenbasis` is
    None, which orbax keeps as an empty subtree.

    Attributes:
        count: updates applied so far; a skipped step (non-finite gradients or
            statistics) does not count, so the amortization schedule and the
            bias correction continue as if it never happened.
        stats_count: statistics refreshes so far (bias correction of the
            factors and of `second_moments`).
        scalings_count: scalings refreshes since the eigenbases last changed.
        skipped_steps: steps skipped so far because their gradients or
            statistics held a NaN or an infinity.
        blocks: block name -> `BlockState`.
        second_moments: fallback parameter path (joined with "/") -> running
            average of `N g²`.
    """

    count: jax.Array
    stats_count: jax.Array
    scalings_count: jax.Array
    skipped_steps: jax.Array
    blocks: dict[str, BlockState]
    second_moments: dict[str, jax.Array]


def scale_by_ekfac(
    layers: Layers,
    *,
    damping: float | jax.Array = 1e-3,
    decay: float = 0.95,
    eigen_update_every: int = 10,
    stats_update_every: int = 1,
    eigenvalue_correction: bool = True,
    scalings: str = "exact",
    weight_sharing: str = "expand",
    max_per_example_elements: int | None = None,
    factor_dtype: Any = None,
    eigh_dtype: Any = None,
    distribute_eigh: bool = True,
    axis_name: str = "data",
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
    _check_hyperparameters(
        damping=damping,
        decay=decay,
        eigen_update_every=eigen_update_every,
        stats_update_every=stats_update_every,
        max_per_example_elements=max_per_example_elements,
    )
    for name, value, allowed in (
        ("scalings", scalings, ("exact", "per_position")),
        ("weight_sharing", weight_sharing, ("expand", "reduce")),
    ):
        if value not in allowed:
            raise ValueError(
                f"scale_by_ekfac: {name} must be one of {allowed}, got {value!r}."
            )
    if eigh_dtype is not None:
        eigh_dtype = jnp.dtype(eigh_dtype)
        if eigh_dtype not in (jnp.float32, jnp.float64):
            raise ValueError(
                "scale_by_ekfac: eigh_dtype must be jnp.float32 or jnp.float64 "
                f"(or None for the factor dtype), got {eigh_dtype}."
            )
        if eigh_dtype == jnp.float64 and not jax.config.jax_enable_x64:
            raise ValueError(
                "scale_by_ekfac: eigh_dtype=float64 needs 64-bit JAX: call "
                "jax.config.update('jax_enable_x64', True) at startup, or use "
                "float32; without it JAX would silently compute in float32."
            )
    # Decay per update, not per refresh: refreshes k updates apart decay by d^k.
    refresh_decay = decay**stats_update_every
    settings = _Settings(
        decay=refresh_decay,
        eigenvalue_correction=eigenvalue_correction,
        exact_scalings=scalings == "exact",
        reduce_positions=weight_sharing == "reduce",
        max_per_example_elements=int(
            _DEFAULT_MAX_PER_EXAMPLE_ELEMENTS
            if max_per_example_elements is None
            else max_per_example_elements
        ),
        eigh_dtype=eigh_dtype,
        distribute_eigh=bool(distribute_eigh),
        axis_name=axis_name,
    )
    if not isinstance(layers, Layers):
        raise TypeError(
            f"scale_by_ekfac: layers must be the Layers from Curvature.layers, "
            f"not {type(layers).__name__}."
        )

    def dtype_of(leaf) -> Any:
        return factor_dtype or jnp.promote_types(leaf.dtype, jnp.float32)

    def init_fn(params: optax.Params) -> ScaleByEkfacState:
        leaves = _checked_leaves(layers, params, "params")
        blocks = {}
        for block in layers.blocks:
            dtype = dtype_of(leaves[block.param_paths[0]])
            blocks[block.name] = _initial_block_state(block, dtype)
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

    def update_fn(
        updates: optax.Updates,
        state: ScaleByEkfacState,
        params: optax.Params | None = None,
        *,
        stats: Statistics | None = None,
        **extra_args: Any,
    ) -> tuple[optax.Updates, ScaleByEkfacState]:
        del params, extra_args
        _check_stats(layers, stats)
        grads = _checked_leaves(layers, updates, "updates")
        _check_state(layers, state, grads)
        # One flag for the whole step, computed in the compiled step: a NaN or
        # an infinity anywhere in the gradients or statistics skips the
        # refresh (no eigh of a NaN factor) and leaves the state as it was.
        finite = _all_finite(updates, stats.layers)
        refresh_stats = finite & (state.count % stats_update_every == 0)
        refresh_eigen = refresh_stats & (state.count % eigen_update_every == 0)
        stats_count = state.stats_count + refresh_stats.astype(jnp.int32)
        scalings_count = jnp.where(
            refresh_eigen, 0, state.scalings_count
        ) + refresh_stats.astype(jnp.int32)

        def refresh(blocks, second_moments):
            blocks = _refresh_blocks(
                layers.blocks,
                blocks,
                stats,
                settings,
                stats_count,
                scalings_count,
                refresh_eigen,
            )
            second_moments = {
                key: _ema(
                    moment,
                    stats.num_terms * jnp.square(grads[tuple(key.split("/"))]),
                    refresh_decay,
                    stats_count,
                )
                for key, moment in second_moments.items()
            }
            return blocks, second_moments

        blocks, second_moments = jax.lax.cond(
            refresh_stats,
            refresh,
            lambda blocks, second_moments: (blocks, second_moments),
            state.blocks,
            state.second_moments,
        )

        preconditioned = {}
        for block in layers.blocks:
            block_state = blocks[block.name]
            gradient = layers_lib.block_matrix(block, grads)
            floor = relative_damping_floor(
                block_state.scalings.dtype, settings.eigh_dtype
            )
            if block.grouped:
                direction = jax.vmap(precondition, in_axes=(0, 0, None, None))(
                    block_state, gradient, damping, floor
                )
            else:
                direction = precondition(block_state, gradient, damping, floor)
            preconditioned.update(layers_lib.block_leaves(block, direction, grads))
        for key, moment in second_moments.items():
            path = tuple(key.split("/"))
            grad = grads[path]
            preconditioned[path] = (
                grad.astype(moment.dtype) / (moment + damping)
            ).astype(grad.dtype)

        flat, treedef = jax.tree_util.tree_flatten_with_path(updates)
        new_updates = jax.tree_util.tree_unflatten(
            treedef, [preconditioned[layers_lib.path_names(p)] for p, _ in flat]
        )
        # A skipped step hands the gradients on as they came, for
        # `optax.apply_if_finite` (or the caller) to reject.
        new_updates = optax.tree.where(finite, new_updates, updates)
        new_state = ScaleByEkfacState(
            count=jnp.where(finite, optax.safe_increment(state.count), state.count),
            stats_count=stats_count,
            scalings_count=scalings_count,
            skipped_steps=jnp.where(
                finite, state.skipped_steps, optax.safe_increment(state.skipped_steps)
            ),
            blocks=blocks,
            second_moments=second_moments,
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def ekfac(
    layers: Layers,
    learning_rate: optax.ScalarOrSchedule,
    *,
    momentum: float | None = None,
    nesterov: bool = False,
    **ekfac_settings: Any,
) -> optax.GradientTransformationExtraArgs:
    """EKFAC-preconditioned SGD: `scale_by_ekfac` chained with `optax.sgd`.

    A step whose gradients or statistics hold a NaN or an infinity is skipped
    as a whole: the updates are zeros, so the parameters stay as they were,
    and the state is unchanged (`optax.sgd`'s momentum and schedule count
    included) except `skipped_steps` of the `ScaleByEkfacState`. This holds
    also when only the statistics are non-finite: the finite gradients are
    not applied unpreconditioned. The decision is made inside the compiled
    step. (`scale_by_ekfac` alone returns the gradients of such a step as
    they came, for `optax.apply_if_finite` or the caller to reject.)

    Args:
        layers: the blocks, from `Curvature.layers`.
        learning_rate: a scalar or an optax schedule.
        momentum: heavy-ball momentum of the preconditioned direction, or None.
        nesterov: use Nesterov momentum.
        **ekfac_settings: keyword arguments of `scale_by_ekfac` (`damping`,
            `decay`, `eigen_update_every`, ...).

    Returns:
        An `optax.GradientTransformationExtraArgs` whose update takes `stats=`.
        Its state is that of `optax.chain(scale_by_ekfac(...), optax.sgd(...))`:
        `(ScaleByEkfacState, sgd state)`.

    Example:
        >>> tx = optax_ekfac.ekfac(layers, learning_rate=0.1, momentum=0.9)
        >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    """
    return _skipping_non_finite_steps(
        scale_by_ekfac(layers, **ekfac_settings),
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
            new_preconditioner_state.skipped_steps
            != preconditioner_state.skipped_steps
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


def precondition(
    block_state: BlockState,
    gradient: jax.Array,
    damping: float | jax.Array,
    min_relative_damping: float | None = None,
) -> jax.Array:
    """`U_A [(U_Aᵀ G U_B) / (S + λ')] U_Bᵀ` for one block matrix `G`.

    The damping used is `λ' = max(λ, ρ · max(S))`: at least a fraction `ρ` of
    the block's largest scaling, so that the curvature the preconditioner
    inverts has a condition number of at most `1 + 1/ρ` (see
    `relative_damping_floor`). `‖result‖ ≤ ‖G‖ / λ' ≤ ‖G‖ / λ`.

    Args:
        block_state: the curvature of the block (one group of a grouped one).
        gradient: `G`, `(input_dim, output_dim)`.
        damping: `λ`.
        min_relative_damping: `ρ`; None for `relative_damping_floor` of the
            state's dtype, 0 for `λ' = λ`.

    Returns:
        The preconditioned block matrix, in the state's dtype.
    """
    input_basis = block_state.input_eigenbasis
    output_basis = block_state.output_eigenbasis
    scalings = block_state.scalings
    if min_relative_damping is None:
        min_relative_damping = relative_damping_floor(scalings.dtype)
    damping = jnp.maximum(damping, min_relative_damping * scalings.max())
    projected = gradient.astype(output_basis.dtype) @ output_basis
    if input_basis is not None:
        projected = input_basis.T @ projected
    projected = projected / (scalings + damping)
    if input_basis is not None:
        projected = input_basis @ projected
    return projected @ output_basis.T


def relative_damping_floor(dtype: Any, eigh_dtype: Any = None) -> float:
    """`ρ = 100 eps`: the smallest damping, relative to a block's largest
    scaling, that `scale_by_ekfac` uses (float32: 1.2e-5; float64: 2.2e-14).

    `eps` is the machine epsilon of the less precise of the state's dtype and
    the dtype of the eigendecompositions. Round-off in the factors, their
    eigenvectors, the scalings and the gradient perturbs the curvature by
    about `eps · max(S)` in every direction; a damping well above that keeps
    the update within about `eps / ρ` (relative) of the exact one for that
    damping, where a smaller one would divide round-off by almost nothing.
    """
    eps = max(
        float(jnp.finfo(dtype).eps),
        float(jnp.finfo(eigh_dtype).eps) if eigh_dtype is not None else 0.0,
    )
    return _RELATIVE_DAMPING_FLOOR_EPS * eps


class _Settings(NamedTuple):
    decay: float
    eigenvalue_correction: bool
    exact_scalings: bool
    reduce_positions: bool
    max_per_example_elements: int
    eigh_dtype: Any = None
    distribute_eigh: bool = True
    axis_name: str = "data"


def _initial_block_state(block: Block, dtype: Any) -> BlockState:
    """Zero factors and scalings, identity eigenbases (replaced at update 1)."""
    stack = (block.num_groups,) if block.grouped else ()

    def eye(size):
        return jnp.broadcast_to(jnp.eye(size, dtype=dtype), stack + (size, size))

    input_dim, output_dim = block.input_dim, block.output_dim
    return BlockState(
        input_factor=jnp.zeros(
            stack + ((input_dim,) if block.diagonal_input else (input_dim,) * 2),
            dtype,
        ),
        output_factor=jnp.zeros(stack + (output_dim, output_dim), dtype),
        input_eigenbasis=None if block.diagonal_input else eye(input_dim),
        output_eigenbasis=eye(output_dim),
        scalings=jnp.zeros(stack + (input_dim, output_dim), dtype),
    )


def _refresh_blocks(
    blocks: tuple[Block, ...],
    states: dict[str, BlockState],
    stats: Statistics,
    settings: _Settings,
    stats_count: jax.Array,
    scalings_count: jax.Array,
    refresh_eigen: jax.Array,
) -> dict[str, BlockState]:
    """New factors, eigenbases (when due) and scalings of every block.

    The eigendecompositions of all blocks are one `lax.cond`, so that they can
    be spread over the devices of a mesh axis together (`_eigenbases`).
    """
    rows, factors = {}, {}
    for block in blocks:
        dtype = states[block.name].output_factor.dtype
        block_stats = stats.layers[block.name]
        rows[block.name] = layers_lib.example_rows(block, block_stats, dtype) + (
            layers_lib.attend_rows(block, block_stats, dtype)
            if block.diagonal_input
            else None,
        )
        factors[block.name] = _refreshed_factors(
            block,
            states[block.name],
            rows[block.name],
            stats.num_sampled_terms,
            settings,
            stats_count,
        )

    def keep(factors):
        del factors
        return {
            name: (state.input_eigenbasis, state.output_eigenbasis, state.scalings)
            for name, state in states.items()
        }

    bases = jax.lax.cond(
        refresh_eigen,
        lambda factors: _eigenbases(blocks, factors, settings),
        keep,
        factors,
    )
    refreshed = {}
    for block in blocks:
        input_basis, output_basis, scalings = bases[block.name]
        if settings.eigenvalue_correction:
            scalings = _refreshed_scalings(
                block,
                rows[block.name],
                bases[block.name],
                stats.num_sampled_terms,
                settings,
                scalings_count,
            )
        refreshed[block.name] = BlockState(
            *factors[block.name], input_basis, output_basis, scalings
        )
    return refreshed


def _refreshed_factors(
    block: Block,
    state: BlockState,
    rows: tuple,
    num_terms: Any,
    settings: _Settings,
    stats_count: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The running averages of `A` and `B` after one batch of rows."""
    input_rows, output_rows, attend_rows = rows

    def batch_factors(input_rows, output_rows):
        return _batch_factors(
            block, input_rows, output_rows, attend_rows, num_terms, settings
        )

    if block.grouped:
        batch_factors = jax.vmap(batch_factors)
    input_batch, output_batch = batch_factors(input_rows, output_rows)
    return (
        _ema(state.input_factor, input_batch, settings.decay, stats_count),
        _ema(state.output_factor, output_batch, settings.decay, stats_count),
    )


def _refreshed_scalings(
    block: Block,
    rows: tuple,
    bases: tuple,
    num_terms: Any,
    settings: _Settings,
    scalings_count: jax.Array,
) -> jax.Array:
    """The running average of `S` in the current eigenbases after one batch."""
    input_rows, output_rows, attend_rows = rows
    input_basis, output_basis, scalings = bases

    def batch_scalings(input_rows, output_rows, input_basis, output_basis):
        return _batch_scalings(
            block,
            input_rows,
            output_rows,
            attend_rows,
            input_basis,
            output_basis,
            num_terms,
            settings,
        )

    if block.grouped:
        batch_scalings = jax.vmap(batch_scalings)
    batch = batch_scalings(input_rows, output_rows, input_basis, output_basis)
    return _ema(scalings, batch, settings.decay, scalings_count)


def _eigenbases(
    blocks: tuple[Block, ...],
    factors: dict[str, tuple[jax.Array, jax.Array]],
    settings: _Settings,
) -> dict[str, tuple[jax.Array | None, jax.Array, jax.Array]]:
    """Per block `(U_A, U_B, outer(eigvals(A), eigvals(B)))` of new factors.

    With `settings.distribute_eigh` and a mesh whose `settings.axis_name` has
    `D > 1` devices, each device decomposes about `1/D` of the factors
    (balanced by `G d³`, `G` groups of `d x d`) and the results are shared.
    """
    matrices, costs = [], []
    for block in blocks:
        input_factor, output_factor = factors[block.name]
        # An embedding's input factor is diagonal: nothing to decompose.
        own = (output_factor,) if block.diagonal_input else factors[block.name]
        matrices += own
        costs += [block.num_groups * factor.shape[-1] ** 3 for factor in own]

    def eigh(factor):
        return _symmetric_eigh(factor, settings.eigh_dtype)

    if settings.distribute_eigh:
        decomposed = distributed.map_over_axis(
            eigh, matrices, costs, settings.axis_name
        )
    else:
        decomposed = [eigh(matrix) for matrix in matrices]
    decomposed = iter(decomposed)
    bases = {}
    for block in blocks:
        input_factor, _ = factors[block.name]
        if block.diagonal_input:
            input_eigenvalues, input_basis = jnp.maximum(input_factor, 0), None
        else:
            input_eigenvalues, input_basis = next(decomposed)
        output_eigenvalues, output_basis = next(decomposed)
        kfac_scalings = jnp.einsum(
            "...i,...o->...io", input_eigenvalues, output_eigenvalues
        )
        bases[block.name] = (input_basis, output_basis, kfac_scalings)
    return bases


def _batch_factors(
    block: Block,
    input_rows: jax.Array,
    output_rows: jax.Array,
    attend_rows: tuple[jax.Array, jax.Array] | None,
    num_terms: Any,
    settings: _Settings,
) -> tuple[jax.Array, jax.Array]:
    """`A` and `B` of one batch from rows `[N, P, dim]` (embedding: ids `[N, P]`
    and the rows of its `attend` calls).

    `A` is a mean over the rows; `B` sums the output gradients' outer products
    and divides by `num_terms`, the loss terms the loss averages (see the
    module docstring): the loss's scale lives in `B` and in the scalings.
    """
    num_examples, num_positions = output_rows.shape[:2]
    if block.diagonal_input:
        # One-hot rows: diag(A) counts the tokens; attend rows add their squares.
        input_factor = jnp.zeros(block.input_dim, output_rows.dtype)
        input_factor = input_factor.at[input_rows.reshape(-1)].add(
            1, out_sharding=_sharding_of(input_factor)
        )
        output_factor = _sum_over_examples("npi,npj->ij", output_rows, output_rows)
        if attend_rows is not None:
            vocabulary_rows, feature_rows = attend_rows
            num_positions += vocabulary_rows.shape[1]
            input_factor += jnp.square(vocabulary_rows).sum((0, 1))
            output_factor += _sum_over_examples(
                "npi,npj->ij", feature_rows, feature_rows
            )
        return (
            input_factor / (num_examples * num_positions),
            output_factor / num_terms,
        )
    if settings.reduce_positions:
        input_rows = input_rows.mean(1, keepdims=True)
        output_rows = output_rows.sum(1, keepdims=True)
        num_positions = 1
    flat_inputs = input_rows.reshape(-1, block.input_dim)
    input_factor = _sum_over_examples("ni,nj->ij", flat_inputs, flat_inputs)
    input_factor /= flat_inputs.shape[0]
    flat_outputs = output_rows.reshape(-1, block.output_dim)
    output_factor = _sum_over_examples("ni,nj->ij", flat_outputs, flat_outputs)
    output_factor /= num_terms
    return input_factor, output_factor


def _batch_scalings(
    block: Block,
    input_rows: jax.Array,
    output_rows: jax.Array,
    attend_rows: tuple[jax.Array, jax.Array] | None,
    input_basis: jax.Array | None,
    output_basis: jax.Array,
    num_terms: Any,
    settings: _Settings,
) -> jax.Array:
    """`(1/N) Σ_n (U_Aᵀ G_n U_B)²` (or its per-position form) of one batch,
    `N = num_terms`."""
    num_positions = output_rows.shape[1]
    projected_outputs = output_rows @ output_basis
    if block.diagonal_input:
        # Per position: row `id` of S gathers (U_Bᵀ d)² of that token.
        squares = jnp.square(projected_outputs).reshape(-1, block.output_dim)
        scalings = jnp.zeros((block.input_dim, block.output_dim), squares.dtype)
        scalings = scalings.at[input_rows.reshape(-1)].add(
            squares, out_sharding=_sharding_of(scalings)
        )
        if attend_rows is not None:
            vocabulary_rows, feature_rows = attend_rows
            scalings += _sum_over_examples(
                "npv,npf->vf",
                jnp.square(vocabulary_rows),
                jnp.square(feature_rows @ output_basis),
            )
        return scalings / num_terms
    projected_inputs = input_rows @ input_basis
    if num_positions == 1 or not settings.exact_scalings:
        # Two matmuls: Σ_{n,p} (U_Aᵀa)² (U_Bᵀd)²ᵀ.
        return (
            _sum_over_examples(
                "npi,npo->io",
                jnp.square(projected_inputs),
                jnp.square(projected_outputs),
            )
            / num_terms
        )
    return (
        _sum_of_squared_per_example_gradients(
            projected_inputs,
            projected_outputs,
            settings.max_per_example_elements,
            settings.axis_name,
        )
        / num_terms
    )


def _sum_of_squared_per_example_gradients(
    inputs: jax.Array, outputs: jax.Array, max_elements: int, axis_name: str
) -> jax.Array:
    """`Σ_n (Σ_p a_{n,p} d_{n,p}ᵀ)²` in chunks of at most `max_elements`.

    The examples are grouped by the shard of the example axis that holds them
    (see `_example_shards`) and each group is cut into chunks: every scan
    step takes one chunk of every shard, so each device works on its own
    examples at every step, keeps its partial sum, and the shards are summed
    once at the end. The bound holds per shard.
    """
    num_examples, num_positions, input_dim = inputs.shape
    output_dim = outputs.shape[-1]
    example_sharding = jax.typeof(inputs).sharding
    num_shards = _example_shards(inputs, axis_name)
    per_shard = num_examples // num_shards
    chunk = max(1, min(per_shard, max_elements // (input_dim * output_dim)))

    def by_shard(rows):  # [N, P, d] -> [shards, N / shards, P, d], no transfer
        return rows.reshape((num_shards, per_shard) + rows.shape[1:])

    def chunk_sum(inputs, outputs):
        per_example = jnp.einsum("snpi,snpo->snio", inputs, outputs)
        return jnp.square(per_example).sum(1)  # [shards, i, o]

    if chunk == per_shard:
        return chunk_sum(by_shard(inputs), by_shard(outputs)).sum(0)
    num_chunks = -(-per_shard // chunk)
    padding = [(0, 0), (0, num_chunks * chunk - per_shard), (0, 0), (0, 0)]

    def chunked(rows):
        rows = jnp.pad(by_shard(rows), padding)  # zero examples add nothing
        rows = rows.reshape((num_shards, num_chunks, chunk) + rows.shape[2:])
        return jnp.moveaxis(rows, 1, 0)  # [chunks, shards, chunk, P, d]

    def add_chunk(total, rows):
        return total + chunk_sum(*rows), None

    partial_sharding = jax.sharding.NamedSharding(
        example_sharding.mesh, jax.sharding.PartitionSpec(example_sharding.spec[0])
    )
    initial = jnp.zeros(
        (num_shards, input_dim, output_dim), inputs.dtype, out_sharding=partial_sharding
    )
    total, _ = jax.lax.scan(add_chunk, initial, (chunked(inputs), chunked(outputs)))
    return total.sum(0)


def _example_shards(rows: jax.Array, axis_name: str) -> int:
    """Into how many shards the example axis (axis 0) of `rows` is split.

    An explicit mesh says so in the type. An auto one (GSPMD) does not: with
    `axis_name` in the ambient mesh, the batch is taken to be split over it,
    as data parallelism does (a wrong guess only reorders the chunks).
    """
    num_examples = rows.shape[0]
    num_shards = num_examples // jax.typeof(rows).sharding.shard_shape(rows.shape)[0]
    mesh = jax.sharding.get_abstract_mesh()
    if (
        num_shards == 1
        and axis_name in mesh.axis_names
        and axis_name in mesh.auto_axes
        and num_examples % mesh.shape[axis_name] == 0
    ):
        num_shards = mesh.shape[axis_name]
    return num_shards


def _sum_over_examples(subscripts: str, *operands: jax.Array) -> jax.Array:
    """`jnp.einsum` of rows that sums over the examples (and positions).

    With the batch sharded along the example axis under an explicit mesh, JAX
    asks where a contraction over that axis should go: the sum over the
    global batch is replicated, like the state it joins (an all-reduce).
    """
    replicated = jax.sharding.NamedSharding(
        jax.sharding.get_abstract_mesh(), jax.sharding.PartitionSpec()
    )
    return jnp.einsum(subscripts, *operands, out_sharding=replicated)


def _sharding_of(array: jax.Array) -> jax.sharding.Sharding:
    """The sharding in `array`'s type (replicated for a fresh `jnp.zeros`).

    Scatter-adds of batch rows (sharded along the example axis under an
    explicit mesh) into a replicated table need it as `out_sharding`: JAX
    does not guess whether the result should be sharded or reduced.
    """
    return jax.typeof(array).sharding


def _symmetric_eigh(
    factor: jax.Array, dtype: Any = None
) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clipped at 0 against round-off) and eigenvectors.

    Of the symmetrized factor (round-off leaves the EMA slightly asymmetric),
    or of each of a stack of factors; computed in `dtype` (None: the factor's,
    at least float32) and returned in the factor's dtype.
    """
    dtype = dtype or jnp.promote_types(factor.dtype, jnp.float32)
    eigenvalues, eigenvectors = jnp.linalg.eigh(
        factor.astype(dtype), symmetrize_input=True
    )
    return (
        jnp.maximum(eigenvalues, 0).astype(factor.dtype),
        eigenvectors.astype(factor.dtype),
    )


def _ema(
    average: jax.Array, value: jax.Array, decay: float, count: jax.Array
) -> jax.Array:
    """Bias-corrected running average after `count` values (`count >= 1`).

    Stored corrected: the newest value weighs `(1 - decay) / (1 - decay^count)`,
    so the first value replaces the average outright.
    """
    dtype = average.dtype
    weight = (1 - decay) / (1 - jnp.asarray(decay, dtype) ** count.astype(dtype))
    return average + weight * (value.astype(dtype) - average)


def _checked_leaves(layers: Layers, tree: Any, what: str) -> dict:
    """The leaves of `tree` by path, once they match the layers' parameters."""
    leaves = layers_lib.leaves_by_path(tree)
    for block in layers.blocks:
        for path, size in zip(block.param_paths, _param_sizes(block)):
            if path not in leaves:
                raise ValueError(
                    f"scale_by_ekfac: {what} has no {'/'.join(path)} for block "
                    f"{block.name}; were the layers built for another model?"
                )
            shape = leaves[path].shape
            if math.prod(shape) != size:
                raise ValueError(
                    f"scale_by_ekfac: {what} hold {'/'.join(path)} of shape "
                    f"{shape}, but block {block.name} has {size} elements there; "
                    "were the layers built for another model?"
                )
    for path in layers.fallback:
        if path not in leaves:
            raise ValueError(
                f"scale_by_ekfac: {what} has no {'/'.join(path)}; were the layers "
                "built for another model?"
            )
    known = set(layers.fallback).union(*(block.param_paths for block in layers.blocks))
    unknown = sorted("/".join(path) for path in leaves if path not in known)
    if unknown:
        raise ValueError(
            f"scale_by_ekfac: {what} hold {unknown}, which the layers do not "
            "know; were the layers built for another model?"
        )
    return leaves


def _param_sizes(block: Block) -> tuple[int, ...]:
    """Number of elements of the kernel (and bias) of a block."""
    features = block.output_dim * block.num_groups
    kernel = (block.input_dim - block.has_bias) * features
    return (kernel, features) if block.has_bias else (kernel,)


def _check_state(layers: Layers, state: Any, grads: dict) -> None:
    """Raises unless `state` is this transformation's state for these layers."""
    if not isinstance(state, ScaleByEkfacState):
        raise TypeError(
            "scale_by_ekfac: state must be the ScaleByEkfacState from init, not "
            f"{type(state).__name__}; restore checkpoints into a target such as "
            "jax.eval_shape(tx.init, params)."
        )
    expected = {block.name for block in layers.blocks}
    if set(state.blocks) != expected:
        raise ValueError(
            f"scale_by_ekfac: the state holds blocks {sorted(state.blocks)}, the "
            f"layers {sorted(expected)}; is the state from another model?"
        )
    for block in layers.blocks:
        held = state.blocks[block.name].scalings.shape[-2:]
        if held != (block.input_dim, block.output_dim):
            raise ValueError(
                f"scale_by_ekfac: the state holds scalings of shape {held} for "
                f"{block.name}, whose block is "
                f"{(block.input_dim, block.output_dim)}; is the state from "
                "another model?"
            )
    fallback = {"/".join(path) for path in layers.fallback}
    if set(state.second_moments) != fallback:
        raise ValueError(
            "scale_by_ekfac: the state holds second moments for "
            f"{sorted(state.second_moments)}, the layers' fallback is "
            f"{sorted(fallback)}; is the state from another model?"
        )
    for key, moment in state.second_moments.items():
        shape = grads[tuple(key.split("/"))].shape
        if shape != moment.shape:
            raise ValueError(
                f"scale_by_ekfac: updates hold {key} of shape {shape}, the state "
                f"{moment.shape}; is the state from another model?"
            )


def _all_finite(*trees: Any) -> jax.Array:
    """Whether no floating-point leaf holds a NaN or an infinity: one scalar.

    One reduction per leaf, which XLA fuses with the reads the step does
    anyway (the same check as `optax.apply_if_finite`). Integer leaves (token
    ids) are always finite.
    """
    checks = [
        jnp.isfinite(leaf).all()
        for leaf in jax.tree.leaves(trees)
        if jnp.issubdtype(leaf.dtype, jnp.inexact)
    ]
    return jnp.all(jnp.asarray(checks, bool)) if checks else jnp.asarray(True)


def _check_stats(layers: Layers, stats: Any) -> None:
    """Raises unless `stats` hold every block's calls, in the layers' shapes.

    Only feature shapes are checked: the number of examples may differ from
    the batch the layers were built from (a last partial batch, a Monte-Carlo
    Fisher's samples) but must be the same for all calls of one block.
    """
    if stats is None:
        raise ValueError(
            "scale_by_ekfac: update needs the batch statistics: "
            "tx.update(grads, state, params, stats=stats) with stats from "
            "Curvature.value_grad_and_stats."
        )
    if not isinstance(stats, Statistics):
        raise TypeError(
            "scale_by_ekfac: stats must be the Statistics from "
            f"Curvature.value_grad_and_stats, not {type(stats).__name__}."
        )
    expected = {block.name for block in layers.blocks}
    missing = sorted(expected - set(stats.layers))
    extra = sorted(set(stats.layers) - expected)
    if missing or extra:
        raise ValueError(
            "scale_by_ekfac: the stats do not match the layers: missing stats for "
            f"{missing or 'none'}, stats for unknown layers {extra or 'none'}. "
            "Were they captured from another model?"
        )
    for block in layers.blocks:
        calls = stats.layers[block.name]
        if not (
            isinstance(calls, tuple | list)
            and all(isinstance(call, LayerStats) for call in calls)
        ):
            raise TypeError(
                f"scale_by_ekfac: stats.layers[{block.name!r}] must be a tuple "
                f"of LayerStats (one per call), not {type(calls).__name__}."
            )
        if len(calls) != block.num_calls:
            raise ValueError(
                f"scale_by_ekfac: {block.name} was called {len(calls)} times in "
                f"the stats, {block.num_calls} in the layers."
            )
        methods = block.call_methods or ("__call__",) * block.num_calls
        for call, method in zip(calls, methods):
            layers_lib.check_call(block, call, method)
            if (
                block.kind == "Embed"
                and method == "__call__"
                and not jnp.issubdtype(call.inputs.dtype, jnp.integer)
            ):
                raise ValueError(
                    f"scale_by_ekfac: stats for {block.name} hold embedding "
                    f"inputs of dtype {call.inputs.dtype}, not token ids."
                )
        num_examples = sorted({call.inputs.shape[0] for call in calls})
        if len(num_examples) > 1 or num_examples[0] < 1:
            raise ValueError(
                f"scale_by_ekfac: the calls of {block.name} hold {num_examples} "
                "examples; the calls of one module are positions of the same "
                "examples, so they need the same leading (example) axis, of at "
                "least one example."
            )


def _check_hyperparameters(
    *,
    damping: Any,
    decay: Any,
    eigen_update_every: Any,
    stats_update_every: Any,
    max_per_example_elements: Any,
) -> None:
    """Range-checks the hyperparameters whose values are known now.

    Python and NumPy numbers and concrete JAX arrays are checked. Traced
    values (those `optax.inject_hyperparams` passes to a jitted update) have
    no value yet and are not: they were checked when `init` ran on concrete
    ones, and a schedule's later values are the schedule's responsibility.
    """
    named = dict(
        damping=damping,
        decay=decay,
        eigen_update_every=eigen_update_every,
        stats_update_every=stats_update_every,
        max_per_example_elements=max_per_example_elements,
    )
    values = {}
    for name, value in named.items():
        if value is None and name == "max_per_example_elements":
            continue
        if callable(value):
            raise TypeError(
                f"scale_by_ekfac: {name} must be a number, not {value!r}; to "
                "schedule it, use optax.inject_hyperparams(scale_by_ekfac)("
                f"layers, {name}=schedule)."
            )
        if jnp.ndim(value) != 0:
            raise ValueError(
                f"scale_by_ekfac: {name} must be a scalar, got shape "
                f"{jnp.shape(value)}."
            )
        if isinstance(value, jax.core.Tracer):
            if name == "max_per_example_elements":
                raise ValueError(
                    "scale_by_ekfac: max_per_example_elements sets array shapes, "
                    "so it cannot be traced: with optax.inject_hyperparams, "
                    "pass static_args=('max_per_example_elements',)."
                )
            continue
        value = np.asarray(value)
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            raise TypeError(f"scale_by_ekfac: {name} must be a number, got {value}.")
        values[name] = value.item()

    def out_of_range(name, rule):
        raise ValueError(f"scale_by_ekfac: {name} must be {rule}, got {named[name]!r}.")

    if "damping" in values and not 0 < values["damping"] < math.inf:
        # Zero would divide by the zero scalings of rank-deficient factors.
        out_of_range("damping", "a finite number > 0 (it bounds the update)")
    if "decay" in values and not 0 <= values["decay"] < 1:
        out_of_range("decay", "in [0, 1)")
    for name in (
        "eigen_update_every",
        "stats_update_every",
        "max_per_example_elements",
    ):
        value = values.get(name)
        if value is not None and not (value >= 1 and value == math.floor(value)):
            out_of_range(name, "an integer >= 1")
    if (
        "eigen_update_every" in values
        and "stats_update_every" in values
        and values["eigen_update_every"] % values["stats_update_every"]
    ):
        raise ValueError(
            "scale_by_ekfac: eigen_update_every must be a multiple of "
            f"stats_update_every (got {eigen_update_every} and "
            f"{stats_update_every}): eigenbases are computed from fresh factors."
        )
