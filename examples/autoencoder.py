"""EKFAC against Adam on a deep autoencoder for sklearn's handwritten digits.

The classic K-FAC / EKFAC problem, scaled down: a 64-256-128-32-128-256-64
autoencoder (tanh between layers, a linear 32-unit code, sigmoid outputs)
reconstructs 8x8 digit images with pixels in [0, 1], trained on squared error
(`optax_ekfac.squared_error`, half the squared error summed over the 64 pixels).
Both optimizers start from the same initialization and see the same
mini-batches. The script prints each optimizer's final train and test loss and
its step times (the first step, which compiles, apart), and saves a plot of the
mini-batch loss against step and against seconds.

The data, `sklearn.datasets.load_digits`, ships with scikit-learn, so this runs
offline, in about 25 seconds on a 2-core CPU.

Usage:
    python examples/autoencoder.py
    python examples/autoencoder.py --steps 1000 --out autoencoder.png
"""

from collections.abc import Sequence

import _shared
import flax.linen as nn
import jax
import optax

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


def main(argv: Sequence[str] | None = None) -> None:
    parser = _shared.arguments(
        __doc__, steps=400, batch_size=256, out="autoencoder.png"
    )
    args = parser.parse_args(argv)
    _shared.limit_blas_threads()

    # Pixels in [0, 1]; the same mini-batches for both optimizers.
    x_train, _, x_test, _ = _shared.digits(args.seed)
    batches = _shared.mini_batches(args, x_train)

    model = Autoencoder()
    init_params = model.init(jax.random.key(args.seed), x_train[:1])["params"]

    def loss_fn(params, x):  # unreduced: one loss per example
        return oek.squared_error(model.apply({"params": params}, x), x)

    # The sampled Fisher: the curvature the adaptive step is measured to need.
    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    layers = curvature.layers(init_params, *batches[0])
    print(layers)
    # The defaults: step size, momentum and damping adapted every step.
    ekfac = oek.ekfac(layers)
    adam = optax.adam(3e-3)

    @jax.jit
    def ekfac_step(params, opt_state, x):
        loss, grads, stats = curvature.value_grad_and_stats(params, x)
        updates, opt_state = ekfac.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    adam_step = _shared.optax_step(loss_fn, adam)  # the baseline: plain optax
    runs = _shared.train_each(
        init_params, batches, ekfac=(ekfac, ekfac_step), adam=(adam, adam_step)
    )

    def evaluate(params, x):
        return {"loss": loss_fn(params, x).mean()}

    _shared.print_results(
        args, runs, jax.jit(evaluate), train=(x_train,), test=(x_test,)
    )
    _shared.plot_losses(
        runs, args, "Autoencoder on sklearn digits", "mini-batch reconstruction loss"
    )


if __name__ == "__main__":
    main()
