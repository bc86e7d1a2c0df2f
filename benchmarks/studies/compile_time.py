"""Compile time of the jitted train step, piece by piece, against Adam's.

On the README's MLP (64-256-256-10 ReLU, softmax cross-entropy) and the
benchmark autoencoder (64-256-128-32-128-256-64 tanh, squared error), batch
256 of the digits, it builds fresh train steps of increasing scope:

* `adam`: `value_and_grad` of the mean loss and `optax.adam`;
* `capture, empirical` / `capture, mc`: `Curvature.value_grad_and_stats`
  alone (the data's labels / sampled labels);
* `scale_by_ekfac`: the empirical capture, `scale_by_ekfac` and `optax.sgd`;
* `ekfac, fixed rate`: the sampled labels' capture and
  `ekfac_sgd(layers, learning_rate=...)`;
* `ekfac, adaptive`: the sampled labels' capture and `ekfac(layers)`, the
  README's training loop;

and times, on a fresh function after `jax.clear_caches()`, the three stages
of `jax.jit`: tracing to a jaxpr (`.trace`), lowering to StableHLO
(`.lower`) and XLA's compilation (`.compile`). The pieces take turns within
each repetition, so a busy machine slows them alike; the ratios to Adam are
the median over the repetitions of each repetition's ratio. Next to the
times: the size of the lowered module (characters and operations) and of
XLA's optimized HLO (instructions, while loops, conditionals, custom calls).

Usage:
    python -m benchmarks.studies.compile_time [--quick] [--repeats N] [--out DIR]
"""

import dataclasses
import re
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax

import optax_ekfac as oek
from benchmarks.harness import cli, running, storage
from benchmarks.harness.records import BenchmarkResult
from benchmarks.problems import autoencoder, mlp

