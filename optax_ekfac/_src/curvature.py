"""The curvature of one block, from rows: factors, eigenbases, scalings.

Pure math on arrays (no blocks, no optax). Per block, from the rows of a
batch of examples `n` with positions `p` each (input rows `a`, output rows
`d`, see `kinds/`) and a loss averaged over `N` loss terms:

    A ← EMA  mean_{n,p} a aᵀ                 input factor
    B ← EMA  (1/N) Σ_{n,p} d dᵀ              output factor
    U_A, U_B = eigh(A), eigh(B)              every `eigen_update_every` updates
    S ← EMA  (1/N) Σ_n (U_Aᵀ G_n U_B)²        scalings, G_n = Σ_p a dᵀ
    G ↦ U_A [(U_Aᵀ G U_B) / (S + λ')] U_Bᵀ    λ' = max(λ, ρ max S), ρ = 100 eps

`N` is the number of loss terms the loss averages (`Statistics.num_terms`,
times the label samples of a Monte-Carlo Fisher), not the number of
examples: the curvature is the Fisher of the mean loss `loss_fn` defines, so
`[B, T]` token losses divide by `B * T`, and the same model written on
`[B * T]` rows gets the same factors. With one loss term and one position per
example (an MLP) `A ⊗ B` is K-FAC's estimate of the Fisher
`(1/N) Σ_n vec(G_n) vec(G_n)ᵀ`. With weight sharing (sequences, image
positions, a module called twice) `A` averages over positions and `B` sums
over each example's positions: the KFAC-expand convention (Eschenhagen et
al., 2023), whose `A ⊗ B` is the Fisher when positions are independent;
`weight_sharing="reduce"` is KFAC-reduce (positions summed per example before
the outer products). The scalings are the exact second moments of the
per-example gradients in the eigenbasis (`scalings="exact"`, per-example
tensors in memory-bounded chunks) or, treating every position as its own
example, `(1/N) Σ_{n,p} (U_Aᵀa)² (U_Bᵀd)²ᵀ`: two matmuls
(`scalings="per_position"`, identical when `P = 1`). KFAC is the same path
with `S = outer(eigvals(A), eigvals(B))`.
"""

from typing import Any

import jax
import jax.numpy as jnp

from optax_ekfac._src.sharding import example_shards, sharding_of, sum_over_examples
from optax_ekfac._src.state import BlockState

# The damping is at least this many machine epsilons times a block's largest
# scaling (`relative_damping_floor`), chosen by benchmarks/float32_eigh.py.
_RELATIVE_DAMPING_FLOOR_EPS = 100

# Every matmul here (factors, projections onto the eigenbases, the
# preconditioner's rotations) runs in float32 whatever the ambient
# `jax_default_matmul_precision`: JAX's default rounds float32 inputs to TF32
# on recent GPUs and to bfloat16 on TPUs (10 or 7 bits, not 23), far above the
# round-off the damping floor assumes, and the rotations would mix large
# curvature directions into small ones. The model's own matmuls keep the
# user's setting. No effect on CPU.
MATMUL_PRECISION = jax.lax.Precision.HIGHEST


# --- factors ------------------------------------------------------------------


def kronecker_factors(
    input_rows: jax.Array,
    output_rows: jax.Array,
    num_terms: Any,
    reduce_positions: bool,
) -> tuple[jax.Array, jax.Array]:
    """`A` and `B` of one batch from rows `[N, P, dim]`.

    `A` is a mean over the rows; `B` sums the output gradients' outer products
    and divides by `num_terms`, the loss terms the loss averages (see the
    module docstring): the loss's scale lives in `B` and in the scalings.
    With `reduce_positions` (KFAC-reduce) the positions of an example are
    averaged (inputs) or summed (outputs) first.
    """
    if reduce_positions:
        input_rows = input_rows.mean(1, keepdims=True)
        output_rows = output_rows.sum(1, keepdims=True)
    flat_inputs = input_rows.reshape(-1, input_rows.shape[-1])
    input_factor = sum_over_examples(
        "ni,nj->ij", flat_inputs, flat_inputs, precision=MATMUL_PRECISION
    )
    input_factor /= flat_inputs.shape[0]
    flat_outputs = output_rows.reshape(-1, output_rows.shape[-1])
    output_factor = sum_over_examples(
        "ni,nj->ij", flat_outputs, flat_outputs, precision=MATMUL_PRECISION
    )
    output_factor /= num_terms
    return input_factor, output_factor


