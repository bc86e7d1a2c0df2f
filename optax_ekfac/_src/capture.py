"""Capture: every block's inputs and output gradients in the loss's own pass.

`Curvature(loss_fn)` runs the user's `loss_fn` under a `flax.linen` method
interceptor (`interceptor.py`). For every call of a supported layer the
interceptor records the layer input and adds a zero *perturbation* to the
layer output. One
`jax.value_and_grad` over `(params, perturbations)` then gives the loss, the
parameter gradients and, as the perturbations' gradients, the output
cotangents `dL/dy` of every call.

`loss_fn` returns unreduced losses: `L = mean(l)` over its `N` entries, so a
captured cotangent is `(1/N) dl_n/dy_n`. Scaling it by `N` gives the
per-example output gradient `d_n = dl_n/dy_n` that the Fisher needs.

For the Monte-Carlo Fisher (`fisher_type="mc"`) the loss helpers, while
`loss_fn` runs, also record the losses `l̃` of labels sampled from their own
predictions (see `losses.py`). One `jax.vjp` of `(l, l̃)` then serves two
backward passes: `mean(l)` gives the gradients and the slope `s` of the loss
with respect to each helper's losses, and each sample's `l̃` with cotangent
`√(N s)` (one sample at a time) gives the per-example `d̃_n = √(N s_n) dl̃_n/dy_n`
(`dl̃_n/dy_n` where `loss_fn` averages the helpers' losses as they are).

A layer called under a JAX transformation inside `loss_fn` (`nn.remat`,
`nn.scan`, `nn.vmap`, `jax.checkpoint`, their nnx counterparts) cannot hand
its input out by side effect: it lives in the transformation's own trace.
Its perturbation and an *input slot* (zeros shaped like its input) then
enter as variables of the module (linen: extra entries of its `"params"`;
nnx: extra `Param`s, see `nnx_capture.py`), so the transformation slices
them per layer (a scan's or a vmap's stacked parameters) or passes them
through (remat) as it does the module's own parameters. `_tap`
(`interceptor.py`) adds the perturbation to the output and hands the layer
input back as the slot's cotangent: the one backward pass returns, stacked
over the layers, both the output gradients and the inputs.
"""

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, Literal, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.core import tracers

from optax_ekfac._src import compat, kinds, validation
from optax_ekfac._src.blocks import Layers
from optax_ekfac._src.interceptor import (
    Call,
    Entries,
    Interceptor,
    layers_from_calls,
    per_call,
    with_entries,
    with_stacks,
)
from optax_ekfac._src.loss_model import LossModel
from optax_ekfac._src.losses import marked_predictions, recorded_weights, sampling
from optax_ekfac._src.options import DEFAULTS
from optax_ekfac._src.sharding import example_shards, leading_examples, sharding_of
from optax_ekfac._src.statistics import LayerStats, Statistics

FisherType = Literal["auto", "empirical", "mc"]
FISHER_TYPES = get_args(FisherType)

# The default bound on the loss terms the curvature comes from: at least this
# many, at least the widest Kronecker factor's dimension, and the terms of at
# least this many examples (`curvature_terms`).
MIN_CURVATURE_TERMS = 256
MIN_CURVATURE_EXAMPLES = 32


