"""The layer kinds, one module each, and the registry that finds them.

| kind         | input rows `a`                          | output rows `d`          |
| ------------ | --------------------------------------- | ------------------------ |
| Dense        | the input's last axis                   | the output's last axis   |
| DenseGeneral | the contracted input axes, flattened    | the feature axes         |
| Conv         | image patches (KFC, Grosse & Martens)   | each output position     |
| Embed        | one-hot token ids (kept as ids)         | each token's output      |
| Embed.attend | output gradients over the vocabulary    | the query                |

Adding a kind is adding a module with a `LayerKind` subclass (see `base.py`)
and registering an instance in `KINDS` below.
"""

import flax.linen as nn
from flax import nnx

from optax_ekfac._src.kinds.base import (
    Bases,
    CallShape,
    CallSite,
    LayerKind,
    LinenNames,
    Rows,
)
from optax_ekfac._src.kinds.conv import Conv, ConvConfig
from optax_ekfac._src.kinds.dense import Dense
from optax_ekfac._src.kinds.dense_general import DenseGeneral, DenseGeneralConfig
from optax_ekfac._src.kinds.embed import Embed

KINDS: dict[str, LayerKind] = {
    kind.name: kind for kind in (Dense(), DenseGeneral(), Conv(), Embed())
}
SUPPORTED = (
    "flax.linen Dense, DenseGeneral, Conv and Embed; "
    "flax.nnx Linear, LinearGeneral, Conv and Embed"
)


def get(name: str) -> LayerKind:
    """The kind registered under `name` (`Block.kind`)."""
    return KINDS[name]


def kind_of(module: nn.Module | nnx.Module, method_name: str) -> LayerKind | None:
    """The layer kind of a module method call, or None if it is not a block.

    flax.nnx layers are the kinds of their linen counterparts: `nnx.Linear` is
    a "Dense", `nnx.LinearGeneral` a "DenseGeneral". Modules that are not
    recognised (and Conv with a mask, DenseGeneral with `batch_dims`,
    LinearGeneral with `batch_axis`) are not captured: their parameters fall
    back to the diagonal.
    """
    for kind in KINDS.values():
        if kind.recognises(module, method_name):
            return kind
    return None


__all__ = [
    "KINDS",
    "SUPPORTED",
    "Bases",
    "CallShape",
    "CallSite",
    "Conv",
    "ConvConfig",
    "Dense",
    "DenseGeneral",
    "DenseGeneralConfig",
    "Embed",
    "LayerKind",
    "LinenNames",
    "Rows",
    "get",
    "kind_of",
]
