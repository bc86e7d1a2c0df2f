"""Benchmark: the autoencoder, the MLP and the transformer LM at large batches.

The regime EKFAC is for: the autoencoder at batch 256 and 1024 (kfac-jax
adaptive side by side at both, where its environment exists, see
`benchmarks.kfac_jax`), the MLP at batch 1024, the transformer LM at 128
sequences of 64 characters (8192 token rows per step). Each problem is the
module's own (`autoencoder.problem`, `mlp.problem`, `transformer.problem`) at
that batch size. EKFAC runs with its defaults (`optax_ekfac.ekfac(layers)`,
the sampled Fisher: its curvature from at most `optax_ekfac.curvature_terms`
loss terms of each batch, the gradient from the whole batch) against Adam's
sweep, side by side in one process on every seed. SGD and KFAC are left out:
the issue's targets are against Adam and kfac-jax, and the other benchmarks
run them at batch 256.

The table gives, per problem and batch, EKFAC's steps to the target (Adam's
best's beside them), its mean step over Adam's, its time to the target over
Adam's best and over kfac-jax's, the first call of its jitted step (the
compilation) over Adam's, and its compiled peak memory over Adam's: medians
over the seeds with [min, max]. A compile-only check gives the autoencoder's
step memory at batch 4096. The issue's targets are printed MET, MISSED or NOT
MEASURABLE over the seeds.

Usage:
    python -m benchmarks.problems.large_batch [--quick] [--seeds N] [--steps N]
        [--only autoencoder_1024 transformer_128x64 memory_4096 ...] [--out DIR]
"""

import argparse
import dataclasses
import functools
import math
import pathlib
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax

from benchmarks import kfac_jax
from benchmarks.harness import cli, reporting, running, specs, storage
from benchmarks.harness.records import BenchmarkResult, Comparison, Memory, Target
from benchmarks.problems import autoencoder, mlp, transformer

NAME = "large_batch"
MEMORY_CHECK = "memory_4096"
# The bounds.
AUTOENCODER_TIME_FRACTION = 0.5
AUTOENCODER_MEAN_STEP_RATIO = 2.5
TRANSFORMER_TIME_FRACTION = 0.7
TRANSFORMER_MEAN_STEP_RATIO = 1.7
COMPILE_RATIO = 3.0
MEMORY_RATIO = 1.5

# A kfac-jax side-by-side run (`kfac_jax.run`'s dict), or None where it did
# not run.
SideBySide = dict[str, Any] | None


@dataclasses.dataclass(frozen=True)
class Case:
    """One problem at one batch size, and the targets it is checked against.

    Attributes:
        name: problem and batch (`--only`, the targets, the JSON's keys).
        problem: `problem(seed=seed)` builds the problem at this batch size.
        adam_learning_rates: Adam's sweep.
        quick_adam: the part of the sweep a `--quick` run keeps.
        steps: training steps of a full run.
        quick_steps: training steps of a `--quick` run.
        targets: `targets(comparison, side_by_side)`: the issue's targets on
            one seed, given kfac-jax's run of that seed (None: not run).
        kfac_jax: kfac-jax adaptive runs side by side (its runner trains the
            autoencoder only).
    """

    name: str
    problem: Callable[..., specs.Problem]
    adam_learning_rates: tuple[float, ...]
    quick_adam: slice
    steps: int
    quick_steps: int
    targets: Callable[[Comparison, SideBySide], Sequence[Target]]
    kfac_jax: bool = False

    def named_problem(self, seed: int) -> specs.Problem:
        """The problem of `seed`, named after the case, so that the targets
        and files of one problem at two batch sizes are told apart."""
        return dataclasses.replace(self.problem(seed=seed), name=self.name)

    def optimizers(self, quick: bool) -> list[specs.Optimizer]:
        """EKFAC's defaults and Adam's sweep (a slice of it when quick)."""
        rates = self.adam_learning_rates[self.quick_adam if quick else slice(None)]
        return [specs.ekfac_defaults(), specs.adam(rates)]


