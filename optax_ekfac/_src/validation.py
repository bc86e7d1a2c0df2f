"""The checks of `scale_by_ekfac`'s arguments, state and statistics, and of
the batch and losses the capture gets.

Every check of the optimizer raises through `error`, which names the function
the user called: `ValueError("scale_by_ekfac: ...")` (or a `TypeError` for a
wrong type). Shapes are checked when the step is traced; values only where
they are concrete (see `_check_hyperparameters`). The capture's checks
(`split_aux`, `check_loss_terms`, `batch_size`) name `loss_fn` and
`Curvature`'s arguments.
"""

import dataclasses
import math
import numbers
from typing import Any, get_args

import jax
import jax.numpy as jnp
import numpy as np

from optax_ekfac._src import callers, kinds
from optax_ekfac._src.blocks import Block, Layers, leaves_by_path
from optax_ekfac._src.options import (
    ADAPTATION,
    Adaptation,
    FixedRate,
    Options,
    Scalings,
    WeightSharing,
)
from optax_ekfac._src.state import BlockState, ScaleByEkfacState
from optax_ekfac._src.statistics import LayerStats, Statistics

SCALE_BY_EKFAC = "scale_by_ekfac"
EKFAC = "ekfac"
EKFAC_SGD = "ekfac_sgd"
_HYPERPARAMETERS = (
    "damping",
    "decay",
    "eigen_update_every",
    "stats_update_every",
    "max_per_example_elements",
    "max_factor_dim",
)
# Hyperparameters that set array shapes: None allowed, never traced.
_SHAPE_SETTINGS = ("max_per_example_elements", "max_factor_dim")


def error(
    owner: str, message: str, exception: type[Exception] = ValueError
) -> Exception:
    """`exception(f"{owner}: {message}")`: an error that names the function
    the user called (`raise error(SCALE_BY_EKFAC, "...")`)."""
    return exception(f"{owner}: {message}")


def checked_options(options: Options) -> Options:
    """Raises unless the options are valid; returns them with `eigh_dtype` a
    `jnp.dtype` (or None)."""
    _check_hyperparameters(options)
    for name, allowed in (
        ("scalings", get_args(Scalings)),
        ("weight_sharing", get_args(WeightSharing)),
    ):
        value = getattr(options, name)
        if value not in allowed:
            raise error(
                SCALE_BY_EKFAC, f"{name} must be one of {allowed}, got {value!r}."
            )
    eigh_dtype = options.eigh_dtype
    if eigh_dtype is not None:
        eigh_dtype = jnp.dtype(eigh_dtype)
        if eigh_dtype not in (jnp.float32, jnp.float64):
            raise error(
                SCALE_BY_EKFAC,
                "eigh_dtype must be jnp.float32 or jnp.float64 "
                f"(or None for the factor dtype), got {eigh_dtype}.",
            )
        if eigh_dtype == jnp.float64 and not jax.config.read("jax_enable_x64"):
            raise error(
                SCALE_BY_EKFAC,
                "eigh_dtype=float64 needs 64-bit JAX: call "
                "jax.config.update('jax_enable_x64', True) at startup, or use "
                "float32; without it JAX would silently compute in float32.",
            )
    return dataclasses.replace(options, eigh_dtype=eigh_dtype)


def check_layers(layers: Any) -> None:
    """Raises unless `layers` are the `Layers` from `Curvature.layers`."""
    if not isinstance(layers, Layers):
        raise error(
            SCALE_BY_EKFAC,
            "layers must be the Layers from Curvature.layers, "
            f"not {type(layers).__name__}.",
            TypeError,
        )


def checked_leaves(layers: Layers, tree: Any, what: str) -> dict:
    """The leaves of `tree` by path, once they match the layers' parameters."""
    leaves = leaves_by_path(tree)
    for block in layers.blocks:
        for path, size in zip(block.param_paths, _param_sizes(block)):
            if path not in leaves:
                raise error(
                    SCALE_BY_EKFAC,
                    f"{what} has no {'/'.join(path)} for block "
                    f"{block.name}; were the layers built for another model?",
                )
            shape = leaves[path].shape
            if math.prod(shape) != size:
                raise error(
                    SCALE_BY_EKFAC,
                    f"{what} hold {'/'.join(path)} of shape "
                    f"{shape}, but block {block.name} has {size} elements there; "
                    "were the layers built for another model?",
                )
    for path in layers.fallback:
        if path not in leaves:
            raise error(
                SCALE_BY_EKFAC,
                f"{what} has no {'/'.join(path)}; were the layers "
                "built for another model?",
            )
    known = set(layers.fallback).union(*(block.param_paths for block in layers.blocks))
    unknown = sorted("/".join(path) for path in leaves if path not in known)
    if unknown:
        raise error(
            SCALE_BY_EKFAC,
            f"{what} hold {unknown}, which the layers do not "
            "know; were the layers built for another model?",
        )
    return leaves