def diagonal_factors(
    rows: tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None],
    input_dim: int,
    num_terms: Any,
) -> tuple[jax.Array, jax.Array]:
    """`diag(A)` and `B` of one batch of one-hot rows: token ids `[N, P]`,
    output rows `[N, P, F]`, and the `(vocabulary, feature)` rows of calls
    with the sides swapped (`Embed.attend`), or None."""
    ids, output_rows, attend_rows = rows
    num_examples, num_positions = output_rows.shape[:2]
    # One-hot rows: diag(A) counts the tokens; attend rows add their squares.
    input_factor = jnp.zeros(input_dim, output_rows.dtype)
    input_factor = input_factor.at[ids.reshape(-1)].add(
        1, out_sharding=sharding_of(input_factor)
    )
    output_factor = sum_over_examples(
        "npi,npj->ij", output_rows, output_rows, precision=MATMUL_PRECISION
    )
    if attend_rows is not None:
        vocabulary_rows, feature_rows = attend_rows
        num_positions += vocabulary_rows.shape[1]
        input_factor += jnp.square(vocabulary_rows).sum((0, 1))
        output_factor += sum_over_examples(
            "npi,npj->ij", feature_rows, feature_rows, precision=MATMUL_PRECISION
        )
    return (
        input_factor / (num_examples * num_positions),
        output_factor / num_terms,
    )


def ema(
    average: jax.Array, value: jax.Array, decay: Any, count: jax.Array
) -> jax.Array:
    """Bias-corrected running average after `count` values (`count >= 1`).

    Stored corrected: the newest value weighs `(1 - decay) / (1 - decay^count)`,
    so the first value replaces the average outright.
    """
    dtype = average.dtype
    weight = (1 - decay) / (1 - jnp.asarray(decay, dtype) ** count.astype(dtype))
    return average + weight * (value.astype(dtype) - average)


# --- eigenbases ---------------------------------------------------------------


def symmetric_eigh(factor: jax.Array, dtype: Any = None) -> tuple[jax.Array, jax.Array]:
    """Eigenvalues (clipped at 0 against round-off) and eigenvectors.

    Of the symmetrized factor (round-off leaves the EMA slightly asymmetric),
    or of each of a stack of factors; computed in `dtype` (None: the factor's,
    at least float32) and returned in the factor's dtype.
    """
    dtype = dtype or jnp.promote_types(factor.dtype, jnp.float32)
    eigenvalues, eigenvectors = jnp.linalg.eigh(
        factor.astype(dtype), symmetrize_input=True
    )
    return (
        jnp.maximum(eigenvalues, 0).astype(factor.dtype),
        eigenvectors.astype(factor.dtype),
    )


# --- scalings -----------------------------------------------------------------


def scalings(
    input_rows: jax.Array,
    output_rows: jax.Array,
    input_basis: jax.Array,
    output_basis: jax.Array,
    num_terms: Any,
    *,
    exact: bool,
    max_elements: int,
    axis_name: str,
) -> jax.Array:
    """`(1/N) Σ_n (U_Aᵀ G_n U_B)²` (or its per-position form) of one batch,
    `N = num_terms`, from rows `[N, P, dim]`."""
    num_positions = output_rows.shape[1]
    projected_outputs = _matmul(output_rows, output_basis)
    projected_inputs = _matmul(input_rows, input_basis)
    if num_positions == 1 or not exact:
        # Two matmuls: Σ_{n,p} (U_Aᵀa)² (U_Bᵀd)²ᵀ.
        return (
            sum_over_examples(
                "npi,npo->io",
                jnp.square(projected_inputs),
                jnp.square(projected_outputs),
                precision=MATMUL_PRECISION,
            )
            / num_terms
        )
    return (
        _sum_of_squared_per_example_gradients(
            projected_inputs, projected_outputs, max_elements, axis_name
        )
        / num_terms
    )


def diagonal_scalings(
    rows: tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None],
    output_basis: jax.Array,
    input_dim: int,
    num_terms: Any,
) -> jax.Array:
    """Per-position scalings of one-hot rows (the input basis is the identity):
    row `id` of `S` gathers `(U_Bᵀ d)²` of that token, `(1/N)`-scaled; `rows`
    as for `diagonal_factors`."""
    ids, output_rows, attend_rows = rows
    projected_outputs = _matmul(output_rows, output_basis)
    output_dim = projected_outputs.shape[-1]
    squares = jnp.square(projected_outputs).reshape(-1, output_dim)
    scalings = jnp.zeros((input_dim, output_dim), squares.dtype)
    scalings = scalings.at[ids.reshape(-1)].add(
        squares, out_sharding=sharding_of(scalings)
    )
    if attend_rows is not None:
        vocabulary_rows, feature_rows = attend_rows
        scalings += sum_over_examples(
            "npv,npf->vf",
            jnp.square(vocabulary_rows),
            jnp.square(_matmul(feature_rows, output_basis)),
            precision=MATMUL_PRECISION,
        )
    return scalings / num_terms


def kfac_scalings(input_eigenvalues: jax.Array, output_eigenvalues: jax.Array):
    """K-FAC's scalings `outer(eigvals(A), eigvals(B))` (per group)."""
    return jnp.einsum(
        "...i,...o->...io",
        input_eigenvalues,
        output_eigenvalues,
        precision=MATMUL_PRECISION,
    )


# --- preconditioning ----------------------------------------------------------


