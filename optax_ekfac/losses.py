"""Per-example losses the curvature understands: `optax_ekfac.losses`.

The library's helpers (`softmax_cross_entropy`, `squared_error`,
`sigmoid_binary_cross_entropy`) and `per_example_loss`, which makes any loss
of the model's outputs (`optax.huber_loss`, a user's own function) one of
them. The same names are exported by `optax_ekfac` itself.
"""

from optax_ekfac._src.losses import (
    per_example_loss,
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
    squared_error,
)

__all__ = [
    "per_example_loss",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
]
