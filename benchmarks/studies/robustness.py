"""Robustness: EKFAC with its defaults on every benchmark problem, at batch
sizes 1, 32, 256 and 1024, over three seeds; does any run diverge?

A run diverges when a training loss evaluated along the way is not finite,
or when its final training loss is above the initial one. Nothing is tuned
per problem or per batch size: `optax_ekfac.ekfac(layers)` and the sampled
Fisher, as the convergence benchmarks run them.

Usage:
    python -m benchmarks.studies.robustness [--quick] [--steps N] [--out DIR]
"""

import dataclasses
import math
from collections.abc import Sequence

from benchmarks.harness import cli, reporting, running, specs, storage
from benchmarks.harness.records import BenchmarkResult, Target
from benchmarks.problems import autoencoder, cnn, mlp

PROBLEMS = {
    "autoencoder": autoencoder.problem,
    "mlp": mlp.problem,
    "cnn": cnn.problem,
    "transformer": None,  # imported lazily: its data takes a while to build
}
BATCH_SIZES = (1, 32, 256, 1024)


@dataclasses.dataclass(frozen=True)
class Trial:
    """One run of EKFAC's defaults.

    Attributes:
        problem: the benchmark's name.
        batch_size: examples per step.
        seed: the initialization, data split and batch order.
        steps: training steps.
        initial_loss: the training loss before the first step.
        final_loss: the training loss after the last step.
        diverged: a loss along the way was not finite, or the final loss is
            above the initial one.
    """

    problem: str
    batch_size: int
    seed: int
    steps: int
    initial_loss: float
    final_loss: float
    diverged: bool


def problem_of(name: str, batch_size: int, seed: int) -> specs.Problem:
    """The benchmark problem `name` at `batch_size` and `seed`."""
    if name == "transformer":
        from benchmarks import transformer

        return transformer.problem(batch_size=batch_size, seed=seed)
    return PROBLEMS[name](batch_size=batch_size, seed=seed)


def trial(name: str, batch_size: int, seed: int, steps: int) -> Trial:
    """Trains EKFAC's defaults for `steps` steps and says whether it diverged."""
    problem = problem_of(name, batch_size, seed)
    settings = specs.Settings(
        steps=steps, warmup_steps=1, eval_every=max(1, steps // 5), seed=seed
    )
    optimizer = specs.ekfac_defaults(
        **({"weight_sharing": "reduce"} if name == "cnn" else {})
    )
    workload = running.prepare(problem, settings)
    run = running.run_setting(
        running.TrainStep(problem, optimizer, workload.layers),
        workload,
        opt_state=running.initial_state(optimizer, workload.layers, problem.params),
        hyperparameters={},
    )
    initial, final = run.curve.train_loss[0], run.final_train_loss
    return Trial(
        problem=name,
        batch_size=batch_size,
        seed=seed,
        steps=steps,
        initial_loss=initial,
        final_loss=final,
        diverged=run.diverged or not math.isfinite(final) or final > initial,
    )


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    parser = cli.arguments(__doc__)
    cli.seeds_argument(parser)
    args = parser.parse_args(argv)
    running.limit_blas_threads()
    steps = args.steps or (10 if args.quick else 50)
    seeds = range(args.seeds or (1 if args.quick else 3))
    trials = []
    print(f"{'problem':<12}{'batch':>6}{'seed':>5}{'initial':>11}{'final':>11}")
    for name in PROBLEMS:
        for batch_size in BATCH_SIZES:
            for seed in seeds:
                result = trial(name, batch_size, seed, steps)
                trials.append(result)
                print(
                    f"{name:<12}{batch_size:>6}{seed:>5}"
                    f"{result.initial_loss:>11.3e}{result.final_loss:>11.3e}"
                    + ("  DIVERGED" if result.diverged else ""),
                    flush=True,
                )
    diverged = [t for t in trials if t.diverged]
    target = Target(
        f"EKFAC defaults: no divergence at batch sizes {BATCH_SIZES}, "
        f"{len(seeds)} seeds, every problem, {steps} steps",
        not diverged,
        f"{len(diverged)} of {len(trials)} runs diverged"
        + "".join(
            f"; {t.problem} batch {t.batch_size} seed {t.seed}" for t in diverged
        ),
    )
    reporting.print_targets([target])
    result = BenchmarkResult(
        "robustness", sections={"trials": trials}, targets=(target,)
    )
    storage.save(result, args.out)
    return result


if __name__ == "__main__":
    main()
