"""Step cost: interleaved timings, the FLOP model, and where EKFAC's time goes.

The FLOP model is the one of the benchmarks issue: a layer with a block of
`d_in x d_out` (bias row included) seen by `R` rows per step (examples times
positions) costs

* forward and backward: `6 R d_in d_out` (Adam's step, up to its elementwise
  update);
* factor updates: `R (d_in^2 + d_out^2)`, every `stats_update_every` steps;
* scalings: `R (d_in^2 + d_out^2)`, every `stats_update_every` steps;
* eigendecompositions: about `9 (d_in^3 + d_out^3)` (symmetric QR with
  eigenvectors), every `eigen_update_every` steps;
* preconditioning: `4 d_in d_out (d_in + d_out)` (four matmuls), every step.

The issue's forward/backward and preconditioning terms count a multiply-add as
two FLOPs, its factor and scaling terms as one. `counted=True` counts them
alike: the factors `aᵀa`, `dᵀd` are `2 R (d_in^2 + d_out^2)`; the scalings
project the rows (`2 R (d_in^2 + d_out^2)`) and contract their squares
(`2 R d_in d_out`).

EKFAC's predicted step time is Adam's measured time times the ratio of the two
FLOP counts, which assumes both run at Adam's throughput.
"""

import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

import optax_ekfac as oek

EIGH_FLOPS_PER_CUBE = 9
PARTS = ("forward_backward", "factors", "scalings", "eigh", "preconditioning")


def flop_model(
    layers: oek.Layers,
    num_rows: int,
    *,
    stats_update_every: int,
    eigen_update_every: int,
    counted: bool = False,
) -> dict[str, float]:
    """FLOPs per step of each part of an EKFAC step, amortized.

    Args:
        layers: the model's blocks.
        num_rows: rows per step of every block (examples times positions).
        stats_update_every: period of factor and scaling updates.
        eigen_update_every: period of the eigendecompositions.
        counted: count every multiply-add as two FLOPs (the issue's model
            counts those of the factors and scalings as one).

    Returns:
        FLOPs per step: `forward_backward`, `factors`, `scalings`, `eigh`,
        `preconditioning`, and `adam` / `ekfac`, the two steps' totals.
    """
    terms = dict.fromkeys(PARTS, 0.0)
    for block in layers.blocks:
        d_in, d_out, groups = block.input_dim, block.output_dim, block.num_groups
        squares = num_rows * (d_in**2 + d_out**2)
        factors = 2 * squares if counted else squares
        scalings = 2 * squares + 2 * num_rows * d_in * d_out if counted else squares
        terms["forward_backward"] += groups * 6 * num_rows * d_in * d_out
        terms["factors"] += groups * factors / stats_update_every
        terms["scalings"] += groups * scalings / stats_update_every
        terms["eigh"] += (
            groups * EIGH_FLOPS_PER_CUBE * (d_in**3 + d_out**3) / eigen_update_every
        )
        terms["preconditioning"] += groups * 4 * d_in * d_out * (d_in + d_out)
    terms["adam"] = terms["forward_backward"]
    terms["ekfac"] = sum(terms[part] for part in PARTS)
    return terms


def interleaved_timings(
    calls: Mapping[str, Callable[[], Any]], rounds: int, calls_per_round: int
) -> dict[str, list[float]]:
    """Seconds of each call of each function, the functions taking turns.

    Each round calls every function `calls_per_round` times in a row (waiting
    for each result), so slow phases of a busy machine hit all of them alike.

    Args:
        calls: name -> a function of no arguments (a closure that advances its
            own state, for a train step).
        rounds: rounds of turns.
        calls_per_round: consecutive calls per turn (an amortization period,
            so that every turn sees the same mix of cheap and refresh steps).

    Returns:
        name -> the seconds of its `rounds * calls_per_round` calls.
    """
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(rounds):
        for name, call in calls.items():
            for _ in range(calls_per_round):
                start = time.perf_counter()
                jax.block_until_ready(call())
                seconds[name].append(time.perf_counter() - start)
    return seconds


def stepper(
    step: Callable, params, opt_state, hyperparameters, data, indices
) -> Callable[[], Any]:
    """A no-argument closure that runs one step of a `running.TrainStep`,
    carrying `params` and `opt_state` and cycling through `indices` (a list of
    device arrays, one batch's example indices each) and as many keys."""
    carry = [params, opt_state]
    position = [0]
    keys = list(jax.random.split(jax.random.key(0), len(indices)))

    def call():
        i = position[0] % len(indices)
        position[0] += 1
        carry[0], carry[1], loss = step(
            carry[0], carry[1], hyperparameters, data, indices[i], keys[i]
        )
        return loss

    return call


