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
from flax import nnx

from optax_ekfac._src import nnx_capture
from optax_ekfac._src.capture import Curvature
from optax_ekfac._src.loss_model import LossModel
from optax_ekfac._src.statistics import LayerStats, Statistics


def accumulated(
    curvature: Curvature | nnx_capture.Curvature, num_micro_batches: int
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
    the rest of the activations. Where `curvature` bounds the terms of the
    curvature (`max_curvature_terms`), each micro-batch gives its own sample's
    statistics, and the loss model is the whole batch's.

    With an `optax_ekfac.nnx.Curvature`, the model's other state (BatchNorm
    statistics, the counts of `nnx.Rngs`) goes from one micro-batch to the
    next, as `k` calls of `value_grad_and_stats` would take it, and is
    written back to the model after the last; the loss model evaluates
    each micro-batch with the state that micro-batch saw (its dropout masks).

    Args:
        curvature: a `Curvature` (flax.linen) or an
            `optax_ekfac.nnx.Curvature` (flax.nnx).
        num_micro_batches: `k`; every batch argument with an axis must have a
            leading size divisible by it (arguments without one are shared).

    Returns:
        `value_grad_and_stats(params, *batch, key=None)` (for nnx,
        `value_grad_and_stats(model, *batch, key=None)`), as the curvature's
        own (with `has_aux`, `aux` gets a leading micro-batch axis; a `key`
        is split over the micro-batches).

    Example:
        >>> value_grad_and_stats = optax_ekfac.accumulated(curvature, 4)
        >>> loss, grads, stats = value_grad_and_stats(params, x, y)
        >>> stats.num_terms, stats.layers["Dense_0"][0].inputs.shape
        (32, (32, 8))
    """
    if not isinstance(curvature, Curvature | nnx_capture.Curvature):
        raise TypeError(
            "accumulated: curvature must be an optax_ekfac.Curvature (flax.linen) "
            "or an optax_ekfac.nnx.Curvature (flax.nnx), not a "
            f"{type(curvature).__module__}.{type(curvature).__qualname__}."
        )
    if not (isinstance(num_micro_batches, int) and num_micro_batches >= 1):
        raise ValueError(
            "accumulated: num_micro_batches must be an integer >= 1, got "
            f"{num_micro_batches!r}."
        )
    k = num_micro_batches
    if isinstance(curvature, nnx_capture.Curvature):
        return _nnx_accumulated(curvature, k)

    def micro_step(params, micro_batch, key, carried):
        result, grads, stats = curvature.value_grad_and_stats(
            params, *micro_batch, key=key
        )
        loss, aux = result if curvature.has_aux else (result, None)
        return loss, aux, grads, stats, carried

    def value_grad_and_stats(
        params: optax.Params, *batch: Any, key: jax.Array | None = None
    ) -> tuple[Any, optax.Updates, Statistics]:
        loss, aux, grads, stats, _ = _accumulate(
            micro_step, _LinenMicroBatchLosses(curvature), params, batch, key, k, None
        )
        return ((loss, aux) if curvature.has_aux else loss), grads, stats

    return value_grad_and_stats


def _nnx_accumulated(
    curvature: nnx_capture.Curvature, k: int
) -> Callable[..., tuple[Any, nnx.State, Statistics]]:
    """`accumulated` of an nnx `Curvature`: the linen capture of each
    micro-batch over the model's split state, the other state carried."""

    def value_grad_and_stats(
        model: nnx.Module, *batch: Any, key: jax.Array | None = None
    ) -> tuple[Any, nnx.State, Statistics]:
        over_params, params = curvature._split(model)
        graphdef = over_params.graphdef

        def micro_step(params, micro_batch, key, rest):
            over_params = nnx_capture._OverParams(curvature, graphdef, rest)
            (loss, (aux, rest)), grads, stats = over_params.value_grad_and_stats(
                params, *micro_batch, key=key
            )
            return loss, aux, grads, stats, rest

        loss, aux, grads, stats, rest = _accumulate(
            micro_step,
            _NnxMicroBatchLosses(curvature, graphdef),
            params,
            batch,
            key,
            k,
            over_params.rest,
        )
        nnx.update(model, rest)
        return ((loss, aux) if curvature.has_aux else loss), grads, stats

    return value_grad_and_stats


