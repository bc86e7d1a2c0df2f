"""Dense (flax.nnx Linear): `y = x W + b` over the input's last axis.

Input rows are the input's last axis (plus a trailing 1 with a bias), output
rows the output's last axis; every leading axis after the first (sequence
positions) is a position of the example.
"""

import flax.linen as nn
from flax import nnx

from optax_ekfac._src.kinds.base import CallShape, CallSite, LayerKind


class Dense(LayerKind):
    """`flax.linen.Dense` and `flax.nnx.Linear`."""

    name = "Dense"
    layer_methods = ((nn.Dense, "__call__"), (nnx.Linear, "__call__"))

    def describe(self, call: CallSite) -> CallShape:
        name, module, inputs, outputs, *_ = call
        self.require_example_axis(name, inputs)
        d_in, d_out = inputs.shape[-1], outputs.shape[-1]
        params: tuple[tuple[str, tuple[int, ...]], ...] = (("kernel", (d_in, d_out)),)
        if module.use_bias:
            params += (("bias", (d_out,)),)
        return CallShape(params, d_in + module.use_bias, d_out)