def compile_target(comparison: Comparison) -> Target:
    """The first call of EKFAC's jitted step at most `COMPILE_RATIO` x Adam's."""
    return reporting.ratio_to_adam_at_most(
        comparison,
        "compile_ratio_to_adam",
        COMPILE_RATIO,
        "compile time (first call of the jitted step)",
    )


def mean_step_target(comparison: Comparison, bound: float) -> Target:
    """EKFAC's mean step time at most `bound` x Adam's."""
    return reporting.ratio_to_adam_at_most(
        comparison, "mean_step_ratio_to_adam", bound, "mean step time"
    )


def time_to_target_against_better(
    comparison: Comparison, side_by_side: SideBySide, fraction: float
) -> Target:
    """EKFAC's wall-clock to the target at most `fraction` of the better
    (shorter) of Adam's best and kfac-jax adaptive's.

    Where a reference did not reach the target, its time is only known to
    exceed its run's length: the target is then met if EKFAC beats that bound
    too, else not measurable. Without kfac-jax's run it is missed if EKFAC
    misses against Adam alone, else not measurable.
    """
    description = (
        f"{comparison.problem}: EKFAC wall-clock to train loss "
        f"{comparison.target_loss:g} <= {fraction:g} x the better of Adam's best "
        "and kfac-jax adaptive's"
    )
    against_adam = reporting.time_to_target(comparison, fraction=fraction)
    if side_by_side is None:
        return Target(
            description,
            False if against_adam.met is False else None,
            f"against Adam's best: {against_adam.detail}; kfac-jax not run",
        )
    seconds = comparison.summary["EKFAC"].seconds_to_target
    adam_seconds = comparison.summary["Adam"].seconds_to_target
    adam_bound = min(
        run.curve.seconds[-1] for run in comparison.optimizers["Adam"].runs
    )
    kfac_seconds = side_by_side["seconds_to_target"]
    kfac_bound = side_by_side["mean_step_seconds"] * side_by_side["steps"]
    references = [adam_seconds, kfac_seconds]
    # The better reference's time, or a lower bound of it where one missed.
    better = min(
        known if known is not None else bound
        for known, bound in ((adam_seconds, adam_bound), (kfac_seconds, kfac_bound))
    )
    exact = None not in references
    if seconds is None:
        met = False if references != [None, None] else None
        detail = "EKFAC did not reach it"
    else:
        ratio = seconds / better
        met = ratio <= fraction if exact else (True if ratio <= fraction else None)
        detail = (
            f"{seconds:.2f} s against {'' if exact else '>= '}{better:.2f} s, "
            f"ratio {ratio:.2f}"
        )
    return Target(
        description,
        met,
        f"{detail} (Adam's best {_seconds(adam_seconds, adam_bound)}, "
        f"kfac-jax {_seconds(kfac_seconds, kfac_bound)})",
    )


def _seconds(known: float | None, bound: float) -> str:
    """A reference's time to the target, or the bound it did not reach it in."""
    return f"{known:.2f} s" if known is not None else f"not in {bound:.2f} s"


def final_loss_against_kfac_jax(
    comparison: Comparison, side_by_side: SideBySide
) -> Target:
    """EKFAC's final training loss at most kfac-jax adaptive's, same steps."""
    description = (
        f"{comparison.problem}: EKFAC train loss after "
        f"{comparison.settings.steps} steps <= kfac-jax adaptive's"
    )
    loss = comparison.summary["EKFAC"].final_train_loss
    if side_by_side is None:
        return Target(description, None, f"{loss:.3g}; kfac-jax not run")
    kfac_loss = side_by_side["final_train_loss"]
    return Target(
        description,
        math.isfinite(loss) and loss <= kfac_loss,
        f"{loss:.3g} against {kfac_loss:.3g}",
    )


def autoencoder_256_targets(
    comparison: Comparison, side_by_side: SideBySide
) -> tuple[Target, ...]:
    """At batch 256 (kfac-jax's reference row): the compile time only."""
    return (compile_target(comparison),)


