"""Every layer kind against brute force: rows, scalings and the update.

The reference is per-example parameter gradients from `jax.vmap(jax.grad(...))`
(each example's loss terms summed) and, for convolution patches, the Jacobian
of the layer output with respect to its kernel.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import optax_ekfac as oek
from optax_ekfac._src import blocks, kinds

F64 = dict(param_dtype=jnp.float64)


class ConvNet(nn.Module):
    conv: dict

    @nn.compact
    def __call__(self, x):
        x = nn.Conv(name="conv", **self.conv, **F64)(x)
        x = jnp.tanh(x).reshape(x.shape[0], -1)
        return nn.Dense(3, name="head", **F64)(x)


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.MultiHeadDotProductAttention(num_heads=2, name="attention", **F64)(x)
        return nn.Dense(3, name="head", **F64)(jnp.tanh(x).mean(1))


class TokenModel(nn.Module):
    """Embedding, a per-token Dense, token losses: positions interact only
    through repeated tokens."""

    @nn.compact
    def __call__(self, tokens):
        hidden = nn.Embed(7, 4, name="embed", **F64)(tokens)
        return nn.Dense(5, name="head", **F64)(jnp.tanh(hidden))


class TiedModel(nn.Module):
    """A tied embedding: lookups in, `attend` as the output projection."""

    @nn.compact
    def __call__(self, tokens):
        embed = nn.Embed(7, 4, name="embed", **F64)
        hidden = jnp.tanh(nn.Dense(4, name="mix", **F64)(embed(tokens)))
        return embed.attend(hidden)


CONVS = {
    "2d_same_strided_grouped": dict(
        features=6, kernel_size=(3, 3), strides=2, padding="SAME", feature_group_count=2
    ),
    "2d_dilated_no_bias": dict(
        features=3,
        kernel_size=(2, 3),
        kernel_dilation=2,
        padding="VALID",
        use_bias=False,
    ),
    "2d_depthwise_circular": dict(
        features=8, kernel_size=(3, 3), padding="CIRCULAR", feature_group_count=4
    ),
    "1d_causal": dict(features=3, kernel_size=(3,), padding="CAUSAL"),
    "3d_explicit_padding": dict(features=2, kernel_size=(2, 2, 2), padding=1),
}
CONV_INPUTS = {
    "2d_same_strided_grouped": (5, 5, 4),
    "2d_dilated_no_bias": (6, 6, 2),
    "2d_depthwise_circular": (4, 4, 4),
    "1d_causal": (6, 2),
    "3d_explicit_padding": (3, 3, 3, 2),
}


def _problem(name, num_examples=5):
    key_x, key_y = jax.random.split(jax.random.key(0))
    if name.startswith("conv:"):
        conv = name.split(":")[1]
        model = ConvNet(conv=CONVS[conv])
        x = jax.random.normal(key_x, (num_examples,) + CONV_INPUTS[conv], jnp.float64)
        y = jax.random.randint(key_y, (num_examples,), 0, 3)
    elif name == "attention":
        model = Attention()
        x = jax.random.normal(key_x, (num_examples, 3, 4), jnp.float64)
        y = jax.random.randint(key_y, (num_examples,), 0, 3)
    else:
        model = TokenModel() if name == "embed" else TiedModel()
        # Few tokens, so that some repeat within an example.
        x = jax.random.randint(key_x, (num_examples, 4), 0, 3)
        y = jax.random.randint(key_y, (num_examples, 4), 0, 5)
    params = model.init(jax.random.key(1), x)["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    return model, params, (x, y), loss_fn


PROBLEMS = [f"conv:{name}" for name in CONVS] + ["attention", "embed", "tied"]


def _per_example_grads(loss_fn, params, batch):
    def example_loss(params, *example):
        return loss_fn(params, *(e[None] for e in example)).sum()

    return jax.vmap(jax.grad(example_loss), in_axes=(None,) + (0,) * len(batch))(
        params, *batch
    )


def _per_example_blocks(block, per_example_grads):
    leaves = blocks.leaves_by_path(per_example_grads)
    return jax.vmap(lambda leaves: kinds.block_matrix(block, leaves))(leaves)


def _row_gradients(block, stats):
    """G_n = Σ_p a dᵀ from the captured rows (one-hot for token ids)."""
    return kinds.per_example_block_gradients(
        block, stats.layers[block.name], jnp.float64
    )


DAMPING = 1e-2


@pytest.fixture(scope="module", params=PROBLEMS)
def problem(request):
    """Statistics, per-example gradients and one update of each setting, all
    in one compiled function per problem."""
    model, params, batch, loss_fn = _problem(request.param)
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, *batch)
    settings = {
        "exact": dict(),
        "per_position": dict(scalings="per_position"),
        "chunked": dict(max_per_example_elements=1),
    }
    transforms = {
        name: oek.scale_by_ekfac(layers, damping=DAMPING, **kwargs)
        for name, kwargs in settings.items()
    }

    @jax.jit
    def run(params, batch):
        _, grads, stats = curvature.value_grad_and_stats(params, *batch)
        per_example = _per_example_grads(loss_fn, params, batch)
        updates = {
            name: tx.update(grads, tx.init(params), params, stats=stats)
            for name, tx in transforms.items()
        }
        return grads, stats, per_example, updates

    grads, stats, per_example, updates = run(params, batch)
    return dict(
        name=request.param,
        model=model,
        params=params,
        batch=batch,
        layers=layers,
        grads=grads,
        stats=stats,
        per_example=per_example,
        updates=updates,
    )


def test_rows_reproduce_per_example_gradients(problem):
    kinds = {block.kind for block in problem["layers"].blocks}
    expected = {
        "conv": {"Conv"},
        "attention": {"DenseGeneral"},
        "embed": {"Embed"},
        "tied": {"Embed"},
    }
    assert expected[problem["name"].split(":")[0]] <= kinds
    assert not problem["layers"].fallback
    for block in problem["layers"].blocks:
        chex.assert_trees_all_close(
            _row_gradients(block, problem["stats"]),
            _per_example_blocks(block, problem["per_example"]),
            atol=1e-12,
        )


def test_block_matrix_round_trips(problem):
    leaves = blocks.leaves_by_path(problem["params"])
    for block in problem["layers"].blocks:
        matrix = kinds.block_matrix(block, leaves)
        chex.assert_shape(
            matrix,
            ((block.num_groups,) if block.grouped else ())
            + (block.input_dim, block.output_dim),
        )
        back = kinds.block_leaves(block, matrix, leaves)
        chex.assert_trees_all_equal(back, {p: leaves[p] for p in block.param_paths})


@pytest.mark.parametrize("conv", ["2d_same_strided_grouped", "1d_causal"])
def test_conv_patches_are_the_kernel_jacobian(conv):
    # y[n, pos, o] = Σ_r a[n, pos, r] W[r, o], so ∂y[..., o]/∂W[:, o] = a.
    model, params, (x, _), _ = _problem(f"conv:{conv}")
    layer = nn.Conv(**CONVS[conv], **F64)

    def conv_output(kernel):
        return layer.apply({"params": {**params["conv"], "kernel": kernel}}, x)

    kernel = params["conv"]["kernel"]
    jacobian = jax.jacobian(conv_output)(kernel)  # [N, *sp, Cout, *k, Cg, Cout]
    groups = layer.feature_group_count
    out_per_group = layer.features // groups
    flat = jacobian.reshape(
        x.shape[0], -1, layer.features, kernel[..., 0].size, layer.features
    )
    curvature = oek.Curvature(
        lambda p, x: model.apply({"params": p}, x).sum(-1, keepdims=True),
        fisher_type="empirical",
    )
    block = curvature.layers(params, x).blocks[0]
    _, _, stats = jax.jit(curvature.value_grad_and_stats)(params, x)
    rows, _ = kinds.example_rows(block, stats.layers["conv"], jnp.float64)
    rows = rows if block.grouped else rows[None]
    for group in range(groups):
        channel = group * out_per_group  # any output channel of the group
        expected = flat[:, :, channel, :, channel]
        chex.assert_trees_all_close(
            rows[group][..., : expected.shape[-1]], expected, atol=1e-12
        )


def _reference_scalings(block, block_state, per_example_blocks, num_terms):
    """(1/N) Σ_n (U_Aᵀ G_n U_B)² with G_n from vmap(grad), N loss terms."""

    def one_group(state, blocks):
        projected = blocks @ state.output_eigenbasis
        if state.input_eigenbasis is not None:
            projected = jnp.einsum("ji,njo->nio", state.input_eigenbasis, projected)
        return jnp.square(projected).sum(0) / num_terms

    if block.grouped:
        return jax.vmap(one_group, in_axes=(0, 1))(block_state, per_example_blocks)
    return one_group(block_state, per_example_blocks)


def test_exact_scalings_and_update_equal_the_reference(problem):
    damping = DAMPING
    updates, state = problem["updates"]["exact"]
    update_leaves = blocks.leaves_by_path(updates)
    grad_leaves = blocks.leaves_by_path(problem["grads"])
    for block in problem["layers"].blocks:
        block_state = state.blocks[block.name]
        per_example = _per_example_blocks(block, problem["per_example"])
        if not block.diagonal_input:  # embeddings: per-position, tested below
            chex.assert_trees_all_close(
                block_state.scalings,
                _reference_scalings(
                    block, block_state, per_example, problem["stats"].num_terms
                ),
                atol=1e-12,
            )
        # The update is Q (S + λ)⁻¹ Qᵀ g for the mean gradient g.
        states = (
            block_state
            if block.grouped
            else jax.tree.map(lambda x: x[None], block_state)
        )
        gradients = kinds.block_matrix(block, grad_leaves)
        updates_matrix = kinds.block_matrix(block, update_leaves)
        if not block.grouped:
            gradients, updates_matrix = gradients[None], updates_matrix[None]
        for group in range(block.num_groups):
            group_state = jax.tree.map(lambda x, g=group: x[g], states)
            output_basis = np.asarray(group_state.output_eigenbasis)
            input_basis = (
                np.eye(block.input_dim)
                if group_state.input_eigenbasis is None
                else np.asarray(group_state.input_eigenbasis)
            )
            basis = np.kron(input_basis, output_basis)
            curvature = (
                basis @ np.diag(np.asarray(group_state.scalings).ravel()) @ basis.T
            )
            direction = np.linalg.solve(
                curvature + damping * np.eye(len(curvature)),
                np.asarray(gradients[group]).ravel(),
            )
            chex.assert_trees_all_close(
                updates_matrix[group].ravel(), direction, rtol=1e-8, atol=1e-12
            )


def _dense_rows(block, stats):
    """All rows of a block as dense arrays: token ids as one-hot rows, and a
    tied embedding's attend calls appended as more positions."""
    inputs, outputs = kinds.example_rows(block, stats, jnp.float64)
    if not block.diagonal_input:
        return inputs, outputs
    inputs = jax.nn.one_hot(inputs, block.input_dim, dtype=jnp.float64)
    attends = kinds.attend_rows(block, stats, jnp.float64)
    if attends is not None:
        inputs = jnp.concatenate([inputs, attends[0]], 1)
        outputs = jnp.concatenate([outputs, attends[1]], 1)
    return inputs, outputs


