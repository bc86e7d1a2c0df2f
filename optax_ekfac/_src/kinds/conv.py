"""Conv: KFC (Grosse & Martens, 2016), input rows are image patches.

Input rows are the patches of the (padded, dilated) input each output
position sees, ordered like the kernel `(*kernel_size, C_in/G)` flattened
(plus a trailing 1 with a bias); output rows are each output position's
gradients. A grouped convolution (`feature_group_count = G`) is `G`
independent blocks of the same shape, stacked on a leading group axis of its
rows, its block matrix and its optimizer state. Masked convolutions are not
captured.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx
from flax.linen.linear import canonicalize_padding

from optax_ekfac._src.kinds.base import (
    CallShape,
    CallSite,
    LayerKind,
    LinenNames,
    as_tuple,
)

if TYPE_CHECKING:
    from optax_ekfac._src.blocks import Block


@dataclasses.dataclass(frozen=True)
class ConvConfig:
    """A convolution's geometry, one entry per spatial axis.

    Attributes:
        kernel_size: the kernel's spatial size.
        strides: the strides.
        padding: `"SAME"`, `"VALID"`, `"CIRCULAR"`, `"REFLECT"`, `"CAUSAL"`,
            or `(low, high)` per spatial axis.
        input_dilation: the input (transposed convolution) dilation.
        kernel_dilation: the kernel (atrous) dilation.
    """

    kernel_size: tuple[int, ...]
    strides: tuple[int, ...]
    padding: str | tuple[tuple[int, int], ...]
    input_dilation: tuple[int, ...]
    kernel_dilation: tuple[int, ...]


class Conv(LayerKind):
    """`flax.linen.Conv` and `flax.nnx.Conv` without a mask."""

    name = "Conv"
    layer_methods = ((nn.Conv, "__call__"), (nnx.Conv, "__call__"))

    def accepts(self, module: nn.Module | nnx.Module) -> bool:
        return LinenNames(module).mask is None

    def describe(self, call: CallSite) -> CallShape:
        name, module, inputs, outputs, *_ = call
        self.require_example_axis(name, inputs)
        kernel_size = as_tuple(module.kernel_size)
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
        if not isinstance(padding, str):
            padding = tuple((low, high) for low, high in padding)
        config = ConvConfig(
            kernel_size,
            broadcast(module.strides),
            padding,
            broadcast(module.input_dilation),
            broadcast(module.kernel_dilation),
        )
        params: tuple[tuple[str, tuple[int, ...]], ...] = (
            ("kernel", kernel_size + (group_in, features)),
        )
        if module.use_bias:
            params += (("bias", (features,)),)
        input_dim = math.prod(kernel_size) * group_in + module.use_bias
        return CallShape(params, input_dim, group_out, groups, config)

    def input_features(self, block: Block, inputs: jax.Array) -> jax.Array:
        return _patches(block, inputs)

    def expected_input_features(self, block: Block, method: str) -> int | None:
        del method
        group_channels = (block.input_dim - block.has_bias) // math.prod(
            block.config.kernel_size
        )
        return group_channels * block.num_groups


def _patches(block: Block, inputs: jax.Array) -> jax.Array:
    """Image patches `[N, *out_spatial, G, K * C_in/G]`, rows ordered like the
    kernel `(*kernel_size, C_in/G)` flattened."""
    config: ConvConfig = block.config
    kernel_size, strides, padding = config.kernel_size, config.strides, config.padding
    input_dilation, kernel_dilation = config.input_dilation, config.kernel_dilation
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
        pads = jax.lax.padtype_to_pads(dilated_input, dilated_kernel, strides, padding)
    else:
        pads = list(padding)
    pad_config = (
        [(0, 0, 0)]
        + [(low, high, d - 1) for (low, high), d in zip(pads, input_dilation)]
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