def autoencoder_1024_targets(
    comparison: Comparison, side_by_side: SideBySide
) -> tuple[Target, ...]:
    """The issue's: time to 2.0 at most half the better of Adam's best and
    kfac-jax's, mean step at most 2.5x Adam's, final loss at most kfac-jax's,
    compile time at most 3x Adam's."""
    return (
        time_to_target_against_better(
            comparison, side_by_side, AUTOENCODER_TIME_FRACTION
        ),
        mean_step_target(comparison, AUTOENCODER_MEAN_STEP_RATIO),
        final_loss_against_kfac_jax(comparison, side_by_side),
        compile_target(comparison),
    )


def mlp_1024_targets(
    comparison: Comparison, side_by_side: SideBySide
) -> tuple[Target, ...]:
    """The issue's: compile time at most 3x Adam's."""
    return (compile_target(comparison),)


def transformer_targets(
    comparison: Comparison, side_by_side: SideBySide
) -> tuple[Target, ...]:
    """The issue's: time to 1.8 at most 0.7x Adam's best, mean step at most
    1.7x Adam's."""
    return (
        reporting.time_to_target(comparison, fraction=TRANSFORMER_TIME_FRACTION),
        mean_step_target(comparison, TRANSFORMER_MEAN_STEP_RATIO),
    )


CASES: tuple[Case, ...] = (
    Case(
        "autoencoder_256",
        functools.partial(autoencoder.problem, batch_size=256),
        adam_learning_rates=(1e-3, 3e-3, 1e-2, 3e-2),
        quick_adam=slice(2, 3),
        # Enough for Adam's best to reach 2.0 at this batch.
        steps=600,
        quick_steps=20,
        targets=autoencoder_256_targets,
        kfac_jax=True,
    ),
    Case(
        "autoencoder_1024",
        functools.partial(autoencoder.problem, batch_size=1024),
        adam_learning_rates=(1e-3, 3e-3, 1e-2, 3e-2),
        quick_adam=slice(2, 3),
        steps=400,  # the final-loss target is after 400 steps
        quick_steps=20,
        targets=autoencoder_1024_targets,
        kfac_jax=True,
    ),
    Case(
        "mlp_1024",
        functools.partial(mlp.problem, batch_size=1024),
        adam_learning_rates=(1e-3, 3e-3, 1e-2, 3e-2),
        quick_adam=slice(2, 3),
        steps=400,
        quick_steps=20,
        targets=mlp_1024_targets,
    ),
    Case(
        "transformer_128x64",
        functools.partial(transformer.problem, batch_size=128),
        adam_learning_rates=(1e-3, 3e-3, 1e-2),
        quick_adam=slice(1, 2),
        steps=300,
        quick_steps=10,
        targets=transformer_targets,
    ),
)

# The compile-only memory check: the autoencoder's step at batch 4096.
MEMORY_BATCH_SIZE = 4096
memory_problem = functools.partial(autoencoder.problem, batch_size=MEMORY_BATCH_SIZE)


def loss_terms_per_step(problem: specs.Problem) -> int:
    """Loss terms of one mini-batch: examples, or token rows of `[B, T]`
    losses (from the loss's shape, nothing computed)."""
    batch = tuple(
        jax.ShapeDtypeStruct((problem.batch_size,) + x.shape[1:], x.dtype)
        for x in problem.train
    )
    return math.prod(jax.eval_shape(problem.loss_fn, problem.params, *batch).shape)


