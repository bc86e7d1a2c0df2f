"""DenseGeneral (flax.nnx LinearGeneral): contracts several input axes into
several feature axes.

Input rows are the contracted input axes, moved last and flattened (plus a
trailing 1 with a bias); output rows are the feature axes, flattened. The
example axis must stay first and uncontracted; modules with batch axes
(`batch_dims`, nnx `batch_axis`) are not captured.
"""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from optax_ekfac._src.kinds.base import (
    CallShape,
    CallSite,
    LayerKind,
    LinenNames,
    as_tuple,
)

if TYPE_CHECKING:
    from optax_ekfac._src.blocks import Block
    from optax_ekfac._src.statistics import LayerStats


@dataclasses.dataclass(frozen=True)
class DenseGeneralConfig:
    """A DenseGeneral block's geometry.

    Attributes:
        axes: the contracted input axes, non-negative, in the input's order.
        num_features: how many trailing output axes are features.
    """

    axes: tuple[int, ...]
    num_features: int


class DenseGeneral(LayerKind):
    """`flax.linen.DenseGeneral` and `flax.nnx.LinearGeneral`."""

    name = "DenseGeneral"
    layer_methods = ((nn.DenseGeneral, "__call__"), (nnx.LinearGeneral, "__call__"))

    def accepts(self, module: nn.Module | nnx.Module) -> bool:
        return not LinenNames(module).batch_dims

    def describe(self, call: CallSite) -> CallShape:
        name, module, inputs, outputs, *_ = call
        self.require_example_axis(name, inputs)
        axes = tuple(a % inputs.ndim for a in as_tuple(module.axis))
        if 0 in axes:
            raise ValueError(
                f"{name}: DenseGeneral contracts axis 0, which the capture takes "
                "as the example axis; keep the batch axis first and uncontracted."
            )
        features = as_tuple(module.features)
        in_shape = tuple(inputs.shape[a] for a in axes)
        params: tuple[tuple[str, tuple[int, ...]], ...] = (
            ("kernel", in_shape + features),
        )
        if module.use_bias:
            params += (("bias", features),)
        return CallShape(
            params,
            math.prod(in_shape) + module.use_bias,
            math.prod(features),
            1,
            DenseGeneralConfig(axes, len(features)),
        )

    def input_features(self, block: Block, inputs: jax.Array) -> jax.Array:
        axes = block.config.axes
        inputs = jnp.moveaxis(inputs, axes, tuple(range(-len(axes), 0)))
        return inputs.reshape(inputs.shape[: -len(axes)] + (-1,))

    def fits_inputs(self, block: Block, call: LayerStats, method: str) -> bool:
        inputs = call.inputs.shape
        axes = block.config.axes
        return max(axes) < len(inputs) and (
            math.prod(inputs[a] for a in axes)
            == self.expected_input_features(block, method)
        )

    def output_feature_axes(self, block: Block) -> int:
        return block.config.num_features