BATCH_SIZE = 256
PIECES = (
    "adam",
    "capture, empirical",
    "capture, mc",
    "scale_by_ekfac",
    "ekfac, fixed rate",
    "ekfac, adaptive",
)
STAGES = ("trace", "lower", "compile")


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One compilation of one piece.

    Attributes:
        seconds: stage -> seconds (`trace`, `lower`, `compile`).
        lowered_chars: characters of the lowered StableHLO text.
        lowered_ops: operations in it (lines that assign a value).
        hlo_instructions: instructions of XLA's optimized HLO.
        kernels: the kernels XLA's CPU backend compiles one by one (fusions,
            copies, dots, custom calls outside fused computations): its
            compile time grows with their number.
        while_loops: `while` instructions in it.
        conditionals: `conditional` instructions in it.
        custom_calls: `custom-call` instructions in it (LAPACK's `eigh`).
    """

    seconds: dict[str, float]
    lowered_chars: int
    lowered_ops: int
    hlo_instructions: int
    kernels: int
    while_loops: int
    conditionals: int
    custom_calls: int


def _count(pattern: str, text: str) -> int:
    return len(re.findall(pattern, text, flags=re.MULTILINE))


def _kernels(hlo_text: str) -> int:
    """Fusions, copies, dots and custom calls in the computations that are
    not themselves the body of a fusion."""
    computations = re.split(r"\n(?=\S)", hlo_text)
    return sum(
        _count(r" (fusion|copy|dot|custom-call)\(", computation)
        for computation in computations
        if not re.match(r"%?(fused|wrapped)", computation)
    )


def measure(step: Callable, args: Sequence[Any]) -> Measurement:
    """Traces, lowers and compiles `step` on `args`, from empty caches."""
    jax.clear_caches()
    jitted = jax.jit(step)
    start = time.perf_counter()
    traced = jitted.trace(*args)
    traced_at = time.perf_counter()
    lowered = traced.lower()
    lowered_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()
    lowered_text = lowered.as_text()
    hlo_text = compiled.as_text() or ""
    return Measurement(
        seconds={
            "trace": traced_at - start,
            "lower": lowered_at - traced_at,
            "compile": compiled_at - lowered_at,
        },
        lowered_chars=len(lowered_text),
        lowered_ops=_count(r"^\s*%\S+ = ", lowered_text),
        hlo_instructions=_count(r"^\s*(ROOT )?%?[\w.\-]+ = ", hlo_text),
        kernels=_kernels(hlo_text),
        while_loops=_count(r" while\(", hlo_text),
        conditionals=_count(r" conditional\(", hlo_text),
        custom_calls=_count(r" custom-call\(", hlo_text),
    )


def _steps(loss_fn: Callable, params: Any, batch: tuple) -> dict[str, tuple]:
    """Piece name -> `(step, args)`: a fresh train step and its arguments."""
    empirical = oek.Curvature(loss_fn, fisher_type="empirical")
    sampled = oek.Curvature(loss_fn, fisher_type="mc")
    layers = empirical.layers(params, *batch)

    def optimizer_step(curvature, tx):
        def step(params, opt_state, *batch):
            loss, grads, stats = curvature.value_grad_and_stats(params, *batch)
            updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
            return optax.apply_updates(params, updates), opt_state, loss

        return step, (params, tx.init(params), *batch)

    def capture_step(curvature):
        def step(params, *batch):
            loss, grads, stats = curvature.value_grad_and_stats(params, *batch)
            return loss, grads, stats.layers, stats.num_terms

        return step, (params, *batch)

    adam = optax.adam(1e-3)

    def adam_step(params, opt_state, *batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, *batch).mean())(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return {
        "adam": (adam_step, (params, adam.init(params), *batch)),
        "capture, empirical": capture_step(empirical),
        "capture, mc": capture_step(sampled),
        "scale_by_ekfac": optimizer_step(
            empirical,
            optax.chain(oek.scale_by_ekfac(layers, damping=1e-3), optax.sgd(1e-2)),
        ),
        "ekfac, fixed rate": optimizer_step(
            sampled, oek.ekfac_sgd(layers, learning_rate=1e-2, momentum=0.9)
        ),
        "ekfac, adaptive": optimizer_step(sampled, oek.ekfac(layers)),
    }


def problems() -> dict[str, tuple[Callable, Any, tuple]]:
    """Problem name -> `(loss_fn, params, batch)`, one batch of 256 digits."""
    found = {}
    for name, module in (("mlp", mlp), ("autoencoder", autoencoder)):
        problem = module.problem(batch_size=BATCH_SIZE)
        batch = tuple(np.asarray(array[:BATCH_SIZE]) for array in problem.train)
        found[name] = (problem.loss_fn, problem.params, batch)
    return found


def run(
    repeats: int, pieces: Sequence[str] = PIECES, names: Sequence[str] | None = None
) -> dict[str, dict[str, Any]]:
    """Every piece of every problem, `repeats` times, the pieces taking turns.

    Returns:
        problem -> piece -> its measurements (`measurements`, one per
        repetition), the median seconds per stage and in all, and the median
        over the repetitions of the ratio of its total to Adam's.
    """
    pieces = ("adam",) + tuple(piece for piece in pieces if piece != "adam")
    results: dict[str, dict[str, Any]] = {}
    for name, (loss_fn, params, batch) in problems().items():
        if names and name not in names:
            continue
        measured: dict[str, list[Measurement]] = {piece: [] for piece in pieces}
        for _ in range(repeats):
            for piece in pieces:
                step, args = _steps(loss_fn, params, batch)[piece]
                measured[piece].append(measure(step, args))
        results[name] = {
            piece: _summary(measured[piece], measured["adam"]) for piece in pieces
        }
    return results


def _summary(runs: list[Measurement], adam: list[Measurement]) -> dict[str, Any]:
    def total(run: Measurement) -> float:
        return sum(run.seconds.values())

    last = runs[-1]
    return {
        "measurements": runs,
        "median_seconds": {
            stage: statistics.median(run.seconds[stage] for run in runs)
            for stage in STAGES
        },
        "median_total_seconds": statistics.median(total(run) for run in runs),
        "ratio_to_adam": statistics.median(
            total(run) / total(reference) for run, reference in zip(runs, adam)
        ),
        "compile_ratio_to_adam": statistics.median(
            run.seconds["compile"] / reference.seconds["compile"]
            for run, reference in zip(runs, adam)
        ),
        "lowered_chars": last.lowered_chars,
        "lowered_ops": last.lowered_ops,
        "hlo_instructions": last.hlo_instructions,
        "kernels": last.kernels,
        "while_loops": last.while_loops,
        "conditionals": last.conditionals,
        "custom_calls": last.custom_calls,
    }


def report(results: dict[str, dict[str, Any]]) -> None:
    """One table per problem: seconds per stage, ratios to Adam, sizes."""
    header = (
        f"{'piece':<20}{'trace':>7}{'lower':>7}{'compile':>8}{'total':>7}"
        f"{'x Adam':>8}{'XLA x':>7}{'ops':>7}{'HLO':>7}{'kernels':>8}"
        f"{'while':>6}{'cond':>5}{'calls':>6}"
    )
    for name, pieces in results.items():
        print(f"\n{name}: seconds (median), ratio to Adam (median of ratios)")
        print(header)
        for piece, row in pieces.items():
            seconds = row["median_seconds"]
            print(
                f"{piece:<20}{seconds['trace']:>7.2f}{seconds['lower']:>7.2f}"
                f"{seconds['compile']:>8.2f}{row['median_total_seconds']:>7.2f}"
                f"{row['ratio_to_adam']:>8.2f}{row['compile_ratio_to_adam']:>7.2f}"
                f"{row['lowered_ops']:>7}{row['hlo_instructions']:>7}"
                f"{row['kernels']:>8}{row['while_loops']:>6}{row['conditionals']:>5}"
                f"{row['custom_calls']:>6}"
            )


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    parser = cli.arguments(__doc__, steps_help=None)
    parser.add_argument("--repeats", type=int, default=None, help="default 5; quick 1")
    parser.add_argument("--pieces", nargs="*", choices=PIECES, default=PIECES)
    parser.add_argument("--problems", nargs="*", choices=("mlp", "autoencoder"))
    args = parser.parse_args(argv)
    running.limit_blas_threads()
    repeats = args.repeats or (1 if args.quick else 5)
    results = run(repeats, args.pieces, args.problems)
    report(results)
    result = BenchmarkResult(
        "compile_time",
        sections={
            "machine": storage.machine_info(),
            "settings": {"batch_size": BATCH_SIZE, "repeats": repeats},
            "problems": results,
        },
    )
    storage.save(result, args.out)
    return result


if __name__ == "__main__":
    main()
