"""The loss of one batch around the current parameters, for step control.

`Curvature.value_grad_and_stats` puts a `LossModel` in the statistics: the
parameters, the batch and the mean loss there, with the function that
computes the losses. From it the adaptive `ekfac` (`step_control.py`) gets,
without a change to the training loop:

* exact curvature products `v_iᵀ G v_j` of a few update directions, `G` the
  Gauss-Newton matrix of the mean loss, `G = Jᵀ H J`: `J v` is a tangent of
  the loss helpers' predictions (one `jax.linearize`, evaluated at each
  direction) and `H` the Hessian of the mean loss with respect to those
  predictions (forward-over-reverse through what `loss_fn` does after them);
* the mean loss on the same batch at other parameters (the reduction ratio of
  the Levenberg-Marquardt damping).

Both are float32 at least whatever the model's dtype: the helpers' losses
of a bfloat16 or float16 model are computed from its predictions promoted
to float32, so that neither the products nor the losses are rounded to the
model's dtype (the model itself runs as written).

`H` is taken from the loss `loss_fn` actually returns, so a scale, weights or
a mask applied to the helpers' losses are part of it; the predictions are
those of this library's loss helpers (`softmax_cross_entropy`,
`squared_error`, `sigmoid_binary_cross_entropy`, and any loss wrapped with
`per_example_loss`, whose Hessian at the predictions has its negative
eigenvalues clipped to 0), which mark them.
"""

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import optax

from optax_ekfac._src.losses import marked_predictions


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["params", "batch", "loss"],
    meta_fields=["losses_fn"],
)
@dataclasses.dataclass(frozen=True)
class LossModel:
    """The mean loss of one batch as a function of the parameters.

    Attributes:
        params: the parameters the statistics were computed at.
        batch: the arguments `loss_fn` takes after the parameters.
        loss: the mean loss at `params`.
        losses_fn: `losses_fn(params, batch)` -> the unreduced losses.
    """

    params: optax.Params
    batch: tuple[Any, ...]
    loss: jax.Array
    losses_fn: Callable[[optax.Params, tuple[Any, ...]], jax.Array]

    def loss_at(self, params: optax.Params) -> jax.Array:
        """The mean loss of the batch at `params`: one forward pass.

        The model runs as written (in its parameters' dtype); the loss
        helpers take its predictions in float32 at least (zero perturbations
        of that dtype promote them), and the mean is taken in float32 at
        least. A bfloat16 model's loss is then not rounded to bfloat16: two
        nearby parameter sets can show a change of the loss far below
        bfloat16's resolution of about 0.4% of it.

        Returns:
            The mean loss, a scalar in float32 at least.
        """
        with marked_predictions(self._widening(params)):
            losses = self.losses_fn(params, self.batch)
        return jnp.mean(losses.astype(_wide(losses.dtype)))

    def _predictions(self, params: optax.Params) -> tuple[jax.Array, ...]:
        """The predictions of the loss helpers that `losses_fn` calls."""
        with marked_predictions() as marked:
            self.losses_fn(params, self.batch)
        return tuple(marked.predictions)

    def _widening(self, params: optax.Params) -> tuple[jax.Array, ...] | None:
        """Zero perturbations that promote predictions narrower than float32
        to float32; None where all are float32 or wider (nothing to do)."""
        shapes = jax.eval_shape(self._predictions, params)
        if all(_wide(shape.dtype) == shape.dtype for shape in shapes):
            return None
        return tuple(jnp.zeros(shape.shape, _wide(shape.dtype)) for shape in shapes)

    def curvature_products(self, vectors: Sequence[optax.Updates]) -> jax.Array:
        """`[k, k]` matrix of `v_iᵀ G v_j`, `G` the Gauss-Newton matrix.

        Args:
            vectors: `k` trees shaped like `params`.

        Returns:
            The symmetric `[k, k]` matrix, in the predictions' dtype promoted
            to float32 at least.
        """

        outputs, output_jvp = jax.linearize(self._predictions, self.params)
        if not outputs:
            raise ValueError(
                "ekfac: the adaptive step needs the loss's curvature with respect "
                "to the model's outputs, and loss_fn called none of the loss "
                "helpers that mark them (optax_ekfac.softmax_cross_entropy, "
                "squared_error, sigmoid_binary_cross_entropy). Compute the "
                "losses with them, wrap your own loss of the outputs with "
                "optax_ekfac.per_example_loss (e.g. per_example_loss("
                "optax.huber_loss)), or pass ekfac a learning_rate (and "
                "damping)."
            )
        # One call per direction, not a vmap over them: vmapped, the tangents
        # of the parameters make every matmul a batched one, which XLA's CPU
        # backend runs slower than separate calls.
        # In float32 at least: the Hessian of a bfloat16 model's loss, taken
        # at its predictions promoted (as `loss_at` does), and the products'
        # sums over examples.
        per_direction = [
            tuple(part.astype(_wide(part.dtype)) for part in output_jvp(vector))
            for vector in vectors
        ]

        def mean_loss(perturbations):
            with marked_predictions(perturbations):
                return jnp.mean(self.losses_fn(self.params, self.batch))

        zeros = tuple(
            jnp.zeros(output.shape, _wide(output.dtype)) for output in outputs
        )

        def hessian_product(tangent):
            return jax.jvp(jax.grad(mean_loss), (zeros,), (tangent,))[1]

        # Per helper call, stacked over the directions: [k, ...outputs]. The
        # Hessian products are vmapped: they batch no parameter, and the
        # forward pass to the predictions that `mean_loss` runs is done once.
        tangents = tuple(jnp.stack(parts) for parts in zip(*per_direction))
        hessian_tangents = jax.vmap(hessian_product)(tangents)
        # Products and sums, not a matmul: the outputs' example axis may be
        # sharded, and a sum over it is an all-reduce JAX knows how to shard.
        products = jnp.zeros((len(vectors), len(vectors)), jnp.result_type(*zeros))
        for tangent, hessian_tangent in zip(tangents, hessian_tangents):
            pairwise = tangent[:, None] * hessian_tangent[None, :]
            products += pairwise.sum(tuple(range(2, pairwise.ndim)))
        return (products + products.T) / 2


def _wide(dtype: Any) -> Any:
    """`dtype` promoted to float32 at least (float64 stays)."""
    return jnp.promote_types(dtype, jnp.float32)
