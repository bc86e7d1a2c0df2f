"""Reading a comparison: best runs, summaries, printed tables, checked targets.

`summarize` picks each optimizer's best run and its ratios to Adam's;
`print_comparison` prints them as a table; `time_to_target` checks the issue's
wall-clock target and `print_targets` prints targets as MET, MISSED or NOT
MEASURABLE.
"""

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from benchmarks.harness.records import Comparison, OptimizerResult, Run, Summary, Target
from benchmarks.harness.specs import Hyperparameters


def best_run_index(runs: Sequence[Run]) -> int:
    """The fastest run to the target; if none reaches it, the lowest final
    training loss; diverged runs last."""

    def key(index):
        run = runs[index]
        loss = run.final_train_loss
        return (
            run.diverged or not math.isfinite(loss),
            run.seconds_to_target is None,
            run.seconds_to_target or 0.0,
            loss if math.isfinite(loss) else math.inf,
        )

    return min(range(len(runs)), key=key)


def summarize(optimizers: Mapping[str, OptimizerResult]) -> dict[str, Summary]:
    """Per optimizer: its best run's numbers and the ratios to Adam."""
    adam = optimizers.get("Adam")
    summary = {}
    for name, result in optimizers.items():
        best = result.best
        ratios = {}
        if adam is not None:
            adam_best = adam.best.seconds_to_target
            ratios = dict(
                median_step_ratio_to_adam=(
                    result.median_step_seconds / adam.median_step_seconds
                ),
                mean_step_ratio_to_adam=(
                    result.mean_step_seconds / adam.mean_step_seconds
                ),
                time_to_target_ratio_to_adam_best=(
                    best.seconds_to_target / adam_best
                    if best.seconds_to_target is not None and adam_best
                    else None
                ),
                compile_ratio_to_adam=_ratio(
                    result.compile_seconds, adam.compile_seconds
                ),
                peak_memory_ratio_to_adam=_ratio(
                    result.memory.peak_bytes, adam.memory.peak_bytes
                ),
            )
        summary[name] = Summary(
            best_hyperparameters=best.hyperparameters,
            median_step_ms=1e3 * result.median_step_seconds,
            mean_step_ms=1e3 * result.mean_step_seconds,
            steps_to_target=best.steps_to_target,
            seconds_to_target=best.seconds_to_target,
            final_train_loss=best.final_train_loss,
            final_test_loss=best.final_test_loss,
            peak_memory_mb=result.memory.peak_bytes / 2**20,
            traces=result.traces,
            compile_seconds=result.compile_seconds,
            **ratios,
        )
    return summary


def _ratio(value: float | None, reference: float | None) -> float | None:
    """`value / reference`, or None where either is unknown (or zero)."""
    return value / reference if value is not None and reference else None


def describe_run(optimizer: str, run: Run) -> str:
    """One progress line: a run's setting, step time, target and final losses."""
    return (
        f"{optimizer:>6} {format_hyperparameters(run.hyperparameters):<28}"
        f" step {1e3 * run.median_step_seconds:7.2f} ms"
        f"  target at {format_optional(run.steps_to_target, 'd')} steps"
        f" {format_optional(run.seconds_to_target, '.2f')} s"
        f"  final train {run.final_train_loss:.3e}"
        f" test {run.final_test_loss:.3e}" + ("  DIVERGED" if run.diverged else "")
    )


