"""Accelerator benchmarks, sized for a few minutes on one H100/H200-class GPU.

`benchmarks/accelerator.sh` runs them (after the install and a GPU subset of
the tests); each part is a function of the sizes (`FULL`, or `DRY_RUN`: tiny,
for CPU) that returns JSON values, and every part's numbers and status go into
one JSON file, rewritten after each part, so a part that fails or runs out of
time leaves the others' numbers:

* `device`: the backend, the devices, the versions, the precision settings;
* `precision`: float32 matmul throughput and error (against float64) under
  each `jax.default_matmul_precision`; how far the library's EKFAC update
  moves under a coarse default (its own matmuls stay float32,
  `Precision.HIGHEST`); and how far it would move if its matmuls followed
  the default (`dense_ekfac_update`, the update written out with the
  matmuls' precision an argument);
* `eigh`: seconds of `eigh` (the library's `symmetric_eigh`) in float32 at
  each size, against a float32 matmul of the same size; a slot for the
  warm-started refresh, measured once `optax_ekfac` has one;
* `sharding`: an EKFAC step with the batch sharded over every device (an
  explicit mesh) against the same step on one device;
* `mlp_step_cost`: EKFAC's step time over Adam's for wide MLPs (synthetic
  data), statistics every step and every 10, next to the FLOP model
  (`mlp.step_cost`), with a profile of the widest at the largest batch;
* `memory`: the step's peak memory, compiled (`memory_analysis()`) and from
  the device's `memory_stats()`;
* `transformer`: time to a target loss of a transformer LM, EKFAC's defaults
  against Adam's best (`running.compare`).

Matmul precision is explicit: the library's curvature matmuls are float32
whatever the default (`optax_ekfac._src.curvature.MATMUL_PRECISION`); the
models' own run under `jax.default_matmul_precision(MODEL_PRECISION)` here,
JAX's default for users, recorded in the JSON.

Usage:
    python -m benchmarks.accelerator --json PATH [--dry-run] PART [PART ...]
    python -m benchmarks.accelerator --slug-file PATH
"""

import argparse
import contextlib
import dataclasses
import functools
import json
import pathlib
import re
import statistics
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
import optax

import optax_ekfac as oek
from benchmarks.harness import cost, reporting, running, specs, storage
from benchmarks.problems import mlp, transformer
from optax_ekfac._src import curvature

# The models' matmuls: JAX's default (TF32 on recent NVIDIA GPUs), what a user
# gets; EKFAC's own are float32 regardless.
MODEL_PRECISION = "default"
PRECISIONS = ("float32", "tensorfloat32", "bfloat16")
# The damping of the `precision` part's one-layer update.
DAMPING = 1e-4


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each part runs.

    Attributes:
        mlp_widths: hidden (and input) widths of the step-cost MLPs.
        mlp_batch_sizes: their batch sizes.
        step_rounds: rounds of 10 interleaved steps per variant.
        profile_rounds: rounds of the profile of the widest MLP at the
            largest batch (0: none).
        eigh_sizes: sizes of the timed eigendecompositions.
        eigh_repeats: timed calls per size (after one that compiles).
        matmul_size: size of the square matmuls of `precision`.
        precision_width: width of the one-layer EKFAC update of `precision`.
        sharding_width: width of the MLP of `sharding`.
        transformer: `transformer.problem`'s sizes.
        transformer_steps: training steps of each run.
        transformer_eval_every: steps between evaluations.
        adam_learning_rates: Adam's sweep on the transformer.
    """

    mlp_widths: tuple[int, ...]
    mlp_batch_sizes: tuple[int, ...]
    step_rounds: int
    profile_rounds: int
    eigh_sizes: tuple[int, ...]
    eigh_repeats: int
    matmul_size: int
    precision_width: int
    sharding_width: int
    transformer: dict[str, int]
    transformer_steps: int
    transformer_eval_every: int
    adam_learning_rates: tuple[float, ...]


FULL = Sizes(
    mlp_widths=(1024, 4096),
    mlp_batch_sizes=(1024, 8192),
    step_rounds=2,
    profile_rounds=3,
    eigh_sizes=(1024, 2048, 4096, 8192),
    eigh_repeats=2,
    matmul_size=8192,
    precision_width=1024,
    sharding_width=512,
    transformer=dict(
        batch_size=64,
        num_chars=800_000,
        sequence_length=256,
        width=512,
        num_layers=6,
        num_heads=8,
        mlp_width=2048,
    ),
    transformer_steps=200,
    transformer_eval_every=20,
    adam_learning_rates=(3e-4, 1e-3, 3e-3),
)

DRY_RUN = Sizes(
    mlp_widths=(32,),
    mlp_batch_sizes=(32,),
    step_rounds=1,
    profile_rounds=0,  # the profile compiles 7 more programs
    eigh_sizes=(16, 32),
    eigh_repeats=2,
    matmul_size=64,
    precision_width=16,
    sharding_width=16,
    transformer=dict(
        batch_size=4,
        num_chars=20_000,
        sequence_length=16,
        width=16,
        num_layers=1,
        num_heads=2,
        mlp_width=32,
    ),
    transformer_steps=4,
    transformer_eval_every=2,
    adam_learning_rates=(1e-3,),
)


def device_slug() -> str:
    """The first device's kind as a file-name part: `nvidia-h200`, `cpu`."""
    kind = jax.devices()[0].device_kind
    return re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-") or "unknown"


