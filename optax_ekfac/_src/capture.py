"""Capture: every block's inputs and output gradients in the loss's own pass.

`Curvature(loss_fn)` runs the user's `loss_fn` under a `flax.linen` method
interceptor. For every call of a supported layer the interceptor records the
layer input and adds a zero *perturbation* to the layer output. One
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
through (remat) as it does the module's own parameters. `_tap` adds the
perturbation to the output and hands the layer input back as the slot's
cotangent: the one backward pass returns, stacked over the layers, both the
output gradients and the inputs.
"""

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, get_args

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.core import tracers

from optax_ekfac._src import compat, kinds
from optax_ekfac._src.blocks import (
    Block,
    Layers,
    LayerStats,
    block_name,
    leaves_by_path,
)
from optax_ekfac._src.kinds import SUPPORTED
from optax_ekfac._src.loss_model import LossModel
from optax_ekfac._src.losses import recorded_weights, sampling
from optax_ekfac._src.options import DEFAULTS
from optax_ekfac._src.sharding import example_shards, leading_examples, sharding_of

FisherType = Literal["empirical", "mc"]
FISHER_TYPES = get_args(FisherType)

# The default bound on the loss terms the curvature comes from: at least this
# many, at least the widest Kronecker factor's dimension, and the terms of at
# least this many examples (`curvature_terms`).
MIN_CURVATURE_TERMS = 256
MIN_CURVATURE_EXAMPLES = 32


class Statistics(NamedTuple):
    """The statistics of one batch, as `scale_by_ekfac` takes them.

    The curvature is that of the loss `loss_fn` defines, the mean over its
    `N` loss terms: the output-gradient factors and the scalings sum over the
    rows and divide by `N` (times `S` label samples for the Monte-Carlo
    Fisher), not by the number of examples. A `[B, T]` token loss and the
    same model written on `[B * T]` rows get the same factors.

    Attributes:
        layers: block name -> one `LayerStats` per call of that block, in call
            order (a module called twice has two entries).
        num_terms: `N`, the number of loss terms the batch loss averages;
            with weighted losses (the helpers' `weights`), their sum (a
            mask's real terms), an array.
        num_samples: `S`, the label samples per loss term whose output
            gradients the rows hold (`fisher_type="mc"`); 1 for the empirical
            Fisher.
        loss_model: the batch's loss as a function of the parameters, for the
            adaptive `ekfac`'s step control (exact curvature products and the
            loss at other parameters); None where the statistics were made
            by hand. With the curvature from a sample of the batch, the
            sample's loss.
        num_batch_terms: the loss terms of the whole batch, which the
            gradient averages, where the statistics come from a sample of the
            batch (`Curvature`'s `max_curvature_terms`); None where they cover
            the whole batch (`num_terms`).
    """

    layers: dict[str, tuple[LayerStats, ...]]
    num_terms: int | jax.Array
    num_samples: int = 1
    loss_model: LossModel | None = None
    num_batch_terms: int | jax.Array | None = None

    @property
    def num_sampled_terms(self) -> int | jax.Array:
        """`S * N`: what the sums over the rows' output gradients divide by."""
        return self.num_terms * self.num_samples

    @property
    def gradient_terms(self) -> int | jax.Array:
        """The loss terms the gradient averages: the whole batch's."""
        return self.num_terms if self.num_batch_terms is None else self.num_batch_terms


