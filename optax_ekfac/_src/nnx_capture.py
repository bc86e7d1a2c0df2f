"""Capture for flax.nnx models: `optax_ekfac.nnx.Curvature`.

An NNX `loss_fn(model, *batch)` is the linen capture's `loss_fn(params,
*batch)` once the model is split into its parameters and everything else:

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    loss(params, *batch) = loss_fn(nnx.merge(graphdef, params, rest), *batch)

so `nnx.Curvature` is a thin adapter over `optax_ekfac.Curvature`. While
`loss_fn` runs, the calls of the nnx layers the registered kinds list
(`nnx.Linear`, `nnx.LinearGeneral`, `nnx.Conv`, `nnx.Embed` and its `attend`,
`nnx.Einsum`, and any registered with `optax_ekfac.register_kind`; see
`kinds.nnx_methods`) go through the linen capture's own interceptor
(`interceptor.py`): their methods are replaced on their classes for the
duration, and restored afterwards. nnx modules do not know their paths, so the
interceptor is told each module's path in the merged model. Everything else
(the perturbations, the batch scaling, the Monte-Carlo Fisher, `Layers`,
`Statistics`) is the linen capture's: the gradients are an `nnx.State` like
`nnx.grad`'s, and the blocks' parameter paths are the state's paths
(`("layers", "0", "kernel")`), so `scale_by_ekfac` and `ekfac` work with
`nnx.Optimizer` unchanged.

nnx transforms (`nnx.scan`, `nnx.vmap`, `nnx.remat`) call copies of the
model's modules, rebuilt from their state. So that the capture knows them
there, every captured module of the merged model carries its path as a
static attribute, and a call under a transform reads its perturbation and
input slot from `Param`s attached to its module (`_CaptureEntry`): the
transform slices them with the module's parameters (a stack created with
`nnx.vmap` and applied with `nnx.scan`) or passes them through (remat).
"""

import contextlib
import contextvars
import dataclasses
import functools
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal

import jax
from flax import nnx
from flax.core import tracers
from flax.nnx import filterlib

from optax_ekfac._src import capture, kinds, validation
from optax_ekfac._src.blocks import Layers, leaves_by_path
from optax_ekfac._src.capture import FisherType
from optax_ekfac._src.interceptor import Entries, Interceptor
from optax_ekfac._src.statistics import Statistics