def median_seconds(fn: Callable[[], Any], repeats: int) -> dict[str, float]:
    """Median and minimum seconds of `fn()` over `repeats` calls, after one
    untimed call (compilation)."""
    jax.block_until_ready(fn())
    seconds = [running.timed_call(fn)[1] for _ in range(repeats)]
    return {"median_seconds": statistics.median(seconds), "min_seconds": min(seconds)}


# --- the parts ------------------------------------------------------------------


def device(sizes: Sizes) -> dict[str, Any]:
    """The backend, the devices, the versions and the precision settings."""
    del sizes
    first = jax.devices()[0]
    stats = first.memory_stats()
    info = {
        "machine": storage.machine_info(),
        "slug": device_slug(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": first.device_kind,
        "jaxlib": jaxlib.__version__,
        "flax": flax.__version__,
        "memory_bytes_limit": stats.get("bytes_limit") if stats else None,
        "library_matmul_precision": str(curvature.MATMUL_PRECISION),
        "model_matmul_precision": MODEL_PRECISION,
        "default_matmul_precision_config": jax.config.jax_default_matmul_precision,
    }
    print(f"device: {first.device_kind} x {jax.device_count()} ({first.platform})")
    return info


def random_matrix(key: jax.Array, rows: int, columns: int) -> jax.Array:
    return jax.random.normal(key, (rows, columns), jnp.float32)


def conditioned_inputs(width: int, num_examples: int, condition: float) -> np.ndarray:
    """`[num_examples, width]` inputs whose second moment has about
    `condition`, its small directions not axis-aligned."""
    rng = np.random.default_rng(0)
    rotation, _ = np.linalg.qr(rng.standard_normal((width, width)))
    scales = np.logspace(0, -0.5 * np.log10(condition), width)
    inputs = rng.standard_normal((num_examples, width)) @ np.diag(scales) @ rotation
    return inputs.astype(np.float32)


def _relative(value: Any, reference: Any) -> float:
    """`‖value − reference‖ / ‖reference‖` over all leaves of two trees, in
    float64."""

    def flat(tree):
        leaves = jax.tree.leaves(tree)
        return np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])

    value, reference = flat(value), flat(reference)
    return float(np.linalg.norm(value - reference) / np.linalg.norm(reference))


