"""Optimizers side by side in one process: the shared benchmark harness.

A `Problem` is a Flax model's per-example `loss_fn`, its initial parameters and
offline data; an `Optimizer` builds an optax transformation from hyperparameters
and names the few values of its sweep. `compare` trains every setting of every
optimizer from the same initialization on the same mini-batches and records,
per run:

* the step time of every step (the jitted train step called on device-resident
  data, waited for with `jax.block_until_ready`, after `warmup_steps` steps of a
  discarded warm-up run that compiled it);
* the training loss (on `eval_size` fixed training examples) every `eval_every`
  steps, hence the steps and the seconds (sum of step times, evaluation
  excluded) to reach `Problem.target_loss`; the final train and held-out loss.

Per optimizer it records how often its train step was traced (a Python counter
inside the traced function: one trace serves the whole sweep, because the
hyperparameters are arguments of the step, not constants), and its peak memory:
the compiled step's `memory_analysis()` (arguments + outputs + temporaries -
aliased bytes), what XLA allocates for one step, comparable between optimizers
on every backend; where the device keeps memory statistics (GPU, TPU), its
process-wide `peak_bytes_in_use` is recorded too (see `memory_of`).

`save` writes the numbers as JSON and a plot of the training loss against
steps and against seconds.
"""

import dataclasses
import json
import math
import os
import pathlib
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ekfac as oek

Hyperparameters = Mapping[str, float]


@dataclasses.dataclass(frozen=True)
class Problem:
    """A model, its loss and its data.

    Attributes:
        name: short identifier, used for file names.
        title: one line for reports and plots.
        loss_fn: `loss_fn(params, *batch)` -> unreduced per-example losses
            (`[N]`, or `[B, T]` token losses), as `optax_ekfac.Curvature` takes.
        params: the initial parameters, shared by every run.
        train: training arrays, each with a leading example axis.
        test: held-out arrays, in the same layout.
        batch_size: examples per step.
        target_loss: the training loss whose first crossing is timed.
        eval_size: how many training examples the training loss is evaluated
            on (None: all of them).
    """

    name: str
    title: str
    loss_fn: Callable[..., jax.Array]
    params: optax.Params
    train: tuple[np.ndarray, ...]
    test: tuple[np.ndarray, ...]
    batch_size: int
    target_loss: float
    eval_size: int | None = None


@dataclasses.dataclass(frozen=True)
class Optimizer:
    """An optimizer and its sweep.

    Attributes:
        name: label in reports.
        make: `make(layers, **hyperparameters)` -> an optax transformation.
            Called inside the traced step with the hyperparameters as traced
            scalars, and outside it (with floats) to initialize the state.
        sweep: the hyperparameter settings to run.
        uses_stats: the transformation takes `stats=` from
            `Curvature.value_grad_and_stats` (EKFAC, KFAC).
        fisher_type: the `Curvature`'s Fisher, `"empirical"` or `"mc"`
            (labels sampled from the model, a fresh key every step).
    """

    name: str
    make: Callable[..., optax.GradientTransformation]
    sweep: tuple[Hyperparameters, ...]
    uses_stats: bool = False
    fisher_type: str = "empirical"


@dataclasses.dataclass(frozen=True)
class Settings:
    """How long to train and how often to look.

    Attributes:
        steps: timed training steps per run.
        warmup_steps: untimed steps of a discarded run before each timed run.
        eval_every: steps between evaluations of the training loss.
        seed: seed of the mini-batch order.
    """

    steps: int
    warmup_steps: int = 5
    eval_every: int = 10
    seed: int = 0


def limit_blas_threads() -> None:
    """One BLAS thread for the LAPACK calls XLA's CPU backend makes.

    On CPU, `jnp.linalg.eigh` runs in the OpenBLAS that ships with SciPy. Its
    threads compete with XLA's own; on a busy machine one 256 x 256
    eigendecomposition then takes 50 ms to 2 s instead of 5 ms. threadpoolctl
    can only limit libraries already loaded, so SciPy's LAPACK is loaded first.
    """
    import scipy.linalg  # noqa: F401  (loads the OpenBLAS jax's LAPACK uses)
    from threadpoolctl import threadpool_limits

    threadpool_limits(1, user_api="blas")


