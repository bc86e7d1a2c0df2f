"""Runs every benchmark, one after the other, into one output directory.

Usage:
    python -m benchmarks [--quick] [--out benchmarks/results] [--only mlp large_batch]
"""

import time
from collections.abc import Sequence

from benchmarks.harness import cli, reporting
from benchmarks.harness.records import BenchmarkResult
from benchmarks.problems import (
    autoencoder,
    cnn,
    large_batch,
    layer_cost,
    mlp,
    transformer,
)

BENCHMARKS = {
    "autoencoder": autoencoder.main,
    "mlp": mlp.main,
    "cnn": cnn.main,
    "transformer": transformer.main,
    "layer_cost": layer_cost.main,
    "large_batch": large_batch.main,
}


def main(argv: Sequence[str] | None = None) -> dict[str, BenchmarkResult]:
    parser = cli.arguments(__doc__, steps_help=None)
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS)
    )
    args = parser.parse_args(argv)
    results: dict[str, BenchmarkResult] = {}
    targets = []
    for name in args.only:
        start = time.perf_counter()
        results[name] = BENCHMARKS[name](
            ["--out", args.out] + (["--quick"] if args.quick else [])
        )
        targets += results[name].targets or ()
        print(f"-- {name} took {time.perf_counter() - start:.0f} s\n")
    if targets:
        print("Targets of the benchmarks issue:")
        reporting.print_targets(targets)
    return results


if __name__ == "__main__":
    main()
