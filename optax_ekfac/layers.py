"""Per layer kind: which module calls are blocks, and how a block looks.

A block is the weight and bias of one layer, seen as one matrix
`G` of shape `(input_dim, output_dim)`: kernel rows first, then the bias row.
Its Kronecker factors are built from *input rows* `a` (what multiplies the
kernel, with a trailing 1 when there is a bias) and *output rows* `d`
(per-example output gradients), so that the per-example block gradient is
`G_n = Σ_p a_{n,p} d_{n,p}ᵀ`, summed over the positions `p` of example `n`.

| kind         | input rows `a`                          | output rows `d`          |
| ------------ | --------------------------------------- | ------------------------ |
| Dense        | the input's last axis                   | the output's last axis   |
| DenseGeneral | the contracted input axes, flattened    | the feature axes         |
| Conv         | image patches (KFC, Grosse & Martens)   | each output position     |
| Embed        | one-hot token ids (kept as ids)         | each token's output      |
| Embed.attend | output gradients over the vocabulary    | the query                |

A grouped convolution (`feature_group_count = G`) is `G` independent blocks
of the same shape, stacked on a leading group axis of its rows, its block
matrix and its optimizer state. An embedding's input rows are one-hot, so its
input factor is diagonal (token frequencies) and is kept as a vector. A tied
output projection (`Embed.attend`, `y = q Eᵀ`) is one more call of the same
block with the roles of its sides swapped: its gradient `dᵀ q` puts the output
gradients on the vocabulary side and the query on the feature side; the
vocabulary side stays diagonal (the squares of those output gradients).

This module knows, per kind, how to recognise a call, how to turn the captured
arrays into rows, and how to move between parameter leaves and the block
matrix. `capture.py` uses the first; `transform.py` the rest.
"""

import dataclasses
import itertools
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.linear import canonicalize_padding

ParamPath = tuple[str, ...]
ParamShapes = tuple[tuple[str, tuple[int, ...]], ...]

ROOT_NAME = "(root)"
SUPPORTED = (
    "flax.linen Dense, DenseGeneral, Conv and Embed; "
    "flax.nnx Linear, LinearGeneral, Conv and Embed"
)


class LayerStats(NamedTuple):
    """What one call of a layer contributes to its block's statistics.

    Attributes:
        inputs: the layer input as the layer saw it, `[N, ...]` (token ids
            for an embedding lookup).
        output_grads: per-example output gradients `dl_n/dy_n`, the shape of
            the layer output `[N, ...]`.
    """

    inputs: jax.Array
    output_grads: jax.Array


@dataclasses.dataclass(frozen=True)
class Block:
    """One Kronecker-factored block: a layer's weight and bias.

    Attributes:
        name: the module path, e.g. `"encoder/Dense_0"`; keys the statistics
            and the optimizer state.
        kind: the layer kind: `"Dense"`, `"DenseGeneral"`, `"Conv"`, `"Embed"`.
        param_paths: paths of the parameters the block owns in the params
            tree: the kernel (or embedding), then the bias if there is one.
        input_dim: size of the input factor `A` of one group (`d_in`, plus 1
            with a bias).
        output_dim: size of the output factor `B` of one group.
        num_calls: how many times the module is called per forward pass.
        num_groups: independent blocks stacked on a leading axis (the
            `feature_group_count` of a convolution; 1 otherwise).
        config: static settings of the kind (convolution geometry, ...).
        call_methods: the module method of each call (`"__call__"`, or
            `"attend"` for a tied embedding's output projection).
    """

    name: str
    kind: str
    param_paths: tuple[ParamPath, ...]
    input_dim: int
    output_dim: int
    num_calls: int = 1
    num_groups: int = 1
    config: tuple = ()
    call_methods: tuple[str, ...] = ()

    @property
    def has_bias(self) -> bool:
        return len(self.param_paths) == 2

    @property
    def diagonal_input(self) -> bool:
        """The input factor is diagonal with the identity as eigenbasis."""
        return self.kind == "Embed"

    @property
    def grouped(self) -> bool:
        return self.num_groups > 1


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
            groups = f"{block.num_groups} x " if block.grouped else ""
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


# --- recognising a call ----------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CallShape:
    """What one call says about its block (see `Block` for the fields)."""

    params: ParamShapes
    input_dim: int
    output_dim: int
    num_groups: int = 1
    config: tuple = ()


