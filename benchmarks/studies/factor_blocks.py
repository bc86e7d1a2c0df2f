"""Block-diagonal factors: what `max_factor_dim` costs and saves on a wide head.

On one `Dense(256 -> 8192)` output head (softmax cross-entropy over 8192
classes, batch 32), for each `max_factor_dim` (the output side split into
`ceil(8192 / max_factor_dim)` diagonal blocks):

* `eigh`: seconds of one float32 `b x b` eigendecomposition, and of the whole
  8192-wide side (`k` of them, one at a time as the CPU path runs them);
* `update`: the median seconds of `scale_by_ekfac`'s update without an
  eigenbasis refresh (factors, scalings, the four rotations) and with one;
* `state`: the bytes of the head's factors and eigenbases.

Usage:
    python -m benchmarks.studies.factor_blocks [--quick]
"""

import argparse
import statistics
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import optax_ekfac as oek
from benchmarks.harness import running
from optax_ekfac._src import curvature

WIDTH, CLASSES, BATCH = 256, 8192, 32


def _eigh_seconds(size: int, repeats: int) -> float:
    rows = jax.random.normal(jax.random.key(0), (size, 2 * size), jnp.float32)
    factor = rows @ rows.T / (2 * size)
    decompose = jax.jit(curvature.symmetric_eigh)
    jax.block_until_ready(decompose(factor))
    return statistics.median(
        running.timed_call(decompose, factor)[1] for _ in range(repeats)
    )


def _update_seconds(max_factor_dim: int, repeats: int) -> dict[str, float]:
    model = nn.Dense(CLASSES)
    keys = jax.random.split(jax.random.key(1), 3)
    x = jax.random.normal(keys[0], (BATCH, WIDTH))
    y = jax.random.randint(keys[1], (BATCH,), 0, CLASSES)
    params = model.init(keys[2], x)["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature_ = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature_.layers(params, x, y)
    tx = oek.scale_by_ekfac(layers, max_factor_dim=max_factor_dim)
    _, grads, stats = jax.jit(curvature_.value_grad_and_stats)(params, x, y)
    update = jax.jit(
        lambda grads, state, params, stats: tx.update(grads, state, params, stats=stats)
    )
    fresh = tx.init(params)
    # After one update the count is 1: the next update refreshes no eigenbasis.
    _, refreshed = jax.block_until_ready(update(grads, fresh, params, stats))
    seconds = {}
    for name, state in (("update", refreshed), ("update_with_eigh", fresh)):
        times = [
            running.timed_call(update, grads, state, params, stats)[1]
            for _ in range(repeats)
        ]
        seconds[name] = statistics.median(times)
    block = refreshed.blocks[layers.blocks[0].name]
    seconds["state_bytes"] = sum(
        array.nbytes
        for array in (
            block.input_factor,
            block.output_factor,
            block.input_eigenbasis,
            block.output_eigenbasis,
        )
    )
    return seconds


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    args = parser.parse_args(argv)
    running.limit_blas_threads()
    sizes = (256, 512) if args.quick else (512, 1024, 2048, 4096)
    repeats = 1 if args.quick else 3
    print(f"Dense({WIDTH} -> {CLASSES}), batch {BATCH}, float32, one BLAS thread")
    print("max_factor_dim  eigh b x b  eigh side  update  update+eigh  state MiB")
    for size in sizes:
        blocks = curvature.diagonal_blocks(CLASSES, size)
        num_blocks = blocks[0] if blocks else 1
        eigh = _eigh_seconds(size, repeats)
        update = _update_seconds(size, repeats)
        print(
            f"{size:14d}  {eigh:9.3f}s  {num_blocks * eigh:8.2f}s  "
            f"{1e3 * update['update']:5.0f}ms  {update['update_with_eigh']:10.2f}s  "
            f"{update['state_bytes'] / 2**20:9.1f}",
            flush=True,
        )


if __name__ == "__main__":
    main()
