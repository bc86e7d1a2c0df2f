"""The benchmarks' results as typed records, and the JSON they are saved as.

`running.compare` returns a `Comparison`: per optimizer an `OptimizerResult`
with one `Run` per setting of its sweep, and per optimizer a `Summary` of its
best run. A benchmark's command returns a `BenchmarkResult`: its comparison
(if it ran one), further sections of its own and the `Target`s it checked.
`BenchmarkResult.to_json()` is what `storage.save` writes; its keys are the
records' field names (a `Target`'s description is its `"target"`).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from benchmarks.harness.specs import Hyperparameters, Settings


@dataclasses.dataclass(frozen=True)
class Curve:
    """The training loss at every evaluation of one run.

    Attributes:
        step: steps done at each evaluation (0: the initial parameters).
        seconds: the sum of the step times up to each evaluation.
        train_loss: the training loss there (on `Problem.eval_size` examples).
    """

    step: tuple[int, ...]
    seconds: tuple[float, ...]
    train_loss: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class Run:
    """One timed training run: one setting of one optimizer.

    Attributes:
        step_seconds: the wall-clock time of every step.
        median_step_seconds: their median: a typical step.
        mean_step_seconds: their mean, with the refresh steps amortized.
        batch_losses: the mini-batch loss of every step.
        curve: the evaluations of the training loss.
        steps_to_target: steps at the first evaluation at or below the
            problem's target loss (None: not reached).
        seconds_to_target: the sum of step times until then.
        final_train_loss: the last evaluation's training loss.
        final_test_loss: the held-out loss of the final parameters.
        diverged: the training loss became non-finite (the run stopped).
        hyperparameters: the setting.
    """

    step_seconds: tuple[float, ...]
    median_step_seconds: float
    mean_step_seconds: float
    batch_losses: tuple[float, ...]
    curve: Curve
    steps_to_target: int | None
    seconds_to_target: float | None
    final_train_loss: float
    final_test_loss: float
    diverged: bool
    hyperparameters: Hyperparameters


# The sizes a backend may not report: `Memory`'s JSON has them only where known.
_MEMORY_SIZES = (
    "argument_bytes",
    "output_bytes",
    "temp_bytes",
    "alias_bytes",
    "compiled_peak_bytes",
    "device_peak_bytes",
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Memory:
    """Peak memory of one compiled call (see `running.memory_of`).

    Attributes:
        argument_bytes: `memory_analysis()`'s argument size.
        output_bytes: its output size.
        temp_bytes: its temporaries.
        alias_bytes: its outputs that alias arguments.
        compiled_peak_bytes: arguments + outputs + temporaries - aliased.
        peak_bytes: the number to compare, `compiled_peak_bytes`.
        source: where the numbers come from, in words.
        device_peak_bytes: the device's process-wide `peak_bytes_in_use`,
            where it keeps memory statistics (GPU, TPU).
    """

    argument_bytes: int | None = None
    output_bytes: int | None = None
    temp_bytes: int | None = None
    alias_bytes: int | None = None
    compiled_peak_bytes: int | None = None
    peak_bytes: int | None = None
    source: str
    device_peak_bytes: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields, less the sizes the backend did not report."""
        return _without_unknown(self, optional=_MEMORY_SIZES)


@dataclasses.dataclass(frozen=True)
class OptimizerResult:
    """Every run of one optimizer's sweep.

    Attributes:
        runs: one per setting, in the sweep's order.
        best_run: the index of the best run (`reporting.best_run_index`).
        traces: how often the train step was traced (1: one compilation
            served the whole sweep).
        median_step_seconds: the median step time over all runs.
        mean_step_seconds: the mean step time over all runs.
        memory: the compiled train step's peak memory.
        compile_seconds: the wall-clock seconds of the jitted step's first
            call (tracing, compilation and one step; `TrainStep`'s
            `first_call_seconds`).
    """

    runs: tuple[Run, ...]
    best_run: int
    traces: int
    median_step_seconds: float
    mean_step_seconds: float
    memory: Memory
    compile_seconds: float | None = None

    @property
    def best(self) -> Run:
        """The best run."""
        return self.runs[self.best_run]