class Curvature:
    """Loss, gradients and per-layer statistics in one forward/backward pass.

    Args:
        loss_fn: `loss_fn(params, *batch)` returning unreduced losses of shape
            `[N]` (or `[B, T]`, ...: every entry is one loss term), e.g. from
            `optax_ekfac.softmax_cross_entropy` (with `weights=mask`, the
            loss is `Σ w l / Σ w` over `Σ w` terms). It must apply a `flax.linen`
            model with `params` as its `"params"` collection. Layers under
            `nn.remat`, `nn.scan` or `nn.vmap` (parameters on axis 0) and
            `jax.checkpoint` are captured; a scanned module is one block per
            layer, stacked (`Block.stack`).
        has_aux: `loss_fn` returns `(losses, aux)`; `aux` is passed through.
        fisher_type: which Fisher the statistics estimate. `"auto"` (the
            default): `"mc"` where `loss_fn` computes its losses with this
            library's helpers (`softmax_cross_entropy`, `squared_error`,
            `sigmoid_binary_cross_entropy`, or any loss wrapped with
            `per_example_loss`), else `"empirical"` with a warning that
            names the remedy. `"empirical"`: the output gradients of the
            data's labels. `"mc"`: the true Fisher (the Gauss-Newton matrix
            for a `per_example_loss`), from output gradients sampled from
            the model's predictive distribution, which the helpers know,
            with a `key` passed to `value_grad_and_stats` (or one derived
            from the batch); it needs the helpers. The sampled Fisher is
            the one for the adaptive `ekfac`: with the empirical one it needs
            many times more steps (for a squared error the empirical Fisher
            shrinks with the residuals, and the sampled one does not). Every
            helper call inside `loss_fn` is a term of the sampled loss (a
            mask or weights reach it through the helpers' `weights`, not
            when applied to the returned losses). The loss and gradients
            returned are the data's in every case.
        num_samples: `S`, label samples per loss term for the sampled
            Fisher; the statistics hold them as `S * N` examples.
        max_curvature_terms: at most this many loss terms of each batch (a
            `[B, T]` token loss has `B * T`; times `S` label samples) give
            the curvature: the statistics (factors, scalings, the sampled
            labels' backward pass) and the adaptive `ekfac`'s curvature
            products and reduction ratio. The loss and gradients always come
            from the whole batch. None (the default) takes
            `curvature_terms(layers, terms_per_example)`: the widest Kronecker
            factor's dimension, at least 256 terms and at least the terms of
            32 examples; `"all"` uses the whole batch. The
            sample is the first examples of the batch (with the example axis
            sharded over `D` devices, the first `b / D` of each device's
            shard, `b` a multiple of `D`), as many as fit the bound and at
            least one per shard; its statistics are those of the sample's
            mean loss (`num_terms` its terms). Image positions that share
            one loss term (a classifier's convolutions) count once: they
            are not independent rows of the curvature.

    Example:
        >>> def loss_fn(params, x, y):
        ...     logits = model.apply({"params": params}, x)
        ...     return optax_ekfac.softmax_cross_entropy(logits, y)
        >>> curvature = optax_ekfac.Curvature(loss_fn)  # the sampled Fisher
        >>> layers = curvature.layers(params, x, y)
        >>> loss, grads, stats = curvature.value_grad_and_stats(
        ...     params, x, y, key=jax.random.key(0))
        >>> empirical = optax_ekfac.Curvature(loss_fn, fisher_type="empirical")
        >>> loss, grads, stats = empirical.value_grad_and_stats(params, x, y)
    """

    loss_fn: Callable[..., Any]
    has_aux: bool
    fisher_type: FisherType
    num_samples: int
    max_curvature_terms: int | Literal["all"] | None

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        *,
        has_aux: bool = False,
        fisher_type: FisherType = "auto",
        num_samples: int = 1,
        max_curvature_terms: int | Literal["all"] | None = None,
    ):
        if fisher_type not in FISHER_TYPES:
            raise ValueError(
                f"Curvature: fisher_type must be one of {FISHER_TYPES}, got "
                f"{fisher_type!r}."
            )
        if not (isinstance(num_samples, numbers.Integral) and num_samples >= 1):
            raise ValueError(
                f"Curvature: num_samples must be an integer >= 1, got {num_samples}."
            )
        if fisher_type == "empirical" and num_samples != 1:
            raise ValueError(
                "Curvature: num_samples applies to fisher_type='mc' only; the "
                "empirical Fisher uses the data's labels once."
            )
        if not (
            max_curvature_terms is None
            or max_curvature_terms == "all"
            or (
                isinstance(max_curvature_terms, numbers.Integral)
                and not isinstance(max_curvature_terms, bool)
                and max_curvature_terms >= 1
            )
        ):
            raise ValueError(
                "Curvature: max_curvature_terms must be an integer >= 1, 'all' "
                f"or None, got {max_curvature_terms!r}."
            )
        self.loss_fn = loss_fn
        self.has_aux = has_aux
        self.fisher_type = fisher_type
        self.num_samples = int(num_samples)
        self.max_curvature_terms = (
            max_curvature_terms
            if max_curvature_terms is None or max_curvature_terms == "all"
            else int(max_curvature_terms)
        )

    def _call_loss_fn(self, params, batch, interceptor: Interceptor) -> Any:
        """`loss_fn(params, *batch)` with its layer calls going through
        `interceptor`: a linen method interceptor here; `nnx.Curvature`
        routes flax.nnx layer calls instead."""
        params = with_entries(params, interceptor.entries)
        with nn.intercept_methods(interceptor):
            return self.loss_fn(params, *batch)

    def _losses(self, params, batch, interceptor):
        """The losses, scaled so that their mean is the loss (`Σ w l / Σ w`
        when the helpers got weights), and `aux`; sets the interceptor's
        `weights_sum`."""
        interceptor.loss_trace = tracers.current_trace()
        interceptor.loss_trace_object = compat.current_trace()
        with recorded_weights() as weights:
            result = self._call_loss_fn(params, batch, interceptor)
        losses, aux = validation.split_aux(result, self.has_aux)
        losses = jnp.asarray(losses)
        if losses.ndim == 0:
            raise ValueError(
                "loss_fn returned a scalar; it must return unreduced per-example "
                "losses (shape [N], or [B, T] for token losses) so that the "
                "capture knows N and can scale output gradients by it. Return "
                "e.g. optax_ekfac.softmax_cross_entropy(logits, labels) without "
                ".mean()."
            )
        if not jnp.issubdtype(losses.dtype, jnp.floating):
            raise ValueError(f"loss_fn returned losses of dtype {losses.dtype}.")
        losses, interceptor.weights_sum = _weighted_mean_terms(losses, weights)
        return losses, aux

    def _uncaptured_losses(self, params, batch) -> jax.Array:
        """The losses alone, nothing recorded (the `LossModel`'s function)."""
        return self._losses(params, batch, Interceptor())[0]

    def _resolved_fisher_type(self, params, batch) -> Literal["empirical", "mc"]:
        """`fisher_type`, `"auto"` resolved from what `loss_fn` calls (traced
        for shapes only)."""
        if self.fisher_type != "auto":
            return self.fisher_type
        with marked_predictions() as marked:
            jax.eval_shape(self._uncaptured_losses, params, batch)
        if marked.predictions:
            return "mc"
        if self.num_samples != 1:
            raise ValueError(
                f"Curvature: num_samples={self.num_samples} needs the sampled "
                "Fisher, and loss_fn computes its losses without optax_ekfac's "
                "loss helpers, which say what to sample: wrap the loss with "
                "optax_ekfac.per_example_loss (e.g. per_example_loss("
                "optax.huber_loss)), or use fisher_type='empirical' without "
                "num_samples."
            )
        warnings.warn(
            "Curvature: loss_fn computes its losses without optax_ekfac's loss "
            "helpers (softmax_cross_entropy, squared_error, "
            "sigmoid_binary_cross_entropy) or per_example_loss, so the "
            "curvature falls back to the empirical Fisher, with which the "
            "adaptive ekfac needs many times more steps. Wrap the loss with "
            "optax_ekfac.per_example_loss (e.g. per_example_loss("
            "optax.huber_loss)) for the sampled Fisher, or pass "
            "fisher_type='empirical' to choose the empirical one.",
            stacklevel=3,
        )
        return "empirical"

    def _trace_calls(self, params, batch) -> tuple[list[Call], jax.ShapeDtypeStruct]:
        """The block calls and the losses' shape, from shapes alone."""
        interceptor = Interceptor()
        losses = jax.eval_shape(
            lambda p, b: self._losses(p, b, interceptor)[0], params, batch
        )
        if not interceptor.calls:
            raise ValueError(
                "loss_fn called no layer that EKFAC can precondition (supported: "
                f"{kinds.supported()}). Does loss_fn apply the model it is given?"
            )
        validation.check_loss_terms(losses.shape, batch)
        return with_stacks(interceptor.calls, params), losses

    def layers(self, params: optax.Params, *batch: Any) -> Layers:
        """Describes the blocks of the model, tracing `loss_fn` (no FLOPs).

        `loss_fn` is traced twice, for shapes only: the second time on a batch
        twice as large, to refuse layers whose input has no example axis.

        Args:
            params: the model's `"params"` collection.
            *batch: the arguments `loss_fn` takes after `params`.

        Returns:
            A printable `Layers` table to pass to `scale_by_ekfac`.
        """
        calls, losses = self._trace_calls(params, batch)
        self._check_example_axes(params, batch, calls, losses)
        return layers_from_calls(calls, params)

    def _check_example_axes(self, params, batch, calls, losses) -> None:
        """Raises for a captured call whose leading axis is not the examples'.

        The capture takes the leading axis of every layer input as the
        example axis. Learned positions written `nn.Embed(T, F)(jnp.arange(T))`
        (or `jnp.arange(T)[None]`), a time-major `[T, B, F]` input or a shared
        query token have none: their output gradients are sums over the batch,
        and the per-example statistics would be silently wrong. Tracing
        `loss_fn` again (shapes only) on a batch twice as large tells them
        apart: an example axis, `[B]` or `[B * T]` rows, grows with the batch.
        """
        batch_size = validation.batch_size(batch, losses.shape)
        if batch_size is None:
            return

        def doubled(leaf):
            if jnp.ndim(leaf) and jnp.shape(leaf)[0] == batch_size:
                shape = (2 * batch_size,) + tuple(jnp.shape(leaf)[1:])
                return jax.ShapeDtypeStruct(shape, jnp.result_type(leaf))
            return leaf

        try:
            doubled_calls, _ = self._trace_calls(params, jax.tree.map(doubled, batch))
        except Exception:  # loss_fn fixes the batch size somewhere: can't tell
            return

        def rows(call):
            return call.inputs.shape[0] if call.inputs.ndim else 1

        for call, doubled_call in zip(calls, doubled_calls):
            if rows(doubled_call) != 2 * rows(call) or rows(call) % batch_size:
                raise ValueError(
                    f"{call.name}: this {call.kind} layer's input has shape "
                    f"{call.inputs.shape} for a batch of {batch_size} examples; its "
                    "leading axis does not follow the batch (a batch of "
                    f"{2 * batch_size} gives {doubled_call.inputs.shape}). The "
                    "capture takes a layer input's leading axis as the example "
                    "axis, so this layer's per-example output gradients would "
                    "mix the examples (sums over the batch). Keep the batch "
                    "axis first in every captured layer's input (no time-major "
                    "inputs); for learned positions write nn.Embed(T, F)("
                    "jnp.broadcast_to(jnp.arange(T), (B, T))) instead of "
                    "nn.Embed(T, F)(jnp.arange(T)) or jnp.arange(T)[None], or "
                    "make them a plain self.param (diagonal fallback)."
                )

    def value_grad_and_stats(
        self, params: optax.Params, *batch: Any, key: jax.Array | None = None
    ) -> tuple[Any, optax.Updates, Statistics]:
        """The mean loss, its gradient and the batch statistics.

        Args:
            params: the model's `"params"` collection.
            *batch: the arguments `loss_fn` takes after `params`.
            key: a `jax.random` key for the sampled Fisher, a fresh one every
                step; None derives one from the batch's contents (a hash of
                its bits), so that a loop without keys samples new labels for
                every new batch (the same batch seen again gets the same
                label noise). Unused by the empirical Fisher.

        Returns:
            `(loss, grads, stats)`: `loss = mean(l)` (`(loss, aux)` with
            `has_aux`), `grads` its gradient with respect to `params`, and
            the `Statistics` that `scale_by_ekfac` takes as `stats=`. With
            the sampled Fisher and `S = num_samples`, every call's `inputs`
            are tiled `S` times along axis 0 and its `output_grads` are those
            of the sampled labels, `[S * N, ...]` (sample-major); `num_terms` stays `N`.
            Where the batch has more loss terms than `max_curvature_terms`, the
            statistics are those of the sample (`num_terms` its terms,
            `num_batch_terms` the batch's) and `loss` and `grads` the whole
            batch's.
        """
        fisher_type = self._resolved_fisher_type(params, batch)
        if fisher_type == "mc" and key is None:
            key = _key_of_batch(batch)
        calls, losses = self._trace_calls(params, batch)
        sample = self._curvature_sample(params, batch, calls, losses.shape)
        if sample is None:
            loss, aux, grads, stats = self._captured(
                params, batch, calls, losses, key, fisher_type
            )
        else:
            # The loss and gradients of the whole batch, nothing captured; the
            # curvature of the sample (its gradients are unused: jit drops them).
            (loss, (aux, weights_sum)), grads = jax.value_and_grad(
                self._mean_loss, has_aux=True
            )(params, batch)
            sample_calls, sample_losses = self._trace_calls(params, sample)
            *_, stats = self._captured(
                params, sample, sample_calls, sample_losses, key, fisher_type
            )
            stats = stats._replace(
                num_batch_terms=losses.size if weights_sum is None else weights_sum
            )
        return ((loss, aux) if self.has_aux else loss), grads, stats

    def _mean_loss(self, params, batch):
        """The mean loss, and `(aux, the sum of the terms' weights or None)`."""
        interceptor = Interceptor()
        losses, aux = self._losses(params, batch, interceptor)
        return jnp.mean(losses), (aux, interceptor.weights_sum)

    def _curvature_sample(self, params, batch, calls, loss_shape) -> tuple | None:
        """The examples the curvature comes from (see `max_curvature_terms`),
        or None for the whole batch."""
        batch_size = validation.batch_size(batch, loss_shape)
        if self.max_curvature_terms == "all" or batch_size is None:
            return None
        terms_per_example = self.num_samples * (math.prod(loss_shape) // batch_size)
        max_terms = self.max_curvature_terms or curvature_terms(
            layers_from_calls(calls, params), terms_per_example
        )
        leading = [
            leaf
            for leaf in jax.tree.leaves(batch)
            if jnp.ndim(leaf) and jnp.shape(leaf)[0] == batch_size
        ]
        num_shards = example_shards(leading[0], DEFAULTS.axis_name)
        num_examples = max(
            num_shards, max_terms // terms_per_example // num_shards * num_shards
        )
        if num_examples >= batch_size:
            return None

        def sampled(leaf):
            if jnp.ndim(leaf) and jnp.shape(leaf)[0] == batch_size:
                return leading_examples(leaf, num_examples, num_shards)
            return leaf

        return jax.tree.map(sampled, batch)

    def _captured(self, params, batch, calls, losses, key, fisher_type):
        """`(loss, aux, grads, stats)` of `batch`, the statistics of every row
        (`fisher_type` resolved: `"empirical"` or `"mc"`)."""
        direct = tuple(
            # In the output's sharding: under an explicit mesh the cotangent
            # takes the perturbation's type, and a replicated one would gather
            # every example's output gradients onto every device.
            jnp.zeros(
                call.outputs.shape,
                call.outputs.dtype,
                out_sharding=call.outputs.sharding,
            )
            for call in calls
            if not call.transformed
        )
        entries: Entries = {}
        for call in calls:
            if call.transformed:
                entries.setdefault(call.module_path, {}).update(
                    zip(call.entry_names, call.entries())
                )
        perturbations = (direct, entries)
        if fisher_type == "mc":
            loss, aux, grads, inputs, all_output_grads, weights_sum = (
                self._sampled_pass(params, batch, perturbations, key, calls)
            )
        else:

            def mean_loss(params, perturbations):
                interceptor = Interceptor(perturbations[0])
                interceptor.entries = perturbations[1]
                losses, aux = self._losses(params, batch, interceptor)
                recorded = (tuple(interceptor.inputs), aux, interceptor.weights_sum)
                return jnp.mean(losses), recorded

            (loss, (direct_inputs, aux, weights_sum)), (grads, cotangents) = (
                jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
                    params, perturbations
                )
            )
            inputs, output_cotangents = per_call(calls, direct_inputs, cotangents)
        num_terms = losses.size if weights_sum is None else weights_sum
        if fisher_type != "mc":
            # d(mean l)/dy_n is (1/N) dl_n/dy_n (weighted: (w_n/N) dl_n/dy_n).
            all_output_grads = tuple(
                cotangent * jnp.asarray(num_terms, cotangent.dtype)
                for cotangent in output_cotangents
            )

        per_block: dict[str, list[LayerStats]] = {}
        for call, call_inputs, output_grads in zip(calls, inputs, all_output_grads):
            per_block.setdefault(call.name, []).append(
                LayerStats(call_inputs, output_grads)
            )
        stats = Statistics(
            layers={name: tuple(calls) for name, calls in per_block.items()},
            num_terms=num_terms,
            num_samples=self.num_samples,
            loss_model=LossModel(params, batch, loss, self._uncaptured_losses),
        )
        return loss, aux, grads, stats

    def _sampled_pass(self, params, batch, perturbations, key, calls):
        """One forward, two backward passes: the data's gradient, and the
        per-example output gradients of `S` sampled labels.

        Returns:
            `(loss, aux, grads, inputs, output_grads, weights_sum)`, `inputs`
            tiled and `output_grads` stacked to `S * N` examples per call
            (after a stacked call's leading stack axes); `weights_sum` the sum
            of the loss terms' weights, or None.
        """
        num_samples = self.num_samples

        def run(params, perturbations, loss_perturbations):
            interceptor = Interceptor(perturbations[0])
            interceptor.entries = perturbations[1]
            with sampling(key, num_samples, loss_perturbations) as sampled:
                losses, aux = self._losses(params, batch, interceptor)
            if not sampled.losses:
                raise ValueError(
                    "Curvature(fisher_type='mc'): loss_fn called none of the "
                    "loss helpers that say which distribution to sample labels "
                    "from (optax_ekfac.softmax_cross_entropy, squared_error, "
                    "sigmoid_binary_cross_entropy, or a loss wrapped with "
                    "optax_ekfac.per_example_loss). Compute the losses with "
                    "them, or use fisher_type='empirical'."
                )
            recorded = (tuple(interceptor.inputs), aux, interceptor.weights_sum)
            return (losses, tuple(sampled.losses)), recorded

        # The helpers' sampled losses are [S, *their losses' shape]: shapes of
        # the zeros added to the losses they return.
        sampled_shapes = jax.eval_shape(
            lambda params: run(params, perturbations, None)[0][1], params
        )
        loss_perturbations = tuple(
            jnp.zeros(shape.shape[1:], shape.dtype) for shape in sampled_shapes
        )
        (losses, sampled_losses), backward, (direct_inputs, aux, weights_sum) = jax.vjp(
            run, params, perturbations, loss_perturbations, has_aux=True
        )
        # full_like: a cotangent has the losses' type, sharding included.
        mean_cotangent = jnp.full_like(losses, 1 / losses.size)
        no_samples = tuple(jnp.zeros_like(sampled) for sampled in sampled_losses)
        grads, cotangents, slopes = backward((mean_cotangent, no_samples))
        inputs, _ = per_call(calls, direct_inputs, cotangents)
        # A term's sampled gradient weighs √(N dL/dl): the Fisher of `c l` is
        # `c` times that of `l` (`√w` for weights). A negative slope (a loss_fn
        # that subtracts a helper's losses) has no Fisher: those terms are
        # left out.
        num_terms = losses.size if weights_sum is None else weights_sum
        sampled_scales = tuple(
            jnp.sqrt(jnp.maximum(num_terms * slope, 0)) for slope in slopes
        )

        def sampled_output_grads(sample_indicator):
            # In the sampled losses' type: under an explicit mesh a cotangent
            # must carry its output's sharding, and its dtype is theirs even
            # where loss_fn's losses have another (a float64 loss of float32
            # outputs).
            sample_cotangents = tuple(
                jnp.broadcast_to(
                    sample_indicator.reshape((-1,) + (1,) * scale.ndim) * scale,
                    sampled.shape,
                    out_sharding=sharding_of(sampled),
                ).astype(sampled.dtype)
                for scale, sampled in zip(sampled_scales, sampled_losses)
            )
            cotangents = backward((jnp.zeros_like(losses), sample_cotangents))[1]
            return per_call(calls, direct_inputs, cotangents)[1]

        # Their parameter cotangents are unused: jit removes them. A loop, not
        # vmap: JAX cannot batch the transposed convolutions of a sharded batch.
        # One sample needs no loop: its backward pass is then traced and
        # compiled once, not also as a loop body.
        if num_samples == 1:
            stacked = tuple(
                grads[None]
                for grads in sampled_output_grads(jnp.ones([1], losses.dtype))
            )
        else:
            stacked = jax.lax.map(
                sampled_output_grads, jnp.eye(num_samples, dtype=losses.dtype)
            )
        output_grads = tuple(
            _samples_as_examples(g, len(call.stack)) for g, call in zip(stacked, calls)
        )
        inputs = tuple(
            _samples_as_examples(
                jnp.broadcast_to(x, (num_samples,) + x.shape), len(call.stack)
            )
            for x, call in zip(inputs, calls)
        )
        return jnp.mean(losses), aux, grads, inputs, output_grads, weights_sum


