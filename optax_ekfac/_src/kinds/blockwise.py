"""A block's computations through its kind, over its stack and its groups.

A kind computes on one group of one element of a stack (`LayerKind`). A
stacked block (`Block.stack`, a scanned layer) is one block per element of
its stack, a grouped one (`Block.num_groups`, a grouped convolution) `G`
independent blocks: every computation is the kind's, vmapped over the groups
and then over the stack (`over_block`). These are the entry points the rest
of the package calls.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from optax_ekfac._src.blocks import Block, ParamPath
from optax_ekfac._src.kinds.base import Bases, Rows
from optax_ekfac._src.kinds.registry import get
from optax_ekfac._src.state import BlockState
from optax_ekfac._src.statistics import LayerStats


def over_stack(block: Block, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, vmapped over the stack's leading axes of all its arguments (for a
    plain block, `fn` itself)."""
    for _ in block.stack:
        fn = jax.vmap(fn)
    return fn


def over_block(
    block: Block, fn: Callable[..., Any], group_axes: Sequence[int | None]
) -> Callable[..., Any]:
    """`fn` of one group of one stack element, over the whole block.

    Args:
        block: the block.
        fn: computes on one group of one element of the stack.
        group_axes: for each argument of `fn`, its group axis (0), or None
            for an argument the groups share; used where the block is grouped.

    Returns:
        `fn` vmapped over the groups (`in_axes=group_axes`) of a grouped
        block, then over the stack's leading axes of every argument.
    """
    if block.grouped:
        fn = jax.vmap(fn, in_axes=tuple(group_axes))
    return over_stack(block, fn)


def rows(block: Block, stats: Sequence[LayerStats], dtype: Any) -> Rows:
    """Everything the factors and scalings of a block are computed from:
    input rows, output rows and `attend` rows (stacked: the stack's axes
    first; grouped: then a group axis, attend rows excepted)."""
    kind, element = get(block.kind), block.unstacked()
    return over_stack(block, lambda calls: kind.rows(element, calls, dtype))(stats)


def example_rows(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Input and output rows of all calls of a plain block: `[N, positions,
    dim]` each (grouped: a leading group axis; an embedding: token ids
    `[N, P]`)."""
    return get(block.kind).example_rows(block, stats, dtype)


def attend_rows(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> tuple[jax.Array, jax.Array] | None:
    """The rows of calls with a plain block's sides swapped (a tied
    embedding's `attend`): `(vocabulary_rows, feature_rows)`, or None."""
    return get(block.kind).attend_rows(block, stats, dtype)


def per_example_block_gradients(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> jax.Array:
    """`G_n = Σ_p a_{n,p} d_{n,p}ᵀ`: `[N, input_dim, output_dim]` (grouped:
    `[N, G, input_dim, output_dim]`; stacked: the stack's axes first).
    Materialises one-hot token rows, so it is meant for inspection of small
    models, not for the training step."""
    kind, element = get(block.kind), block.unstacked()
    return over_stack(
        block, lambda calls: kind.per_example_gradients(element, calls, dtype)
    )(stats)


def block_matrix(block: Block, leaves: Mapping[ParamPath, jax.Array]) -> jax.Array:
    """The block matrix `(input_dim, output_dim)` (grouped: with a leading
    group axis; stacked: with the stack's axes first) from its parameter
    leaves."""
    kind, element = get(block.kind), block.unstacked()
    own = {path: leaves[path] for path in block.param_paths}
    return over_stack(block, lambda own: kind.block_matrix(element, own))(own)


def block_leaves(
    block: Block, matrix: jax.Array, like: Mapping[ParamPath, jax.Array]
) -> dict[ParamPath, jax.Array]:
    """Split a block matrix back into its leaves, in the shapes and dtypes of
    `like`."""
    kind, element = get(block.kind), block.unstacked()
    own = {path: like[path] for path in block.param_paths}
    return over_stack(
        block, lambda matrix, own: kind.block_leaves(element, matrix, own)
    )(matrix, own)


def initial_state(
    block: Block, dtype: Any, max_factor_dim: int | None = None
) -> BlockState:
    """Zero factors and scalings, identity eigenbases (replaced at update 1),
    with the group and stack axes; a side wider than `max_factor_dim`
    block-diagonal, `[k, b, b]`."""
    one = get(block.kind).initial_state(block.unstacked(), dtype, max_factor_dim)
    leading = block.stack + ((block.num_groups,) if block.grouped else ())
    return jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, leading + leaf.shape), one)


def factor_shapes(
    block: Block, max_factor_dim: int | None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of one group's `A` and `B` (see `LayerKind.factor_shapes`)."""
    return get(block.kind).factor_shapes(block.unstacked(), max_factor_dim)


def batch_factors(
    block: Block, rows: Rows, num_terms: Any, options: Any
) -> tuple[jax.Array, jax.Array]:
    """`A` and `B` of one batch, for every group and stack element."""
    kind, element = get(block.kind), block.unstacked()

    def one(input_rows, output_rows, attend_rows):
        group_rows = (input_rows, output_rows, attend_rows)
        return kind.batch_factors(element, group_rows, num_terms, options)

    return over_block(block, one, (0, 0, None))(*rows)


def batch_scalings(
    block: Block, rows: Rows, bases: Bases, num_terms: Any, options: Any
) -> jax.Array:
    """`S` of one batch in the eigenbases `(U_A, U_B)`, for every group and
    stack element."""
    kind, element = get(block.kind), block.unstacked()

    def one(input_rows, output_rows, attend_rows, input_basis, output_basis):
        group_rows = (input_rows, output_rows, attend_rows)
        group_bases = (input_basis, output_basis)
        return kind.batch_scalings(element, group_rows, group_bases, num_terms, options)

    return over_block(block, one, (0, 0, None, 0, 0))(*rows, *bases)


def precondition(
    block: Block, block_state: BlockState, gradient: jax.Array, damping: Any, floor: Any
) -> jax.Array:
    """The block matrix of the gradient preconditioned in the eigenbases, for
    every group and stack element."""
    kind, element = get(block.kind), block.unstacked()

    def one(block_state, gradient):
        return kind.precondition(element, block_state, gradient, damping, floor)

    return over_block(block, one, (0, 0))(block_state, gradient)
