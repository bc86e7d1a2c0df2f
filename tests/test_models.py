"""A small CNN and a small transformer train with EKFAC under jit, one compile.

Data ships offline: digits from scikit-learn as 8x8 images, and characters of
a standard-library module's source for the language model.
"""

import inspect
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import optax_ekfac as oek


class CNN(nn.Module):
    @nn.compact
    def __call__(self, images):
        x = nn.relu(nn.Conv(8, (3, 3))(images))
        x = nn.relu(nn.Conv(16, (3, 3), strides=2, feature_group_count=2)(x))
        return nn.Dense(10)(x.reshape(x.shape[0], -1))


class TinyTransformer(nn.Module):
    """Embedding, causal self-attention, MLP, LayerNorm, tied output projection."""

    vocab_size: int
    width: int = 32

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(self.vocab_size, self.width)
        positions = self.param(
            "positions", nn.initializers.normal(0.02), (tokens.shape[1], self.width)
        )
        x = embed(tokens) + positions
        mask = nn.make_causal_mask(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(
            nn.LayerNorm()(x), mask=mask
        )
        hidden = nn.gelu(nn.Dense(2 * self.width)(nn.LayerNorm()(x)))
        x = x + nn.Dense(self.width)(hidden)
        return embed.attend(nn.LayerNorm()(x))


def _train(model, inputs, targets, steps, learning_rate, damping, batch_size):
    """Trains with EKFAC on fixed random batches; returns losses and traces."""
    params = model.init(jax.random.key(0), inputs[:batch_size])["params"]

    def loss_fn(params, inputs, targets):
        logits = model.apply({"params": params}, inputs)
        return oek.softmax_cross_entropy(logits, targets)

    curvature = oek.Curvature(loss_fn)
    layers = curvature.layers(params, inputs[:batch_size], targets[:batch_size])
    tx = oek.ekfac(layers, learning_rate, momentum=0.9, damping=damping)
    opt_state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, opt_state, inputs, targets):
        traces.append(1)
        loss, grads, stats = curvature.value_grad_and_stats(params, inputs, targets)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        index = rng.choice(len(inputs), batch_size, replace=False)
        params, opt_state, loss = step(params, opt_state, inputs[index], targets[index])
        losses.append(float(loss))
    return layers, losses, len(traces)


def test_small_cnn_trains_on_digit_images():
    digits = load_digits()
    images = jnp.asarray(digits.images[..., None] / 16.0, jnp.float32)
    labels = jnp.asarray(digits.target)
    # Stable when learning_rate is below about damping (see the README).
    layers, losses, traces = _train(CNN(), images, labels, 40, 3e-3, 1e-2, 128)
    assert {block.kind for block in layers.blocks} == {"Conv", "Dense"}
    assert traces == 1
    # From chance (log 10 ≈ 2.3) to well below it in 40 steps.
    assert np.mean(losses[:3]) > 2.0 and np.mean(losses[-5:]) < 0.5, losses


def test_small_transformer_trains_on_stdlib_text():
    text = inspect.getsource(textwrap)
    vocabulary = sorted(set(text))
    ids = np.array([vocabulary.index(char) for char in text])
    length = 16
    windows = np.lib.stride_tricks.sliding_window_view(ids, length + 1)[::7]
    inputs = jnp.asarray(windows[:, :-1])
    targets = jnp.asarray(windows[:, 1:])
    model = TinyTransformer(vocab_size=len(vocabulary))
    layers, losses, traces = _train(model, inputs, targets, 60, 3e-2, 1e-2, 32)
    kinds = {block.name: block for block in layers.blocks}
    assert kinds["Embed_0"].call_methods == ("__call__", "attend")
    assert {"DenseGeneral", "Dense", "Embed"} <= {b.kind for b in layers.blocks}
    assert ("positions",) in layers.fallback
    assert traces == 1
    # Uniform over the ~90 symbols is 4.5 nats; a model that has learnt the
    # character frequencies and common bigrams is well below 3.
    assert np.mean(losses[:3]) > 4.0 and np.mean(losses[-5:]) < 2.8, losses
