"""The registry of layer kinds: the one listing of the layers the capture sees.

Each kind lists its layer classes and methods (`LayerKind.layer_methods`); the
linen interceptor recognises a call through `kind_of`, and the flax.nnx
capture routes the calls of `nnx_methods()`. Registering a kind
(`register_kind`) is all it takes for both captures to see its layers.
"""

from collections.abc import Iterator

import flax.linen as nn
from flax import nnx

from optax_ekfac._src.kinds.base import LayerKind

_KINDS: dict[str, LayerKind] = {}
# The kinds this package defines, which a user's kind may not replace.
_BUILT_IN: set[str] = set()


def register_kind(kind: LayerKind) -> LayerKind:
    """Makes `optax_ekfac.Curvature` (linen and nnx) capture a layer kind.

    The calls of the kind's `layer_methods` become Kronecker-factored blocks
    (their parameters leave the diagonal fallback). A kind registered later
    is asked first, so a kind for a subclass of a built-in layer takes its
    calls; registering another kind under a name you registered before
    replaces it.

    Args:
        kind: an instance of a `optax_ekfac.LayerKind` subclass: it sets
            `name` and `layer_methods` and implements `describe`; the rest
            defaults to a kernel (and bias) that multiplies the input's last
            axis, `y = x W + b`.

    Returns:
        `kind`, registered.

    Raises:
        TypeError: if `kind` is not a `LayerKind` instance, or lists no
            layer methods.
        ValueError: if its name is that of a built-in kind.

    Example:
        >>> class Project(nn.Module):   # a user's layer: y = x W
        ...     features: int
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         kernel = self.param("kernel", nn.initializers.lecun_normal(),
        ...                             (x.shape[-1], self.features))
        ...         return x @ kernel
        >>> class ProjectKind(optax_ekfac.LayerKind):
        ...     name = "Project"
        ...     layer_methods = ((Project, "__call__"),)
        ...     def describe(self, call):
        ...         d_in, d_out = call.inputs.shape[-1], call.outputs.shape[-1]
        ...         return optax_ekfac.CallShape(
        ...             params=(("kernel", (d_in, d_out)),),
        ...             input_dim=d_in, output_dim=d_out)
        >>> _ = optax_ekfac.register_kind(ProjectKind())
        >>> class Model(nn.Module):
        ...     @nn.compact
        ...     def __call__(self, x):
        ...         return nn.Dense(3)(jnp.tanh(Project(16)(x)))
        >>> model = Model()
        >>> params = model.init(jax.random.key(0), x)["params"]
        >>> def loss_fn(params, x, y):
        ...     logits = model.apply({"params": params}, x)
        ...     return optax_ekfac.softmax_cross_entropy(logits, y)
        >>> layers = optax_ekfac.Curvature(loss_fn).layers(params, x, y)
        >>> [(block.name, block.kind) for block in layers.blocks]
        [('Project_0', 'Project'), ('Dense_0', 'Dense')]
    """
    if not isinstance(kind, LayerKind):
        raise TypeError(
            "register_kind: kind must be an instance of a LayerKind subclass, "
            f"not {type(kind).__name__}."
        )
    name = getattr(kind, "name", None)
    if not isinstance(name, str) or not name:
        raise TypeError(
            f"register_kind: {type(kind).__name__} must set name, a string "
            "(Block.kind)."
        )
    if name in _BUILT_IN:
        raise ValueError(
            f"register_kind: {name!r} is a built-in kind's name; give "
            f"{type(kind).__name__} a name of its own."
        )
    methods = kind.layer_methods
    if not methods or not all(
        isinstance(cls, type) and isinstance(method, str) for cls, method in methods
    ):
        raise TypeError(
            f"register_kind: {type(kind).__name__}.layer_methods must list the "
            "(layer class, method name) pairs whose calls are its blocks, e.g. "
            f'((MyLayer, "__call__"),); got {methods!r}.'
        )
    _KINDS.pop(name, None)  # re-registered: asked first again
    _KINDS[name] = kind
    return kind


def register_built_in(*kinds: LayerKind) -> None:
    """Registers this package's own kinds (`kinds/__init__.py`)."""
    for kind in kinds:
        _KINDS[kind.name] = kind
        _BUILT_IN.add(kind.name)


def get(name: str) -> LayerKind:
    """The kind registered under `name` (`Block.kind`)."""
    if name not in _KINDS:
        raise KeyError(
            f"no layer kind {name!r} is registered (registered: {sorted(_KINDS)}); "
            "register a user's kind with optax_ekfac.register_kind before "
            "building an optimizer for its blocks."
        )
    return _KINDS[name]


def kind_of(module: nn.Module | nnx.Module, method_name: str) -> LayerKind | None:
    """The layer kind of a module method call, or None if it is not a block.

    flax.nnx layers are the kinds of their linen counterparts: `nnx.Linear` is
    a "Dense", `nnx.LinearGeneral` a "DenseGeneral". Modules that are not
    recognised (and Conv with a mask, DenseGeneral with `batch_dims`,
    LinearGeneral with `batch_axis`) are not captured: their parameters fall
    back to the diagonal. The kind registered last is asked first.
    """
    for kind in reversed(_KINDS.values()):
        if kind.recognises(module, method_name):
            return kind
    return None


def nnx_methods() -> Iterator[tuple[type, str]]:
    """The flax.nnx `(class, method name)` pairs of every kind, each named by
    the class that defines the method (a subclass may inherit it)."""
    seen = set()
    for kind in _KINDS.values():
        for cls, name in kind.layer_methods:
            if not issubclass(cls, nnx.Module):
                continue
            owner = next((c for c in cls.__mro__ if name in c.__dict__), None)
            if owner is not None and (owner, name) not in seen:
                seen.add((owner, name))
                yield owner, name


def supported() -> str:
    """The captured layers in words, for errors: "flax.linen Dense, ...;
    flax.nnx Linear, ..."."""
    linen: list[str] = []
    nnx_names: list[str] = []
    other: list[str] = []
    for kind in _KINDS.values():
        for cls, _ in kind.layer_methods:
            name = _class_name(cls)
            group = (
                linen
                if issubclass(cls, nn.Module)
                else nnx_names
                if issubclass(cls, nnx.Module)
                else other
            )
            if name not in group:
                group.append(name)
    parts = [
        f"{label} {_listed(names)}"
        for label, names in (
            ("flax.linen", linen),
            ("flax.nnx", nnx_names),
            ("", other),
        )
        if names
    ]
    return "; ".join(part.strip() for part in parts)


def _class_name(cls: type) -> str:
    if cls.__module__.startswith("flax."):
        return cls.__name__
    return f"{cls.__module__}.{cls.__qualname__}"


def _listed(names: list[str]) -> str:
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} and {names[-1]}"
