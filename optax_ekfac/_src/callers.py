"""What called the update: the causes of two mistakes only the call stack
shows.

`scale_by_ekfac` reads its callers' frames, when it is traced, to say why it
got no statistics (flax's `TrainState.apply_gradients` hands them to
`.replace`, `optax.lookahead` drops them) and to refuse `optax.MultiSteps`,
whose inner update would keep the last micro-batch's statistics only. A
wrapper renamed in a later flax or optax loses the precise message, not the
check of the statistics.
"""

import sys
from collections.abc import Iterator
from types import FrameType

from flax.training import train_state


def missing_stats_cause() -> str:
    """Why an update got no statistics, read from the callers' frames: flax's
    `TrainState.apply_gradients` given `stats=`, `optax.lookahead`, or
    (neither found) the general advice."""
    for frame in _callers():
        code = frame.f_code
        if (
            code.co_name == "apply_gradients"
            and frame.f_globals.get("__name__") == train_state.__name__
            and "stats" in frame.f_locals.get("kwargs", {})
        ):
            return (
                "flax.training.train_state.TrainState.apply_gradients(grads=..., "
                "stats=...) hands stats to .replace, not to tx.update: use "
                "optax_ekfac.TrainState (a subclass whose apply_gradients passes "
                "stats to the optimizer) in its place."
            )
        if frame.f_globals.get("__name__") == "optax._src.lookahead":
            return (
                "optax.lookahead does not forward extra arguments to its fast "
                "optimizer: build it in the training step around "
                "optax_ekfac.with_stats(fast_optimizer, stats)."
            )
    return (
        "a wrapper that calls tx.update without extra arguments (flax's "
        "TrainState.apply_gradients, optax.lookahead) drops them: use "
        "optax_ekfac.TrainState, or bind them with optax_ekfac.with_stats(tx, "
        "stats)."
    )


def under_multi_steps() -> bool:
    """Whether the update runs inside `optax.MultiSteps`."""
    return any(
        frame.f_globals.get("__name__") == "optax.transforms._accumulation"
        for frame in _callers()
    )


def _callers() -> Iterator[FrameType]:
    """The frames of this call stack, innermost first."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        yield frame
        frame = frame.f_back
