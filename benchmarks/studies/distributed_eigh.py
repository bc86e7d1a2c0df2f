"""Distributed eigendecompositions: an eigen-update step with and without.

On a mesh of `D` devices with the batch sharded over its "data" axis, one run
times the EKFAC train step of an MLP with wide layers, refreshing the
eigenbases at every step (`eigen_update_every=1`), in three variants whose
steps take turns:

* `distributed`: `distribute_eigh=True`, each device decomposes its share of
  the factors (greedy balance by `d³`) and a `psum` shares the results;
* `every_device`: `distribute_eigh=False`, every device decomposes every
  factor;
* `no_eigen_update`: the same step without eigendecompositions
  (`eigen_update_every` beyond the run), for how much of a step they take.

It reports `ratio = distributed / every_device` of the median step times,
`eigen_ratio`, the same for the eigendecompositions' part of the step (each
variant's median minus `no_eigen_update`'s), and `ideal_ratio`, the most
loaded device's share of the total `d³`: what `eigen_ratio` would be on `D`
real devices if the eigendecompositions cost `d³` and nothing else.

By default the devices are `D = 4` fake CPU devices (`jax_num_cpu_devices`,
set before JAX starts its CPU backend). Fake CPU devices share the host's
cores, so the ratio there is not the speed-up of `D` devices: it shows the
overhead of the switch and the `psum`, next to the host work saved because
the host no longer runs every decomposition once per fake device.

Usage:
    python -m benchmarks.studies.distributed_eigh [--quick] [--devices 4] [--out DIR]
"""

import statistics
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ekfac as oek
from benchmarks.harness import cli, running, storage
from benchmarks.harness.records import BenchmarkResult
from optax_ekfac._src import sharding

AXIS = "data"


class MLP(nn.Module):
    """Dense layers with ReLU between: wide factors, cheap forward pass."""

    widths: Sequence[int]

    @nn.compact
    def __call__(self, x):
        for width in self.widths[:-1]:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.widths[-1])(x)


def _use_devices(num_devices: int) -> list[jax.Device]:
    """`num_devices` devices: the default backend's, or fake CPU devices."""
    try:
        jax.config.update("jax_num_cpu_devices", num_devices)
    except RuntimeError:  # a backend already started: use what it has
        pass
    devices = jax.devices()
    if len(devices) < num_devices:
        devices = jax.devices("cpu")
    if len(devices) < num_devices:
        raise SystemExit(
            f"distributed_eigh: {num_devices} devices needed, {len(devices)} found; "
            "run it in a fresh process (python -m benchmarks.studies.distributed_eigh)."
        )
    return devices[:num_devices]


def _factor_costs(state: oek.ScaleByEkfacState) -> list[dict[str, Any]]:
    """Every factor that is eigendecomposed, with its cost `G d³`."""
    factors = []
    for name, block in state.blocks.items():
        for side, factor in (("A", block.input_factor), ("B", block.output_factor)):
            if factor.ndim >= 2:  # an embedding's A is a diagonal
                size = factor.shape[-1]
                cost = int(np.prod(factor.shape[:-2])) * size**3
                factors.append({"factor": f"{name}/{side}", "size": size, "cost": cost})
    return factors


def main(argv: Sequence[str] | None = None) -> BenchmarkResult:
    parser = cli.arguments(__doc__, steps_help="timed steps each")
    parser.add_argument("--devices", type=int, default=4)
    args = parser.parse_args(argv)
    devices = _use_devices(args.devices)
    running.limit_blas_threads()
    input_dim, widths, batch_size = (
        (32, (64, 48, 10), 32) if args.quick else (256, (512, 384, 256, 128, 10), 256)
    )
    steps = args.steps or (2 if args.quick else 10)

    model = MLP(widths)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, input_dim), np.float32)
    y = rng.integers(0, widths[-1], batch_size)
    # On the host: each variant places (and donates) its own copy.
    params = jax.device_get(model.init(jax.random.key(0), x[:1])["params"])

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    mesh = jax.make_mesh((len(devices),), (AXIS,), devices=devices)
    replicated, sharded = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    variants = {
        "distributed": dict(eigen_update_every=1, distribute_eigh=True),
        "every_device": dict(eigen_update_every=1, distribute_eigh=False),
        "no_eigen_update": dict(eigen_update_every=10**6),
    }
    runs = {}
    with jax.set_mesh(mesh):
        batch = jax.device_put((x, y), sharded)
        for name, settings in variants.items():
            tx = oek.ekfac_sgd(
                layers, 1e-3, 0.9, damping=1e-3, norm_constraint=None, **settings
            )

            def step(params, opt_state, x, y, tx=tx):
                _, grads, stats = curvature.value_grad_and_stats(params, x, y)
                updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
                return optax.apply_updates(params, updates), opt_state

            jitted = jax.jit(step, donate_argnums=(0, 1))
            state = (
                jax.device_put(params, replicated),
                jax.device_put(tx.init(params), replicated),
            )
            # Compiled, and past the first update, which decomposes in every
            # variant.
            for _ in range(2):
                state = jax.block_until_ready(jitted(*state, *batch))
            runs[name] = {"step": jitted, "state": state, "times": []}
        for _ in range(steps):
            for run in runs.values():
                run["state"], seconds = running.timed_call(
                    run["step"], *run["state"], *batch
                )
                run["times"].append(seconds)

    factors = _factor_costs(runs["distributed"]["state"][1][0])
    costs = [factor["cost"] for factor in factors]
    shares = sharding.balanced_assignment(costs, len(devices))
    loads = [sum(costs[i] for i in share) for share in shares]
    medians = {name: statistics.median(run["times"]) for name, run in runs.items()}
    results = {
        "title": "eigen-update step, eigendecompositions distributed or repeated",
        "model": {"input_dim": input_dim, "widths": widths, "batch_size": batch_size},
        "devices": [str(device) for device in devices],
        "fake_cpu_devices": devices[0].platform == "cpu",
        "steps": steps,
        "factors": factors,
        "shares": [[factors[i]["factor"] for i in share] for share in shares],
        "device_loads": loads,
        "ideal_ratio": max(loads) / sum(loads),
        "seconds": {name: run["times"] for name, run in runs.items()},
        "median_seconds": medians,
        "ratio": medians["distributed"] / medians["every_device"],
        "eigen_ratio": (medians["distributed"] - medians["no_eigen_update"])
        / (medians["every_device"] - medians["no_eigen_update"]),
        "machine": storage.machine_info(),
    }
    print(
        f"{len(devices)} {devices[0].platform} devices, {len(factors)} factors "
        f"(largest {max(f['size'] for f in factors)}), batch {batch_size}:\n"
        + "\n".join(
            f"  {name:16s} {1e3 * seconds:8.1f} ms" for name, seconds in medians.items()
        )
        + f"\n  distributed / every_device = {results['ratio']:.2f}; "
        f"eigendecompositions alone {results['eigen_ratio']:.2f} "
        f"(ideal {results['ideal_ratio']:.2f})"
    )
    if results["fake_cpu_devices"]:
        print("  (fake CPU devices share the host's cores: not a device speed-up)")
    result = BenchmarkResult("distributed_eigh", sections=results)
    storage.save(result, args.out, log=lambda line: print(f"  {line}"))
    return result


if __name__ == "__main__":
    main()
