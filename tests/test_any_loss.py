"""Any loss of the model's outputs through `per_example_loss`, against brute force.

The reference curvature is the dense Gauss-Newton matrix of the mean loss,
`G = Σ_n w_n J_nᵀ H_n J_n / Σ_n w_n`, with `J_n` from `jax.jacobian` of the
model's outputs for example `n` and `H_n` from `jax.hessian` of that
example's loss at its outputs (its negative eigenvalues clipped to 0 with
numpy), none of it from the library.

The Monte-Carlo Fisher is checked exactly, not in distribution: the noise
`z` the library draws is replaced by the `2D` vectors `±√D e_j`, whose
second moment is exactly the identity, so the `2D` samples' Fisher must be
`G` itself. A second test checks that the real noise is standard normal.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree
from sklearn.datasets import load_digits

import optax_ekfac as oek
from optax_ekfac._src import losses as losses_module

NUM_EXAMPLES = 6
NUM_OUTPUTS = 3
WEIGHTS = np.array([1.0, 0.5, 0.0, 2.0, 1.0, 1.5])


def _smoothed_cross_entropy(logits, labels):
    targets = optax.smooth_labels(jax.nn.one_hot(labels, logits.shape[-1]), 0.1)
    return optax.softmax_cross_entropy(logits, targets)


def _cauchy(outputs, targets):
    """A robust elementwise loss, not convex: `H < 0` where `|r| > 1`."""
    return jnp.log1p((outputs - targets) ** 2)


def _coupled_cauchy(outputs, targets):
    """Not convex, one loss per term, its Hessian not diagonal."""
    return jnp.log1p(jnp.sum((outputs - targets) ** 2, axis=-1))


def _binary_cross_entropy(logits, targets):
    return optax.sigmoid_binary_cross_entropy(
        logits, (targets > 0).astype(logits.dtype)
    )


# name: (the loss of one batch's outputs, whether its labels are class indices)
LOSSES = {
    "huber": (optax.huber_loss, False),
    "smoothed_cross_entropy": (_smoothed_cross_entropy, True),
    "cauchy": (_cauchy, False),
    "coupled_cauchy": (_coupled_cauchy, False),
    "l2": (optax.l2_loss, False),
    "binary_cross_entropy": (_binary_cross_entropy, False),
    "integer_cross_entropy": (optax.softmax_cross_entropy_with_integer_labels, True),
}


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        hidden = jnp.tanh(nn.Dense(5, param_dtype=jnp.float64, name="hidden")(x))
        return nn.Dense(NUM_OUTPUTS, param_dtype=jnp.float64, name="out")(hidden)


LAYERS = ("hidden", "out")


def _problem(name):
    fn, class_labels = LOSSES[name]
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (NUM_EXAMPLES, 4), jnp.float64)
    if class_labels:
        y = jax.random.randint(jax.random.key(1), (NUM_EXAMPLES,), 0, NUM_OUTPUTS)
    else:
        # Residuals on both sides of Huber's delta and of Cauchy's |r| = 1.
        y = 2 * jax.random.normal(jax.random.key(1), (NUM_EXAMPLES, NUM_OUTPUTS))
    params = model.init(jax.random.key(2), x)["params"]
    wrapped = oek.per_example_loss(fn)

    def loss_fn(params, x, y, weights):
        return wrapped(model.apply({"params": params}, x), y, weights=weights)

    return fn, model, params, (x, y, jnp.asarray(WEIGHTS)), loss_fn


def _term_loss(fn, outputs, target):
    """One example's loss, brute force: `fn` of a batch of one, summed."""
    return jnp.sum(fn(outputs[None], target[None]))


