"""EKFAC against Adam on a deep autoencoder for sklearn's handwritten digits.

The classic K-FAC / EKFAC problem, scaled down: a 64-256-128-32-128-256-64
autoencoder (tanh between layers, a linear 32-unit code, sigmoid outputs)
reconstructs 8x8 digit images with pixels in [0, 1], trained on squared error
(`optax_ekfac.squared_error`, half the squared error summed over the 64 pixels).
Both optimizers start from the same initialization and see the same
mini-batches; each train step is compiled once with `jax.jit`, ahead of time, so
the step timings exclude compilation. The script prints a table of final train
and test loss, median step time, training wall-clock time and compile time, and
saves a plot of the mini-batch loss against step and against seconds.

The data, `sklearn.datasets.load_digits`, ships with scikit-learn, so this runs
offline, in about 25 seconds on a 2-core CPU.

Usage:
    python examples/autoencoder.py
    python examples/autoencoder.py --steps 1000 --out autoencoder.png
"""

import argparse

import compare
import flax.linen as nn
import jax
import numpy as np
import optax
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from threadpoolctl import threadpool_limits

import optax_ekfac as oek


class Autoencoder(nn.Module):
    """tanh encoder to a linear code, tanh decoder to sigmoid outputs."""

    encoder: tuple[int, ...] = (256, 128)
    code: int = 32

    @nn.compact
    def __call__(self, x):
        pixels = x.shape[-1]
        for width in self.encoder:
            x = nn.tanh(nn.Dense(width)(x))
        x = nn.Dense(self.code)(x)
        for width in reversed(self.encoder):
            x = nn.tanh(nn.Dense(width)(x))
        return nn.sigmoid(nn.Dense(pixels)(x))


def load_data(seed):
    """Float32 pixels in [0, 1], a fixed 80/20 split."""
    x, y = load_digits(return_X_y=True)
    x_train, x_test = train_test_split(
        x / 16.0, test_size=0.2, random_state=seed, stratify=y
    )
    return x_train.astype(np.float32), x_test.astype(np.float32)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default="autoencoder.png", help="plot path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # On CPU, jnp.linalg.eigh runs in scipy's OpenBLAS, whose threads compete
    # with XLA's: on a busy machine one eigendecomposition can take 100x longer.
    threadpool_limits(1, user_api="blas")

    x_train, x_test = load_data(args.seed)
    model = Autoencoder()
    init_params = model.init(jax.random.key(args.seed), x_train[:1])["params"]

    def loss_fn(params, x):  # unreduced: one loss per example
        return oek.squared_error(model.apply({"params": params}, x), x)

    # The same mini-batches for both optimizers: shuffled epochs, fixed seed.
    rng = np.random.default_rng(args.seed)
    epochs = -(-args.steps * args.batch_size // len(x_train))
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(epochs)])
    batches = order[: args.steps * args.batch_size].reshape(args.steps, -1)

    curvature = oek.Curvature(loss_fn)
    layers = curvature.layers(init_params, x_train[batches[0]])
    print(layers)
    # learning_rate at most about damping (see the README); both settings are
    # the best of the sweeps in benchmarks/autoencoder.py.
    ekfac = oek.ekfac(
        layers, learning_rate=3e-3, momentum=0.9, damping=1e-2, eigen_update_every=10
    )
    adam = optax.adam(3e-3)

    def ekfac_step(params, opt_state, x):
        loss, grads, stats = curvature.value_grad_and_stats(params, x)
        updates, opt_state = ekfac.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    def adam_step(params, opt_state, x):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, x).mean())(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(lambda params, x: loss_fn(params, x).mean())

    rows, curves = [], {}
    for name, tx, step in [("ekfac", ekfac, ekfac_step), ("adam", adam, adam_step)]:
        params, losses, seconds, compile_seconds = compare.train(
            name,
            step,
            init_params,
            tx.init(init_params),
            [(x_train[batch],) for batch in batches],
        )
        train_loss = evaluate(params, x_train)
        test_loss = evaluate(params, x_test)
        step_ms, wall = 1e3 * np.median(seconds), sum(seconds)
        rows.append(
            f"{name:<10}{train_loss:>11.4f}{test_loss:>10.4f}"
            f"{step_ms:>9.2f}{wall:>8.2f}{compile_seconds:>11.2f}"
        )
        curves[name] = (losses, seconds)

    print(f"\n{args.steps} steps, batch size {args.batch_size}")
    print(
        f"{'optimizer':<10}{'train loss':>11}{'test loss':>10}"
        f"{'step ms':>9}{'wall s':>8}{'compile s':>11}"
    )
    print("\n".join(rows))

    compare.plot_losses(
        curves,
        "mini-batch reconstruction loss",
        f"Autoencoder on sklearn digits, batch size {args.batch_size}",
        args.out,
    )


if __name__ == "__main__":
    main()
