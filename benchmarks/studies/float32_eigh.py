"""Float32 accuracy: how far a float32 update is from the float64 one.

One `nn.Dense(8)` layer on `d`-wide inputs whose input factor `A = mean a aᵀ`
has a chosen condition number (`x = z diag(s) Q`, `s` log-spaced, `Q` a
random rotation, so the small directions are not axis-aligned), a softmax
cross-entropy or squared-error loss, and one update of `scale_by_ekfac` from a
fresh state (the state then holds exactly this batch's statistics), for EKFAC
and K-FAC. Every error is `‖u − u_ref‖ / ‖u_ref‖` against the float64 update
(float64 parameters and inputs, float64 eigendecompositions) at the damping
`λ`, or at the floored damping `λ' = max(λ, ρ max S)` where so named:

* `no_floor`: float32, `λ' = λ` (what `scale_by_ekfac` did before the floor);
* `eigh_float64`: float32 factors decomposed in float64, `λ' = λ`;
* `default`: `scale_by_ekfac`'s float32 update, `λ' = max(λ, ρ max S)` with
  `ρ = relative_damping_floor(float32) = 100 eps`;
* `floor[ρ]` for other `ρ`: against the reference at `λ` (`vs_damping`, what
  the floor changes) and at `λ'` (`vs_floored`, what is left of round-off);
* `intrinsic`: the float64 update of the inputs rounded to float32 (the
  parameters are float32 values in every run): how much the problem itself
  moves under a float32 perturbation of its data.

The float32 runs compute the forward and backward pass in float32 too, so
their round-off includes the gradient's: a softmax's output gradients sum to
zero, so `B` has a null direction in which the float64 gradient is zero and
the float32 one is round-off, which a tiny damping divides by almost nothing.

Usage:
    python -m benchmarks.studies.float32_eigh [--quick] [--out benchmarks/results]
"""

import argparse
import itertools
import json
import pathlib
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_enable_x64", True)

import optax_ekfac as oek  # noqa: E402
from optax_ekfac._src import blocks, kinds  # noqa: E402

OUTPUTS = 8
DAMPINGS = [1e-8, 1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]
FLOORS = [1e-6, 1e-5, 1e-4]
LOSSES = {
    "softmax_cross_entropy": oek.softmax_cross_entropy,
    "squared_error": oek.squared_error,
}


def inputs(width: int, num_examples: int, condition: float, seed: int = 0):
    """`[N, width]` float64 inputs whose second moment has about `condition`."""
    rng = np.random.default_rng(seed)
    rotation, _ = np.linalg.qr(rng.standard_normal((width, width)))
    scales = np.logspace(0, -0.5 * np.log10(condition), width)
    return rng.standard_normal((num_examples, width)) @ np.diag(scales) @ rotation