def _param_sizes(block: Block) -> tuple[int, ...]:
    """Number of elements of the kernel (and bias) of a block."""
    features = block.output_dim * block.num_groups * block.num_stacked
    kernel = (block.input_dim - block.has_bias) * features
    return (kernel, features) if block.has_bias else (kernel,)


def check_state(layers: Layers, state: Any, grads: dict, max_factor_dim: int) -> None:
    """Raises unless `state` is this transformation's state for these layers
    (its factors blocked as `max_factor_dim` says)."""
    if not isinstance(state, ScaleByEkfacState):
        raise error(
            SCALE_BY_EKFAC,
            "state must be the ScaleByEkfacState from init, not "
            f"{type(state).__name__}; restore checkpoints into a target such as "
            "jax.eval_shape(tx.init, params).",
            TypeError,
        )
    expected = {block.name for block in layers.blocks}
    if set(state.blocks) != expected:
        raise error(
            SCALE_BY_EKFAC,
            f"the state holds blocks {sorted(state.blocks)}, the "
            f"layers {sorted(expected)}; is the state from another model?",
        )
    for block in layers.blocks:
        held = state.blocks[block.name].scalings.shape[-2:]
        if held != (block.input_dim, block.output_dim):
            raise error(
                SCALE_BY_EKFAC,
                f"the state holds scalings of shape {held} for "
                f"{block.name}, whose block is "
                f"{(block.input_dim, block.output_dim)}; is the state from "
                "another model?",
            )
        _check_factor_shapes(block, state.blocks[block.name], max_factor_dim)
    fallback = {"/".join(path) for path in layers.fallback}
    if set(state.second_moments) != fallback:
        raise error(
            SCALE_BY_EKFAC,
            "the state holds second moments for "
            f"{sorted(state.second_moments)}, the layers' fallback is "
            f"{sorted(fallback)}; is the state from another model?",
        )
    for key, moment in state.second_moments.items():
        shape = grads[tuple(key.split("/"))].shape
        if shape != moment.shape:
            raise error(
                SCALE_BY_EKFAC,
                f"updates hold {key} of shape {shape}, the state "
                f"{moment.shape}; is the state from another model?",
            )


def _check_factor_shapes(
    block: Block, block_state: BlockState, max_factor_dim: int
) -> None:
    """Raises unless the factors are dense or block-diagonal as
    `max_factor_dim` makes them (not a state from another `max_factor_dim`)."""
    shapes = kinds.factor_shapes(block, max_factor_dim)
    for name, dim, expected in zip(
        ("input_factor", "output_factor"), (block.input_dim, block.output_dim), shapes
    ):
        held = getattr(block_state, name).shape
        if held[len(held) - len(expected) :] != expected:
            raise error(
                SCALE_BY_EKFAC,
                f"the state holds {name} of shape {held} for {block.name}, "
                f"whose side of {dim} needs {expected} with "
                f"max_factor_dim={max_factor_dim}; is the state from another "
                "model or another max_factor_dim?",
            )


def check_not_under_multi_steps() -> None:
    """Raises inside `optax.MultiSteps`, whose inner update keeps the state of
    the last micro-batch's statistics only."""
    if callers.under_multi_steps():
        raise error(
            SCALE_BY_EKFAC,
            "it runs inside optax.MultiSteps, which accumulates the gradients "
            "only: the update sees each micro-batch's statistics and MultiSteps "
            "keeps its state from the last micro-batch, so the curvature (and "
            "the adaptive ekfac's quadratic model) would be the last "
            "micro-batch's alone. Compute a step's loss, gradients and "
            "statistics over all its micro-batches with "
            "optax_ekfac.accumulated(curvature, num_micro_batches), and call "
            "tx.update once per step.",
        )


