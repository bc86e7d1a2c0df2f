"""Per-example losses, unreduced, for `Curvature` loss functions.

`Curvature` averages the losses a `loss_fn` returns and scales the captured
output gradients by their number, so every helper here returns one loss term
per leading index and never reduces over examples. The last axis of
`predictions` is the event axis: the outputs of one example form one loss term
(a regression with one output therefore has predictions of shape `[N, 1]`).

Each helper is the negative log-likelihood of a distribution (categorical,
unit-variance Gaussian, independent Bernoulli), which is what makes the
empirical Fisher of these losses a Fisher. `per_example_loss` makes any other
loss of the outputs a helper: its curvature is the Gauss-Newton matrix, from
autodiff of the loss at the outputs, and its Monte-Carlo Fisher samples
output gradients `L z` (`z ~ N(0, I)`, `L Lᵀ` the clipped output Hessian)
instead of labels.

For the Monte-Carlo Fisher (`Curvature(..., fisher_type="mc")`) the capture
runs `loss_fn` inside `sampling(key, num_samples)`. While that context is
active, every helper call also samples labels from its own predictive
distribution (whose parameters are `stop_gradient`-ed, so that only the loss,
not the sampling, is differentiated) and records the negative log-likelihood
of those labels. The helper still returns the loss of the true labels: the
sampled losses reach the capture through the context only.

Every helper takes optional per-term `weights` (a 0/1 padding mask, or
non-negative weights, of the losses' shape) and returns the weighted losses
`w l`; the capture runs `loss_fn` inside `recorded_weights()` and, when a
helper got weights, averages the returned losses as `Σ w l / Σ w`, with
`Σ w` loss terms (`Statistics.num_terms`: the real terms of a mask).

The Monte-Carlo Fisher is that of the loss `loss_fn` returns, weights and
whatever `loss_fn` does with a helper's losses afterwards
(`2 * squared_error(...)`, a sum of two helpers with their own factors)
included: the capture adds a zero to each helper's unweighted losses
(`sampling(..., loss_perturbations)`), reads the slope `dL/dl` of every term
from the data's backward pass, and weighs that term's sampled output gradient
by `√(N dL/dl)`. That is `√w` for weights alone (the Fisher
`(1/Σ w) Σ w F_n` of the weighted loss), 1 when `loss_fn` averages the
helpers' losses as they are, and `c` times the helper's Fisher for a factor `c`.

For the quadratic model of the adaptive `ekfac` (`LossModel`), the capture
runs `loss_fn` inside `marked_predictions(perturbations)`: every helper call
records its predictions (the model outputs the Gauss-Newton curvature is
taken at) and adds `perturbations[i]` to them, so that the loss's Hessian
with respect to the predictions is a derivative with respect to the
perturbations, whatever `loss_fn` does with the helpers' losses afterwards
(a scale, weights, a mask).
"""

import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass
class Sampling:
    """The labels to sample while a Monte-Carlo Fisher capture is active.

    Attributes:
        key: the `"rbg"` key of this forward pass; helper call 0 samples
            with it, call `i > 0` with `jax.random.fold_in(key, i)`.
        num_samples: `S`, label samples per loss term.
        losses: one `[S, ...]` array per helper call, in call order: the
            losses of the sampled labels, `S` times the helper's output shape.
    """

    key: jax.Array
    num_samples: int
    loss_perturbations: tuple[jax.Array, ...] | None = None
    losses: list[jax.Array] = dataclasses.field(default_factory=list)


_ACTIVE_SAMPLING: contextvars.ContextVar[Sampling | None] = contextvars.ContextVar(
    "optax_ekfac_sampling", default=None
)


