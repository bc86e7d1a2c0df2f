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

A side whose dimension `d` exceeds `max_factor_dim` (a vocabulary-sized
output head; one coordinate more, a bias row, is allowed) gets a
block-diagonal factor, as Shampoo blocks its preconditioners: `k` diagonal
blocks of one size `b` of about `max_factor_dim`, stored stacked
`[k, b, b]`, the last one padded with zero rows and columns where `k b > d`
(`diagonal_blocks`). Its eigenbasis is block-diagonal too, `[k, b, b]`: `k`
eigendecompositions of `b x b` instead of one of `d x d`, memory `d b`
instead of `d²`, and each rotation costs `b` instead of `d` per coordinate.
The padded coordinates are given eigenvalues above the block's
(`isolated_padding`), so their eigenvectors are themselves and come last:
the first `d` of the `k b` basis vectors are the real ones, and scalings,
eigenvalues and rotated arrays keep the real shape `d` (`to_eigenbasis`,
`from_eigenbasis`, `real_eigenvalues`).
"""

from typing import Any

import jax
import jax.numpy as jnp

from optax_ekfac._src.sharding import (
    example_shards,
    reshape_keeping,
    sharding_of,
    sum_over_examples,
)
from optax_ekfac._src.state import BlockState

# The damping is at least this many machine epsilons times a block's largest
# scaling (`relative_damping_floor`), chosen by benchmarks/studies/float32_eigh.py.
_RELATIVE_DAMPING_FLOOR_EPS = 100

# Every matmul here (factors, projections onto the eigenbases, the
# preconditioner's rotations) runs in float32 whatever the ambient
# `jax_default_matmul_precision`: JAX's default rounds float32 inputs to TF32
# on recent GPUs and to bfloat16 on TPUs (10 or 7 bits, not 23), far above the
# round-off the damping floor assumes, and the rotations would mix large
# curvature directions into small ones. The model's own matmuls keep the
# user's setting. No effect on CPU.
MATMUL_PRECISION = jax.lax.Precision.HIGHEST


# --- block-diagonal factors ---------------------------------------------------


def diagonal_blocks(dim: int, max_factor_dim: int | None) -> tuple[int, int] | None:
    """`(k, b)`: the diagonal blocks of a factor side of `dim` coordinates.

    One coordinate beyond `max_factor_dim` is allowed, for a bias row: a
    side of `d = n + 1` coordinates is blocked only when `n > max_factor_dim`
    (so that a 1024-wide layer with its bias stays one factor at 1024), into
    `k = ceil(n / max_factor_dim)` blocks of one size
    `b = ceil(d / k) <= max_factor_dim + 1`, as equal as they can be: only
    the last block is padded, with `k b - d < b` coordinates. None (one dense
    `d x d` factor) otherwise, or when `max_factor_dim` is None.
    """
    if max_factor_dim is None or dim - 1 <= max_factor_dim:
        return None
    size = -(-dim // -(-(dim - 1) // max_factor_dim))
    return -(-dim // size), size


def factor_shape(dim: int, max_factor_dim: int | None) -> tuple[int, ...]:
    """The shape of one side's factor (and eigenbasis): `(dim, dim)`, or its
    diagonal blocks `(k, b, b)` (see `diagonal_blocks`)."""
    blocks = diagonal_blocks(dim, max_factor_dim)
    if blocks is None:
        return (dim, dim)
    num_blocks, size = blocks
    return (num_blocks, size, size)


def is_blocked(matrix: jax.Array, dim: int) -> bool:
    """Whether a factor or eigenbasis of a side of `dim` coordinates is
    block-diagonal (`[..., k, b, b]`, `b < dim`) rather than dense."""
    return matrix.shape[-1] != dim


def to_eigenbasis(array: jax.Array, basis: jax.Array, axis: int = -1) -> jax.Array:
    """The coordinates of `array` along `axis` in the eigenbasis `U`: `Uᵀ x`
    for every vector `x` along that axis (rows `x @ U`).

    `U` is one basis, dense `(d, d)` or block-diagonal `(k, b, b)` (a grouped
    or stacked block's callers vmap over its leading axes); the result has
    the shape of `array`.
    """
    return _rotated(array, basis, axis, back=False)


def from_eigenbasis(
    coordinates: jax.Array, basis: jax.Array, axis: int = -1
) -> jax.Array:
    """The inverse of `to_eigenbasis`: `U c` for every vector of coordinates
    `c` along `axis` (rows `c @ Uᵀ`)."""
    return _rotated(coordinates, basis, axis, back=True)


def _rotated(array: jax.Array, basis: jax.Array, axis: int, back: bool) -> jax.Array:
    """`to_eigenbasis` (`back=False`) or `from_eigenbasis` (`back=True`)."""
    array = jnp.moveaxis(array, axis, -1)
    dim = array.shape[-1]
    if not is_blocked(basis, dim):
        rotated = _matmul(array, basis.T if back else basis)
    else:
        # The padded coordinates are the last basis vectors (`isolated_padding`):
        # zeros in, and cropped off again after the rotation.
        num_blocks, size = basis.shape[:2]
        blocks = _padded_blocks(array, num_blocks, size)
        subscripts = "...kj,kij->...ki" if back else "...ki,kij->...kj"
        rotated = jnp.einsum(subscripts, blocks, basis, precision=MATMUL_PRECISION)
        rotated = reshape_keeping(
            rotated, rotated.shape[:-2] + (num_blocks * size,), rotated.ndim - 2
        )[..., :dim]
    return jnp.moveaxis(rotated, -1, axis)


def _padded_blocks(array: jax.Array, num_blocks: int, size: int) -> jax.Array:
    """`[..., d]` -> `[..., k, b]`, the last block padded with zeros."""
    padding = num_blocks * size - array.shape[-1]
    if padding:
        array = jnp.pad(array, [(0, 0)] * (array.ndim - 1) + [(0, padding)])
    return reshape_keeping(array, array.shape[:-1] + (num_blocks, size), array.ndim - 1)


def _sum_of_outer_products(rows: jax.Array, max_factor_dim: int | None) -> jax.Array:
    """`Σ_{n,p} r rᵀ` of rows `[N, P, d]`: dense `(d, d)`, or its diagonal
    blocks `(k, b, b)` where `diagonal_blocks` splits the side (the off-block
    products are never formed)."""
    blocks = diagonal_blocks(rows.shape[-1], max_factor_dim)
    if blocks is None:
        return sum_over_examples("npi,npj->ij", rows, rows, precision=MATMUL_PRECISION)
    rows = _padded_blocks(rows, *blocks)
    return sum_over_examples("npki,npkj->kij", rows, rows, precision=MATMUL_PRECISION)


def isolated_padding(factor: jax.Array, dim: int) -> jax.Array:
    """A block-diagonal factor ready to decompose: its padded diagonal entries
    (zero rows and columns past `dim`) set to distinct values above the
    largest eigenvalue of their block (from twice its largest absolute row
    sum, or 1 for a zero block), so that their eigenvectors are the padded
    coordinates themselves, sorted last in order, and the real coordinates'
    basis vectors are the block's own (left at zero, they would tie with a
    rank-deficient block's null directions and mix with them). A dense or
    unpadded factor is returned as it is.
    """
    if not is_blocked(factor, dim):
        return factor
    num_blocks, size = factor.shape[-3:-1]
    if num_blocks * size == dim:
        return factor
    coordinate = jnp.arange(num_blocks * size).reshape(num_blocks, size)
    bound = jnp.abs(factor).sum(-1).max(-1, keepdims=True)  # >= eigenvalues
    distinct = 1 + coordinate.astype(factor.dtype) / (num_blocks * size)
    above = jnp.where(bound > 0, 2 * bound, 1) * distinct
    shift = jnp.where(coordinate >= dim, above, 0)
    return factor + shift[..., None] * jnp.eye(size, dtype=factor.dtype)


def real_eigenvalues(eigenvalues: jax.Array, dim: int) -> jax.Array:
    """The eigenvalues of the `dim` real coordinates, `[..., dim]`: those of a
    block-diagonal factor (`[..., k, b]`) concatenated over its blocks, the
    padded coordinates' cropped off; a dense factor's as they are."""
    if eigenvalues.shape[-1] == dim:
        return eigenvalues
    flat = eigenvalues.reshape(eigenvalues.shape[:-2] + (-1,))
    return flat[..., :dim]


def dense_matrix(matrix: jax.Array, dim: int) -> jax.Array:
    """A factor or eigenbasis as one `(dim, dim)` matrix: a block-diagonal one
    (`(k, b, b)`) with zeros off its blocks, the padded rows and columns
    cropped off; a dense one as it is."""
    if not is_blocked(matrix, dim):
        return matrix
    num_blocks, size = matrix.shape[:2]
    identity = jnp.eye(num_blocks, dtype=matrix.dtype)
    dense = jnp.einsum("kij,kl->kilj", matrix, identity)
    return dense.reshape(num_blocks * size, num_blocks * size)[:dim, :dim]


# --- factors ------------------------------------------------------------------


def kronecker_factors(
    input_rows: jax.Array,
    output_rows: jax.Array,
    num_terms: Any,
    reduce_positions: bool,
    max_factor_dim: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`A` and `B` of one batch from rows `[N, P, dim]`.

    `A` is a mean over the rows; `B` sums the output gradients' outer products
    and divides by `num_terms`, the loss terms the loss averages (see the
    module docstring): the loss's scale lives in `B` and in the scalings.
    With `reduce_positions` (KFAC-reduce) the positions of an example are
    averaged (inputs) or summed (outputs) first. A side wider than
    `max_factor_dim` gets its diagonal blocks `(k, b, b)` (`diagonal_blocks`).
    """
    if reduce_positions:
        input_rows = input_rows.mean(1, keepdims=True)
        output_rows = output_rows.sum(1, keepdims=True)
    num_rows = input_rows.shape[0] * input_rows.shape[1]
    input_factor = _sum_of_outer_products(input_rows, max_factor_dim)
    output_factor = _sum_of_outer_products(output_rows, max_factor_dim)
    return input_factor / num_rows, output_factor / num_terms


def diagonal_factors(
    rows: tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array] | None],
    input_dim: int,
    num_terms: Any,
    max_factor_dim: int | None = None,
) -> tuple[jax.Array, jax.Array]:
    """`diag(A)` and `B` of one batch of one-hot rows: token ids `[N, P]`,
    output rows `[N, P, F]`, and the `(vocabulary, feature)` rows of calls
    with the sides swapped (`Embed.attend`), or None. `B` is block-diagonal
    where `diagonal_blocks` splits the `F` features."""
    ids, output_rows, attend_rows = rows
    num_examples, num_positions = output_rows.shape[:2]
    # One-hot rows: diag(A) counts the tokens; attend rows add their squares.
    input_factor = jnp.zeros(input_dim, output_rows.dtype)
    input_factor = input_factor.at[ids.reshape(-1)].add(
        1, out_sharding=sharding_of(input_factor)
    )
    output_factor = _sum_of_outer_products(output_rows, max_factor_dim)
    if attend_rows is not None:
        vocabulary_rows, feature_rows = attend_rows
        num_positions += vocabulary_rows.shape[1]
        input_factor += jnp.square(vocabulary_rows).sum((0, 1))
        output_factor += _sum_of_outer_products(feature_rows, max_factor_dim)
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
    `N = num_terms`, from rows `[N, P, dim]`; the bases dense or
    block-diagonal (`to_eigenbasis`)."""
    num_positions = output_rows.shape[1]
    projected_outputs = to_eigenbasis(output_rows, output_basis)
    projected_inputs = to_eigenbasis(input_rows, input_basis)
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
    projected_outputs = to_eigenbasis(output_rows, output_basis)
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
            jnp.square(to_eigenbasis(feature_rows, output_basis)),
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

    The eigenbases may be block-diagonal (`to_eigenbasis`): each of the four
    rotations is then one matmul per diagonal block.

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
    projected = to_eigenbasis(gradient.astype(output_basis.dtype), output_basis)
    if input_basis is not None:
        projected = to_eigenbasis(projected, input_basis, axis=0)
    projected = projected / (scalings + damping)
    if input_basis is not None:
        projected = from_eigenbasis(projected, input_basis, axis=0)
    return from_eigenbasis(projected, output_basis)


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