def precision(sizes: Sizes) -> dict[str, Any]:
    """Float32 matmuls under each default precision (speed, error against
    float64), and one EKFAC update under each default: the library's (its
    matmuls float32, as shipped) and `dense_ekfac_update` with its matmuls
    following the default."""
    n = sizes.matmul_size
    a, b = (random_matrix(k, n, n) for k in jax.random.split(jax.random.key(0), 2))
    # The error on the first rows: a float64 product of all of them on the
    # host would take longer than the whole part.
    rows = min(n, 256)
    exact = np.asarray(a[:rows], np.float64) @ np.asarray(b, np.float64)
    matmuls = {}
    for name in PRECISIONS:
        with jax.default_matmul_precision(name):
            product = jax.jit(jnp.matmul)  # traced under `name`
            timing = median_seconds(lambda product=product: product(a, b), 5)
            error = _relative(product(a, b)[:rows], exact)
        matmuls[name] = timing | {
            "tflops": 2 * n**3 / timing["median_seconds"] / 1e12,
            "relative_error_vs_float64": error,
        }
        print(
            f"matmul {n}^3 at {name}: {matmuls[name]['tflops']:.1f} TFLOP/s, "
            f"relative error {error:.1e}"
        )

    width = sizes.precision_width
    inputs = conditioned_inputs(width, 4 * width, condition=1e4)
    labels = np.random.default_rng(1).integers(0, 10, len(inputs))
    model = nn.Dense(10)
    params = model.init(jax.random.key(0), inputs[:1])["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    ekfac_curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = ekfac_curvature.layers(params, inputs, labels)
    tx = oek.scale_by_ekfac(layers, damping=DAMPING)

    def update(params, x, y):
        _, grads, stats = ekfac_curvature.value_grad_and_stats(params, x, y)
        return tx.update(grads, tx.init(params), params, stats=stats)[0]

    def library_update_under(default: str) -> Any:
        with jax.default_matmul_precision(default):
            # A new function, so a new trace under `default`.
            return jax.jit(lambda *args: update(*args))(params, inputs, labels)

    # The written-out update's inputs, fixed in float32: only its own matmuls'
    # precision changes between the runs.
    rows, output_grads, gradient = dense_rows(params, inputs, labels)

    def written_out(default: str, follows_default: bool) -> Any:
        matmul_precision = None if follows_default else jax.lax.Precision.HIGHEST
        with jax.default_matmul_precision(default):
            run = jax.jit(
                functools.partial(dense_ekfac_update, precision=matmul_precision)
            )
            return run(rows, output_grads, gradient, DAMPING)

    library_reference = library_update_under("float32")
    written_reference = written_out("float32", False)
    updates = {}
    for default in PRECISIONS[1:]:
        name = f"default {default}, library matmuls float32 (as shipped)"
        updates[name] = _relative(library_update_under(default), library_reference)
        print(f"EKFAC update, {name}: relative change {updates[name]:.1e}")
        name = f"default {default}, EKFAC's matmuls {default} (written out)"
        updates[name] = _relative(written_out(default, True), written_reference)
        print(f"EKFAC update, {name}: relative change {updates[name]:.1e}")
    return {
        "matmul_size": n,
        "matmuls": matmuls,
        "ekfac_update": {
            "problem": f"one Dense({width} -> 10), {4 * width} examples, input "
            f"factor condition 1e4, softmax cross-entropy, damping {DAMPING}, one "
            "update from a fresh state; written out: the empirical Fisher's "
            "factors, eigenbases, exact scalings and preconditioned gradient",
            "relative_change_vs_float32": updates,
        },
    }


def dense_rows(params: Any, inputs: np.ndarray, labels: np.ndarray) -> tuple:
    """A `Dense` layer's rows for `dense_ekfac_update`, in float32 from a
    float64 computation: its inputs with a ones column for the bias, the
    per-example output gradients of the softmax cross-entropy (the empirical
    Fisher's), and the mean loss's gradient `[kernel; bias]`."""
    kernel = np.asarray(params["kernel"], np.float64)
    bias = np.asarray(params["bias"], np.float64)
    rows = np.concatenate([inputs, np.ones((len(inputs), 1))], 1).astype(np.float64)
    logits = rows @ np.concatenate([kernel, bias[None]], 0)
    probabilities = np.exp(logits - logits.max(1, keepdims=True))
    probabilities /= probabilities.sum(1, keepdims=True)
    output_grads = probabilities - np.eye(kernel.shape[1])[labels]
    gradient = rows.T @ output_grads / len(rows)
    return tuple(np.float32(x) for x in (rows, output_grads, gradient))


def dense_ekfac_update(
    rows: jax.Array,
    output_grads: jax.Array,
    gradient: jax.Array,
    damping: float,
    precision: jax.lax.Precision | None,
) -> jax.Array:
    """One EKFAC update of a `Dense` layer from a fresh state, written out with
    every matmul at `precision` (None: the ambient default).

    The library's update does the same in float32 whatever the default; this
    is what its matmuls would do to the update if they followed a coarse one.

    Args:
        rows: `[N, d_in + 1]`, the layer's inputs with a ones column.
        output_grads: `[N, d_out]`, the per-example gradients at its outputs.
        gradient: `[d_in + 1, d_out]`, the gradient of the kernel and bias.
        damping: `λ`; at least the library's floor `ρ max(S)`
            (`optax_ekfac.relative_damping_floor`) is used, as it does.
        precision: of every matmul.

    Returns:
        `U_A [(U_Aᵀ G U_B) / (S + λ')] U_Bᵀ`, with `A = aᵀa / N`, `B = gᵀg / N`
        and the scalings `S = mean_n ((U_Aᵀ a_n)(U_Bᵀ g_n)ᵀ)²`.
    """
    matmul = functools.partial(jnp.matmul, precision=precision)
    count = rows.shape[0]
    _, input_basis = jnp.linalg.eigh(matmul(rows.T, rows) / count)
    _, output_basis = jnp.linalg.eigh(matmul(output_grads.T, output_grads) / count)
    scalings = (
        matmul(
            jnp.square(matmul(rows, input_basis)).T,
            jnp.square(matmul(output_grads, output_basis)),
        )
        / count
    )
    floor = oek.relative_damping_floor(jnp.float32) * scalings.max()
    projected = matmul(matmul(input_basis.T, gradient), output_basis)
    projected = projected / (scalings + jnp.maximum(damping, floor))
    return matmul(matmul(input_basis, projected), output_basis.T)


def eigh(sizes: Sizes) -> dict[str, Any]:
    """Seconds of the library's float32 `eigh` at each size, next to a
    float32 matmul of the same size; the warm-started refresh's slot."""
    decompose = jax.jit(curvature.symmetric_eigh)
    multiply = jax.jit(functools.partial(jnp.matmul, precision="highest"))
    rows = {}
    for n in sizes.eigh_sizes:
        x = random_matrix(jax.random.key(n), n, 2 * n)
        factor = jax.jit(
            lambda x: jnp.matmul(x, x.T, precision="highest") / x.shape[1]
        )(x)
        seconds = median_seconds(lambda f=factor: decompose(f), sizes.eigh_repeats)
        matmul = median_seconds(lambda f=factor: multiply(f, f), sizes.eigh_repeats)
        rows[str(n)] = seconds | {
            "matmul_median_seconds": matmul["median_seconds"],
            "ratio_to_matmul": seconds["median_seconds"] / matmul["median_seconds"],
            "gflops_at_9n3": cost.EIGH_FLOPS_PER_CUBE
            * n**3
            / seconds["median_seconds"]
            / 1e9,
        }
        print(
            f"eigh {n}: {1e3 * seconds['median_seconds']:.1f} ms, "
            f"{rows[str(n)]['ratio_to_matmul']:.1f} x a {n}^3 float32 matmul"
        )
    return {
        "dtype": "float32",
        "sizes": rows,
        "warm_started_refresh": warm_started_refresh(),
    }


def warm_started_refresh() -> dict[str, Any]:
    """The slot of a warm-started eigenbasis refresh: none in `optax_ekfac`
    yet, so nothing is measured; a setting of `scale_by_ekfac` whose name
    mentions "warm" is reported as found, to be measured here."""
    import inspect

    found = [
        name
        for name in inspect.signature(oek.scale_by_ekfac).parameters
        if "warm" in name
    ]
    return {
        "available": bool(found),
        "settings": found,
        "median_seconds": None,
        "note": "optax_ekfac has no warm-started refresh yet (step-control issue); "
        "measure it here when it does",
    }


def sharding(sizes: Sizes) -> dict[str, Any]:
    """Two EKFAC steps (eigenbases at the first) with the batch sharded over
    every device, against the same steps on one device."""
    num_devices = jax.device_count()
    width = sizes.sharding_width
    # More examples than inputs: full-rank factors, so the eigenbases (and the
    # updates) don't depend on how round-off splits a null space.
    bench = wide_mlp(width, 2 * width * num_devices)
    x, y = bench.train
    curvature_of = oek.Curvature(bench.loss_fn, fisher_type="empirical")
    layers = curvature_of.layers(bench.params, x, y)
    # A damping well above the round-off that a softmax's null direction
    # divides (see README, damping), so that a difference means a bug.
    tx = oek.scale_by_ekfac(layers, damping=1e-1, eigen_update_every=2)

    @jax.jit
    def step(params, state, x, y):
        _, grads, stats = curvature_of.value_grad_and_stats(params, x, y)
        updates, state = tx.update(grads, state, params, stats=stats)
        return optax.apply_updates(params, updates), state, updates

    def train(mesh):
        params, state, batch = bench.params, tx.init(bench.params), (x, y)
        context = contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)
        with context:
            if mesh is not None:
                replicated = jax.sharding.NamedSharding(mesh, jax.P())
                params, state = jax.device_put((params, state), replicated)
                batch = jax.device_put(
                    batch, jax.sharding.NamedSharding(mesh, jax.P("data"))
                )
            history = []
            for _ in range(2):
                params, state, updates = step(params, state, *batch)
                history.append(jax.device_get(updates))
        return history

    mesh = jax.make_mesh((num_devices,), ("data",))
    single, sharded = train(None), train(mesh)
    differences = [
        max(
            _relative(a, b)
            for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(other), strict=True)
        )
        for one, other in zip(sharded, single, strict=True)
    ]
    print(f"sharded over {num_devices} devices: relative differences {differences}")
    if max(differences) > 1e-3:
        raise AssertionError(f"sharded steps differ from one device's: {differences}")
    return {"num_devices": num_devices, "relative_difference_per_step": differences}


