"""Per-example losses, unreduced, for `Curvature` loss functions.

`Curvature` averages the losses a `loss_fn` returns and scales the captured
output gradients by their number, so every helper here returns one loss term
per leading index and never reduces over examples. The last axis of
`predictions` is the event axis: the outputs of one example form one loss term
(a regression with one output therefore has predictions of shape `[N, 1]`).

Each helper is the negative log-likelihood of a distribution (categorical,
unit-variance Gaussian, independent Bernoulli), which is what makes the
empirical Fisher of these losses a Fisher.

For the Monte-Carlo Fisher (`Curvature(..., fisher_type="mc")`) the capture
runs `loss_fn` inside `sampling(key, num_samples)`. While that context is
active, every helper call also samples labels from its own predictive
distribution (whose parameters are `stop_gradient`-ed, so that only the loss,
not the sampling, is differentiated) and records the negative log-likelihood
of those labels. The helper still returns the loss of the true labels: the
sampled losses reach the capture through the context only.

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
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import optax


@dataclasses.dataclass
class Sampling:
    """The labels to sample while a Monte-Carlo Fisher capture is active.

    Attributes:
        key: the `jax.random` key of this forward pass; helper call `i` samples
            with `jax.random.fold_in(key, i)`.
        num_samples: `S`, label samples per loss term.
        losses: one `[S, ...]` array per helper call, in call order: the
            losses of the sampled labels, `S` times the helper's output shape.
    """

    key: jax.Array
    num_samples: int
    losses: list[jax.Array] = dataclasses.field(default_factory=list)


_ACTIVE_SAMPLING: contextvars.ContextVar[Sampling | None] = contextvars.ContextVar(
    "optax_ekfac_sampling", default=None
)


@contextlib.contextmanager
def sampling(key: jax.Array, num_samples: int) -> Iterator[Sampling]:
    """Makes the loss helpers record losses of sampled labels.

    Args:
        key: a `jax.random` key.
        num_samples: label samples per loss term.

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
    active = Sampling(key, num_samples)
    token = _ACTIVE_SAMPLING.set(active)
    try:
        yield active
    finally:
        _ACTIVE_SAMPLING.reset(token)


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


def _marked(predictions: jax.Array) -> jax.Array:
    """Inside `marked_predictions`: records `predictions`, returns them
    perturbed; outside, returns them as they are."""
    active = _ACTIVE_PREDICTIONS.get()
    if active is None:
        return predictions
    index = len(active.predictions)
    active.predictions.append(predictions)
    if active.perturbations is None:
        return predictions
    return predictions + active.perturbations[index]


def _record_sampled_losses(
    predictions: jax.Array,
    sample: Callable[[jax.Array, jax.Array, int], jax.Array],
    negative_log_likelihood: Callable[[jax.Array, jax.Array], jax.Array],
) -> None:
    """Inside `sampling`: records the losses of labels sampled from predictions.

    Args:
        predictions: the helper's predictions (differentiable).
        sample: `sample(key, distribution, num_samples)` -> `[S, ...]` labels,
            with `distribution` the predictions with gradients stopped.
        negative_log_likelihood: the helper's loss of one label array.
    """
    active = _ACTIVE_SAMPLING.get()
    if active is None:
        return
    key = jax.random.fold_in(active.key, len(active.losses))
    labels = sample(key, jax.lax.stop_gradient(predictions), active.num_samples)
    active.losses.append(
        jax.vmap(negative_log_likelihood, in_axes=(None, 0))(predictions, labels)
    )


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Categorical negative log-likelihood, one term per example.

    Args:
        logits: `[..., C]` unnormalized log-probabilities.
        labels: `[...]` integer class indices (a trailing axis of size 1,
            `[..., 1]`, is accepted too; bool counts as 0 and 1), or `[..., C]`
            one-hot (or any probability vectors).

    Returns:
        `[...]` per-example losses.

    Raises:
        ValueError: `labels` fit neither layout, e.g. floats of shape
            `logits.shape[:-1]` (class indices must be integers).

    Under a Monte-Carlo Fisher capture it also records the losses of classes
    sampled from `softmax(logits)`.

    Example:
        >>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
        >>> optax_ekfac.softmax_cross_entropy(logits, jnp.array([0, 1])).shape
        (2,)
    """
    labels = _class_labels(logits, jnp.asarray(labels))
    logits = _marked(logits)
    if labels.ndim == logits.ndim:
        losses = optax.softmax_cross_entropy(logits, labels)
    else:
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    _record_sampled_losses(
        logits,
        lambda key, logits, num_samples: jax.random.categorical(
            key, logits, shape=(num_samples,) + logits.shape[:-1]
        ),
        optax.softmax_cross_entropy_with_integer_labels,
    )
    return losses


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


def squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Half the squared error summed over the last axis, one term per example.

    This is the negative log-likelihood of a unit-variance Gaussian up to a
    constant, so its Fisher with respect to the predictions is the identity.

    Args:
        predictions: `[..., D]` model outputs.
        targets: `[..., D]` regression targets.

    Returns:
        `[...]` per-example losses.

    Under a Monte-Carlo Fisher capture it also records the losses of targets
    sampled from `N(predictions, I)`.

    Example:
        >>> losses = optax_ekfac.squared_error(jnp.ones((4, 3)), jnp.zeros((4, 3)))
        >>> losses.tolist()
        [1.5, 1.5, 1.5, 1.5]
    """
    _check_same_shape("squared_error", predictions, targets)
    predictions = _marked(predictions)
    _record_sampled_losses(predictions, _sample_gaussian, _gaussian_nll)
    return _gaussian_nll(predictions, targets)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Independent Bernoulli negative log-likelihood summed over the last axis.

    Args:
        logits: `[..., D]` log-odds (`D = 1` for one binary label).
        labels: `[..., D]` labels in `[0, 1]`.

    Returns:
        `[...]` per-example losses.

    Under a Monte-Carlo Fisher capture it also records the losses of labels
    sampled from `Bernoulli(sigmoid(logits))`.

    Example:
        >>> logits, labels = jnp.zeros((2, 1)), jnp.ones((2, 1))
        >>> optax_ekfac.sigmoid_binary_cross_entropy(logits, labels).shape
        (2,)
    """
    _check_same_shape("sigmoid_binary_cross_entropy", logits, labels)
    logits = _marked(logits)
    _record_sampled_losses(logits, _sample_bernoulli, _bernoulli_nll)
    return _bernoulli_nll(logits, labels)


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
