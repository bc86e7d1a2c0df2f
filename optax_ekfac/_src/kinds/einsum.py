"""Einsum (flax.linen and flax.nnx): a projection written as an einsum.

A projection einsum has the layer input and the kernel as its operands: the
axes they share are contracted (the input features), the kernel's other axes
are output features, and the input's other axes are the example axis (the
first, in the input and in the output) and positions, which the output keeps:
`'btd,dh->bth'` is a `Dense`, `'bsd,dnh->bsnh'` a query projection,
`'bsnh,nhd->bsd'` an attention output. Input rows are the contracted axes,
moved last in the kernel's order and flattened (plus a trailing 1 with a
bias); output rows are the kernel's output axes in the output's order,
flattened; the bias, if any, holds those axes. Einsums that are not
projections (a kernel axis the input and output share, as in a per-head
`'bhd,hdk->bhk'`; an input or kernel axis summed away; the example axis
contracted or moved) fall back to the diagonal preconditioner when the module
holds the equation (as every `Einsum` did before this kind), and are refused,
naming the layer, when the equation comes with the call.
"""

from __future__ import annotations

import dataclasses
import math
import string
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from optax_ekfac._src.kinds.base import CallShape, CallSite, LayerKind

if TYPE_CHECKING:
    from collections.abc import Mapping

    from optax_ekfac._src.blocks import Block, ParamPath
    from optax_ekfac._src.statistics import LayerStats


@dataclasses.dataclass(frozen=True)
class EinsumConfig:
    """A projection einsum's geometry.

    Attributes:
        equation: the einsum, ellipses spelled out.
        input_axes: the input's axes in row order: the example axis, the
            positions, then the contracted axes (in the kernel's order).
        output_axes: the output's axes in row order: the example axis, the
            positions (in the input's order), then the kernel's output axes
            (in the output's order).
        kernel_axes: the kernel's axes in block-matrix order: the contracted
            axes, then the output axes (in the output's order).
        num_contracted: how many of the kernel's axes are contracted.
    """

    equation: str
    input_axes: tuple[int, ...]
    output_axes: tuple[int, ...]
    kernel_axes: tuple[int, ...]
    num_contracted: int


class Einsum(LayerKind):
    """`flax.linen.Einsum` and `flax.nnx.Einsum` written as projections."""

    name = "Einsum"
    layer_methods = ((nn.Einsum, "__call__"), (nnx.Einsum, "__call__"))

    def accepts(self, module: nn.Module | nnx.Module) -> bool:
        """An einsum set on the module that is not a projection (a per-head
        `'bhd,hdk->bhk'`) falls back to the diagonal; one given at the call
        is checked, and refused, by `describe`."""
        equation = str(getattr(module, "einsum_str", None) or "").replace(" ", "")
        if not equation or equation.count("->") != 1:
            return True
        # The ellipsis's axes are the same in the input and the output: one
        # letter of their own stands for them in the checks.
        operands, output_letters = equation.replace("...", "0").split("->")
        if operands.count(",") != 1:
            return True
        input_letters, kernel_letters = operands.split(",")
        return not _not_a_projection(input_letters, kernel_letters, output_letters)

    def describe(self, call: CallSite) -> CallShape:
        name, module, inputs, outputs = (
            call.name,
            call.module,
            call.inputs,
            call.outputs,
        )
        self.require_example_axis(name, inputs)
        equation = call.kwargs.get("einsum_str") or (
            call.args[0] if call.args else None
        )
        equation = str(equation or module.einsum_str).replace(" ", "")
        input_letters, kernel_letters, output_letters = _operands(
            name, equation, inputs.ndim
        )
        equation = f"{input_letters},{kernel_letters}->{output_letters}"

        def refuse(reason: str) -> ValueError:
            return ValueError(
                f"{name}: this Einsum, '{equation}', is not a projection the "
                f"capture can precondition: {reason}. EKFAC captures einsums "
                "whose kernel maps the input's contracted axes to output axes, "
                "with the example axis first in the input and the output "
                "('btd,dh->bth', 'bsd,dnh->bsnh'); write this layer as such "
                "an einsum, or as a plain self.param (diagonal fallback)."
            )

        if len(output_letters) != outputs.ndim:
            raise refuse(f"its output has {outputs.ndim} axes")
        reason = _not_a_projection(input_letters, kernel_letters, output_letters)
        if reason:
            raise refuse(reason)
        contracted = [c for c in kernel_letters if c in input_letters]
        features = [c for c in output_letters if c in kernel_letters]
        positions = [c for c in input_letters[1:] if c not in kernel_letters]

        sizes = dict(zip(input_letters, inputs.shape))
        sizes.update(zip(output_letters, outputs.shape))
        kernel_shape = tuple(sizes[c] for c in kernel_letters)
        feature_shape = tuple(sizes[c] for c in features)
        # flax.nnx sets the bias's shape; flax.linen makes it the features'.
        bias_shape = getattr(module, "bias_shape", None)
        use_bias = getattr(module, "use_bias", bias_shape is not None)
        params: tuple[tuple[str, tuple[int, ...]], ...] = (("kernel", kernel_shape),)
        if use_bias:
            params += (("bias", tuple(bias_shape or feature_shape)),)
        config = EinsumConfig(
            equation=equation,
            input_axes=(
                0,
                *(input_letters.index(c) for c in positions),
                *(input_letters.index(c) for c in contracted),
            ),
            output_axes=(
                0,
                *(output_letters.index(c) for c in positions),
                *(output_letters.index(c) for c in features),
            ),
            kernel_axes=tuple(kernel_letters.index(c) for c in contracted + features),
            num_contracted=len(contracted),
        )
        return CallShape(
            params,
            math.prod(sizes[c] for c in contracted) + use_bias,
            math.prod(feature_shape),
            1,
            config,
        )

    def input_features(self, block: Block, inputs: jax.Array) -> jax.Array:
        config: EinsumConfig = block.config
        inputs = jnp.transpose(inputs, config.input_axes)
        return inputs.reshape(
            inputs.shape[: inputs.ndim - config.num_contracted] + (-1,)
        )

    def output_rows(
        self, block: Block, output_grads: jax.Array, dtype: Any
    ) -> jax.Array:
        output_grads = jnp.transpose(output_grads, block.config.output_axes)
        return super().output_rows(block, output_grads, dtype)

    def fits_inputs(self, block: Block, call: LayerStats, method: str) -> bool:
        config: EinsumConfig = block.config
        inputs = call.inputs.shape
        contracted = config.input_axes[len(config.input_axes) - config.num_contracted :]
        return len(inputs) == len(config.input_axes) and math.prod(
            inputs[a] for a in contracted
        ) == self.expected_input_features(block, method)

    def fits_outputs(self, block: Block, call: LayerStats, method: str) -> bool:
        del method
        config: EinsumConfig = block.config
        outputs = call.output_grads.shape
        num_positions = len(config.input_axes) - config.num_contracted
        features = config.output_axes[num_positions:]
        return len(outputs) == len(config.output_axes) and (
            math.prod(outputs[a] for a in features) == block.output_dim
        )

    def block_matrix(
        self, block: Block, leaves: Mapping[ParamPath, jax.Array]
    ) -> jax.Array:
        kernel_path = block.param_paths[0]
        kernel = jnp.transpose(leaves[kernel_path], block.config.kernel_axes)
        return super().block_matrix(block, {**leaves, kernel_path: kernel})

    def block_leaves(
        self, block: Block, matrix: jax.Array, like: Mapping[ParamPath, jax.Array]
    ) -> dict[ParamPath, jax.Array]:
        axes = block.config.kernel_axes
        kernel_path = block.param_paths[0]
        kernel = like[kernel_path]
        transposed = jax.ShapeDtypeStruct(
            tuple(kernel.shape[a] for a in axes), kernel.dtype
        )
        # The kernel in block-matrix order; the base class only reads its shape.
        transposed_like: dict[ParamPath, Any] = {**like, kernel_path: transposed}
        leaves = super().block_leaves(block, matrix, transposed_like)
        leaves[kernel_path] = jnp.transpose(
            leaves[kernel_path], tuple(int(a) for a in np.argsort(axes))
        )
        return leaves