class Curvature:
    """Loss, gradients and per-layer statistics of a flax.nnx model in one pass.

    The NNX counterpart of `optax_ekfac.Curvature`: the same capture, the
    same `Layers` and `Statistics`, for a `loss_fn` that takes the model.

    As `nnx.value_and_grad` does, it writes back to the model what `loss_fn`
    changed in its other state (BatchNorm statistics, the counts of the
    `nnx.Rngs` that Dropout draws from).

    Args:
        loss_fn: `loss_fn(model, *batch)` returning unreduced losses of shape
            `[N]` (or `[B, T]`, ...: every entry is one loss term), e.g. from
            `optax_ekfac.softmax_cross_entropy`. It must call the layers of
            the model it is given.
        has_aux: `loss_fn` returns `(losses, aux)`; `aux` is passed through.
        wrt: the `nnx` filter of the variables to differentiate, as for
            `nnx.Optimizer(model, tx, wrt=...)`. Layers whose parameters it
            leaves out are not captured.
        fisher_type: which Fisher the statistics estimate, as for
            `optax_ekfac.Curvature`. `"auto"` (the default): `"mc"` where
            the losses come from this library's helpers
            (`softmax_cross_entropy`, `squared_error`,
            `sigmoid_binary_cross_entropy`, `per_example_loss`), else
            `"empirical"` with a warning. `"empirical"`: the output
            gradients of the data's labels. `"mc"`: the true Fisher (the
            Gauss-Newton matrix for a `per_example_loss`), from output
            gradients sampled from the model's predictive distribution
            (with a `key` for `value_grad_and_stats`, or one derived from
            the batch). The loss and gradients returned are the data's in
            every case.
        num_samples: `S`, label samples per loss term for the sampled
            Fisher; the statistics hold them as `S * N` examples.
        max_curvature_terms: at most this many loss terms of each batch give
            the curvature, as for `optax_ekfac.Curvature` (None: the default
            bound; `"all"`: the whole batch).

    Example:
        >>> model = nnx.Sequential(
        ...     nnx.Linear(8, 16, rngs=nnx.Rngs(0)), nnx.relu,
        ...     nnx.Linear(16, 3, rngs=nnx.Rngs(1)))
        >>> def loss_fn(model, x, y):
        ...     return optax_ekfac.softmax_cross_entropy(model(x), y)
        >>> curvature = optax_ekfac.nnx.Curvature(loss_fn)
        >>> layers = curvature.layers(model, x, y)
        >>> [block.name for block in layers.blocks]   # paths in nnx.state(model)
        ['layers/0', 'layers/2']
        >>> optimizer = nnx.Optimizer(
        ...     model, optax_ekfac.ekfac_sgd(layers, learning_rate=0.1), wrt=nnx.Param)
        >>> loss, grads, stats = curvature.value_grad_and_stats(model, x, y)
        >>> _ = optimizer.update(model, grads, stats=stats)  # updates the model
    """

    def __init__(
        self,
        loss_fn: Callable[..., Any],
        *,
        has_aux: bool = False,
        wrt: filterlib.Filter = nnx.Param,
        fisher_type: FisherType = "auto",
        num_samples: int = 1,
        max_curvature_terms: int | Literal["all"] | None = None,
    ):
        # The linen capture checks the settings now, not at the first trace.
        checked = capture.Curvature(
            loss_fn,
            fisher_type=fisher_type,
            num_samples=num_samples,
            max_curvature_terms=max_curvature_terms,
        )
        self.loss_fn = loss_fn
        self.has_aux = has_aux
        self.wrt = wrt
        self.fisher_type = checked.fisher_type
        self.num_samples = checked.num_samples
        self.max_curvature_terms = checked.max_curvature_terms

    def layers(self, model: nnx.Module, *batch: Any) -> Layers:
        """Describes the blocks of the model, tracing `loss_fn` once (no FLOPs).

        Args:
            model: the flax.nnx model.
            *batch: the arguments `loss_fn` takes after the model.

        Returns:
            A printable `Layers` table to pass to `scale_by_ekfac`; its
            parameter paths are those of `nnx.state(model, wrt)`.
        """
        over_params, params = self._split(model)
        return over_params.layers(params, *batch)

    def value_grad_and_stats(
        self, model: nnx.Module, *batch: Any, key: jax.Array | None = None
    ) -> tuple[Any, nnx.State, Statistics]:
        """The mean loss, its gradient and the batch statistics.

        Args:
            model: the flax.nnx model; its non-differentiated state is
                updated as `loss_fn` updates it.
            *batch: the arguments `loss_fn` takes after the model.
            key: a `jax.random` key for the sampled Fisher (a fresh one every
                step; None derives one from the batch's contents, as in
                `optax_ekfac.Curvature`); unused by the empirical Fisher.

        Returns:
            `(loss, grads, stats)`: `loss = mean(l)` (`(loss, aux)` with
            `has_aux`), `grads` its gradient as the `nnx.State` of the `wrt`
            variables (what `nnx.grad` returns), and the `Statistics` that
            `scale_by_ekfac` takes as `stats=`
            (`optimizer.update(model, grads, stats=stats)`).
        """
        over_params, params = self._split(model)
        (loss, (aux, rest)), grads, stats = over_params.value_grad_and_stats(
            params, *batch, key=key
        )
        nnx.update(model, rest)
        return ((loss, aux) if self.has_aux else loss), grads, stats

    def _split(self, model: nnx.Module) -> tuple["_OverParams", nnx.State]:
        if not isinstance(model, nnx.Module):
            raise TypeError(
                "optax_ekfac.nnx.Curvature takes the flax.nnx model, not a "
                f"{type(model).__name__}; for a flax.linen model's params use "
                "optax_ekfac.Curvature."
            )
        graphdef, params, rest = nnx.split(model, self.wrt, ...)  # type: ignore[misc]
        return _OverParams(self, graphdef, rest), params


# The static attribute that names a captured module's path in the model.
_PATH_ATTRIBUTE = "optax_ekfac_path"


class _CaptureEntry(nnx.Param):
    """A transformed call's perturbation or input slot, attached to its
    module; a `Param`, so that transforms treat it as the module's
    parameters (`nnx.StateAxes({nnx.Param: 0, ...})` included)."""


class _OverParams(capture.Curvature):
    """The linen capture of `Curvature.loss_fn` as a function of the `wrt`
    state of one split model. Its aux is `(aux, the model's other state after
    loss_fn)`."""

    def __init__(self, curvature: Curvature, graphdef: Any, rest: nnx.State):
        super().__init__(
            curvature.loss_fn,
            has_aux=True,
            fisher_type=curvature.fisher_type,
            num_samples=curvature.num_samples,
            max_curvature_terms=curvature.max_curvature_terms,
        )
        self.graphdef = graphdef
        self.rest = rest
        self.wrt = curvature.wrt
        self.loss_fn_has_aux = curvature.has_aux

    def _call_loss_fn(self, params, batch, interceptor) -> Any:
        # Copies: loss_fn may update the other state (BatchNorm statistics,
        # RNG counts) here, inside the differentiated trace.
        model = nnx.merge(self.graphdef, params, self.rest, copy=True)
        module_paths = _module_paths(model, params)
        attached = _attach(model, module_paths, interceptor.entries)
        router = _Router(interceptor, module_paths)
        try:
            with _calls_routed_to(router):
                result = self.loss_fn(model, *batch)
        finally:
            _detach(model, attached)
        losses, aux = validation.split_aux(result, self.loss_fn_has_aux)
        _, _, rest = nnx.split(model, self.wrt, ...)  # type: ignore[misc]
        return losses, (aux, rest)