def test_factors_follow_the_expand_convention(problem):
    state = problem["updates"]["exact"][1]
    for block in problem["layers"].blocks:
        inputs, outputs = _dense_rows(block, problem["stats"].layers[block.name])
        num_examples, num_positions = outputs.shape[-3:-1]
        input_factor = jnp.einsum("...npi,...npj->...ij", inputs, inputs) / (
            num_examples * num_positions
        )
        # Divided by the loss terms, not the examples: the mean loss's Fisher.
        output_factor = (
            jnp.einsum("...npi,...npj->...ij", outputs, outputs)
            / problem["stats"].num_terms
        )
        block_state = state.blocks[block.name]
        if block.diagonal_input:
            chex.assert_trees_all_close(
                block_state.input_factor, jnp.diagonal(input_factor), atol=1e-12
            )
            assert block_state.input_eigenbasis is None
        else:
            chex.assert_trees_all_close(
                block_state.input_factor, input_factor, atol=1e-12
            )
        chex.assert_trees_all_close(
            block_state.output_factor, output_factor, atol=1e-12
        )


def test_per_position_scalings_differ_where_positions_interact(problem):
    exact_state = problem["updates"]["exact"][1]
    position_state = problem["updates"]["per_position"][1]
    for block in problem["layers"].blocks:
        exact_scalings = exact_state.blocks[block.name].scalings
        position_scalings = position_state.blocks[block.name].scalings
        _, outputs = kinds.example_rows(
            block, problem["stats"].layers[block.name], jnp.float64
        )
        if outputs.shape[-2] > 1 and not block.diagonal_input:
            assert not np.allclose(exact_scalings, position_scalings, rtol=1e-3)
        else:
            chex.assert_trees_all_close(exact_scalings, position_scalings)