@contextlib.contextmanager
def sampling(
    key: jax.Array,
    num_samples: int,
    loss_perturbations: tuple[jax.Array, ...] | None = None,
) -> Iterator[Sampling]:
    """Makes the loss helpers record losses of sampled labels.

    The labels are drawn with XLA's bit generator (`key`'s bits as an `"rbg"`
    key): on CPU, threefry compiles to a rolled loop of many kernels per
    draw, which dominated the capture's compile time; the bit generator
    compiles to one fused kernel.

    Args:
        key: a `jax.random` key (of any implementation).
        num_samples: label samples per loss term.
        loss_perturbations: one array per helper call, of its losses' shape,
            added to its losses before their weights (zeros: their cotangents
            are the slopes `dL/dl` of the loss `loss_fn` returns); None adds
            nothing.

    Yields:
        The `Sampling` whose `losses` the helpers called inside append to.

    Example:
        >>> from optax_ekfac._src.losses import sampling
        >>> logits = jnp.zeros((4, 3))
        >>> with sampling(jax.random.key(0), num_samples=2) as labels:
        ...     losses = optax_ekfac.softmax_cross_entropy(logits, jnp.arange(4) % 3)
        >>> [sampled.shape for sampled in labels.losses]
        [(2, 4)]
    """
    active = Sampling(_bit_generator_key(key), num_samples, loss_perturbations)
    token = _ACTIVE_SAMPLING.set(active)
    try:
        yield active
    finally:
        _ACTIVE_SAMPLING.reset(token)


def _bit_generator_key(key: jax.Array) -> jax.Array:
    """An `"rbg"` key made of `key`'s bits (a typed key of any implementation,
    or a raw `uint32` one), tiled to the 4 words it needs."""
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    words = jnp.asarray(key).reshape(-1).astype(jnp.uint32)
    # A threefry key has 2 words; their complements fill the other two, so
    # that the generator's two halves differ.
    words = jnp.concatenate([words, ~words])[:4]
    return jax.random.wrap_key_data(words, impl="rbg")


@dataclasses.dataclass
class Predictions:
    """The predictions of the loss helper calls while `marked_predictions` is
    active.

    Attributes:
        perturbations: added to the predictions of helper call `i`; None adds
            nothing.
        predictions: one array per helper call, in call order.
    """

    perturbations: tuple[jax.Array, ...] | None
    predictions: list[jax.Array] = dataclasses.field(default_factory=list)


_ACTIVE_PREDICTIONS: contextvars.ContextVar[Predictions | None] = (
    contextvars.ContextVar("optax_ekfac_predictions", default=None)
)


@contextlib.contextmanager
def marked_predictions(
    perturbations: tuple[jax.Array, ...] | None = None,
) -> Iterator[Predictions]:
    """Makes the loss helpers record their predictions (and perturb them).

    Args:
        perturbations: one array per helper call, added to its predictions;
            None to record only.

    Yields:
        The `Predictions` the helpers called inside append to.
    """
    active = Predictions(perturbations)
    token = _ACTIVE_PREDICTIONS.set(active)
    try:
        yield active
    finally:
        _ACTIVE_PREDICTIONS.reset(token)


_ACTIVE_WEIGHTS: contextvars.ContextVar[list[jax.Array] | None] = (
    contextvars.ContextVar("optax_ekfac_weights", default=None)
)


@contextlib.contextmanager
def recorded_weights() -> Iterator[list[jax.Array]]:
    """Makes the loss helpers record the `weights` they are given.

    Yields:
        The list the helpers called with `weights` append them to, in call
        order (as arrays of their losses' dtype).

    Example:
        >>> from optax_ekfac._src.losses import recorded_weights
        >>> logits, labels = jnp.zeros((2, 3)), jnp.array([0, 2])
        >>> with recorded_weights() as weights:
        ...     losses = optax_ekfac.softmax_cross_entropy(
        ...         logits, labels, weights=jnp.array([True, False]))
        >>> weights[0].tolist(), losses.tolist()[1]
        ([1.0, 0.0], 0.0)
    """
    active: list[jax.Array] = []
    token = _ACTIVE_WEIGHTS.set(active)
    try:
        yield active
    finally:
        _ACTIVE_WEIGHTS.reset(token)


def _term_weights(name: str, losses: jax.Array, weights) -> jax.Array | None:
    """`weights` checked against the losses' shape, in their dtype, recorded
    for the capture; None for none."""
    if weights is None:
        return None
    weights = jnp.asarray(weights)
    if weights.shape != losses.shape:
        raise ValueError(
            f"{name}: weights must have the losses' shape {losses.shape} (one "
            f"per loss term: the predictions' shape without the last axis); got "
            f"{weights.shape}."
        )
    if not (jnp.issubdtype(weights.dtype, jnp.number) or weights.dtype == bool):
        raise ValueError(
            f"{name}: weights must be numbers or bools, not {weights.dtype}."
        )
    weights = jax.lax.stop_gradient(weights.astype(losses.dtype))
    active = _ACTIVE_WEIGHTS.get()
    if active is not None:
        active.append(weights)
    return weights