def _attach(
    model: Any, module_paths: dict[int, tuple[str, ...]], entries: Entries
) -> list[tuple[Any, str]]:
    """Tags the captured modules of `model` with their paths and attaches the
    transformed calls' entries; returns what to remove afterwards."""
    attached = []
    modules = {id(node): node for _, node in nnx.iter_graph(model)}
    by_path = {path: modules[key] for key, path in module_paths.items()}
    for path, module in by_path.items():
        setattr(module, _PATH_ATTRIBUTE, path)
        attached.append((module, _PATH_ATTRIBUTE))
    for path, variables in entries.items():
        for name, value in variables.items():
            setattr(by_path[path], name, _CaptureEntry(value))
            attached.append((by_path[path], name))
    return attached


def _detach(model: Any, attached: list[tuple[Any, str]]) -> None:
    del model
    for module, name in attached:
        delattr(module, name)


def _module_paths(model: Any, params: nnx.State) -> dict[int, tuple[str, ...]]:
    """`id(module) -> path` of the modules owning differentiated parameters.

    Paths are names as in the state (`("layers", "0")`), so a block's
    parameter paths are its module path plus the parameter names. A module
    reachable from several places (shared) has one path, the state's.
    """
    owners = {path[:-1] for path in leaves_by_path(params)}
    paths: dict[int, tuple[str, ...]] = {}
    for keys, node in nnx.iter_graph(model):
        path = tuple(str(name) for name in keys)
        if isinstance(node, nnx.Module) and path in owners:
            paths.setdefault(id(node), path)
    return paths


@dataclasses.dataclass(frozen=True)
class _LayerCall:
    """One layer call as the interceptor reads it (linen's interceptor
    context, plus the module's path, its parameters, and its capture
    entries)."""

    module: nnx.Module
    method_name: str
    module_path: tuple[str, ...]

    @property
    def parameters(self) -> list[Any]:
        return jax.tree.leaves(nnx.state(self.module, nnx.Param))

    def entry(self, name: str) -> jax.Array | None:
        variable = getattr(self.module, name, None)
        return None if variable is None else variable[...]


@dataclasses.dataclass(frozen=True)
class _Router:
    """Hands the calls of the model's layers to the capture's interceptor."""

    interceptor: Interceptor
    module_paths: dict[int, tuple[str, ...]]

    def __call__(self, method, module, method_name, args, kwargs):
        path = self.module_paths.get(id(module), getattr(module, _PATH_ATTRIBUTE, None))
        if path is None:
            if tracers.current_trace() == self.interceptor.loss_trace:
                # Not a layer of the differentiated model (frozen, or built
                # inside loss_fn): nothing to precondition.
                return method(module, *args, **kwargs)
            # nnx transforms (nnx.scan, nnx.vmap, nnx.remat, ...) call copies
            # of the model's modules; the interceptor refuses the call.
            path = (f"a {type(module).__name__} inside an nnx transform",)
        call = _LayerCall(module, method_name, path)
        return self.interceptor(functools.partial(method, module), args, kwargs, call)


_ACTIVE_ROUTER: contextvars.ContextVar[_Router | None] = contextvars.ContextVar(
    "optax_ekfac_nnx_router", default=None
)
_INSTALL_LOCK = threading.Lock()
_originals: dict[tuple[type, str], Callable[..., Any]] = {}
_num_active_captures = 0


@contextlib.contextmanager
def _calls_routed_to(router: _Router) -> Iterator[None]:
    """Routes the captured layer methods' calls in this context to `router`.

    The methods are replaced on their classes while any capture runs (in any
    thread) and restored when the last one ends; a call made outside every
    capture's context goes straight to the original method.
    """
    global _num_active_captures
    token = _ACTIVE_ROUTER.set(router)
    with _INSTALL_LOCK:
        if not _num_active_captures:
            for cls, name in kinds.nnx_methods():
                _originals[cls, name] = cls.__dict__[name]
                setattr(cls, name, _routed(cls.__dict__[name], name))
        _num_active_captures += 1
    try:
        yield
    finally:
        with _INSTALL_LOCK:
            _num_active_captures -= 1
            if not _num_active_captures:
                for (cls, name), original in _originals.items():
                    setattr(cls, name, original)
                _originals.clear()
        _ACTIVE_ROUTER.reset(token)


def _routed(method: Callable[..., Any], method_name: str) -> Callable[..., Any]:
    """`method`, calling the active router instead when there is one."""

    @functools.wraps(method)
    def routed_method(module, *args, **kwargs):
        router = _ACTIVE_ROUTER.get()
        if router is None:
            return method(module, *args, **kwargs)
        return router(method, module, method_name, args, kwargs)

    return routed_method