def check_stats(layers: Layers, stats: Any) -> None:
    """Raises unless `stats` hold every block's calls, in the layers' shapes.

    Only feature shapes are checked: the number of examples may differ from
    the batch the layers were built from (a last partial batch, a Monte-Carlo
    Fisher's samples) but must be the same for all calls of one block.
    """
    if stats is None:
        raise error(
            SCALE_BY_EKFAC,
            "update needs the batch statistics: "
            "tx.update(grads, state, params, stats=stats) with stats from "
            "Curvature.value_grad_and_stats. It got none; if you passed them, "
            + callers.missing_stats_cause(),
        )
    if not isinstance(stats, Statistics):
        raise error(
            SCALE_BY_EKFAC,
            "stats must be the Statistics from "
            f"Curvature.value_grad_and_stats, not {type(stats).__name__}.",
            TypeError,
        )
    expected = {block.name for block in layers.blocks}
    missing = sorted(expected - set(stats.layers))
    extra = sorted(set(stats.layers) - expected)
    if missing or extra:
        raise error(
            SCALE_BY_EKFAC,
            "the stats do not match the layers: missing stats for "
            f"{missing or 'none'}, stats for unknown layers {extra or 'none'}. "
            "Were they captured from another model?",
        )
    for block in layers.blocks:
        calls = stats.layers[block.name]
        if not (
            isinstance(calls, tuple | list)
            and all(isinstance(call, LayerStats) for call in calls)
        ):
            raise error(
                SCALE_BY_EKFAC,
                f"stats.layers[{block.name!r}] must be a tuple "
                f"of LayerStats (one per call), not {type(calls).__name__}.",
                TypeError,
            )
        if len(calls) != block.num_calls:
            raise error(
                SCALE_BY_EKFAC,
                f"{block.name} was called {len(calls)} times in "
                f"the stats, {block.num_calls} in the layers.",
            )
        stack = block.stack
        for call in calls:
            leading = {call.inputs.shape[: len(stack)]}
            leading.add(call.output_grads.shape[: len(stack)])
            if leading != {stack}:
                raise error(
                    SCALE_BY_EKFAC,
                    f"stats for {block.name} have inputs {call.inputs.shape} and "
                    f"output gradients {call.output_grads.shape}; its block is "
                    f"stacked {stack} (one per layer of a scan), so both need "
                    "these leading axes. Were they captured from another model?",
                )
        # What one element of the stack sees (shapes only).
        elements = [
            LayerStats(*(_element_shape(leaf, len(stack)) for leaf in call))  # type: ignore[arg-type]
            for call in calls
        ]
        for call, method in zip(elements, block.methods):
            problem = kinds.get(block.kind).misfit(block, call, method)
            if problem is not None:
                raise error(SCALE_BY_EKFAC, problem)
        num_examples = sorted({call.inputs.shape[0] for call in elements})
        if len(num_examples) > 1 or num_examples[0] < 1:
            raise error(
                SCALE_BY_EKFAC,
                f"the calls of {block.name} hold {num_examples} "
                "examples; the calls of one module are positions of the same "
                "examples, so they need the same leading (example) axis, of at "
                "least one example.",
            )


def _element_shape(leaf: Any, num_stacked: int) -> jax.ShapeDtypeStruct:
    """What one element of a stack sees of a stacked statistic."""
    return jax.ShapeDtypeStruct(leaf.shape[num_stacked:], leaf.dtype)


