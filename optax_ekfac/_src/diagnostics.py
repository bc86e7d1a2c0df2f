"""Diagnostics: cheap views of the captured statistics and of the curvature.

The statistics of a batch already hold every block's per-example gradients:
`G_n = Σ_p a_{n,p} d_{n,p}ᵀ` from the input rows `a` and output rows `d`
(each kind's `per_example_gradients`, the one implementation the optimizer's
rows come from too; a tied embedding's `attend` calls included). From them:

* `per_example_gradients` and `gradient_variance`, in the parameters' shapes;
* for small models, dense `(D, D)` blocks, `D = input_dim * output_dim`, with
  `vec` row-major over the block matrix `(input_dim, output_dim)`:
  `fisher_block` (the exact Fisher the statistics estimate,
  `(1/N) Σ_n vec(G_n) vec(G_n)ᵀ` over the `N` loss terms), `kfac_block`
  (`A ⊗ B`) and `ekfac_block` (`(U_A ⊗ U_B) diag(vec S) (U_A ⊗ U_B)ᵀ`) from
  an optimizer state, and
  `frobenius_distances` between the three.

The example axis is the statistics' axis 0: with `Curvature(fisher_type="mc",
num_samples=S)` its `S * N` rows are (sample, example) pairs, and the Fisher
block is the Monte-Carlo Fisher of those samples. A grouped convolution's
blocks are independent per group: its results carry a leading group axis;
a stacked block's (a scanned layer's) carry its stack's axes after the
example axis, and those of a state before its own.
"""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from optax_ekfac._src import kinds
from optax_ekfac._src.blocks import Block, Layers, leaves_by_path
from optax_ekfac._src.curvature import dense_matrix
from optax_ekfac._src.kinds import block_leaves
from optax_ekfac._src.state import BlockState, ScaleByEkfacState
from optax_ekfac._src.statistics import Statistics


def per_example_gradients(
    layers: Layers, stats: Statistics, params: optax.Params
) -> dict[str, Any]:
    """Per-example gradients of every block's parameters, from the statistics.

    Args:
        layers: the blocks, from `Curvature.layers`.
        stats: the statistics of a batch, from `Curvature.value_grad_and_stats`.
        params: the model's parameters (arrays or `jax.ShapeDtypeStruct`s):
            they give the leaves' shapes and dtypes.

    Returns:
        A params-like nested dict holding the parameters that blocks own (not
        the diagonal fallback's), each with a leading example axis: `[N, ...]`
        (`[S * N, ...]` for Monte-Carlo statistics). From empirical statistics
        these are `jax.vmap(jax.grad(loss_of_one_example))`, an example's loss
        being the sum of its loss terms; their sum over the examples divided
        by `stats.num_terms` is the batch gradient.

    Example:
        >>> loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        >>> per_example = optax_ekfac.per_example_gradients(layers, stats, params)
        >>> per_example["Dense_0"]["kernel"].shape   # [N, d_in, d_out]
        (32, 8, 16)
    """
    leaves = leaves_by_path(params)
    per_example = {}
    for block in layers.blocks:
        per_example.update(_per_example_leaves(block, stats, leaves))
    return traverse_util.unflatten_dict(per_example)


def gradient_variance(
    layers: Layers, stats: Statistics, params: optax.Params
) -> dict[str, Any]:
    """The variance of every block parameter's per-example gradients.

    Args:
        layers: the blocks, from `Curvature.layers`.
        stats: the statistics of a batch, from `Curvature.value_grad_and_stats`.
        params: the model's parameters (arrays or `jax.ShapeDtypeStruct`s).

    Returns:
        A params-like nested dict, in the parameters' shapes:
        `mean_n (g_n - mean_n g_n)²` elementwise over the examples `n`
        (population variance, `ddof=0`).

    Example:
        >>> variance = optax_ekfac.gradient_variance(layers, stats, params)
        >>> variance["Dense_0"]["kernel"].shape   # the kernel's own shape
        (8, 16)
        >>> noise = jax.tree.map(jnp.sum, variance)   # per-leaf gradient noise
    """
    leaves = leaves_by_path(params)
    variances = {}
    for block in layers.blocks:
        gradients = _per_example_block_gradients(block, stats)
        variances.update(block_leaves(block, jnp.var(gradients, axis=0), leaves))
    return traverse_util.unflatten_dict(variances)


