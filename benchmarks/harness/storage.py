"""Writing results: JSON files, loss plots, and the machine they came from."""

import json
import math
import os
import pathlib
import platform
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import optax

from benchmarks.harness import reporting
from benchmarks.harness.records import BenchmarkResult, Comparison, Machine, as_json


def machine_info() -> Machine:
    """This machine, its software, and its load average now."""
    return Machine(
        platform=platform.platform(),
        python=platform.python_version(),
        jax=jax.__version__,
        optax=optax.__version__,
        backend=jax.default_backend(),
        device=jax.devices()[0].device_kind,
        cpu_count=os.cpu_count(),
        load_average_before=os.getloadavg(),
    )


def save(
    result: BenchmarkResult,
    out_dir: str | os.PathLike,
    *,
    plot: bool = True,
    log: Callable[[str], None] = print,
) -> list[pathlib.Path]:
    """Writes `<name>.json` and, for a comparison, `<name>.png` into `out_dir`.

    Args:
        result: what to write.
        out_dir: the folder, created if missing.
        plot: also plot the comparison's loss curves.
        log: where the `wrote <path>` lines go.

    Returns:
        The paths written.
    """
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{result.name}.json"
    write_json(json_path, result.to_json())
    paths = [json_path]
    if plot and result.comparison is not None:
        paths.append(plot_curves(result.comparison, out_dir / f"{result.name}.png"))
    for path in paths:
        log(f"wrote {path}")
    return paths


def write_json(path: str | os.PathLike, value: Any) -> None:
    """`value` (records, or JSON values) as JSON, non-finite floats as null;
    written to a temporary file first, so `path` is never half written."""
    path = pathlib.Path(path)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(_finite(as_json(value)), indent=1))
    temporary.replace(path)


def plot_curves(comparison: Comparison, path: pathlib.Path) -> pathlib.Path:
    """Training loss of each optimizer's best run against steps and seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, result in comparison.optimizers.items():
        run = result.best
        label = f"{name} ({reporting.format_hyperparameters(run.hyperparameters)})"
        by_step.plot(run.curve.step, run.curve.train_loss, label=label)
        by_time.plot(run.curve.seconds, run.curve.train_loss, label=label)
    for axis in (by_step, by_time):
        axis.axhline(comparison.target_loss, color="gray", linestyle="--", lw=0.8)
        axis.set_yscale("log")
    by_step.set(xlabel="step", ylabel="training loss")
    by_time.set(xlabel="seconds (step time only, compilation excluded)")
    by_step.legend(fontsize="small")
    fig.suptitle(
        f"{comparison.title}, batch {comparison.batch_size} "
        f"(best of each sweep; dashed: target)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _finite(value: Any) -> Any:
    """JSON-safe: non-finite floats become None, tuples lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, (np.floating, np.integer)):
        return _finite(value.item())
    return value
