"""The settings of `scale_by_ekfac`, `ekfac` and `ekfac_sgd`, with their
defaults, in one place.

The public functions spell every setting out as a keyword argument (for
users, docs and `optax.inject_hyperparams`, which reads signatures); their
defaults are read from here, their bodies collect them with
`preconditioner_options`, and tests/test_signatures.py checks that the
signatures and these fields agree.
"""

import dataclasses
from typing import Any, Literal

import jax

Scalings = Literal["exact", "per_position"]
WeightSharing = Literal["expand", "reduce"]

_DEFAULT_MAX_PER_EXAMPLE_ELEMENTS = 2**22
# Chosen by benchmarks/studies/factor_blocks.py (see benchmarks/README.md).
_DEFAULT_MAX_FACTOR_DIM = 1024


@dataclasses.dataclass(frozen=True)
class Options:
    """`scale_by_ekfac`'s keyword arguments (documented there); the defaults
    of `scale_by_ekfac` and `ekfac` are this class's."""

    damping: float | jax.Array = 1e-3
    decay: float = 0.95
    eigen_update_every: int = 10
    stats_update_every: int = 1
    eigenvalue_correction: bool = True
    scalings: Scalings = "exact"
    weight_sharing: WeightSharing = "expand"
    max_per_example_elements: int | None = None
    max_factor_dim: int | None = None
    factor_dtype: Any = None
    eigh_dtype: Any = None
    distribute_eigh: bool = True
    axis_name: str = "data"

    @property
    def refresh_decay(self) -> Any:
        """Decay per refresh: refreshes `k` updates apart decay by `decay**k`."""
        return self.decay**self.stats_update_every

    @property
    def exact_scalings(self) -> bool:
        return self.scalings == "exact"

    @property
    def reduce_positions(self) -> bool:
        return self.weight_sharing == "reduce"

    @property
    def max_elements(self) -> int:
        """`max_per_example_elements`, its default filled in."""
        if self.max_per_example_elements is None:
            return _DEFAULT_MAX_PER_EXAMPLE_ELEMENTS
        return int(self.max_per_example_elements)

    @property
    def factor_dim_limit(self) -> int:
        """`max_factor_dim`, its default filled in."""
        if self.max_factor_dim is None:
            return _DEFAULT_MAX_FACTOR_DIM
        return int(self.max_factor_dim)


DEFAULTS = Options()
PRECONDITIONER_OPTIONS = tuple(field.name for field in dataclasses.fields(Options))


def preconditioner_options(arguments: dict[str, Any]) -> dict[str, Any]:
    """The `scale_by_ekfac` settings among a function's `arguments` (its
    `locals()`), by name: every `Options` field but `damping`, which each
    optimizer sets its own way."""
    return {
        name: arguments[name] for name in PRECONDITIONER_OPTIONS if name != "damping"
    }


@dataclasses.dataclass(frozen=True)
class Adaptation:
    """The adaptive `ekfac`'s step-control settings (documented there); None
    for `momentum` or `damping` adapts it. `weight_decay` and `mask` are
    `ekfac_sgd`'s too."""

    momentum: float | None = None
    damping: float | jax.Array | None = None
    initial_damping: float = 1e-3
    min_damping: float = 1e-4
    max_damping: float = 1e4
    damping_decay: float = 0.9
    damping_adaptation_interval: int = 1
    max_momentum: float = 0.99
    weight_decay: float = 0.0
    mask: Any = None


ADAPTATION = Adaptation()


@dataclasses.dataclass(frozen=True)
class FixedRate:
    """`ekfac_sgd`'s settings besides the learning rate and the
    preconditioner's (documented there)."""

    momentum: float | None = None
    nesterov: bool = False
    damping: float | jax.Array = 1e-3
    weight_decay: float = 0.0
    mask: Any = None
    norm_constraint: float | None = 1e-4


FIXED_RATE = FixedRate()