def _check_hyperparameters(options: Options) -> None:
    """Range-checks the hyperparameters whose values are known now.

    Python and NumPy numbers and concrete JAX arrays are checked. Traced
    values (those `optax.inject_hyperparams` passes to a jitted update) have
    no value yet and are not: they were checked when `init` ran on concrete
    ones, and a schedule's later values are the schedule's responsibility.
    """
    named = {name: getattr(options, name) for name in _HYPERPARAMETERS}
    values = {}
    for name, value in named.items():
        if value is None and name in _SHAPE_SETTINGS:
            continue
        if callable(value):
            raise error(
                SCALE_BY_EKFAC,
                f"{name} must be a number, not {value!r}; to "
                "schedule it, use optax.inject_hyperparams(scale_by_ekfac)("
                f"layers, {name}=schedule).",
                TypeError,
            )
        if jnp.ndim(value) != 0:
            raise error(
                SCALE_BY_EKFAC,
                f"{name} must be a scalar, got shape {jnp.shape(value)}.",
            )
        if isinstance(value, jax.core.Tracer):
            if name in _SHAPE_SETTINGS:
                raise error(
                    SCALE_BY_EKFAC,
                    f"{name} sets array shapes, "
                    "so it cannot be traced: with optax.inject_hyperparams, "
                    f"pass static_args=('{name}',).",
                )
            continue
        value = np.asarray(value)
        if not (np.issubdtype(value.dtype, np.number) or value.dtype == bool):
            raise error(
                SCALE_BY_EKFAC, f"{name} must be a number, got {value}.", TypeError
            )
        values[name] = value.item()

    def out_of_range(name, rule):
        raise error(SCALE_BY_EKFAC, f"{name} must be {rule}, got {named[name]!r}.")

    if "damping" in values and not 0 < values["damping"] < math.inf:
        # Zero would divide by the zero scalings of rank-deficient factors.
        out_of_range("damping", "a finite number > 0 (it bounds the update)")
    if "decay" in values and not 0 <= values["decay"] < 1:
        out_of_range("decay", "in [0, 1)")
    for name in (
        "eigen_update_every",
        "stats_update_every",
        "max_per_example_elements",
        "max_factor_dim",
    ):
        value = values.get(name)
        if value is not None and not (value >= 1 and value == math.floor(value)):
            out_of_range(name, "an integer >= 1")
    if (
        "eigen_update_every" in values
        and "stats_update_every" in values
        and values["eigen_update_every"] % values["stats_update_every"]
    ):
        raise error(
            SCALE_BY_EKFAC,
            "eigen_update_every must be a multiple of "
            f"stats_update_every (got {options.eigen_update_every} and "
            f"{options.stats_update_every}): eigenbases are computed from fresh "
            "factors.",
        )


def check_learning_rate(learning_rate: Any, owner: str = EKFAC_SGD) -> None:
    """Raises for a fixed learning rate that is known now and not positive:
    `optax.sgd` would step uphill. Schedules and traced values are not
    checked."""
    if callable(learning_rate) or isinstance(learning_rate, jax.core.Tracer):
        return
    value = np.asarray(learning_rate)
    if value.ndim == 0 and np.issubdtype(value.dtype, np.number) and value > 0:
        return
    raise error(
        owner,
        f"learning_rate must be a number > 0 or an optax schedule, got "
        f"{learning_rate!r}.",
    )


def concrete(value: Any) -> Any:
    """`value` as a Python number where it is known now (a Python or NumPy
    number, or a concrete 0-d array, as `optax.inject_hyperparams` passes to
    `init`); None where it is traced (its `update` under `jit`)."""
    if isinstance(value, jax.core.Tracer):
        return None
    return np.asarray(value).item()


def is_zero(value: Any) -> bool:
    """Whether `value` is known now to be 0 (a traced value is not)."""
    return not isinstance(value, jax.core.Tracer) and concrete(value) == 0


def check_only_adaptive_defaults(adaptation: Adaptation) -> None:
    """Raises for a step-control setting of the adaptive `ekfac` given with
    a `learning_rate`, which has no use for it: one that is not its default
    (traced values were checked when `init` ran)."""
    for name in (
        "initial_damping",
        "min_damping",
        "max_damping",
        "damping_decay",
        "damping_adaptation_interval",
        "max_momentum",
    ):
        value = getattr(adaptation, name)
        default = getattr(ADAPTATION, name)
        # Relative: optax.inject_hyperparams hands the defaults over as
        # float32 arrays.
        if not isinstance(value, jax.core.Tracer) and not np.isclose(
            concrete(value), default, rtol=1e-6, atol=0
        ):
            raise error(
                EKFAC,
                f"{name}={value!r} only applies to the adaptive ekfac (no "
                "learning_rate), which adapts the damping and momentum; "
                "ekfac_sgd(layers, learning_rate, ...) has a fixed damping and "
                f"momentum. Leave {name} out, or drop learning_rate.",
                TypeError,
            )


