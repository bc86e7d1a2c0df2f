"""Embed: a lookup table, its input rows one-hot token ids (kept as ids).

An embedding's input rows are one-hot, so its input factor is diagonal (token
frequencies), kept as a vector, with the identity as eigenbasis; its
scalings are per position (an exact `[N, V, F]` tensor is too big). A tied
output projection (`Embed.attend`, `y = q Eᵀ`) is one more call of the same
block with the roles of its sides swapped: its gradient `dᵀ q` puts the
output gradients on the vocabulary side and the query on the feature side;
the vocabulary side stays diagonal (the squares of those output gradients).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import nnx

from optax_ekfac._src import curvature
from optax_ekfac._src.kinds.base import (
    Bases,
    CallShape,
    CallSite,
    LayerKind,
    Rows,
)
from optax_ekfac._src.sharding import reshape_keeping

if TYPE_CHECKING:
    from optax_ekfac._src.blocks import Block
    from optax_ekfac._src.options import Options
    from optax_ekfac._src.statistics import LayerStats


class Embed(LayerKind):
    """`flax.linen.Embed` and `flax.nnx.Embed`: lookups and `attend`."""

    name = "Embed"
    layer_methods = (
        (nn.Embed, "__call__"),
        (nn.Embed, "attend"),
        (nnx.Embed, "__call__"),
        (nnx.Embed, "attend"),
    )
    diagonal_input = True

    def describe(self, call: CallSite) -> CallShape:
        name, module, inputs, outputs, *_ = call
        if inputs.shape[-1:] == (module.features,) and outputs.shape[-1:] == (
            module.num_embeddings,
        ):  # attend: queries in, logits over the vocabulary out
            if inputs.ndim < 2:
                raise ValueError(
                    f"{name}: Embed.attend needs a leading batch axis; got "
                    f"{inputs.shape}."
                )
        elif inputs.ndim < 1 or not jnp.issubdtype(inputs.dtype, jnp.integer):
            raise ValueError(
                f"{name}: Embed needs integer token ids with a leading batch axis; "
                f"got {inputs.dtype}{list(inputs.shape)}."
            )
        params = (("embedding", (module.num_embeddings, module.features)),)
        return CallShape(params, module.num_embeddings, module.features)

    def input_rows(self, block: Block, inputs: jax.Array, dtype: Any) -> jax.Array:
        """An embedding's rows are its token ids, `[N, positions]` (one-hot,
        never materialised)."""
        del block, dtype
        return reshape_keeping(inputs, (inputs.shape[0], -1))

    def example_rows(
        self, block: Block, stats: Sequence[LayerStats], dtype: Any
    ) -> tuple[jax.Array, jax.Array]:
        """The lookups: token ids `[N, P]` and output rows `[N, P, F]`."""
        lookups = [
            call for call, method in zip(stats, block.methods) if method == "__call__"
        ]
        num_examples = stats[0].inputs.shape[0]
        ids = [self.input_rows(block, call.inputs, dtype) for call in lookups]
        outputs = [
            self.output_rows(block, call.output_grads, dtype) for call in lookups
        ]
        if not lookups:
            empty = jnp.zeros((num_examples, 0), jnp.int32)
            return empty, jnp.zeros((num_examples, 0, block.output_dim), dtype)
        return jnp.concatenate(ids, 1), jnp.concatenate(outputs, 1)

    def attend_rows(
        self, block: Block, stats: Sequence[LayerStats], dtype: Any
    ) -> tuple[jax.Array, jax.Array] | None:
        """A tied embedding's `attend` calls as rows, or None if it has none.

        Returns:
            `(vocabulary_rows [N, P, V], feature_rows [N, P, F])`: the output
            gradients of the logits and the queries, so that the per-example
            gradient of the embedding is `Σ_p vocabulary_row feature_rowᵀ`.
        """
        attends = [
            call for call, method in zip(stats, block.methods) if method == "attend"
        ]
        if not attends:
            return None
        num_examples = attends[0].inputs.shape[0]

        def rows(array, width):
            return reshape_keeping(array, (num_examples, -1, width)).astype(dtype)

        return (
            jnp.concatenate(
                [rows(c.output_grads, block.input_dim) for c in attends], 1
            ),
            jnp.concatenate([rows(c.inputs, block.output_dim) for c in attends], 1),
        )

    def per_example_gradients(
        self, block: Block, stats: Sequence[LayerStats], dtype: Any
    ) -> jax.Array:
        """Materialises one-hot token rows, so it is meant for inspection of
        small models, not for the training step."""
        inputs, outputs = self.example_rows(block, stats, dtype)
        inputs = jax.nn.one_hot(inputs, block.input_dim, dtype=dtype)
        gradients = jnp.einsum("...npi,...npo->n...io", inputs, outputs)
        attends = self.attend_rows(block, stats, dtype)
        if attends is not None:
            gradients = gradients + jnp.einsum("npv,npf->nvf", *attends)
        return gradients

    def expected_input_features(self, block: Block, method: str) -> int | None:
        return block.output_dim if method == "attend" else None

    def fits_inputs(self, block: Block, call: LayerStats, method: str) -> bool:
        inputs, outputs = call.inputs.shape, call.output_grads.shape
        if method == "attend":  # queries in, logits over the vocabulary out
            return inputs[-1:] == (block.output_dim,) and (
                outputs[-1:] == (block.input_dim,)
            )
        return inputs == outputs[:-1]

    def fits_outputs(self, block: Block, call: LayerStats, method: str) -> bool:
        # attend: its vocabulary-sized outputs are checked with its inputs.
        return method == "attend" or super().fits_outputs(block, call, method)

    def misfit(self, block: Block, call: LayerStats, method: str) -> str | None:
        problem = super().misfit(block, call, method)
        if problem is None and method == "__call__":
            if not jnp.issubdtype(call.inputs.dtype, jnp.integer):
                return (
                    f"stats for {block.name} hold embedding inputs of dtype "
                    f"{call.inputs.dtype}, not token ids."
                )
        return problem

    def batch_factors(
        self, block: Block, rows: Rows, num_terms: Any, options: Options
    ) -> tuple[jax.Array, jax.Array]:
        return curvature.diagonal_factors(
            rows, block.input_dim, num_terms, options.factor_dim_limit
        )

    def batch_scalings(
        self, block: Block, rows: Rows, bases: Bases, num_terms: Any, options: Options
    ) -> jax.Array:
        del options
        _, output_basis = bases  # the input basis is the identity
        return curvature.diagonal_scalings(
            rows, output_basis, block.input_dim, num_terms
        )
