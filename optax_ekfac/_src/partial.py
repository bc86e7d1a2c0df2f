"""Partial application: EKFAC on some of the parameters, another optimizer on
the rest (`optax.multi_transform`, `optax.masked`).

Those wrappers hand the inner transformation the params and updates with the
other parameters replaced by `optax.MaskedNode()` (which has no leaves). The
`Layers` describe the whole model, so the preconditioner restricts them to
the parameters it receives: the blocks whose kernel (and bias) it gets, the
fallback parameters it gets. The statistics of the other blocks are ignored,
and the adaptive `ekfac`'s quadratic model moves only those parameters (the
others stay where they are in its loss).
"""

import functools
from collections.abc import Callable
from typing import Any

import jax
import optax

from optax_ekfac._src import validation
from optax_ekfac._src.blocks import Layers, leaves_by_path, path_names
from optax_ekfac._src.loss_model import LossModel
from optax_ekfac._src.statistics import Statistics


def restricted(layers: Layers, tree: Any) -> Layers:
    """The `layers` restricted to the parameters `tree` holds.

    Args:
        layers: the blocks of the whole model.
        tree: params or updates, possibly with `optax.MaskedNode()` in place
            of the parameters another transformation owns.

    Returns:
        `layers` itself when `tree` holds all their parameters; otherwise the
        blocks all of whose parameters `tree` holds and the fallback
        parameters it holds.

    Raises:
        ValueError: `tree` holds some but not all parameters of a block (a
            layer's kernel and bias are one block), or none of the layers'.
    """
    present = set(leaves_by_path(tree))
    known = set(layers.fallback).union(*(block.param_paths for block in layers.blocks))
    if known <= present:
        return layers
    blocks = []
    for block in layers.blocks:
        held = [path in present for path in block.param_paths]
        if all(held):
            blocks.append(block)
        elif any(held):
            names = ["/".join(path) for path in block.param_paths]
            missing = [name for name, h in zip(names, held) if not h]
            raise validation.error(
                validation.SCALE_BY_EKFAC,
                f"block {block.name} is one Kronecker-factored block of "
                f"{names}, but the transformation does not receive "
                f"{missing} (a mask of "
                "optax.multi_transform or optax.masked splits it). Give all of "
                "a layer's parameters to scale_by_ekfac, or none.",
            )
    fallback = tuple(path for path in layers.fallback if path in present)
    if not blocks and not fallback:
        raise validation.error(
            validation.SCALE_BY_EKFAC,
            "it receives none of the layers' parameters (everything is masked "
            "out by optax.multi_transform or optax.masked); check the mask or "
            "the labels.",
        )
    return Layers(blocks=tuple(blocks), fallback=fallback)


def restricted_stats(layers: Layers, active: Layers, stats: Any) -> Any:
    """`stats` without the blocks of `layers` that `active` leaves out.

    Statistics of blocks no `Layers` know stay, for the checks to refuse.
    """
    if active is layers or not isinstance(stats, Statistics):
        return stats
    kept = {block.name for block in active.blocks}
    dropped = {block.name for block in layers.blocks} - kept
    return stats._replace(
        layers={
            name: calls for name, calls in stats.layers.items() if name not in dropped
        }
    )


def restricted_loss_model(model: LossModel, tree: Any) -> LossModel:
    """`model` as a function of the parameters `tree` holds, the others fixed.

    Its `params`, and the vectors `curvature_products` and `loss_at` take,
    have the structure of `tree` (with `optax.MaskedNode()`s).
    """
    full = leaves_by_path(model.params)
    present = leaves_by_path(tree)
    if present.keys() == full.keys():
        return model
    flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
    params = jax.tree_util.tree_unflatten(
        treedef, [full[path_names(path)] for path, _ in flat]
    )
    return LossModel(
        params=params,
        batch=(model.params, model.batch),
        loss=model.loss,
        losses_fn=functools.partial(_losses_with_fixed, model.losses_fn),
    )


def _losses_with_fixed(
    losses_fn: Callable[[optax.Params, Any], jax.Array],
    params: optax.Params,
    fixed_and_batch: tuple[optax.Params, Any],
) -> jax.Array:
    """`losses_fn` at the fixed parameters with `params`' leaves put in."""
    fixed, batch = fixed_and_batch
    moved = leaves_by_path(params)
    merged = jax.tree_util.tree_map_with_path(
        lambda path, leaf: moved.get(path_names(path), leaf), fixed
    )
    return losses_fn(merged, batch)
