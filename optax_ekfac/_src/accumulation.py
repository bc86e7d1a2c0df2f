"""Gradient accumulation: one step's loss, gradients and statistics from
micro-batches.

`optax.MultiSteps` accumulates gradients only: the transformation it wraps
gets the statistics of each micro-batch in turn and keeps its state from the
last one, so the curvature would be the last micro-batch's. Instead,
`accumulated(curvature, k)` computes the step's gradients and statistics
micro-batch by micro-batch (a `jax.lax.scan`: the activations of one
micro-batch at a time) and combines them into those of the whole batch: the
statistics' rows are concatenated, so the factors and scalings of `k`
micro-batches of `n` examples are those of one batch of `k·n`, and the
adaptive `ekfac`'s loss model is the whole batch's.
"""

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ekfac._src.blocks import LayerStats
from optax_ekfac._src.capture import Curvature, Statistics
from optax_ekfac._src.loss_model import LossModel


def accumulated(
    curvature: Curvature, num_micro_batches: int
) -> Callable[..., tuple[Any, optax.Updates, Statistics]]:
    """`curvature.value_grad_and_stats` computed in micro-batches.

    The batch is split along the leading axis of its arguments into
    `num_micro_batches` equal parts, run one after the other; the result is
    that of the whole batch: the loss and gradients of the mean over all loss
    terms (each micro-batch weighted by its terms: a mask's real terms), the
    statistics of all examples (`num_terms` summed; with the Monte-Carlo
    Fisher, sample-major over the whole batch), and a `loss_model` of the
    whole batch. The statistics hold every micro-batch's layer inputs and
    output gradients, as one batch's would; what the micro-batches save is
    the rest of the activations. Where `curvature` bounds the rows of the
    curvature (`max_curvature_terms`), each micro-batch gives its own sample's
    statistics, and the loss model is the whole batch's.

    Args:
        curvature: a `Curvature` (flax.linen).
        num_micro_batches: `k`; every batch argument with an axis must have a
            leading size divisible by it (arguments without one are shared).

    Returns:
        `value_grad_and_stats(params, *batch, key=None)`, as
        `Curvature.value_grad_and_stats` (with `has_aux`, `aux` gets a leading
        micro-batch axis; a `key` is split over the micro-batches).

    Example:
        >>> value_grad_and_stats = optax_ekfac.accumulated(curvature, 4)
        >>> loss, grads, stats = value_grad_and_stats(params, x, y)
        >>> stats.num_terms, stats.layers["Dense_0"][0].inputs.shape
        (32, (32, 8))
    """
    if not isinstance(curvature, Curvature):
        raise TypeError(
            "accumulated: curvature must be an optax_ekfac.Curvature (flax.linen), "
            f"not {type(curvature).__name__}; micro-batches of an "
            "optax_ekfac.nnx.Curvature are not supported yet."
        )
    if not (isinstance(num_micro_batches, int) and num_micro_batches >= 1):
        raise ValueError(
            "accumulated: num_micro_batches must be an integer >= 1, got "
            f"{num_micro_batches!r}."
        )
    k = num_micro_batches

    def value_grad_and_stats(
        params: optax.Params, *batch: Any, key: jax.Array | None = None
    ) -> tuple[Any, optax.Updates, Statistics]:
        leaves, treedef = jax.tree.flatten(batch)
        split = tuple(bool(jnp.ndim(leaf)) for leaf in leaves)
        sizes = {jnp.shape(leaf)[0] for leaf, s in zip(leaves, split) if s}
        if len(sizes) != 1 or next(iter(sizes)) % k:
            raise ValueError(
                f"accumulated: the batch arguments' leading sizes {sorted(sizes)} "
                f"must be one size divisible by num_micro_batches={k}."
            )
        micro_leaves = [
            jnp.reshape(leaf, (k, -1) + jnp.shape(leaf)[1:])
            for leaf, s in zip(leaves, split)
            if s
        ]
        shared = [leaf for leaf, s in zip(leaves, split) if not s]
        assemble = _MicroBatch(treedef, split)
        keys = None if key is None else jax.random.split(key, k)
        # What every micro-batch's trace has in common (Python values).
        static: dict[str, Any] = {}

        def body(carry, xs):
            micro_leaves, micro_key = xs
            result, grads, stats = curvature.value_grad_and_stats(
                params, *assemble(micro_leaves, shared), key=micro_key
            )
            loss, aux = result if curvature.has_aux else (result, None)
            static.update(
                losses_fn=stats.loss_model.losses_fn,
                num_samples=stats.num_samples,
                num_terms=stats.num_terms,
                sampled=stats.num_batch_terms is not None,
            )
            # The micro-batch's loss and gradients average its terms (all of
            # them, where its curvature comes from a sample of its rows).
            terms = jnp.asarray(stats.gradient_terms, loss.dtype)
            loss_sum, grad_sum, terms_sum = carry
            carry = (
                loss_sum + terms * loss,
                jax.tree.map(lambda a, g: a + terms * g, grad_sum, grads),
                terms_sum + terms,
            )
            sample_terms = jnp.asarray(stats.num_terms, loss.dtype)
            return carry, (stats.layers, terms, sample_terms, aux)

        loss_type = jax.eval_shape(
            curvature._uncaptured_losses,
            params,
            assemble([leaf[0] for leaf in micro_leaves], shared),
        )
        zero = jnp.zeros([], loss_type.dtype)
        init = (zero, optax.tree.zeros_like(params), zero)
        (loss_sum, grad_sum, terms_sum), (layers, terms, sample_terms, aux) = (
            jax.lax.scan(body, init, (micro_leaves, keys))
        )
        loss = loss_sum / terms_sum
        grads = jax.tree.map(
            lambda g, p: (g / terms_sum).astype(jnp.result_type(p)), grad_sum, params
        )
        num_samples = static["num_samples"]
        # Unweighted losses: a number known when tracing, as one batch's is.
        unweighted = isinstance(static["num_terms"], int)
        stats = Statistics(
            layers={
                name: tuple(
                    LayerStats(
                        _merged(call.inputs, num_samples),
                        _merged(call.output_grads, num_samples),
                    )
                    for call in calls
                )
                for name, calls in layers.items()
            },
            num_terms=k * static["num_terms"] if unweighted else sample_terms.sum(),
            num_samples=num_samples,
            loss_model=LossModel(
                params,
                (micro_leaves, shared, terms * k / terms_sum),
                loss,
                _WholeBatchLosses(static["losses_fn"], assemble),
            ),
            num_batch_terms=terms_sum if static["sampled"] else None,
        )
        return ((loss, aux) if curvature.has_aux else loss), grads, stats

    return value_grad_and_stats


