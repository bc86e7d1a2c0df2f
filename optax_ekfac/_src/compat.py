"""What the library needs from JAX, optax and flax beyond their public APIs.

The one module allowed private JAX internals and assumptions about how
optax's and flax's wrappers are written; `tests/test_compat.py` checks each
function below on real traces and real wrappers, so that a change underneath
fails there rather than silently changing what the capture records or which
mistakes the update refuses.

Used elsewhere, and public: `flax.core.tracers.current_trace()` (JAX's
`jax.extend.core.get_opaque_trace_state`), which tells whether code runs in
the trace `loss_fn` runs in, and `jax.core.Tracer`.
"""

import inspect
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

import jax
import jax.extend.core

# No public name: `jax.interpreters.partial_eval` exports `JaxprTracer` but
# not its trace.
from jax._src.interpreters.partial_eval import JaxprTrace


def current_trace() -> Any:
    """The JAX trace running now, an object compared by identity.

    `jax.extend.core.take_current_trace` (public from jax 0.10) hands it out
    while it swaps in the evaluation trace; the trace is restored on leaving
    the block. Older jax has no public name for it: its trace context.
    """
    take_current_trace = getattr(jax.extend.core, "take_current_trace", None)
    if take_current_trace is None:
        from jax._src import core

        return core.trace_ctx.trace
    with take_current_trace() as trace:
        return trace


def in_partial_eval_since(outer_trace: Any) -> bool:
    """Whether the trace running now is a partial evaluation
    (`jax.interpreters.partial_eval.trace_to_jaxpr_nounits`), or runs inside
    one, entered since `outer_trace`.

    `flax.linen.scan` traces its body once more that way, to check that the
    broadcast variables do not depend on the carry, and drops that trace's
    jaxpr. Nothing public tells such a trace apart: it needs the trace's
    class (`JaxprTrace`, not exported) and its enclosing trace (the
    `parent_trace` attribute that JAX's nesting traces keep).
    """
    trace = current_trace()
    while trace is not None and trace is not outer_trace:
        if isinstance(trace, JaxprTrace):
            return True
        trace = getattr(trace, "parent_trace", None)
    return False


def is_tracer_of_current_trace(value: Any) -> bool:
    """Whether `value` is a tracer of the trace running now: an argument of
    the transformation running now, not a value it closes over (a tracer of
    an enclosing trace).

    JAX lifts a closed-over tracer into the current trace when an operation
    uses it, so no public operation tells the two apart: it needs the
    tracer's trace, the private `Tracer._trace`.
    """
    return (
        isinstance(value, jax.core.Tracer) and value._trace is current_trace()  # noqa: SLF001
    )


def frame_running(function: Callable[..., Any]) -> FrameType | None:
    """The innermost frame of the call stack that runs `function`'s own code
    (a method given as `Class.method`), or None.

    Frame reading itself is Python's documented `inspect`; what is assumed
    is that a wrapper calls the wrapped update from that function's body.
    """
    code = inspect.unwrap(function).__code__
    for frame in _calling_frames():
        if frame.f_code is code:
            return frame
    return None


def runs_within_module_of(public_object: Any) -> bool:
    """Whether a frame of the call stack runs code of the module that defines
    `public_object` (an optax wrapper: `optax.MultiSteps`, `optax.lookahead`).

    The module is read from the object, so a wrapper moved to another module
    is followed; what is assumed is that the wrapper calls the wrapped update
    from code of its own module (its methods, or closures it returns).
    """
    module = public_object.__module__
    return any(frame.f_globals.get("__name__") == module for frame in _calling_frames())


def keyword_arguments(frame: FrameType) -> dict[str, Any]:
    """The `**kwargs` a frame's function received (empty if it takes none)."""
    arguments = inspect.getargvalues(frame)
    if arguments.keywords is None:
        return {}
    return arguments.locals.get(arguments.keywords, {})


def _calling_frames() -> Iterator[FrameType]:
    """The frames of the call stack, innermost first."""
    frame = inspect.currentframe()
    while frame is not None:
        yield frame
        frame = frame.f_back
