"""`ekfac_sgd` trains with the first settings a user tries.

The README's "Fitting existing training code" chain (gradient clipping, a
cosine schedule from 0.03, momentum 0.9, weight decay; `ekfac_sgd`'s default
damping and norm constraint), run as printed on the README's digits MLP and
on a small CNN, float32 as users run it: the loss falls and stays finite.
Before the norm constraint the same chain (at damping 1e-3) reached losses
of hundreds on the MLP and thousands on the CNN within 100 steps: the
directions of small curvature moved by `learning_rate / damping = 30` times
their gradient.
"""

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from sklearn.datasets import load_digits

import optax_ekfac as oek

STEPS = 60


class _Cnn(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x.reshape(x.shape[0], 8, 8, 1)
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        x = nn.relu(nn.Conv(16, (3, 3))(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


MODELS = {
    "mlp": lambda: nn.Sequential([nn.Dense(256), nn.relu, nn.Dense(10)]),
    "cnn": _Cnn,
}


def _readme_chain(layers):
    """The README's chain, as printed there."""
    return optax.apply_if_finite(
        optax.chain(
            optax.clip_by_global_norm(1.0),
            oek.ekfac_sgd(
                layers,
                optax.cosine_decay_schedule(0.03, 1000),
                momentum=0.9,
                weight_decay=1e-4,
            ),
        ),
        max_consecutive_errors=5,
    )


def _losses(model, make_tx):
    x, y = load_digits(return_X_y=True)
    x_train, y_train = (x / 16.0).astype(np.float32), y.astype(np.int32)
    batches = [
        (x_train[i : i + 128], y_train[i : i + 128]) for i in range(0, 1024, 128)
    ]
    params = model.init(jax.random.key(0), x_train[:1])["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    layers = curvature.layers(params, x_train[:256], y_train[:256])
    tx = make_tx(layers)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, opt_state, x, y):
        loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    losses = []
    for step in range(STEPS):
        params, opt_state, loss = train_step(
            params, opt_state, *batches[step % len(batches)]
        )
        losses.append(float(loss))
    return np.asarray(losses)


@pytest.mark.parametrize("name", MODELS)
def test_the_readme_chain_trains(name):
    with jax.enable_x64(False):
        losses = _losses(MODELS[name](), _readme_chain)
    assert np.all(np.isfinite(losses))
    # From log(10) = 2.3: the last steps well below it, and no step far above.
    assert losses[-10:].mean() < 0.5, losses
    assert losses.max() < 3.0, losses
