"""Per-example losses, unreduced, for `Curvature` loss functions.

`Curvature` averages the losses a `loss_fn` returns and scales the captured
output gradients by their number, so every helper here returns one loss term
per leading index and never reduces over examples. The last axis of
`predictions` is the event axis: the outputs of one example form one loss term
(a regression with one output therefore has predictions of shape `[N, 1]`).

Each helper is the negative log-likelihood of a distribution (categorical,
unit-variance Gaussian, independent Bernoulli), which is what makes the
empirical Fisher of these losses a Fisher.
"""

import jax
import jax.numpy as jnp
import optax


def softmax_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Categorical negative log-likelihood, one term per example.

    Args:
        logits: `[..., C]` unnormalized log-probabilities.
        labels: `[...]` integer class indices, or `[..., C]` one-hot (or any
            probability vectors).

    Returns:
        `[...]` per-example losses.

    Example:
        >>> logits = jnp.array([[2.0, 0.0], [0.0, 1.0]])
        >>> softmax_cross_entropy(logits, jnp.array([0, 1])).shape
        (2,)
    """
    if labels.ndim == logits.ndim:
        _check_same_shape("softmax_cross_entropy", logits, labels)
        return optax.softmax_cross_entropy(logits, labels)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            "softmax_cross_entropy: integer labels must have the shape of "
            f"logits without its class axis, {logits.shape[:-1]}; got "
            f"{labels.shape}."
        )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def squared_error(predictions: jax.Array, targets: jax.Array) -> jax.Array:
    """Half the squared error summed over the last axis, one term per example.

    This is the negative log-likelihood of a unit-variance Gaussian up to a
    constant, so its Fisher with respect to the predictions is the identity.

    Args:
        predictions: `[..., D]` model outputs.
        targets: `[..., D]` regression targets.

    Returns:
        `[...]` per-example losses.

    Example:
        >>> squared_error(jnp.ones((4, 3)), jnp.zeros((4, 3)))
        Array([1.5, 1.5, 1.5, 1.5], dtype=float32)
    """
    _check_same_shape("squared_error", predictions, targets)
    return jnp.sum(optax.l2_loss(predictions, targets), axis=-1)


def sigmoid_binary_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Independent Bernoulli negative log-likelihood summed over the last axis.

    Args:
        logits: `[..., D]` log-odds (`D = 1` for one binary label).
        labels: `[..., D]` labels in `[0, 1]`.

    Returns:
        `[...]` per-example losses.

    Example:
        >>> sigmoid_binary_cross_entropy(jnp.zeros((2, 1)), jnp.ones((2, 1))).shape
        (2,)
    """
    _check_same_shape("sigmoid_binary_cross_entropy", logits, labels)
    return jnp.sum(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)


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
