"""`scale_by_ekfac` and `ekfac`: the EKFAC preconditioner as optax transforms.

Per block, from the input rows `a` and output rows `d` of a batch (`R` rows):

    A ← EMA  aᵀa / R                 input factor
    B ← EMA  dᵀd / R                 output factor
    U_A, U_B = eigh(A), eigh(B)      every `eigen_update_every` updates
    S ← EMA  mean_r (U_Aᵀ a_r d_rᵀ U_B)²   scalings, restarted at a new basis
    G ↦ U_A [(U_Aᵀ G U_B) / (S + λ)] U_Bᵀ

The running averages are bias-corrected, so after the first update they hold
exactly the first batch's estimates. Factors and scalings are refreshed every
`stats_update_every` updates; both periods are `lax.cond`s on the count, so one
compiled step serves every step. KFAC is the same path with
`S = outer(eigvals(A), eigvals(B))`.

Parameters no block owns get a diagonal: `g / (v + λ)` with `v` the running
average of `N g²`, which estimates the per-example second moment from the
batch gradient `g` of a mean over `N` loss terms.
"""

import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from optax_ekfac import layers as layers_lib
from optax_ekfac.capture import Statistics
from optax_ekfac.layers import Block, Layers


class BlockState(NamedTuple):
    """The curvature of one block.

    Attributes:
        input_factor: `A`, `(input_dim, input_dim)`.
        output_factor: `B`, `(output_dim, output_dim)`.
        input_eigenbasis: `U_A`, eigenvectors of `A` in its columns.
        output_eigenbasis: `U_B`, eigenvectors of `B` in its columns.
        scalings: `S`, `(input_dim, output_dim)`: the curvature along each
            pair of eigenvectors, before damping.
    """

    input_factor: jax.Array
    output_factor: jax.Array
    input_eigenbasis: jax.Array
    output_eigenbasis: jax.Array
    scalings: jax.Array


