"""What a layer kind is: the interface every kind implements, and its defaults.

A kind (Dense, DenseGeneral, Conv, Embed, Einsum) knows, for the calls of its
modules: which layer classes and methods it covers (`layer_methods`, flax.linen
and flax.nnx alike, the one listing both captures read), what block a call
implies (`describe`, with the kind's typed config), how to turn the captured
arrays into input and output rows, whether statistics fit the block, how to
move between parameter leaves and the block matrix, the shapes of its factors,
and how to compute the block's per-example gradients, factors, scalings and
preconditioned gradient from the rows, for one group of one element of a
stack (`blockwise.py` maps them over the rest).

The defaults here are those of a kernel (and bias) that multiplies input
rows, `y = a W + b`, the block matrix being the kernel's rows and then the
bias row; a kind overrides what differs (a convolution's patches, an
embedding's one-hot rows). The math itself is `curvature.py`'s.
"""

from __future__ import annotations

import dataclasses
import math
import types
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from optax_ekfac._src import curvature
from optax_ekfac._src.blocks import Block, ParamPath
from optax_ekfac._src.sharding import reshape_keeping
from optax_ekfac._src.state import BlockState
from optax_ekfac._src.statistics import LayerStats

if TYPE_CHECKING:
    from optax_ekfac._src.options import Options

ParamShapes = tuple[tuple[str, tuple[int, ...]], ...]
# Input rows, output rows, and a tied embedding's `attend` rows (or None).
Rows = tuple[jax.Array, jax.Array, "tuple[jax.Array, jax.Array] | None"]
# The eigenbases `(U_A, U_B)` of one group (`U_A` None: the identity).
Bases = tuple["jax.Array | None", jax.Array]


class CallSite(NamedTuple):
    """One call as the capture sees it while tracing `loss_fn`.

    Attributes:
        name: the block's name, for errors.
        module: the module's settings under linen's names.
        inputs: the shape and dtype of the layer input.
        outputs: the shape and dtype of the layer output.
        args: the call's positional arguments after the input.
        kwargs: the call's keyword arguments.
    """

    name: str
    module: "LinenNames"
    inputs: jax.ShapeDtypeStruct
    outputs: jax.ShapeDtypeStruct
    args: tuple = ()
    kwargs: Mapping[str, Any] = types.MappingProxyType({})


@dataclasses.dataclass(frozen=True)
class CallShape:
    """What one call says about its block.

    Attributes:
        params: `(name, shape)` of each parameter the block owns, in the
            module's parameters: the kernel first, then the bias if any.
        input_dim: size of the input factor `A` of one group (the input
            features, plus 1 with a bias).
        output_dim: size of the output factor `B` of one group.
        num_groups: independent blocks stacked on a leading axis (a grouped
            convolution's groups; 1 otherwise).
        config: the kind's typed settings (a frozen dataclass), or None.
    """

    params: ParamShapes
    input_dim: int
    output_dim: int
    num_groups: int = 1
    config: Any = None


