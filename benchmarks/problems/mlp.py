"""Benchmark 2: an MLP classifier on sklearn's digits, and EKFAC's step cost.

Two parts, one process:

1. Convergence: a 64-256-256-10 ReLU MLP, batch 256, trained by EKFAC, KFAC,
   Adam and SGD with momentum, each over a small sweep (`running.compare`).
2. Step cost: the median and mean step time of EKFAC (statistics every step,
   and every 10 steps; eigenbases every 10) against Adam's at several batch
   sizes, the steps taking turns; next to it the FLOP model of the issue
   (`cost.flop_model`), and where EKFAC's time goes (`cost.profile_ekfac`).

It checks the issue's targets and says which are met.

Usage:
    python -m benchmarks.problems.mlp [--quick] [--out benchmarks/results]
"""

import dataclasses
import statistics
from collections.abc import Callable, Sequence

import flax.linen as nn
import jax

import optax_ekfac as oek
from benchmarks.harness import cli, cost, data, reporting, running, specs, storage
from benchmarks.harness.records import BenchmarkResult, Comparison, Target

EIGEN_UPDATE_EVERY = 10


class MLP(nn.Module):
    """Dense layers with ReLU between them, then a Dense to the logits."""

    hidden: Sequence[int] = (256, 256)
    num_classes: int = 10

    @nn.compact
    def __call__(self, x):
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def problem(batch_size: int = 256, seed: int = 0) -> specs.Problem:
    """Standardized digits, softmax cross-entropy, target train loss 4e-4
    (the training set memorized), as in the step-control issue."""
    x_train, y_train, x_test, y_test = data.digits(seed)
    x_train, x_test = data.standardized(x_train, x_test)
    model = MLP()

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    return specs.Problem(
        name="mlp",
        title="MLP 64-256-256-10 on digits",
        loss_fn=loss_fn,
        params=model.init(jax.random.key(seed), x_train[:1])["params"],
        train=(x_train, y_train),
        test=(x_test, y_test),
        batch_size=batch_size,
        target_loss=4e-4,
    )


def optimizers(quick: bool) -> list[specs.Optimizer]:
    """The four optimizers; the quick sweep keeps two settings of each."""
    adam_learning_rates = [1e-3, 3e-3, 1e-2, 3e-2]
    sgd_learning_rates = [0.03, 0.1, 0.3, 1.0]
    return specs.standard_optimizers(
        adam_learning_rates=adam_learning_rates,
        sgd_learning_rates=sgd_learning_rates,
        quick_settings=slice(1, 3) if quick else None,
    )


@dataclasses.dataclass(frozen=True)
class StepCost:
    """Adam's and EKFAC's step times at one batch size, next to the FLOP model.

    The dicts are keyed by variant: `"Adam"`, `"EKFAC stats every 1"`,
    `"EKFAC stats every 10"` (the FLOP model's by `"stats every 1"`, ...).

    Attributes:
        batch_size: examples per step.
        median_ms: measured median milliseconds per step.
        mean_ms: measured mean milliseconds per step.
        median_ratio_to_adam: `median_ms` over Adam's.
        mean_ratio_to_adam: `mean_ms` over Adam's.
        flop_model: the issue's FLOP model's terms (`cost.flop_model`).
        predicted_ratio_to_adam: its EKFAC/Adam ratio.
        counted_flop_model: the model with every multiply-add as 2 FLOPs.
        counted_predicted_ratio_to_adam: its EKFAC/Adam ratio.
        adam_gflops_per_second: Adam's throughput under the issue's model.
        profile_ms: where one EKFAC refresh step's time goes
            (`cost.profile_ekfac`, statistics every step; empty where not
            profiled).
        profile_predicted_ms: the counted model's pieces at the
            forward/backward's measured throughput (empty likewise).
    """

    batch_size: int
    median_ms: dict[str, float]
    mean_ms: dict[str, float]
    median_ratio_to_adam: dict[str, float]
    mean_ratio_to_adam: dict[str, float]
    flop_model: dict[str, dict[str, float]]
    predicted_ratio_to_adam: dict[str, float]
    counted_flop_model: dict[str, dict[str, float]]
    counted_predicted_ratio_to_adam: dict[str, float]
    adam_gflops_per_second: float
    profile_ms: dict[str, float]
    profile_predicted_ms: dict[str, float]