def adam(learning_rates: Sequence[float]) -> Optimizer:
    """`optax.adam` over a sweep of learning rates."""
    return Optimizer(
        "Adam",
        lambda layers, learning_rate: optax.adam(learning_rate),
        tuple({"learning_rate": lr} for lr in learning_rates),
    )


def sgd(learning_rates: Sequence[float], momentum: float = 0.9) -> Optimizer:
    """`optax.sgd` with heavy-ball momentum over a sweep of learning rates."""
    return Optimizer(
        "SGD",
        lambda layers, learning_rate: optax.sgd(learning_rate, momentum=momentum),
        tuple({"learning_rate": lr} for lr in learning_rates),
    )


def ekfac(
    sweep: Sequence[Hyperparameters],
    *,
    eigenvalue_correction: bool = True,
    momentum: float = 0.9,
    fisher_type: str = "empirical",
    **settings: Any,
) -> Optimizer:
    """`optax_ekfac.ekfac` (or KFAC on the same code path) over a sweep.

    Args:
        sweep: settings of `learning_rate` and `damping`.
        eigenvalue_correction: True for EKFAC, False for KFAC.
        momentum: momentum of the preconditioned direction.
        fisher_type: `"empirical"` or `"mc"` (see `optax_ekfac.Curvature`).
        **settings: fixed keyword arguments of `optax_ekfac.scale_by_ekfac`.
    """

    def make(layers, learning_rate, damping):
        return oek.ekfac(
            layers,
            learning_rate,
            momentum=momentum,
            damping=damping,
            eigenvalue_correction=eigenvalue_correction,
            **settings,
        )

    name = "EKFAC" if eigenvalue_correction else "KFAC"
    return Optimizer(name, make, tuple(sweep), uses_stats=True, fisher_type=fisher_type)


def standard_optimizers(
    *,
    ekfac_sweep: Sequence[Hyperparameters],
    adam_learning_rates: Sequence[float],
    sgd_learning_rates: Sequence[float],
    kfac_sweep: Sequence[Hyperparameters] | None = None,
    quick_settings: slice | None = None,
    **ekfac_settings: Any,
) -> list[Optimizer]:
    """EKFAC, KFAC (the same code path), Adam and SGD with momentum.

    `quick_settings` keeps that slice of every sweep (a `--quick` run).
    `ekfac_settings` (`fisher_type`, and keyword arguments of
    `optax_ekfac.scale_by_ekfac`) apply to both EKFAC and KFAC.
    """
    if quick_settings is not None:
        ekfac_sweep = ekfac_sweep[quick_settings]
        kfac_sweep = None if kfac_sweep is None else kfac_sweep[quick_settings]
        adam_learning_rates = adam_learning_rates[quick_settings]
        sgd_learning_rates = sgd_learning_rates[quick_settings]
    return [
        ekfac(ekfac_sweep, **ekfac_settings),
        ekfac(
            ekfac_sweep if kfac_sweep is None else kfac_sweep,
            eigenvalue_correction=False,
            **ekfac_settings,
        ),
        adam(adam_learning_rates),
        sgd(sgd_learning_rates),
    ]


