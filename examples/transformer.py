"""EKFAC against Adam on a tiny character-level transformer language model.

The text is the source code of a pure-Python standard-library module (`argparse`
by default), read with `inspect.getsource`, so it ships with Python; its last
10% is held out. The model (width 64): token and position embeddings
(`nn.Embed`), two pre-LayerNorm blocks of causal multi-head self-attention
(`nn.MultiHeadDotProductAttention`, whose projections are `DenseGeneral`
blocks) and a GELU MLP of width 128, written as production code writes them:
one block under `nn.scan` (parameters stacked on a leading layer axis, one
EKFAC block per layer and projection, their eigendecompositions batched) and
`nn.remat` (activations recomputed in the backward pass), a final LayerNorm,
and logits from the
token embedding itself (`Embed.attend`: tied input and output embeddings, one
EKFAC block with two calls). The loss is per token, `[B, T]`: every
next-character prediction is a loss term, and EKFAC treats each as one (the
default `weight_sharing="expand"`). LayerNorm scales and biases get EKFAC's
diagonal fallback. Both optimizers start from the same initialization and see
the same mini-batches. The script prints each optimizer's final train and test
loss (nats per character, on up to 512 windows) and its step times (the first
step, which compiles, apart), and saves a plot of the mini-batch loss against
step and against seconds.

Runs offline, in about 30 seconds on a 2-core CPU.

Usage:
    python examples/transformer.py
    python examples/transformer.py --steps 400 --batch-size 32 --module textwrap
"""

import importlib
import inspect
from collections.abc import Sequence

import _shared
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

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
        return x + nn.Dense(x.shape[-1])(hidden), None  # (carry, output): nn.scan


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
        blocks = nn.scan(
            nn.remat(Block),
            variable_axes={"params": 0},
            split_rngs={"params": True},
            in_axes=nn.broadcast,  # the same mask for every layer
            length=self.num_layers,
        )
        x, _ = blocks(self.num_heads, self.mlp_width, name="blocks")(x, mask)
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


def main(argv: Sequence[str] | None = None) -> None:
    parser = _shared.arguments(__doc__, steps=100, batch_size=16, out="transformer.png")
    parser.add_argument("--module", default="argparse", help="source text")
    parser.add_argument("--sequence-length", type=int, default=64)
    args = parser.parse_args(argv)
    _shared.limit_blas_threads()

    train, test, vocabulary = load_data(args.module, args.sequence_length)
    print(
        f"{args.module}: {len(train)} train and {len(test)} test windows, "
        f"{len(vocabulary)} characters"
    )
    batches = _shared.mini_batches(args, train)  # the same for both optimizers
    model = LanguageModel(vocab_size=len(vocabulary))
    init_params = model.init(jax.random.key(args.seed), train[:1, :-1])["params"]

    def loss_fn(params, windows):  # unreduced: one loss per token, [B, T]
        logits = model.apply({"params": params}, windows[:, :-1])
        return oek.softmax_cross_entropy(logits, windows[:, 1:])

    # The sampled Fisher: the curvature the adaptive step is measured to need.
    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    layers = curvature.layers(init_params, *batches[0])
    print(layers)
    # The defaults: step size, momentum and damping adapted every step.
    ekfac = oek.ekfac(layers)
    adam = optax.adam(3e-3)

    @jax.jit
    def ekfac_step(params, opt_state, windows):
        loss, grads, stats = curvature.value_grad_and_stats(params, windows)
        updates, opt_state = ekfac.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    adam_step = _shared.optax_step(loss_fn, adam)  # the baseline: plain optax
    runs = _shared.train_each(
        init_params, batches, ekfac=(ekfac, ekfac_step), adam=(adam, adam_step)
    )

    def evaluate(params, windows):
        return {"loss": loss_fn(params, windows).mean()}

    _shared.print_results(
        args, runs, jax.jit(evaluate), train=(train[:512],), test=(test[:512],)
    )
    _shared.plot_losses(
        runs,
        args,
        f"Character transformer on {args.module}'s source",
        "mini-batch loss (nats per character)",
    )


if __name__ == "__main__":
    main()
