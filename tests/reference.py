"""Brute-force references: per-example quantities from `jax.vmap(jax.grad(...))`.

The reference models mark each Dense layer's input with `sow` and its output with
flax's own `perturb`, so per-example output gradients come from gradients with
respect to perturbations, example by example, independently of the library's
interceptor (for which `perturb` is a no-op).
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import optax_ekfac as oek


class MLP(nn.Module):
    """Dense layers with tanh between (none if `linear`); layer i is `dense_i`."""

    features: tuple[int, ...] = (6, 3)
    use_bias: tuple[bool, ...] = (True, True)
    linear: bool = False

    @nn.compact
    def __call__(self, x):
        for i, (features, use_bias) in enumerate(zip(self.features, self.use_bias)):
            if i and not self.linear:
                x = jnp.tanh(x)
            self.sow("intermediates", f"input_{i}", x)
            x = nn.Dense(
                features, use_bias=use_bias, name=f"dense_{i}", param_dtype=jnp.float64
            )(x)
            x = self.perturb(f"output_{i}", x)
        return x


def init(model, x):
    """Params and zero perturbations for a batch of one example like `x[:1]`."""
    variables = model.init(jax.random.key(0), x[:1])
    return variables["params"], variables["perturbations"]


def per_example(model, params, perturbations, loss_of_outputs, x, y):
    """Per-example inputs, output gradients and parameter gradients.

    Returns:
        (inputs, output_grads, param_grads): dicts keyed by layer index holding
        `[N, ...]` arrays, and the params tree with a leading `N` axis.
    """

    def loss_n(params, perturbations, x_n, y_n):
        outputs = model.apply(
            {"params": params, "perturbations": perturbations}, x_n[None]
        )
        return loss_of_outputs(outputs, y_n[None])[0]

    # Jitted: one compilation, not one per operation.
    param_grads, perturbation_grads = jax.jit(
        jax.vmap(jax.grad(loss_n, argnums=(0, 1)), in_axes=(None, None, 0, 0))
    )(params, perturbations, x, y)
    _, sown = jax.jit(
        lambda params, x: model.apply({"params": params}, x, mutable=["intermediates"])
    )(params, x)
    num_layers = len(model.features)
    inputs = {i: sown["intermediates"][f"input_{i}"][0] for i in range(num_layers)}
    output_grads = {
        i: perturbation_grads[f"output_{i}"][:, 0] for i in range(num_layers)
    }
    return inputs, output_grads, param_grads


def per_example_param_grads(loss_fn, params, *batch):
    """`jax.vmap(jax.grad(...))` of `loss_fn(params, *batch)` one example at a time.

    `loss_fn` returns per-example losses; example `n` is index `n` of every
    batch argument, and its loss is the sum of its loss terms.
    """

    def loss_n(params, *example):
        return loss_fn(params, *(arg[None] for arg in example)).sum()

    in_axes = (None,) + (0,) * len(batch)
    return jax.jit(jax.vmap(jax.grad(loss_n), in_axes=in_axes))(params, *batch)


def labels_of_output_grads(loss, outputs, output_grads):
    """The labels whose loss has gradient `output_grads` at the model `outputs`.

    A Monte-Carlo Fisher capture's last-layer output gradients reveal the labels
    it sampled, which lets brute force recompute everything from those labels:
    `softmax(o) - onehot(y)` is negative only at `y`; `o - t` gives `t`;
    `sigmoid(o) - y` gives `y`.
    """
    if loss is oek.softmax_cross_entropy:
        return jnp.argmin(output_grads, axis=-1)
    if loss is oek.squared_error:
        return outputs - output_grads
    if loss is oek.sigmoid_binary_cross_entropy:
        labels = jax.nn.sigmoid(outputs) - output_grads
        np.testing.assert_allclose(labels, jnp.round(labels), atol=1e-10)
        return jnp.round(labels)
    raise ValueError(loss)


def block_gradients(param_grads, layer: int, use_bias: bool):
    """Per-example block matrices `G_n`: kernel rows, then the bias row."""
    layer_grads = param_grads[f"dense_{layer}"]
    if not use_bias:
        return layer_grads["kernel"]
    return jnp.concatenate([layer_grads["kernel"], layer_grads["bias"][:, None]], 1)


def with_ones(inputs):
    return jnp.concatenate([inputs, jnp.ones(inputs.shape[:-1] + (1,))], -1)


def dense_fisher(block_grads):
    """Exact empirical Fisher of a block, `mean_n vec(G_n) vec(G_n)ᵀ` (row-major)."""
    flat = block_grads.reshape(block_grads.shape[0], -1)
    return flat.T @ flat / flat.shape[0]


def dense_block(block_state: oek.BlockState):
    """The dense curvature matrix a block state stands for: `Q diag(S) Qᵀ`."""
    basis = jnp.kron(block_state.input_eigenbasis, block_state.output_eigenbasis)
    return basis @ jnp.diag(block_state.scalings.reshape(-1)) @ basis.T


def ekfac_reference(input_factor, output_factor, fisher):
    """Eigenbases of the factors and the exact diagonal of `fisher` in them."""
    _, input_basis = np.linalg.eigh(input_factor)
    _, output_basis = np.linalg.eigh(output_factor)
    basis = np.kron(input_basis, output_basis)
    scalings = np.diag(basis.T @ fisher @ basis)
    shape = (input_factor.shape[0], output_factor.shape[0])
    return input_basis, output_basis, scalings.reshape(shape)


def solve_update(input_basis, output_basis, scalings, gradient, damping):
    """`(Q diag(S) Qᵀ + λ I)⁻¹ vec g`, `Q = U_A ⊗ U_B`, `vec` row-major."""
    basis = np.kron(input_basis, output_basis)
    curvature = basis @ np.diag(scalings.ravel()) @ basis.T
    direction = np.linalg.solve(
        curvature + damping * np.eye(len(curvature)), gradient.ravel()
    )
    return direction.reshape(gradient.shape)


def assert_same_basis(basis, reference_basis, atol=1e-8):
    """Equal up to the sign of each column."""
    overlap = np.abs(np.asarray(basis).T @ np.asarray(reference_basis))
    np.testing.assert_allclose(overlap, np.eye(overlap.shape[0]), atol=atol)


# --- block-diagonal factors (`max_factor_dim`) ----------------------------------


def diagonal_blocks(dim, max_factor_dim):
    """`(start, stop)` of each diagonal block of a side of `dim` coordinates:
    one block unless `dim - 1 > max_factor_dim` (one more for a bias row),
    else `k = ceil((dim - 1) / max)` consecutive blocks of `ceil(dim / k)`
    coordinates, the last one shorter."""
    if max_factor_dim is None or dim - 1 <= max_factor_dim:
        return [(0, dim)]
    size = math.ceil(dim / math.ceil((dim - 1) / max_factor_dim))
    return [(start, min(start + size, dim)) for start in range(0, dim, size)]


def off_blocks_zeroed(factor, blocks):
    """The dense factor with its entries outside the diagonal blocks zeroed."""
    zeroed = np.zeros_like(factor)
    for start, stop in blocks:
        zeroed[start:stop, start:stop] = factor[start:stop, start:stop]
    return zeroed


def blockwise_eigh(factor, blocks):
    """Eigenvalues (block by block) and the block-diagonal eigenbasis of a
    factor whose off-block entries are zero."""
    eigenvalues, basis = [], np.zeros_like(factor)
    for start, stop in blocks:
        values, vectors = np.linalg.eigh(factor[start:stop, start:stop])
        eigenvalues.append(values)
        basis[start:stop, start:stop] = vectors
    return np.concatenate(eigenvalues), basis


def as_dense(array, dim):
    """A library factor or eigenbasis as one `(dim, dim)` matrix: its diagonal
    blocks `(k, b, b)` placed on the diagonal, padded rows and columns
    cropped; a dense one as it is."""
    array = np.asarray(array)
    if array.shape[-1] == dim:
        return array
    num_blocks, size = array.shape[:2]
    dense = np.zeros((num_blocks * size,) * 2)
    for block in range(num_blocks):
        rows = slice(block * size, (block + 1) * size)
        dense[rows, rows] = array[block]
    return dense[:dim, :dim]
