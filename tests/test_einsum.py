"""Einsum layers (flax.linen and flax.nnx) as Kronecker-factored blocks.

* Brute force, float64: a model of three projection einsums (several output
  axes with a bias, several contracted axes, and a kernel whose axes and
  output are transposed against the input's) against a reference built here:
  the layer inputs and per-example output gradients from flax's `sow` and
  `perturb` and `jax.vmap(jax.grad(...))`; rows, block matrices, factors,
  eigenbases (`np.linalg.eigh`), scalings and the damped update in NumPy, the
  axis orders written out by hand for each equation (no library code).
* Twins: an Einsum equivalent to a Dense (`'btd,dh->bth'` with a bias, and
  `'btd,hd->bht'`, a Dense whose kernel and output are transposed) gives the
  Dense's update: linen in float64 (two steps, to round-off), nnx in float32
  (the path users run; to float32 round-off of the eigendecompositions).
* Einsums that are not projections fall back to the diagonal when the module
  holds the equation, and are refused, naming the layer, when the call gives it.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from flax import nnx

import optax_ekfac as oek

F64 = dict(param_dtype=jnp.float64)
NUM_EXAMPLES, NUM_POSITIONS, WIDTH, HEADS, HEAD_DIM, CLASSES = 6, 3, 4, 2, 3, 3
DAMPING = 1e-3


class Projections(nn.Module):
    """Three projection einsums; each one's input is sown and its output
    perturbed, so that the reference reads them without the library."""

    @nn.compact
    def __call__(self, x):
        layers = (
            # several output axes, in the kernel in another order than in
            # the output; a bias of shape (n, h)
            ("split", (WIDTH, HEAD_DIM, HEADS), "btd,dhn->btnh", True),
            # several contracted axes, in the kernel in another order than in
            # the input; no bias
            ("merge", (HEAD_DIM, HEADS, WIDTH), "btnh,hnd->btd", False),
            # kernel (k, d) and output (b, k, t): transposed against the input
            ("head", (CLASSES, WIDTH), "btd,kd->bkt", True),
        )
        for i, (name, shape, equation, use_bias) in enumerate(layers):
            if i:
                x = jnp.tanh(x)
            self.sow("intermediates", f"{name}_input", x)
            x = nn.Einsum(shape, equation, use_bias=use_bias, name=name, **F64)(x)
            x = self.perturb(f"{name}_output", x)
        return jnp.moveaxis(x, 1, 2)  # [B, T, classes]


def _cross_entropy(logits, labels):
    log_probabilities = jax.nn.log_softmax(logits)
    return -jnp.take_along_axis(log_probabilities, labels[..., None], -1)[..., 0]


# Each layer by hand: the input's axes as (example, positions, contracted in
# the kernel's order), the output's as (example, positions, features in the
# output's order), the kernel's as (contracted, features).
_LAYOUTS = {
    "split": dict(inputs=(0, 1, 2), outputs=(0, 1, 2, 3), kernel=(0, 2, 1), ncon=1),
    "merge": dict(inputs=(0, 1, 3, 2), outputs=(0, 1, 2), kernel=(0, 1, 2), ncon=2),
    "head": dict(inputs=(0, 1, 2), outputs=(0, 2, 1), kernel=(1, 0), ncon=1),
}


def _rows(array, axes, num_trailing):
    """`[N, positions, features]` from `array` with its axes in `axes` order,
    the last `num_trailing` of them flattened into features."""
    array = np.transpose(np.asarray(array), axes)
    n = array.shape[0]
    return array.reshape(n, -1, int(np.prod(array.shape[array.ndim - num_trailing :])))


def _matrix(leaves, layout, lead):
    """The block matrix (kernel rows, then the bias row) of `leaves` with
    `lead` leading axes."""
    kernel = np.asarray(leaves["kernel"])
    kernel_axes = tuple(range(lead)) + tuple(lead + a for a in layout["kernel"])
    kernel = np.transpose(kernel, kernel_axes)
    shape = kernel.shape[:lead]
    num_contracted = int(np.prod(kernel.shape[lead : lead + layout["ncon"]]))
    kernel = kernel.reshape(shape + (num_contracted, -1))
    if "bias" not in leaves:
        return kernel
    bias = np.asarray(leaves["bias"]).reshape(shape + (1, -1))
    return np.concatenate([kernel, bias], -2)


@pytest.fixture(scope="module")
def brute_force():
    model = Projections()
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (NUM_EXAMPLES, NUM_POSITIONS, WIDTH), jnp.float64)
    y = jax.random.randint(key_y, (NUM_EXAMPLES, NUM_POSITIONS), 0, CLASSES)
    variables = model.init(jax.random.key(1), x[:1])
    params, perturbations = variables["params"], variables["perturbations"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    tx = oek.scale_by_ekfac(layers, damping=DAMPING)
    _, grads, stats = curvature.value_grad_and_stats(params, x, y)
    update, state = tx.update(grads, tx.init(params), params, stats=stats)

    def example_loss(params, perturbations, x_n, y_n):
        outputs = model.apply(
            {"params": params, "perturbations": perturbations}, x_n[None]
        )
        return _cross_entropy(outputs, y_n[None]).sum()

    per_example, output_grads = jax.vmap(
        jax.grad(example_loss, argnums=(0, 1)), in_axes=(None, None, 0, 0)
    )(params, perturbations, x, y)
    _, sown = model.apply({"params": params}, x, mutable=["intermediates"])
    gradient = jax.grad(
        lambda p: _cross_entropy(model.apply({"params": p}, x), y).mean()
    )(params)
    return dict(
        layers=layers,
        update=update,
        state=state,
        inputs={k[: -len("_input")]: v[0] for k, v in sown["intermediates"].items()},
        output_grads={k[: -len("_output")]: v[:, 0] for k, v in output_grads.items()},
        per_example=per_example,
        gradient=gradient,
        num_terms=NUM_EXAMPLES * NUM_POSITIONS,
    )


def _reference(problem, name):
    layout = _LAYOUTS[name]
    has_bias = "bias" in problem["gradient"][name]
    inputs = _rows(problem["inputs"][name], layout["inputs"], layout["ncon"])
    if has_bias:
        inputs = reference.with_ones(inputs)
    num_features = len(layout["outputs"]) - len(layout["inputs"]) + layout["ncon"]
    outputs = _rows(problem["output_grads"][name], layout["outputs"], num_features)
    per_example = _matrix(problem["per_example"][name], layout, lead=1)
    gradient = _matrix(problem["gradient"][name], layout, lead=0)
    n, positions = inputs.shape[:2]
    input_factor = np.einsum("npi,npj->ij", inputs, inputs) / (n * positions)
    output_factor = np.einsum("npi,npj->ij", outputs, outputs) / problem["num_terms"]
    _, input_basis = np.linalg.eigh(input_factor)
    _, output_basis = np.linalg.eigh(output_factor)
    projected = np.einsum("ji,njo,op->nip", input_basis, per_example, output_basis)
    scalings = np.square(projected).sum(0) / problem["num_terms"]
    return dict(
        rows_gradients=np.einsum("npi,npo->nio", inputs, outputs),
        per_example=per_example,
        input_factor=input_factor,
        output_factor=output_factor,
        update=reference.solve_update(
            input_basis, output_basis, scalings, gradient, DAMPING
        ),
        layout=layout,
    )


@pytest.mark.parametrize("name", list(_LAYOUTS))
def test_einsum_blocks_match_brute_force(brute_force, name):
    """The reference's rows give `vmap(grad)`'s per-example gradients; the
    library's factors and update match the reference's."""
    assert {(b.name, b.kind) for b in brute_force["layers"].blocks} == {
        (layer, "Einsum") for layer in _LAYOUTS
    }
    assert not brute_force["layers"].fallback
    ref = _reference(brute_force, name)
    np.testing.assert_allclose(
        ref["rows_gradients"], ref["per_example"], rtol=1e-10, atol=1e-12
    )
    state = brute_force["state"].blocks[name]
    np.testing.assert_allclose(
        state.input_factor, ref["input_factor"], rtol=1e-9, atol=1e-12
    )
    np.testing.assert_allclose(
        state.output_factor, ref["output_factor"], rtol=1e-9, atol=1e-12
    )
    update = {"kernel": brute_force["update"][name]["kernel"]}
    if "bias" in brute_force["update"][name]:
        update["bias"] = brute_force["update"][name]["bias"]
    np.testing.assert_allclose(
        _matrix(update, ref["layout"], lead=0), ref["update"], rtol=1e-7, atol=1e-10
    )


# --- Einsum twins of Dense layers ---------------------------------------------


class LinenTwin(nn.Module):
    """Dense-tanh-Dense on `[B, T, D]`, the first layer as `nn.Dense` or as
    the einsum `equation` (`'btd,dh->bth'`, or `'btd,hd->bht'`: its kernel
    and output transposed)."""

    equation: str | None = None

    @nn.compact
    def __call__(self, x):
        if self.equation is None:
            hidden = nn.Dense(5, name="first", **F64)(x)
        elif self.equation == "btd,dh->bth":
            hidden = nn.Einsum((WIDTH, 5), self.equation, name="first", **F64)(x)
        else:
            hidden = nn.Einsum((5, WIDTH), self.equation, name="first", **F64)(x)
            hidden = jnp.moveaxis(hidden, 1, 2)
        return nn.Dense(CLASSES, name="head", **F64)(jnp.tanh(hidden))


def _twin_batch(dtype=jnp.float32):
    key_x, key_y = jax.random.split(jax.random.key(2))
    x = jax.random.normal(key_x, (8, NUM_POSITIONS, WIDTH), dtype)
    y = jax.random.randint(key_y, (8, NUM_POSITIONS), 0, CLASSES)
    return x, y


def _transposed_kernel(equation):
    return equation == "btd,hd->bht"


def _linen_updates(equation, params):
    model = LinenTwin(equation)
    x, y = _twin_batch(jnp.float64)

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    assert [block.kind for block in layers.blocks] == [
        "Dense" if equation is None else "Einsum",
        "Dense",
    ]
    tx = oek.scale_by_ekfac(layers)
    state = tx.init(params)
    updates = []
    for _ in range(2):  # the second step in the first step's eigenbases
        _, grads, stats = curvature.value_grad_and_stats(params, x, y)
        update, state = tx.update(grads, state, params, stats=stats)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, update))
        updates.append(update)
    return updates


@pytest.mark.parametrize("equation", ["btd,dh->bth", "btd,hd->bht"])
def test_linen_einsum_gives_its_dense_twin_update(equation):
    x, _ = _twin_batch(jnp.float64)
    dense_params = LinenTwin().init(jax.random.key(3), x)["params"]
    einsum_params = jax.tree.map(lambda p: p, dense_params)
    if _transposed_kernel(equation):
        einsum_params["first"] = dict(
            kernel=dense_params["first"]["kernel"].T, bias=dense_params["first"]["bias"]
        )
    dense_updates = _linen_updates(None, dense_params)
    einsum_updates = _linen_updates(equation, einsum_params)
    for dense, einsum in zip(dense_updates, einsum_updates):
        if _transposed_kernel(equation):
            einsum["first"]["kernel"] = einsum["first"]["kernel"].T
        chex.assert_trees_all_close(einsum, dense, rtol=1e-9, atol=1e-12)


class NnxTwin(nnx.Module):
    def __init__(self, equation, rngs):
        if equation is None:
            self.first = nnx.Linear(WIDTH, 5, rngs=rngs)
        elif _transposed_kernel(equation):
            self.first = nnx.Einsum(equation, (5, WIDTH), (5,), rngs=rngs)
        else:
            self.first = nnx.Einsum(equation, (WIDTH, 5), (5,), rngs=rngs)
        self.equation = equation
        self.head = nnx.Linear(5, CLASSES, rngs=rngs)

    def __call__(self, x):
        hidden = self.first(x)
        if self.equation is not None and _transposed_kernel(self.equation):
            hidden = jnp.moveaxis(hidden, 1, 2)
        return self.head(jnp.tanh(hidden))


def _nnx_update(model):
    x, y = _twin_batch()

    def loss_fn(model, x, y):
        return oek.softmax_cross_entropy(model(x), y)

    curvature = oek.nnx.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(model, x, y)
    tx = oek.scale_by_ekfac(layers)
    params = nnx.state(model, nnx.Param)
    _, grads, stats = curvature.value_grad_and_stats(model, x, y)
    update, _ = tx.update(grads, tx.init(params), params, stats=stats)
    return layers, nnx.to_pure_dict(update)


@pytest.mark.parametrize("equation", ["btd,dh->bth", "btd,hd->bht"])
def test_nnx_einsum_gives_its_dense_twin_update(equation):
    dense = NnxTwin(None, nnx.Rngs(0))
    einsum = NnxTwin(equation, nnx.Rngs(0))
    kernel = dense.first.kernel[...]
    einsum.first.kernel[...] = kernel.T if _transposed_kernel(equation) else kernel
    einsum.first.bias[...] = dense.first.bias[...]
    einsum.head.kernel[...] = dense.head.kernel[...]
    einsum.head.bias[...] = dense.head.bias[...]
    dense_layers, dense_update = _nnx_update(dense)
    einsum_layers, einsum_update = _nnx_update(einsum)
    assert [b.kind for b in dense_layers.blocks] == ["Dense", "Dense"]
    assert [b.kind for b in einsum_layers.blocks] == ["Einsum", "Dense"]
    if _transposed_kernel(equation):
        einsum_update["first"]["kernel"] = einsum_update["first"]["kernel"].T
    chex.assert_trees_all_equal_shapes_and_dtypes(einsum_update, dense_update)
    difference = jax.tree.map(jnp.subtract, einsum_update, dense_update)
    relative = _norm(difference) / _norm(dense_update)
    assert relative < 1e-5, relative


def _norm(tree):
    return np.sqrt(sum(np.sum(np.square(leaf)) for leaf in jax.tree.leaves(tree)))


# --- refusals ------------------------------------------------------------------


@pytest.mark.parametrize(
    "shape, equation, reason",
    [
        ((HEADS, WIDTH, 3), "bnd,ndk->bnk", "batched product"),
        ((WIDTH, 3), "btd,dh->bh", "sums axis 't' away"),
        ((NUM_EXAMPLES, 3), "btd,bh->bth", "it contracts the input's axis 0"),
        ((WIDTH, 3), "btd,dh->tbh", "is not the output's first axis"),
    ],
)
def test_einsums_that_are_not_projections_fall_back_or_are_refused(
    shape, equation, reason
):
    """Held by the module: the diagonal fallback (as before the Einsum kind);
    given at the call: refused, naming the layer and why."""
    x = jnp.ones((NUM_EXAMPLES, HEADS if equation[1] == "n" else 5, WIDTH))

    class Held(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum(shape, equation, name="mixer")(nn.Dense(WIDTH)(x))

    held = Held()
    params = held.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x):
        outputs = held.apply({"params": params}, x)
        if equation.endswith("->tbh"):
            outputs = jnp.swapaxes(outputs, 0, 1)
        return jnp.sum(outputs.reshape(outputs.shape[0], -1) ** 2, -1)

    layers = oek.Curvature(loss_fn).layers(params, x)
    assert [block.kind for block in layers.blocks] == ["Dense"]
    assert ("mixer", "kernel") in layers.fallback

    class AtTheCall(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum(shape, name="mixer")(x, einsum_str=equation)

    at_the_call = AtTheCall()
    params = at_the_call.init(jax.random.key(0), x)["params"]

    def call_loss_fn(params, x):
        outputs = at_the_call.apply({"params": params}, x)
        if equation.endswith("->tbh"):
            outputs = jnp.swapaxes(outputs, 0, 1)
        return jnp.sum(outputs.reshape(outputs.shape[0], -1) ** 2, -1)

    with pytest.raises(ValueError, match=f"mixer.*Einsum, '{equation}'.*{reason}"):
        oek.Curvature(call_loss_fn).layers(params, x)


def test_einsum_equation_given_at_call_time():
    """flax.linen's Einsum may get its equation at the call."""

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Einsum((3, WIDTH), name="head")(x, einsum_str="btd,kd->btk")

    x = jnp.ones((NUM_EXAMPLES, NUM_POSITIONS, WIDTH))
    params = Model().init(jax.random.key(0), x)["params"]

    def loss_fn(params, x):
        return jnp.sum(Model().apply({"params": params}, x) ** 2, -1)

    (block,) = oek.Curvature(loss_fn).layers(params, x).blocks
    assert (block.kind, block.input_dim, block.output_dim) == ("Einsum", WIDTH + 1, 3)
    assert block.config.equation == "btd,kd->btk"
