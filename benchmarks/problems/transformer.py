"""Benchmark 4: a small character-level transformer language model.

The text is the source code of pure-Python standard-library modules
(`data.TEXT_MODULES`, read with `inspect.getsource`), so it ships with Python;
the last 10% is held out. The model: token and position embeddings (`nn.Embed`),
pre-LayerNorm blocks of causal multi-head self-attention
(`nn.MultiHeadDotProductAttention`, whose projections are `DenseGeneral`
blocks) and a GELU MLP, a final LayerNorm and a Dense to the logits. Token
losses `[B, T]`: every next-character prediction is a loss term, so EKFAC and
KFAC use the default `weight_sharing="expand"` and exact per-example
scalings. LayerNorm scales and biases get EKFAC's diagonal fallback.

Usage:
    python -m benchmarks.problems.transformer [--quick] [--steps N] [--out DIR]
"""

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

import optax_ekfac as oek
from benchmarks.harness import cli, data, records, reporting, specs

SEQUENCE_LENGTH = 64


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
    """A decoder-only transformer over character ids."""

    vocab_size: int
    width: int = 64
    num_layers: int = 2
    num_heads: int = 4
    mlp_width: int = 256

    @nn.compact
    def __call__(self, tokens):
        batch_size, length = tokens.shape
        positions = jnp.broadcast_to(jnp.arange(length), (batch_size, length))
        x = nn.Embed(self.vocab_size, self.width)(tokens)
        x = x + nn.Embed(length, self.width)(positions)
        mask = nn.make_causal_mask(tokens)
        for _ in range(self.num_layers):
            x = Block(self.num_heads, self.mlp_width)(x, mask)
        return nn.Dense(self.vocab_size)(nn.LayerNorm()(x))


def problem(
    batch_size: int = 32,
    num_chars: int = 200_000,
    seed: int = 0,
    *,
    sequence_length: int = SEQUENCE_LENGTH,
    **model_settings: int,
) -> specs.Problem:
    """Next-character prediction on Python's source; target train loss 1.8
    nats per character.

    Args:
        batch_size: sequences per step.
        num_chars: characters of text (the last 10% held out).
        seed: the initialization.
        sequence_length: characters per sequence.
        **model_settings: `LanguageModel`'s sizes (`width`, `num_layers`,
            `num_heads`, `mlp_width`; its defaults where not given).
    """
    text = data.python_source(num_chars)
    train, test, vocabulary = data.character_sequences(text, sequence_length)
    model = LanguageModel(vocab_size=len(vocabulary), **model_settings)

    def loss_fn(params, windows):
        logits = model.apply({"params": params}, windows[:, :-1])
        return oek.softmax_cross_entropy(logits, windows[:, 1:])  # [B, T]

    return specs.Problem(
        name="transformer",
        title=(
            f"Transformer LM ({model.num_layers} layers, width {model.width}, "
            f"{len(vocabulary)} characters) on Python's source"
        ),
        loss_fn=loss_fn,
        # One compiled init, not one per initializer.
        params=jax.jit(model.init)(jax.random.key(seed), train[:1, :-1])["params"],
        train=(train,),
        test=(test,),
        batch_size=batch_size,
        target_loss=1.8,
        eval_size=512,
    )


def optimizers(quick: bool) -> list[specs.Optimizer]:
    """The four optimizers; the quick run keeps one setting of each."""
    adam_learning_rates = [1e-3, 3e-3, 1e-2]
    sgd_learning_rates = [0.1, 0.3, 1.0]
    return specs.standard_optimizers(
        adam_learning_rates=adam_learning_rates,
        sgd_learning_rates=sgd_learning_rates,
        # One setting each when quick: a step of this model is the slowest here.
        quick_settings=slice(1, 2) if quick else None,
    )


def main(argv: Sequence[str] | None = None) -> records.BenchmarkResult:
    return cli.convergence_main(
        argv,
        __doc__,
        problem,
        optimizers,
        steps=300,
        quick_steps=20,
        targets=reporting.fewer_steps_and_no_more_time,
    )


if __name__ == "__main__":
    main()
