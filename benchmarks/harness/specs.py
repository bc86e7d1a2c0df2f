"""What a benchmark compares: the problem, the optimizers and their sweeps,
and how long to train.

A `Problem` is a Flax model's per-example `loss_fn`, its initial parameters and
offline data; an `Optimizer` builds an optax transformation from
hyperparameters and names the few values of its sweep; `Settings` say how many
steps to train and how often to evaluate. `running.compare` takes all three.
"""

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax

import optax_ekfac as oek

Hyperparameters = Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model, its loss and its data.

    Attributes:
        name: short identifier, used for file names.
        title: one line for reports and plots.
        loss_fn: `loss_fn(params, *batch)` -> unreduced per-example losses
            (`[N]`, or `[B, T]` token losses), as `optax_ekfac.Curvature` takes.
        params: the initial parameters, shared by every run.
        train: training arrays, each with a leading example axis.
        test: held-out arrays, in the same layout.
        batch_size: examples per step.
        target_loss: the training loss whose first crossing is timed.
        eval_size: how many training examples the training loss is evaluated
            on (None: all of them).
    """

    name: str
    title: str
    loss_fn: Callable[..., jax.Array]
    params: optax.Params
    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    batch_size: int
    target_loss: float
    eval_size: int | None = None

    @property
    def num_eval(self) -> int:
        """How many examples the losses are evaluated on: `eval_size`, or
        every training example."""
        return self.eval_size or len(self.train[0])


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer and its sweep.

    Attributes:
        name: label in reports.
        make: `make(layers, **hyperparameters)` -> an optax transformation.
            Called inside the traced step with the hyperparameters as traced
            scalars, and outside it (with floats) to initialize the state.
        sweep: the hyperparameter settings to run.
        uses_stats: the transformation takes `stats=` from
            `Curvature.value_grad_and_stats` (EKFAC, KFAC).
        fisher_type: the `Curvature`'s Fisher, `"empirical"` or `"mc"`
            (labels sampled from the model, a fresh key every step).
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    sweep: tuple[Hyperparameters, ...]
    uses_stats: bool = False
    fisher_type: str = "empirical"


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long to train and how often to look.

    Attributes:
        steps: timed training steps per run.
        warmup_steps: untimed steps of a discarded run before each timed run.
        eval_every: steps between evaluations of the training loss.
        seed: seed of the mini-batch order.
    """

    steps: int
    warmup_steps: int = 5
    eval_every: int = 10
    seed: int = 0


def adam(learning_rates: Sequence[float]) -> Optimizer:
    """`optax.adam` over a sweep of learning rates."""
    return Optimizer(
        "Adam",
        lambda layers, learning_rate: optax.adam(learning_rate),
        tuple({"learning_rate": lr} for lr in learning_rates),
    )


def sgd(learning_rates: Sequence[float], momentum: float = 0.9) -> Optimizer:
    """`optax.sgd` with heavy-ball momentum over a sweep of learning rates."""
    return Optimizer(
        "SGD",
        lambda layers, learning_rate: optax.sgd(learning_rate, momentum=momentum),
        tuple({"learning_rate": lr} for lr in learning_rates),
    )


def ekfac(
    sweep: Sequence[Hyperparameters],
    *,
    eigenvalue_correction: bool = True,
    momentum: float = 0.9,
    fisher_type: str = "empirical",
    **settings: Any,
) -> Optimizer:
    """`optax_ekfac.ekfac` (or KFAC on the same code path) over a sweep.

    Args:
        sweep: settings of `learning_rate` and `damping`.
        eigenvalue_correction: True for EKFAC, False for KFAC.
        momentum: momentum of the preconditioned direction.
        fisher_type: `"empirical"` or `"mc"` (see `optax_ekfac.Curvature`).
        **settings: fixed keyword arguments of `optax_ekfac.scale_by_ekfac`.
    """

    def make(layers, learning_rate, damping):
        # No norm constraint: the sweeps' numbers are those of the plain
        # fixed-rate chain.
        return oek.ekfac_sgd(
            layers,
            learning_rate,
            momentum=momentum,
            damping=damping,
            norm_constraint=None,
            eigenvalue_correction=eigenvalue_correction,
            **settings,
        )

    name = "EKFAC" if eigenvalue_correction else "KFAC"
    return Optimizer(name, make, tuple(sweep), uses_stats=True, fisher_type=fisher_type)


def ekfac_defaults(
    *, eigenvalue_correction: bool = True, fisher_type: str = "mc", **settings: Any
) -> Optimizer:
    """`optax_ekfac.ekfac(layers)`: adapted step size, momentum and damping,
    nothing swept.

    Args:
        eigenvalue_correction: True for EKFAC, False for KFAC under the same
            step control.
        fisher_type: the `Curvature`'s Fisher; `"mc"` (sampled labels, a
            fresh key every step) is the one recommended with the adaptive
            step.
        **settings: keyword arguments of `optax_ekfac.ekfac` that describe the
            model rather than tune the optimizer (`weight_sharing`).
    """

    def make(layers):
        return oek.ekfac(
            layers, eigenvalue_correction=eigenvalue_correction, **settings
        )

    name = "EKFAC" if eigenvalue_correction else "KFAC"
    return Optimizer(name, make, ({},), uses_stats=True, fisher_type=fisher_type)


def standard_optimizers(
    *,
    adam_learning_rates: Sequence[float],
    sgd_learning_rates: Sequence[float],
    quick_settings: slice | None = None,
    **ekfac_settings: Any,
) -> list[Optimizer]:
    """EKFAC and KFAC with their defaults (the same step control), Adam and
    SGD with momentum over their sweeps.

    `quick_settings` keeps that slice of the Adam and SGD sweeps (a `--quick`
    run). `ekfac_settings` (keyword arguments of `optax_ekfac.ekfac` that
    describe the model, such as `weight_sharing`) apply to EKFAC and KFAC.
    """
    if quick_settings is not None:
        adam_learning_rates = adam_learning_rates[quick_settings]
        sgd_learning_rates = sgd_learning_rates[quick_settings]
    return [
        ekfac_defaults(**ekfac_settings),
        ekfac_defaults(eigenvalue_correction=False, **ekfac_settings),
        adam(adam_learning_rates),
        sgd(sgd_learning_rates),
    ]