def _weighted(
    name: str,
    predictions: jax.Array,
    losses: Callable[[jax.Array], jax.Array],
    sample: Callable[[jax.Array, jax.Array, int], jax.Array],
    negative_log_likelihood: Callable[[jax.Array, jax.Array], jax.Array],
    weights,
    invalid_terms: jax.Array | None = None,
    perturbed_losses: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """The helpers' common tail: marks the predictions, records sampled
    losses and returns `w * losses(marked predictions)` (the losses plus the
    sampling's loss perturbation, if any, before the weights).

    `perturbed_losses(predictions, perturbation)`, if given, replaces
    `losses(predictions + perturbation)` inside `marked_predictions`: the
    losses whose Hessian with respect to the perturbation the Gauss-Newton
    products take.

    `invalid_terms` (a bool per loss term, or None) marks terms whose labels
    have no loss: their losses are multiplied by NaN, so that the loss and
    the gradients are NaN, unless their weight is 0 (padding)."""
    predictions, perturbation = _marked_parts(predictions)
    if perturbation is None:
        result = losses(predictions)
    elif perturbed_losses is None:
        predictions = predictions + perturbation
        result = losses(predictions)
    else:
        result = perturbed_losses(predictions, perturbation)
    term_weights = _term_weights(name, result, weights)
    if invalid_terms is not None:
        if term_weights is not None:
            invalid_terms = invalid_terms & (term_weights != 0)
        # A factor, not a replaced value: the gradients are NaN too, so every
        # optimizer, not only the adaptive step, sees a non-finite step.
        result = result * jnp.where(invalid_terms, jnp.nan, 1).astype(result.dtype)
    loss_perturbation = _record_sampled_losses(
        predictions, sample, negative_log_likelihood
    )
    if loss_perturbation is not None:
        result = result + loss_perturbation
    return result if term_weights is None else term_weights * result


def _marked_parts(predictions: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """Inside `marked_predictions`: records `predictions`, returns them and
    their perturbation (None when it perturbs nothing); outside, returns
    `(predictions, None)`."""
    active = _ACTIVE_PREDICTIONS.get()
    if active is None:
        return predictions, None
    index = len(active.predictions)
    active.predictions.append(predictions)
    if active.perturbations is None:
        return predictions, None
    return predictions, active.perturbations[index]


def _record_sampled_losses(
    predictions: jax.Array,
    sample: Callable[[jax.Array, jax.Array, int], jax.Array],
    negative_log_likelihood: Callable[[jax.Array, jax.Array], jax.Array],
) -> jax.Array | None:
    """Inside `sampling`: records the losses of labels sampled from predictions.

    Args:
        predictions: the helper's predictions (differentiable).
        sample: `sample(key, distribution, num_samples)` -> `[S, ...]` labels,
            with `distribution` the predictions with gradients stopped.
        negative_log_likelihood: the helper's loss of one label array.

    Returns:
        This helper call's loss perturbation, or None.
    """
    active = _ACTIVE_SAMPLING.get()
    if active is None:
        return None
    index = len(active.losses)
    # The first call samples with the pass's key itself: a fold-in is a
    # threefry hash (the bit generator's fold-in too).
    key = active.key if index == 0 else jax.random.fold_in(active.key, index)
    labels = sample(key, jax.lax.stop_gradient(predictions), active.num_samples)
    sampled = jax.vmap(negative_log_likelihood, in_axes=(None, 0))(predictions, labels)
    active.losses.append(sampled)
    if active.loss_perturbations is None:
        return None
    return active.loss_perturbations[index]


def softmax_cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Categorical negative log-likelihood, one term per example.

    Args:
        logits: `[..., C]` unnormalized log-probabilities.
        labels: `[...]` integer class indices in `[0, C)` (a trailing axis
            of size 1, `[..., 1]`, is accepted too; bool counts as 0 and 1),
            or `[..., C]` one-hot (or any probability vectors). See
            `Out-of-range labels` below.
        weights: optional `[...]` weight of each loss term (a bool padding
            mask, or non-negative numbers): see `Weights` below.

    Returns:
        `[...]` per-example losses (times `weights`).

    Raises:
        ValueError: `labels` fit neither layout, e.g. floats of shape
            `logits.shape[:-1]` (class indices must be integers), or concrete
            (not traced) class indices outside `[0, C)` on a term whose weight
            is not 0.

    Out-of-range labels: an integer label below 0 or at least `C` is refused,
    never read as a class (a negative one is not counted from the end). Given
    concrete labels (outside `jax.jit`), the helper raises a ValueError
    naming `labels`; traced labels can't raise, so such a term's loss and
    its gradients are NaN, and `ekfac` skips the step as it skips any step
    with non-finite gradients. A term whose weight is 0 (padding) may carry
    any label: its loss is 0, as for every padded term.

    Under a Monte-Carlo Fisher capture it also records the losses of classes
    sampled from `softmax(logits)`.

    Weights: with `weights`, `Curvature` averages the returned losses as
    `Σ w l / Σ w` and counts `Σ w` loss terms (with a mask, the real ones),
    so padded terms add nothing to the loss, the gradients or either
    Fisher: the empirical Fisher's output gradients are those of `w l`, and
    the Monte-Carlo Fisher weighs each term's Fisher by `w` (for a mask
    both count the real terms alone). `loss_fn` must then return the
    weighted losses in their shape (added term by term to other helpers'
    losses only if those have the same weights).

    Example:
        >>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
        >>> optax_ekfac.softmax_cross_entropy(logits, jnp.array([0, 1])).shape
        (2,)
        >>> mask = jnp.array([True, False])
        >>> optax_ekfac.softmax_cross_entropy(
        ...     logits, jnp.array([0, 1]), weights=mask)[1].tolist()
        0.0
    """
    labels = _class_labels(logits, jnp.asarray(labels))
    invalid_terms = None
    if labels.ndim == logits.ndim:
        loss = optax.softmax_cross_entropy
    else:
        loss = optax.softmax_cross_entropy_with_integer_labels
        num_classes = logits.shape[-1]
        invalid_terms = (labels < 0) | (labels >= num_classes)
        _refuse_concrete_out_of_range(labels, num_classes, weights)
        # A valid index in their place: a gather out of range gives a NaN
        # loss but finite gradients, and a negative index counts from the end.
        labels = jnp.where(invalid_terms, 0, labels)
    return _weighted(
        "softmax_cross_entropy",
        logits,
        lambda logits: loss(logits, labels),
        lambda key, logits, num_samples: jax.random.categorical(
            key, logits, shape=(num_samples,) + logits.shape[:-1]
        ),
        optax.softmax_cross_entropy_with_integer_labels,
        weights,
        invalid_terms,
    )


def _refuse_concrete_out_of_range(labels: jax.Array, num_classes: int, weights) -> None:
    """Raises a ValueError for concrete class indices outside `[0, C)` on
    terms whose weight is not 0; traced ones are left to the NaN losses."""
    arrays = (labels,) if weights is None else (labels, weights)
    if any(
        isinstance(array, jax.core.Tracer)
        or not getattr(array, "is_fully_addressable", True)
        for array in arrays
    ):
        return
    values = np.asarray(labels)
    invalid = (values < 0) | (values >= num_classes)
    if weights is not None:
        if np.shape(weights) != invalid.shape:
            return  # refused by the weights' own check
        invalid = invalid & (np.asarray(weights) != 0)
    if not invalid.any():
        return
    positions = np.argwhere(invalid)
    shown = ", ".join(
        f"{values[tuple(p)]} at {tuple(int(i) for i in p)}" for p in positions[:3]
    )
    raise ValueError(
        f"softmax_cross_entropy: labels must be class indices in [0, "
        f"{num_classes}) for logits of {num_classes} classes; got {shown}"
        f"{' and more' if len(positions) > 3 else ''} ({len(positions)} "
        "labels out of range). Mask terms without a class with weights=0."
    )


def _class_labels(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """`labels` as `[...]` integer class indices or `[..., C]` probabilities.

    Raises a ValueError that says what to pass when they are neither.
    """
    is_integer = jnp.issubdtype(labels.dtype, jnp.integer) or labels.dtype == bool
    index_shape = logits.shape[:-1]
    looks_like_indices = labels.shape == index_shape or (
        # A column of class indices, as label files and `y[:, None]` give them.
        labels.shape == index_shape + (1,) and logits.shape[-1] > 1
    )
    if looks_like_indices and not is_integer:
        raise ValueError(
            f"softmax_cross_entropy: labels of shape {labels.shape} and dtype "
            f"{labels.dtype} are read as class indices for logits of shape "
            f"{logits.shape}, and class indices must be integers: pass "
            "labels.astype(jnp.int32), or one-hot labels (or probabilities) "
            f"of the logits' shape {logits.shape}."
        )
    if looks_like_indices:
        if labels.shape != index_shape:
            labels = labels[..., 0]
        return labels.astype(jnp.int32) if labels.dtype == bool else labels
    if labels.ndim == logits.ndim:
        _check_same_shape("softmax_cross_entropy", logits, labels)
        return labels.astype(logits.dtype) if labels.dtype == bool else labels
    raise ValueError(
        "softmax_cross_entropy: integer labels must have the shape of "
        f"logits without its class axis, {index_shape}; got {labels.shape}."
    )


def squared_error(
    predictions: jax.Array, targets: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Half the squared error summed over the last axis, one term per example.

    This is the negative log-likelihood of a unit-variance Gaussian up to a
    constant, so its Fisher with respect to the predictions is the identity.

    Args:
        predictions: `[..., D]` model outputs.
        targets: `[..., D]` regression targets.
        weights: optional `[...]` weight of each loss term, as for
            `softmax_cross_entropy`.

    Returns:
        `[...]` per-example losses (times `weights`).

    Under a Monte-Carlo Fisher capture it also records the losses of targets
    sampled from `N(predictions, I)`.

    Example:
        >>> losses = optax_ekfac.squared_error(jnp.ones((4, 3)), jnp.zeros((4, 3)))
        >>> losses.tolist()
        [1.5, 1.5, 1.5, 1.5]
    """
    _check_same_shape("squared_error", predictions, targets)
    return _weighted(
        "squared_error",
        predictions,
        lambda predictions: _gaussian_nll(predictions, targets),
        _sample_gaussian,
        _gaussian_nll,
        weights,
    )


def sigmoid_binary_cross_entropy(
    logits: jax.Array, labels: jax.Array, weights: jax.Array | None = None
) -> jax.Array:
    """Independent Bernoulli negative log-likelihood summed over the last axis.

    Args:
        logits: `[..., D]` log-odds (`D = 1` for one binary label).
        labels: `[..., D]` labels in `[0, 1]`.
        weights: optional `[...]` weight of each loss term, as for
            `softmax_cross_entropy`.

    Returns:
        `[...]` per-example losses (times `weights`).

    Under a Monte-Carlo Fisher capture it also records the losses of labels
    sampled from `Bernoulli(sigmoid(logits))`.

    Example:
        >>> logits, labels = jnp.zeros((2, 1)), jnp.ones((2, 1))
        >>> optax_ekfac.sigmoid_binary_cross_entropy(logits, labels).shape
        (2,)
    """
    _check_same_shape("sigmoid_binary_cross_entropy", logits, labels)
    return _weighted(
        "sigmoid_binary_cross_entropy",
        logits,
        lambda logits: _bernoulli_nll(logits, labels),
        _sample_bernoulli,
        _bernoulli_nll,
        weights,
    )


def per_example_loss(fn: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """Makes any loss of the model's outputs a loss the curvature understands.

    Wraps a loss function `fn(outputs, *args, **kwargs)`, e.g.
    `optax.huber_loss`, `optax.l2_loss`, `optax.sigmoid_binary_cross_entropy`,
    `optax.softmax_cross_entropy_with_integer_labels` or a user's own
    function, into a helper like `softmax_cross_entropy`: the returned
    `loss(outputs, *args, weights=None, **kwargs)` gives one loss per term
    and works with the Monte-Carlo Fisher (`Curvature(fisher_type="mc")`,
    the default where the losses come from such helpers), the empirical
    Fisher, per-term `weights`, and the adaptive `ekfac`'s Gauss-Newton
    products.

    The last axis of `outputs` is the event axis, as for the helpers. `fn`
    returns either one loss per output (the outputs' shape, like
    `optax.huber_loss`): these are taken as elementwise (output `i`'s loss
    depends on output `i` alone) and summed over the last axis; or one loss
    per term (the outputs' shape without the last axis, like
    `optax.softmax_cross_entropy`). A loss per output that couples outputs
    must be summed over the last axis by `fn` itself.

    The curvature is the Gauss-Newton matrix `Jᵀ H J` of the loss, `H` the
    Hessian of each term's loss with respect to its outputs, from autodiff,
    with its negative eigenvalues clipped to 0 (the Gauss-Newton matrix of a
    loss that is not convex in the outputs is then still positive
    semi-definite). The Monte-Carlo Fisher samples each term's output
    gradient as `L z`, `z ~ N(0, I)`, with `H = L Lᵀ` from an
    eigendecomposition, so its expectation is `H` (for a negative
    log-likelihood whose Hessian is its Fisher, as for the cross-entropies,
    this is that Fisher). An elementwise loss has a diagonal `H` (one
    Hessian-vector product); a per-term loss over `D` outputs takes `D`
    Hessian-vector products and a `D x D` eigendecomposition per term, so
    for a softmax over many classes `softmax_cross_entropy` is cheaper.

    Args:
        fn: `fn(outputs, *args, **kwargs)` -> losses of shape
            `outputs.shape` or `outputs.shape[:-1]`, differentiable twice in
            `outputs`.

    Returns:
        `loss(outputs, *args, weights=None, **kwargs)` -> `[...]` losses
        (`outputs.shape[:-1]`, times `weights`); `weights` as for
        `softmax_cross_entropy`.

    Raises:
        ValueError (when the returned loss is called): `outputs` has no
            event axis, or `fn` returns losses of another shape.

    Example:
        >>> huber = optax_ekfac.per_example_loss(optax.huber_loss)
        >>> huber(jnp.ones((4, 3)), jnp.zeros((4, 3))).shape
        (4,)
        >>> smoothed = optax_ekfac.per_example_loss(
        ...     lambda logits, labels: optax.softmax_cross_entropy(
        ...         logits, optax.smooth_labels(jax.nn.one_hot(labels, 3), 0.1)))
        >>> smoothed(jnp.zeros((2, 3)), jnp.array([0, 2])).shape
        (2,)
    """
    name = f"per_example_loss({_function_name(fn)})"

    def loss(
        outputs: jax.Array,
        *args: Any,
        weights: jax.Array | None = None,
        **kwargs: Any,
    ) -> jax.Array:
        outputs = jnp.asarray(outputs)
        if outputs.ndim < 2:
            raise ValueError(
                f"{name}: outputs need a batch axis and an event axis (the last "
                f"one); got shape {outputs.shape}. For one output per example "
                "use shape [N, 1]."
            )
        elementwise = _loss_layout(name, fn, outputs, args, kwargs)

        def term_losses(outputs: jax.Array) -> jax.Array:
            losses = jnp.asarray(fn(outputs, *args, **kwargs))
            return jnp.sum(losses, axis=-1) if elementwise else losses

        def factor(outputs: jax.Array) -> jax.Array:
            return _hessian_factor(term_losses, outputs, elementwise)

        def sample(key: jax.Array, outputs: jax.Array, num_samples: int):
            noise = _standard_normal(key, (num_samples,) + outputs.shape, outputs.dtype)
            return _factor_times(factor(outputs), noise, elementwise)

        def perturbed_losses(outputs: jax.Array, perturbation: jax.Array):
            # The second-order model of the losses at outputs + perturbation,
            # with the clipped Hessian: what the sampled Fisher estimates. In
            # the perturbation's dtype, as outputs + perturbation would be (a
            # bfloat16 model's losses in float32 for the step control).
            outputs = outputs.astype(jnp.result_type(outputs, perturbation))
            fixed = jax.lax.stop_gradient(outputs)
            gradient = jax.grad(lambda o: jnp.sum(term_losses(o)))(fixed)
            projected = _factor_transpose_times(
                jax.lax.stop_gradient(factor(fixed)), perturbation, elementwise
            )
            return (
                term_losses(outputs)
                + jnp.sum(jax.lax.stop_gradient(gradient) * perturbation, axis=-1)
                + jnp.sum(projected**2, axis=-1) / 2
            )

        return _weighted(
            name,
            outputs,
            term_losses,
            sample,
            _linear_in_outputs,
            weights,
            perturbed_losses=perturbed_losses,
        )

    loss.__name__ = loss.__qualname__ = name
    return loss


def _function_name(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def _loss_layout(name, fn, outputs, args, kwargs) -> bool:
    """Whether `fn` gives one loss per output (True) or per term (False);
    raises a ValueError for any other shape."""
    shape = jax.eval_shape(lambda o: fn(o, *args, **kwargs), outputs).shape
    if shape == outputs.shape:
        return True
    if shape == outputs.shape[:-1]:
        return False
    raise ValueError(
        f"{name}: the function must return one loss per output (shape "
        f"{outputs.shape}, summed over the last axis) or one per term (shape "
        f"{outputs.shape[:-1]}); for outputs of shape {outputs.shape} it "
        f"returned shape {shape}. Return unreduced losses."
    )


def _hessian_factor(
    term_losses: Callable[[jax.Array], jax.Array],
    outputs: jax.Array,
    elementwise: bool,
) -> jax.Array:
    """`L` with `L Lᵀ` each term's Hessian with respect to its outputs, its
    negative eigenvalues clipped to 0: `[..., D]` (the diagonal of `L`) for
    an elementwise loss, else `[..., D, D]`."""
    gradient = jax.grad(lambda o: jnp.sum(term_losses(o)))
    if elementwise:
        # A diagonal Hessian: its product with ones is its diagonal.
        diagonal = jax.jvp(gradient, (outputs,), (jnp.ones_like(outputs),))[1]
        return jnp.sqrt(jnp.maximum(diagonal, 0))

    def column(unit: jax.Array) -> jax.Array:
        # Terms don't share outputs: one product gives column j of every
        # term's Hessian.
        return jax.jvp(gradient, (outputs,), (jnp.zeros_like(outputs) + unit,))[1]

    columns = jax.vmap(column)(jnp.eye(outputs.shape[-1], dtype=outputs.dtype))
    hessians = jnp.moveaxis(columns, 0, -1)
    hessians = (hessians + jnp.swapaxes(hessians, -1, -2)) / 2
    # At least float32: there is no eigh of bfloat16 or float16.
    precise = hessians.astype(jnp.promote_types(hessians.dtype, jnp.float32))
    eigenvalues, eigenvectors = jnp.linalg.eigh(precise)
    factor = eigenvectors * jnp.sqrt(jnp.maximum(eigenvalues, 0))[..., None, :]
    return factor.astype(hessians.dtype)


def _factor_times(factor: jax.Array, vectors: jax.Array, elementwise: bool):
    """`L v` per term, for `vectors` `[S, ..., D]`."""
    if elementwise:
        return factor * vectors
    return jnp.sum(factor * vectors[..., None, :], axis=-1)


def _factor_transpose_times(factor: jax.Array, vectors: jax.Array, elementwise: bool):
    """`Lᵀ v` per term, for `vectors` `[..., D]`."""
    if elementwise:
        return factor * vectors
    return jnp.sum(factor * vectors[..., :, None], axis=-2)


def _standard_normal(key: jax.Array, shape: tuple[int, ...], dtype) -> jax.Array:
    """The noise `z ~ N(0, I)` that `per_example_loss` samples with."""
    return jax.random.normal(key, shape, dtype)


def _linear_in_outputs(outputs: jax.Array, output_gradients: jax.Array):
    """A sampled term of `per_example_loss`: its gradient with respect to
    the outputs is the sampled output gradient."""
    return jnp.sum(outputs * output_gradients, axis=-1)


def _gaussian_nll(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    return jnp.sum(optax.l2_loss(predictions, targets), axis=-1)


def _sample_gaussian(key: jax.Array, mean: jax.Array, num_samples: int) -> jax.Array:
    noise = jax.random.normal(key, (num_samples,) + mean.shape, mean.dtype)
    return mean + noise


def _bernoulli_nll(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


def _sample_bernoulli(key: jax.Array, logits: jax.Array, num_samples: int) -> jax.Array:
    labels = jax.random.bernoulli(
        key, jax.nn.sigmoid(logits), (num_samples,) + logits.shape
    )
    return labels.astype(logits.dtype)


def _check_same_shape(name: str, predictions: jax.Array, targets: jax.Array):
    if predictions.ndim < 2:
        raise ValueError(
            f"{name}: predictions need a batch axis and an event axis (the last "
            f"one); got shape {predictions.shape}. For one output per example "
            "use shape [N, 1]."
        )
    if predictions.shape != targets.shape:
        raise ValueError(
            f"{name}: predictions {predictions.shape} and targets "
            f"{targets.shape} must have the same shape."
        )