def batch_indices(
    num_examples: int, batch_size: int, steps: int, seed: int
) -> np.ndarray:
    """`[steps, batch_size]` example indices: shuffled epochs, fixed seed."""
    rng = np.random.default_rng(seed)
    epochs = -(-steps * batch_size // num_examples)
    order = np.concatenate([rng.permutation(num_examples) for _ in range(epochs)])
    return order[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


class TrainStep:
    """One jitted step `(params, state, hyperparameters, data, indices, key)`.

    The batch is gathered from the device-resident `data` inside the step, so
    a step costs the same for every optimizer apart from the optimizer itself.
    `key` feeds the Monte-Carlo Fisher's label samples (unused otherwise).

    Attributes:
        traces: how many times the step was traced (compiled).
    """

    def __init__(self, problem: Problem, optimizer: Optimizer, layers: oek.Layers):
        self.traces = 0
        curvature = oek.Curvature(problem.loss_fn, fisher_type=optimizer.fisher_type)

        def mean_loss(params, *batch):
            return jnp.mean(problem.loss_fn(params, *batch))

        def step(params, opt_state, hyperparameters, data, indices, key):
            self.traces += 1
            batch = tuple(array[indices] for array in data)
            tx = optimizer.make(layers, **hyperparameters)
            if optimizer.uses_stats:
                key = key if optimizer.fisher_type == "mc" else None
                loss, grads, stats = curvature.value_grad_and_stats(
                    params, *batch, key=key
                )
                updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
            else:
                loss, grads = jax.value_and_grad(mean_loss)(params, *batch)
                updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        self.jitted = jax.jit(step)

    def __call__(self, *args):
        return self.jitted(*args)


def hyperparameter_arrays(hyperparameters: Hyperparameters) -> dict[str, jax.Array]:
    """The values of a setting as float32 device scalars, arguments of a step."""
    return {k: jax.device_put(np.float32(v)) for k, v in hyperparameters.items()}


def memory_of(jitted: Callable, *args: Any) -> dict[str, Any]:
    """Peak memory of one call of `jitted`.

    `peak_bytes` is the compiled executable's `memory_analysis()`: arguments +
    outputs + temporaries - aliased bytes, what XLA allocates for one call, on
    every backend. Where the device reports memory statistics (GPU, TPU), its
    `peak_bytes_in_use` is added as `device_peak_bytes`; that is a peak over
    the whole process so far, so it does not tell optimizers apart.
    """
    compiled = jitted.lower(*args).compile()
    analysis = compiled.memory_analysis()
    memory: dict[str, Any] = {}
    if analysis is not None:
        memory.update(
            argument_bytes=analysis.argument_size_in_bytes,
            output_bytes=analysis.output_size_in_bytes,
            temp_bytes=analysis.temp_size_in_bytes,
            alias_bytes=analysis.alias_size_in_bytes,
        )
        memory["compiled_peak_bytes"] = (
            analysis.argument_size_in_bytes
            + analysis.output_size_in_bytes
            + analysis.temp_size_in_bytes
            - analysis.alias_size_in_bytes
        )
    memory["peak_bytes"] = memory.get("compiled_peak_bytes")
    memory["source"] = "compiled memory_analysis (args + outputs + temp - alias)"
    device_stats = jax.devices()[0].memory_stats()
    if device_stats and "peak_bytes_in_use" in device_stats:
        memory["device_peak_bytes"] = device_stats["peak_bytes_in_use"]
        memory["source"] += "; device_peak_bytes: device memory_stats, process-wide"
    return memory


def timed_call(fn: Callable, *args: Any) -> tuple[Any, float]:
    """`fn(*args)` waited for, and its wall-clock seconds."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


def compare(
    problem: Problem,
    optimizers: Sequence[Optimizer],
    settings: Settings,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Trains every setting of every optimizer; returns all the numbers.

    Args:
        problem: the model, loss and data.
        optimizers: what to compare; one named "Adam" is the reference of the
            ratios.
        settings: steps, warm-up, evaluation period, seed.
        log: where progress lines go.

    Returns:
        A JSON-ready dict: the problem, the settings, the machine, and per
        optimizer its runs (hyperparameters, step times, loss curve, steps and
        seconds to target, final losses), its best run, trace count and
        memory.
    """
    num_train = len(problem.train[0])
    indices = batch_indices(
        num_train,
        problem.batch_size,
        settings.steps + settings.warmup_steps,
        settings.seed,
    )
    # Host arrays go to the device with device_put: no eager jnp operations,
    # each of which would compile a small program of its own. A batch is its
    # example indices and a key (for a Monte-Carlo Fisher).
    batches = list(
        zip(
            jax.device_put(list(indices)),
            jax.random.split(jax.random.key(settings.seed), len(indices)),
        )
    )
    warmup_batches = batches[: settings.warmup_steps]
    train_batches = batches[settings.warmup_steps :]
    train_data = jax.device_put(tuple(problem.train))
    eval_size = problem.eval_size or num_train
    train_eval = jax.device_put(tuple(array[:eval_size] for array in problem.train))
    test_eval = jax.device_put(tuple(array[:eval_size] for array in problem.test))
    first_batch = tuple(array[indices[0]] for array in problem.train)
    layers = oek.Curvature(problem.loss_fn).layers(problem.params, *first_batch)

    @jax.jit
    def evaluate(params, data):
        return jnp.mean(problem.loss_fn(params, *data))

    results: dict[str, Any] = {
        "problem": problem.name,
        "title": problem.title,
        "batch_size": problem.batch_size,
        "target_loss": problem.target_loss,
        "num_train": num_train,
        "num_test": len(problem.test[0]),
        "eval_size": eval_size,
        "num_parameters": sum(x.size for x in jax.tree.leaves(problem.params)),
        "layers": str(layers),
        "settings": dataclasses.asdict(settings),
        "machine": machine_info(),
        "optimizers": {},
    }
    log(f"== {problem.title}")
    log(str(layers))
    for optimizer in optimizers:
        step = TrainStep(problem, optimizer, layers)
        runs = []
        # The state does not depend on the swept values: one jitted init.
        initial_state = jax.jit(optimizer.make(layers, **optimizer.sweep[0]).init)(
            problem.params
        )
        for hyperparameters in optimizer.sweep:
            traced = hyperparameter_arrays(hyperparameters)
            params, opt_state = problem.params, initial_state
            for batch in warmup_batches:  # compiles at the first setting
                params, opt_state, _ = jax.block_until_ready(
                    step(params, opt_state, traced, train_data, *batch)
                )
            run = _train(
                step,
                problem,
                initial_state,
                traced,
                train_data,
                train_batches,
                train_eval,
                test_eval,
                evaluate,
                settings,
            )
            run["hyperparameters"] = dict(hyperparameters)
            runs.append(run)
            log(
                f"{optimizer.name:>6} {_format_hyperparameters(hyperparameters):<28}"
                f" step {1e3 * run['median_step_seconds']:7.2f} ms"
                f"  target at {_format_optional(run['steps_to_target'], 'd')} steps"
                f" {_format_optional(run['seconds_to_target'], '.2f')} s"
                f"  final train {run['final_train_loss']:.3e}"
                f" test {run['final_test_loss']:.3e}"
                + ("  DIVERGED" if run["diverged"] else "")
            )
        all_steps = [t for run in runs for t in run["step_seconds"]]
        results["optimizers"][optimizer.name] = {
            "runs": runs,
            "best_run": _best_run(runs),
            "traces": step.traces,
            "median_step_seconds": statistics.median(all_steps),
            "mean_step_seconds": statistics.fmean(all_steps),
            "memory": memory_of(
                step.jitted,
                problem.params,
                initial_state,
                traced,
                train_data,
                *train_batches[0],
            ),
        }
    results["summary"] = summarize(results)
    results["machine"]["load_average_after"] = os.getloadavg()
    return results


def _train(
    step,
    problem,
    opt_state,
    hyperparameters,
    data,
    batches,
    train_eval,
    test_eval,
    evaluate,
    settings,
) -> dict[str, Any]:
    """One timed run from the initial parameters."""
    params = problem.params
    step_seconds: list[float] = []
    batch_losses: list[float] = []
    curve = {"step": [0], "seconds": [0.0], "train_loss": []}
    curve["train_loss"].append(float(evaluate(params, train_eval)))
    steps_to_target = seconds_to_target = None
    diverged = False
    for i, batch in enumerate(batches):
        (params, opt_state, loss), seconds = timed_call(
            step, params, opt_state, hyperparameters, data, *batch
        )
        step_seconds.append(seconds)
        batch_losses.append(float(loss))
        if (i + 1) % settings.eval_every and i + 1 < len(batches):
            continue
        train_loss = float(evaluate(params, train_eval))
        curve["step"].append(i + 1)
        curve["seconds"].append(math.fsum(step_seconds))
        curve["train_loss"].append(train_loss)
        if not math.isfinite(train_loss):
            diverged = True
            break
        if steps_to_target is None and train_loss <= problem.target_loss:
            steps_to_target, seconds_to_target = i + 1, curve["seconds"][-1]
    return {
        "step_seconds": step_seconds,
        "median_step_seconds": statistics.median(step_seconds),
        "mean_step_seconds": statistics.fmean(step_seconds),
        "batch_losses": batch_losses,
        "curve": curve,
        "steps_to_target": steps_to_target,
        "seconds_to_target": seconds_to_target,
        "final_train_loss": curve["train_loss"][-1],
        "final_test_loss": float(evaluate(params, test_eval)),
        "diverged": diverged,
    }


def _best_run(runs: Sequence[Mapping[str, Any]]) -> int:
    """The fastest run to the target; if none reaches it, the lowest final
    training loss; diverged runs last."""

    def key(index):
        run = runs[index]
        loss = run["final_train_loss"]
        return (
            run["diverged"] or not math.isfinite(loss),
            run["seconds_to_target"] is None,
            run["seconds_to_target"] or 0.0,
            loss if math.isfinite(loss) else math.inf,
        )

    return min(range(len(runs)), key=key)


def summarize(results: Mapping[str, Any]) -> dict[str, Any]:
    """Per optimizer: its best run's numbers and the ratios to Adam."""
    optimizers = results["optimizers"]
    adam = optimizers.get("Adam")
    summary = {}
    for name, entry in optimizers.items():
        best = entry["runs"][entry["best_run"]]
        row = {
            "best_hyperparameters": best["hyperparameters"],
            "median_step_ms": 1e3 * entry["median_step_seconds"],
            "mean_step_ms": 1e3 * entry["mean_step_seconds"],
            "steps_to_target": best["steps_to_target"],
            "seconds_to_target": best["seconds_to_target"],
            "final_train_loss": best["final_train_loss"],
            "final_test_loss": best["final_test_loss"],
            "peak_memory_mb": entry["memory"]["peak_bytes"] / 2**20,
            "traces": entry["traces"],
        }
        if adam is not None:
            row["median_step_ratio_to_adam"] = (
                entry["median_step_seconds"] / adam["median_step_seconds"]
            )
            row["mean_step_ratio_to_adam"] = (
                entry["mean_step_seconds"] / adam["mean_step_seconds"]
            )
            adam_best = adam["runs"][adam["best_run"]]["seconds_to_target"]
            row["time_to_target_ratio_to_adam_best"] = (
                best["seconds_to_target"] / adam_best
                if best["seconds_to_target"] is not None and adam_best
                else None
            )
        summary[name] = row
    return summary


def report(results: Mapping[str, Any], log: Callable[[str], None] = print) -> None:
    """Prints the summary table of `compare`'s results."""
    log(
        f"\n{results['title']}: batch {results['batch_size']}, "
        f"{results['settings']['steps']} steps, target train loss "
        f"{results['target_loss']:g}, "
        f"{results['num_parameters']:,} parameters"
    )
    header = (
        f"{'optimizer':<9}{'best setting':<28}{'step ms':>8}{'/Adam':>7}"
        f"{'mean ms':>8}{'/Adam':>7}{'to target':>10}{'s':>7}{'/Adam':>7}"
        f"{'train':>10}{'test':>10}{'mem MB':>8}{'traces':>7}"
    )
    log(header)
    for name, row in results["summary"].items():
        time_ratio = row.get("time_to_target_ratio_to_adam_best")
        log(
            f"{name:<9}{_format_hyperparameters(row['best_hyperparameters']):<28}"
            f"{row['median_step_ms']:>8.2f}"
            f"{_format_optional(row.get('median_step_ratio_to_adam'), '.2f'):>7}"
            f"{row['mean_step_ms']:>8.2f}"
            f"{_format_optional(row.get('mean_step_ratio_to_adam'), '.2f'):>7}"
            f"{_format_optional(row['steps_to_target'], 'd'):>10}"
            f"{_format_optional(row['seconds_to_target'], '.2f'):>7}"
            f"{_format_optional(time_ratio, '.2f'):>7}"
            f"{row['final_train_loss']:>10.3e}{row['final_test_loss']:>10.3e}"
            f"{row['peak_memory_mb']:>8.1f}{row['traces']:>7d}"
        )
    source = next(iter(results["optimizers"].values()))["memory"]["source"]
    log(
        "step ms: median over all sweep runs (after warm-up); to target: the best "
        f"run's first evaluation at or below the target; memory: {source}."
    )


def time_to_target_target(
    results: Mapping[str, Any], optimizer: str = "EKFAC", fraction: float = 0.5
) -> dict[str, Any]:
    """The issue's target: `optimizer` reaches the target loss in at most
    `fraction` of Adam's best wall-clock time.

    If only `optimizer` reaches it, Adam's time is at least the length of its
    shortest run: met if `optimizer` beats that bound, else not measured. If
    only Adam reaches it, missed; if neither, not measured.
    """
    summary = results["summary"]
    seconds = summary[optimizer]["seconds_to_target"]
    adam_seconds = summary["Adam"]["seconds_to_target"]
    steps = results["settings"]["steps"]
    if seconds is None and adam_seconds is None:
        met, detail = None, f"neither reached it in {steps} steps"
    elif seconds is None:
        met, detail = False, f"{optimizer} did not reach it in {steps} steps"
    elif adam_seconds is None:
        adam_bound = min(
            run["curve"]["seconds"][-1] for run in results["optimizers"]["Adam"]["runs"]
        )
        met = True if seconds <= fraction * adam_bound else None
        detail = (
            f"{seconds:.2f} s; Adam did not reach it in {steps} steps "
            f"(>= {adam_bound:.2f} s)"
        )
    else:
        ratio = seconds / adam_seconds
        met = ratio <= fraction
        detail = f"{seconds:.2f} s against {adam_seconds:.2f} s, ratio {ratio:.2f}"
    return target(
        f"{results['problem']}: {optimizer} wall-clock to train loss "
        f"{results['target_loss']:g} <= {fraction:g} x Adam's best",
        met,
        detail,
    )


def target(description: str, met: bool | None, detail: str) -> dict[str, Any]:
    """One checked target, as reports and the JSON show it."""
    status = {True: "MET", False: "MISSED", None: "NOT MEASURABLE"}[met]
    return {"target": description, "met": met, "status": status, "detail": detail}


def report_targets(
    targets: Sequence[Mapping[str, Any]], log: Callable[[str], None] = print
) -> None:
    for entry in targets:
        log(f"[{entry['status']}] {entry['target']} ({entry['detail']})")


def machine_info() -> dict[str, Any]:
    device = jax.devices()[0]
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "backend": jax.default_backend(),
        "device": device.device_kind,
        "cpu_count": os.cpu_count(),
        "load_average_before": os.getloadavg(),
    }


def save(
    results: Mapping[str, Any], out_dir: str | os.PathLike, plot: bool = True
) -> list[pathlib.Path]:
    """Writes `<name>.json` (and `<name>.png`) into `out_dir`; returns the paths."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{results['problem']}.json"
    json_path.write_text(json.dumps(_finite(results), indent=1))
    paths = [json_path]
    if plot and "optimizers" in results:
        paths.append(plot_curves(results, out_dir / f"{results['problem']}.png"))
    return paths


def plot_curves(results: Mapping[str, Any], path: pathlib.Path) -> pathlib.Path:
    """Training loss of each optimizer's best run against steps and seconds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for name, entry in results["optimizers"].items():
        run = entry["runs"][entry["best_run"]]
        label = f"{name} ({_format_hyperparameters(run['hyperparameters'])})"
        curve = run["curve"]
        by_step.plot(curve["step"], curve["train_loss"], label=label)
        by_time.plot(curve["seconds"], curve["train_loss"], label=label)
    for axis in (by_step, by_time):
        axis.axhline(results["target_loss"], color="gray", linestyle="--", lw=0.8)
        axis.set_yscale("log")
    by_step.set(xlabel="step", ylabel="training loss")
    by_time.set(xlabel="seconds (step time only, compilation excluded)")
    by_step.legend(fontsize="small")
    fig.suptitle(
        f"{results['title']}, batch {results['batch_size']} "
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


def _format_hyperparameters(hyperparameters: Hyperparameters) -> str:
    short = {"learning_rate": "lr", "damping": "damping"}
    return " ".join(f"{short.get(k, k)}={v:g}" for k, v in hyperparameters.items())


def _format_optional(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def main(
    argv: Sequence[str] | None,
    description: str,
    problem: Callable[[], Problem],
    optimizers: Callable[[bool], Sequence[Optimizer]],
    *,
    steps: int,
    quick_steps: int,
    check_time_to_target: bool = False,
) -> dict[str, Any]:
    """The command line of a convergence benchmark: compare, report, save.

    Args:
        argv: command-line arguments (None: `sys.argv`).
        description: the `--help` line.
        problem: builds the problem.
        optimizers: `optimizers(quick)` builds what to compare.
        steps: training steps of a full run.
        quick_steps: training steps of a `--quick` run.
        check_time_to_target: check the issue's target that EKFAC reaches the
            target loss in at most half of Adam's best wall-clock time.

    Returns:
        The results, as saved to JSON.
    """
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--steps", type=int, default=None)
    args = parser.parse_args(argv)
    limit_blas_threads()
    settings = Settings(steps=args.steps or (quick_steps if args.quick else steps))
    results = compare(problem(), optimizers(args.quick), settings)
    report(results)
    results["targets"] = (
        [time_to_target_target(results)] if check_time_to_target else []
    )
    report_targets(results["targets"])
    for path in save(results, args.out):
        print(f"wrote {path}")
    return results
