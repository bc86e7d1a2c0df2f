"""The benchmarks' command lines: their shared options, and a convergence
benchmark's whole command (compare, report, check, save)."""

import argparse
from collections.abc import Callable, Sequence

from benchmarks import reporting, running, storage
from benchmarks.records import BenchmarkResult
from benchmarks.specs import Optimizer, Problem, Settings


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


def convergence_main(
    argv: Sequence[str] | None,
    description: str | None,
    problem: Callable[[], Problem],
    optimizers: Callable[[bool], Sequence[Optimizer]],
    *,
    steps: int,
    quick_steps: int,
    check_time_to_target: bool = False,
) -> BenchmarkResult:
    """The command line of a convergence benchmark: compare, report, save.

    Args:
        argv: command-line arguments (None: `sys.argv`).
        description: the module's docstring, for `--help`.
        problem: builds the problem.
        optimizers: `optimizers(quick)` builds what to compare.
        steps: training steps of a full run.
        quick_steps: training steps of a `--quick` run.
        check_time_to_target: check the issue's target that EKFAC reaches the
            target loss in at most half of Adam's best wall-clock time.

    Returns:
        The results, as saved to JSON.
    """
    args = arguments(description).parse_args(argv)
    running.limit_blas_threads()
    settings = Settings(steps=args.steps or (quick_steps if args.quick else steps))
    comparison = running.compare(problem(), optimizers(args.quick), settings)
    reporting.print_comparison(comparison)
    targets = (reporting.time_to_target(comparison),) if check_time_to_target else ()
    reporting.print_targets(targets)
    result = BenchmarkResult(comparison.problem, comparison, targets=targets)
    storage.save(result, args.out)
    return result
