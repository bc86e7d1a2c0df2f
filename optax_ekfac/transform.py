"""`scale_by_ekfac` and `ekfac`: the EKFAC preconditioner as optax transforms.

Per block, from the rows of a batch of `N` examples with `P` positions each
(input rows `a`, output rows `d`, see `layers.py`):

    A ← EMA  mean_{n,p} a aᵀ                 input factor
    B ← EMA  (1/N) Σ_{n,p} d dᵀ              output factor
    U_A, U_B = eigh(A), eigh(B)              every `eigen_update_every` updates
    S ← EMA  mean_n (U_Aᵀ G_n U_B)²           scalings, G_n = Σ_p a dᵀ
    G ↦ U_A [(U_Aᵀ G U_B) / (S + λ)] U_Bᵀ

With one position per example (an MLP) `A ⊗ B` is K-FAC's estimate of the
Fisher `mean_n vec(G_n) vec(G_n)ᵀ`. With weight sharing (sequences, image
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
    scalings: str = "exact",
    weight_sharing: str = "expand",
    max_per_example_elements: int = 2**22,
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
            gradients of one chunk may hold, for `scalings="exact"`.
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
    for name, value, allowed in (
        ("scalings", scalings, ("exact", "per_position")),
        ("weight_sharing", weight_sharing, ("expand", "reduce")),
    ):
        if value not in allowed:
            raise ValueError(
                f"scale_by_ekfac: {name} must be one of {allowed}, got {value!r}."
            )
    if not max_per_example_elements >= 1:
        raise ValueError(
            "scale_by_ekfac: max_per_example_elements must be >= 1, got "
            f"{max_per_example_elements}."
        )
    settings = _Settings(
        decay=decay,
        eigenvalue_correction=eigenvalue_correction,
        exact_scalings=scalings == "exact",
        reduce_positions=weight_sharing == "reduce",
        max_per_example_elements=max_per_example_elements,
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
                    settings,
                    stats_count,
                    scalings_count,
                    refresh_eigen,
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
            if block.grouped:
                direction = jax.vmap(precondition, in_axes=(0, 0, None))(
                    block_state, gradient, damping
                )
            else:
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
    """`U_A [(U_Aᵀ G U_B) / (S + λ)] U_Bᵀ` for one block matrix `G`.

    Args:
        block_state: the curvature of the block (one group of a grouped one).
        gradient: `G`, `(input_dim, output_dim)`.
        damping: `λ`.

    Returns:
        The preconditioned block matrix, in the state's dtype.
    """
    input_basis = block_state.input_eigenbasis
    output_basis = block_state.output_eigenbasis
    projected = gradient.astype(output_basis.dtype) @ output_basis
    if input_basis is not None:
        projected = input_basis.T @ projected
    projected = projected / (block_state.scalings + damping)
    if input_basis is not None:
        projected = input_basis @ projected
    return projected @ output_basis.T


class _Settings(NamedTuple):
    decay: float
    eigenvalue_correction: bool
    exact_scalings: bool
    reduce_positions: bool
    max_per_example_elements: int


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


def _refresh_block(
    block: Block,
    block_state: BlockState,
    block_stats,
    settings: _Settings,
    stats_count: jax.Array,
    scalings_count: jax.Array,
    refresh_eigen: jax.Array,
) -> BlockState:
    """New factors, eigenbases (when due) and scalings from one batch."""
    dtype = block_state.output_factor.dtype
    input_rows, output_rows = layers_lib.example_rows(block, block_stats, dtype)
    attend_rows = (
        layers_lib.attend_rows(block, block_stats, dtype)
        if block.diagonal_input
        else None
    )

    def refresh_group(block_state, input_rows, output_rows):
        input_batch, output_batch = _batch_factors(
            block, input_rows, output_rows, attend_rows, settings
        )
        input_factor = _ema(
            block_state.input_factor, input_batch, settings.decay, stats_count
        )
        output_factor = _ema(
            block_state.output_factor, output_batch, settings.decay, stats_count
        )

        def eigendecompose(_):
            if block.diagonal_input:
                input_eigenvalues, input_basis = jnp.maximum(input_factor, 0), None
            else:
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
        if settings.eigenvalue_correction:
            batch_scalings = _batch_scalings(
                block,
                input_rows,
                output_rows,
                attend_rows,
                input_basis,
                output_basis,
                settings,
            )
            scalings = _ema(scalings, batch_scalings, settings.decay, scalings_count)
        return BlockState(
            input_factor, output_factor, input_basis, output_basis, scalings
        )

    if block.grouped:
        refresh_group = jax.vmap(refresh_group)
    return refresh_group(block_state, input_rows, output_rows)


def _batch_factors(
    block: Block,
    input_rows: jax.Array,
    output_rows: jax.Array,
    attend_rows: tuple[jax.Array, jax.Array] | None,
    settings: _Settings,
) -> tuple[jax.Array, jax.Array]:
    """`A` and `B` of one batch from rows `[N, P, dim]` (embedding: ids `[N, P]`
    and the rows of its `attend` calls)."""
    num_examples, num_positions = output_rows.shape[:2]
    if block.diagonal_input:
        # One-hot rows: diag(A) counts the tokens; attend rows add their squares.
        input_factor = jnp.zeros(block.input_dim, output_rows.dtype)
        input_factor = input_factor.at[input_rows.reshape(-1)].add(1)
        output_factor = jnp.einsum("npi,npj->ij", output_rows, output_rows)
        if attend_rows is not None:
            vocabulary_rows, feature_rows = attend_rows
            num_positions += vocabulary_rows.shape[1]
            input_factor += jnp.square(vocabulary_rows).sum((0, 1))
            output_factor += jnp.einsum("npi,npj->ij", feature_rows, feature_rows)
        return (
            input_factor / (num_examples * num_positions),
            output_factor / num_examples,
        )
    if settings.reduce_positions:
        input_rows = input_rows.mean(1, keepdims=True)
        output_rows = output_rows.sum(1, keepdims=True)
        num_positions = 1
    flat_inputs = input_rows.reshape(-1, block.input_dim)
    input_factor = flat_inputs.T @ flat_inputs / flat_inputs.shape[0]
    flat_outputs = output_rows.reshape(-1, block.output_dim)
    output_factor = flat_outputs.T @ flat_outputs / num_examples
    return input_factor, output_factor


def _batch_scalings(
    block: Block,
    input_rows: jax.Array,
    output_rows: jax.Array,
    attend_rows: tuple[jax.Array, jax.Array] | None,
    input_basis: jax.Array | None,
    output_basis: jax.Array,
    settings: _Settings,
) -> jax.Array:
    """`mean_n (U_Aᵀ G_n U_B)²` (or its per-position form) of one batch."""
    num_examples, num_positions = output_rows.shape[:2]
    projected_outputs = output_rows @ output_basis
    if block.diagonal_input:
        # Per position: row `id` of S gathers (U_Bᵀ d)² of that token.
        squares = jnp.square(projected_outputs).reshape(-1, block.output_dim)
        scalings = jnp.zeros((block.input_dim, block.output_dim), squares.dtype)
        scalings = scalings.at[input_rows.reshape(-1)].add(squares)
        if attend_rows is not None:
            vocabulary_rows, feature_rows = attend_rows
            scalings += jnp.einsum(
                "npv,npf->vf",
                jnp.square(vocabulary_rows),
                jnp.square(feature_rows @ output_basis),
            )
        return scalings / num_examples
    projected_inputs = input_rows @ input_basis
    if num_positions == 1 or not settings.exact_scalings:
        # Two matmuls: Σ_{n,p} (U_Aᵀa)² (U_Bᵀd)²ᵀ.
        return (
            jnp.einsum(
                "npi,npo->io",
                jnp.square(projected_inputs),
                jnp.square(projected_outputs),
            )
            / num_examples
        )
    return (
        _sum_of_squared_per_example_gradients(
            projected_inputs, projected_outputs, settings.max_per_example_elements
        )
        / num_examples
    )


def _sum_of_squared_per_example_gradients(
    inputs: jax.Array, outputs: jax.Array, max_elements: int
) -> jax.Array:
    """`Σ_n (Σ_p a_{n,p} d_{n,p}ᵀ)²` in chunks of at most `max_elements`."""
    num_examples, num_positions, input_dim = inputs.shape
    output_dim = outputs.shape[-1]
    chunk = max(1, min(num_examples, max_elements // (input_dim * output_dim)))

    def chunk_sum(inputs, outputs):
        per_example = jnp.einsum("npi,npo->nio", inputs, outputs)
        return jnp.square(per_example).sum(0)

    if chunk == num_examples:
        return chunk_sum(inputs, outputs)
    num_chunks = -(-num_examples // chunk)
    padding = [(0, num_chunks * chunk - num_examples), (0, 0), (0, 0)]

    def chunked(rows):
        rows = jnp.pad(rows, padding)  # zero examples add nothing
        return rows.reshape((num_chunks, chunk) + rows.shape[1:])

    def add_chunk(total, rows):
        return total + chunk_sum(*rows), None

    initial = jnp.zeros((input_dim, output_dim), inputs.dtype)
    total, _ = jax.lax.scan(add_chunk, initial, (chunked(inputs), chunked(outputs)))
    return total


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
        methods = block.call_methods or ("__call__",) * block.num_calls
        for call, method in zip(calls, methods):
            layers_lib.check_call(block, call, method)


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
