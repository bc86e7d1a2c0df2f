"""The refresh of the optimizer state from one batch's statistics.

Per block: rows from the statistics (its kind's), the running averages of the
factors, the eigenbases when due, and the running average of the scalings in
the current eigenbases (`curvature.py` does the math); for the parameters no
block owns, the running average of `N g²`.

The running averages are bias-corrected, so after the first update they hold
exactly the first batch's estimates; the scalings restart whenever the basis
changes. Factors and scalings are refreshed every `stats_update_every`
updates and the eigenbases every `eigen_update_every`; both are `lax.cond`s
on the count (`Schedule`), so one compiled step serves every step.
"""

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from optax_ekfac._src import curvature, kinds, sharding
from optax_ekfac._src.blocks import Block, Layers
from optax_ekfac._src.kinds import Rows
from optax_ekfac._src.options import Options
from optax_ekfac._src.state import BlockState, ScaleByEkfacState
from optax_ekfac._src.statistics import Statistics

BasesAndScalings = tuple[jax.Array | None, jax.Array, jax.Array]  # U_A, U_B, S


class Schedule(NamedTuple):
    """What this update refreshes, and the counters after it."""

    refresh_stats: jax.Array
    refresh_eigen: jax.Array
    stats_count: jax.Array
    scalings_count: jax.Array


def schedule(state: ScaleByEkfacState, finite: jax.Array, options: Options) -> Schedule:
    """Refresh the statistics every `stats_update_every` updates and the
    eigenbases every `eigen_update_every` (never on a non-finite step); the
    scalings restart with new eigenbases."""
    refresh_stats = finite & (state.count % options.stats_update_every == 0)
    refresh_eigen = refresh_stats & (state.count % options.eigen_update_every == 0)
    stats_count = state.stats_count + refresh_stats.astype(jnp.int32)
    scalings_count = jnp.where(
        refresh_eigen, 0, state.scalings_count
    ) + refresh_stats.astype(jnp.int32)
    return Schedule(refresh_stats, refresh_eigen, stats_count, scalings_count)


def maybe_refreshed(
    layers: Layers,
    state: ScaleByEkfacState,
    stats: Statistics,
    grads: dict,
    schedule: Schedule,
    options: Options,
) -> tuple[dict[str, BlockState], dict[str, jax.Array]]:
    """The blocks (factors, eigenbases when due, scalings) and the fallback's
    second moments after this batch, or as they were when the schedule skips
    the refresh: one `lax.cond`."""

    def refreshed(blocks, second_moments):
        blocks = refreshed_blocks(layers.blocks, blocks, stats, options, schedule)
        second_moments = refreshed_second_moments(
            second_moments, grads, stats.gradient_terms, options, schedule.stats_count
        )
        return blocks, second_moments

    return jax.lax.cond(
        schedule.refresh_stats,
        refreshed,
        lambda blocks, second_moments: (blocks, second_moments),
        state.blocks,
        state.second_moments,
    )


def initial_block_state(
    block: Block, dtype: Any, max_factor_dim: int | None = None
) -> BlockState:
    """Zero factors and scalings, identity eigenbases (replaced at update 1);
    a side wider than `max_factor_dim` block-diagonal, `[k, b, b]` (the
    block's kind says which sides have bases)."""
    return kinds.initial_state(block, dtype, max_factor_dim)


def refreshed_second_moments(
    second_moments: dict[str, jax.Array],
    grads: dict,
    num_terms: int,
    options: Options,
    stats_count: jax.Array,
) -> dict[str, jax.Array]:
    """The running averages of `N g²` of the fallback parameters."""
    return {
        key: curvature.ema(
            moment,
            num_terms * jnp.square(grads[tuple(key.split("/"))]),
            options.refresh_decay,
            stats_count,
        )
        for key, moment in second_moments.items()
    }


def refreshed_blocks(
    blocks: tuple[Block, ...],
    states: dict[str, BlockState],
    stats: Statistics,
    options: Options,
    schedule: Schedule,
) -> dict[str, BlockState]:
    """New factors, eigenbases (when due) and scalings of every block.

    The eigendecompositions of all blocks are one `lax.cond`, so that they can
    be spread over the devices of a mesh axis together (`_eigenbases`).
    """
    rows, factors = {}, {}
    for block in blocks:
        dtype = states[block.name].output_factor.dtype
        rows[block.name] = kinds.rows(block, stats.layers[block.name], dtype)
        factors[block.name] = _refreshed_factors(
            block,
            states[block.name],
            rows[block.name],
            stats.num_sampled_terms,
            options,
            schedule.stats_count,
        )

    def keep(factors):
        del factors
        return {
            name: (state.input_eigenbasis, state.output_eigenbasis, state.scalings)
            for name, state in states.items()
        }

    bases = jax.lax.cond(
        schedule.refresh_eigen,
        lambda factors: _eigenbases(blocks, factors, options),
        keep,
        factors,
    )
    refreshed = {}
    for block in blocks:
        input_basis, output_basis, scalings = bases[block.name]
        if options.eigenvalue_correction:
            scalings = _refreshed_scalings(
                block,
                rows[block.name],
                bases[block.name],
                stats.num_sampled_terms,
                options,
                schedule.scalings_count,
            )
        refreshed[block.name] = BlockState(
            *factors[block.name], input_basis, output_basis, scalings
        )
    return refreshed