class LayerKind:
    """One layer kind; subclasses override what differs from `y = a W + b`.

    A kind needs a `name`, its `layer_methods` and `describe`; the defaults
    of everything else are those of a kernel (and bias) that multiplies the
    input's last axis, `y = x W + b`. Register an instance with
    `optax_ekfac.register_kind`.

    Attributes:
        name: the kind's name, `Block.kind`.
        layer_methods: the `(layer class, method name)` pairs whose calls are
            this kind's (subclasses included), flax.linen and flax.nnx
            classes alike: the linen interceptor and the nnx capture both
            read them.
        diagonal_input: the input factor is diagonal with the identity as
            eigenbasis (one-hot input rows).
    """

    name: ClassVar[str]
    layer_methods: ClassVar[tuple[tuple[type, str], ...]] = ()
    diagonal_input: ClassVar[bool] = False

    # --- recognising a call ----------------------------------------------------

    def recognises(self, module: nn.Module | nnx.Module, method_name: str) -> bool:
        """Whether a call of `module.method_name` is a block of this kind: one
        of `layer_methods`, of a module the kind `accepts`."""
        return any(
            isinstance(module, cls) and method_name == name
            for cls, name in self.layer_methods
        ) and self.accepts(module)

    def accepts(self, module: nn.Module | nnx.Module) -> bool:
        """Whether the kind captures this module; one it does not (a masked
        convolution) falls back to the diagonal."""
        del module
        return True

    def describe(self, call: CallSite) -> CallShape:
        """The block one call implies; raises if the capture can't use it."""
        raise NotImplementedError

    def require_example_axis(self, name: str, inputs: jax.ShapeDtypeStruct) -> None:
        """Raises unless the input has a leading batch axis before its features."""
        if inputs.ndim < 2:
            raise ValueError(
                f"{name}: a {self.name} layer was called on an input of shape "
                f"{inputs.shape}; the capture needs a leading batch axis (do not "
                "call the model under jax.vmap inside loss_fn)."
            )

    # --- rows of the Kronecker factors -----------------------------------------

    def input_features(self, block: Block, inputs: jax.Array) -> jax.Array:
        """The layer input with the features that multiply the kernel last
        (`[N, ..., features]`; grouped: `[G, N, ..., features]`)."""
        del block
        return inputs

    def input_rows(self, block: Block, inputs: jax.Array, dtype: Any) -> jax.Array:
        """Input rows `a` of one call: `[N, positions, input_dim]`.

        The leading axis of the layer input is the example axis; every other
        leading axis (sequence, image position) is a position of that example.
        With a bias, each row gets a trailing 1. A grouped block's rows carry
        a leading group axis, `[G, N, positions, input_dim]`.
        """
        inputs = self.input_features(block, inputs)
        num_features = block.input_dim - block.has_bias
        leading = inputs.shape[: 1 + block.grouped]  # [G,] N
        rows = reshape_keeping(inputs, leading + (-1, num_features), len(leading))
        rows = rows.astype(dtype)
        if block.has_bias:
            # ones_like keeps the rows' sharding (the example axis, when sharded).
            rows = jnp.concatenate([rows, jnp.ones_like(rows[..., :1])], -1)
        return rows

    def output_rows(
        self, block: Block, output_grads: jax.Array, dtype: Any
    ) -> jax.Array:
        """Output rows `d` of one call: `[N, positions, output_dim]` (grouped:
        `[G, N, positions, output_dim]`)."""
        num_examples = output_grads.shape[0]
        if block.grouped:
            rows = reshape_keeping(
                output_grads, (num_examples, -1, block.num_groups, block.output_dim)
            )
            return jnp.moveaxis(rows, 2, 0).astype(dtype)
        rows = reshape_keeping(output_grads, (num_examples, -1, block.output_dim))
        return rows.astype(dtype)

    def example_rows(
        self, block: Block, stats: Sequence[LayerStats], dtype: Any
    ) -> tuple[jax.Array, jax.Array]:
        """Input and output rows of all calls: `[N, positions, dim]` each.

        The calls of a block are positions of the same examples, so they are
        concatenated along the positions axis: the per-example block gradient
        is `G_n = Σ_p a_{n,p} d_{n,p}ᵀ`.
        """
        inputs = [self.input_rows(block, call.inputs, dtype) for call in stats]
        outputs = [self.output_rows(block, call.output_grads, dtype) for call in stats]
        return jnp.concatenate(inputs, -2), jnp.concatenate(outputs, -2)

    def attend_rows(
        self, block: Block, stats: Sequence[LayerStats], dtype: Any
    ) -> tuple[jax.Array, jax.Array] | None:
        """Rows of calls with the block's sides swapped (a tied embedding's
        `attend`), or None."""
        del block, stats, dtype
        return None

    def rows(self, block: Block, stats: Sequence[LayerStats], dtype: Any) -> Rows:
        """Everything the factors and scalings are computed from."""
        return (
            *self.example_rows(block, stats, dtype),
            self.attend_rows(block, stats, dtype),
        )

    def per_example_gradients(
        self, block: Block, stats: Sequence[LayerStats], dtype: Any
    ) -> jax.Array:
        """`G_n = Σ_p a_{n,p} d_{n,p}ᵀ`: `[N, input_dim, output_dim]` (grouped:
        `[N, G, input_dim, output_dim]`)."""
        inputs, outputs = self.example_rows(block, stats, dtype)
        return jnp.einsum("...npi,...npo->n...io", inputs, outputs)

    # --- the statistics of a call ------------------------------------------------

    def expected_input_features(self, block: Block, method: str) -> int | None:
        """The input features (last axis) a call must have, if one number."""
        del method
        return (block.input_dim - block.has_bias) * block.num_groups

    def fits_inputs(self, block: Block, call: LayerStats, method: str) -> bool:
        """Whether a call's input shape fits the block."""
        return call.inputs.shape[-1] == self.expected_input_features(block, method)

    def output_feature_axes(self, block: Block) -> int:
        """How many trailing axes of the output are features."""
        del block
        return 1

    def fits_outputs(self, block: Block, call: LayerStats, method: str) -> bool:
        """Whether a call's output shape fits the block."""
        del method
        outputs = call.output_grads.shape
        num_axes = self.output_feature_axes(block)
        features = math.prod(outputs[len(outputs) - num_axes :])
        return features == block.output_dim * block.num_groups

    def misfit(self, block: Block, call: LayerStats, method: str) -> str | None:
        """Why one call's statistics do not fit the block, or None if they do."""
        inputs, outputs = call.inputs.shape, call.output_grads.shape
        if (
            self.fits_inputs(block, call, method)
            and self.fits_outputs(block, call, method)
            and inputs[:1] == outputs[:1]
        ):
            return None
        return (
            f"stats for {block.name} have inputs {inputs} and "
            f"output gradients {outputs}, which do not fit its {block.kind} block "
            f"(input features {self.expected_input_features(block, method)}, "
            f"output features {block.output_dim * block.num_groups}). Were they "
            "captured from another model?"
        )

    # --- between parameter leaves and the block matrix ---------------------------

    def block_matrix(
        self, block: Block, leaves: Mapping[ParamPath, jax.Array]
    ) -> jax.Array:
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
        self, block: Block, matrix: jax.Array, like: Mapping[ParamPath, jax.Array]
    ) -> dict[ParamPath, jax.Array]:
        """Split a block matrix back into its leaves, in the shapes and dtypes
        of `like`."""
        kernel_path = block.param_paths[0]
        kernel = matrix[..., : block.input_dim - block.has_bias, :]
        if block.grouped:
            kernel = jnp.moveaxis(kernel, 0, 1)  # (K*Cg, G, Og)
        leaves = {kernel_path: _like(kernel, like[kernel_path])}
        if block.has_bias:
            bias_path = block.param_paths[1]
            leaves[bias_path] = _like(matrix[..., -1, :], like[bias_path])
        return leaves

    # --- the optimizer state (one group) -----------------------------------------

    def factor_shapes(
        self, block: Block, max_factor_dim: int | None
    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """The shapes of `A` and `B` of one group: dense `(d, d)`, or
        block-diagonal `(k, b, b)` where a side is wider than `max_factor_dim`
        (see `BlockState`); a diagonal input factor is `(input_dim,)`."""
        output_shape = curvature.factor_shape(block.output_dim, max_factor_dim)
        if self.diagonal_input:
            return (block.input_dim,), output_shape
        return curvature.factor_shape(block.input_dim, max_factor_dim), output_shape

    def initial_state(
        self, block: Block, dtype: Any, max_factor_dim: int | None
    ) -> BlockState:
        """Zero factors and scalings and identity eigenbases of one group (no
        input eigenbasis for a diagonal input factor)."""
        input_shape, output_shape = self.factor_shapes(block, max_factor_dim)

        def eye(shape):
            return jnp.broadcast_to(jnp.eye(shape[-1], dtype=dtype), shape)

        return BlockState(
            input_factor=jnp.zeros(input_shape, dtype),
            output_factor=jnp.zeros(output_shape, dtype),
            input_eigenbasis=None if self.diagonal_input else eye(input_shape),
            output_eigenbasis=eye(output_shape),
            scalings=jnp.zeros((block.input_dim, block.output_dim), dtype),
        )

    # --- curvature from rows (one group) -----------------------------------------

    def batch_factors(
        self, block: Block, rows: Rows, num_terms: Any, options: Options
    ) -> tuple[jax.Array, jax.Array]:
        """`A` and `B` of one batch (see `curvature.kronecker_factors`)."""
        del block
        input_rows, output_rows, _ = rows
        return curvature.kronecker_factors(
            input_rows,
            output_rows,
            num_terms,
            options.reduce_positions,
            options.factor_dim_limit,
        )

    def batch_scalings(
        self, block: Block, rows: Rows, bases: Bases, num_terms: Any, options: Options
    ) -> jax.Array:
        """`S` of one batch in the eigenbases `(U_A, U_B)` (see
        `curvature.scalings`)."""
        del block
        input_rows, output_rows, _ = rows
        input_basis, output_basis = bases
        assert input_basis is not None
        return curvature.scalings(
            input_rows,
            output_rows,
            input_basis,
            output_basis,
            num_terms,
            exact=options.exact_scalings,
            max_elements=options.max_elements,
            axis_name=options.axis_name,
        )

    def precondition(
        self,
        block: Block,
        block_state: BlockState,
        gradient: jax.Array,
        damping: Any,
        floor: Any,
    ) -> jax.Array:
        """The block matrix of the gradient preconditioned in the eigenbases
        (see `curvature.precondition`)."""
        del block
        return curvature.precondition(block_state, gradient, damping, floor)


class LinenNames:
    """A layer's settings under flax.linen's attribute names.

    flax.nnx layers name two settings differently: the output features
    (`out_features`; linen: `features`) and LinearGeneral's batch axes
    (`batch_axis`; linen DenseGeneral: `batch_dims`). Everything else the
    description reads (`use_bias`, `axis`, `kernel_size`, `strides`,
    `padding`, dilations, `feature_group_count`, `mask`, `num_embeddings`,
    `einsum_str`) has the same name and meaning in both, except where one
    of them lacks it (nnx.Einsum's `bias_shape` for linen's `use_bias`): a
    kind reads those with `getattr(module, name, default)`.
    """

    _NNX_NAMES = {"features": "out_features", "batch_dims": "batch_axis"}

    def __init__(self, module: nn.Module | nnx.Module):
        self._module = module

    def __getattr__(self, name: str) -> Any:
        module = self._module
        if isinstance(module, nnx.Module) and not hasattr(module, name):
            name = self._NNX_NAMES.get(name, name)
        return getattr(module, name)


def as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, Sequence) else (value,)


def _like(value: jax.Array, leaf: jax.Array) -> jax.Array:
    return value.reshape(leaf.shape).astype(leaf.dtype)