@dataclasses.dataclass(frozen=True)
class _MicroBatch:
    """Assembles a micro-batch's arguments from its split leaves and the
    shared ones (hashable: it is part of the loss model's static fields)."""

    treedef: Any
    split: tuple[bool, ...]

    def __call__(self, split_leaves: Sequence[Any], shared: Sequence[Any]) -> tuple:
        split_parts, shared_parts = iter(split_leaves), iter(shared)
        return jax.tree.unflatten(
            self.treedef,
            [next(split_parts) if s else next(shared_parts) for s in self.split],
        )


@dataclasses.dataclass(frozen=True)
class _WholeBatchLosses:
    """The losses of every micro-batch, concatenated and scaled so that their
    mean is the whole batch's loss: micro-batch `i`'s losses (whose mean is
    its loss `L_i`) times `k N_i / Σ N`."""

    losses_fn: Callable[[optax.Params, Any], jax.Array]
    assemble: _MicroBatch

    def __call__(self, params: optax.Params, data: tuple) -> jax.Array:
        micro_leaves, shared, scales = data
        losses = [
            self.losses_fn(
                params, self.assemble([leaf[i] for leaf in micro_leaves], shared)
            ).reshape(-1)
            * scales[i]
            for i in range(scales.shape[0])
        ]
        return jnp.concatenate(losses)


def _merged(stacked: jax.Array, num_samples: int) -> jax.Array:
    """`[k, S * n, ...]` (each micro-batch sample-major) -> `[S * k * n, ...]`
    (sample-major over the whole batch)."""
    k = stacked.shape[0]
    per_sample = stacked.reshape((k, num_samples, -1) + stacked.shape[2:])
    return jnp.swapaxes(per_sample, 0, 1).reshape((-1,) + stacked.shape[2:])
