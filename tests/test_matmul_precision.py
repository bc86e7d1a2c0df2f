"""EKFAC's own matmuls run in float32 whatever the default matmul precision.

On CPU every precision computes the same float32 product, so the test reads
the precision off the traced update instead: every `dot_general` of
`scale_by_ekfac`'s update (factors, scalings, projections, the
preconditioner's rotations, for every layer kind and every scalings path) must
carry `Precision.HIGHEST`, even under `jax.default_matmul_precision("bfloat16")`
(what a TPU user's default is, and coarser than a GPU's TF32).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ekfac as oek

HIGHEST = (jax.lax.Precision.HIGHEST, jax.lax.Precision.HIGHEST)


class EveryKind(nn.Module):
    """Embed (with a tied `attend`), attention (DenseGeneral), a Dense shared
    over positions, a grouped Conv, and a Dense head."""

    @nn.compact
    def __call__(self, tokens, images):
        embed = nn.Embed(7, 4)
        x = embed(tokens)
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(x)
        x = nn.Dense(4)(jnp.tanh(x))
        maps = nn.Conv(4, (3, 3), feature_group_count=2)(images)
        hidden = jnp.concatenate([x.mean(1), maps.mean((1, 2))], -1)
        return embed.attend(nn.Dense(4)(hidden))


def dot_precisions(jaxpr) -> list:
    """The `precision` of every `dot_general` in `jaxpr` and its sub-jaxprs
    (the `cond` branches, `scan` bodies and `pjit`s it calls)."""
    found = []
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            found.append(eqn.params["precision"])
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += dot_precisions(inner)
    return found


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 7, (6, 3))
    images = rng.normal(size=(6, 5, 5, 2)).astype(np.float32)
    labels = rng.integers(0, 7, 6)
    model = EveryKind()
    params = model.init(jax.random.key(0), tokens, images)["params"]

    def loss_fn(params, tokens, images, labels):
        logits = model.apply({"params": params}, tokens, images)
        return oek.softmax_cross_entropy(logits, labels)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, tokens, images, labels)
    _, grads, stats = curvature.value_grad_and_stats(params, tokens, images, labels)
    return dict(params=params, layers=layers, grads=grads, stats=stats)


@pytest.mark.parametrize(
    "settings",
    [
        {},  # exact scalings in one chunk
        {"max_per_example_elements": 8},  # exact scalings, chunked (scan)
        {"scalings": "per_position"},
        {"eigenvalue_correction": False},  # K-FAC's outer-product scalings
    ],
    ids=["exact", "chunked", "per_position", "kfac"],
)
def test_every_update_matmul_is_float32_under_a_coarse_default(problem, settings):
    kinds = {block.kind for block in problem["layers"].blocks}
    assert {"Dense", "DenseGeneral", "Conv", "Embed"} <= kinds
    tx = oek.scale_by_ekfac(problem["layers"], **settings)
    state = tx.init(problem["params"])

    def update(grads, state, stats):
        return tx.update(grads, state, problem["params"], stats=stats)

    with jax.default_matmul_precision("bfloat16"):
        jaxpr = jax.make_jaxpr(update)(problem["grads"], state, problem["stats"])
    precisions = dot_precisions(jaxpr.jaxpr)
    # Factors, projections and the four rotations of 6 blocks at least.
    assert len(precisions) > 20
    assert all(precision == HIGHEST for precision in precisions), precisions