def wide_mlp(width: int, batch_size: int, seed: int = 0) -> specs.Problem:
    """An MLP `width`-`width`-`width`-10 on `batch_size` synthetic examples
    (the step cost does not depend on the data)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, width)).astype(np.float32)
    y = rng.integers(0, 10, batch_size).astype(np.int32)
    model = mlp.MLP(hidden=(width, width))

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    return specs.Problem(
        name=f"mlp{width}",
        title=f"MLP {width}-{width}-{width}-10, synthetic data",
        loss_fn=loss_fn,
        params=jax.jit(model.init)(jax.random.key(seed), x[:1])["params"],
        train=(x, y),
        test=(x, y),
        batch_size=batch_size,
        target_loss=0.0,
    )


def mlp_step_cost(sizes: Sizes) -> dict[str, Any]:
    """`mlp.step_cost` for each width and batch size; the widest at the
    largest batch is profiled."""
    rows: dict[str, list[mlp.StepCost]] = {}
    largest = (max(sizes.mlp_widths), max(sizes.mlp_batch_sizes))
    for width in sizes.mlp_widths:
        rows[str(width)] = []
        for batch_size in sizes.mlp_batch_sizes:
            rows[str(width)] += mlp.step_cost(
                [batch_size],
                rounds=sizes.step_rounds,
                profile_rounds=sizes.profile_rounds
                if (width, batch_size) == largest
                else 0,
                make_problem=functools.partial(wide_mlp, width),
            )
        mlp.report_step_cost(rows[str(width)], f"MLP {width}-{width}-{width}-10")
    return {"eigen_update_every": mlp.EIGEN_UPDATE_EVERY, "widths": rows}


def memory(sizes: Sizes) -> dict[str, Any]:
    """Peak memory of Adam's and EKFAC's steps at the largest batch.

    `compiled`: the step's `memory_analysis()` (what XLA allocates for one
    step). `device_peak_bytes`: the device's `peak_bytes_in_use` after three
    steps, process-wide; the steps run from the smallest to the largest, so
    each reading is that step's peak where it exceeds every earlier one.
    """
    batch_size = max(sizes.mlp_batch_sizes)
    optimizers = {"Adam": specs.adam([1e-3]), "EKFAC defaults": specs.ekfac_defaults()}
    rows: dict[str, dict[str, Any]] = {}
    for width in sorted(sizes.mlp_widths):
        bench = wide_mlp(width, batch_size)
        layers = oek.Curvature(bench.loss_fn).layers(bench.params, *bench.train)
        train = jax.device_put(bench.train)
        indices = jax.device_put(np.arange(batch_size, dtype=np.int32))
        rows[str(width)] = {}
        for name, optimizer in optimizers.items():
            step = running.TrainStep(bench, optimizer, layers)
            state = running.initial_state(optimizer, layers, bench.params)
            hyperparameters = running.hyperparameter_arrays(optimizer.sweep[0])
            args = (bench.params, state, hyperparameters, train, indices)
            compiled = running.memory_of(step.jitted, *args, jax.random.key(0))
            params = bench.params
            for i in range(3):
                params, state, _ = jax.block_until_ready(
                    step(
                        params,
                        state,
                        hyperparameters,
                        train,
                        indices,
                        jax.random.key(i),
                    )
                )
            stats = jax.devices()[0].memory_stats() or {}
            rows[str(width)][name] = {
                "compiled": compiled,
                "device_peak_bytes": stats.get("peak_bytes_in_use"),
                "device_bytes_in_use": stats.get("bytes_in_use"),
            }
            del params, state
        adam = rows[str(width)]["Adam"]["compiled"].peak_bytes
        for name, row in rows[str(width)].items():
            row["compiled_ratio_to_adam"] = row["compiled"].peak_bytes / adam
            device_peak = row["device_peak_bytes"]
            print(
                f"memory, width {width}, batch {batch_size}, {name}: compiled "
                f"{row['compiled'].peak_bytes / 2**20:.1f} MiB "
                f"({row['compiled_ratio_to_adam']:.2f} x Adam), device peak "
                + ("-" if device_peak is None else f"{device_peak / 2**20:.1f} MiB")
            )
    return {"batch_size": batch_size, "widths": rows}


def transformer_lm(sizes: Sizes) -> dict[str, Any]:
    """EKFAC's defaults against Adam's best on the transformer LM."""
    problem = transformer.problem(**sizes.transformer)
    comparison = running.compare(
        problem,
        [specs.ekfac_defaults(), specs.adam(sizes.adam_learning_rates)],
        specs.Settings(
            steps=sizes.transformer_steps,
            warmup_steps=3,
            eval_every=sizes.transformer_eval_every,
        ),
    )
    reporting.print_comparison(comparison)
    targets = reporting.fewer_steps_and_no_more_time(comparison)
    reporting.print_targets(targets)
    return {"comparison": comparison, "targets": targets}


PARTS: dict[str, Callable[[Sizes], Any]] = {
    "device": device,
    "precision": precision,
    "eigh": eigh,
    "sharding": sharding,
    "mlp_step_cost": mlp_step_cost,
    "memory": memory,
    "transformer": transformer_lm,
}


# --- the JSON ---------------------------------------------------------------------


def run_parts(
    names: Sequence[str], sizes: Sizes, path: pathlib.Path, dry_run: bool
) -> bool:
    """Runs each part, adding its numbers (or its error) to the JSON at
    `path` as soon as it ends. Returns whether every part succeeded."""
    ok = True
    for name in names:
        start = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            with jax.default_matmul_precision(MODEL_PRECISION):
                result, status, error = PARTS[name](sizes), "ok", None
        except Exception:  # a failed part is reported; the others run
            result, status, error = None, "failed", traceback.format_exc()
            print(error, file=sys.stderr)
            ok = False
        seconds = time.perf_counter() - start
        print(f"-- {name}: {status} in {seconds:.1f} s", flush=True)
        record = json.loads(path.read_text()) if path.exists() else {}
        record.setdefault("dry_run", dry_run)
        record.setdefault("sizes", dataclasses.asdict(sizes))
        record.setdefault("parts", {})[name] = {
            "status": status,
            "seconds": seconds,
        } | ({"error": error[-4000:]} if error else {})
        record.setdefault("results", {})[name] = result
        storage.write_json(path, record)
    return ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", metavar="PART", help=", ".join(PARTS))
    parser.add_argument("--json", type=pathlib.Path, help="the results file")
    parser.add_argument("--dry-run", action="store_true", help="tiny sizes")
    parser.add_argument(
        "--slug-file",
        type=pathlib.Path,
        help="only print the devices and write the first one's file-name part "
        "(`nvidia-h200`) to this file",
    )
    args = parser.parse_args(argv)
    if args.slug_file is not None:
        print(f"devices: {jax.devices()}")
        args.slug_file.write_text(device_slug())
        return 0
    if args.json is None:
        parser.error("--json is required")
    unknown = set(args.parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown parts {sorted(unknown)}; known: {', '.join(PARTS)}")
    running.limit_blas_threads()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    sizes = DRY_RUN if args.dry_run else FULL
    return 0 if run_parts(args.parts, sizes, args.json, args.dry_run) else 1


if __name__ == "__main__":
    sys.exit(main())
