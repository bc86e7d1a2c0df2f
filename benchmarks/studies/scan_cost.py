"""Scanned layers: compile time, step time and peak memory against the unrolled model.

A 6-layer pre-LayerNorm transformer language model (Embed, causal
`MultiHeadDotProductAttention`, GELU MLP, tied-free Dense head; synthetic
tokens, `[B, T]` token losses) written three ways with the same parameters
layer by layer:

* `unrolled`: six blocks in a Python loop;
* `scan`: `nn.scan` over one block, parameters stacked on a leading axis;
* `scan+remat`: `nn.scan(nn.remat(Block))`, as production code saves memory.

For EKFAC (`ekfac_sgd(layers, learning_rate=...)`, statistics every step, the
eigendecompositions every 10) and Adam on each layout it reports:

* compile time: tracing and lowering plus XLA compilation of the jitted train
  step, each repetition on a fresh function (no cache), median over the
  repetitions;
* step time: the compiled steps taking turns (`cost.interleaved_timings`),
  10 calls per turn so every turn holds one eigendecomposition; median and
  mean per call;
* peak memory: the compiled step's `memory_analysis()`.

Usage:
    python -m benchmarks.studies.scan_cost [--quick] [--out DIR]
"""

import statistics
import time
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import optax_ekfac as oek
from benchmarks.harness import cli, cost, running, storage
from benchmarks.harness.records import BenchmarkResult

NUM_LAYERS = 6
EIGEN_UPDATE_EVERY = 10
LAYOUTS = ("unrolled", "scan", "scan+remat")


class Block(nn.Module):
    """Causal self-attention and a GELU MLP, each after a LayerNorm."""

    num_heads: int
    mlp_width: int

    @nn.compact
    def __call__(self, x, _=None):
        mask = nn.make_causal_mask(jnp.ones(x.shape[:2]))
        attention = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)
        x = x + attention(nn.LayerNorm()(x), mask=mask)
        hidden = nn.gelu(nn.Dense(self.mlp_width)(nn.LayerNorm()(x)))
        return x + nn.Dense(x.shape[-1])(hidden), None


class LanguageModel(nn.Module):
    """Token embedding, `NUM_LAYERS` blocks laid out as `layout`, a head."""

    layout: str
    vocabulary: int
    width: int
    num_heads: int

    @nn.compact
    def __call__(self, tokens):
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
        x = nn.Embed(self.vocabulary, self.width)(tokens)
        x = x + nn.Embed(tokens.shape[1], self.width)(positions)
        block_args = dict(num_heads=self.num_heads, mlp_width=4 * self.width)
        if self.layout == "unrolled":
            for layer in range(NUM_LAYERS):
                x, _ = Block(**block_args, name=f"block_{layer}")(x)
        else:
            block = Block if self.layout == "scan" else nn.remat(Block)
            x, _ = nn.scan(
                block,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=NUM_LAYERS,
            )(**block_args, name="blocks")(x, None)
        return nn.Dense(self.vocabulary)(nn.LayerNorm()(x))


def _train_step(model: nn.Module, params: Any, tokens, targets, optimizer: str):
    """A fresh train step function and its initial optimizer state."""

    def loss_fn(params, tokens, targets):
        logits = model.apply({"params": params}, tokens)
        return oek.softmax_cross_entropy(logits, targets)

    if optimizer == "adam":
        tx = optax.adam(1e-3)

        def step(params, opt_state, tokens, targets):
            loss, grads = jax.value_and_grad(
                lambda p: loss_fn(p, tokens, targets).mean()
            )(params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, loss

        return step, tx.init(params)
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, tokens, targets)
    tx = oek.ekfac_sgd(
        layers, learning_rate=1e-2, eigen_update_every=EIGEN_UPDATE_EVERY
    )

    def step(params, opt_state, tokens, targets):
        loss, grads, stats = curvature.value_grad_and_stats(params, tokens, targets)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    return step, tx.init(params)


