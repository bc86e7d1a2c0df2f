"""Where clipping and weight decay go relative to `scale_by_ekfac`.

The digits MLP benchmark's problem (64-256-256-10, batch 256), the
fixed-learning-rate EKFAC (`scale_by_ekfac` at damping 1e-3, then
`optax.sgd` with momentum 0.9) over one sweep of learning rates, chained:

* alone;
* with `optax.clip_by_global_norm(1.0)` before `scale_by_ekfac` (the gradient
  is clipped: the README's recommendation);
* with the same clipping after it (the preconditioned direction is clipped,
  the mistake the issue reports: training nearly stops);
* with decoupled weight decay 1e-4, `add_decayed_weights` between it and
  `sgd` (the README's recommendation);
* followed by `optax.adamw` instead of `sgd` (the mistake the issue
  reports), over Adam's learning rates;

and `optax.adamw` alone. Rows (`EK` is `scale_by_ekfac`, then `sgd` unless
named): `EK`, `clip+EK`, `EK+clip`, `EK+wd`, `EK+AdamW`, `AdamW`; each the
best setting of its sweep, over `--seeds` seeds. Run
`python -m benchmarks.studies.chain_order [--quick]`.
"""

import dataclasses
from collections.abc import Sequence

import optax

import optax_ekfac as oek
from benchmarks.harness import cli, records, specs
from benchmarks.problems import mlp

EKFAC_LEARNING_RATES = (0.001, 0.003, 0.01, 0.03)
ADAM_LEARNING_RATES = (3e-4, 1e-3, 3e-3, 1e-2)
DAMPING = 1e-3
MAX_NORM = 1.0
WEIGHT_DECAY = 1e-4


def _chained(name: str, make_chain, learning_rates: Sequence[float]) -> specs.Optimizer:
    """`make_chain(preconditioner, learning_rate)` over a sweep."""

    def make(layers, learning_rate):
        return make_chain(oek.scale_by_ekfac(layers, damping=DAMPING), learning_rate)

    sweep = tuple({"learning_rate": lr} for lr in learning_rates)
    return specs.Optimizer(name, make, sweep, uses_stats=True)


def optimizers(quick: bool) -> list[specs.Optimizer]:
    """The chains; the quick sweep keeps two learning rates of each."""
    ekfac_rates = EKFAC_LEARNING_RATES[1:3] if quick else EKFAC_LEARNING_RATES
    adam_rates = ADAM_LEARNING_RATES[1:3] if quick else ADAM_LEARNING_RATES

    def sgd(learning_rate):
        return optax.sgd(learning_rate, momentum=0.9)

    clip = optax.clip_by_global_norm(MAX_NORM)
    return [
        _chained("EK", lambda p, lr: optax.chain(p, sgd(lr)), ekfac_rates),
        _chained("clip+EK", lambda p, lr: optax.chain(clip, p, sgd(lr)), ekfac_rates),
        _chained("EK+clip", lambda p, lr: optax.chain(p, clip, sgd(lr)), ekfac_rates),
        _chained(
            "EK+wd",
            lambda p, lr: optax.chain(
                p, optax.add_decayed_weights(WEIGHT_DECAY), sgd(lr)
            ),
            ekfac_rates,
        ),
        _chained(
            "EK+AdamW",
            lambda p, lr: optax.chain(p, optax.adamw(lr, weight_decay=WEIGHT_DECAY)),
            adam_rates,
        ),
        specs.Optimizer(
            "AdamW",
            lambda layers, learning_rate: optax.adamw(
                learning_rate, weight_decay=WEIGHT_DECAY
            ),
            tuple({"learning_rate": lr} for lr in adam_rates),
        ),
    ]


def main(argv: Sequence[str] | None = None) -> records.BenchmarkResult:
    return cli.convergence_main(
        argv,
        __doc__,
        _problem,
        optimizers,
        steps=300,
        quick_steps=40,
    )


def _problem(seed: int = 0) -> specs.Problem:
    """The digits MLP benchmark's problem, named for this benchmark."""
    problem = mlp.problem(seed=seed)
    return dataclasses.replace(
        problem, name="chain_order", title="Chain order: " + problem.title
    )


if __name__ == "__main__":
    main()