def print_comparison(
    comparison: Comparison, log: Callable[[str], None] = print
) -> None:
    """Prints the summary table of a comparison."""
    log(
        f"\n{comparison.title}: batch {comparison.batch_size}, "
        f"{comparison.settings.steps} steps, target train loss "
        f"{comparison.target_loss:g}, "
        f"{comparison.num_parameters:,} parameters"
    )
    header = (
        f"{'optimizer':<9}{'best setting':<28}{'step ms':>8}{'/Adam':>7}"
        f"{'mean ms':>8}{'/Adam':>7}{'to target':>10}{'s':>7}{'/Adam':>7}"
        f"{'train':>10}{'test':>10}{'mem MB':>8}{'/Adam':>7}"
        f"{'compile s':>10}{'/Adam':>7}{'traces':>7}"
    )
    log(header)
    for name, row in comparison.summary.items():
        log(
            f"{name:<9}{format_hyperparameters(row.best_hyperparameters):<28}"
            f"{row.median_step_ms:>8.2f}"
            f"{format_optional(row.median_step_ratio_to_adam, '.2f'):>7}"
            f"{row.mean_step_ms:>8.2f}"
            f"{format_optional(row.mean_step_ratio_to_adam, '.2f'):>7}"
            f"{format_optional(row.steps_to_target, 'd'):>10}"
            f"{format_optional(row.seconds_to_target, '.2f'):>7}"
            f"{format_optional(row.time_to_target_ratio_to_adam_best, '.2f'):>7}"
            f"{row.final_train_loss:>10.3e}{row.final_test_loss:>10.3e}"
            f"{row.peak_memory_mb:>8.1f}"
            f"{format_optional(row.peak_memory_ratio_to_adam, '.2f'):>7}"
            f"{format_optional(row.compile_seconds, '.2f'):>10}"
            f"{format_optional(row.compile_ratio_to_adam, '.2f'):>7}"
            f"{row.traces:>7d}"
        )
    source = next(iter(comparison.optimizers.values())).memory.source
    log(
        "step ms: median over all sweep runs (after warm-up); to target: the best "
        f"run's first evaluation at or below the target; memory: {source}; "
        "compile: the first call of the jitted step (tracing, compilation, one "
        "step)."
    )


def print_seeds(
    comparisons: Sequence[Comparison], log: Callable[[str], None] = print
) -> None:
    """Per optimizer, its best run over the seeds: the median and the range
    of the steps and seconds to the target, the time ratio to Adam's best,
    and the final training loss."""
    if len(comparisons) < 2:
        return
    log(f"\nOver {len(comparisons)} seeds: median [min, max]")
    log(
        f"{'optimizer':<9}{'reached':>8}{'steps to target':>22}"
        f"{'s to target':>24}{'s / Adam best':>24}{'final train':>30}"
    )
    for name in comparisons[0].summary:
        rows = [comparison.summary[name] for comparison in comparisons]
        reached = sum(row.steps_to_target is not None for row in rows)
        ratios = [row.time_to_target_ratio_to_adam_best for row in rows]
        log(
            f"{name:<9}{reached:>6}/{len(rows)}"
            f"{spread([row.steps_to_target for row in rows], 'g'):>22}"
            f"{spread([row.seconds_to_target for row in rows], '.2f'):>24}"
            f"{spread(ratios, '.2f'):>24}"
            f"{spread([row.final_train_loss for row in rows], '.2e'):>30}"
        )


def spread(values: Sequence[float | None], spec: str) -> str:
    """`median [min, max]` of the known values, or `-`."""
    known = sorted(value for value in values if value is not None)
    if not known:
        return "-"
    median = statistics.median(known)
    return (
        f"{format(median, spec)} [{format(known[0], spec)}, {format(known[-1], spec)}]"
    )


def time_to_target(
    comparison: Comparison,
    optimizer: str = "EKFAC",
    fraction: float = 0.5,
    *,
    reference: str = "Adam's best",
    scale: float = 1.0,
) -> Target:
    """`optimizer` reaches the target loss in at most `fraction` of a
    reference's wall-clock time, the reference taking `scale` times Adam's
    best (1 for Adam itself; another optimizer's time from published figures,
    relative to Adam's on the same machine).

    If only `optimizer` reaches it, Adam's time is at least the length of its
    shortest run: met if `optimizer` beats that bound, else not measured. If
    only Adam reaches it, missed; if neither, not measured.
    """
    seconds = comparison.summary[optimizer].seconds_to_target
    adam_seconds = comparison.summary["Adam"].seconds_to_target
    steps = comparison.settings.steps
    if seconds is None and adam_seconds is None:
        met, detail = None, f"neither reached it in {steps} steps"
    elif seconds is None:
        met, detail = False, f"{optimizer} did not reach it in {steps} steps"
    elif adam_seconds is None:
        adam_bound = min(
            run.curve.seconds[-1] for run in comparison.optimizers["Adam"].runs
        )
        met = True if seconds <= fraction * scale * adam_bound else None
        detail = (
            f"{seconds:.2f} s; Adam did not reach it in {steps} steps "
            f"(>= {adam_bound:.2f} s)"
        )
    else:
        ratio = seconds / (scale * adam_seconds)
        met = ratio <= fraction
        detail = (
            f"{seconds:.2f} s against {scale * adam_seconds:.2f} s, ratio {ratio:.2f}"
        )
    return Target(
        f"{comparison.problem}: {optimizer} wall-clock to train loss "
        f"{comparison.target_loss:g} <= {fraction:g} x {reference}",
        met,
        detail,
    )