def kind_of(module: nn.Module | nnx.Module, method_name: str) -> str | None:
    """The layer kind of a module method call, or None if it is not a block.

    flax.nnx layers are the kinds of their linen counterparts: `nnx.Linear` is
    a "Dense", `nnx.LinearGeneral` a "DenseGeneral". Modules that are not
    recognised (and Conv with a mask, DenseGeneral with `batch_dims`,
    LinearGeneral with `batch_axis`) are not captured: their parameters fall
    back to the diagonal.
    """
    if isinstance(module, nn.Embed | nnx.Embed):
        return "Embed" if method_name in ("__call__", "attend") else None
    if method_name != "__call__":
        return None
    if isinstance(module, nn.Dense | nnx.Linear):
        return "Dense"
    if isinstance(module, nn.DenseGeneral | nnx.LinearGeneral) and not (
        _LinenNames(module).batch_dims
    ):
        return "DenseGeneral"
    if isinstance(module, nn.Conv | nnx.Conv) and module.mask is None:
        return "Conv"
    return None


def describe_call(
    kind: str,
    module: nn.Module | nnx.Module,
    inputs: jax.ShapeDtypeStruct,
    outputs: jax.ShapeDtypeStruct,
    name: str | None = None,
) -> CallShape:
    """The block shape one call implies; raises if the capture can't use it.

    `name` names the block in errors; by default the linen module's path
    (flax.nnx modules do not know their path: the capture passes it).
    """
    name = block_name(module.path) if name is None else name
    if kind != "Embed" and inputs.ndim < 2:
        raise ValueError(
            f"{name}: a {kind} layer was called on an input of shape "
            f"{inputs.shape}; the capture needs a leading batch axis (do not "
            "call the model under jax.vmap inside loss_fn)."
        )
    return _DESCRIBE[kind](name, _LinenNames(module), inputs, outputs)


class _LinenNames:
    """A layer's settings under flax.linen's attribute names.

    flax.nnx layers name two settings differently: the output features
    (`out_features`; linen: `features`) and LinearGeneral's batch axes
    (`batch_axis`; linen DenseGeneral: `batch_dims`). Everything else the
    description reads (`use_bias`, `axis`, `kernel_size`, `strides`,
    `padding`, dilations, `feature_group_count`, `mask`, `num_embeddings`)
    has the same name and meaning in both.
    """

    _NNX_NAMES = {"features": "out_features", "batch_dims": "batch_axis"}

    def __init__(self, module: nn.Module | nnx.Module):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        module = self._module
        if isinstance(module, nnx.Module) and not hasattr(module, name):
            name = self._NNX_NAMES.get(name, name)
        return getattr(module, name)


def _describe_dense(name, module, inputs, outputs) -> CallShape:
    del name
    d_in, d_out = inputs.shape[-1], outputs.shape[-1]
    params = (("kernel", (d_in, d_out)),)
    if module.use_bias:
        params += (("bias", (d_out,)),)
    return CallShape(params, d_in + module.use_bias, d_out)


def _describe_dense_general(name, module, inputs, outputs) -> CallShape:
    axes = tuple(a % inputs.ndim for a in _as_tuple(module.axis))
    if 0 in axes:
        raise ValueError(
            f"{name}: DenseGeneral contracts axis 0, which the capture takes as "
            "the example axis; keep the batch axis first and uncontracted."
        )
    features = _as_tuple(module.features)
    in_shape = tuple(inputs.shape[a] for a in axes)
    params = (("kernel", in_shape + features),)
    if module.use_bias:
        params += (("bias", features),)
    config = (axes, len(features))
    return CallShape(
        params, math.prod(in_shape) + module.use_bias, math.prod(features), 1, config
    )


def _describe_conv(name, module, inputs, outputs) -> CallShape:
    kernel_size = _as_tuple(module.kernel_size)
    num_spatial = len(kernel_size)
    if inputs.ndim != num_spatial + 2:
        raise ValueError(
            f"{name}: Conv input {inputs.shape} needs exactly one batch axis "
            f"before its {num_spatial} spatial axes and channels."
        )
    in_channels, features = inputs.shape[-1], module.features
    groups = module.feature_group_count
    group_in, group_out = in_channels // groups, features // groups

    def broadcast(value):
        value = 1 if value is None else value
        return (value,) * num_spatial if isinstance(value, int) else tuple(value)

    padding = canonicalize_padding(module.padding, num_spatial)
    padding = padding if isinstance(padding, str) else tuple(map(tuple, padding))
    config = (
        kernel_size,
        broadcast(module.strides),
        padding,
        broadcast(module.input_dilation),
        broadcast(module.kernel_dilation),
    )
    params = (("kernel", kernel_size + (group_in, features)),)
    if module.use_bias:
        params += (("bias", (features,)),)
    input_dim = math.prod(kernel_size) * group_in + module.use_bias
    return CallShape(params, input_dim, group_out, groups, config)


