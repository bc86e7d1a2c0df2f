"""kfac-jax side by side: its adaptive K-FAC on the autoencoder benchmark.

kfac-jax 0.0.8 needs `jax==0.9.0`, so it runs in an environment of its own
(`.venv-kfac-jax/` at the repository root, pinned by `requirements.txt` next
to this file) as a subprocess of the benchmark, on the same problem,
initialization and batch order (`runner.py`). `benchmarks.problems.autoencoder`
and `benchmarks.problems.large_batch` run it after their own runs, in the same
benchmark run, whenever the environment exists, and check their targets
against it; without it, against the step-control issue's figures.

Usage:
    python -m benchmarks.kfac_jax --setup        # make the environment (PyPI)
    python -m benchmarks.kfac_jax [--seed 0] [--steps 1500] [--batch-size 256]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import venv

ROOT = pathlib.Path(__file__).resolve().parents[2]
ENVIRONMENT = ROOT / ".venv-kfac-jax"
REQUIREMENTS = pathlib.Path(__file__).resolve().parent / "requirements.txt"


def interpreter() -> pathlib.Path | None:
    """The pinned environment's Python (`$KFAC_JAX_PYTHON` overrides), or None
    where there is none."""
    python = pathlib.Path(
        os.environ.get("KFAC_JAX_PYTHON", ENVIRONMENT / "bin" / "python")
    )
    return python if python.exists() else None


def setup() -> None:
    """Creates `.venv-kfac-jax/` and installs the pinned requirements."""
    venv.create(ENVIRONMENT, with_pip=True, clear=True)
    python = ENVIRONMENT / "bin" / "python"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "-r", REQUIREMENTS], check=True
    )


def run(seed: int, steps: int, batch_size: int = 256) -> dict | None:
    """kfac-jax adaptive's run at `seed` and `batch_size` (see
    `runner.run`), or None (with the reason printed) where the
    environment is missing or it failed."""
    python = interpreter()
    if python is None:
        print(
            "kfac-jax: no pinned environment (python -m benchmarks.kfac_jax "
            "--setup makes one), so it does not run side by side"
        )
        return None
    completed = subprocess.run(
        [python, "-m", "benchmarks.kfac_jax.runner", "--seed", str(seed)]
        + ["--steps", str(steps), "--batch-size", str(batch_size)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    if completed.returncode != 0:
        print(f"kfac-jax: the run failed:\n{completed.stderr[-2000:]}")
        return None
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--setup", action="store_true", help="make the environment")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args(argv)
    if args.setup:
        setup()
        return
    result = run(args.seed, args.steps, args.batch_size)
    if result is not None:
        result.pop("curve")
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main(sys.argv[1:])
