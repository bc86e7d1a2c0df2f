"""EKFAC against Adam on a small CNN for sklearn's digits as 8x8x1 images.

Two convolutions (`nn.Conv` 3x3x16, then 3x3x32 with stride 2, ReLU) and a
Dense layer to the 10 logits, trained on softmax cross-entropy. EKFAC treats
each convolution as a KFC block (Kronecker factors over image patches); each
example has one loss term pooled over all positions, so it uses
`weight_sharing="reduce"`. Both optimizers start from the same initialization
and see the same mini-batches; each train step is compiled once with `jax.jit`,
ahead of time, so the step timings exclude compilation. The script prints a
table of final train loss (whole training set), test loss and accuracy, median
step time, training wall-clock time and compile time, and saves a plot of the
mini-batch loss against step and against seconds.

The data, `sklearn.datasets.load_digits`, ships with scikit-learn, so this runs
offline, in about 20 seconds on a 2-core CPU.

Usage:
    python examples/cnn.py
    python examples/cnn.py --steps 300 --batch-size 128 --out cnn.png
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


class CNN(nn.Module):
    """Two convolutions and a linear classifier."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images):
        x = nn.relu(nn.Conv(16, (3, 3))(images))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def load_data(seed):
    """`[N, 8, 8, 1]` float32 images in [0, 1] and int32 labels, a fixed 80/20
    split."""
    x, y = load_digits(return_X_y=True)
    images = (x / 16.0).reshape(-1, 8, 8, 1).astype(np.float32)
    return train_test_split(
        images, y.astype(np.int32), test_size=0.2, random_state=seed, stratify=y
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--out", default="cnn.png", help="plot path")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    # On CPU, jnp.linalg.eigh runs in scipy's OpenBLAS, whose threads compete
    # with XLA's: on a busy machine one eigendecomposition can take 100x longer.
    threadpool_limits(1, user_api="blas")

    x_train, x_test, y_train, y_test = load_data(args.seed)
    model = CNN()
    init_params = model.init(jax.random.key(args.seed), x_train[:1])["params"]

    def loss_fn(params, x, y):  # unreduced: one loss per example
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    # The same mini-batches for both optimizers: shuffled epochs, fixed seed.
    rng = np.random.default_rng(args.seed)
    epochs = -(-args.steps * args.batch_size // len(x_train))
    order = np.concatenate([rng.permutation(len(x_train)) for _ in range(epochs)])
    batches = order[: args.steps * args.batch_size].reshape(args.steps, -1)

    curvature = oek.Curvature(loss_fn)
    layers = curvature.layers(init_params, x_train[batches[0]], y_train[batches[0]])
    print(layers)
    # learning_rate at most about damping (see the README); both settings are
    # the best of the sweeps in benchmarks/cnn.py.
    ekfac = oek.ekfac(
        layers,
        learning_rate=1e-2,
        momentum=0.9,
        damping=3e-2,
        eigen_update_every=10,
        weight_sharing="reduce",
    )
    adam = optax.adam(3e-2)

    def ekfac_step(params, opt_state, x, y):
        loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, opt_state = ekfac.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    def adam_step(params, opt_state, x, y):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(p, x, y).mean())(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    @jax.jit
    def evaluate(params, x, y):
        logits = model.apply({"params": params}, x)
        loss = oek.softmax_cross_entropy(logits, y).mean()
        return loss, (logits.argmax(-1) == y).mean()

    rows, curves = [], {}
    for name, tx, step in [("ekfac", ekfac, ekfac_step), ("adam", adam, adam_step)]:
        params, losses, seconds, compile_seconds = compare.train(
            name,
            step,
            init_params,
            tx.init(init_params),
            [(x_train[batch], y_train[batch]) for batch in batches],
        )
        train_loss, _ = evaluate(params, x_train, y_train)
        test_loss, test_accuracy = evaluate(params, x_test, y_test)
        step_ms, wall = 1e3 * np.median(seconds), sum(seconds)
        rows.append(
            f"{name:<10}{train_loss:>11.2e}{test_loss:>10.4f}{test_accuracy:>9.2%}"
            f"{step_ms:>9.2f}{wall:>8.2f}{compile_seconds:>11.2f}"
        )
        curves[name] = (losses, seconds)

    print(f"\n{args.steps} steps, batch size {args.batch_size}")
    print(
        f"{'optimizer':<10}{'train loss':>11}{'test loss':>10}{'test acc':>9}"
        f"{'step ms':>9}{'wall s':>8}{'compile s':>11}"
    )
    print("\n".join(rows))

    compare.plot_losses(
        curves,
        "mini-batch train loss",
        f"CNN on 8x8 sklearn digits, batch size {args.batch_size}",
        args.out,
    )


if __name__ == "__main__":
    main()