def targets(loss: str, num_examples: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    if loss == "softmax_cross_entropy":
        return rng.integers(0, OUTPUTS, num_examples)
    return rng.standard_normal((num_examples, OUTPUTS))


def states(x, y, loss: str, dtype: Any, kfac: bool, eigh_dtype: Any = None):
    """`(layers, block gradient G, block state)` after one update."""
    model = nn.Dense(OUTPUTS, param_dtype=dtype)
    params = nn.Dense(OUTPUTS, param_dtype=jnp.float32).init(
        jax.random.key(0), jnp.zeros((1, x.shape[1]), jnp.float32)
    )["params"]
    params = jax.tree.map(lambda p: p.astype(dtype), params)
    x = jnp.asarray(x, dtype)
    y = jnp.asarray(y) if y.dtype.kind == "i" else jnp.asarray(y, dtype)

    def loss_fn(params, x, y):
        return LOSSES[loss](model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    tx = oek.scale_by_ekfac(
        layers, eigenvalue_correction=not kfac, eigh_dtype=eigh_dtype
    )

    @jax.jit
    def first_update(params, x, y):
        _, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, state = tx.update(grads, tx.init(params), stats=stats)
        return grads, updates, state

    grads, updates, state = first_update(params, x, y)
    (block,) = layers.blocks
    gradient = kinds.block_matrix(block, blocks.leaves_by_path(grads))
    # The default update is `precondition` with the default floor (checked
    # once, at the default damping).
    expected = kinds.block_matrix(block, blocks.leaves_by_path(updates))
    np.testing.assert_allclose(
        expected,
        oek.precondition(state.blocks[block.name], gradient, 1e-3),
        rtol=1e3 * float(jnp.finfo(dtype).eps),
        atol=1e3 * float(jnp.finfo(dtype).eps) * float(jnp.abs(expected).max()),
    )
    return gradient, state.blocks[block.name]


_precondition = jax.jit(oek.precondition)


def update(gradient, block_state, damping, floor):
    damping = jnp.asarray(damping, block_state.scalings.dtype)
    return np.float64(_precondition(block_state, gradient, damping, floor))


def error(update, reference) -> float:
    return float(np.linalg.norm(update - reference) / np.linalg.norm(reference))


def measure(loss: str, condition: float, kfac: bool, width: int, num_examples: int):
    x = inputs(width, num_examples, condition)
    y = targets(loss, num_examples)
    rounded = np.float64(np.float32(x))
    y_rounded = y if y.dtype.kind == "i" else np.float64(np.float32(y))
    g64, s64 = states(x, y, loss, jnp.float64, kfac, jnp.float64)
    g_intrinsic, s_intrinsic = states(
        rounded, y_rounded, loss, jnp.float64, kfac, jnp.float64
    )
    g32, s32 = states(x, y, loss, jnp.float32, kfac)
    g32e, s32e = states(x, y, loss, jnp.float32, kfac, jnp.float64)
    max_scaling = float(s64.scalings.max())
    default_floor = oek.relative_damping_floor(jnp.float32)
    rows = []
    for damping in DAMPINGS:

        def reference(floor, damping=damping):
            return update(g64, s64, max(damping, floor * max_scaling), 0.0)

        at_damping = reference(0.0)
        row = dict(
            loss=loss,
            condition=condition,
            method="kfac" if kfac else "ekfac",
            width=width,
            damping=damping,
            max_scaling=max_scaling,
            min_scaling=float(s64.scalings.min()),
            intrinsic=error(update(g_intrinsic, s_intrinsic, damping, 0.0), at_damping),
            no_floor=error(update(g32, s32, damping, 0.0), at_damping),
            eigh_float64=error(update(g32e, s32e, damping, 0.0), at_damping),
            default_vs_damping=error(update(g32, s32, damping, None), at_damping),
            default_vs_floored=error(
                update(g32, s32, damping, None), reference(default_floor)
            ),
            floors={},
        )
        for floor in FLOORS:
            floored = update(g32, s32, damping, floor)
            row["floors"][f"{floor:g}"] = dict(
                vs_damping=error(floored, at_damping),
                vs_floored=error(floored, reference(floor)),
                intrinsic=error(
                    update(g_intrinsic, s_intrinsic, damping, floor), reference(floor)
                ),
            )
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    conditions = [1e12] if args.quick else [1.0, 1e4, 1e8, 1e12]
    shapes = [(32, 256)] if args.quick else [(32, 256), (256, 1024)]
    rows = []
    print(
        f"{'loss':<22} {'cond':>6} {'method':<6} {'d':>4} {'damping':>8} "
        f"{'max S':>8} {'intrinsic':>9} {'no_floor':>9} {'eigh_f64':>9} "
        f"{'default':>9} {'vs λ_eff':>9}"
    )
    for (width, num_examples), loss, condition, kfac in itertools.product(
        shapes, LOSSES, conditions, (False, True)
    ):
        for row in measure(loss, condition, kfac, width, num_examples):
            rows.append(row)
            print(
                f"{row['loss']:<22} {row['condition']:>6.0e} {row['method']:<6} "
                f"{row['width']:>4} {row['damping']:>8.0e} {row['max_scaling']:>8.2e} "
                f"{row['intrinsic']:>9.1e} {row['no_floor']:>9.1e} "
                f"{row['eigh_float64']:>9.1e} {row['default_vs_damping']:>9.1e} "
                f"{row['default_vs_floored']:>9.1e}",
                flush=True,
            )
    worst = {
        f"{floor:g}": max(row["floors"][f"{floor:g}"]["vs_floored"] for row in rows)
        for floor in FLOORS
    }
    print("worst error against the float64 update at the floored damping:", worst)
    results = dict(
        problem="float32_eigh",
        default_floor=oek.relative_damping_floor(jnp.float32),
        worst_vs_floored=worst,
        rows=rows,
    )
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "float32_eigh.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