def checked_fixed_rate(fixed: FixedRate) -> FixedRate:
    """Raises unless `ekfac_sgd`'s own settings are in range."""
    if fixed.nesterov and fixed.momentum is None:
        raise error(
            EKFAC_SGD,
            "nesterov=True needs a momentum (got momentum=None, no momentum); "
            "pass momentum=0.9, say, or leave nesterov out.",
        )
    rules = {
        "momentum": (fixed.momentum, "in [0, 1) or None (no momentum)", 0, 1),
        "damping": (fixed.damping, "> 0", 0, math.inf),
        "weight_decay": (fixed.weight_decay, ">= 0", 0, math.inf),
        "norm_constraint": (fixed.norm_constraint, "> 0 or None (none)", 0, math.inf),
    }
    for name, (value, rule, low, high) in rules.items():
        _check_range(EKFAC_SGD, name, value, rule, low, high)
    return fixed


def _check_range(owner, name, value, rule, low, high) -> None:
    """Raises unless `value` (None, traced, or a number in the range) is
    allowed; lows are inclusive for momenta and weight decay."""
    if value is None or isinstance(value, jax.core.Tracer) or callable(value):
        return
    inclusive_low = name in ("momentum", "max_momentum", "weight_decay")
    number = concrete(value) if jnp.ndim(value) == 0 else None
    if not (
        isinstance(number, numbers.Real)
        and not isinstance(number, bool)
        and (low <= number if inclusive_low else low < number)
        and number < high
    ):
        raise error(owner, f"{name} must be {rule}, got {value!r}.")


def checked_adaptation(adaptation: Adaptation) -> Adaptation:
    """Raises unless the adaptive `ekfac`'s settings are in range.

    Values known now are checked: Python and NumPy numbers and concrete 0-d
    arrays (what `optax.inject_hyperparams` passes to `init`); traced ones
    (what it passes to a jitted `update`) were checked then.
    """
    rules = {
        "momentum": (adaptation.momentum, "in [0, 1) or None (adapted)", 0, 1),
        "damping": (adaptation.damping, "> 0 or None (adapted)", 0, math.inf),
        "initial_damping": (adaptation.initial_damping, "> 0", 0, math.inf),
        "min_damping": (adaptation.min_damping, "> 0", 0, math.inf),
        "max_damping": (adaptation.max_damping, "> 0", 0, math.inf),
        "damping_decay": (adaptation.damping_decay, "in (0, 1)", 0, 1),
        "max_momentum": (adaptation.max_momentum, "in [0, 1)", 0, 1),
        "weight_decay": (adaptation.weight_decay, ">= 0", 0, math.inf),
    }
    for name, (value, rule, low, high) in rules.items():
        _check_range(EKFAC, name, value, rule, low, high)
    interval = adaptation.damping_adaptation_interval
    if not _is_integer(interval):
        raise error(
            EKFAC,
            f"damping_adaptation_interval must be an integer >= 1, got {interval!r}.",
        )
    bounds = [
        concrete(getattr(adaptation, name))
        for name in ("min_damping", "initial_damping", "max_damping")
    ]
    if None not in bounds and not bounds[0] <= bounds[1] <= bounds[2]:
        raise error(
            EKFAC,
            "initial_damping must lie in [min_damping, max_damping], got "
            f"{adaptation.initial_damping} outside [{adaptation.min_damping}, "
            f"{adaptation.max_damping}].",
        )
    return adaptation


# --- the batch and the losses of the capture -------------------------------------


def split_aux(result: Any, has_aux: bool) -> tuple[Any, Any]:
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


def _leading_sizes(batch: tuple) -> set[int]:
    """The leading sizes of the batch arguments that have an axis."""
    return {jnp.shape(leaf)[0] for leaf in jax.tree.leaves(batch) if jnp.ndim(leaf)}


def batch_size(batch: tuple, loss_shape: tuple[int, ...]) -> int | None:
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


def check_loss_terms(loss_shape: tuple[int, ...], batch: tuple) -> None:
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


def _is_integer(value: Any) -> bool:
    """An integer >= 1: a Python or NumPy integer, a 0-d integer array (a
    concrete one at least 1), or a traced 0-d integer."""
    if isinstance(value, bool) or np.ndim(value) != 0:
        return False
    if isinstance(value, numbers.Integral):
        return int(value) >= 1
    dtype = getattr(value, "dtype", None)
    if dtype is None or not jnp.issubdtype(dtype, jnp.integer):
        return False
    number = concrete(value)
    return number is None or number >= 1