def measure(sizes: dict[str, int], repetitions: int, rounds: int) -> dict[str, Any]:
    """Compile time, step time and memory of every layout and optimizer."""
    rng = np.random.default_rng(0)
    shape = (sizes["batch"], sizes["positions"])
    tokens = jnp.asarray(rng.integers(0, sizes["vocabulary"], shape))
    targets = jnp.asarray(rng.integers(0, sizes["vocabulary"], shape))
    models = {
        layout: LanguageModel(
            layout, sizes["vocabulary"], sizes["width"], sizes["num_heads"]
        )
        for layout in LAYOUTS
    }
    params = {
        layout: model.init(jax.random.key(0), tokens)["params"]
        for layout, model in models.items()
    }
    variants = [
        (layout, optimizer) for optimizer in ("ekfac", "adam") for layout in LAYOUTS
    ]
    compile_seconds: dict[str, list[float]] = {}
    compiled, states, memory = {}, {}, {}
    for _ in range(repetitions):  # layouts take turns
        for layout, optimizer in variants:
            name = f"{optimizer}, {layout}"
            step, state = _train_step(
                models[layout], params[layout], tokens, targets, optimizer
            )
            args = (params[layout], state, tokens, targets)
            jitted = jax.jit(step)
            start = time.perf_counter()
            executable = jitted.lower(*args).compile()
            compile_seconds.setdefault(name, []).append(time.perf_counter() - start)
            compiled[name], states[name] = executable, [params[layout], state]
            # The same program again: served by the compilation cache.
            memory[name] = running.memory_of(jitted, *args)

    def stepper(name):
        def call():
            carried = states[name]
            new_params, new_state, loss = compiled[name](*carried, tokens, targets)
            states[name] = [new_params, new_state]
            return loss

        return call

    seconds = cost.interleaved_timings(
        {name: stepper(name) for name in compiled}, rounds, EIGEN_UPDATE_EVERY
    )
    results = {}
    for name in compiled:
        results[name] = {
            "compile_seconds": compile_seconds[name],
            "median_compile_seconds": statistics.median(compile_seconds[name]),
            "median_step_ms": 1e3 * statistics.median(seconds[name]),
            "mean_step_ms": 1e3 * statistics.mean(seconds[name]),
            "step_ms_spread": [1e3 * min(seconds[name]), 1e3 * max(seconds[name])],
            "peak_bytes": memory[name].peak_bytes,
        }
    return results


def report(results: dict[str, Any]) -> None:
    print(
        f"{'':<22}{'compile s':>10}{'vs unrolled':>12}{'step ms':>10}"
        f"{'vs unrolled':>12}{'mean ms':>10}{'peak MiB':>10}{'vs unrolled':>12}"
    )
    for name, row in results.items():
        optimizer = name.split(",")[0]
        unrolled = results[f"{optimizer}, unrolled"]
        compile_ratio = (
            row["median_compile_seconds"] / unrolled["median_compile_seconds"]
        )
        print(
            f"{name:<22}{row['median_compile_seconds']:>10.2f}"
            f"{compile_ratio:>12.2f}"
            f"{row['median_step_ms']:>10.2f}"
            f"{row['median_step_ms'] / unrolled['median_step_ms']:>12.2f}"
            f"{row['mean_step_ms']:>10.2f}"
            f"{row['peak_bytes'] / 2**20:>10.2f}"
            f"{row['peak_bytes'] / unrolled['peak_bytes']:>12.2f}"
        )


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    args = cli.arguments(__doc__, steps_help=None).parse_args(argv)
    running.limit_blas_threads()
    sizes = (
        dict(vocabulary=64, width=32, num_heads=2, positions=16, batch=4)
        if args.quick
        else dict(vocabulary=96, width=128, num_heads=4, positions=64, batch=16)
    )
    results = measure(
        sizes, repetitions=1 if args.quick else 3, rounds=1 if args.quick else 5
    )
    report(results)
    result = BenchmarkResult(
        "scan_cost",
        sections={
            "machine": storage.machine_info(),
            "settings": dict(
                sizes, num_layers=NUM_LAYERS, eigen_update_every=EIGEN_UPDATE_EVERY
            ),
            "variants": results,
        },
    )
    storage.save(result, args.out)
    return result


if __name__ == "__main__":
    main()