def fisher_block(block: Block, stats: Statistics) -> jax.Array:
    """The exact Fisher block the statistics estimate, dense.

    Args:
        block: one of `Curvature.layers(...).blocks`.
        stats: the statistics of a batch, from `Curvature.value_grad_and_stats`.

    Returns:
        `(1/N) Σ_n vec(G_n) vec(G_n)ᵀ` over the examples `n`, with `N` the
        number of loss terms (`stats.num_sampled_terms`: the loss's terms
        times its label samples), `(D, D)` with `D = input_dim * output_dim`
        and `vec` row-major (`(G, D, D)` for a grouped block): the Fisher of
        the mean loss, empirical from empirical statistics, the Monte-Carlo
        Fisher of the sampled labels from `fisher_type="mc"` statistics.

    Example:
        >>> block = layers.blocks[0]
        >>> fisher = optax_ekfac.fisher_block(block, stats)
        >>> fisher.shape == (block.input_dim * block.output_dim,) * 2
        True
    """
    gradients = _per_example_block_gradients(block, stats)
    flat = gradients.reshape(gradients.shape[: gradients.ndim - 2] + (-1,))
    # [N, (G,) D] -> (G,) D x D
    return jnp.einsum("n...i,n...j->...ij", flat, flat) / stats.num_sampled_terms


def kfac_block(block_state: BlockState) -> jax.Array:
    """K-FAC's approximation of a block, `A ⊗ B`, dense.

    Args:
        block_state: one block of a `ScaleByEkfacState`
            (`opt_state.blocks[name]`).

    Returns:
        `kron(A, B)`, `(D, D)` (`(G, D, D)` for a grouped block), from the
        state's running averages of the factors; a block-diagonal factor
        (`max_factor_dim`) as its dense matrix, zero off its blocks.

    Example:
        >>> tx = optax_ekfac.scale_by_ekfac(layers)
        >>> _, ekfac_state = tx.update(grads, tx.init(params), params, stats=stats)
        >>> optax_ekfac.kfac_block(ekfac_state.blocks["Dense_0"]).shape  # (D, D)
        (144, 144)
    """
    if block_state.scalings.ndim > 2:  # groups, or a stack
        return jax.vmap(kfac_block)(block_state)
    input_dim, output_dim = block_state.scalings.shape
    input_factor = block_state.input_factor
    if input_factor.ndim == 1:  # a diagonal input factor (embeddings)
        input_factor = jnp.diag(input_factor)
    return jnp.kron(
        dense_matrix(input_factor, input_dim),
        dense_matrix(block_state.output_factor, output_dim),
    )


def ekfac_block(block_state: BlockState) -> jax.Array:
    """EKFAC's approximation of a block, dense.

    Args:
        block_state: one block of a `ScaleByEkfacState`
            (`opt_state.blocks[name]`).

    Returns:
        `(U_A ⊗ U_B) diag(vec S) (U_A ⊗ U_B)ᵀ`, `(D, D)` (`(G, D, D)` for a
        grouped block), undamped; block-diagonal eigenbases
        (`max_factor_dim`) as their dense matrices. With
        `eigenvalue_correction=False` the scalings are K-FAC's and this is
        `kfac_block` with the factors as of the last eigendecomposition.

    Example:
        >>> tx = optax_ekfac.scale_by_ekfac(layers)
        >>> _, ekfac_state = tx.update(grads, tx.init(params), params, stats=stats)
        >>> optax_ekfac.ekfac_block(ekfac_state.blocks["Dense_0"]).shape  # (D, D)
        (144, 144)
    """
    if block_state.scalings.ndim > 2:  # groups, or a stack
        return jax.vmap(ekfac_block)(block_state)
    input_dim, output_dim = block_state.scalings.shape
    input_basis = block_state.input_eigenbasis
    if input_basis is None:  # a diagonal input factor: U_A = I
        input_basis = jnp.eye(input_dim, dtype=block_state.scalings.dtype)
    basis = jnp.kron(
        dense_matrix(input_basis, input_dim),
        dense_matrix(block_state.output_eigenbasis, output_dim),
    )
    return (basis * block_state.scalings.reshape(-1)) @ basis.T


