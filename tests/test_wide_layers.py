"""Very wide layers: block-diagonal factors (`max_factor_dim`).

A side wider than `max_factor_dim` gets `k` diagonal blocks of `b` in its
factor and eigenbasis; `test_brute_force.py` checks them on every layer kind
against dense references with the off-block entries zeroed. Here: a
vocabulary-sized head trains with the defaults inside bounded state, blocks
of rank-deficient factors (one example) keep their padding out of the real
coordinates, and the settings are checked.
"""

import inspect

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference

import optax_ekfac as oek

HIDDEN, CLASSES, BATCH = 256, 4096, 8
DEFAULT_MAX_FACTOR_DIM = 1024  # `max_factor_dim=None`, as documented


class WideHead(nn.Module):
    """A small MLP whose output head is `Dense(256 -> 4096)`."""

    @nn.compact
    def __call__(self, x):
        hidden = jnp.tanh(nn.Dense(HIDDEN, name="hidden")(x))
        return nn.Dense(CLASSES, name="head")(hidden)


def test_a_vocabulary_sized_head_trains_with_defaults_in_blocked_factors():
    """`ekfac(layers)` with every default on `Dense(256 -> 4096)`: the head's
    4096-wide output side is held as diagonal blocks no wider than the
    default `max_factor_dim` (memory `4096 b`, not `4096²`), its 257-wide
    input side stays dense, `jax.eval_shape(tx.init, params)` has the
    state's shapes (a checkpoint's restore target), and the loss
    of one batch falls tenfold within 10 steps (one eigenbasis refresh)."""
    default = inspect.signature(oek.scale_by_ekfac).parameters["max_factor_dim"]
    assert default.default is None
    max_factor_dim = DEFAULT_MAX_FACTOR_DIM
    blocks = reference.diagonal_blocks(CLASSES, max_factor_dim)
    num_blocks, size = len(blocks), blocks[0][1]
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (BATCH, 32), jnp.float32)
    y = jax.random.randint(keys[1], (BATCH,), 0, CLASSES)
    model = WideHead()
    params = model.init(keys[2], x)["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.ekfac(curvature.layers(params, x, y))
    state = tx.init(params)
    restore_target = jax.eval_shape(tx.init, params)
    chex.assert_trees_all_equal_shapes_and_dtypes(restore_target, state)
    head = state.preconditioner.blocks["head"]
    chex.assert_shape(
        [head.output_factor, head.output_eigenbasis], (num_blocks, size, size)
    )
    chex.assert_shape([head.input_factor, head.input_eigenbasis], (HIDDEN + 1,) * 2)
    chex.assert_shape(head.scalings, (HIDDEN + 1, CLASSES))
    assert head.output_factor.size <= CLASSES * max_factor_dim

    @jax.jit
    def step(params, state):
        loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, state = tx.update(grads, state, params, stats=stats)
        return jax.tree.map(jnp.add, params, updates), state, loss

    losses = []
    for _ in range(10):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    assert np.all(np.isfinite(losses)), losses
    assert losses[-1] < 0.1 * losses[0], losses
    chex.assert_trees_all_equal_shapes_and_dtypes(
        restore_target.preconditioner, state.preconditioner
    )
    chex.assert_tree_all_finite(state.preconditioner.blocks["head"])


@pytest.mark.parametrize("eigenvalue_correction", [True, False])
def test_padding_stays_out_of_rank_deficient_blocks(eigenvalue_correction):
    """One example: every diagonal block is rank one, so most eigenvalues tie
    at zero, where padded coordinates left at zero could mix with real ones.
    No side's size is a multiple of its block size (7, 8 and 5 coordinates
    in blocks of 4, 3 and 3). The padded coordinates are their own, last, basis vectors,
    and the update is the dense reference's: `A` and `B` from the layers'
    inputs and `vmap(grad)` output gradients with the off-block entries
    zeroed, block-wise `np.linalg.eigh`, scalings from the `vmap(grad)`
    per-example gradient in those bases (K-FAC's: the eigenvalues' outer
    product), solved against the gradient."""
    damping, max_factor_dim = 1e-3, 3
    model = reference.MLP(features=(7, 5))
    x = jax.random.normal(jax.random.key(0), (1, 6), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (1, 5), jnp.float64)
    params, perturbations = reference.init(model, x)

    def squared_error(outputs, targets):
        return 0.5 * jnp.sum(jnp.square(outputs - targets), -1)

    def loss_fn(params, x, y):
        return oek.squared_error(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    tx = oek.scale_by_ekfac(
        layers,
        damping=damping,
        max_factor_dim=max_factor_dim,
        eigenvalue_correction=eigenvalue_correction,
    )
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, x, y)
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)

    inputs, output_grads, param_grads = reference.per_example(
        model, params, perturbations, squared_error, x, y
    )
    for layer in range(2):
        a = np.asarray(reference.with_ones(inputs[layer]))
        d = np.asarray(output_grads[layer])
        input_blocks = reference.diagonal_blocks(a.shape[-1], max_factor_dim)
        output_blocks = reference.diagonal_blocks(d.shape[-1], max_factor_dim)
        assert len(input_blocks) > 1 and len(output_blocks) > 1
        input_values, input_basis = reference.blockwise_eigh(
            reference.off_blocks_zeroed(a.T @ a, input_blocks), input_blocks
        )
        output_values, output_basis = reference.blockwise_eigh(
            reference.off_blocks_zeroed(d.T @ d, output_blocks), output_blocks
        )
        block_grads = np.asarray(reference.block_gradients(param_grads, layer, True))
        if eigenvalue_correction:
            projected = np.einsum(
                "ji,njo,op->nip", input_basis, block_grads, output_basis
            )
            scalings = np.square(projected).mean(0)
        else:
            scalings = np.outer(
                np.maximum(input_values, 0), np.maximum(output_values, 0)
            )
        gradient = block_grads.mean(0)
        expected = reference.solve_update(
            input_basis, output_basis, scalings, gradient, damping
        )
        name = f"dense_{layer}"
        actual = np.concatenate(
            [updates[name]["kernel"], updates[name]["bias"][None]], 0
        )
        np.testing.assert_allclose(actual, expected, rtol=1e-7, atol=1e-10)

        block_state = state.blocks[name]
        for basis, blocks in (
            (block_state.input_eigenbasis, input_blocks),
            (block_state.output_eigenbasis, output_blocks),
        ):
            size, dim = blocks[0][1], blocks[-1][1]
            real = dim - (len(blocks) - 1) * size  # real coordinates of the last
            last = np.abs(np.asarray(basis[-1]))
            np.testing.assert_array_equal(last[real:, real:], np.eye(size - real))
            np.testing.assert_array_equal(last[:real, real:], 0)
            np.testing.assert_array_equal(last[real:, :real], 0)


def _tiny_problem():
    model = nn.Dense(5)
    x = jnp.ones((2, 4))
    y = jnp.zeros((2, 5))
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x, y):
        return oek.squared_error(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    return curvature, layers, params, x, y


@pytest.mark.parametrize("value", [0, -2, 2.5])
def test_max_factor_dim_must_be_a_positive_integer(value):
    _, layers, *_ = _tiny_problem()
    with pytest.raises(ValueError, match="max_factor_dim must be an integer >= 1"):
        oek.scale_by_ekfac(layers, max_factor_dim=value)


def test_a_state_blocked_otherwise_is_refused():
    """A state made with another `max_factor_dim` (a checkpoint of another
    configuration) is refused with a message naming the setting."""
    curvature, layers, params, x, y = _tiny_problem()
    dense_state = oek.scale_by_ekfac(layers, max_factor_dim=None).init(params)
    blocked = oek.scale_by_ekfac(layers, max_factor_dim=2)
    _, grads, stats = curvature.value_grad_and_stats(params, x, y)
    with pytest.raises(ValueError, match="max_factor_dim=2"):
        blocked.update(grads, dense_state, params, stats=stats)
