"""The token model the plumbing and masked-loss tests share, in float64:
`Embed -> Dense -> tanh -> Dense` on `[4, 6]` token ids, with a padding mask
of sequence lengths 6, 3, 5 and 1 (15 real tokens)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import optax_ekfac as oek

VOCAB, FEATURES, HIDDEN = 7, 4, 5
F64 = dict(param_dtype=jnp.float64)


class TokenModel(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, FEATURES, **F64)(ids)
        h = jnp.tanh(nn.Dense(HIDDEN, **F64)(h))
        return nn.Dense(VOCAB, **F64)(h)


MODEL = TokenModel()
LENGTHS = np.array([6, 3, 5, 1])
IDS = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 6)))
TARGETS = jnp.asarray(np.random.default_rng(1).integers(0, VOCAB, (4, 6)))
MASK = jnp.asarray(np.arange(6)[None] < LENGTHS[:, None])
PARAMS = MODEL.init(jax.random.key(0), IDS)["params"]


def masked_loss_fn(params, ids, targets, mask):
    """Token losses with the padding mask as the helper's `weights`."""
    logits = MODEL.apply({"params": params}, ids)
    return oek.softmax_cross_entropy(logits, targets, weights=mask)
