"""EKFAC on a flax.nnx MLP for sklearn's handwritten digits.

`examples/digits_mlp.py` with the model written in Flax NNX: the same
64-256-256-10 ReLU MLP (`nnx.Linear` layers in an `nnx.Sequential`), data,
mini-batches and EKFAC settings. `optax_ekfac.nnx.Curvature` takes a
`loss_fn(model, *batch)`; its gradients are an `nnx.State`, and
`nnx.Optimizer.update` passes the statistics on to the optimizer as `stats=`.
The script prints the final train loss (whole training set), test loss and
accuracy and the step times, and saves a plot of the mini-batch loss.

Runs offline, in about 15 seconds on a 2-core CPU.

Usage:
    python examples/nnx_mlp.py
    python examples/nnx_mlp.py --steps 1000 --batch-size 256 --out plot.png
"""

from collections.abc import Sequence

import _shared
from flax import nnx

import optax_ekfac as oek


def main(argv: Sequence[str] | None = None) -> None:
    parser = _shared.arguments(__doc__, steps=400, batch_size=128, out="nnx_mlp.png")
    args = parser.parse_args(argv)
    _shared.limit_blas_threads()

    # The data and mini-batches of digits_mlp.py.
    x_train, y_train, x_test, y_test = _shared.digits(args.seed)
    x_train, x_test = _shared.standardized(x_train, x_test)
    batches = _shared.mini_batches(args, x_train, y_train)

    rngs = nnx.Rngs(args.seed)
    model = nnx.Sequential(
        nnx.Linear(64, 256, rngs=rngs),
        nnx.relu,
        nnx.Linear(256, 256, rngs=rngs),
        nnx.relu,
        nnx.Linear(256, 10, rngs=rngs),
    )

    def loss_fn(model, x, y):  # takes the model; unreduced: one loss per example
        return oek.softmax_cross_entropy(model(x), y)

    curvature = oek.nnx.Curvature(loss_fn, fisher_type="mc")
    layers = curvature.layers(model, *batches[0])
    print(layers)  # blocks named by their paths in nnx.state(model): layers/0, ...
    optimizer = nnx.Optimizer(
        model,
        oek.ekfac(layers),  # step size, momentum and damping adapted
        wrt=nnx.Param,
    )

    @nnx.jit
    def train_step(model, optimizer, x, y):
        loss, grads, stats = curvature.value_grad_and_stats(model, x, y)
        optimizer.update(model, grads, stats=stats)  # passes stats= to ekfac
        return loss

    # The step updates the model and the optimizer in place.
    runs = {"ekfac": _shared.train("ekfac", train_step, (model, optimizer), batches)}

    @nnx.jit
    def evaluate(model, x, y):
        return _shared.classifier_metrics(model(x), y)

    _shared.print_results(
        args, runs, evaluate, train=(x_train, y_train), test=(x_test, y_test)
    )
    _shared.plot_losses(runs, args, "NNX MLP on sklearn digits")


if __name__ == "__main__":
    main()
