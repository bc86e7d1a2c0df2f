"""Running a comparison: compiled train steps, timed runs, compiled memory.

`compare` trains every setting of every optimizer from the same initialization
on the same mini-batches and records, per run (`records.Run`):

* the step time of every step (the jitted train step called on device-resident
  data, waited for with `jax.block_until_ready`, after `warmup_steps` steps of a
  discarded warm-up run that compiled it);
* the training loss (on `eval_size` fixed training examples) every `eval_every`
  steps, hence the steps and the seconds (sum of step times, evaluation
  excluded) to reach `Problem.target_loss`; the final train and held-out loss.

Per optimizer (`records.OptimizerResult`) it records how often its train step
was traced (a Python counter inside the traced function: one trace serves the
whole sweep, because the hyperparameters are arguments of the step, not
constants), the seconds of the step's first call (tracing, compilation and one
step: what a user waits before training starts), and its peak memory: the
compiled step's `memory_analysis()` (arguments + outputs + temporaries -
aliased bytes), what XLA allocates for one step, comparable between
optimizers on every backend; where the device keeps memory statistics (GPU,
TPU), its process-wide `peak_bytes_in_use` is recorded too (see `memory_of`).
"""

import dataclasses
import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ekfac as oek
from benchmarks.harness import reporting, storage
from benchmarks.harness.data import batch_indices
from benchmarks.harness.records import Comparison, Curve, Memory, OptimizerResult, Run
from benchmarks.harness.specs import Hyperparameters, Optimizer, Problem, Settings

# The examples' own: one BLAS thread for XLA's LAPACK calls on CPU.
from examples._shared import limit_blas_threads  # noqa: F401


class Batch(NamedTuple):
    """A train step's inputs besides the state and the data.

    Attributes:
        indices: the mini-batch's example indices, on the device.
        key: a PRNG key for the Monte-Carlo Fisher's label samples (unused
            by the empirical Fisher).
    """

    indices: jax.Array
    key: jax.Array


class TrainStep:
    """One jitted step `(params, state, hyperparameters, data, indices, key)`.

    The batch is gathered from the device-resident `data` inside the step, so
    a step costs the same for every optimizer apart from the optimizer itself.
    `key` feeds the Monte-Carlo Fisher's label samples (unused otherwise).

    Attributes:
        traces: how many times the step was traced (compiled).
        first_call_seconds: the wall-clock seconds of the first call, waited
            for: tracing, compilation and one step (None before it).
    """

    def __init__(self, problem: Problem, optimizer: Optimizer, layers: oek.Layers):
        self.traces = 0
        self.first_call_seconds: float | None = None
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
        if self.first_call_seconds is None:
            result, self.first_call_seconds = timed_call(self.jitted, *args)
            return result
        return self.jitted(*args)


def hyperparameter_arrays(hyperparameters: Hyperparameters) -> dict[str, jax.Array]:
    """The values of a setting as float32 device scalars, arguments of a step."""
    return {k: jax.device_put(np.float32(v)) for k, v in hyperparameters.items()}


def initial_state(
    optimizer: Optimizer, layers: oek.Layers, params: optax.Params
) -> optax.OptState:
    """The optimizer's initial state, from one jitted `init`: the state does
    not depend on the swept values, so every setting starts from it."""
    return jax.jit(optimizer.make(layers, **optimizer.sweep[0]).init)(params)


def memory_of(jitted: Callable, *args: Any) -> Memory:
    """Peak memory of one call of `jitted`.

    `peak_bytes` is the compiled executable's `memory_analysis()`: arguments +
    outputs + temporaries - aliased bytes, what XLA allocates for one call, on
    every backend. Where the device reports memory statistics (GPU, TPU), its
    `peak_bytes_in_use` is added as `device_peak_bytes`; that is a peak over
    the whole process so far, so it does not tell optimizers apart.
    """
    analysis = jitted.lower(*args).compile().memory_analysis()
    sizes: dict[str, int] = {}
    if analysis is not None:
        sizes = dict(
            argument_bytes=analysis.argument_size_in_bytes,
            output_bytes=analysis.output_size_in_bytes,
            temp_bytes=analysis.temp_size_in_bytes,
            alias_bytes=analysis.alias_size_in_bytes,
        )
        sizes["compiled_peak_bytes"] = (
            sizes["argument_bytes"]
            + sizes["output_bytes"]
            + sizes["temp_bytes"]
            - sizes["alias_bytes"]
        )
    source = "compiled memory_analysis (args + outputs + temp - alias)"
    device_peak_bytes = None
    device_stats = jax.devices()[0].memory_stats()
    if device_stats and "peak_bytes_in_use" in device_stats:
        device_peak_bytes = device_stats["peak_bytes_in_use"]
        source += "; device_peak_bytes: device memory_stats, process-wide"
    return Memory(
        **sizes,
        peak_bytes=sizes.get("compiled_peak_bytes"),
        source=source,
        device_peak_bytes=device_peak_bytes,
    )