def _reference_gauss_newton(fn, model, params, batch):
    """Dense `Σ w J_nᵀ H⁺_n J_n / Σ w` over the parameters of LAYERS, flat
    in the order `[kernel; bias]` row-major per layer."""
    x, y, weights = (np.asarray(a) for a in batch)

    def flat_params(params):
        parts = []
        for name in LAYERS:
            layer = params[name]
            block = jnp.concatenate([layer["kernel"], layer["bias"][None]], axis=0)
            parts.append(block.reshape(-1))
        return jnp.concatenate(parts)

    flat, to_params = ravel_pytree(params)

    def outputs_of(flat, x_n):
        return model.apply({"params": to_params(flat)}, x_n[None])[0]

    # The Jacobian in ravel_pytree's order, permuted to the blocks' order.
    order = np.asarray(flat_params(to_params(jnp.arange(flat.size, dtype=flat.dtype))))
    order = order.astype(int)
    total = np.zeros((flat.size, flat.size))
    for n in range(len(x)):
        outputs = outputs_of(flat, x[n])
        jacobian = np.asarray(jax.jacobian(outputs_of)(flat, x[n]))[:, order]
        hessian = np.asarray(jax.hessian(_term_loss, argnums=1)(fn, outputs, y[n]))
        eigenvalues, eigenvectors = np.linalg.eigh(hessian)
        clipped = (eigenvectors * np.maximum(eigenvalues, 0)) @ eigenvectors.T
        total += weights[n] * jacobian.T @ clipped @ jacobian
    return total / weights.sum(), flat_params


def _sampled_fisher(stats):
    """`(1/(S Σw)) Σ_rows g gᵀ` of the statistics' per-row gradients
    `[a; 1] d̃ᵀ`, stacked over LAYERS."""
    rows = []
    for name in LAYERS:
        (layer,) = stats.layers[name]
        inputs = np.asarray(layer.inputs)
        inputs = np.concatenate([inputs, np.ones((len(inputs), 1))], axis=1)
        output_grads = np.asarray(layer.output_grads)
        rows.append(
            np.einsum("ri,rj->rij", inputs, output_grads).reshape(len(inputs), -1)
        )
    rows = np.concatenate(rows, axis=1)
    return rows.T @ rows / (stats.num_samples * float(stats.num_terms))


def _design_noise(key, shape, dtype):
    """`±√D e_j` for sample `s` (`j = s mod D`, `+` for `s < D`): over
    `2D` samples, `(1/2D) Σ z zᵀ = I` exactly."""
    num_samples, dim = shape[0], shape[-1]
    assert num_samples == 2 * dim, shape
    design = np.sqrt(dim) * np.concatenate([np.eye(dim), -np.eye(dim)])
    return jnp.broadcast_to(
        jnp.asarray(design, dtype).reshape(
            (num_samples,) + (1,) * (len(shape) - 2) + (dim,)
        ),
        shape,
    )


@pytest.fixture
def design_noise(monkeypatch):
    monkeypatch.setattr(losses_module, "_standard_normal", _design_noise)


@pytest.mark.parametrize("name", list(LOSSES))
def test_monte_carlo_fisher_is_the_gauss_newton_matrix(name, design_noise):
    fn, model, params, batch, loss_fn = _problem(name)
    curvature = oek.Curvature(loss_fn, fisher_type="mc", num_samples=2 * NUM_OUTPUTS)
    _, _, stats = jax.jit(curvature.value_grad_and_stats)(
        params, *batch, key=jax.random.key(3)
    )
    reference, _ = _reference_gauss_newton(fn, model, params, batch)
    assert float(stats.num_terms) == WEIGHTS.sum()
    np.testing.assert_allclose(_sampled_fisher(stats), reference, atol=1e-12)


def test_sampled_noise_is_standard_normal():
    """With the real noise, many samples' Fisher approaches `G`."""
    fn, model, params, batch, loss_fn = _problem("smoothed_cross_entropy")
    curvature = oek.Curvature(loss_fn, fisher_type="mc", num_samples=4000)
    _, _, stats = jax.jit(curvature.value_grad_and_stats)(
        params, *batch, key=jax.random.key(3)
    )
    reference, _ = _reference_gauss_newton(fn, model, params, batch)
    # 4000 samples: a relative standard error of about 2%.
    scale = np.abs(reference).max()
    np.testing.assert_allclose(_sampled_fisher(stats), reference, atol=0.1 * scale)