def step_cost(
    batch_sizes: Sequence[int],
    rounds: int,
    profile_rounds: int,
    seed: int = 0,
    make_problem: Callable[[int, int], specs.Problem] = problem,
) -> list[StepCost]:
    """Adam's and EKFAC's step times at each batch size, the FLOP model's
    prediction, and EKFAC's profile: one `StepCost` per batch size.

    Args:
        batch_sizes: examples per step, one row each.
        rounds: rounds of interleaved timings (of 10 steps each variant).
        profile_rounds: rounds of `cost.profile_ekfac` (0: no profile).
        seed: the initialization and mini-batch order.
        make_problem: `make_problem(batch_size, seed)` -> the problem
            (default: this module's digits MLP).
    """
    rows = []
    for batch_size in batch_sizes:
        bench = make_problem(batch_size, seed)
        indices = data.batch_indices(
            len(bench.train[0]), batch_size, 2 * EIGEN_UPDATE_EVERY, seed
        )
        first_batch = tuple(array[indices[0]] for array in bench.train)
        layers = oek.Curvature(bench.loss_fn).layers(bench.params, *first_batch)
        train_data = jax.device_put(bench.train)
        indices = [jax.device_put(row) for row in indices]
        hyperparameters = {"learning_rate": 1e-3, "damping": 3e-3}
        variants = {
            "Adam": specs.adam([1e-3]),
            "EKFAC stats every 1": specs.ekfac(
                [hyperparameters], eigen_update_every=EIGEN_UPDATE_EVERY
            ),
            "EKFAC stats every 10": specs.ekfac(
                [hyperparameters],
                eigen_update_every=EIGEN_UPDATE_EVERY,
                stats_update_every=10,
            ),
            # The recommended optimizer: adapted step size, momentum and
            # damping (statistics every step, eigenbases every 10).
            "EKFAC defaults": specs.ekfac_defaults(),
        }
        calls = {
            name: cost.stepper(
                running.TrainStep(bench, optimizer, layers),
                bench.params,
                running.initial_state(optimizer, layers, bench.params),
                running.hyperparameter_arrays(optimizer.sweep[0]),
                train_data,
                indices,
            )
            for name, optimizer in variants.items()
        }
        # Warm-up: compiles, and runs one full period (eigh included).
        cost.interleaved_timings(calls, 1, EIGEN_UPDATE_EVERY)
        seconds = cost.interleaved_timings(calls, rounds, EIGEN_UPDATE_EVERY)
        median_ms = {k: 1e3 * statistics.median(v) for k, v in seconds.items()}
        mean_ms = {k: 1e3 * statistics.fmean(v) for k, v in seconds.items()}
        models, counted_models = (
            {
                every: cost.flop_model(
                    layers,
                    batch_size,
                    stats_update_every=every,
                    eigen_update_every=EIGEN_UPDATE_EVERY,
                    counted=counted,
                )
                for every in (1, 10)
            }
            for counted in (False, True)
        )
        predicted, counted_predicted = (
            {
                f"EKFAC stats every {every}": model["ekfac"] / model["adam"]
                for every, model in flop_models.items()
            }
            for flop_models in (models, counted_models)
        )
        profile: dict[str, float] = {}
        profile_predicted: dict[str, float] = {}
        if profile_rounds:
            profile = cost.profile_ekfac(
                bench.loss_fn,
                bench.params,
                first_batch,
                damping=hyperparameters["damping"],
                rounds=profile_rounds,
            )
            # One refresh step, not amortized, at the forward/backward's
            # throughput.
            refresh_flops = cost.flop_model(
                layers,
                batch_size,
                stats_update_every=1,
                eigen_update_every=1,
                counted=True,
            )
            flops_per_ms = (
                refresh_flops["forward_backward"] / profile["forward_backward"]
            )
            profile_predicted = {
                part: refresh_flops[part] / flops_per_ms for part in cost.PARTS
            }
        rows.append(
            StepCost(
                batch_size=batch_size,
                median_ms=median_ms,
                mean_ms=mean_ms,
                median_ratio_to_adam={
                    k: v / median_ms["Adam"] for k, v in median_ms.items()
                },
                mean_ratio_to_adam={k: v / mean_ms["Adam"] for k, v in mean_ms.items()},
                flop_model={f"stats every {k}": v for k, v in models.items()},
                predicted_ratio_to_adam=predicted,
                counted_flop_model={
                    f"stats every {k}": v for k, v in counted_models.items()
                },
                counted_predicted_ratio_to_adam=counted_predicted,
                adam_gflops_per_second=models[1]["adam"] / mean_ms["Adam"] / 1e6,
                profile_ms=profile,
                profile_predicted_ms=profile_predicted,
            )
        )
    return rows


