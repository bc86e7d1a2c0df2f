"""EKFAC against Adam on a small CNN for sklearn's digits as 8x8x1 images.

Two convolutions (`nn.Conv` 3x3x16, then 3x3x32 with stride 2, ReLU) and a
Dense layer to the 10 logits, trained on softmax cross-entropy. EKFAC treats
each convolution as a KFC block (Kronecker factors over image patches); each
example has one loss term pooled over all positions, so it uses
`weight_sharing="reduce"`. Both optimizers start from the same initialization
and see the same mini-batches. The script prints each optimizer's final train
loss (whole training set), test loss and accuracy and its step times (the first
step, which compiles, apart), and saves a plot of the mini-batch loss against
step and against seconds.

The data, `sklearn.datasets.load_digits`, ships with scikit-learn, so this runs
offline, in about 20 seconds on a 2-core CPU.

Usage:
    python examples/cnn.py
    python examples/cnn.py --steps 300 --batch-size 128 --out cnn.png
"""

from collections.abc import Sequence

import _shared
import flax.linen as nn
import jax
import optax

import optax_ekfac as oek


class CNN(nn.Module):
    """Two convolutions and a linear classifier."""

    num_classes: int = 10

    @nn.compact
    def __call__(self, images):
        x = nn.relu(nn.Conv(16, (3, 3))(images))
        x = nn.relu(nn.Conv(32, (3, 3), strides=2)(x))
        return nn.Dense(self.num_classes)(x.reshape(x.shape[0], -1))


def main(argv: Sequence[str] | None = None) -> None:
    parser = _shared.arguments(__doc__, steps=150, batch_size=256, out="cnn.png")
    args = parser.parse_args(argv)
    _shared.limit_blas_threads()

    # [N, 8, 8, 1] images in [0, 1]; the same mini-batches for both optimizers.
    x_train, y_train, x_test, y_test = _shared.digits(args.seed)
    x_train, x_test = x_train.reshape(-1, 8, 8, 1), x_test.reshape(-1, 8, 8, 1)
    batches = _shared.mini_batches(args, x_train, y_train)

    model = CNN()
    init_params = model.init(jax.random.key(args.seed), x_train[:1])["params"]

    def loss_fn(params, images, labels):  # unreduced: one loss per example
        logits = model.apply({"params": params}, images)
        return oek.softmax_cross_entropy(logits, labels)

    # The sampled Fisher: the curvature the adaptive step is measured to need.
    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    layers = curvature.layers(init_params, *batches[0])
    print(layers)
    # The defaults (step size, momentum and damping adapted every step);
    # "reduce" because one loss term pools every image position.
    ekfac = oek.ekfac(layers, weight_sharing="reduce")
    adam = optax.adam(3e-2)

    @jax.jit
    def ekfac_step(params, opt_state, images, labels):
        loss, grads, stats = curvature.value_grad_and_stats(params, images, labels)
        updates, opt_state = ekfac.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    adam_step = _shared.optax_step(loss_fn, adam)  # the baseline: plain optax
    runs = _shared.train_each(
        init_params, batches, ekfac=(ekfac, ekfac_step), adam=(adam, adam_step)
    )

    def evaluate(params, images, labels):
        logits = model.apply({"params": params}, images)
        return _shared.classifier_metrics(logits, labels)

    _shared.print_results(
        args, runs, jax.jit(evaluate), train=(x_train, y_train), test=(x_test, y_test)
    )
    _shared.plot_losses(runs, args, "CNN on 8x8 sklearn digits")


if __name__ == "__main__":
    main()
