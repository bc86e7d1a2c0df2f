"""Diagnostics of the curvature: `optax_ekfac.diagnostics`.

Dense views of a block's Fisher and of its K-FAC and EKFAC approximations,
per-example gradients, the gradient's variance and the Frobenius distances
between them, for checking the curvature against brute force or watching it
during training. The top-level names (`optax_ekfac.fisher_block`, ...) are the
same functions.
"""

from optax_ekfac._src.diagnostics import (
    BlockDistances,
    ekfac_block,
    fisher_block,
    frobenius_distances,
    gradient_variance,
    kfac_block,
    per_example_gradients,
)

__all__ = [
    "BlockDistances",
    "ekfac_block",
    "fisher_block",
    "frobenius_distances",
    "gradient_variance",
    "kfac_block",
    "per_example_gradients",
]