def run_case(
    case: Case, args: argparse.Namespace
) -> tuple[list[Comparison], list[SideBySide], tuple[Target, ...], int]:
    """Every seed of one case, kfac-jax side by side where the case has it;
    the targets over the seeds, and the loss terms per step."""
    side_by_side: dict[int, SideBySide] = {}
    terms: list[int] = []

    def problem(seed: int) -> specs.Problem:
        built = case.named_problem(seed)
        terms.append(loss_terms_per_step(built))
        return built

    def targets(comparison: Comparison) -> Sequence[Target]:
        # kfac-jax runs when a seed's targets are checked (after every seed's
        # comparison), on the same problem, batch size, seed and steps.
        seed = comparison.settings.seed
        if case.kfac_jax:
            side_by_side[seed] = kfac_jax.run(
                seed, comparison.settings.steps, batch_size=comparison.batch_size
            )
            describe_kfac_jax(side_by_side[seed], comparison)
        return case.targets(comparison, side_by_side.get(seed))

    steps = args.steps or (case.quick_steps if args.quick else case.steps)
    comparisons, checked = cli.compare_over_seeds(
        args, problem, case.optimizers, specs.Settings(steps=steps), targets
    )
    runs = [side_by_side.get(c.settings.seed) for c in comparisons]
    return comparisons, runs, checked, terms[0]


def describe_kfac_jax(run: SideBySide, comparison: Comparison) -> None:
    """Prints kfac-jax's side-by-side run next to Adam's best."""
    if run is None:
        return
    print(
        f"kfac-jax adaptive, {comparison.problem}, seed {run['seed']}: target at "
        f"{run['steps_to_target']} steps, {run['seconds_to_target']} s (Adam's "
        f"best: {comparison.summary['Adam'].seconds_to_target} s), mean step "
        f"{1e3 * run['mean_step_seconds']:.2f} ms, train loss after "
        f"{run['steps']} steps {run['final_train_loss']:.3g}, compiles "
        f"{run.get('compile_seconds', float('nan')):.1f} s (Adam's "
        f"{comparison.summary['Adam'].compile_seconds:.1f} s)"
    )


# The table's columns: key, header, format.
COLUMNS = (
    ("steps_to_target", "steps", "g"),
    ("adam_steps_to_target", "Adam steps", "g"),
    ("mean_step_ratio_to_adam", "mean step /Adam", ".2f"),
    ("time_to_target_ratio_to_adam_best", "to target /Adam", ".2f"),
    ("time_to_target_ratio_to_kfac_jax", "/kfac-jax", ".2f"),
    ("compile_ratio_to_adam", "compile /Adam", ".2f"),
    ("kfac_jax_compile_ratio_to_adam", "kfac-jax compile /Adam", ".2f"),
    ("peak_memory_ratio_to_adam", "memory /Adam", ".2f"),
)


def table_row(
    comparisons: Sequence[Comparison], side_by_side: Sequence[SideBySide]
) -> dict[str, list[float | None]]:
    """EKFAC's numbers of one case on every seed, by `COLUMNS` key."""
    ekfac = [c.summary["EKFAC"] for c in comparisons]
    row = {
        key: [getattr(summary, key) for summary in ekfac]
        for key, _, _ in COLUMNS
        if key
        not in (
            "adam_steps_to_target",
            "time_to_target_ratio_to_kfac_jax",
            "kfac_jax_compile_ratio_to_adam",
        )
    }
    row["adam_steps_to_target"] = [
        c.summary["Adam"].steps_to_target for c in comparisons
    ]
    row["time_to_target_ratio_to_kfac_jax"] = [
        summary.seconds_to_target / run["seconds_to_target"]
        if run and run["seconds_to_target"] and summary.seconds_to_target is not None
        else None
        for summary, run in zip(ekfac, side_by_side)
    ]
    row["kfac_jax_compile_ratio_to_adam"] = [
        run["compile_seconds"] / c.summary["Adam"].compile_seconds
        if run and run.get("compile_seconds") and c.summary["Adam"].compile_seconds
        else None
        for c, run in zip(comparisons, side_by_side)
    ]
    return row


def spread_json(values: Sequence[float | None]) -> dict[str, Any]:
    """Every seed's value, and the median, min and max of the known ones."""
    known = sorted(value for value in values if value is not None)
    return dict(
        values=list(values),
        median=statistics.median(known) if known else None,
        min=known[0] if known else None,
        max=known[-1] if known else None,
    )