def _refreshed_factors(
    block: Block,
    state: BlockState,
    rows: Rows,
    num_terms: Any,
    options: Options,
    stats_count: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """The running averages of `A` and `B` after one batch of rows."""
    input_batch, output_batch = kinds.batch_factors(block, rows, num_terms, options)
    decay = options.refresh_decay
    return (
        curvature.ema(state.input_factor, input_batch, decay, stats_count),
        curvature.ema(state.output_factor, output_batch, decay, stats_count),
    )


def _refreshed_scalings(
    block: Block,
    rows: Rows,
    bases: BasesAndScalings,
    num_terms: Any,
    options: Options,
    scalings_count: jax.Array,
) -> jax.Array:
    """The running average of `S` in the current eigenbases after one batch."""
    input_basis, output_basis, scalings = bases
    batch = kinds.batch_scalings(
        block, rows, (input_basis, output_basis), num_terms, options
    )
    return curvature.ema(scalings, batch, options.refresh_decay, scalings_count)


def _eigenbases(
    blocks: tuple[Block, ...],
    factors: dict[str, tuple[jax.Array, jax.Array]],
    options: Options,
) -> dict[str, BasesAndScalings]:
    """Per block `(U_A, U_B, outer(eigvals(A), eigvals(B)))` of new factors.

    With `options.distribute_eigh` and a mesh whose `options.axis_name` has
    `D > 1` devices, each device decomposes about `1/D` of the factors
    (balanced by `G k b³`, `G` groups of `k` diagonal blocks of `b x b`, one
    block of `d x d` where a side is not blocked) and the results are shared;
    a stacked block's layers and a block-diagonal factor's blocks are tasks
    of their own there, and one batched eigh otherwise.
    """
    distribute = options.distribute_eigh and sharding.axis_size(options.axis_name) > 1
    matrices: list[jax.Array] = []
    costs: list[float] = []
    batch_dims: list[int] = []  # leading axes of each task decomposed one by one
    sides: list[tuple[int, tuple[int, ...], bool]] = []  # dim, split axes, split?
    for block in blocks:
        input_factor, output_factor = factors[block.name]
        # A diagonal input factor (embeddings): nothing to decompose.
        own = [(output_factor, block.output_dim)]
        if not block.diagonal_input:
            own.insert(0, (input_factor, block.input_dim))
        for factor, dim in own:
            factor = curvature.isolated_padding(factor, dim)
            # Decomposed one matrix at a time (or spread as tasks): a stacked
            # block's layers, and a block-diagonal factor's groups and blocks.
            if curvature.is_blocked(factor, dim):
                num_split = factor.ndim - 2
            else:
                num_split = len(block.stack)
            split = factor.shape[:num_split]
            cost = math.prod(factor.shape[num_split:-2]) * factor.shape[-1] ** 3
            if distribute and split:
                matrices += list(factor.reshape((-1,) + factor.shape[num_split:]))
                costs += [cost] * math.prod(split)
                batch_dims += [0] * math.prod(split)
            else:
                matrices.append(factor)
                costs.append(cost * math.prod(split))
                batch_dims.append(num_split)
            sides.append((dim, split, distribute and bool(split)))

    def eigh(factor):
        return curvature.symmetric_eigh(factor, options.eigh_dtype)

    def eigh_one_by_one(factor, num_batch_dims):
        if not num_batch_dims or jax.default_backend() != "cpu":
            return eigh(factor)
        # jaxlib's CPU eigh spreads a batch over XLA's intra-op threads and
        # waits for them: two batched calls running at once can each hold the
        # thread the other waits for (a deadlock, seen on 2 cores with a
        # scanned transformer's stacked factors). One matrix at a time.
        batch = factor.shape[:num_batch_dims]
        flat = factor.reshape((-1,) + factor.shape[num_batch_dims:])
        return jax.tree.map(
            lambda result: result.reshape(batch + result.shape[1:]),
            jax.lax.map(eigh, flat),
        )

    if distribute:
        decomposed = sharding.map_over_axis(eigh, matrices, costs, options.axis_name)
    else:
        decomposed = [
            eigh_one_by_one(matrix, num_batch_dims)
            for matrix, num_batch_dims in zip(matrices, batch_dims)
        ]
    results, side_specs = iter(decomposed), iter(sides)

    def next_side():
        dim, split, was_split = next(side_specs)
        if was_split:
            elements = [next(results) for _ in range(math.prod(split))]
            eigenvalues, basis = jax.tree.map(
                lambda *parts: jnp.stack(parts).reshape(split + parts[0].shape),
                *elements,
            )
        else:
            eigenvalues, basis = next(results)
        return curvature.real_eigenvalues(eigenvalues, dim), basis

    bases = {}
    for block in blocks:
        input_factor, _ = factors[block.name]
        input_basis: jax.Array | None
        if block.diagonal_input:
            input_eigenvalues, input_basis = jnp.maximum(input_factor, 0), None
        else:
            input_eigenvalues, input_basis = next_side()
        output_eigenvalues, output_basis = next_side()
        kfac_scalings = curvature.kfac_scalings(input_eigenvalues, output_eigenvalues)
        bases[block.name] = (input_basis, output_basis, kfac_scalings)
    return bases
