"""Weight-sharing layers: EKFAC's step time over Adam's, and scalings memory.

For a convolution layer and a transformer attention block (synthetic data: the
cost does not depend on it), one run times the train step of Adam and of EKFAC
with each way of computing the scalings, the steps taking turns:

* `exact, one chunk`: exact per-example scalings
  `mean_n (U_Aᵀ G_n U_B)²` with every example's projected gradient in memory
  at once (`max_per_example_elements` above `N * d_in * d_out`);
* `exact, chunked`: the same in chunks of a few examples
  (`max_per_example_elements` small), which bounds the per-example tensor;
* `per_position`: every position its own example (two matmuls, no
  per-example tensor).

Statistics are refreshed every step (the most expensive setting) and the
eigenbases every 10 steps. Memory is that of the compiled executables
(`memory_analysis()`: arguments + outputs + temporaries - aliased), for the
whole train step and for the EKFAC update alone, where the scalings' working
memory shows.

Usage:
    python -m benchmarks.problems.layer_cost [--quick] [--out DIR]
"""

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import optax_ekfac as oek
from benchmarks.harness import cli, cost, running, specs, storage
from benchmarks.harness.records import BenchmarkResult, Memory

EIGEN_UPDATE_EVERY = 10
CHUNKED_ELEMENTS = 2**16
ONE_CHUNK_ELEMENTS = 2**30


class ConvLayer(nn.Module):
    """One 3x3 convolution."""

    features: int = 64

    @nn.compact
    def __call__(self, images):
        return nn.Conv(self.features, (3, 3))(images)


class AttentionBlock(nn.Module):
    """A pre-LayerNorm transformer block: causal self-attention, GELU MLP."""

    num_heads: int = 4
    mlp_width: int = 512

    @nn.compact
    def __call__(self, x):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        attention = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)
        x = x + attention(nn.LayerNorm()(x), mask=mask)
        hidden = nn.gelu(nn.Dense(self.mlp_width)(nn.LayerNorm()(x)))
        return x + nn.Dense(x.shape[-1])(hidden)