def _describe_embed(name, module, inputs, outputs) -> CallShape:
    if inputs.shape[-1:] == (module.features,) and outputs.shape[-1:] == (
        module.num_embeddings,
    ):  # attend: queries in, logits over the vocabulary out
        if inputs.ndim < 2:
            raise ValueError(
                f"{name}: Embed.attend needs a leading batch axis; got {inputs.shape}."
            )
    elif inputs.ndim < 1 or not jnp.issubdtype(inputs.dtype, jnp.integer):
        raise ValueError(
            f"{name}: Embed needs integer token ids with a leading batch axis; "
            f"got {inputs.dtype}{list(inputs.shape)}."
        )
    params = (("embedding", (module.num_embeddings, module.features)),)
    return CallShape(params, module.num_embeddings, module.features)


_DESCRIBE = {
    "Dense": _describe_dense,
    "DenseGeneral": _describe_dense_general,
    "Conv": _describe_conv,
    "Embed": _describe_embed,
}


# --- rows of the Kronecker factors ------------------------------------------------


def input_rows(block: Block, inputs: jax.Array, dtype: Any) -> jax.Array:
    """Input rows `a` of one call: `[N, positions, input_dim]`.

    The leading axis of the layer input is the example axis; every other
    leading axis (sequence, image position) is a position of that example.
    With a bias, each row gets a trailing 1. A grouped block's rows carry a
    leading group axis, `[G, N, positions, input_dim]`. An embedding's rows
    are its token ids, `[N, positions]` (one-hot, never materialised).
    """
    if block.kind == "Embed":
        return _reshape_keeping(inputs, (inputs.shape[0], -1))
    if block.kind == "DenseGeneral":
        axes, _ = block.config
        inputs = jnp.moveaxis(inputs, axes, tuple(range(-len(axes), 0)))
        inputs = inputs.reshape(inputs.shape[: -len(axes)] + (-1,))
    if block.kind == "Conv":
        inputs = _conv_patches(block, inputs)
    num_features = block.input_dim - block.has_bias
    leading = inputs.shape[: 1 + block.grouped]  # [G,] N
    rows = _reshape_keeping(inputs, leading + (-1, num_features), len(leading))
    rows = rows.astype(dtype)
    if block.has_bias:
        # ones_like keeps the rows' sharding (the example axis, when sharded).
        rows = jnp.concatenate([rows, jnp.ones_like(rows[..., :1])], -1)
    return rows


def output_rows(block: Block, output_grads: jax.Array, dtype: Any) -> jax.Array:
    """Output rows `d` of one call: `[N, positions, output_dim]` (grouped:
    `[G, N, positions, output_dim]`)."""
    num_examples = output_grads.shape[0]
    if block.grouped:
        rows = _reshape_keeping(
            output_grads, (num_examples, -1, block.num_groups, block.output_dim)
        )
        return jnp.moveaxis(rows, 2, 0).astype(dtype)
    rows = _reshape_keeping(output_grads, (num_examples, -1, block.output_dim))
    return rows.astype(dtype)


def _reshape_keeping(
    array: jax.Array, shape: Sequence[int], num_kept: int = 1
) -> jax.Array:
    """`array.reshape(shape)` whose first `num_kept` axes stay as they are.

    They keep their sharding (the example axis of a batch sharded under an
    explicit mesh) and the reshaped feature axes are unsharded: JAX does not
    infer that for every reshape (it refuses `[N, H, W, G * O]` to
    `[N, H * W, G, O]`, say). No constraint is added for non-explicit axes.
    """
    sharding = jax.typeof(array).sharding
    kept = jax.sharding.PartitionSpec(*tuple(sharding.spec)[:num_kept])
    out_sharding = jax.sharding.NamedSharding(sharding.mesh, kept)
    return jnp.reshape(array, shape, out_sharding=out_sharding)