def precondition(
    block_state: BlockState,
    gradient: jax.Array,
    damping: float | jax.Array,
    min_relative_damping: float | None = None,
) -> jax.Array:
    """`U_A [(U_Aᵀ G U_B) / (S + λ')] U_Bᵀ` for one block matrix `G`.

    The damping used is `λ' = max(λ, ρ · max(S))`: at least a fraction `ρ` of
    the block's largest scaling, so that the curvature the preconditioner
    inverts has a condition number of at most `1 + 1/ρ` (see
    `relative_damping_floor`). `‖result‖ ≤ ‖G‖ / λ' ≤ ‖G‖ / λ`.

    Args:
        block_state: the curvature of the block (one group of a grouped one).
        gradient: `G`, `(input_dim, output_dim)`.
        damping: `λ`.
        min_relative_damping: `ρ`; None for `relative_damping_floor` of the
            state's dtype, 0 for `λ' = λ`.

    Returns:
        The preconditioned block matrix, in the state's dtype.
    """
    input_basis = block_state.input_eigenbasis
    output_basis = block_state.output_eigenbasis
    scalings = block_state.scalings
    if min_relative_damping is None:
        min_relative_damping = relative_damping_floor(scalings.dtype)
    damping = jnp.maximum(damping, min_relative_damping * scalings.max())
    projected = _matmul(gradient.astype(output_basis.dtype), output_basis)
    if input_basis is not None:
        projected = _matmul(input_basis.T, projected)
    projected = projected / (scalings + damping)
    if input_basis is not None:
        projected = _matmul(input_basis, projected)
    return _matmul(projected, output_basis.T)


def relative_damping_floor(dtype: Any, eigh_dtype: Any = None) -> float:
    """`ρ = 100 eps`: the smallest damping, relative to a block's largest
    scaling, that `scale_by_ekfac` uses (float32: 1.2e-5; float64: 2.2e-14).

    `eps` is the machine epsilon of the less precise of the state's dtype and
    the dtype of the eigendecompositions. Round-off in the factors, their
    eigenvectors, the scalings and the gradient perturbs the curvature by
    about `eps · max(S)` in every direction; a damping well above that keeps
    the update within about `eps / ρ` (relative) of the exact one for that
    damping, where a smaller one would divide round-off by almost nothing.
    """
    eps = max(
        float(jnp.finfo(dtype).eps),
        float(jnp.finfo(eigh_dtype).eps) if eigh_dtype is not None else 0.0,
    )
    return _RELATIVE_DAMPING_FLOOR_EPS * eps


def _matmul(a: jax.Array, b: jax.Array) -> jax.Array:
    """`a @ b` in float32 (`MATMUL_PRECISION`)."""
    return jnp.matmul(a, b, precision=MATMUL_PRECISION)


def _sum_of_squared_per_example_gradients(
    inputs: jax.Array, outputs: jax.Array, max_elements: int, axis_name: str
) -> jax.Array:
    """`Σ_n (Σ_p a_{n,p} d_{n,p}ᵀ)²` in chunks of at most `max_elements`.

    The examples are grouped by the shard of the example axis that holds them
    (see `sharding.example_shards`) and each group is cut into chunks: every scan
    step takes one chunk of every shard, so each device works on its own
    examples at every step, keeps its partial sum, and the shards are summed
    once at the end. The bound holds per shard.
    """
    num_examples, num_positions, input_dim = inputs.shape
    output_dim = outputs.shape[-1]
    example_sharding = jax.typeof(inputs).sharding
    num_shards = example_shards(inputs, axis_name)
    per_shard = num_examples // num_shards
    chunk = max(1, min(per_shard, max_elements // (input_dim * output_dim)))

    def by_shard(rows):  # [N, P, d] -> [shards, N / shards, P, d], no transfer
        return rows.reshape((num_shards, per_shard) + rows.shape[1:])

    def chunk_sum(inputs, outputs):
        per_example = jnp.einsum(
            "snpi,snpo->snio", inputs, outputs, precision=MATMUL_PRECISION
        )
        return jnp.square(per_example).sum(1)  # [shards, i, o]

    if chunk == per_shard:
        return chunk_sum(by_shard(inputs), by_shard(outputs)).sum(0)
    num_chunks = -(-per_shard // chunk)
    padding = [(0, 0), (0, num_chunks * chunk - per_shard), (0, 0), (0, 0)]

    def chunked(rows):
        rows = jnp.pad(by_shard(rows), padding)  # zero examples add nothing
        rows = rows.reshape((num_shards, num_chunks, chunk) + rows.shape[2:])
        return jnp.moveaxis(rows, 1, 0)  # [chunks, shards, chunk, P, d]

    def add_chunk(total, rows):
        return total + chunk_sum(*rows), None

    partial_sharding = jax.sharding.NamedSharding(
        example_sharding.mesh, jax.sharding.PartitionSpec(example_sharding.spec[0])
    )
    initial = jnp.zeros(
        (num_shards, input_dim, output_dim), inputs.dtype, out_sharding=partial_sharding
    )
    total, _ = jax.lax.scan(add_chunk, initial, (chunked(inputs), chunked(outputs)))
    return total.sum(0)