@dataclasses.dataclass(frozen=True)
class _Call:
    """One call of a block seen while tracing `loss_fn`.

    `transformed`: made under a JAX transformation inside `loss_fn`, its
    perturbation and input slot come in as the module's variables, the
    `index`-th of its module; `stack`: the leading axes its module's
    parameters have beyond what the call sees (`(L,)` under `nn.scan`),
    filled in from the params once the trace is done. `inputs` and
    `outputs` are what one element of the stack sees.
    """

    name: str
    module_path: tuple[str, ...]
    kind: str
    method: str
    shape: kinds.CallShape
    inputs: jax.ShapeDtypeStruct
    outputs: jax.ShapeDtypeStruct
    transformed: bool = False
    index: int = 0
    stack: tuple[int, ...] = ()

    @property
    def entry_names(self) -> tuple[str, str]:
        """The module variables of a transformed call: perturbation, slot."""
        return (
            f"{ENTRY_PREFIX}output_{self.index}",
            f"{ENTRY_PREFIX}input_{self.index}",
        )

    def entries(self) -> tuple[jax.Array, jax.Array]:
        """Zero perturbation and input slot, stacked: `stack + shape`.

        The slot is floating point (token ids come back as floats, exact up
        to 2**24). Both are sharded as the layer's output and input are
        (the example axis, under an explicit mesh): a cotangent takes its
        primal's type.
        """
        outputs, inputs = self.outputs, self.inputs
        slot_dtype = (
            inputs.dtype
            if jnp.issubdtype(inputs.dtype, jnp.floating)
            else jnp.promote_types(outputs.dtype, jnp.float32)
        )

        def zeros(like, dtype):
            sharding = like.sharding
            spec = (tuple(sharding.spec) + (None,) * like.ndim)[: like.ndim]
            stacked = jax.sharding.NamedSharding(
                sharding.mesh,
                jax.sharding.PartitionSpec(*(None,) * len(self.stack), *spec),
            )
            return jnp.zeros(self.stack + like.shape, dtype, out_sharding=stacked)

        return zeros(outputs, outputs.dtype), zeros(inputs, slot_dtype)


# Module path -> variable name -> a transformed call's perturbation or slot.
Entries = dict[tuple[str, ...], dict[str, jax.Array]]

# Names of the module variables that carry a transformed call's perturbation
# and input slot; no layer has parameters of these names.
ENTRY_PREFIX = "optax_ekfac_"


@jax.custom_vjp
def _tap(outputs, perturbation, inputs, input_slot):
    """`outputs + perturbation`; the backward pass gives the perturbation the
    output cotangent and the input slot the layer input itself."""
    del inputs, input_slot
    return outputs + perturbation


def _tap_forward(outputs, perturbation, inputs, input_slot):
    return _tap(outputs, perturbation, inputs, input_slot), (inputs, input_slot)


def _tap_backward(residuals, cotangent):
    inputs, input_slot = residuals
    # The input's own gradient flows through the layer; the tap adds none.
    # The slot's "cotangent" is the input: not linear in `cotangent`, but the
    # capture reads it once, from the backward pass of the loss.
    return cotangent, cotangent, None, inputs.astype(input_slot.dtype)


_tap.defvjp(_tap_forward, _tap_backward)


def _in_discarded_trace(loss_trace: Any) -> bool:
    """Whether this runs within `nn.scan`'s extra trace of its body (a partial
    evaluation that checks the broadcast variables, whose jaxpr is dropped)
    inside `loss_fn`: calls there are not calls of the model."""
    return compat.in_partial_eval_since(loss_trace)


