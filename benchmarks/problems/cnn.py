"""Benchmark 3: a small CNN on sklearn's digits as 8x8x1 images.

Conv 3x3x16 (ReLU), Conv 3x3x32 stride 2 (ReLU), Dense to the 10 logits, batch
256, softmax cross-entropy. The convolutions are KFC blocks (factors over image
patches); one loss term pools over all positions, so EKFAC and KFAC use
`weight_sharing="reduce"`, and the exact per-example scalings. EKFAC, KFAC,
Adam and SGD with momentum, each over a small sweep, in one run.

Usage:
    python -m benchmarks.problems.cnn [--quick] [--steps N] [--out DIR]
"""

from collections.abc import Sequence

import flax.linen as nn
import jax

import optax_ekfac as oek
from benchmarks.harness import cli, data, records, reporting, specs


class CNN(nn.Module):
    """Two convolutions and a linear classifier."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images):
        x = nn.relu(nn.Conv(16, (3, 3))(images))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def problem(batch_size: int = 256, seed: int = 0) -> specs.Problem:
    """Digits as `[N, 8, 8, 1]` images in [0, 1]; target train loss 1e-3."""
    x_train, y_train, x_test, y_test = data.digits(seed)
    x_train, x_test = (x.reshape(-1, 8, 8, 1) for x in (x_train, x_test))
    model = CNN()

    def loss_fn(params, images, labels):
        logits = model.apply({"params": params}, images)
        return oek.softmax_cross_entropy(logits, labels)

    return specs.Problem(
        name="cnn",
        title="CNN conv16-conv32/2-dense10 on 8x8 digits",
        loss_fn=loss_fn,
        params=model.init(jax.random.key(seed), x_train[:1])["params"],
        train=(x_train, y_train),
        test=(x_test, y_test),
        batch_size=batch_size,
        target_loss=1e-3,
    )


def optimizers(quick: bool) -> list[specs.Optimizer]:
    """The four optimizers; the quick sweep keeps two settings of each."""
    adam_learning_rates = [3e-3, 1e-2, 3e-2, 1e-1]
    sgd_learning_rates = [0.03, 0.1, 0.3]
    return specs.standard_optimizers(
        adam_learning_rates=adam_learning_rates,
        sgd_learning_rates=sgd_learning_rates,
        quick_settings=slice(1, 3) if quick else None,
        weight_sharing="reduce",
    )


def main(argv: Sequence[str] | None = None) -> records.BenchmarkResult:
    return cli.convergence_main(
        argv,
        __doc__,
        problem,
        optimizers,
        steps=300,
        quick_steps=60,
        targets=reporting.fewer_steps_and_no_more_time,
    )


if __name__ == "__main__":
    main()