def example_rows(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> tuple[jax.Array, jax.Array]:
    """Input and output rows of all calls: `[N, positions, dim]` each.

    The calls of a block are positions of the same examples, so they are
    concatenated along the positions axis: the per-example block gradient is
    `G_n = Σ_p a_{n,p} d_{n,p}ᵀ`.
    """
    if block.diagonal_input:
        return _lookup_rows(block, stats, dtype)
    inputs = [input_rows(block, call.inputs, dtype) for call in stats]
    outputs = [output_rows(block, call.output_grads, dtype) for call in stats]
    return jnp.concatenate(inputs, -2), jnp.concatenate(outputs, -2)


def _lookup_rows(block: Block, stats: Sequence[LayerStats], dtype: Any):
    """An embedding's lookups: token ids `[N, P]` and output rows `[N, P, F]`."""
    lookups = [
        call for call, method in zip(stats, _methods(block)) if method == "__call__"
    ]
    num_examples = stats[0].inputs.shape[0]
    ids = [_reshape_keeping(call.inputs, (num_examples, -1)) for call in lookups]
    outputs = [output_rows(block, call.output_grads, dtype) for call in lookups]
    if not lookups:
        empty = jnp.zeros((num_examples, 0), jnp.int32)
        return empty, jnp.zeros((num_examples, 0, block.output_dim), dtype)
    return jnp.concatenate(ids, 1), jnp.concatenate(outputs, 1)


def attend_rows(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> tuple[jax.Array, jax.Array] | None:
    """A tied embedding's `attend` calls as rows, or None if it has none.

    Returns:
        `(vocabulary_rows [N, P, V], feature_rows [N, P, F])`: the output
        gradients of the logits and the queries, so that the per-example
        gradient of the embedding is `Σ_p vocabulary_row feature_rowᵀ`.
    """
    attends = [
        call for call, method in zip(stats, _methods(block)) if method == "attend"
    ]
    if not attends:
        return None
    num_examples = attends[0].inputs.shape[0]

    def rows(array, width):
        return _reshape_keeping(array, (num_examples, -1, width)).astype(dtype)

    return (
        jnp.concatenate([rows(c.output_grads, block.input_dim) for c in attends], 1),
        jnp.concatenate([rows(c.inputs, block.output_dim) for c in attends], 1),
    )


def per_example_block_gradients(
    block: Block, stats: Sequence[LayerStats], dtype: Any
) -> jax.Array:
    """`G_n = Σ_p a_{n,p} d_{n,p}ᵀ`: `[N, input_dim, output_dim]` (grouped:
    `[N, G, input_dim, output_dim]`). Materialises one-hot token rows, so it is
    meant for inspection of small models, not for the training step."""
    inputs, outputs = example_rows(block, stats, dtype)
    if block.diagonal_input:
        inputs = jax.nn.one_hot(inputs, block.input_dim, dtype=dtype)
    gradients = jnp.einsum("...npi,...npo->n...io", inputs, outputs)
    attends = attend_rows(block, stats, dtype) if block.diagonal_input else None
    if attends is not None:
        gradients = gradients + jnp.einsum("npv,npf->nvf", *attends)
    return gradients


def _methods(block: Block) -> tuple[str, ...]:
    return block.call_methods or ("__call__",) * block.num_calls


def check_call(block: Block, call: LayerStats, method: str = "__call__") -> None:
    """Raises if one call's statistics do not fit the block."""
    inputs, outputs = call.inputs.shape, call.output_grads.shape
    if block.kind == "Embed" and method == "attend":
        expected_inputs = block.output_dim
        fits_inputs = inputs[-1:] == (block.output_dim,) and (
            outputs[-1:] == (block.input_dim,)
        )
        outputs = outputs[:-1] + (block.output_dim,)  # checked above
    elif block.kind == "Embed":
        expected_inputs = None
        fits_inputs = inputs == outputs[:-1]
    elif block.kind == "DenseGeneral":
        axes, num_features = block.config
        expected_inputs = block.input_dim - block.has_bias
        fits_inputs = max(axes) < len(inputs) and (
            math.prod(inputs[a] for a in axes) == expected_inputs
        )
    else:  # Dense, Conv: the channels are last.
        group_channels = (block.input_dim - block.has_bias) // math.prod(
            block.config[0] if block.kind == "Conv" else ()
        )
        expected_inputs = group_channels * block.num_groups
        fits_inputs = inputs[-1] == expected_inputs
    num_features = block.config[1] if block.kind == "DenseGeneral" else 1
    fits_outputs = (
        math.prod(outputs[len(outputs) - num_features :])
        == block.output_dim * block.num_groups
    )
    if not (fits_inputs and fits_outputs and inputs[:1] == outputs[:1]):
        raise ValueError(
            f"scale_by_ekfac: stats for {block.name} have inputs {inputs} and "
            f"output gradients {outputs}, which do not fit its {block.kind} block "
            f"(input features {expected_inputs}, output features "
            f"{block.output_dim * block.num_groups}). Were they captured from "
            "another model?"
        )


def _conv_patches(block: Block, inputs: jax.Array) -> jax.Array:
    """Image patches `[N, *out_spatial, G, K * C_in/G]`, rows ordered like the
    kernel `(*kernel_size, C_in/G)` flattened."""
    kernel_size, strides, padding, input_dilation, kernel_dilation = block.config
    dilated_kernel = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    if padding in ("CIRCULAR", "REFLECT", "CAUSAL"):
        # As flax.linen.Conv does: pad explicitly, then convolve VALID.
        if padding == "CAUSAL":
            pads = [(dilated_kernel[0] - 1, 0)]
            mode = "constant"
        else:
            pads = [((k - 1) // 2, k // 2) for k in dilated_kernel]
            mode = {"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding]
        inputs = jnp.pad(inputs, [(0, 0)] + pads + [(0, 0)], mode=mode)
        padding = "VALID"
    # Explicit padding, with input dilation as interior padding, then one
    # strided slice per kernel offset: a copy, where conv_general_dilated_patches
    # would convolve with an identity filter (K*C times the work).
    if isinstance(padding, str):  # "SAME" or "VALID"
        dilated_input = [
            (size - 1) * d + 1 for size, d in zip(inputs.shape[1:-1], input_dilation)
        ]
        padding = jax.lax.padtype_to_pads(
            dilated_input, dilated_kernel, strides, padding
        )
    pad_config = (
        [(0, 0, 0)]
        + [(low, high, d - 1) for (low, high), d in zip(padding, input_dilation)]
        + [(0, 0, 0)]
    )
    inputs = jax.lax.pad(inputs, jnp.zeros((), inputs.dtype), pad_config)
    out_spatial = [
        (size - k) // s + 1
        for size, k, s in zip(inputs.shape[1:-1], dilated_kernel, strides)
    ]
    slices = []
    for offset in itertools.product(*(range(k) for k in kernel_size)):
        starts = [o * d for o, d in zip(offset, kernel_dilation)]
        slices.append(
            jax.lax.slice(
                inputs,
                [0, *starts, 0],
                [
                    inputs.shape[0],
                    *(
                        st + (n - 1) * s + 1
                        for st, n, s in zip(starts, out_spatial, strides)
                    ),
                    inputs.shape[-1],
                ],
                [1, *strides, 1],
            )
        )
    patches = jnp.stack(slices, axis=-2)  # [N, *out_spatial, K, C]
    # Rows ordered like the kernel (*kernel_size, C_in/G), one set per group.
    group_channels = inputs.shape[-1] // block.num_groups
    patches = patches.reshape(patches.shape[:-1] + (block.num_groups, group_channels))
    patches = jnp.moveaxis(patches, -2, -3)  # [N, *out_spatial, G, K, Cg]
    patches = patches.reshape(patches.shape[:-2] + (-1,))
    if not block.grouped:
        return patches[..., 0, :]
    # [N, *spatial, G, K*Cg] -> [G, N, *spatial, K*Cg]
    return jnp.moveaxis(patches, -2, 0)


# --- between parameter trees and block matrices --------------------------------


def block_matrix(block: Block, leaves: Mapping[ParamPath, jax.Array]) -> jax.Array:
    """The block matrix `(input_dim, output_dim)` (grouped: with a leading
    group axis) from its parameter leaves."""
    kernel = leaves[block.param_paths[0]]
    if block.grouped:
        # (*k, Cg, G*Og) -> (G, K*Cg, Og)
        kernel = kernel.reshape(-1, block.num_groups, block.output_dim)
        kernel = jnp.moveaxis(kernel, 1, 0)
    else:
        kernel = kernel.reshape(-1, block.output_dim)
    if not block.has_bias:
        return kernel
    bias = leaves[block.param_paths[1]].astype(kernel.dtype)
    bias = bias.reshape(block.num_groups, 1, block.output_dim)
    return jnp.concatenate([kernel, bias if block.grouped else bias[0]], -2)


def block_leaves(
    block: Block, matrix: jax.Array, like: Mapping[ParamPath, jax.Array]
) -> dict[ParamPath, jax.Array]:
    """Split a block matrix back into its leaves, in the shapes and dtypes of
    `like`."""
    kernel_path = block.param_paths[0]
    kernel = matrix[..., : block.input_dim - block.has_bias, :]
    if block.grouped:
        kernel = jnp.moveaxis(kernel, 0, 1)  # (K*Cg, G, Og)
    leaves = {kernel_path: _like(kernel, like[kernel_path])}
    if block.has_bias:
        bias_path = block.param_paths[1]
        leaves[bias_path] = _like(matrix[..., -1, :], like[bias_path])
    return leaves


def _like(value: jax.Array, leaf: jax.Array) -> jax.Array:
    return value.reshape(leaf.shape).astype(leaf.dtype)


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,)


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
