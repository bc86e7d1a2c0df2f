"""Blocks: which parameters form one Kronecker-factored block, and how it looks.

A block is the weight and bias of one layer, seen as one matrix
`G` of shape `(input_dim, output_dim)`: kernel rows first, then the bias row.
Its Kronecker factors are built from *input rows* `a` (what multiplies the
kernel, with a trailing 1 when there is a bias) and *output rows* `d`
(per-example output gradients), so that the per-example block gradient is
`G_n = Σ_p a_{n,p} d_{n,p}ᵀ`, summed over the positions `p` of example `n`.

The rows of each kind are described in `kinds/`.

A grouped convolution (`feature_group_count = G`) is `G` independent blocks
of the same shape, stacked on a leading group axis of its rows, its block
matrix and its optimizer state. An embedding's input rows are one-hot, so its
input factor is diagonal (token frequencies) and is kept as a vector. A tied
output projection (`Embed.attend`, `y = q Eᵀ`) is one more call of the same
block with the roles of its sides swapped: its gradient `dᵀ q` puts the output
gradients on the vocabulary side and the query on the feature side; the
vocabulary side stays diagonal (the squares of those output gradients).

A module inside a lifted transform that stacks its parameters (`nn.scan` or
`nn.vmap` with `variable_axes={"params": 0}`, `nnx.scan` over an
`nnx.vmap`-created stack) is one block per element of its stack: its
parameters, statistics and optimizer state carry the stack's leading axes
(`Block.stack`, e.g. `(L,)` for `L` scanned layers), and every computation
of its kind is vmapped over them (`over_stack`).

This module holds what every kind shares: `Block`, `Layers`, `LayerStats`,
parameter paths, and the entry points that hand a block to its kind
(`kinds/`): its rows, per-example gradients and block matrix.
"""

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax

from optax_ekfac._src import kinds

ParamPath = tuple[str, ...]

ROOT_NAME = "(root)"


class LayerStats(NamedTuple):
    """What one call of a layer contributes to its block's statistics.

    Attributes:
        inputs: the layer input as the layer saw it, `[N, ...]` (token ids
            for an embedding lookup).
        output_grads: per-example output gradients `dl_n/dy_n`, the shape of
            the layer output `[N, ...]`.

    A stacked block's (`Block.stack`, a scanned layer's) carry the stack's
    axes first: `[L, N, ...]`.
    """

    inputs: jax.Array
    output_grads: jax.Array


@dataclasses.dataclass(frozen=True)
class Block:
    """One Kronecker-factored block: a layer's weight and bias.

    Attributes:
        name: the module path, e.g. `"encoder/Dense_0"`; keys the statistics
            and the optimizer state.
        kind: the layer kind: `"Dense"`, `"DenseGeneral"`, `"Conv"`, `"Embed"`;
            `layer_kind` is its implementation, from the registry in `kinds/`.
        param_paths: paths of the parameters the block owns in the params
            tree: the kernel (or embedding), then the bias if there is one.
        input_dim: size of the input factor `A` of one group (`d_in`, plus 1
            with a bias).
        output_dim: size of the output factor `B` of one group.
        num_calls: how many times the module is called per forward pass.
        num_groups: independent blocks stacked on a leading axis (the
            `feature_group_count` of a convolution; 1 otherwise).
        config: the kind's typed settings (`ConvConfig`, `DenseGeneralConfig`),
            or None.
        call_methods: the module method of each call (`"__call__"`, or
            `"attend"` for a tied embedding's output projection).
        stack: the leading axes of a stacked module's parameters (`(L,)` for
            `L` layers under `nn.scan`), one block per element, each with its
            own statistics and state; `()` for a plain module.
    """

    name: str
    kind: str
    param_paths: tuple[ParamPath, ...]
    input_dim: int
    output_dim: int
    num_calls: int = 1
    num_groups: int = 1
    config: Any = None
    call_methods: tuple[str, ...] = ()
    stack: tuple[int, ...] = ()

    @property
    def has_bias(self) -> bool:
        return len(self.param_paths) == 2

    @property
    def layer_kind(self) -> kinds.LayerKind:
        """The kind object that knows this block's rows, checks and math."""
        return kinds.get(self.kind)

    @property
    def diagonal_input(self) -> bool:
        """The input factor is diagonal with the identity as eigenbasis."""
        return self.layer_kind.diagonal_input

    @property
    def methods(self) -> tuple[str, ...]:
        """The module method of each call."""
        return self.call_methods or ("__call__",) * self.num_calls

    @property
    def grouped(self) -> bool:
        return self.num_groups > 1

    @property
    def num_stacked(self) -> int:
        """How many blocks the stack holds (1 for a plain module)."""
        return math.prod(self.stack)

    def unstacked(self) -> "Block":
        """One element of the stack: what the kinds compute on."""
        return dataclasses.replace(self, stack=())


