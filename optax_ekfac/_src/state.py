"""The optimizer state of `scale_by_ekfac`: arrays only, a checkpointable pytree."""

from typing import NamedTuple

import jax


class BlockState(NamedTuple):
    """The curvature of one block.

    A grouped convolution stacks its groups on a leading axis of every field;
    a stacked block (`Block.stack`, e.g. `L` layers under `nn.scan`) has the
    stack's axes before those.

    A side of `d` coordinates with `d - 1 > max_factor_dim` is
    block-diagonal: its factor and its eigenbasis are
    `k = ceil((d - 1) / max_factor_dim)` diagonal blocks of one size
    `b = ceil(d / k)`, `(k, b, b)` (after any group and stack axes), the
    coordinates in order (block `i` holds `i b` to `(i + 1) b - 1`) and the
    last block padded with `k b - d` coordinates: zero rows and
    columns in the factor, the last basis vectors of the last block (the unit
    vectors of those coordinates) in the eigenbasis. The scalings keep the
    real shape: the first `d` of the `k b` basis vectors are the real ones.

    Attributes:
        input_factor: `A`, `(input_dim, input_dim)` or blocked `(k, b, b)`;
            for an embedding the diagonal of `A`, `(input_dim,)`.
        output_factor: `B`, `(output_dim, output_dim)` or blocked `(k, b, b)`.
        input_eigenbasis: `U_A`, eigenvectors of `A` in its columns (of each
            diagonal block's, blocked), the shape of `A`; None for an
            embedding (the identity).
        output_eigenbasis: `U_B`, eigenvectors of `B` in its columns, the
            shape of `B`.
        scalings: `S`, `(input_dim, output_dim)`: the curvature along each
            pair of eigenvectors, before damping.
    """

    input_factor: jax.Array
    output_factor: jax.Array
    input_eigenbasis: jax.Array | None
    output_eigenbasis: jax.Array
    scalings: jax.Array


class ScaleByEkfacState(NamedTuple):
    """State of `scale_by_ekfac`: arrays only, so it checkpoints as a pytree.

    `orbax.checkpoint` saves and restores it (restore into
    `jax.eval_shape(tx.init, params)`); an embedding's `input_eigenbasis` is
    None, which orbax keeps as an empty subtree.

    Attributes:
        count: updates applied so far; a skipped step (non-finite gradients or
            statistics) does not count, so the amortization schedule and the
            bias correction continue as if it never happened.
        stats_count: statistics refreshes so far (bias correction of the
            factors and of `second_moments`).
        scalings_count: scalings refreshes since the eigenbases last changed.
        skipped_steps: steps skipped so far because their gradients or
            statistics held a NaN or an infinity.
        blocks: block name -> `BlockState`.
        second_moments: fallback parameter path (joined with "/") -> running
            average of `N g²`.
    """

    count: jax.Array  # type: ignore[assignment]  # shadows tuple.count
    stats_count: jax.Array
    scalings_count: jax.Array
    skipped_steps: jax.Array
    blocks: dict[str, BlockState]
    second_moments: dict[str, jax.Array]