class _Interceptor:
    """Records block calls; adds perturbations to their outputs.

    With `perturbations=None` it only describes the calls (the shape pass).
    Otherwise the i-th call in `loss_fn`'s own trace gets `perturbations[i]`
    and records its input; a call under a transformation inside `loss_fn`
    reads its perturbation and input slot from its module's variables
    (`_Call.entry_names`) and goes through `_tap`.

    It is a `flax.linen` method interceptor; the flax.nnx capture (`nnx.py`)
    calls it the same way, with a context that also carries `module_path`
    (nnx modules do not know their path), `parameters` and `entry`.
    """

    def __init__(self, perturbations: tuple[jax.Array, ...] | None = None):
        self.perturbations = perturbations
        self.calls: list[_Call] = []
        self.inputs: list[jax.Array] = []
        # The JAX trace loss_fn runs in; calls under another one are
        # `transformed`.
        self.loss_trace = None
        # The same trace as an object, where the search for a partial
        # evaluation inside loss_fn stops (`_in_discarded_trace`).
        self.loss_trace_object = None
        # The sum of the loss terms' weights, None for unweighted losses.
        self.weights_sum: jax.Array | None = None
        # Transformed calls' perturbations and input slots, by module path
        # and variable name (`_Call.entries`), for the capture to hand to the
        # modules; empty in the shape pass.
        self.entries: Entries = {}
        self._num_direct = 0
        self._num_transformed: dict[tuple[str, ...], int] = {}

    def __call__(self, next_fun, args, kwargs, context):
        kind = kinds.kind_of(context.module, context.method_name)
        if kind is None or _in_discarded_trace(self.loss_trace_object):
            return next_fun(*args, **kwargs)
        module_path = _module_path(context)
        name = block_name(module_path)
        transformed = tracers.current_trace() != self.loss_trace
        if transformed:
            _check_sliced(name, kind.name, context)
        inputs = args[0] if args else next(iter(kwargs.values()))
        outputs = next_fun(*args, **kwargs)
        shape = jax.ShapeDtypeStruct
        call = _Call(
            name=name,
            module_path=module_path,
            kind=kind.name,
            method=context.method_name,
            shape=kind.describe(
                kinds.CallSite(
                    name,
                    kinds.LinenNames(context.module),
                    shape(inputs.shape, inputs.dtype),
                    shape(outputs.shape, outputs.dtype),
                )
            ),
            inputs=shape(
                inputs.shape, inputs.dtype, sharding=jax.typeof(inputs).sharding
            ),
            outputs=shape(
                outputs.shape, outputs.dtype, sharding=jax.typeof(outputs).sharding
            ),
            transformed=transformed,
            index=self._num_transformed.get(module_path, 0) if transformed else 0,
        )
        if transformed:
            self._num_transformed[module_path] = call.index + 1
        else:
            self._num_direct += 1
        if self.perturbations is not None:
            if transformed:
                outputs = self._tapped(call, context, outputs, inputs)
            else:
                outputs = outputs + self._perturbation(call)
        self.calls.append(call)
        if not transformed:
            self.inputs.append(inputs)
        return outputs

    def _perturbation(self, call: _Call) -> jax.Array:
        assert self.perturbations is not None
        index = self._num_direct - 1
        if index >= len(self.perturbations) or (
            call.outputs.shape != self.perturbations[index].shape
        ):
            raise _changed_calls_error(call.name)
        return self.perturbations[index]

    def _tapped(self, call, context, outputs, inputs) -> jax.Array:
        perturbation, input_slot = (
            _read_entry(context, name) for name in call.entry_names
        )
        if perturbation is None or input_slot is None:
            raise ValueError(
                f"{call.name}: this {call.kind} layer runs inside a JAX "
                "transformation within loss_fn, and its module does not hold "
                "the capture's variables: loss_fn must apply the model with "
                "the params it is given, unchanged in structure, as its "
                "'params' collection (model.apply({'params': params}, x))."
            )
        if perturbation.shape != outputs.shape or input_slot.shape != inputs.shape:
            raise _changed_calls_error(call.name)
        return _tap(outputs, perturbation, inputs, input_slot)


def _changed_calls_error(name: str) -> RuntimeError:
    return RuntimeError(
        f"{name}: loss_fn called its layers differently in two traces with the "
        "same inputs; the capture needs a loss_fn whose layer calls depend "
        "only on shapes."
    )


def _read_entry(context, name: str) -> jax.Array | None:
    """A capture variable of the called module, or None if it has none."""
    if hasattr(context, "entry"):  # the nnx capture's context
        return context.entry(name)
    module = context.module
    if not module.has_variable("params", name):
        return None
    return module.get_variable("params", name)


def _check_sliced(name: str, kind: str, context) -> None:
    """Raises unless a transformed call's parameters are its own: arguments of
    the transformation (sliced by a scan or vmap, passed through by remat),
    where its perturbation and input slot will be too."""
    parameters = getattr(context, "parameters", None)
    if parameters is None:
        parameters = context.module.variables.get("params", {})
    leaves = jax.tree.leaves(parameters)
    if all(compat.is_tracer_of_current_trace(leaf) for leaf in leaves):
        return
    raise ValueError(
        f"{name}: this {kind} layer runs inside a JAX transformation within "
        "loss_fn that does not pass it its parameters (nn.scan with "
        "variable_broadcast='params' (weight tying), nn.vmap with "
        "variable_axes={'params': None} (a vmap over the examples), "
        "jax.checkpoint, jax.vmap or an nnx transform over a function that "
        "closes over the parameters or the module), so the capture cannot "
        "tell its calls apart. Supported: nn.remat / nn.checkpoint / "
        "nnx.remat, nn.scan / nn.vmap with variable_axes={'params': 0}, "
        "nnx.scan / nnx.vmap over a module stacked on axis 0, and "
        "jax.checkpoint of a function that takes the params (or the nnx "
        "module) as an argument. Otherwise apply the transformation to "
        "modules without captured layers, or leave it out when training "
        f"with EKFAC ({SUPPORTED})."
    )