class BlockDistances(NamedTuple):
    """Frobenius distances between a block's exact Fisher and its approximations.

    Attributes:
        fisher_norm: `‖F‖`, to turn the others into relative errors.
        kfac: `‖kfac_block - F‖`.
        ekfac: `‖ekfac_block - F‖`. When the state holds this batch's
            statistics alone and its scalings are exact (`scalings="exact"`,
            or one position per example; embeddings use per-position
            scalings), it is never above `kfac`: both are diagonal in K-FAC's
            eigenbasis, and EKFAC's diagonal is the best one there.
        kfac_to_ekfac: `‖kfac_block - ekfac_block‖`.
    """

    fisher_norm: jax.Array
    kfac: jax.Array
    ekfac: jax.Array
    kfac_to_ekfac: jax.Array


def frobenius_distances(
    layers: Layers, stats: Statistics, opt_state: Any
) -> dict[str, BlockDistances]:
    """How far K-FAC and EKFAC are from the exact Fisher, per block.

    Args:
        layers: the blocks, from `Curvature.layers`.
        stats: the statistics of a batch, from `Curvature.value_grad_and_stats`:
            they give the exact Fisher `F` (`fisher_block`).
        opt_state: a `ScaleByEkfacState`, or an optimizer state holding one
            (e.g. `optax.chain`'s or `ekfac`'s). To compare with this batch's
            Fisher alone, update a fresh state with `stats` once (the running
            averages are bias-corrected).

    Returns:
        Block name -> `BlockDistances`. Every block is materialized densely:
        for small models.

    Example:
        >>> tx = optax_ekfac.scale_by_ekfac(layers)
        >>> _, state = tx.update(grads, tx.init(params), params, stats=stats)
        >>> distances = optax_ekfac.frobenius_distances(layers, stats, state)
        >>> bool(distances["Dense_0"].ekfac <= distances["Dense_0"].kfac)
        True
    """
    ekfac_state = _find_ekfac_state(opt_state)
    distances = {}
    for block in layers.blocks:
        block_state = ekfac_state.blocks[block.name]
        fisher = fisher_block(block, stats)
        kfac = kfac_block(block_state)
        ekfac = ekfac_block(block_state)
        distances[block.name] = BlockDistances(
            fisher_norm=_frobenius_norm(fisher),
            kfac=_frobenius_norm(kfac - fisher),
            ekfac=_frobenius_norm(ekfac - fisher),
            kfac_to_ekfac=_frobenius_norm(kfac - ekfac),
        )
    return distances


def _per_example_block_gradients(block: Block, stats: Statistics) -> jax.Array:
    """`G_n`, `[N, input_dim, output_dim]` (grouped: `[N, G, ...]`; stacked:
    `[N, *stack, ...]`), in at least float32."""
    block_stats = stats.layers[block.name]
    dtype = jnp.promote_types(block_stats[0].output_grads.dtype, jnp.float32)
    gradients = kinds.per_example_block_gradients(block, block_stats, dtype)
    return jnp.moveaxis(gradients, len(block.stack), 0)


def _per_example_leaves(block: Block, stats: Statistics, leaves):
    gradients = _per_example_block_gradients(block, stats)
    return jax.vmap(lambda gradient: block_leaves(block, gradient, leaves))(gradients)


def _frobenius_norm(matrices: jax.Array) -> jax.Array:
    # Over every axis: a grouped block's groups are one block-diagonal matrix.
    return jnp.sqrt(jnp.sum(jnp.square(matrices)))


def _find_ekfac_state(opt_state: Any) -> ScaleByEkfacState:
    def is_ekfac_state(node):
        return isinstance(node, ScaleByEkfacState)

    found = [
        node
        for node in jax.tree.leaves(opt_state, is_leaf=is_ekfac_state)
        if is_ekfac_state(node)
    ]
    if len(found) != 1:
        raise ValueError(
            "frobenius_distances: opt_state must hold exactly one "
            f"ScaleByEkfacState (from scale_by_ekfac or ekfac); found {len(found)}."
        )
    return found[0]
