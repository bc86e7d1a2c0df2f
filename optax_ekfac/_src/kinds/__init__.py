"""The layer kinds, one module each, and the registry that finds them.

| kind         | input rows `a`                          | output rows `d`          |
| ------------ | --------------------------------------- | ------------------------ |
| Dense        | the input's last axis                   | the output's last axis   |
| DenseGeneral | the contracted input axes, flattened    | the feature axes         |
| Conv         | image patches (KFC, Grosse & Martens)   | each output position     |
| Embed        | one-hot token ids (kept as ids)         | each token's output      |
| Embed.attend | output gradients over the vocabulary    | the query                |
| Einsum       | the contracted input axes, flattened    | the kernel's output axes |

Adding a kind is adding a module with a `LayerKind` subclass (see `base.py`)
and registering an instance: below for this package's kinds, with
`optax_ekfac.register_kind` for a user's. `blockwise.py` maps a kind's
computations over a block's stack and groups.
"""

from optax_ekfac._src.kinds.base import (
    Bases,
    CallShape,
    CallSite,
    LayerKind,
    LinenNames,
    Rows,
)
from optax_ekfac._src.kinds.blockwise import (
    attend_rows,
    batch_factors,
    batch_scalings,
    block_leaves,
    block_matrix,
    example_rows,
    factor_shapes,
    initial_state,
    over_block,
    over_stack,
    per_example_block_gradients,
    precondition,
    rows,
)
from optax_ekfac._src.kinds.conv import Conv, ConvConfig
from optax_ekfac._src.kinds.dense import Dense
from optax_ekfac._src.kinds.dense_general import DenseGeneral, DenseGeneralConfig
from optax_ekfac._src.kinds.einsum import Einsum, EinsumConfig
from optax_ekfac._src.kinds.embed import Embed
from optax_ekfac._src.kinds.registry import (
    get,
    kind_of,
    nnx_methods,
    register_built_in,
    register_kind,
    supported,
)

register_built_in(Dense(), DenseGeneral(), Conv(), Embed(), Einsum())

__all__ = [
    "Bases",
    "CallShape",
    "CallSite",
    "Conv",
    "ConvConfig",
    "Dense",
    "DenseGeneral",
    "DenseGeneralConfig",
    "Einsum",
    "EinsumConfig",
    "Embed",
    "LayerKind",
    "LinenNames",
    "Rows",
    "attend_rows",
    "batch_factors",
    "batch_scalings",
    "block_leaves",
    "block_matrix",
    "example_rows",
    "factor_shapes",
    "get",
    "initial_state",
    "kind_of",
    "nnx_methods",
    "over_block",
    "over_stack",
    "per_example_block_gradients",
    "precondition",
    "register_kind",
    "rows",
    "supported",
]