def fewer_steps_than_adam(comparison: Comparison, optimizer: str = "EKFAC") -> Target:
    """`optimizer` reaches the target loss in fewer steps than Adam's best."""
    steps = comparison.summary[optimizer].steps_to_target
    adam_steps = comparison.summary["Adam"].steps_to_target
    if steps is None:
        met, detail = False, f"{optimizer} did not reach it"
    elif adam_steps is None:
        met, detail = True, f"{steps} steps; Adam did not reach it"
    else:
        met, detail = steps < adam_steps, f"{steps} steps against {adam_steps}"
    return Target(
        f"{comparison.problem}: {optimizer} steps to train loss "
        f"{comparison.target_loss:g} < Adam's best",
        met,
        detail,
    )


def fewer_steps_and_no_more_time(comparison: Comparison) -> tuple[Target, Target]:
    """The issue's targets of the CNN and the transformer: EKFAC needs fewer
    steps than Adam's best to the target, and no more wall-clock."""
    return (
        fewer_steps_than_adam(comparison),
        time_to_target(comparison, fraction=1.0),
    )


def ratio_to_adam_at_most(
    comparison: Comparison,
    ratio: str,
    bound: float,
    what: str,
    optimizer: str = "EKFAC",
) -> Target:
    """`optimizer`'s `Summary` field `ratio` (a ratio to Adam's) is at most
    `bound`; `what` names it in the description ("mean step time")."""
    value = getattr(comparison.summary[optimizer], ratio)
    return Target(
        f"{comparison.problem}: {optimizer} {what} <= {bound:g} x Adam's",
        None if value is None else value <= bound,
        "not measured" if value is None else f"ratio {value:.2f}",
    )


def final_loss_at_most(
    comparison: Comparison, bound: float, reference: str, optimizer: str = "EKFAC"
) -> Target:
    """`optimizer`'s final training loss is at most `bound` (`reference`'s)."""
    loss = comparison.summary[optimizer].final_train_loss
    return Target(
        f"{comparison.problem}: {optimizer} train loss after "
        f"{comparison.settings.steps} steps <= {bound:g} ({reference})",
        math.isfinite(loss) and loss <= bound,
        f"{loss:.3g}",
    )


def over_seeds(targets: Sequence[Target]) -> Target:
    """One target checked on several seeds: met on every seed, missed on any;
    the detail lists each seed's."""
    verdicts = [target.met for target in targets]
    if False in verdicts:
        met = False
    elif None in verdicts:
        met = None
    else:
        met = True
    passed = sum(verdict is True for verdict in verdicts)
    detail = f"{passed}/{len(targets)} seeds: " + "; ".join(
        target.detail for target in targets
    )
    return Target(targets[0].description, met, detail)


def print_targets(
    targets: Iterable[Target], log: Callable[[str], None] = print
) -> None:
    """One line per target: `[STATUS] description (detail)`."""
    for target in targets:
        log(f"[{target.status}] {target.description} ({target.detail})")


def format_hyperparameters(hyperparameters: Hyperparameters) -> str:
    """`lr=0.001 damping=0.001`: a setting, short."""
    short = {"learning_rate": "lr", "damping": "damping"}
    return " ".join(f"{short.get(k, k)}={v:g}" for k, v in hyperparameters.items())


def format_optional(value: Any, spec: str) -> str:
    """`value` formatted with `spec`, or `-` where it is None."""
    return "-" if value is None else format(value, spec)