def _accumulate(
    micro_step: Callable[..., tuple[Any, Any, optax.Updates, Statistics, Any]],
    micro_losses: Callable[[optax.Params, tuple, Any], jax.Array],
    params: optax.Params,
    batch: tuple,
    key: jax.Array | None,
    k: int,
    carried: Any,
) -> tuple[Any, Any, optax.Updates, Statistics, Any]:
    """The whole batch's `(loss, aux, grads, stats, carried)` from `k`
    micro-batches in a `lax.scan`.

    Args:
        micro_step: `micro_step(params, micro_batch, key, carried)` ->
            `(loss, aux, grads, stats, carried)` of one micro-batch, with
            `carried` what goes on to the next (None for linen).
        micro_losses: `micro_losses(params, micro_batch, carried)` -> that
            micro-batch's unreduced losses (the loss model's function).
        params: the parameters.
        batch: the whole batch's arguments.
        key: the key to split over the micro-batches, or None.
        k: the number of micro-batches.
        carried: what the first micro-batch gets.
    """
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
        loss_sum, grad_sum, terms_sum, carried = carry
        loss, aux, grads, stats, next_carried = micro_step(
            params, assemble(micro_leaves, shared), micro_key, carried
        )
        static.update(
            num_samples=stats.num_samples,
            num_terms=stats.num_terms,
            sampled=stats.num_batch_terms is not None,
        )
        # The micro-batch's loss and gradients average all its terms, where its
        # curvature comes from a sample of them too.
        terms = jnp.asarray(stats.gradient_terms, loss.dtype)
        sample_terms = jnp.asarray(stats.num_terms, loss.dtype)
        carry = (
            loss_sum + terms * loss,
            jax.tree.map(lambda a, g: a + terms * g, grad_sum, grads),
            terms_sum + terms,
            next_carried,
        )
        return carry, (stats.layers, terms, sample_terms, aux, carried)

    loss_type = jax.eval_shape(
        micro_losses,
        params,
        assemble([leaf[0] for leaf in micro_leaves], shared),
        carried,
    )
    zero = jnp.zeros([], loss_type.dtype)
    init = (zero, optax.tree.zeros_like(params), zero, carried)
    (loss_sum, grad_sum, terms_sum, carried), outputs = jax.lax.scan(
        body, init, (micro_leaves, keys)
    )
    layers, terms, sample_terms, aux, seen = outputs
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
            (micro_leaves, shared, terms * k / terms_sum, seen),
            loss,
            _WholeBatchLosses(micro_losses, assemble),
        ),
        num_batch_terms=terms_sum if static["sampled"] else None,
    )
    return loss, aux, grads, stats, carried


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

    micro_losses: Callable[[optax.Params, tuple, Any], jax.Array]
    assemble: _MicroBatch

    def __call__(self, params: optax.Params, data: tuple) -> jax.Array:
        micro_leaves, shared, scales, seen = data
        losses = [
            self.micro_losses(
                params,
                self.assemble([leaf[i] for leaf in micro_leaves], shared),
                jax.tree.map(lambda leaf, i=i: leaf[i], seen),
            ).reshape(-1)
            * scales[i]
            for i in range(scales.shape[0])
        ]
        return jnp.concatenate(losses)


@dataclasses.dataclass(frozen=True)
class _LinenMicroBatchLosses:
    """One micro-batch's losses at `params` (hashable: part of the loss
    model's static fields)."""

    curvature: Curvature

    def __call__(
        self, params: optax.Params, micro_batch: tuple, carried: None
    ) -> jax.Array:
        del carried
        return self.curvature._uncaptured_losses(params, micro_batch)


@dataclasses.dataclass(frozen=True)
class _NnxMicroBatchLosses:
    """One micro-batch's losses of an nnx model at `params`, with the other
    state that micro-batch saw (hashable: part of the loss model's static
    fields)."""

    curvature: nnx_capture.Curvature
    graphdef: Any

    def __call__(self, params: nnx.State, micro_batch: tuple, rest: Any) -> jax.Array:
        over_params = nnx_capture._OverParams(self.curvature, self.graphdef, rest)
        return over_params._uncaptured_losses(params, micro_batch)


def _merged(stacked: jax.Array, num_samples: int) -> jax.Array:
    """`[k, S * n, ...]` (each micro-batch sample-major) -> `[S * k * n, ...]`
    (sample-major over the whole batch)."""
    k = stacked.shape[0]
    per_sample = stacked.reshape((k, num_samples, -1) + stacked.shape[2:])
    return jnp.swapaxes(per_sample, 0, 1).reshape((-1,) + stacked.shape[2:])
