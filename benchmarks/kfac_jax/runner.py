"""kfac-jax's adaptive K-FAC on the autoencoder benchmark, in its own environment.

Run by `benchmarks.kfac_jax` with the interpreter of the pinned environment
(`requirements.txt`: kfac-jax 0.0.8 breaks on jax >= 0.9.2), not
imported by the rest of the benchmarks. It trains the autoencoder benchmark's
problem (same model, initialization, data and batch order, from
`benchmarks.problems.autoencoder` and `benchmarks.harness.running`) with
kfac-jax's adaptive learning rate, momentum and damping, the settings of the
step-control issue (initial damping 1, minimum damping 1e-4, inverses every 5
steps; no burn-in steps), and times it as `running.run_setting` does: a
discarded warm-up run that compiles, then the sum of the step times with
evaluations outside it.

Usage (what `benchmarks.kfac_jax` runs, from the repository root):
    .venv-kfac-jax/bin/python -m benchmarks.kfac_jax.runner --seed 0 --steps 1500 \
        [--batch-size 256]
"""

import argparse
import functools
import json
import statistics

import jax
import jax.numpy as jnp
import kfac_jax

from benchmarks.harness import running, specs
from benchmarks.problems import autoencoder


def optimizer(model) -> kfac_jax.Optimizer:
    """kfac-jax adaptive, its loss the benchmark's summed squared error."""

    def loss(params, batch):
        (x,) = batch
        reconstruction = model.apply({"params": params}, x)
        # weight * Σ (target - prediction)² / batch size: weight 1 is the
        # benchmark's loss (twice optax_ekfac's half squared error).
        kfac_jax.register_squared_error_loss(reconstruction, x)
        return jnp.mean(jnp.sum(jnp.square(reconstruction - x), -1))

    return kfac_jax.Optimizer(
        value_and_grad_func=jax.value_and_grad(loss),
        l2_reg=0.0,
        use_adaptive_learning_rate=True,
        use_adaptive_momentum=True,
        use_adaptive_damping=True,
        initial_damping=1.0,
        min_damping=1e-4,
        inverse_update_period=5,
        # No curvature-only steps before the first update: every optimizer
        # here starts from the same parameters on the same first batch.
        num_burnin_steps=0,
        multi_device=False,
    )


def run(seed: int, steps: int, batch_size: int = 256) -> dict:
    """One timed run; its steps and seconds to the target and final loss."""
    problem = autoencoder.problem(batch_size=batch_size, seed=seed)
    settings = specs.Settings(steps=steps, seed=seed)
    workload = running.prepare(problem, settings)
    kfac = optimizer(autoencoder.Autoencoder())
    data = workload.train_data

    def batch_of(batch):
        return tuple(array[batch.indices] for array in data)

    def train(batches, timed):
        # A copy: kfac-jax's step donates the parameters it is given.
        params = jax.tree.map(jnp.copy, problem.params)
        rng = jax.random.key(seed)
        state = kfac.init(params, rng, batch_of(batches[0]))
        initial_loss = float(workload.evaluate(params, workload.train_eval))
        step_seconds, curve = [], [(0, initial_loss)]
        for step, batch in enumerate(batches, 1):
            rng, step_rng = jax.random.split(rng)
            step_fn = functools.partial(
                kfac.step, batch=batch_of(batch), global_step_int=step - 1
            )
            (params, state, _), seconds = running.timed_call(
                step_fn, params, state, step_rng
            )
            step_seconds.append(seconds)
            if timed and step % settings.eval_every == 0:
                loss = float(workload.evaluate(params, workload.train_eval))
                curve.append((step, loss))
        return step_seconds, curve

    # A warm-up run over enough steps to compile every branch (inverses and
    # damping adaptation every 5 steps), discarded.
    warmup_seconds, _ = train(
        workload.timed_batches[: max(settings.warmup_steps, 10)], timed=False
    )
    step_seconds, curve = train(workload.timed_batches, timed=True)
    # Its compiles: the warm-up's time beyond its steps at the timed median
    # (kfac-jax compiles several step programs, one per kind of step).
    compile_seconds = sum(warmup_seconds) - len(warmup_seconds) * statistics.median(
        step_seconds
    )
    reached = [step for step, loss in curve if loss <= problem.target_loss]
    steps_to_target = reached[0] if reached else None
    return dict(
        optimizer="kfac-jax adaptive",
        versions=dict(jax=jax.__version__, kfac_jax=kfac_jax.__version__),
        seed=seed,
        steps=steps,
        batch_size=batch_size,
        target_loss=problem.target_loss,
        steps_to_target=steps_to_target,
        seconds_to_target=(
            sum(step_seconds[:steps_to_target]) if steps_to_target else None
        ),
        final_train_loss=curve[-1][1],
        median_step_seconds=statistics.median(step_seconds),
        compile_seconds=compile_seconds,
        mean_step_seconds=statistics.fmean(step_seconds),
        curve=curve,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=256)
    args = parser.parse_args()
    running.limit_blas_threads()
    print(json.dumps(run(args.seed, args.steps, args.batch_size)))


if __name__ == "__main__":
    main()
