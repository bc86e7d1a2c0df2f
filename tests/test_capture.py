"""Capture: output gradients are per-example, inputs are the layer inputs."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
import reference

import optax_ekfac as oek


def _data(shape, num_classes=3, seed=0):
    key_x, key_y = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(key_x, shape, jnp.float64)
    y = jax.random.randint(key_y, shape[:-1], 0, num_classes)
    return x, y


def _curvature(model, loss_of_outputs):
    def loss_fn(params, x, y):
        return loss_of_outputs(model.apply({"params": params}, x), y)

    return oek.Curvature(loss_fn, fisher_type="empirical"), loss_fn


def test_output_grads_are_per_example_gradients():
    model = reference.MLP(features=(6, 3), use_bias=(True, False))
    x, y = _data((8, 5))
    params, perturbations = reference.init(model, x)
    curvature, loss_fn = _curvature(model, oek.softmax_cross_entropy)

    loss, grads, stats = jax.jit(curvature.value_grad_and_stats)(params, x, y)

    inputs, output_grads, param_grads = reference.per_example(
        model, params, perturbations, oek.softmax_cross_entropy, x, y
    )
    ref_loss, ref_grads = jax.value_and_grad(lambda p: loss_fn(p, x, y).mean())(params)
    chex.assert_trees_all_close(loss, ref_loss, rtol=1e-12)
    chex.assert_trees_all_close(grads, ref_grads, rtol=1e-10)
    assert stats.num_terms == 8
    for layer in (0, 1):
        (call,) = stats.layers[f"dense_{layer}"]
        chex.assert_trees_all_close(call.inputs, inputs[layer], rtol=1e-12)
        chex.assert_trees_all_close(call.output_grads, output_grads[layer], rtol=1e-10)
        # a_n d_nᵀ is the per-example kernel gradient.
        outer = jnp.einsum("ni,no->nio", call.inputs, call.output_grads)
        chex.assert_trees_all_close(
            outer, param_grads[f"dense_{layer}"]["kernel"], rtol=1e-10
        )
    chex.assert_trees_all_close(
        stats.layers["dense_0"][0].output_grads,
        param_grads["dense_0"]["bias"],
        rtol=1e-10,
    )


def test_token_losses_scale_by_the_number_of_tokens():
    # Dense on [B, T, d] with a loss per token: every token is one loss term, and
    # positions do not interact, so d[b, t] is the gradient of l[b, t] alone.
    model = reference.MLP(features=(4, 3), use_bias=(True, True))
    x, y = _data((3, 5, 2))
    params, perturbations = reference.init(model, x)
    curvature, _ = _curvature(model, oek.softmax_cross_entropy)

    _, _, stats = curvature.value_grad_and_stats(params, x, y)

    def token_loss(perturbations, b, t):
        outputs = model.apply(
            {"params": params, "perturbations": perturbations}, x[b][None]
        )
        return oek.softmax_cross_entropy(outputs, y[b][None])[0, t]

    batch, tokens = y.shape
    b_index, t_index = jnp.meshgrid(
        jnp.arange(batch), jnp.arange(tokens), indexing="ij"
    )
    per_token = jax.vmap(
        jax.vmap(jax.grad(token_loss), in_axes=(None, 0, 0)), in_axes=(None, 0, 0)
    )(perturbations, b_index, t_index)
    assert stats.num_terms == batch * tokens
    for layer in (0, 1):
        grads = per_token[f"output_{layer}"][:, :, 0]  # [B, T, (one example) T, d]
        own_position = grads[b_index, t_index, t_index]
        (call,) = stats.layers[f"dense_{layer}"]
        chex.assert_shape(call.output_grads, (batch, tokens, model.features[layer]))
        chex.assert_trees_all_close(call.output_grads, own_position, rtol=1e-10)


class _PooledModel(nn.Module):
    """Positions interact: mean over T, then a classifier."""

    @nn.compact
    def __call__(self, x):
        hidden = nn.Dense(4, name="embed", param_dtype=jnp.float64)(x)
        pooled = jnp.tanh(hidden).mean(axis=1)
        return nn.Dense(3, name="head", param_dtype=jnp.float64)(pooled)


def test_shared_positions_sum_to_the_per_example_gradient():
    model = _PooledModel()
    x, _ = _data((6, 4, 2))
    y = jax.random.randint(jax.random.key(3), (6,), 0, 3)
    params = model.init(jax.random.key(0), x)["params"]
    curvature, loss_fn = _curvature(model, oek.softmax_cross_entropy)

    _, _, stats = curvature.value_grad_and_stats(params, x, y)

    per_example = jax.vmap(
        jax.grad(lambda p, x_n, y_n: loss_fn(p, x_n[None], y_n[None])[0]),
        in_axes=(None, 0, 0),
    )(params, x, y)
    (call,) = stats.layers["embed"]
    kernel_grads = jnp.einsum("nti,nto->nio", call.inputs, call.output_grads)
    chex.assert_trees_all_close(
        kernel_grads, per_example["embed"]["kernel"], rtol=1e-10
    )
    chex.assert_trees_all_close(
        call.output_grads.sum(1), per_example["embed"]["bias"], rtol=1e-10
    )


class _TwiceCalled(nn.Module):
    """One Dense applied twice, as in a tied or recurrent layer."""

    @nn.compact
    def __call__(self, x):
        shared = nn.Dense(4, name="shared", param_dtype=jnp.float64)
        hidden = shared(jnp.tanh(shared(x)))
        return nn.Dense(3, name="head", param_dtype=jnp.float64)(hidden)


def test_a_module_called_twice_gets_one_entry_per_call():
    model = _TwiceCalled()
    x, y = _data((5, 4))
    params = model.init(jax.random.key(0), x)["params"]
    curvature, loss_fn = _curvature(model, oek.softmax_cross_entropy)

    _, _, stats = curvature.value_grad_and_stats(params, x, y)
    layers = curvature.layers(params, x, y)

    # The reference: the same network in plain jnp, perturbing each call.
    def loss_n(perturbations, x_n, y_n):
        kernel, bias = params["shared"]["kernel"], params["shared"]["bias"]
        first = x_n @ kernel + bias + perturbations[0]
        second = jnp.tanh(first) @ kernel + bias + perturbations[1]
        logits = second @ params["head"]["kernel"] + params["head"]["bias"]
        return oek.softmax_cross_entropy(logits[None], y_n[None])[0]

    zeros = (jnp.zeros(4), jnp.zeros(4))
    output_grads = jax.vmap(jax.grad(loss_n), in_axes=(None, 0, 0))(zeros, x, y)
    first_call, second_call = stats.layers["shared"]
    chex.assert_trees_all_close(first_call.inputs, x)
    chex.assert_trees_all_close(first_call.output_grads, output_grads[0], rtol=1e-10)
    chex.assert_trees_all_close(second_call.output_grads, output_grads[1], rtol=1e-10)
    (shared_block,) = [b for b in layers.blocks if b.name == "shared"]
    assert shared_block.num_calls == 2
    # Both calls together give the per-example gradient of the shared kernel.
    per_example = jax.vmap(
        jax.grad(lambda p, x_n, y_n: loss_fn(p, x_n[None], y_n[None])[0]),
        in_axes=(None, 0, 0),
    )(params, x, y)
    kernel_grads = sum(
        jnp.einsum("ni,no->nio", call.inputs, call.output_grads)
        for call in (first_call, second_call)
    )
    chex.assert_trees_all_close(
        kernel_grads, per_example["shared"]["kernel"], rtol=1e-10
    )


class _WithLayerNorm(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="norm")(nn.Dense(4, name="hidden")(x))
        x = nn.Dense(3, use_bias=False, name="head")(x)
        return x + self.param("offset", nn.initializers.zeros, (3,))


def test_layers_table_names_blocks_and_fallback():
    model = _WithLayerNorm()
    x, y = _data((4, 5))
    params = model.init(jax.random.key(0), x)["params"]
    curvature, _ = _curvature(model, oek.softmax_cross_entropy)

    layers = curvature.layers(params, x, y)

    assert [b.name for b in layers.blocks] == ["hidden", "head"]
    hidden, head = layers.blocks
    assert (hidden.input_dim, hidden.output_dim, hidden.has_bias) == (6, 4, True)
    assert (head.input_dim, head.output_dim, head.has_bias) == (4, 3, False)
    assert head.param_paths == (("head", "kernel"),)
    assert set(layers.fallback) == {("norm", "scale"), ("norm", "bias"), ("offset",)}
    table = str(layers)
    assert "hidden" in table and "5x5" not in table and "6x6" in table
    assert "norm/scale" in table and "offset" in table


def test_has_aux_passes_aux_through():
    model = reference.MLP()
    x, y = _data((4, 5))
    params, _ = reference.init(model, x)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return oek.softmax_cross_entropy(logits, y), logits

    (loss, logits), _, _ = oek.Curvature(
        loss_fn, has_aux=True, fisher_type="empirical"
    ).value_grad_and_stats(params, x, y)
    chex.assert_shape(logits, (4, 3))
    chex.assert_trees_all_close(loss, oek.softmax_cross_entropy(logits, y).mean())


def test_scalar_loss_is_refused():
    model = reference.MLP()
    x, y = _data((4, 5))
    params, _ = reference.init(model, x)
    curvature, _ = _curvature(
        model, lambda out, y: oek.softmax_cross_entropy(out, y).mean()
    )
    with pytest.raises(ValueError, match="returned a scalar"):
        curvature.value_grad_and_stats(params, x, y)


def test_model_without_dense_is_refused():
    model = nn.LayerNorm()
    x, _ = _data((4, 3))
    params = model.init(jax.random.key(0), x)["params"]
    curvature = oek.Curvature(
        lambda p, x: oek.squared_error(model.apply({"params": p}, x), x),
        fisher_type="empirical",
    )
    with pytest.raises(ValueError, match="no layer that EKFAC can precondition"):
        curvature.layers(params, x)


def test_params_not_applied_at_the_root_are_refused():
    # The blocks' parameter paths are module paths from the root of the params
    # tree loss_fn is given; a loss_fn applying a sub-tree breaks that link.
    model = reference.MLP()
    x, y = _data((4, 5))
    params, _ = reference.init(model, x)

    def loss_fn(params, x, y):
        logits = model.apply({"params": params["inner"]}, x)
        return oek.softmax_cross_entropy(logits, y)

    with pytest.raises(ValueError, match="dense_0/kernel is not in params"):
        oek.Curvature(loss_fn).layers({"inner": params}, x, y)
