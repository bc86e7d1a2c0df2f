"""Sharding: sums over a sharded example axis, and work spread over a mesh axis.

With the batch sharded along the example axis under an explicit mesh, JAX
asks where a contraction over that axis, a reshape of a sharded array or a
scatter into a replicated table should put its result: `sum_over_examples`,
`reshape_keeping`, `sharding_of` and `example_shards` say so.

Work spread over the devices of a mesh axis: each device computes its share.
With the batch sharded over a mesh axis of `D` devices (data parallelism),
every device holds the same factors, and by default every device would repeat
every eigendecomposition. `map_over_axis` instead gives each device about
`1/D` of them, balanced by cost (greedy: the costliest first, each to the
least loaded device), and shares the results:

    shard_map over the axis
      lax.switch(axis_index)          branch k: its share, zeros for the rest
      psum over the axis              every device gets every result

Only the branch of a device runs on that device, so the work is split; the
`psum` adds each result to zeros, which is exact. It needs the mesh in the
ambient context (`jax.set_mesh`), read when the step is traced; without one,
or with an axis of one device, it is the plain list comprehension.
"""

import heapq
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp


def axis_size(axis_name: str) -> int:
    """Devices along `axis_name` of the ambient mesh that `map_over_axis` can use.

    1 without a mesh (`jax.set_mesh`), without that axis, or where the axis is
    already manual (inside the caller's own `shard_map`, where each device
    holds its own values and computes its own results).
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or axis_name not in mesh.axis_names:
        return 1
    if axis_name in mesh.manual_axes:
        return 1
    return mesh.shape[axis_name]


def balanced_assignment(
    costs: Sequence[float], num_devices: int
) -> tuple[tuple[int, ...], ...]:
    """Which tasks each device computes: greedy longest-processing-time.

    The costliest task first, each to the least loaded device (ties to the
    lowest index), so loads differ by at most the largest single cost.

    Args:
        costs: the cost of each task.
        num_devices: how many devices share them.

    Returns:
        Per device, the indices of its tasks in increasing order.
    """
    loads = [(0.0, device) for device in range(num_devices)]
    shares: list[list[int]] = [[] for _ in range(num_devices)]
    for task in sorted(range(len(costs)), key=lambda task: -costs[task]):
        load, device = heapq.heappop(loads)
        shares[device].append(task)
        heapq.heappush(loads, (load + costs[task], device))
    return tuple(tuple(sorted(share)) for share in shares)


def map_over_axis(
    fn: Callable[[jax.Array], Any],
    operands: Sequence[jax.Array],
    costs: Sequence[float],
    axis_name: str,
) -> list[Any]:
    """`[fn(x) for x in operands]`, each device of `axis_name` computing a share.

    The operands must be the same on every device (replicated), as the
    results are. The mesh comes from the context (`jax.set_mesh`); without
    one, or with one device on the axis, it is the plain comprehension.

    Args:
        fn: maps one operand to a pytree of arrays.
        operands: the inputs, replicated.
        costs: the cost of `fn` on each operand, to balance the shares.
        axis_name: the mesh axis whose devices share the work.

    Returns:
        The results in the order of `operands`, replicated.
    """
    num_devices = axis_size(axis_name)
    if num_devices == 1 or not operands:
        return [fn(operand) for operand in operands]
    shares = balanced_assignment(costs, num_devices)
    result_shapes = [jax.eval_shape(fn, operand) for operand in operands]

    def branch(share):
        def compute_share(operands):
            return [
                fn(operand)
                if index in share
                else jax.tree.map(
                    lambda shape: jnp.zeros(shape.shape, shape.dtype),
                    result_shapes[index],
                )
                for index, operand in enumerate(operands)
            ]

        return compute_share

    def shared(operands):
        own = jax.lax.switch(
            jax.lax.axis_index(axis_name), [branch(s) for s in shares], operands
        )
        # Every result is nonzero on one device only: the sum is that result.
        return jax.lax.psum(own, axis_name)

    replicated = jax.sharding.PartitionSpec()
    return jax.shard_map(
        shared,
        in_specs=(replicated,),
        out_specs=replicated,
        axis_names={axis_name},
    )(list(operands))


def sum_over_examples(
    subscripts: str, *operands: jax.Array, precision: Any = None
) -> jax.Array:
    """`jnp.einsum` of rows that sums over the examples (and positions).

    With the batch sharded along the example axis under an explicit mesh, JAX
    asks where a contraction over that axis should go: the sum over the
    global batch is replicated, like the state it joins (an all-reduce).
    `precision` is `jnp.einsum`'s.
    """
    replicated = jax.sharding.NamedSharding(
        jax.sharding.get_abstract_mesh(), jax.sharding.PartitionSpec()
    )
    return jnp.einsum(
        subscripts, *operands, out_sharding=replicated, precision=precision
    )


def sharding_of(array: jax.Array) -> jax.sharding.NamedSharding:
    """The sharding in `array`'s type (replicated for a fresh `jnp.zeros`).

    Scatter-adds of batch rows (sharded along the example axis under an
    explicit mesh) into a replicated table need it as `out_sharding`: JAX
    does not guess whether the result should be sharded or reduced.
    """
    return jax.typeof(array).sharding


def example_shards(rows: jax.Array, axis_name: str) -> int:
    """Into how many shards the example axis (axis 0) of `rows` is split.

    An explicit mesh says so in the type. An auto one (GSPMD) does not: with
    `axis_name` in the ambient mesh, the batch is taken to be split over it,
    as data parallelism does (a wrong guess only reorders the chunks).
    """
    num_examples = rows.shape[0]
    num_shards = num_examples // jax.typeof(rows).sharding.shard_shape(rows.shape)[0]
    mesh = jax.sharding.get_abstract_mesh()
    if (
        num_shards == 1
        and axis_name in mesh.axis_names
        and axis_name in mesh.auto_axes
        and num_examples % mesh.shape[axis_name] == 0
    ):
        num_shards = mesh.shape[axis_name]
    return num_shards


def reshape_keeping(
    array: jax.Array, shape: Sequence[int], num_kept: int = 1
) -> jax.Array:
    """`array.reshape(shape)` whose first `num_kept` axes stay as they are.

    They keep their sharding (the example axis of a batch sharded under an
    explicit mesh) and the reshaped feature axes are unsharded: JAX does not
    infer that for every reshape (it refuses `[N, H, W, G * O]` to
    `[N, H * W, G, O]`, say). No constraint is added for non-explicit axes.
    """
    sharding = jax.typeof(array).sharding
    kept = jax.sharding.PartitionSpec(*tuple(sharding.spec)[:num_kept])
    out_sharding = jax.sharding.NamedSharding(sharding.mesh, kept)
    return jnp.reshape(array, shape, out_sharding=out_sharding)


def leading_examples(array: jax.Array, num_examples: int, num_shards: int) -> jax.Array:
    """The first `num_examples / num_shards` examples of each of the
    `num_shards` equal shards of axis 0: every device's share of a sample,
    taken where it lies (a local slice when the axis is sharded so)."""
    if num_shards == 1:
        return array[:num_examples]
    per_shard = array.shape[0] // num_shards
    spec = tuple(jax.typeof(array).sharding.spec) + (None,) * array.ndim
    mesh = jax.typeof(array).sharding.mesh
    by_shard = jnp.reshape(
        array,
        (num_shards, per_shard) + array.shape[1:],
        out_sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(spec[0], None, *spec[1 : array.ndim])
        ),
    )
    taken = by_shard[:, : num_examples // num_shards]
    return jnp.reshape(
        taken,
        (num_examples,) + array.shape[1:],
        out_sharding=jax.sharding.NamedSharding(
            mesh, jax.sharding.PartitionSpec(*spec[: array.ndim])
        ),
    )