def profile_ekfac(
    loss_fn: Callable[..., jax.Array],
    params: optax.Params,
    batch: tuple,
    *,
    damping: float,
    rounds: int,
    calls_per_round: int = 5,
    **ekfac_settings: Any,
) -> dict[str, float]:
    """Median milliseconds of the pieces of one EKFAC step, by timing variants.

    The update of `scale_by_ekfac` is one compiled function whose `lax.cond`s
    choose, from the step count, what runs; timing it at counts that select
    more and more work separates the pieces:

    * `forward_backward`: `jax.value_and_grad` of the mean loss;
    * `capture`: `Curvature.value_grad_and_stats` minus `forward_backward`;
    * `preconditioning`: the update at a step without refreshes;
    * `factors`: KFAC's update at a statistics-only step minus
      `preconditioning`;
    * `scalings`: EKFAC's update at a statistics-only step minus KFAC's;
    * `eigh`: EKFAC's update at an eigenbasis step minus its statistics-only
      step;
    * `adam_update`: `optax.adam`'s update, for scale.

    Args:
        loss_fn: per-example `loss_fn(params, *batch)`.
        params: the model's parameters.
        batch: one batch, the arguments of `loss_fn` after `params`.
        damping: `λ` of every variant.
        rounds: rounds of interleaved timings.
        calls_per_round: consecutive calls of a variant per round.
        **ekfac_settings: further `scale_by_ekfac` settings (`scalings`,
            `weight_sharing`, ...), not the periods or `eigenvalue_correction`,
            which the variants set.

    Returns:
        name -> median milliseconds (the pieces, and the raw variants with a
        `variant/` prefix).
    """
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, *batch)
    period = 1000  # eigen_update_every of the statistics-only variants

    forward_backward = jax.jit(
        jax.value_and_grad(lambda p, *b: jnp.mean(loss_fn(p, *b)))
    )
    capture = jax.jit(curvature.value_grad_and_stats)
    _, grads, stats = capture(params, *batch)

    def update_at(count, **settings):
        tx = oek.scale_by_ekfac(layers, damping=damping, **ekfac_settings, **settings)
        update = jax.jit(lambda g, s, p, st: tx.update(g, s, p, stats=st))
        state = tx.init(params)
        _, state = update(grads, state, params, stats)  # real factors and bases
        state = state._replace(count=jnp.asarray(count, state.count.dtype))
        return lambda: update(grads, state, params, stats)

    adam = optax.adam(1e-3)
    adam_state = adam.init(params)
    adam_update = jax.jit(adam.update)
    variants = {
        "forward_backward": lambda: forward_backward(params, *batch),
        "capture": lambda: capture(params, *batch),
        "adam_update": lambda: adam_update(grads, adam_state, params),
        # count 1 of a period-10 schedule: no refresh, preconditioning only.
        "precondition_only": update_at(1, stats_update_every=10, eigen_update_every=10),
        "kfac_stats_step": update_at(
            1,
            stats_update_every=1,
            eigen_update_every=period,
            eigenvalue_correction=False,
        ),
        "ekfac_stats_step": update_at(
            1, stats_update_every=1, eigen_update_every=period
        ),
        "ekfac_eigen_step": update_at(
            period, stats_update_every=1, eigen_update_every=period
        ),
    }
    for call in variants.values():  # compile and warm up
        jax.block_until_ready(call())
    seconds = interleaved_timings(variants, rounds, calls_per_round)
    ms = {name: 1e3 * statistics.median(times) for name, times in seconds.items()}
    pieces = {
        "forward_backward": ms["forward_backward"],
        "capture": ms["capture"] - ms["forward_backward"],
        "factors": ms["kfac_stats_step"] - ms["precondition_only"],
        "scalings": ms["ekfac_stats_step"] - ms["kfac_stats_step"],
        "eigh": ms["ekfac_eigen_step"] - ms["ekfac_stats_step"],
        "preconditioning": ms["precondition_only"],
        "adam_update": ms["adam_update"],
    }
    pieces.update({f"variant/{name}": value for name, value in ms.items()})
    return pieces
