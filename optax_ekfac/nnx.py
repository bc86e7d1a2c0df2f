"""Capture for flax.nnx models: `optax_ekfac.nnx.Curvature`.

The public home of the flax.nnx capture; see `optax_ekfac.nnx.Curvature`.
"""

from optax_ekfac._src.nnx_capture import Curvature

__all__ = ["Curvature"]
