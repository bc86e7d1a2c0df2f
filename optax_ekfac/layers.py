"""Per layer kind: which module calls are blocks, and how a block looks.

A block is the weight and bias of one layer, seen as one matrix
`G` of shape `(input_dim, output_dim)`: kernel rows first, then the bias row.
Its Kronecker factors are built from *input rows* `a` (the layer input with a
trailing 1 when there is a bias) and *output rows* `d` (per-example output
gradients), so that the per-example block gradient is `a dᵀ` summed over the
positions of that example.

This module knows, per layer kind, how to recognise a call, how to turn the
captured arrays into rows, and how to move between the parameter gradients and
the block matrix. `capture.py` uses the first; `transform.py` the rest.
"""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

ParamPath = tuple[str, ...]


class LayerStats(NamedTuple):
    """What one call of a layer contributes to its block's statistics.

    Attributes:
        inputs: the layer input, `[N, ..., d_in]` as the layer saw it.
        output_grads: per-example output gradients `dl_n/dy_n`, the shape of
            the layer output `[N, ..., d_out]`.
    """

    inputs: jax.Array
    output_grads: jax.Array


@dataclasses.dataclass(frozen=True)
class Block:
    """One Kronecker-factored block: a layer's weight and bias.

    Attributes:
        name: the module path, e.g. `"encoder/Dense_0"`; keys the statistics
            and the optimizer state.
        kind: the layer kind, e.g. `"Dense"`.
        param_paths: paths of the parameters the block owns in the params
            tree: the kernel, then the bias if there is one.
        input_dim: size of the input factor `A` (`d_in`, plus 1 with a bias).
        output_dim: size of the output factor `B` (`d_out`).
        num_calls: how many times the module is called per forward pass.
    """

    name: str
    kind: str
    param_paths: tuple[ParamPath, ...]
    input_dim: int
    output_dim: int
    num_calls: int

    @property
    def has_bias(self) -> bool:
        return len(self.param_paths) == 2


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
        rows = [header] + [
            (
                block.name,
                block.kind,
                str(block.num_calls),
                f"{block.input_dim}x{block.input_dim}",
                f"{block.output_dim}x{block.output_dim}",
                ", ".join("/".join(path) for path in block.param_paths),
            )
            for block in self.blocks
        ]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = [
            "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows
        ]
        fallback = ", ".join("/".join(path) for path in self.fallback)
        lines.append(f"diagonal fallback: {fallback or 'none'}")
        return "\n".join(lines)


ROOT_NAME = "(root)"


def block_name(module_path: Sequence[str]) -> str:
    """A block's name: its module path joined by "/" (the root: "(root)")."""
    return "/".join(module_path) or ROOT_NAME


# --- recognising a call --------------------------------------------------------


def kind_of(module: nn.Module, method_name: str) -> str | None:
    """The layer kind of a module method call, or None if it is not a block."""
    if method_name != "__call__":
        return None
    if isinstance(module, nn.Dense):
        return "Dense"
    return None


def describe_call(
    kind: str,
    module: nn.Module,
    inputs: jax.ShapeDtypeStruct,
    outputs: jax.ShapeDtypeStruct,
) -> tuple[tuple[tuple[str, tuple[int, ...]], ...], int, int]:
    """The parameters (name, shape), input_dim and output_dim of one call."""
    del kind  # Dense is the only kind so far.
    if inputs.ndim < 2:
        raise ValueError(
            f"{block_name(module.path)}: a Dense layer was called on an input of "
            f"shape {inputs.shape}; the capture needs a leading batch axis "
            "(do not call the model under jax.vmap inside loss_fn)."
        )
    d_in, d_out = inputs.shape[-1], outputs.shape[-1]
    params = (("kernel", (d_in, d_out)),)
    if module.use_bias:
        params += (("bias", (d_out,)),)
    return params, d_in + module.use_bias, d_out


# --- rows of the Kronecker factors ------------------------------------------------


def input_rows(block: Block, inputs: jax.Array, dtype: Any) -> jax.Array:
    """Input rows `a` of one call: `[N, positions, input_dim]`.

    The leading axis of the layer input is the example axis; every other
    leading axis is a position of that example. With a bias, each row gets a
    trailing 1.
    """
    rows = inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).astype(dtype)
    if block.has_bias:
        rows = jnp.concatenate([rows, jnp.ones(rows.shape[:2] + (1,), dtype)], -1)
    return rows


def output_rows(block: Block, output_grads: jax.Array, dtype: Any) -> jax.Array:
    """Output rows `d` of one call: `[N, positions, output_dim]`."""
    return output_grads.reshape(output_grads.shape[0], -1, block.output_dim).astype(
        dtype
    )


def example_rows(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Input and output rows of all calls: `[N, positions, dim]` each.

    The calls of a block are positions of the same examples, so they are
    concatenated along the positions axis: the per-example block gradient is
    `G_n = Σ_p a_{n,p} d_{n,p}ᵀ`.
    """
    inputs = [input_rows(block, call.inputs, dtype) for call in stats]
    outputs = [output_rows(block, call.output_grads, dtype) for call in stats]
    return jnp.concatenate(inputs, 1), jnp.concatenate(outputs, 1)


def block_rows(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Input and output rows of all calls and positions: `[rows, dim]` each."""
    inputs, outputs = example_rows(block, stats, dtype)
    return inputs.reshape(-1, block.input_dim), outputs.reshape(-1, block.output_dim)


# --- between parameter trees and block matrices --------------------------------


def block_matrix(block: Block, leaves: Mapping[ParamPath, jax.Array]) -> jax.Array:
    """The block matrix `(input_dim, output_dim)` from its parameter leaves."""
    kernel = leaves[block.param_paths[0]]
    if not block.has_bias:
        return kernel
    bias = leaves[block.param_paths[1]]
    return jnp.concatenate([kernel, bias[None, :].astype(kernel.dtype)], 0)


def block_leaves(
    block: Block, matrix: jax.Array, like: Mapping[ParamPath, jax.Array]
) -> dict[ParamPath, jax.Array]:
    """Split a block matrix back into its leaves, in the dtypes of `like`."""
    kernel_path = block.param_paths[0]
    if not block.has_bias:
        return {kernel_path: matrix.astype(like[kernel_path].dtype)}
    bias_path = block.param_paths[1]
    return {
        kernel_path: matrix[:-1].astype(like[kernel_path].dtype),
        bias_path: matrix[-1].astype(like[bias_path].dtype),
    }


def path_names(path: Sequence[Any]) -> ParamPath:
    """A `jax.tree_util` key path as a tuple of plain names."""
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
