"""Benchmark 1: a deep autoencoder on sklearn's digits.

The classic K-FAC / EKFAC problem (Hinton & Salakhutdinov's autoencoders,
scaled down): 64-256-128-32-128-256-64, tanh between layers, a linear code
layer, sigmoid outputs, squared error against the pixels (scaled to [0, 1]),
batch 256. EKFAC, KFAC, Adam and SGD with momentum, each over a small sweep, in
one run; checks that EKFAC reaches the target loss in at most half of Adam's
best wall-clock time.

Usage:
    python -m benchmarks.autoencoder [--quick] [--steps N] [--out DIR]
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

import optax_ekfac as oek
from benchmarks import cli, data, records, specs


class Autoencoder(nn.Module):
    """tanh encoder to a linear code, tanh decoder to sigmoid outputs."""

    encoder: Sequence[int] = (256, 128)
    code: int = 32
    outputs: int = 64

    @nn.compact
    def __call__(self, x):
        for width in self.encoder:
            x = nn.tanh(nn.Dense(width)(x))
        x = nn.Dense(self.code)(x)
        for width in reversed(self.encoder):
            x = nn.tanh(nn.Dense(width)(x))
        return nn.sigmoid(nn.Dense(self.outputs)(x))


def problem(batch_size: int = 256, seed: int = 0) -> specs.Problem:
    """Digits in [0, 1], reconstructed; per-example half squared error (summed
    over the 64 pixels); target train loss 0.1."""
    x_train, _, x_test, _ = data.digits(seed)
    model = Autoencoder()

    def loss_fn(params, x):
        return oek.squared_error(model.apply({"params": params}, x), x)

    return specs.Problem(
        name="autoencoder",
        title="Autoencoder 64-256-128-32-128-256-64 on digits",
        loss_fn=loss_fn,
        params=model.init(jax.random.key(seed), x_train[:1])["params"],
        train=(x_train,),
        test=(x_test,),
        batch_size=batch_size,
        target_loss=0.1,
    )


def optimizers(quick: bool) -> list[specs.Optimizer]:
    """The four optimizers; the quick sweep keeps two settings of each."""
    ekfac_sweep = [
        {"learning_rate": 3e-4, "damping": 1e-3},
        {"learning_rate": 1e-3, "damping": 3e-3},
        {"learning_rate": 3e-3, "damping": 1e-2},
        {"learning_rate": 5e-3, "damping": 1e-2},
        {"learning_rate": 1e-2, "damping": 3e-2},
    ]
    adam_learning_rates = [1e-3, 3e-3, 1e-2]
    sgd_learning_rates = [0.03, 0.1, 0.3]
    return specs.standard_optimizers(
        ekfac_sweep=ekfac_sweep,
        adam_learning_rates=adam_learning_rates,
        sgd_learning_rates=sgd_learning_rates,
        quick_settings=slice(1, 3) if quick else None,
        eigen_update_every=10,
    )


def main(argv: Sequence[str] | None = None) -> records.BenchmarkResult:
    return cli.convergence_main(
        argv,
        __doc__,
        problem,
        optimizers,
        steps=600,
        quick_steps=60,
        check_time_to_target=True,
    )


if __name__ == "__main__":
    main()
