"""The benchmarks' command lines: their shared options, and a convergence
benchmark's whole command (compare, report, check, save)."""

import argparse
import dataclasses
from collections.abc import Callable, Sequence

from benchmarks.harness import reporting, running, storage
from benchmarks.harness.records import BenchmarkResult, Comparison, Target
from benchmarks.harness.specs import Optimizer, Problem, Settings


def arguments(
    description: str | None, *, steps_help: str | None = "training steps"
) -> argparse.ArgumentParser:
    """The options the benchmarks share: `--quick`, `--out` and `--steps`.

    Args:
        description: the module's docstring; its first line is `--help`'s.
        steps_help: what `--steps` counts (None: no `--steps`).
    """
    # The first line of the docstring (none under `python -OO`).
    summary = description.splitlines()[0] if description else None
    parser = argparse.ArgumentParser(description=summary)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--out", default="benchmarks/results")
    if steps_help is not None:
        parser.add_argument("--steps", type=int, default=None, help=steps_help)
    return parser


def seeds_argument(parser: argparse.ArgumentParser) -> None:
    """Adds `--seeds`: how many seeds a convergence comparison runs."""
    parser.add_argument(
        "--seeds", type=int, default=None, help="seeds to run (default 3; quick 1)"
    )


def compare_over_seeds(
    args: argparse.Namespace,
    problem: Callable[..., Problem],
    optimizers: Callable[[bool], Sequence[Optimizer]],
    settings: Settings,
    targets: Callable[[Comparison], Sequence[Target]],
) -> tuple[list[Comparison], tuple[Target, ...]]:
    """Every seed's comparison, printed, and the targets checked over them.

    Args:
        args: the parsed options (`--quick`, `--seeds`).
        problem: `problem(seed=seed)` builds the problem (initialization and
            data split of that seed).
        optimizers: `optimizers(quick)` builds what to compare.
        settings: steps and evaluation period (the seed is set per run).
        targets: the targets one comparison is checked against; each is
            reported over the seeds (met only if met on every seed).
    """
    num_seeds = args.seeds or (1 if args.quick else 3)
    comparisons = []
    for seed in range(num_seeds):
        comparison = running.compare(
            problem(seed=seed),
            optimizers(args.quick),
            dataclasses.replace(settings, seed=seed),
        )
        reporting.print_comparison(comparison)
        comparisons.append(comparison)
    reporting.print_seeds(comparisons)
    per_seed = [targets(comparison) for comparison in comparisons]
    return comparisons, tuple(reporting.over_seeds(seeds) for seeds in zip(*per_seed))


def convergence_main(
    argv: Sequence[str] | None,
    description: str | None,
    problem: Callable[..., Problem],
    optimizers: Callable[[bool], Sequence[Optimizer]],
    *,
    steps: int,
    quick_steps: int,
    targets: Callable[[Comparison], Sequence[Target]] = lambda comparison: (),
) -> BenchmarkResult:
    """The command line of a convergence benchmark: compare on every seed,
    report, check the targets over the seeds, save.

    Args:
        argv: command-line arguments (None: `sys.argv`).
        description: the module's docstring, for `--help`.
        problem: `problem(seed=seed)` builds the problem.
        optimizers: `optimizers(quick)` builds what to compare.
        steps: training steps of a full run.
        quick_steps: training steps of a `--quick` run.
        targets: the targets one comparison is checked against.

    Returns:
        The results, as saved to JSON: the first seed's comparison (and its
        plot), every seed's summary, and the targets over the seeds.
    """
    parser = arguments(description)
    seeds_argument(parser)
    args = parser.parse_args(argv)
    running.limit_blas_threads()
    settings = Settings(steps=args.steps or (quick_steps if args.quick else steps))
    comparisons, checked = compare_over_seeds(
        args, problem, optimizers, settings, targets
    )
    reporting.print_targets(checked)
    result = seeded_result(comparisons, checked)
    storage.save(result, args.out)
    return result


def seeded_result(
    comparisons: Sequence[Comparison],
    targets: Sequence[Target],
    sections: dict | None = None,
) -> BenchmarkResult:
    """The first seed's comparison (and plot), every seed's summary under
    `seeds`, more `sections`, and the targets."""
    return BenchmarkResult(
        comparisons[0].problem,
        comparisons[0],
        sections={"seeds": [c.summary for c in comparisons]} | (sections or {}),
        targets=tuple(targets),
    )
