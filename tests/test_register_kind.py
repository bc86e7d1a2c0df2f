"""A user's layer kind, registered once, is captured by linen and by nnx.

`Project` (linen) and `NnxProject` (nnx) compute `y = x W` with a kernel of
their own; one `ProjectKind`, registered with `optax_ekfac.register_kind`,
lists both. Each gives the update of its `Dense(use_bias=False)` twin, and
bad registrations are refused.
"""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

import optax_ekfac as oek

WIDTH, HIDDEN, CLASSES = 4, 5, 3


class Project(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features)
        )
        return x @ kernel


class NnxProject(nnx.Module):
    def __init__(self, in_features, out_features, rngs):
        self.kernel = nnx.Param(
            nnx.initializers.lecun_normal()(rngs.params(), (in_features, out_features))
        )

    def __call__(self, x):
        return x @ self.kernel[...]


class ProjectKind(oek.LayerKind):
    name = "Project"
    layer_methods = ((Project, "__call__"), (NnxProject, "__call__"))

    def describe(self, call):
        d_in, d_out = call.inputs.shape[-1], call.outputs.shape[-1]
        return oek.CallShape((("kernel", (d_in, d_out)),), d_in, d_out)


@pytest.fixture(autouse=True)
def registered():
    # Registered for each test: a registration elsewhere under the same name
    # (the docstring example's `Project`) replaces this one.
    return oek.register_kind(ProjectKind())


def _batch():
    key_x, key_y = jax.random.split(jax.random.key(0))
    x = jax.random.normal(key_x, (8, WIDTH))
    return x, jax.random.randint(key_y, (8,), 0, CLASSES)


class LinenModel(nn.Module):
    user_kind: bool

    @nn.compact
    def __call__(self, x):
        if self.user_kind:
            hidden = Project(HIDDEN, name="first")(x)
        else:
            hidden = nn.Dense(HIDDEN, use_bias=False, name="first")(x)
        return nn.Dense(CLASSES, name="head")(jnp.tanh(hidden))


def _linen_update(user_kind, params):
    model = LinenModel(user_kind)
    x, y = _batch()

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, x, y)
    tx = oek.scale_by_ekfac(layers)
    _, grads, stats = curvature.value_grad_and_stats(params, x, y)
    update, _ = tx.update(grads, tx.init(params), params, stats=stats)
    return layers, update


def test_linen_layer_of_a_registered_kind_gives_its_dense_twin_update():
    x, _ = _batch()
    params = LinenModel(False).init(jax.random.key(1), x)["params"]
    dense_layers, dense_update = _linen_update(False, params)
    user_layers, user_update = _linen_update(True, params)
    assert [b.kind for b in dense_layers.blocks] == ["Dense", "Dense"]
    assert [b.kind for b in user_layers.blocks] == ["Project", "Dense"]
    assert not user_layers.fallback
    chex.assert_trees_all_close(user_update, dense_update, rtol=1e-4, atol=1e-6)


class NnxModel(nnx.Module):
    def __init__(self, user_kind, rngs):
        if user_kind:
            self.first = NnxProject(WIDTH, HIDDEN, rngs)
        else:
            self.first = nnx.Linear(WIDTH, HIDDEN, use_bias=False, rngs=rngs)
        self.head = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

    def __call__(self, x):
        return self.head(jnp.tanh(self.first(x)))


def _nnx_update(model):
    x, y = _batch()

    def loss_fn(model, x, y):
        return oek.softmax_cross_entropy(model(x), y)

    curvature = oek.nnx.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(model, x, y)
    params = nnx.state(model, nnx.Param)
    tx = oek.scale_by_ekfac(layers)
    _, grads, stats = curvature.value_grad_and_stats(model, x, y)
    update, _ = tx.update(grads, tx.init(params), params, stats=stats)
    return layers, nnx.to_pure_dict(update)


def test_nnx_layer_of_the_same_registration_gives_its_dense_twin_update():
    dense = NnxModel(False, nnx.Rngs(0))
    user = NnxModel(True, nnx.Rngs(0))
    user.first.kernel[...] = dense.first.kernel[...]
    user.head.kernel[...] = dense.head.kernel[...]
    user.head.bias[...] = dense.head.bias[...]
    _, dense_update = _nnx_update(dense)
    user_layers, user_update = _nnx_update(user)
    assert [b.kind for b in user_layers.blocks] == ["Project", "Dense"]
    chex.assert_trees_all_close(user_update, dense_update, rtol=1e-4, atol=1e-6)


def test_bad_registrations_are_refused():
    with pytest.raises(TypeError, match="instance of a LayerKind subclass"):
        oek.register_kind(ProjectKind)  # the class, not an instance

    class Shadow(ProjectKind):
        name = "Dense"

    with pytest.raises(ValueError, match="'Dense' is a built-in kind's name"):
        oek.register_kind(Shadow())

    class NoLayers(oek.LayerKind):
        name = "NoLayers"

    with pytest.raises(TypeError, match="layer_methods must list"):
        oek.register_kind(NoLayers())
