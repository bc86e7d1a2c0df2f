"""What called the update: the causes of two mistakes only the call stack
shows.

`scale_by_ekfac` reads its callers' frames, when it is traced, to say why it
got no statistics (flax's `TrainState.apply_gradients` hands them to
`.replace`, `optax.lookahead` drops them) and to refuse `optax.MultiSteps`,
whose inner update would keep the last micro-batch's statistics only. The
wrappers are recognised by their public objects (`compat.py`); a wrapper
rewritten so that this no longer holds fails `tests/test_compat.py`.
"""

import optax
from flax.training import train_state

from optax_ekfac._src import compat


def missing_stats_cause() -> str:
    """Why an update got no statistics, read from the callers' frames: flax's
    `TrainState.apply_gradients` given `stats=`, `optax.lookahead`, or
    (neither found) the general advice."""
    apply_gradients = compat.frame_running(train_state.TrainState.apply_gradients)
    if apply_gradients is not None and "stats" in compat.keyword_arguments(
        apply_gradients
    ):
        return (
            "flax.training.train_state.TrainState.apply_gradients(grads=..., "
            "stats=...) hands stats to .replace, not to tx.update: use "
            "optax_ekfac.TrainState (a subclass whose apply_gradients passes "
            "stats to the optimizer) in its place."
        )
    if compat.runs_within_module_of(optax.lookahead):
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
    return compat.runs_within_module_of(optax.MultiSteps)
