"""EKFAC against Adam on a tiny character-level transformer language model.

The text is the source code of a pure-Python standard-library module (`argparse`
by default), read with `inspect.getsource`, so it ships with Python; its last
10% is held out. The model (width 64): token and position embeddings
(`nn.Embed`), two pre-LayerNorm blocks of causal multi-head self-attention
(`nn.MultiHeadDotProductAttention`, whose projections are `DenseGeneral`
blocks) and a GELU MLP of width 128, a final LayerNorm, and logits from the
token embedding itself (`Embed.attend`: tied input and output embeddings, one
EKFAC block with two calls). The loss is per token, `[B, T]`: every
next-character prediction is a loss term, and EKFAC treats each as one (the
default `weight_sharing="expand"`). LayerNorm scales and biases get EKFAC's
diagonal fallback. Both optimizers start from the same initialization and see
the same mini-batches; each train step is compiled once with `jax.jit`, ahead of
time, so the step timings exclude compilation. The script prints a table of final train
and test loss (nats per character, on up to 512 windows), median step time,
training wall-clock time and compile time, and saves a plot of the mini-batch
loss against step and against seconds.

Runs offline, in about 30 seconds on a 2-core CPU.

Usage:
    python examples/transformer.py
    python examples/transformer.py --steps 400 --batch-size 32 --module textwrap
"""

import argparse
import importlib
import inspect

import compare
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from threadpoolctl import threadpool_limits

import optax_ekfac as oek


class Block(nn.Module):
    """Pre-LayerNorm causal self-attention and MLP, each with a residual."""

    num_heads: int
    mlp_width: int

    @nn.compact
    def __call__(self, x, mask):
        attention = nn.MultiHeadDotProductAttention(num_heads=self.num_heads)
        x = x + attention(nn.LayerNorm()(x), mask=mask)
        hidden = nn.gelu(nn.Dense(self.mlp_width)(nn.LayerNorm()(x)))
        return x + nn.Dense(x.shape[-1])(hidden)


class LanguageModel(nn.Module):
    """A decoder-only transformer over character ids, with tied embeddings."""

    vocab_size: int
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_width: int = 128

    @nn.compact
    def __call__(self, tokens):
        batch_size, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length), (batch_size, length))
        embed = nn.Embed(self.vocab_size, self.width)
        x = embed(tokens) + nn.Embed(length, self.width)(positions)
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.num_layers):
            x = Block(self.num_heads, self.mlp_width)(x, mask)
        return embed.attend(nn.LayerNorm()(x))  # logits [B, T, vocab_size]


def load_data(module, sequence_length):
    """Non-overlapping windows of `sequence_length + 1` character ids from the
    module's source, the last 10% held out; and the vocabulary."""
    text = inspect.getsource(importlib.import_module(module))
    split = int(0.9 * len(text))
    vocabulary = sorted(set(text[:split]))
    ids = {char: i for i, char in enumerate(vocabulary)}
    encoded = np.array([ids.get(char, 0) for char in text], np.int32)  # unseen: 0

    def windows(tokens):
        count = len(tokens) // (sequence_length + 1)
        return tokens[: count * (sequence_length + 1)].reshape(count, -1)

    return windows(encoded[:split]), windows(encoded[split:]), vocabulary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", default="transformer.png", help="plot path")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--module", default="argparse", help="source text")
    parser.add_argument("--sequence-length", type=int, default=64)
    args = parser.parse_args()
    # On CPU, jnp.linalg.eigh runs in scipy's OpenBLAS, whose threads compete
    # with XLA's: on a busy machine one eigendecomposition can take 100x longer.
    threadpool_limits(1, user_api="blas")

    train, test, vocabulary = load_data(args.module, args.sequence_length)
    print(
        f"{args.module}: {len(train)} train and {len(test)} test windows, "
        f"{len(vocabulary)} characters"
    )
    model = LanguageModel(vocab_size=len(vocabulary))
    init_params = model.init(jax.random.key(args.seed), train[:1, :-1])["params"]

    def loss_fn(params, windows):  # unreduced: one loss per token, [B, T]
        logits = model.apply({"params": params}, windows[:, :-1])
        return oek.softmax_cross_entropy(logits, windows[:, 1:])

    # The same mini-batches for both optimizers: shuffled epochs, fixed seed.
    rng = np.random.default_rng(args.seed)
    epochs = -(-args.steps * args.batch_size // len(train))
    order = np.concatenate([rng.permutation(len(train)) for _ in range(epochs)])
    batches = order[: args.steps * args.batch_size].reshape(args.steps, -1)

    curvature = oek.Curvature(loss_fn)
    layers = curvature.layers(init_params, train[batches[0]])
    print(layers)
    # learning_rate at most about damping (see the README); both settings are
    # the best of the sweeps in benchmarks/transformer.py.
    ekfac = oek.ekfac(
        layers, learning_rate=5e-3, momentum=0.9, damping=1.5e-2, eigen_update_every=10
    )
    adam = optax.adam(3e-3)

    def ekfac_step(params, opt_state, windows):
        loss, grads, stats = curvature.value_grad_and_stats(params, windows)
        updates, opt_state = ekfac.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    def adam_step(params, opt_state, windows):
        mean_loss = lambda p: loss_fn(p, windows).mean()  # noqa: E731
        loss, grads = jax.value_and_grad(mean_loss)(params)
        updates, opt_state = adam.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(lambda params, windows: loss_fn(params, windows).mean())

    rows, curves = [], {}
    for name, tx, step in [("ekfac", ekfac, ekfac_step), ("adam", adam, adam_step)]:
        params, losses, seconds, compile_seconds = compare.train(
            name,
            step,
            init_params,
            tx.init(init_params),
            [(train[batch],) for batch in batches],
        )
        train_loss = evaluate(params, train[:512])
        test_loss = evaluate(params, test[:512])
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
        "mini-batch loss (nats per character)",
        f"Character transformer on {args.module}'s source, "
        f"batch size {args.batch_size}",
        args.out,
    )


if __name__ == "__main__":
    main()