@dataclasses.dataclass(frozen=True)
class Summary:
    """One optimizer's line of the report: its best run and ratios to Adam's.

    The ratios are None where no optimizer is named "Adam";
    `time_to_target_ratio_to_adam_best` also where either best run missed the
    target. `compile_seconds` is the first call of the jitted step (see
    `OptimizerResult`), `peak_memory_mb` the compiled step's peak memory.
    """

    best_hyperparameters: Hyperparameters
    median_step_ms: float
    mean_step_ms: float
    steps_to_target: int | None
    seconds_to_target: float | None
    final_train_loss: float
    final_test_loss: float
    peak_memory_mb: float
    traces: int
    compile_seconds: float | None = None
    median_step_ratio_to_adam: float | None = None
    mean_step_ratio_to_adam: float | None = None
    time_to_target_ratio_to_adam_best: float | None = None
    compile_ratio_to_adam: float | None = None
    peak_memory_ratio_to_adam: float | None = None


@dataclasses.dataclass(frozen=True)
class Machine:
    """Where the benchmark ran.

    Attributes:
        platform: `platform.platform()`.
        python: the Python version.
        jax: the JAX version.
        optax: the optax version.
        backend: JAX's default backend.
        device: the first device's kind.
        cpu_count: `os.cpu_count()`.
        load_average_before: `os.getloadavg()` when the benchmark started.
        load_average_after: the same when its runs ended (None: not taken).
    """

    platform: str
    python: str
    jax: str
    optax: str
    backend: str
    device: str
    cpu_count: int | None
    load_average_before: tuple[float, float, float]
    load_average_after: tuple[float, float, float] | None = None

    def to_json(self) -> dict[str, Any]:
        """The fields, less `load_average_after` where it was not taken."""
        return _without_unknown(self, optional=("load_average_after",))


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Every optimizer trained on one problem: `running.compare`'s result.

    Attributes:
        problem: the problem's name.
        title: its title.
        batch_size: examples per step.
        target_loss: the training loss whose first crossing is timed.
        num_train: training examples.
        num_test: held-out examples.
        eval_size: examples the losses are evaluated on.
        num_parameters: the model's parameter count.
        layers: the printed `optax_ekfac.Layers` table.
        settings: steps, warm-up, evaluation period, seed.
        machine: where it ran.
        optimizers: optimizer name -> its runs.
        summary: optimizer name -> its best run's summary.
    """

    problem: str
    title: str
    batch_size: int
    target_loss: float
    num_train: int
    num_test: int
    eval_size: int
    num_parameters: int
    layers: str
    settings: Settings
    machine: Machine
    optimizers: dict[str, OptimizerResult]
    summary: dict[str, Summary]


@dataclasses.dataclass(frozen=True)
class Target:
    """One of the benchmarks issue's targets, checked.

    Attributes:
        description: what is required.
        met: True, False, or None where it could not be measured.
        detail: the numbers behind the verdict.
    """

    description: str
    met: bool | None
    detail: str

    @property
    def status(self) -> str:
        """`MET`, `MISSED` or `NOT MEASURABLE`."""
        return {True: "MET", False: "MISSED", None: "NOT MEASURABLE"}[self.met]

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.description,
            "met": self.met,
            "status": self.status,
            "detail": self.detail,
        }


@dataclasses.dataclass(frozen=True)
class BenchmarkResult:
    """What one benchmark's command produced, and writes as `<name>.json`.

    Attributes:
        name: the benchmark's name, the stem of its files.
        comparison: its convergence comparison, if it ran one (then it also
            writes `<name>.png`).
        sections: further JSON sections of its own (records or JSON values),
            after the comparison's keys.
        targets: the targets it checked (None: it checks none, and its JSON
            has no `targets`).
    """

    name: str
    comparison: Comparison | None = None
    sections: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    targets: tuple[Target, ...] | None = None

    def to_json(self) -> dict[str, Any]:
        """The JSON: the comparison's keys (or just `problem`), the sections,
        and `targets`. Non-finite floats are left to `storage.save`."""
        if self.comparison is not None:
            json_value = as_json(self.comparison)
        else:
            json_value = {"problem": self.name}
        json_value.update(as_json(dict(self.sections)))
        if self.targets is not None:
            json_value["targets"] = as_json(self.targets)
        return json_value


def as_json(value: Any) -> Any:
    """Records as their JSON dicts (`to_json()` where a record has one, else
    their fields), inside mappings and sequences too; other values as they
    are."""
    if hasattr(value, "to_json"):
        return value.to_json()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: as_json(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, Mapping):
        return {key: as_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_json(item) for item in value]
    return value


def _without_unknown(record: Any, optional: tuple[str, ...]) -> dict[str, Any]:
    """A record's fields as JSON, less the `optional` ones that are None: keys
    the JSON has only where the value is known."""
    return {
        field.name: as_json(value)
        for field in dataclasses.fields(record)
        if (value := getattr(record, field.name)) is not None
        or field.name not in optional
    }