def step_memory(problem: Problem, optimizer: Optimizer) -> Memory:
    """Peak memory of `optimizer`'s compiled train step at the problem's batch
    size (`memory_of`), compiled but not run: no training, so batch sizes
    beyond what a benchmark trains at cost one compilation. The mini-batch
    may repeat examples where it is larger than the training set."""
    workload = prepare(problem, Settings(steps=1, warmup_steps=0))
    step = TrainStep(problem, optimizer, workload.layers)
    return memory_of(
        step.jitted,
        problem.params,
        initial_state(optimizer, workload.layers, problem.params),
        hyperparameter_arrays(optimizer.sweep[0]),
        workload.train_data,
        *workload.timed_batches[0],
    )


def timed_call(fn: Callable, *args: Any) -> tuple[Any, float]:
    """`fn(*args)` waited for, and its wall-clock seconds."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return result, time.perf_counter() - start


@dataclasses.dataclass(frozen=True)
class Workload:
    """What every run of a comparison shares, placed on the device once.

    Attributes:
        problem: the model, loss and data.
        settings: steps, warm-up, evaluation period, seed.
        layers: the model's blocks, from the first mini-batch.
        train_data: the training arrays, on the device (steps gather their
            mini-batch from them).
        warmup_batches: the mini-batches of the discarded warm-up runs.
        timed_batches: the mini-batches of the timed runs.
        train_eval: the training examples the training loss is evaluated on.
        test_eval: the held-out examples of the final test loss.
        evaluate: the jitted mean loss, `evaluate(params, data)`.
    """

    problem: Problem
    settings: Settings
    layers: oek.Layers
    train_data: tuple[jax.Array, ...]
    warmup_batches: list[Batch]
    timed_batches: list[Batch]
    train_eval: tuple[jax.Array, ...]
    test_eval: tuple[jax.Array, ...]
    evaluate: Callable[[optax.Params, tuple[jax.Array, ...]], jax.Array]


def prepare(problem: Problem, settings: Settings) -> Workload:
    """The mini-batches, the data on the device, the layers and the evaluation."""
    indices = batch_indices(
        len(problem.train[0]),
        problem.batch_size,
        settings.steps + settings.warmup_steps,
        settings.seed,
    )
    # Host arrays go to the device with device_put: no eager jnp operations,
    # each of which would compile a small program of its own.
    batches = [
        Batch(*batch)
        for batch in zip(
            jax.device_put(list(indices)),
            jax.random.split(jax.random.key(settings.seed), len(indices)),
        )
    ]
    first_batch = tuple(array[indices[0]] for array in problem.train)

    @jax.jit
    def evaluate(params, data):
        return jnp.mean(problem.loss_fn(params, *data))

    return Workload(
        problem=problem,
        settings=settings,
        layers=oek.Curvature(problem.loss_fn).layers(problem.params, *first_batch),
        train_data=jax.device_put(tuple(problem.train)),
        warmup_batches=batches[: settings.warmup_steps],
        timed_batches=batches[settings.warmup_steps :],
        train_eval=jax.device_put(tuple(x[: problem.num_eval] for x in problem.train)),
        test_eval=jax.device_put(tuple(x[: problem.num_eval] for x in problem.test)),
        evaluate=evaluate,
    )


def run_setting(
    step: TrainStep,
    workload: Workload,
    *,
    opt_state: optax.OptState,
    hyperparameters: Hyperparameters,
) -> Run:
    """One setting of one optimizer: a discarded warm-up run (which compiles
    the step at the sweep's first setting), then the timed run, both from the
    problem's initial parameters and `opt_state`."""
    problem, settings = workload.problem, workload.settings
    traced = hyperparameter_arrays(hyperparameters)
    params, warmup_state = problem.params, opt_state
    for batch in workload.warmup_batches:
        params, warmup_state, _ = jax.block_until_ready(
            step(params, warmup_state, traced, workload.train_data, *batch)
        )
    params = problem.params
    step_seconds: list[float] = []
    batch_losses: list[float] = []
    curve_steps, curve_seconds = [0], [0.0]
    curve_losses = [float(workload.evaluate(params, workload.train_eval))]
    steps_to_target = seconds_to_target = None
    diverged = False
    batches = workload.timed_batches
    for i, batch in enumerate(batches):
        (params, opt_state, loss), seconds = timed_call(
            step, params, opt_state, traced, workload.train_data, *batch
        )
        step_seconds.append(seconds)
        batch_losses.append(float(loss))
        if (i + 1) % settings.eval_every and i + 1 < len(batches):
            continue
        train_loss = float(workload.evaluate(params, workload.train_eval))
        curve_steps.append(i + 1)
        curve_seconds.append(math.fsum(step_seconds))
        curve_losses.append(train_loss)
        if not math.isfinite(train_loss):
            diverged = True
            break
        if steps_to_target is None and train_loss <= problem.target_loss:
            steps_to_target, seconds_to_target = i + 1, curve_seconds[-1]
    return Run(
        step_seconds=tuple(step_seconds),
        median_step_seconds=statistics.median(step_seconds),
        mean_step_seconds=statistics.fmean(step_seconds),
        batch_losses=tuple(batch_losses),
        curve=Curve(tuple(curve_steps), tuple(curve_seconds), tuple(curve_losses)),
        steps_to_target=steps_to_target,
        seconds_to_target=seconds_to_target,
        final_train_loss=curve_losses[-1],
        final_test_loss=float(workload.evaluate(params, workload.test_eval)),
        diverged=diverged,
        hyperparameters=dict(hyperparameters),
    )


def compare_optimizer(
    workload: Workload,
    optimizer: Optimizer,
    *,
    log: Callable[[str], None] = print,
) -> OptimizerResult:
    """Every setting of one optimizer's sweep, with one compiled step."""
    problem = workload.problem
    step = TrainStep(problem, optimizer, workload.layers)
    opt_state = initial_state(optimizer, workload.layers, problem.params)
    runs = []
    for hyperparameters in optimizer.sweep:
        run = run_setting(
            step, workload, opt_state=opt_state, hyperparameters=hyperparameters
        )
        runs.append(run)
        log(reporting.describe_run(optimizer.name, run))
    traces = step.traces  # counted before memory_of lowers the step once more
    all_steps = [t for run in runs for t in run.step_seconds]
    return OptimizerResult(
        runs=tuple(runs),
        best_run=reporting.best_run_index(runs),
        traces=traces,
        compile_seconds=step.first_call_seconds,
        median_step_seconds=statistics.median(all_steps),
        mean_step_seconds=statistics.fmean(all_steps),
        memory=memory_of(
            step.jitted,
            problem.params,
            opt_state,
            hyperparameter_arrays(optimizer.sweep[-1]),
            workload.train_data,
            *workload.timed_batches[0],
        ),
    )


def compare(
    problem: Problem,
    optimizers: Sequence[Optimizer],
    settings: Settings,
    *,
    log: Callable[[str], None] = print,
) -> Comparison:
    """Trains every setting of every optimizer; returns all the numbers.

    Args:
        problem: the model, loss and data.
        optimizers: what to compare; one named "Adam" is the reference of the
            ratios.
        settings: steps, warm-up, evaluation period, seed.
        log: where progress lines go.

    Returns:
        The problem, the settings, the machine, and per optimizer its runs
        (hyperparameters, step times, loss curve, steps and seconds to
        target, final losses), its best run, trace count and memory, and the
        summary of its best run.
    """
    workload = prepare(problem, settings)
    machine = storage.machine_info()
    log(f"== {problem.title}")
    log(str(workload.layers))
    results = {
        optimizer.name: compare_optimizer(workload, optimizer, log=log)
        for optimizer in optimizers
    }
    return Comparison(
        problem=problem.name,
        title=problem.title,
        batch_size=problem.batch_size,
        target_loss=problem.target_loss,
        num_train=len(problem.train[0]),
        num_test=len(problem.test[0]),
        eval_size=problem.num_eval,
        num_parameters=sum(x.size for x in jax.tree.leaves(problem.params)),
        layers=str(workload.layers),
        settings=settings,
        machine=dataclasses.replace(machine, load_average_after=os.getloadavg()),
        optimizers=results,
        summary=reporting.summarize(results),
    )
