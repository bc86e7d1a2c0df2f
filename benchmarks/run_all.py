"""Runs every benchmark, one after the other, into one output directory.

Usage:
    python -m benchmarks [--quick] [--out benchmarks/results] [--only mlp cnn]
"""

import argparse
import time
from collections.abc import Sequence

from benchmarks import autoencoder, cnn, layer_cost, mlp, transformer

BENCHMARKS = {
    "autoencoder": autoencoder.main,
    "mlp": mlp.main,
    "cnn": cnn.main,
    "transformer": transformer.main,
    "layer_cost": layer_cost.main,
}


def main(argv: Sequence[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke runs")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(BENCHMARKS), default=list(BENCHMARKS)
    )
    args = parser.parse_args(argv)
    results, targets = {}, []
    for name in args.only:
        start = time.perf_counter()
        results[name] = BENCHMARKS[name](
            ["--out", args.out] + (["--quick"] if args.quick else [])
        )
        targets += results[name].get("targets", [])
        print(f"-- {name} took {time.perf_counter() - start:.0f} s\n")
    if targets:
        print("Targets of the benchmarks issue:")
        for entry in targets:
            print(f"[{entry['status']}] {entry['target']} ({entry['detail']})")
    return results


if __name__ == "__main__":
    main()
