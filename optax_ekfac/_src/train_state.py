"""Training-loop plumbing: `TrainState` and `with_stats`.

`scale_by_ekfac` takes the batch statistics as an extra argument of its
update, `tx.update(grads, state, params, stats=stats)`. Code that calls
`tx.update` itself without extra arguments drops them: flax's
`TrainState.apply_gradients(grads=..., stats=...)` hands `stats` to
`.replace`, and `optax.lookahead` calls its fast optimizer with the gradients
alone. `TrainState` passes `stats` on; `with_stats` binds them to a
transformation for any other caller.
"""

from typing import Any

import optax
from flax.training import train_state


def with_stats(
    tx: optax.GradientTransformation, stats: Any
) -> optax.GradientTransformationExtraArgs:
    """`tx` with the batch statistics bound: its update passes `stats=stats`.

    For code that calls `tx.update(grads, state, params)` without extra
    arguments (`optax.lookahead`, a training loop you do not own). Build it
    inside the training step, from that step's statistics; the state is
    `tx`'s.

    Args:
        tx: a transformation whose update takes `stats=` (`scale_by_ekfac`,
            `ekfac`, or a chain holding one).
        stats: the `Statistics` from `Curvature.value_grad_and_stats`.

    Returns:
        A transformation with `tx`'s `init` and state.

    Example:
        >>> tx = optax_ekfac.ekfac_sgd(layers, learning_rate=0.1)
        >>> slow_and_fast = optax.LookaheadParams.init_synced(params)
        >>> lookahead = optax.lookahead(tx, sync_period=5, slow_step_size=0.5)
        >>> opt_state = lookahead.init(slow_and_fast)
        >>> bound = optax.lookahead(
        ...     optax_ekfac.with_stats(tx, stats), sync_period=5, slow_step_size=0.5)
        >>> updates, opt_state = bound.update(grads, opt_state, slow_and_fast)
    """
    tx = optax.with_extra_args_support(tx)

    def update_fn(updates, state, params=None, **extra_args):
        return tx.update(updates, state, params, stats=stats, **extra_args)

    return optax.GradientTransformationExtraArgs(tx.init, update_fn)


class TrainState(train_state.TrainState):
    """flax's `TrainState`, whose `apply_gradients` passes `stats` to `tx`.

    A drop-in subclass of `flax.training.train_state.TrainState`; with
    `stats=None` it is flax's `apply_gradients`.

    Example:
        >>> state = optax_ekfac.TrainState.create(
        ...     apply_fn=model.apply, params=params,
        ...     tx=optax_ekfac.ekfac_sgd(layers, learning_rate=0.1))
        >>> loss, grads, stats = curvature.value_grad_and_stats(state.params, x, y)
        >>> state = state.apply_gradients(grads=grads, stats=stats)
        >>> int(state.step)
        1
    """

    def apply_gradients(self, *, grads: Any, stats: Any = None, **kwargs: Any):
        """Updates `step`, `params` and `opt_state` with `tx.update(grads,
        opt_state, params, stats=stats)`, and `.replace`s `**kwargs`.

        Args:
            grads: gradients shaped like `.params`.
            stats: the `Statistics` from `Curvature.value_grad_and_stats`,
                for `tx`; None calls `tx.update` without them.
            **kwargs: other fields to `.replace`.

        Returns:
            The updated state.
        """
        if stats is None:
            return super().apply_gradients(grads=grads, **kwargs)
        bound = self.replace(tx=with_stats(self.tx, stats))
        updated = train_state.TrainState.apply_gradients(bound, grads=grads, **kwargs)
        return updated.replace(tx=self.tx)
