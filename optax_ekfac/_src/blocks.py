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

This module holds the description every kind shares, below the kinds:
`Block`, `Layers` and parameter paths. The entry points that hand a block to
its kind (its rows, per-example gradients and block matrix, vmapped over a
stack and over groups) are in `kinds/blockwise.py`.
"""

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax

ParamPath = tuple[str, ...]

ROOT_NAME = "(root)"


@dataclasses.dataclass(frozen=True)
class Block:
    """One Kronecker-factored block: a layer's weight and bias.

    Attributes:
        name: the module path, e.g. `"encoder/Dense_0"`; keys the statistics
            and the optimizer state.
        kind: the layer kind: `"Dense"`, `"DenseGeneral"`, `"Conv"`, `"Embed"`,
            `"Einsum"` (or a kind registered with `register_kind`); its
            implementation is `kinds.get(kind)`.
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
        diagonal_input: the input factor is diagonal, kept as a vector, with
            the identity as eigenbasis (an embedding's one-hot input rows).
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
    diagonal_input: bool = False

    @property
    def has_bias(self) -> bool:
        return len(self.param_paths) == 2

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