def curvature_terms(layers: Layers, terms_per_example: int = 1) -> int:
    """The default bound on the loss terms each batch's curvature comes from.

    The largest of: the widest Kronecker factor's dimension (an embedding's
    diagonal vocabulary side excluded), so that one batch's factors can be of
    full rank; `MIN_CURVATURE_TERMS` (256); and the terms of
    `MIN_CURVATURE_EXAMPLES` (32) examples, since the terms of one example (a
    sequence's tokens) are not independent. The running averages over the
    batches do the rest.

    Args:
        layers: the blocks, from `Curvature.layers`.
        terms_per_example: loss terms per example (`T` for `[B, T]` token
            losses), times the label samples of a Monte-Carlo Fisher.

    Returns:
        The number of loss terms.

    Example:
        >>> optax_ekfac.curvature_terms(layers)
        256
        >>> optax_ekfac.curvature_terms(layers, terms_per_example=64)
        2048
    """
    widths = [
        width
        for block in layers.blocks
        for width in (
            (block.output_dim,)
            if block.diagonal_input
            else (block.input_dim, block.output_dim)
        )
    ]
    return max(
        [MIN_CURVATURE_TERMS, MIN_CURVATURE_EXAMPLES * terms_per_example, *widths]
    )


def _weighted_mean_terms(
    losses: jax.Array, weights: list[jax.Array]
) -> tuple[jax.Array, jax.Array | None]:
    """The losses scaled so that their mean is the loss, and the sum of the
    loss terms' weights.

    Unweighted: the losses and None. When the loss helpers got
    `weights` (the first helper's count), the returned losses are `w l`: the
    loss is `Σ w l / Σ w` and the terms number `Σ w` (a mask's real terms).
    """
    if not weights:
        return losses, None
    term_weights = weights[0]
    if term_weights.shape != losses.shape:
        raise ValueError(
            f"loss_fn returned losses of shape {losses.shape}, and a loss helper "
            f"got weights of shape {term_weights.shape}: with weights, return "
            "the helper's weighted losses in their shape (one entry per loss "
            "term), not reduced or reshaped, so that the capture knows the "
            "weight of each term."
        )
    total = term_weights.sum()
    return losses * (losses.size / total), total