def _not_a_projection(
    input_letters: str, kernel_letters: str, output_letters: str
) -> str | None:
    """Why an einsum is not a projection the capture can precondition, or
    None where it is one."""
    for operand in (input_letters, kernel_letters, output_letters):
        repeated = sorted({c for c in operand if operand.count(c) > 1})
        if repeated:
            return f"axis {repeated[0]!r} repeats within an operand"
    example = input_letters[:1]
    if example in kernel_letters:
        return (
            f"it contracts the input's axis 0 ({example!r}), which the capture "
            "takes as the example axis"
        )
    if output_letters[:1] != example:
        return f"the example axis {example!r} is not the output's first axis"
    for letter in input_letters + kernel_letters:
        if letter not in output_letters and not (
            letter in input_letters and letter in kernel_letters
        ):
            return f"it sums axis {letter!r} away"
    batched = [c for c in kernel_letters if c in input_letters and c in output_letters]
    if batched:
        return (
            f"axis {batched[0]!r} of the kernel is also an axis of the input and "
            "of the output (a batched product: one kernel slice per index, not "
            "one block)"
        )
    if not any(c in input_letters for c in kernel_letters):
        return "it contracts no axis of the input"
    return None


def _operands(name: str, equation: str, input_ndim: int) -> tuple[str, str, str]:
    """The input's, the kernel's and the output's letters of `equation`, an
    ellipsis in the input and output spelled out as letters of their own."""
    if equation.count("->") != 1 or equation.split("->")[0].count(",") != 1:
        raise ValueError(
            f"{name}: Einsum '{equation}' needs two operands, the input and the "
            "kernel, and an explicit output ('btd,dh->bth')."
        )
    operands, output_letters = equation.split("->")
    input_letters, kernel_letters = operands.split(",")
    if "..." in kernel_letters:
        raise ValueError(
            f"{name}: Einsum '{equation}' has an ellipsis in its kernel; write "
            "the kernel's axes out."
        )
    if "..." in input_letters:
        unused = [c for c in string.ascii_letters if c not in equation]
        spelled = "".join(unused[: input_ndim - (len(input_letters) - 3)])
        input_letters = input_letters.replace("...", spelled)
        output_letters = output_letters.replace("...", spelled)
    return input_letters, kernel_letters, output_letters
