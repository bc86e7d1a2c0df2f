"""Monte-Carlo Fisher: sampled labels, per-example scaling, exact expectations."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference

import optax_ekfac as oek

NUM_EXAMPLES = 8
NUM_SAMPLES = 4
NUM_KEYS = 1000

CATEGORICAL = (oek.softmax_cross_entropy, (6, 3))
GAUSSIAN = (oek.squared_error, (6, 3))  # 3 outputs per example
BERNOULLI = (oek.sigmoid_binary_cross_entropy, (6, 2))  # 2 labels per example
LOSSES = {"categorical": CATEGORICAL, "gaussian": GAUSSIAN, "bernoulli": BERNOULLI}

# Compiled once per model and loss: eager brute force costs more than the tests.
per_example = jax.jit(reference.per_example, static_argnums=(0, 3))
init = jax.jit(reference.init, static_argnums=0)


def _setup(features, x_shape, seed=0):
    model = reference.MLP(features=features, use_bias=(True,) * len(features))
    x = jax.random.normal(jax.random.key(seed), x_shape, jnp.float64)
    params, perturbations = init(model, x)
    return model, x, params, perturbations


def _data_labels(loss, model, params, x, seed=1):
    outputs = jax.eval_shape(lambda p: model.apply({"params": p}, x), params)
    key = jax.random.key(seed)
    if loss is oek.softmax_cross_entropy:
        return jax.random.randint(key, outputs.shape[:-1], 0, outputs.shape[-1])
    if loss is oek.squared_error:
        return jax.random.normal(key, outputs.shape, outputs.dtype)
    return jax.random.bernoulli(key, 0.5, outputs.shape).astype(outputs.dtype)


def _loss_fn(model, loss):
    """Per-example losses, and the model outputs as aux."""

    def loss_fn(params, x, y):
        outputs = model.apply({"params": params}, x)
        return loss(outputs, y), outputs

    return loss_fn


@pytest.fixture(scope="module", params=list(LOSSES))
def mc_capture(request):
    """One jitted Monte-Carlo capture per loss helper, and what brute force needs."""
    loss, features = LOSSES[request.param]
    model, x, params, perturbations = _setup(features, (NUM_EXAMPLES, 5))
    y = _data_labels(loss, model, params, x)
    loss_fn = _loss_fn(model, loss)
    curvature = oek.Curvature(
        loss_fn, has_aux=True, fisher_type="mc", num_samples=NUM_SAMPLES
    )
    (value, outputs), grads, stats = jax.jit(curvature.value_grad_and_stats)(
        params, x, y, key=jax.random.key(2)
    )
    return dict(
        loss=loss,
        features=features,
        model=model,
        batch=(x, y),
        params=params,
        perturbations=perturbations,
        loss_fn=loss_fn,
        value=value,
        outputs=outputs,
        grads=grads,
        stats=stats,
    )


def test_statistics_are_output_gradients_of_sampled_labels(mc_capture):
    # The last layer's output gradients reveal the sampled labels; brute force
    # with those labels, example by example, must give every layer's output
    # gradients: one backward pass of the summed sampled losses reusing the
    # forward, scaled as per-example gradients, samples stacked as examples.
    loss, features, stats = (mc_capture[k] for k in ("loss", "features", "stats"))
    x, _ = mc_capture["batch"]
    tiled_x = jnp.tile(x, (NUM_SAMPLES, 1))
    (last_call,) = stats.layers["dense_1"]
    sampled = reference.labels_of_output_grads(
        loss, jnp.tile(mc_capture["outputs"], (NUM_SAMPLES, 1)), last_call.output_grads
    )
    inputs, output_grads, _ = per_example(
        mc_capture["model"],
        mc_capture["params"],
        mc_capture["perturbations"],
        loss,
        tiled_x,
        sampled,
    )
    for layer, width in enumerate(features):
        (call,) = stats.layers[f"dense_{layer}"]
        chex.assert_shape(call.output_grads, (NUM_SAMPLES * NUM_EXAMPLES, width))
        chex.assert_trees_all_close(call.inputs, inputs[layer], rtol=1e-12)
        chex.assert_trees_all_close(
            call.output_grads, output_grads[layer], rtol=1e-9, atol=1e-12
        )
    # Each sample draws its own labels.
    by_sample = last_call.output_grads.reshape(NUM_SAMPLES, NUM_EXAMPLES, -1)
    assert not np.allclose(by_sample[0], by_sample[1])


def test_loss_and_gradient_are_the_data_ones(mc_capture):
    params, (x, y), loss_fn = (mc_capture[k] for k in ("params", "batch", "loss_fn"))
    expected_value, expected_grads = jax.jit(
        jax.value_and_grad(lambda p: loss_fn(p, x, y)[0].mean())
    )(params)
    chex.assert_trees_all_close(mc_capture["value"], expected_value, rtol=1e-12)
    chex.assert_trees_all_close(
        mc_capture["grads"], expected_grads, rtol=1e-10, atol=1e-14
    )
    assert int(mc_capture["stats"].num_terms) == NUM_EXAMPLES


def test_every_helper_call_is_a_term_of_the_sampled_loss():
    # Two heads, two helpers: the sampled loss sums both, each with its own labels.
    model, x, params, perturbations = _setup((6, 4), (NUM_EXAMPLES, 5))

    def loss_of_outputs(outputs, y):
        classes = oek.softmax_cross_entropy(outputs[:, :2], y[:, 0].astype(int))
        return classes + oek.squared_error(outputs[:, 2:], y[:, 1:])

    y = jnp.stack([jnp.arange(NUM_EXAMPLES) % 2, jnp.ones(NUM_EXAMPLES) * 0.5], 1)
    y = jnp.concatenate([y, jnp.zeros((NUM_EXAMPLES, 1))], 1)
    curvature = oek.Curvature(
        _loss_fn(model, loss_of_outputs), has_aux=True, fisher_type="mc"
    )
    (_, outputs), _, stats = jax.jit(curvature.value_grad_and_stats)(
        params, x, y, key=jax.random.key(3)
    )

    (last_call,) = stats.layers["dense_1"]
    sampled_classes = reference.labels_of_output_grads(
        oek.softmax_cross_entropy, outputs[:, :2], last_call.output_grads[:, :2]
    )
    sampled_targets = reference.labels_of_output_grads(
        oek.squared_error, outputs[:, 2:], last_call.output_grads[:, 2:]
    )
    sampled = jnp.concatenate([sampled_classes[:, None], sampled_targets], 1)
    _, output_grads, _ = per_example(
        model, params, perturbations, loss_of_outputs, x, sampled
    )
    chex.assert_trees_all_close(
        stats.layers["dense_0"][0].output_grads, output_grads[0], rtol=1e-9
    )
    assert not np.allclose(sampled_targets, outputs[:, 2:])


def _enumerated_moments(output_grads, probabilities):
    """Exact `E[d dᵀ]` per row, and the variance of its entries, from outcomes.

    Args:
        output_grads: `[O, R, d]`, the output gradient of each outcome and row.
        probabilities: `[O, R]`, each outcome's probability under the model.
    """
    outer = jnp.einsum("ori,orj->orij", output_grads, output_grads)
    mean = jnp.einsum("or,orij->rij", probabilities, outer)
    second = jnp.einsum("or,orij->rij", probabilities, outer**2)
    return mean, second - mean**2


def _gaussian_moments(unit_residual_grads):
    """Exact `E[d dᵀ]` per row and its entries' variance for `d = Jᵀε`, `ε ~ N(0, I)`.

    Args:
        unit_residual_grads: `[C, R, d]`: `Jᵀ e_j`, the output gradient of the
            squared error whose residual is the unit vector `e_j`.
    """
    jacobian_gram = jnp.einsum("jri,jrk->rik", unit_residual_grads, unit_residual_grads)
    diagonal = jnp.diagonal(jacobian_gram, axis1=1, axis2=2)
    # Isserlis: Var[(uᵀε)(vᵀε)] = |u|²|v|² + (uᵀv)².
    variance = diagonal[:, :, None] * diagonal[:, None, :] + jacobian_gram**2
    return jacobian_gram, variance


def _per_outcome(model, params, perturbations, loss, x, outcomes):
    """Per-example inputs, and output gradients `[O, R, d]` for each outcome."""

    def output_grads(labels):
        return reference.per_example(model, params, perturbations, loss, x, labels)

    inputs = output_grads(outcomes[0])[0]
    return inputs, jax.vmap(lambda labels: output_grads(labels)[1])(outcomes)


@jax.jit(static_argnums=(0, 2))
def _exact_moments(model, params, loss, x):
    """Per layer: the inputs, and exact `E[d dᵀ]` and its variance per row.

    Rows are all positions of all examples: positions never interact in the MLP.
    """
    rows_x = x.reshape(-1, x.shape[-1])
    _, perturbations = init(model, rows_x)  # shaped for one row
    outputs = model.apply({"params": params}, rows_x)
    if loss is oek.softmax_cross_entropy:
        outcomes = [jnp.full(len(rows_x), c) for c in range(outputs.shape[-1])]
        probabilities = jax.nn.softmax(outputs).T
    elif loss is oek.sigmoid_binary_cross_entropy:
        num_labels = outputs.shape[-1]
        bits = np.array(np.meshgrid(*[[0.0, 1.0]] * num_labels)).reshape(num_labels, -1)
        outcomes = [jnp.broadcast_to(b, outputs.shape) for b in bits.T]
        p = jax.nn.sigmoid(outputs)
        probabilities = jnp.stack(
            [jnp.prod(jnp.where(b == 1, p, 1 - p), -1) for b in bits.T]
        )
    else:  # Gaussian: the targets whose residual `outputs - targets` is `e_j`
        outcomes = [outputs - e for e in jnp.eye(outputs.shape[-1])]
    inputs, output_grads = _per_outcome(
        model, params, perturbations, loss, rows_x, jnp.stack(outcomes)
    )
    moments = {}
    for layer, grads in output_grads.items():
        if loss is oek.squared_error:
            moments[layer] = _gaussian_moments(grads)
        else:
            moments[layer] = _enumerated_moments(grads, probabilities)
    return inputs, moments


@pytest.mark.parametrize(
    "name, x_shape, miscaled_by",
    [
        ("categorical", (NUM_EXAMPLES, 5), 3),  # [N] losses
        ("categorical", (2, 4, 5), 4),  # [B, T] token losses: T=4 terms/example
        ("gaussian", (NUM_EXAMPLES, 5), 3),  # C=3 outputs in one term
        ("bernoulli", (NUM_EXAMPLES, 5), 2),  # 2 labels in one term
    ],
)
def test_factors_average_to_the_exact_fisher_factors(name, x_shape, miscaled_by):
    loss, features = LOSSES[name]
    model, x, params, _ = _setup(features, x_shape)
    y = _data_labels(loss, model, params, x)
    curvature = oek.Curvature(
        _loss_fn(model, loss), has_aux=True, fisher_type="mc", num_samples=NUM_SAMPLES
    )
    keys = jax.random.split(jax.random.key(4), NUM_KEYS)

    stats = jax.jit(
        jax.vmap(
            lambda key: curvature.value_grad_and_stats(params, x, y, key=key)[2].layers
        )
    )(keys)

    exact_inputs, exact = _exact_moments(model, params, loss, x)
    for layer, width in enumerate(features):
        (call,) = stats[f"dense_{layer}"]
        chex.assert_shape(
            call.output_grads,
            (NUM_KEYS, NUM_SAMPLES * x_shape[0]) + x_shape[1:-1] + (width,),
        )
        # Inputs do not depend on labels: A is the empirical one, exactly.
        inputs = reference.with_ones(call.inputs.reshape(-1, call.inputs.shape[-1]))
        layer_inputs = reference.with_ones(exact_inputs[layer])
        chex.assert_trees_all_close(
            inputs.T @ inputs / len(inputs),
            layer_inputs.T @ layer_inputs / len(layer_inputs),
            rtol=1e-10,
        )
        rows = call.output_grads.reshape(-1, width)
        sampled_factor = rows.T @ rows / len(rows)
        row_moments, row_variances = exact[layer]
        exact_factor = row_moments.mean(0)
        # Every (key, sample, row) term is an independent draw, so the average
        # of K*S*R of them has standard error sqrt(Σ_r Var_r / (K S R²)); five
        # of them bound every entry (a Gaussian tail of 6e-7 per entry, and
        # the keys are fixed, so the test is deterministic).
        num_rows = row_variances.shape[0]
        standard_error = jnp.sqrt(
            row_variances.sum(0) / (NUM_KEYS * NUM_SAMPLES * num_rows**2)
        )
        tolerance = 5 * standard_error + 1e-12
        np.testing.assert_array_less(jnp.abs(sampled_factor - exact_factor), tolerance)
        if layer == len(features) - 1:
            # The tolerance is tight enough to catch a capture that counts the
            # outputs (or tokens) of one example as separate terms.
            assert np.any(
                jnp.abs(sampled_factor - exact_factor / miscaled_by) > tolerance
            )
    if loss is oek.squared_error:
        # Unit-variance Gaussian: the output-gradient covariance at the last
        # layer is I, whatever the model.
        chex.assert_trees_all_close(exact[1][0].mean(0), jnp.eye(3), atol=1e-12)



@pytest.mark.parametrize("scales", [(2.0, 0.5), (1.0, 1.0)])
def test_sampled_fisher_is_that_of_the_loss_loss_fn_returns(scales):
    """`loss_fn` returns `c1 * cross-entropy + c2 * squared error` of two
    heads: the sampled output gradients' second moment is, per example, `N`
    times the Hessian of the returned mean loss with respect to the outputs
    (the Gauss-Newton matrix of that loss at the outputs: the Fisher of the
    helpers' distributions, each times its factor)."""
    class_scale, error_scale = scales
    model, x, params, _ = _setup((6, 4), (NUM_EXAMPLES, 5))
    y = jnp.stack([jnp.arange(NUM_EXAMPLES) % 2, jnp.ones(NUM_EXAMPLES) * 0.5], 1)
    y = jnp.concatenate([y, jnp.zeros((NUM_EXAMPLES, 1))], 1)

    def losses_of_outputs(outputs, y):
        classes = oek.softmax_cross_entropy(outputs[:, :2], y[:, 0].astype(int))
        errors = oek.squared_error(outputs[:, 2:], y[:, 1:])
        return class_scale * classes + error_scale * errors

    curvature = oek.Curvature(
        _loss_fn(model, losses_of_outputs),
        has_aux=True,
        fisher_type="mc",
        num_samples=NUM_SAMPLES,
    )
    keys = jax.random.split(jax.random.key(5), NUM_KEYS)
    output_grads = jax.jit(
        jax.vmap(
            lambda key: curvature.value_grad_and_stats(params, x, y, key=key)[2]
            .layers["dense_1"][0]
            .output_grads
        )
    )(keys)
    draws = output_grads.reshape(NUM_KEYS * NUM_SAMPLES, NUM_EXAMPLES, 4)
    products = jnp.einsum("kni,knj->knij", draws, draws)
    sampled = products.mean(0)
    tolerance = 5 * products.std(0) / np.sqrt(len(products)) + 1e-12

    # Brute force: the Hessian of the returned mean loss at the outputs.
    outputs = model.apply({"params": params}, x)
    hessian = jax.hessian(lambda outputs: losses_of_outputs(outputs, y).mean())(outputs)
    exact = NUM_EXAMPLES * jnp.einsum("ninj->nij", hessian)
    np.testing.assert_array_less(jnp.abs(sampled - exact), tolerance)
    if scales != (1.0, 1.0):
        # Helpers' own Fisher, the factors left out: far outside the tolerance.
        unscaled = exact.at[:, :2, :2].divide(class_scale)
        unscaled = unscaled.at[:, 2:, 2:].divide(error_scale)
        assert np.any(jnp.abs(sampled - unscaled) > tolerance)

def test_mc_without_a_key_samples_by_the_batch_and_needs_a_loss_helper():
    loss, features = CATEGORICAL
    model, x, params, _ = _setup(features, (NUM_EXAMPLES, 5))
    y = _data_labels(loss, model, params, x)
    curvature = oek.Curvature(_loss_fn(model, loss), has_aux=True, fisher_type="mc")
    value_grad_and_stats = jax.jit(curvature.value_grad_and_stats)

    def sampled_output_grads(x, y):
        _, _, stats = value_grad_and_stats(params, x, y)
        return next(iter(stats.layers.values()))[0].output_grads

    # The same batch samples the same labels; a batch that differs in the
    # last bits samples others (one fixed key would sample nearly the same
    # labels from nearly the same predictions).
    sampled = sampled_output_grads(x, y)
    chex.assert_trees_all_equal(sampled_output_grads(x, y), sampled)
    nudged = sampled_output_grads(x * (1 + 1e-6), y)
    assert np.abs(nudged - sampled).max() > 0.1 * np.abs(sampled).max()

    def plain_optax_loss(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y)

    curvature = oek.Curvature(plain_optax_loss, fisher_type="mc")
    with pytest.raises(ValueError, match="called none of the loss helpers"):
        curvature.value_grad_and_stats(params, x, y, key=jax.random.key(0))
    # The empirical Fisher needs neither.
    empirical = oek.Curvature(plain_optax_loss, fisher_type="empirical")
    empirical.value_grad_and_stats(params, x, y)


@pytest.mark.parametrize(
    "settings, message",
    [
        (dict(fisher_type="true"), "fisher_type"),
        (dict(fisher_type="mc", num_samples=0), "num_samples"),
        (dict(fisher_type="empirical", num_samples=2), "applies to fisher_type='mc'"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        oek.Curvature(lambda params, x: x, **settings)