@pytest.mark.parametrize("name", list(LOSSES))
def test_gauss_newton_products(name):
    fn, model, params, batch, loss_fn = _problem(name)
    curvature = oek.Curvature(loss_fn, fisher_type="mc")
    _, _, stats = curvature.value_grad_and_stats(params, *batch, key=jax.random.key(3))
    vectors = [
        jax.tree.map(
            lambda leaf, i=i: jax.random.normal(
                jax.random.fold_in(jax.random.key(4), i), leaf.shape, leaf.dtype
            ),
            params,
        )
        for i in range(3)
    ]
    products = stats.loss_model.curvature_products(vectors)
    reference, flat_params = _reference_gauss_newton(fn, model, params, batch)
    flat = np.stack([np.asarray(flat_params(v)) for v in vectors])
    np.testing.assert_allclose(products, flat @ reference @ flat.T, rtol=1e-10)


def test_empirical_fisher_output_gradients():
    """`fisher_type="empirical"`: the rows are `w_n dl_n/dy_n` of the data."""
    fn, model, params, batch, loss_fn = _problem("huber")
    x, y, weights = batch
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    _, _, stats = curvature.value_grad_and_stats(params, *batch)
    outputs = model.apply({"params": params}, x)
    per_example = jax.vmap(jax.grad(lambda o, t: _term_loss(fn, o, t)))(outputs, y)
    np.testing.assert_allclose(
        stats.layers["out"][0].output_grads,
        weights[:, None] * per_example,
        rtol=1e-12,
    )


class NnxMLP(nnx.Module):
    def __init__(self):
        self.hidden = nnx.Linear(4, 5, param_dtype=jnp.float64, rngs=nnx.Rngs(0))
        self.out = nnx.Linear(5, NUM_OUTPUTS, param_dtype=jnp.float64, rngs=nnx.Rngs(1))

    def __call__(self, x):
        return self.out(jnp.tanh(self.hidden(x)))


def test_nnx_curvature_matches_linen(design_noise):
    fn, model, params, batch, loss_fn = _problem("smoothed_cross_entropy")
    nnx_model = NnxMLP()
    for name in LAYERS:
        getattr(nnx_model, name).kernel[...] = params[name]["kernel"]
        getattr(nnx_model, name).bias[...] = params[name]["bias"]
    wrapped = oek.per_example_loss(fn)

    def nnx_loss_fn(model, x, y, weights):
        return wrapped(model(x), y, weights=weights)

    key = jax.random.key(3)
    linen = oek.Curvature(loss_fn, num_samples=2 * NUM_OUTPUTS)
    _, _, stats = linen.value_grad_and_stats(params, *batch, key=key)
    nnx_curvature = oek.nnx.Curvature(nnx_loss_fn, num_samples=2 * NUM_OUTPUTS)
    _, _, nnx_stats = nnx_curvature.value_grad_and_stats(nnx_model, *batch, key=key)
    for name in LAYERS:
        (layer,), (nnx_layer,) = stats.layers[name], nnx_stats.layers[name]
        np.testing.assert_allclose(nnx_layer.inputs, layer.inputs, rtol=1e-12)
        np.testing.assert_allclose(
            nnx_layer.output_grads, layer.output_grads, rtol=1e-12
        )
    reference, _ = _reference_gauss_newton(fn, model, params, batch)
    np.testing.assert_allclose(_sampled_fisher(nnx_stats), reference, atol=1e-12)


def test_default_fisher_is_sampled_for_wrapped_losses():
    _, _, params, batch, loss_fn = _problem("huber")
    key = jax.random.key(3)
    _, _, default = oek.Curvature(loss_fn).value_grad_and_stats(params, *batch, key=key)
    _, _, sampled = oek.Curvature(loss_fn, fisher_type="mc").value_grad_and_stats(
        params, *batch, key=key
    )
    np.testing.assert_array_equal(
        default.layers["out"][0].output_grads, sampled.layers["out"][0].output_grads
    )