class ScaleByEkfacState(NamedTuple):
    """State of `scale_by_ekfac`: arrays only, so it checkpoints as a pytree.

    Attributes:
        count: updates so far.
        stats_count: statistics refreshes so far (bias correction of the
            factors and of `second_moments`).
        scalings_count: scalings refreshes since the eigenbases last changed.
        blocks: block name -> `BlockState`.
        second_moments: fallback parameter path (joined with "/") -> running
            average of `N g²`.
    """

    count: jax.Array
    stats_count: jax.Array
    scalings_count: jax.Array
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
    factor_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """Preconditions gradients with EKFAC (George et al., 2018).

    The update takes the batch statistics as a keyword argument:
    `tx.update(grads, state, params, stats=stats)` with `stats` from
    `Curvature.value_grad_and_stats`. Chain it with a learning rate (or use
    `ekfac`), since it returns the preconditioned gradient, not a step.

    Args:
        layers: the blocks, from `Curvature.layers`.
        damping: `λ`, added to the scalings (and to the diagonal fallback).
            May be scheduled with `optax.inject_hyperparams`.
        decay: running-average decay of factors and scalings, in `[0, 1)`.
        eigen_update_every: eigendecompose the factors at the first update and
            then every this many updates. A multiple of `stats_update_every`.
        stats_update_every: refresh factors and scalings every this many
            updates; preconditioning happens at every update.
        eigenvalue_correction: `True` for EKFAC; `False` for KFAC, whose
            scalings are the outer product of the factors' eigenvalues.
        factor_dtype: dtype of the curvature state; by default each block's
            kernel dtype promoted to at least float32.

    Returns:
        An `optax.GradientTransformationExtraArgs`.

    Example:
        >>> tx = optax.chain(
        ...     optax_ekfac.scale_by_ekfac(layers, damping=1e-3),
        ...     optax.sgd(0.1, momentum=0.9))
        >>> opt_state = tx.init(params)
        >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    """
    _check_hyperparameters(damping, decay, eigen_update_every, stats_update_every)
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
            blocks[block.name] = BlockState(
                input_factor=jnp.zeros((block.input_dim,) * 2, dtype),
                output_factor=jnp.zeros((block.output_dim,) * 2, dtype),
                input_eigenbasis=jnp.eye(block.input_dim, dtype=dtype),
                output_eigenbasis=jnp.eye(block.output_dim, dtype=dtype),
                scalings=jnp.zeros((block.input_dim, block.output_dim), dtype),
            )
        second_moments = {
            "/".join(path): jnp.zeros(leaves[path].shape, dtype_of(leaves[path]))
            for path in layers.fallback
        }
        zero = jnp.zeros([], jnp.int32)
        return ScaleByEkfacState(zero, zero, zero, blocks, second_moments)

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
        refresh_stats = state.count % stats_update_every == 0
        refresh_eigen = state.count % eigen_update_every == 0
        stats_count = state.stats_count + refresh_stats.astype(jnp.int32)
        scalings_count = jnp.where(
            refresh_eigen, 0, state.scalings_count
        ) + refresh_stats.astype(jnp.int32)

        def refresh(blocks, second_moments):
            blocks = {
                block.name: _refresh_block(
                    block,
                    blocks[block.name],
                    stats.layers[block.name],
                    decay,
                    stats_count,
                    scalings_count,
                    refresh_eigen,
                    eigenvalue_correction,
                )
                for block in layers.blocks
            }
            second_moments = {
                key: _ema(
                    moment,
                    stats.num_terms * jnp.square(grads[tuple(key.split("/"))]),
                    decay,
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
            direction = precondition(block_state, gradient, damping)
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
        new_state = ScaleByEkfacState(
            count=optax.safe_increment(state.count),
            stats_count=stats_count,
            scalings_count=scalings_count,
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

    Args:
        layers: the blocks, from `Curvature.layers`.
        learning_rate: a scalar or an optax schedule.
        momentum: heavy-ball momentum of the preconditioned direction, or None.
        nesterov: use Nesterov momentum.
        **ekfac_settings: keyword arguments of `scale_by_ekfac` (`damping`,
            `decay`, `eigen_update_every`, ...).

    Returns:
        An `optax.GradientTransformationExtraArgs` whose update takes `stats=`.

    Example:
        >>> tx = optax_ekfac.ekfac(layers, learning_rate=0.1, momentum=0.9)
        >>> updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
    """
    return optax.chain(
        scale_by_ekfac(layers, **ekfac_settings),
        optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov),
    )


def precondition(
    block_state: BlockState, gradient: jax.Array, damping: float | jax.Array
) -> jax.Array:
    """`U_A [(U_Aᵀ G U_B) / (S + λ)] U_Bᵀ` for one block matrix `G`."""
    input_basis = block_state.input_eigenbasis
    output_basis = block_state.output_eigenbasis
    projected = input_basis.T @ gradient.astype(input_basis.dtype) @ output_basis
    projected = projected / (block_state.scalings + damping)
    return input_basis @ projected @ output_basis.T


def _refresh_block(
    block: Block,
    block_state: BlockState,
    block_stats,
    decay: float,
    stats_count: jax.Array,
    scalings_count: jax.Array,
    refresh_eigen: jax.Array,
    eigenvalue_correction: bool,
) -> BlockState:
    """New factors, eigenbases (when due) and scalings from one batch."""
    dtype = block_state.input_factor.dtype
    input_rows, output_rows = layers_lib.block_rows(block, block_stats, dtype)
    num_rows = input_rows.shape[0]
    input_factor = _ema(
        block_state.input_factor,
        input_rows.T @ input_rows / num_rows,
        decay,
        stats_count,
    )
    output_factor = _ema(
        block_state.output_factor,
        output_rows.T @ output_rows / num_rows,
        decay,
        stats_count,
    )

    def eigendecompose(_):
        input_eigenvalues, input_basis = _symmetric_eigh(input_factor)
        output_eigenvalues, output_basis = _symmetric_eigh(output_factor)
        kfac_scalings = jnp.outer(input_eigenvalues, output_eigenvalues)
        return input_basis, output_basis, kfac_scalings

    def keep(_):
        return (
            block_state.input_eigenbasis,
            block_state.output_eigenbasis,
            block_state.scalings,
        )

    input_basis, output_basis, scalings = jax.lax.cond(
        refresh_eigen, eigendecompose, keep, None
    )
    if eigenvalue_correction:
        # Per-row scalings, two matmuls: mean_r (U_Aᵀa_r)² (U_Bᵀd_r)²ᵀ.
        projected_inputs = jnp.square(input_rows @ input_basis)
        projected_outputs = jnp.square(output_rows @ output_basis)
        batch_scalings = projected_inputs.T @ projected_outputs / num_rows
        scalings = _ema(scalings, batch_scalings, decay, scalings_count)
    return BlockState(input_factor, output_factor, input_basis, output_basis, scalings)


def _symmetric_eigh(factor: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clipped at 0 against round-off) and eigenvectors."""
    eigenvalues, eigenvectors = jnp.linalg.eigh((factor + factor.T) / 2)
    return jnp.maximum(eigenvalues, 0), eigenvectors


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
    leaves = layers_lib.leaves_by_path(tree)
    for block in layers.blocks:
        for path in block.param_paths:
            if path not in leaves:
                raise ValueError(
                    f"scale_by_ekfac: {what} has no {'/'.join(path)} for block "
                    f"{block.name}; were the layers built for another model?"
                )
    for path in layers.fallback:
        if path not in leaves:
            raise ValueError(
                f"scale_by_ekfac: {what} has no {'/'.join(path)}; were the layers "
                "built for another model?"
            )
    return leaves


def _check_stats(layers: Layers, stats: Any) -> None:
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
        if len(calls) != block.num_calls:
            raise ValueError(
                f"scale_by_ekfac: {block.name} was called {len(calls)} times in "
                f"the stats, {block.num_calls} in the layers."
            )
        input_dim = block.input_dim - block.has_bias
        for call in calls:
            if (
                call.inputs.shape[-1] != input_dim
                or call.output_grads.shape[-1] != block.output_dim
                or call.inputs.shape[:-1] != call.output_grads.shape[:-1]
            ):
                raise ValueError(
                    f"scale_by_ekfac: stats for {block.name} have inputs "
                    f"{call.inputs.shape} and output gradients "
                    f"{call.output_grads.shape}; the layer needs [..., {input_dim}] "
                    f"and [..., {block.output_dim}]. Were they captured from "
                    "another model?"
                )


def _check_hyperparameters(damping, decay, eigen_update_every, stats_update_every):
    """Checks the values that are concrete (scheduled ones are traced)."""

    def concrete(value):
        return isinstance(value, numbers.Number) or (
            isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer)
        )

    if concrete(damping) and not damping >= 0:
        raise ValueError(f"scale_by_ekfac: damping must be >= 0, got {damping}.")
    if concrete(decay) and not 0 <= decay < 1:
        raise ValueError(f"scale_by_ekfac: decay must be in [0, 1), got {decay}.")
    for name, period in (
        ("eigen_update_every", eigen_update_every),
        ("stats_update_every", stats_update_every),
    ):
        if concrete(period) and not (int(period) == period and period >= 1):
            raise ValueError(
                f"scale_by_ekfac: {name} must be an integer >= 1, got {period}."
            )
    if (
        concrete(eigen_update_every)
        and concrete(stats_update_every)
        and eigen_update_every % stats_update_every
    ):
        raise ValueError(
            "scale_by_ekfac: eigen_update_every must be a multiple of "
            f"stats_update_every (got {eigen_update_every} and "
            f"{stats_update_every}): eigenbases are computed from fresh factors."
        )
