"""The statistics of a batch: what the capture records, and `scale_by_ekfac` takes.

`LayerStats` are one layer call's inputs and per-example output gradients;
`Statistics` gather them per block with the batch's counts (`N`, `S`) and its
`LossModel`. This module sits below the layer kinds and the optimizer, so that
neither depends on the capture that makes them (`capture.py`).
"""

from typing import NamedTuple

import jax

from optax_ekfac._src.loss_model import LossModel


class LayerStats(NamedTuple):
    """What one call of a layer contributes to its block's statistics.

    Attributes:
        inputs: the layer input as the layer saw it, `[N, ...]` (token ids
            for an embedding lookup).
        output_grads: per-example output gradients `dl_n/dy_n`, the shape of
            the layer output `[N, ...]`.

    A stacked block's (`Block.stack`, a scanned layer's) carry the stack's
    axes first: `[L, N, ...]`.
    """

    inputs: jax.Array
    output_grads: jax.Array


class Statistics(NamedTuple):
    """The statistics of one batch, as `scale_by_ekfac` takes them.

    The curvature is that of the loss `loss_fn` defines, the mean over its
    `N` loss terms: the output-gradient factors and the scalings sum over the
    rows and divide by `N` (times `S` label samples for the Monte-Carlo
    Fisher), not by the number of examples. A `[B, T]` token loss and the
    same model written on `[B * T]` rows get the same factors.

    Attributes:
        layers: block name -> one `LayerStats` per call of that block, in call
            order (a module called twice has two entries).
        num_terms: `N`, the number of loss terms the batch loss averages;
            with weighted losses (the helpers' `weights`), their sum (a
            mask's real terms), an array.
        num_samples: `S`, the label samples per loss term whose output
            gradients the rows hold (`fisher_type="mc"`); 1 for the empirical
            Fisher.
        loss_model: the batch's loss as a function of the parameters, for the
            adaptive `ekfac`'s step control (exact curvature products and the
            loss at other parameters); None where the statistics were made
            by hand. With the curvature from a sample of the batch, the
            sample's loss.
        num_batch_terms: the loss terms of the whole batch, which the
            gradient averages, where the statistics come from a sample of the
            batch (`Curvature`'s `max_curvature_terms`); None where they cover
            the whole batch (`num_terms`).
    """

    layers: dict[str, tuple[LayerStats, ...]]
    num_terms: int | jax.Array
    num_samples: int = 1
    loss_model: LossModel | None = None
    num_batch_terms: int | jax.Array | None = None

    @property
    def num_sampled_terms(self) -> int | jax.Array:
        """`S * N`: what the sums over the rows' output gradients divide by."""
        return self.num_terms * self.num_samples

    @property
    def gradient_terms(self) -> int | jax.Array:
        """The loss terms the gradient averages: the whole batch's."""
        return self.num_terms if self.num_batch_terms is None else self.num_batch_terms
