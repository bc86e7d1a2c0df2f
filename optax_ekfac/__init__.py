"""optax_ekfac: EKFAC preconditioning for Flax models as optax transformations."""

from optax_ekfac import diagnostics, losses, nnx
from optax_ekfac._src.accumulation import accumulated
from optax_ekfac._src.blocks import Block, Layers
from optax_ekfac._src.capture import Curvature, curvature_terms
from optax_ekfac._src.curvature import precondition, relative_damping_floor
from optax_ekfac._src.diagnostics import (
    BlockDistances,
    ekfac_block,
    fisher_block,
    frobenius_distances,
    gradient_variance,
    kfac_block,
    per_example_gradients,
)
from optax_ekfac._src.kinds import CallShape, CallSite, LayerKind, register_kind
from optax_ekfac._src.loss_model import LossModel
from optax_ekfac._src.losses import (
    per_example_loss,
    sigmoid_binary_cross_entropy,
    softmax_cross_entropy,
    squared_error,
)
from optax_ekfac._src.state import BlockState, ScaleByEkfacState
from optax_ekfac._src.statistics import LayerStats, Statistics
from optax_ekfac._src.step_control import EkfacState
from optax_ekfac._src.train_state import TrainState, with_stats
from optax_ekfac._src.transform import ekfac, ekfac_sgd, scale_by_ekfac

__version__ = "0.1.0"

__all__ = [
    "Block",
    "BlockDistances",
    "BlockState",
    "CallShape",
    "CallSite",
    "Curvature",
    "EkfacState",
    "LayerKind",
    "LayerStats",
    "Layers",
    "LossModel",
    "ScaleByEkfacState",
    "Statistics",
    "TrainState",
    "accumulated",
    "curvature_terms",
    "ekfac",
    "diagnostics",
    "ekfac_block",
    "ekfac_sgd",
    "fisher_block",
    "frobenius_distances",
    "gradient_variance",
    "kfac_block",
    "losses",
    "nnx",
    "per_example_gradients",
    "per_example_loss",
    "register_kind",
    "precondition",
    "relative_damping_floor",
    "scale_by_ekfac",
    "sigmoid_binary_cross_entropy",
    "softmax_cross_entropy",
    "squared_error",
    "with_stats",
]