def test_default_fisher_without_helpers_is_empirical_with_a_warning():
    model = MLP()
    x = jax.random.normal(jax.random.key(0), (NUM_EXAMPLES, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(1), (NUM_EXAMPLES, NUM_OUTPUTS))
    params = model.init(jax.random.key(2), x)["params"]

    def loss_fn(params, x, y):
        return jnp.sum(optax.huber_loss(model.apply({"params": params}, x), y), -1)

    with pytest.warns(UserWarning, match="per_example_loss"):
        _, _, default = oek.Curvature(loss_fn).value_grad_and_stats(params, x, y)
    _, _, empirical = oek.Curvature(
        loss_fn, fisher_type="empirical"
    ).value_grad_and_stats(params, x, y)
    np.testing.assert_array_equal(
        default.layers["out"][0].output_grads, empirical.layers["out"][0].output_grads
    )


def test_several_samples_without_helpers_are_refused():
    model = MLP()
    x = jnp.ones((2, 4))
    params = model.init(jax.random.key(2), x)["params"]

    def loss_fn(params, x):
        return jnp.sum(model.apply({"params": params}, x) ** 2, -1)

    curvature = oek.Curvature(loss_fn, num_samples=2)
    with pytest.raises(ValueError, match="num_samples=2 needs the sampled Fisher"):
        curvature.value_grad_and_stats(params, x)


def test_bad_loss_shapes_are_refused():
    huber = oek.per_example_loss(optax.huber_loss)
    with pytest.raises(ValueError, match=r"per_example_loss\(huber_loss\).*event axis"):
        huber(jnp.zeros(4), jnp.zeros(4))
    reduced = oek.per_example_loss(lambda o, t: jnp.mean(optax.l2_loss(o, t)))
    with pytest.raises(ValueError, match="returned shape"):
        reduced(jnp.zeros((4, 2)), jnp.zeros((4, 2)))


# Float32 training on digits, as users run it: the adaptive ekfac, the
# default Curvature (the sampled Fisher) and a wrapped loss.
STEPS = 40
BATCH_SIZE = 64


class DigitsMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(10)(nn.relu(nn.Dense(32)(x)))


def _focal_loss(logits, labels, gamma=2.0):
    """A user's own loss: focal loss (Lin et al., 2017), one per example."""
    log_probs = jax.nn.log_softmax(logits)
    log_p = jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]
    return -((1 - jnp.exp(log_p)) ** gamma) * log_p


def _one_hot_huber(logits, labels):
    return optax.huber_loss(logits, jax.nn.one_hot(labels, logits.shape[-1]))


@pytest.mark.parametrize("fn", [_one_hot_huber, _focal_loss], ids=["huber", "focal"])
def test_adaptive_ekfac_trains_float32_digits(fn):
    x, y = load_digits(return_X_y=True)
    x = ((x - x.mean(0)) / np.where(x.std(0) > 0, x.std(0), 1)).astype(np.float32)
    y = y.astype(np.int32)
    model = DigitsMLP()
    loss = oek.per_example_loss(fn)

    def loss_fn(params, x, y):
        return loss(model.apply({"params": params}, x), y)

    params = model.init(jax.random.key(0), x[:1])["params"]
    curvature = oek.Curvature(loss_fn)
    tx = oek.ekfac(curvature.layers(params, x[:BATCH_SIZE], y[:BATCH_SIZE]))
    opt_state = tx.init(params)

    @jax.jit
    def step(params, opt_state, x, y):
        loss, grads, stats = curvature.value_grad_and_stats(params, x, y)
        updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(0)
    initial = float(jnp.mean(loss_fn(params, x, y)))
    for _ in range(STEPS):
        batch = rng.choice(len(x), BATCH_SIZE, replace=False)
        params, opt_state, _ = step(params, opt_state, x[batch], y[batch])
    assert jax.tree.leaves(params)[0].dtype == jnp.float32
    final = float(jnp.mean(loss_fn(params, x, y)))
    assert final < 0.1 * initial, (initial, final)