def regression_problem(
    name: str, model: nn.Module, inputs_shape: tuple[int, ...], token_losses: bool
) -> specs.Problem:
    """Random inputs and targets; squared error per example (all positions in
    one loss term) or per token (`[B, T]` losses)."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=inputs_shape).astype(np.float32)
    params = model.init(jax.random.key(0), inputs[:1])["params"]
    outputs = jax.eval_shape(lambda x: model.apply({"params": params}, x), inputs)
    targets = rng.normal(size=outputs.shape).astype(np.float32)

    def loss_fn(params, inputs, targets):
        predictions = model.apply({"params": params}, inputs)
        if not token_losses:
            predictions = predictions.reshape(len(predictions), -1)
            targets = targets.reshape(len(targets), -1)
        return oek.squared_error(predictions, targets)

    return specs.Problem(
        name=name,
        title=name,
        loss_fn=loss_fn,
        params=params,
        train=(inputs, targets),
        test=(inputs, targets),
        batch_size=inputs_shape[0],
        target_loss=0.0,
    )


def ekfac_variants(damping: float = 1e-3) -> dict[str, specs.Optimizer]:
    """EKFAC with each way of computing the scalings, and Adam."""
    setting = [{"learning_rate": 1e-4, "damping": damping}]

    def ekfac(**settings):
        return specs.ekfac(setting, eigen_update_every=EIGEN_UPDATE_EVERY, **settings)

    return {
        "Adam": specs.adam([1e-4]),
        "EKFAC exact, one chunk": ekfac(max_per_example_elements=ONE_CHUNK_ELEMENTS),
        "EKFAC exact, chunked": ekfac(max_per_example_elements=CHUNKED_ELEMENTS),
        "EKFAC per_position": ekfac(scalings="per_position"),
    }


@dataclasses.dataclass(frozen=True)
class VariantCost:
    """One variant's step time (the steps taking turns) and compiled memory.

    Attributes:
        median_ms: median milliseconds per step.
        mean_ms: mean milliseconds per step.
        median_ratio_to_adam: `median_ms` over Adam's.
        mean_ratio_to_adam: `mean_ms` over Adam's.
        memory: `"step"`: the whole train step's; `"update"` (EKFAC only):
            the EKFAC update's alone, where the scalings' working memory shows.
    """

    median_ms: float
    mean_ms: float
    median_ratio_to_adam: float
    mean_ratio_to_adam: float
    memory: dict[str, Memory]


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """Every variant on one layer.

    Attributes:
        layers: the printed `optax_ekfac.Layers` table.
        batch_shape: the shape of the inputs of one step.
        variants: variant name -> its cost.
    """

    layers: str
    batch_shape: list[int]
    variants: dict[str, VariantCost]


def measure(problem: specs.Problem, rounds: int) -> LayerCost:
    """Step times (taking turns) and compiled memory of every variant."""
    train = jax.device_put(problem.train)
    batch = problem.train
    curvature = oek.Curvature(problem.loss_fn, fisher_type="empirical")
    layers = curvature.layers(problem.params, *batch)
    indices = [jax.device_put(np.arange(problem.batch_size, dtype=np.int32))]
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(problem.params, *batch)
    calls: dict[str, Callable[[], Any]] = {}
    memory: dict[str, dict[str, Memory]] = {}
    for name, optimizer in ekfac_variants().items():
        step = running.TrainStep(problem, optimizer, layers)
        traced = running.hyperparameter_arrays(optimizer.sweep[0])
        opt_state = running.initial_state(optimizer, layers, problem.params)
        calls[name] = cost.stepper(
            step, problem.params, opt_state, traced, train, indices
        )
        memory[name] = {
            "step": running.memory_of(
                step.jitted,
                problem.params,
                opt_state,
                traced,
                train,
                indices[0],
                jax.random.key(0),
            )
        }
        if optimizer.uses_stats:
            tx = optimizer.make(layers, **optimizer.sweep[0])
            update = jax.jit(lambda g, s, p, st, tx=tx: tx.update(g, s, p, stats=st))
            memory[name]["update"] = running.memory_of(
                update, grads, opt_state, problem.params, stats
            )
    cost.interleaved_timings(calls, 1, EIGEN_UPDATE_EVERY)  # compile, warm up
    seconds = cost.interleaved_timings(calls, rounds, EIGEN_UPDATE_EVERY)
    adam_median = statistics.median(seconds["Adam"])
    adam_mean = statistics.fmean(seconds["Adam"])
    return LayerCost(
        layers=str(layers),
        batch_shape=list(problem.train[0].shape),
        variants={
            name: VariantCost(
                median_ms=1e3 * statistics.median(times),
                mean_ms=1e3 * statistics.fmean(times),
                median_ratio_to_adam=statistics.median(times) / adam_median,
                mean_ratio_to_adam=statistics.fmean(times) / adam_mean,
                memory=memory[name],
            )
            for name, times in seconds.items()
        },
    )


def report(name: str, result: LayerCost) -> None:
    """Prints one layer's table: step times, ratios to Adam, memory."""
    print(f"\n== {name}, batch {result.batch_shape}")
    print(result.layers)
    print(
        f"{'variant':<24}{'median ms':>10}{'/Adam':>7}{'mean ms':>9}{'/Adam':>7}"
        f"{'step MB':>9}{'update MB':>10}{'update temp MB':>15}"
    )
    for variant, row in result.variants.items():
        update = row.memory.get("update")
        print(
            f"{variant:<24}{row.median_ms:>10.2f}"
            f"{row.median_ratio_to_adam:>7.2f}{row.mean_ms:>9.2f}"
            f"{row.mean_ratio_to_adam:>7.2f}"
            f"{row.memory['step'].peak_bytes / 2**20:>9.2f}"
            + (
                f"{update.peak_bytes / 2**20:>10.2f}{update.temp_bytes / 2**20:>15.2f}"
                if update
                else ""
            )
        )


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    args = cli.arguments(__doc__, steps_help=None).parse_args(argv)
    running.limit_blas_threads()
    conv_batch, attention_batch = (16, 8) if args.quick else (64, 32)
    problems = {
        "conv 3x3, 32 -> 64 channels, 16x16 images": regression_problem(
            "conv", ConvLayer(), (conv_batch, 16, 16, 32), token_losses=False
        ),
        "attention block, width 128, 4 heads, MLP 512, 64 tokens": (
            regression_problem(
                "attention",
                AttentionBlock(),
                (attention_batch, 64, 128),
                token_losses=True,
            )
        ),
    }
    machine = storage.machine_info()
    costs = {}
    for name, problem in problems.items():
        costs[name] = measure(problem, rounds=2 if args.quick else 8)
        report(name, costs[name])
    print(
        "memory: compiled memory_analysis (arguments + outputs + temporaries - "
        "aliased); the update alone shows the scalings' working memory."
    )
    result = BenchmarkResult(
        "layer_cost",
        sections={
            "machine": machine,
            "settings": {
                "eigen_update_every": EIGEN_UPDATE_EVERY,
                "stats_update_every": 1,
                "chunked_max_per_example_elements": CHUNKED_ELEMENTS,
                "one_chunk_max_per_example_elements": ONE_CHUNK_ELEMENTS,
            },
            "layers": costs,
        },
    )
    storage.save(result, args.out)
    return result


if __name__ == "__main__":
    main()
