"""Decoupled weight decay for `ekfac` and `ekfac_sgd`, as `optax.adamw`'s."""

from typing import Any

import optax

from optax_ekfac._src import validation


def decay_terms(
    params: optax.Params | None, weight_decay: Any, mask: Any, owner: str
) -> optax.Updates | None:
    """`weight_decay · θ` on the parameters `mask` selects (zeros elsewhere),
    as `optax.add_decayed_weights(weight_decay, mask)` adds to zero updates;
    None where `weight_decay` is known to be 0, so that it costs nothing.

    Args:
        params: the parameters `θ` the update gets.
        weight_decay: the rate, a number or a traced scalar.
        mask: None for every parameter; or a tree of bools, or a function of
            the parameters giving one, as `optax.adamw`'s `mask`.
        owner: the optimizer the user called, for the error.

    Returns:
        The tree of decay terms, or None.
    """
    if validation.is_zero(weight_decay):
        return None
    if params is None:
        raise validation.error(
            owner,
            "weight_decay needs the parameters: call "
            "tx.update(grads, opt_state, params, stats=stats).",
        )
    decayed = optax.add_decayed_weights(weight_decay, mask)
    terms, _ = decayed.update(
        optax.tree.zeros_like(params), decayed.init(params), params
    )
    return terms