@dataclasses.dataclass(frozen=True)
class Layers:
    """The blocks of a model and the parameters that fall back to a diagonal.

    Built by `Curvature.layers`; passed to `scale_by_ekfac`. Printing it shows
    a table of the blocks.

    Attributes:
        blocks: the Kronecker-factored blocks, in the order of their first call.
        fallback: parameter paths no block owns; they get a diagonal
            preconditioner.
    """

    blocks: tuple[Block, ...]
    fallback: tuple[ParamPath, ...]

    def __str__(self) -> str:
        header = ("block", "kind", "calls", "A", "B", "parameters")
        rows = [header]
        for block in self.blocks:
            stack = "".join(f"{size} x " for size in block.stack)
            groups = stack + (f"{block.num_groups} x " if block.grouped else "")
            input_factor = (
                f"diag {block.input_dim}"
                if block.diagonal_input
                else f"{block.input_dim}x{block.input_dim}"
            )
            rows.append(
                (
                    block.name,
                    block.kind,
                    str(block.num_calls),
                    groups + input_factor,
                    groups + f"{block.output_dim}x{block.output_dim}",
                    ", ".join("/".join(path) for path in block.param_paths),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows
        ]
        fallback = ", ".join("/".join(path) for path in self.fallback)
        lines.append(f"diagonal fallback: {fallback or 'none'}")
        return "\n".join(lines)


def block_name(module_path: Sequence[str]) -> str:
    """A block's name: its module path joined by "/" (the root: "(root)")."""
    return "/".join(module_path) or ROOT_NAME


# --- handing a block to its kind -------------------------------------------------


def example_rows(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Input and output rows of all calls of a block: `[N, positions, dim]`
    each (grouped: a leading group axis; an embedding: token ids `[N, P]`)."""
    return block.layer_kind.example_rows(block, stats, dtype)


def attend_rows(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> tuple[jax.Array, jax.Array] | None:
    """The rows of calls with the block's sides swapped (a tied embedding's
    `attend`): `(vocabulary_rows, feature_rows)`, or None."""
    return block.layer_kind.attend_rows(block, stats, dtype)


def per_example_block_gradients(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> jax.Array:
    """`G_n = Σ_p a_{n,p} d_{n,p}ᵀ`: `[N, input_dim, output_dim]` (grouped:
    `[N, G, input_dim, output_dim]`). Materialises one-hot token rows, so it is
    meant for inspection of small models, not for the training step."""
    return block.layer_kind.per_example_gradients(block, stats, dtype)


def over_stack(block: Block, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn`, vmapped over the stack's leading axes of all its arguments (for a
    plain block, `fn` itself)."""
    for _ in block.stack:
        fn = jax.vmap(fn)
    return fn


def block_matrix(block: Block, leaves: Mapping[ParamPath, jax.Array]) -> jax.Array:
    """The block matrix `(input_dim, output_dim)` (grouped: with a leading
    group axis; stacked: with the stack's axes first) from its parameter
    leaves."""
    kind, element = block.layer_kind, block.unstacked()
    own = {path: leaves[path] for path in block.param_paths}
    return over_stack(block, lambda own: kind.block_matrix(element, own))(own)


def block_leaves(
    block: Block, matrix: jax.Array, like: Mapping[ParamPath, jax.Array]
) -> dict[ParamPath, jax.Array]:
    """Split a block matrix back into its leaves, in the shapes and dtypes of
    `like`."""
    kind, element = block.layer_kind, block.unstacked()
    own = {path: like[path] for path in block.param_paths}
    return over_stack(
        block, lambda matrix, own: kind.block_leaves(element, matrix, own)
    )(matrix, own)


# --- parameter paths ----------------------------------------------------------------


def path_names(path: Sequence[Any]) -> ParamPath:
    """A `jax.tree_util` key path as a tuple of plain names.

    A flax.nnx `Variable` flattens to its value under a trailing `.value`
    attribute key; the leaf is named by the variable's own path, so that an
    `nnx.State` of parameters (with `Variable`s or pure arrays as leaves) has
    the same names as a linen params dict: `("layers", "0", "kernel")`.
    """
    if path and path[-1] == jax.tree_util.GetAttrKey("value"):
        path = path[:-1]
    names = []
    for key in path:
        if isinstance(key, jax.tree_util.DictKey):
            names.append(str(key.key))
        elif isinstance(key, jax.tree_util.GetAttrKey):
            names.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            names.append(str(key.idx))
        else:
            names.append(str(key))
    return tuple(names)


def leaves_by_path(tree: Any) -> dict[ParamPath, Any]:
    """The leaves of a params-like tree, keyed by their path names."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {path_names(path): leaf for path, leaf in flat}