def report_step_cost(
    rows: Sequence[StepCost], title: str = "MLP 64-256-256-10"
) -> None:
    """Prints measured times next to the FLOP model, and the profiles."""
    print(
        f"\nStep cost, {title} (eigenbases every 10 steps; the steps "
        "take turns in blocks of 10)"
    )
    print(
        f"{'batch':>6} {'variant':<22}{'median ms':>10}{'mean ms':>9}"
        f"{'median/Adam':>12}{'mean/Adam':>10}{'model':>7}{'mean/model':>11}"
        f"{'counted':>8}{'mean/counted':>13}"
    )
    for row in rows:
        for name, median in row.median_ms.items():
            model = row.predicted_ratio_to_adam.get(name, 1.0)
            counted = row.counted_predicted_ratio_to_adam.get(name, 1.0)
            mean_ratio = row.mean_ratio_to_adam[name]
            print(
                f"{row.batch_size:>6} {name:<22}{median:>10.2f}"
                f"{row.mean_ms[name]:>9.2f}"
                f"{row.median_ratio_to_adam[name]:>12.2f}{mean_ratio:>10.2f}"
                f"{model:>7.2f}{mean_ratio / model:>11.2f}"
                f"{counted:>8.2f}{mean_ratio / counted:>13.2f}"
            )
        flops = row.flop_model["stats every 1"]
        print(
            f"{'':>6} issue's FLOP model (MFLOP/step, stats every 1): "
            + ", ".join(f"{part} {flops[part] / 1e6:.1f}" for part in cost.PARTS)
            + f"; Adam runs at {row.adam_gflops_per_second:.1f} GFLOP/s"
        )
        profile = row.profile_ms
        predicted = row.profile_predicted_ms
        if not profile:
            continue
        print(
            f"{'':>6} profile of one refresh step, ms measured [counted model at "
            "the forward/backward's throughput]: "
            + ", ".join(
                f"{part} {profile[part]:.2f} [{predicted[part]:.2f}]"
                for part in cost.PARTS
            )
            + f", capture overhead {profile['capture']:.2f}"
            + f", Adam's update {profile['adam_update']:.2f}"
        )
    print(
        "model: the issue's FLOP model's EKFAC/Adam ratio; counted: the same with "
        "every multiply-add counted as 2 FLOPs. Both amortize the refresh steps, "
        "so they predict the ratio of mean step times."
    )


def step_cost_targets(rows: Sequence[StepCost]) -> list[Target]:
    """The issue's step-time targets, checked."""
    targets = []
    largest = max(rows, key=lambda row: row.batch_size)
    name = "EKFAC stats every 10"
    median_ratio = largest.median_ratio_to_adam[name]
    mean_ratio = largest.mean_ratio_to_adam[name]
    targets.append(
        Target(
            f"mlp: EKFAC median step <= 1.6 x Adam's at batch "
            f"{largest.batch_size}, statistics and eigenbases every 10 steps",
            median_ratio <= 1.6,
            f"median ratio {median_ratio:.2f}; mean ratio {mean_ratio:.2f}",
        )
    )
    for row in rows:
        for name, model in row.predicted_ratio_to_adam.items():
            ratio = row.mean_ratio_to_adam[name] / model
            targets.append(
                Target(
                    f"mlp: batch {row.batch_size}, {name}: measured step "
                    "within 1.5 x the FLOP model's prediction",
                    ratio <= 1.5,
                    f"measured mean ratio {row.mean_ratio_to_adam[name]:.2f}, "
                    f"model {model:.2f}, measured/model {ratio:.2f}",
                )
            )
    return targets


def convergence_targets(comparison: Comparison) -> tuple[Target, ...]:
    """The issue's: EKFAC's wall-clock to the target no more than Adam's best."""
    return (reporting.time_to_target(comparison, fraction=1.0),)


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    parser = cli.arguments(__doc__)
    parser.add_argument(
        "--batch-sizes",
        type=int,
        nargs="+",
        default=None,
        help="batch sizes of the step-cost part",
    )
    parser.add_argument("--no-convergence", action="store_true")
    cli.seeds_argument(parser)
    args = parser.parse_args(argv)
    running.limit_blas_threads()
    steps = args.steps or (60 if args.quick else 400)
    batch_sizes = args.batch_sizes or ([1024] if args.quick else [128, 256, 1024])

    comparisons: list = []
    targets: list[Target] = []
    if not args.no_convergence:
        comparisons, checked = cli.compare_over_seeds(
            args, problem, optimizers, specs.Settings(steps=steps), convergence_targets
        )
        targets += checked
    rows = step_cost(
        batch_sizes,
        rounds=2 if args.quick else 10,
        profile_rounds=2 if args.quick else 10,
    )
    report_step_cost(rows)
    targets += step_cost_targets(rows)
    print()
    reporting.print_targets(targets)
    if comparisons:
        result = cli.seeded_result(comparisons, targets, {"step_cost": rows})
    else:
        result = BenchmarkResult("mlp", None, {"step_cost": rows}, tuple(targets))
    storage.save(result, args.out)
    return result


if __name__ == "__main__":
    main()