def _module_path(context) -> tuple[str, ...]:
    """The called module's path: a linen module knows it; an nnx capture's
    context carries it."""
    path = getattr(context, "module_path", None)
    return tuple(context.module.path if path is None else path)


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
        fisher_type: which Fisher the statistics estimate. `"empirical"`: the
            output gradients of the data's labels. `"mc"`: the true Fisher,
            from labels sampled from the model's predictive distribution; the
            losses must come from this library's helpers
            (`softmax_cross_entropy`, `squared_error`,
            `sigmoid_binary_cross_entropy`), which say what to sample, with
            a `key` passed to `value_grad_and_stats` (or one derived from the
            batch). Recommended with the adaptive `ekfac`: for a squared
            error the empirical Fisher shrinks with the residuals, and the
            sampled one does not. Every helper call inside
            `loss_fn` is a term of the sampled loss (a mask or weights reach
            it through the helpers' `weights`, not when applied to the
            returned losses). The loss and gradients returned are the data's
            in both cases.
        num_samples: `S`, label samples per loss term for `"mc"`; the
            statistics hold them as `S * N` examples.
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
        >>> curvature = optax_ekfac.Curvature(loss_fn)
        >>> layers = curvature.layers(params, x, y)
        >>> loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        >>> sampled = optax_ekfac.Curvature(loss_fn, fisher_type="mc")
        >>> loss, grads, stats = sampled.value_grad_and_stats(
        ...     params, x, y, key=jax.random.key(0))
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
        fisher_type: FisherType = "empirical",
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

    def _call_loss_fn(self, params, batch, interceptor: _Interceptor) -> Any:
        """`loss_fn(params, *batch)` with its layer calls going through
        `interceptor`: a linen method interceptor here; `nnx.Curvature`
        routes flax.nnx layer calls instead."""
        params = _with_entries(params, interceptor.entries)
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
        losses, aux = _split_aux(result, self.has_aux)
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
        return self._losses(params, batch, _Interceptor())[0]

    def _trace_calls(self, params, batch) -> tuple[list[_Call], jax.ShapeDtypeStruct]:
        """The block calls and the losses' shape, from shapes alone."""
        interceptor = _Interceptor()
        losses = jax.eval_shape(
            lambda p, b: self._losses(p, b, interceptor)[0], params, batch
        )
        if not interceptor.calls:
            raise ValueError(
                "loss_fn called no layer that EKFAC can precondition (supported: "
                f"{SUPPORTED}). Does loss_fn apply the model it is given?"
            )
        _check_loss_terms(losses.shape, batch)
        return _with_stacks(interceptor.calls, params), losses

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
        return _layers_from_calls(calls, params)

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
        batch_size = _batch_size(batch, losses.shape)
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
            key: a `jax.random` key for `fisher_type="mc"`, a fresh one every
                step; None derives one from the batch's contents (a hash of
                its bits), so that a loop without keys samples new labels for
                every new batch (the same batch seen again gets the same
                label noise). Unused by the empirical Fisher.

        Returns:
            `(loss, grads, stats)`: `loss = mean(l)` (`(loss, aux)` with
            `has_aux`), `grads` its gradient with respect to `params`, and
            the `Statistics` that `scale_by_ekfac` takes as `stats=`. With
            `"mc"` and `S = num_samples`, every call's `inputs` are tiled `S`
            times along axis 0 and its `output_grads` are those of the sampled
            labels, `[S * N, ...]` (sample-major); `num_terms` stays `N`.
            Where the batch has more loss terms than `max_curvature_terms`, the
            statistics are those of the sample (`num_terms` its terms,
            `num_batch_terms` the batch's) and `loss` and `grads` the whole
            batch's.
        """
        if self.fisher_type == "mc" and key is None:
            key = _key_of_batch(batch)
        calls, losses = self._trace_calls(params, batch)
        sample = self._curvature_sample(params, batch, calls, losses.shape)
        if sample is None:
            loss, aux, grads, stats = self._captured(params, batch, calls, losses, key)
        else:
            # The loss and gradients of the whole batch, nothing captured; the
            # curvature of the sample (its gradients are unused: jit drops them).
            (loss, (aux, weights_sum)), grads = jax.value_and_grad(
                self._mean_loss, has_aux=True
            )(params, batch)
            sample_calls, sample_losses = self._trace_calls(params, sample)
            *_, stats = self._captured(params, sample, sample_calls, sample_losses, key)
            stats = stats._replace(
                num_batch_terms=losses.size if weights_sum is None else weights_sum
            )
        return ((loss, aux) if self.has_aux else loss), grads, stats

    def _mean_loss(self, params, batch):
        """The mean loss, and `(aux, the sum of the terms' weights or None)`."""
        interceptor = _Interceptor()
        losses, aux = self._losses(params, batch, interceptor)
        return jnp.mean(losses), (aux, interceptor.weights_sum)

    def _curvature_sample(self, params, batch, calls, loss_shape) -> tuple | None:
        """The examples the curvature comes from (see `max_curvature_terms`),
        or None for the whole batch."""
        batch_size = _batch_size(batch, loss_shape)
        if self.max_curvature_terms == "all" or batch_size is None:
            return None
        terms_per_example = self.num_samples * (math.prod(loss_shape) // batch_size)
        max_terms = self.max_curvature_terms or curvature_terms(
            _layers_from_calls(calls, params), terms_per_example
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

    def _captured(self, params, batch, calls, losses, key):
        """`(loss, aux, grads, stats)` of `batch`, the statistics of every row."""
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
        if self.fisher_type == "mc":
            loss, aux, grads, inputs, all_output_grads, weights_sum = (
                self._sampled_pass(params, batch, perturbations, key, calls)
            )
        else:

            def mean_loss(params, perturbations):
                interceptor = _Interceptor(perturbations[0])
                interceptor.entries = perturbations[1]
                losses, aux = self._losses(params, batch, interceptor)
                recorded = (tuple(interceptor.inputs), aux, interceptor.weights_sum)
                return jnp.mean(losses), recorded

            (loss, (direct_inputs, aux, weights_sum)), (grads, cotangents) = (
                jax.value_and_grad(mean_loss, argnums=(0, 1), has_aux=True)(
                    params, perturbations
                )
            )
            inputs, output_cotangents = _per_call(calls, direct_inputs, cotangents)
        num_terms = losses.size if weights_sum is None else weights_sum
        if self.fisher_type != "mc":
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
            interceptor = _Interceptor(perturbations[0])
            interceptor.entries = perturbations[1]
            with sampling(key, num_samples, loss_perturbations) as sampled:
                losses, aux = self._losses(params, batch, interceptor)
            if not sampled.losses:
                raise ValueError(
                    "Curvature(fisher_type='mc'): loss_fn called none of the "
                    "loss helpers that say which distribution to sample labels "
                    "from (optax_ekfac.softmax_cross_entropy, squared_error, "
                    "sigmoid_binary_cross_entropy). Compute the losses with "
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
        inputs, _ = _per_call(calls, direct_inputs, cotangents)
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
            # must carry its output's sharding.
            sample_cotangents = tuple(
                jnp.broadcast_to(
                    sample_indicator.reshape((-1,) + (1,) * scale.ndim) * scale,
                    sampled.shape,
                    out_sharding=sharding_of(sampled),
                )
                for scale, sampled in zip(sampled_scales, sampled_losses)
            )
            cotangents = backward((jnp.zeros_like(losses), sample_cotangents))[1]
            return _per_call(calls, direct_inputs, cotangents)[1]

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


def _with_entries(params: Any, entries: Entries) -> Any:
    """`params` with the transformed calls' variables added to their modules'
    dicts (new dicts along the way; `params` itself is not changed)."""
    if not entries:
        return params
    params = dict(params)
    for module_path, variables in entries.items():
        node = params
        for key in module_path:
            node[key] = dict(node.get(key, {}))
            node = node[key]
        node.update(variables)
    return params


def _per_call(
    calls: list[_Call], direct_inputs: tuple, cotangents: tuple
) -> tuple[tuple[jax.Array, ...], tuple[jax.Array, ...]]:
    """Every call's input and output cotangent, in call order, from the
    recorded inputs of direct calls and the cotangents `(direct, entries)`:
    a transformed call's input is its slot's cotangent (`_tap`)."""
    direct_outputs, entry_cotangents = cotangents
    direct_input_iter, direct_output_iter = iter(direct_inputs), iter(direct_outputs)
    inputs, outputs = [], []
    for call in calls:
        if call.transformed:
            variables = entry_cotangents[call.module_path]
            output_name, input_name = call.entry_names
            inputs.append(variables[input_name].astype(call.inputs.dtype))
            outputs.append(variables[output_name])
        else:
            inputs.append(next(direct_input_iter))
            outputs.append(next(direct_output_iter))
    return tuple(inputs), tuple(outputs)


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


def _split_aux(result: Any, has_aux: bool) -> tuple[Any, Any]:
    """`(losses, aux)` from what `loss_fn` returned, or a `has_aux` mistake.

    Caught here, at the first trace: unchecked, a forgotten `has_aux=True`
    reaches `jnp.asarray((losses, aux))`, and a needless one unpacks the
    losses array, with errors that do not name `has_aux`.
    """
    is_pair = isinstance(result, (tuple, list)) and len(result) == 2
    if has_aux and not is_pair:
        if isinstance(result, (tuple, list)):
            returned = f"a {type(result).__name__} of {len(result)} entries"
        elif hasattr(result, "shape"):
            returned = f"an array of shape {tuple(result.shape)}"
        else:
            returned = f"a {type(result).__name__}"
        raise ValueError(
            "Curvature(has_aux=True) needs loss_fn to return (losses, aux), a "
            f"pair; it returned {returned}. Return (losses, aux), or drop "
            "has_aux=True if loss_fn returns the losses alone."
        )
    if not has_aux and isinstance(result, (tuple, list)):
        raise ValueError(
            f"loss_fn returned a {type(result).__name__}; it must return the "
            "per-example losses as one array. If it returns (losses, aux), "
            "pass Curvature(loss_fn, has_aux=True)."
        )
    return tuple(result) if has_aux else (result, None)


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


def _with_stacks(calls: list[_Call], params: optax.Params) -> list[_Call]:
    """The calls, each transformed one with the leading axes its module's
    parameters have beyond the call's (`(L,)` for a scanned layer)."""
    leaves = leaves_by_path(params)
    stacked = []
    for call in calls:
        param_name, shape = call.shape.params[0]
        leaf = leaves.get(call.module_path + (param_name,))
        if call.transformed and leaf is not None:
            held = tuple(leaf.shape)
            num_stacked = len(held) - len(shape)
            if num_stacked > 0 and held[num_stacked:] == tuple(shape):
                call = dataclasses.replace(call, stack=held[:num_stacked])
        stacked.append(call)
    return stacked


def _layers_from_calls(calls: list[_Call], params: optax.Params) -> Layers:
    """Groups calls into blocks and matches them to the params tree."""
    leaves = leaves_by_path(params)
    calls_by_name: dict[str, list[_Call]] = {}
    for call in calls:
        calls_by_name.setdefault(call.name, []).append(call)
    blocks = []
    for name, block_calls in calls_by_name.items():
        first = block_calls[0].shape
        for call in block_calls[1:]:
            if call.shape != first:
                raise ValueError(
                    f"{name}: its calls imply different blocks ({first} and "
                    f"{call.shape}); a module called several times must see "
                    "inputs of the same feature shape."
                )
        stack = block_calls[0].stack
        if any(call.stack != stack for call in block_calls):
            raise ValueError(
                f"{name}: this module is called both inside and outside a "
                "transformation that stacks its parameters; call it one way."
            )
        module_path = block_calls[0].module_path
        param_paths = tuple(module_path + (p,) for p, _ in first.params)
        for path, (_, shape) in zip(param_paths, first.params):
            _check_param(name, path, stack + tuple(shape), leaves)
        blocks.append(
            Block(
                name=name,
                kind=block_calls[0].kind,
                param_paths=param_paths,
                input_dim=first.input_dim,
                output_dim=first.output_dim,
                num_calls=len(block_calls),
                num_groups=first.num_groups,
                config=first.config,
                call_methods=tuple(call.method for call in block_calls),
                stack=stack,
            )
        )
    owned = {path for block in blocks for path in block.param_paths}
    fallback = tuple(path for path in leaves if path not in owned)
    return Layers(blocks=tuple(blocks), fallback=fallback)


def _check_param(name: str, path, shape, leaves) -> None:
    """Raises unless `params` holds the parameter a call needs, as it needs it."""
    if path not in leaves:
        raise ValueError(
            f"{name}: its parameter {'/'.join(path)} is not in params. loss_fn "
            "must apply the model with the params it is given as its 'params' "
            "collection, e.g. model.apply({'params': params}, x)."
        )
    held = leaves[path].shape
    if len(held) > len(shape):
        raise ValueError(
            f"{name}: params hold {'/'.join(path)} of shape {held}, the layer's "
            f"calls need {tuple(shape)}: its parameters are stacked on an axis "
            "other than the first (nn.vmap or nn.scan with variable_axes="
            "{'params': k}, k > 0), which the capture does not support; stack "
            "them on axis 0 (variable_axes={'params': 0})."
        )
    if held != tuple(shape):
        raise ValueError(
            f"{name}: params hold {'/'.join(path)} of shape {held}, the layer's "
            f"calls need {tuple(shape)}; are these the params loss_fn applies?"
        )


def _leading_sizes(batch: tuple) -> set[int]:
    """The leading sizes of the batch arguments that have an axis."""
    return {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(batch) if jnp.ndim(leaf)}


def _batch_size(batch: tuple, loss_shape: tuple[int, ...]) -> int | None:
    """The number of examples `B` in `batch`, or None where it can't be told.

    `B` is the losses' leading size when a batch argument shares it (`[B]` or
    `[B, T]` losses), else the leading size every batch argument with an axis
    shares (`[B * T]` losses); otherwise (a lookup table or raw positions
    among the arguments, flattened losses) it is unknown.
    """
    leading_sizes = _leading_sizes(batch)
    if loss_shape and loss_shape[0] in leading_sizes:
        return loss_shape[0]
    if len(leading_sizes) == 1:
        return next(iter(leading_sizes))
    return None


def _check_loss_terms(loss_shape: tuple[int, ...], batch: tuple) -> None:
    """Raises when the losses cannot be whole loss terms of each example.

    Every example contributes a whole number of loss terms (`[B]`, `[B, T]`,
    `[B * T]`), so `N` is a multiple of the batch size `B`. A loss reduced over
    the batch axis (`.mean(0)`, `keepdims=True`) breaks that, and would scale
    the output gradients by the wrong `N`. `B` is known only when every batch
    argument with an axis has the same leading size; otherwise (a lookup
    table, a raw key among the arguments) nothing is checked.
    """
    leading_sizes = _leading_sizes(batch)
    if len(leading_sizes) != 1:
        return
    (batch_size,) = leading_sizes
    num_terms = math.prod(loss_shape)
    if num_terms % batch_size:
        raise ValueError(
            f"loss_fn returned losses of shape {tuple(loss_shape)} ({num_terms} "
            f"terms) for a batch of {batch_size} examples (the leading axis of "
            "the batch arguments); it must return unreduced losses with whole "
            "terms per example ([B], or [B, T] for token losses), not losses "
            "reduced over the batch (e.g. .mean(0) or keepdims=True)."
        )