def test_chunking_changes_nothing_but_memory(problem):
    chex.assert_trees_all_close(
        problem["updates"]["exact"], problem["updates"]["chunked"], atol=1e-13
    )


@pytest.mark.parametrize("name", ["embed", "tied"])
def test_embed_per_position_scalings_equal_the_reference(name):
    _, params, batch, loss_fn = _problem(name)
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, *batch)
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, *batch)
    tx = oek.scale_by_ekfac(layers)
    state = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)[1]
    block = next(b for b in layers.blocks if b.name == "embed")
    assert block.call_methods == (
        ("__call__", "attend") if name == "tied" else ("__call__",)
    )
    inputs, outputs = _dense_rows(block, stats.layers["embed"])
    block_state = state.blocks["embed"]
    projected = outputs @ block_state.output_eigenbasis  # [N, P, F]
    # Each position its own example: Σ_{n,p} a² ⊗ (U_Bᵀ d)², over N terms.
    expected = jnp.einsum("npv,npf->vf", inputs**2, projected**2) / stats.num_terms
    chex.assert_trees_all_close(block_state.scalings, expected, atol=1e-12)


def test_reduce_sums_positions_before_the_outer_products():
    _, params, batch, loss_fn = _problem("attention")
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, *batch)
    _, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, *batch)
    tx = oek.scale_by_ekfac(layers, weight_sharing="reduce")
    state = jax.jit(tx.update)(grads, tx.init(params), params, stats=stats)[1]
    block = next(b for b in layers.blocks if b.name == "attention/query")
    inputs, outputs = kinds.example_rows(block, stats.layers[block.name], jnp.float64)
    mean_inputs, summed_outputs = inputs.mean(1), outputs.sum(1)
    chex.assert_trees_all_close(
        state.blocks[block.name].input_factor,
        mean_inputs.T @ mean_inputs / len(mean_inputs),
        atol=1e-12,
    )
    chex.assert_trees_all_close(
        state.blocks[block.name].output_factor,
        summed_outputs.T @ summed_outputs / len(summed_outputs),
        atol=1e-12,
    )