def print_table(rows: dict[str, dict[str, Any]]) -> None:
    """One line per case: EKFAC's medians [min, max] over the seeds."""
    print("\nEKFAC per problem and batch: median [min, max] over the seeds")
    header = f"{'problem':<20}{'terms':>7}{'seeds':>6}" + "".join(
        f"{title:>22}" for _, title, _ in COLUMNS
    )
    print(header)
    for name, row in rows.items():
        print(
            f"{name:<20}{row['loss_terms_per_step']:>7}{row['seeds']:>6}"
            + "".join(
                f"{reporting.spread(row[key]['values'], spec):>22}"
                for key, _, spec in COLUMNS
            )
        )
    print(
        "terms: loss terms per batch (token rows for the transformer); steps: to "
        "the target; to target: seconds to it over Adam's best's and kfac-jax's; "
        "compile: the jitted step's first call; memory: the compiled step's peak."
    )


def memory_check() -> tuple[dict[str, Any], Target]:
    """The autoencoder's compiled step at batch 4096, EKFAC's defaults against
    Adam: peak memory (`running.step_memory`), compiled, not run."""
    problem = memory_problem(seed=0)
    memory: dict[str, Memory] = {
        optimizer.name: running.step_memory(problem, optimizer)
        for optimizer in (specs.ekfac_defaults(), specs.adam([1e-3]))
    }
    ekfac_bytes, adam_bytes = memory["EKFAC"].peak_bytes, memory["Adam"].peak_bytes
    ratio = ekfac_bytes / adam_bytes if ekfac_bytes and adam_bytes else None
    target = Target(
        f"{problem.name} at batch {problem.batch_size}: EKFAC's compiled step peak "
        f"memory <= {MEMORY_RATIO:g} x Adam's",
        None if ratio is None else ratio <= MEMORY_RATIO,
        "not reported by this backend"
        if ratio is None
        else f"{ekfac_bytes / 2**20:.1f} MB against {adam_bytes / 2**20:.1f} MB, "
        f"ratio {ratio:.2f}; compiled once: the same on every seed",
    )
    section = dict(
        problem=problem.name,
        batch_size=problem.batch_size,
        memory=memory,
        peak_memory_ratio_to_adam=ratio,
    )
    return section, target


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    names = [case.name for case in CASES] + [MEMORY_CHECK]
    parser = cli.arguments(__doc__, steps_help="training steps of every problem")
    cli.seeds_argument(parser)
    parser.add_argument("--only", nargs="+", choices=names, default=names)
    args = parser.parse_args(argv)
    running.limit_blas_threads()
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    cases: dict[str, Any] = {}
    rows: dict[str, dict[str, Any]] = {}
    targets: list[Target] = []
    for case in CASES:
        if case.name not in args.only:
            continue
        comparisons, side_by_side, checked, terms = run_case(case, args)
        reporting.print_targets(checked)
        targets += checked
        row = table_row(comparisons, side_by_side)
        rows[case.name] = dict(
            batch_size=comparisons[0].batch_size,
            loss_terms_per_step=terms,
            seeds=len(comparisons),
        ) | {key: spread_json(values) for key, values in row.items()}
        cases[case.name] = dict(
            loss_terms_per_step=terms,
            seeds=[c.summary for c in comparisons],
            kfac_jax=side_by_side,
            first_seed=comparisons[0],
        )
        path = storage.plot_curves(comparisons[0], out_dir / f"{NAME}_{case.name}.png")
        print(f"wrote {path}\n")
    sections: dict[str, Any] = dict(cases=cases, table=rows)
    if MEMORY_CHECK in args.only:
        sections["memory"], memory_target = memory_check()
        targets.append(memory_target)
    if rows:
        print_table(rows)
    print("\nTargets of the large-batch issue:")
    reporting.print_targets(targets)
    result = BenchmarkResult(NAME, None, sections, tuple(targets))
    storage.save(result, out_dir)
    return result


if __name__ == "__main__":
    main()