def _key_of_batch(batch: tuple) -> jax.Array:
    """A PRNG key that follows the batch's contents: a hash of its bits.

    Every element's bits are weighted by a multiplicative hash of its position
    (so that reordered examples change the key) and summed in wrapping
    `uint32`; leaves without a number dtype (PRNG keys) are left out.
    """
    seed = jnp.zeros([], jnp.uint32)
    for leaf in jax.tree.leaves(batch):
        leaf = jnp.asarray(leaf)
        if jnp.issubdtype(leaf.dtype, jnp.inexact):
            leaf = leaf.astype(jnp.float32)
        elif jnp.issubdtype(leaf.dtype, jnp.integer) or leaf.dtype == bool:
            leaf = leaf.astype(jnp.int32)
        else:
            continue
        bits = jax.lax.bitcast_convert_type(leaf, jnp.uint32).reshape(-1)
        positions = jnp.arange(bits.size, dtype=jnp.uint32)
        weights = positions * jnp.uint32(2654435761) + jnp.uint32(1)
        seed = seed * jnp.uint32(31) + jnp.sum(bits * weights, dtype=jnp.uint32)
    return jax.random.key(seed)


def _samples_as_examples(stacked: jax.Array, stack_ndim: int = 0) -> jax.Array:
    """`[S, *stack, N, ...]` -> `[*stack, S * N, ...]` (sample-major), sharded
    like the examples.

    Under an explicit mesh the merged axis takes the example axis' sharding:
    with one sample a free reshape; with more, JAX moves rows between devices.
    """
    stacked = jnp.moveaxis(stacked, 0, stack_ndim)
    sharding = jax.typeof(stacked).sharding
    spec = (tuple(sharding.spec) + (None,) * stacked.ndim)[: stacked.ndim]
    merged = jax.sharding.NamedSharding(
        sharding.mesh,
        jax.sharding.PartitionSpec(*spec[:stack_ndim], *spec[stack_ndim + 1 :]),
    )
    shape = stacked.shape[:stack_ndim] + (-1,) + stacked.shape[stack_ndim + 2 :]
    return jnp.reshape(stacked, shape, out_sharding=merged)
