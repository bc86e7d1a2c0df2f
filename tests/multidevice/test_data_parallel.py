"""Data parallelism on 4 fake CPU devices: a batch sharded over a "data" axis.

The model has a token embedding (scatter-added token counts), a Dense layer
shared over positions (exact scalings in chunks), a grouped convolution
(stacked blocks) and two Dense layers; everything is float64, so a sharded
step must match the single-device step to round-off.
"""

import contextlib
import functools
import math
import re
import warnings

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
import reference
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import optax_ekfac as oek
from optax_ekfac._src import sharding

NUM_DEVICES = 4
NUM_EXAMPLES = 16
NUM_STEPS = 3  # eigendecompositions at the first and the third
SETTINGS = dict(damping=1e-2, eigen_update_every=2, max_per_example_elements=60)


class Embed(nn.Embed):
    """`nn.Embed` whose lookup works on ids sharded under an explicit mesh.

    flax's `jnp.take` cannot tell the sharding of the gathered rows there;
    these keep the sharding of the ids.
    """

    def __call__(self, inputs):
        (embedding,) = self.promote_dtype(
            self.embedding, dtype=self.dtype, inexact=False
        )
        sharding = jax.typeof(inputs).sharding
        rows = NamedSharding(sharding.mesh, P(*sharding.spec, None))
        return embedding.at[inputs].get(out_sharding=rows)


class Net(nn.Module):
    @nn.compact
    def __call__(self, tokens, images):
        dense = functools.partial(nn.Dense, param_dtype=jnp.float64)
        embedded = Embed(11, 4, param_dtype=jnp.float64)(tokens)
        sequence = dense(5)(embedded)  # shared over 3 positions
        maps = nn.Conv(4, (3, 3), feature_group_count=2, param_dtype=jnp.float64)(
            images
        )
        hidden = jnp.concatenate([sequence.mean(1), maps.mean((1, 2))], -1)
        hidden = dense(8)(jnp.tanh(hidden))
        return dense(3)(jnp.tanh(hidden))


@pytest.fixture(scope="module")
def problem():
    model = Net()

    def batch(seed):
        keys = jax.random.split(jax.random.key(seed), 3)
        return (
            jax.random.randint(keys[0], (NUM_EXAMPLES, 3), 0, 11),
            jax.random.normal(keys[1], (NUM_EXAMPLES, 5, 5, 2), jnp.float64),
            jax.random.randint(keys[2], (NUM_EXAMPLES,), 0, 3),
        )

    batches = [batch(seed) for seed in range(NUM_STEPS)]
    tokens, images, _ = batches[0]
    params = model.init(jax.random.key(0), tokens[:1], images[:1])["params"]

    def loss_fn(params, tokens, images, labels):
        logits = model.apply({"params": params}, tokens, images)
        return oek.softmax_cross_entropy(logits, labels)

    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    layers = curvature.layers(params, *batches[0])
    assert not layers.fallback
    return dict(curvature=curvature, layers=layers, params=params, batches=batches)


def _step_fn(curvature, tx):
    def step(params, state, batch):
        _, grads, stats = curvature.value_grad_and_stats(params, *batch)
        updates, state = tx.update(grads, state, params, stats=stats)
        params = optax.apply_updates(params, jax.tree.map(lambda u: -0.1 * u, updates))
        return params, state, updates

    return step


def _mesh(axis_type):
    return jax.make_mesh((NUM_DEVICES,), ("data",), axis_types=(axis_type,))


def _place(problem, tx, mesh):
    """Params and state replicated, batches sharded over "data"."""
    params, batches = problem["params"], problem["batches"]
    if mesh is None:
        return params, tx.init(params), batches
    replicated = NamedSharding(mesh, P())
    params = jax.device_put(params, replicated)
    state = jax.device_put(tx.init(params), replicated)
    return params, state, jax.device_put(batches, NamedSharding(mesh, P("data")))


def _train(problem, mesh=None, **settings):
    """`(updates, state)` after each step."""
    tx = oek.scale_by_ekfac(problem["layers"], **SETTINGS, **settings)
    step = jax.jit(_step_fn(problem["curvature"], tx))
    history = []
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        params, state, batches = _place(problem, tx, mesh)
        for batch in batches:
            params, state, updates = step(params, state, batch)
            history.append(jax.device_get((updates, state)))
    return history


@pytest.fixture(scope="module")
def train(problem):
    """`_train` on a mesh of `axis_type` (None: one device), each run once."""
    runs = {}

    def train(axis_type=None, **settings):
        key = (axis_type, tuple(sorted(settings.items())))
        if key not in runs:
            mesh = None if axis_type is None else _mesh(axis_type)
            runs[key] = _train(problem, mesh, **settings)
        return runs[key]

    return train


@pytest.fixture(scope="module")
def single_device(train):
    return train()


def _assert_same_state(state, expected, atol=1e-10):
    """Equal states, eigenbases up to the sign of each eigenvector."""
    bases = ("input_eigenbasis", "output_eigenbasis")
    for name, block in state.blocks.items():
        expected_block = expected.blocks[name]
        for field in block._fields:
            value = getattr(block, field)
            expected_value = getattr(expected_block, field)
            if field not in bases:
                chex.assert_trees_all_close(value, expected_value, atol=atol, rtol=0)
            elif value is not None:
                stack = (-1,) + value.shape[-2:]  # groups of a grouped block
                for basis, expected_basis in zip(
                    value.reshape(stack), expected_value.reshape(stack)
                ):
                    reference.assert_same_basis(basis, expected_basis)
    chex.assert_trees_all_close(
        state._replace(blocks={}), expected._replace(blocks={}), atol=atol, rtol=0
    )


def _assert_same_history(history, expected):
    for (updates, state), (expected_updates, expected_state) in zip(
        history, expected, strict=True
    ):
        chex.assert_trees_all_close(updates, expected_updates, atol=1e-10, rtol=1e-8)
        _assert_same_state(state, expected_state)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_sharded_steps_equal_single_device_steps(train, single_device, axis_type):
    assert single_device[-1][1].count == NUM_STEPS
    _assert_same_history(train(axis_type), single_device)


def test_monte_carlo_fisher_sharded_equals_single_device(problem):
    """Two sampled labels per example: the same samples on every sharding."""
    curvature = oek.Curvature(
        problem["curvature"].loss_fn, fisher_type="mc", num_samples=2
    )
    tx = oek.scale_by_ekfac(problem["layers"], **SETTINGS)

    def step(params, state, batch, key):
        _, grads, stats = curvature.value_grad_and_stats(params, *batch, key=key)
        return tx.update(grads, state, params, stats=stats)

    key = jax.random.key(1)
    params, state, batches = _place(problem, tx, None)
    expected = jax.jit(step)(params, state, batches[0], key)
    for axis_type in (AxisType.Explicit, AxisType.Auto):
        mesh = _mesh(axis_type)
        with jax.set_mesh(mesh):
            params, state, batches = _place(problem, tx, mesh)
            got = jax.jit(step)(params, state, batches[0], key)
        _assert_same_history([jax.device_get(got)], [expected])


@pytest.fixture(scope="module")
def explicit_step(problem):
    """One step under an explicit mesh: its statistics, jaxpr, compiled HLO
    and outputs."""
    mesh = _mesh(AxisType.Explicit)
    tx = oek.scale_by_ekfac(problem["layers"], **SETTINGS)
    step = _step_fn(problem["curvature"], tx)
    with jax.set_mesh(mesh):
        params, state, batches = _place(problem, tx, mesh)
        args = (params, state, batches[0])
        _, _, stats = jax.eval_shape(
            problem["curvature"].value_grad_and_stats, params, *batches[0]
        )
        jaxpr = jax.make_jaxpr(step)(*args).jaxpr
        compiled = jax.jit(step).lower(*args).compile()
        outputs = compiled(*args)
    return dict(
        state=state, stats=stats, jaxpr=jaxpr, hlo=compiled.as_text(), outputs=outputs
    )


def test_statistics_stay_sharded_and_state_replicated(explicit_step):
    for calls in explicit_step["stats"].layers.values():
        for call in calls:
            # The perturbations' sharding: per-example output gradients stay
            # on the device of their example.
            assert call.output_grads.sharding.spec[0] == "data"
    _, new_state, _ = explicit_step["outputs"]
    for leaf in jax.tree.leaves(new_state):
        assert leaf.sharding.is_fully_replicated
    # No device ever gathers other devices' examples: only all-reduces.
    assert not re.search(r"all-gather|all-to-all", explicit_step["hlo"])


def test_distributed_eigh_equals_every_device_decomposing(train, single_device):
    every_device = train(AxisType.Explicit, distribute_eigh=False)
    _assert_same_history(every_device, single_device)
    distributed_eigh = train(AxisType.Explicit)  # the default
    _assert_same_history(distributed_eigh, every_device)


def test_blocked_factors_sharded_and_distributed_equal_single_device(train):
    """Block-diagonal factors (`max_factor_dim=2`: every wide side in blocks
    of 2 or 3, the Dense(5)'s padded) from the sharded batch's rows, their
    diagonal blocks decomposed as tasks spread over the devices, equal the
    single-device run."""
    single_device = train(max_factor_dim=2)
    _assert_same_history(train(AxisType.Explicit, max_factor_dim=2), single_device)
    state = single_device[-1][1]
    assert any(block.output_factor.ndim == 3 for block in state.blocks.values())


def _subjaxprs(eqn):
    for value in eqn.params.values():
        for item in value if isinstance(value, tuple | list) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def _eqns(jaxpr, primitive):
    """Every equation of `primitive` in `jaxpr` and in the jaxprs it calls."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == primitive:
            yield eqn
        for sub in _subjaxprs(eqn):
            yield from _eqns(sub, primitive)


def device_shares(jaxpr):
    """The shapes of the factors each device decomposes: the eigh calls of
    each branch of the one switch on the device index, inside the shard_map."""
    (shard_map,) = _eqns(jaxpr, "shard_map")
    (switch,) = [
        eqn
        for eqn in _eqns(shard_map.params["jaxpr"], "cond")
        if len(eqn.params["branches"]) == NUM_DEVICES
    ]
    return [
        sorted(eqn.invars[0].aval.shape for eqn in _eqns(branch.jaxpr, "eigh"))
        for branch in switch.params["branches"]
    ]


def _cost(shape):
    """`G d³` for `G` factors `d x d`."""
    return math.prod(shape[:-2]) * shape[-1] ** 3


def _hlo_eigh_shapes(hlo):
    """Per computation of a compiled HLO module, the shapes of its eigh calls,
    counting those of the computations it calls."""
    bodies, name = {}, None
    for line in hlo.splitlines():
        header = re.match(r"(?:ENTRY )?%([\w.\-]+) .*\{$", line)
        if header:
            name = header.group(1)
            bodies[name] = []
        elif name:
            bodies[name].append(line)

    @functools.cache
    def shapes(name):
        found = []
        for line in bodies[name]:
            eigh = re.search(
                r"= \(\w+\[([\d,]+)\].*custom_call_target=\"\w*(syevd|syev|eigh)", line
            )
            if eigh:
                found.append(tuple(int(d) for d in eigh.group(1).split(",")))
            for called in re.findall(
                r"(?:calls|to_apply|body|condition|branch_computations)="
                r"(\{[^}]*\}|%[\w.\-]+)",
                line,
            ):
                for callee in re.findall(r"%([\w.\-]+)", called):
                    found += shapes(callee)
        return tuple(sorted(found))

    return shapes


def test_each_device_decomposes_only_its_share(explicit_step):
    """The traced and the compiled step: one switch on the device index whose
    branches hold every factor's eigh exactly once, balanced by `G d³`."""
    jaxpr, compiled = explicit_step["jaxpr"], explicit_step["hlo"]
    factors = [
        factor.shape
        for block in explicit_step["state"].blocks.values()
        for factor in (block.input_factor, block.output_factor)
        if factor.ndim >= 2  # an embedding's input factor is its diagonal
    ]

    shares = device_shares(jaxpr)
    # Every factor is decomposed on exactly one device, and nothing else is.
    assert sorted(s for share in shares for s in share) == sorted(factors)
    assert len(list(_eqns(jaxpr, "eigh"))) == len(factors)
    # Greedy balance: every device got its last (smallest) factor while it
    # was the least loaded, so without it no device is above the least.
    loads = [sum(map(_cost, share)) for share in shares]
    assert all(share for share in shares)
    for share, load in zip(shares, loads):
        assert load - min(map(_cost, share)) <= min(loads), loads
    costs = [_cost(shape) for shape in factors]
    expected = sharding.balanced_assignment(costs, NUM_DEVICES)
    assert shares == [sorted(factors[i] for i in share) for share in expected]

    # The compiled program: the eigh calls sit in the branches of one
    # conditional (each device runs one branch), each call exactly once.
    hlo_shapes = _hlo_eigh_shapes(compiled)
    branch_sets = [
        re.findall(r"%([\w.\-]+)", branches)
        for branches in re.findall(r"branch_computations=\{([^}]*)\}", compiled)
    ]
    (device_branches,) = [b for b in branch_sets if len(b) == NUM_DEVICES]
    assert sorted(map(list, map(hlo_shapes, device_branches))) == sorted(shares)
    entry = re.search(r"ENTRY %([\w.\-]+)", compiled).group(1)
    assert sorted(hlo_shapes(entry)) == sorted(factors)
    assert len(re.findall(r"custom_call_target=\"\w*syevd", compiled)) == len(factors)


def test_plain_path_without_a_mesh_or_with_one_device(problem):
    tx = oek.scale_by_ekfac(problem["layers"], **SETTINGS)
    step = _step_fn(problem["curvature"], tx)
    params, state, batches = _place(problem, tx, None)
    one_device = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    for mesh in (None, one_device):
        with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
            jaxpr = jax.make_jaxpr(step)(params, state, batches[0]).jaxpr
        assert not list(_eqns(jaxpr, "shard_map"))
        assert list(_eqns(jaxpr, "eigh"))


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto])
def test_a_curvature_sample_takes_every_shards_share(problem, axis_type):
    """A bound of 8 examples on 4 devices: the first 2 of each shard of 4, the
    statistics of those examples; the loss and gradients the whole batch's."""
    loss_fn = problem["curvature"].loss_fn
    sampled = oek.Curvature(loss_fn, max_curvature_terms=8, fisher_type="empirical")
    whole = oek.Curvature(loss_fn, max_curvature_terms="all", fisher_type="empirical")
    batch = problem["batches"][0]
    params = problem["params"]
    rows = jnp.array([0, 1, 4, 5, 8, 9, 12, 13])
    loss, grads, _ = jax.jit(whole.value_grad_and_stats)(params, *batch)
    _, _, expected = jax.jit(whole.value_grad_and_stats)(
        params, *(leaf[rows] for leaf in batch)
    )
    mesh = _mesh(axis_type)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(batch, NamedSharding(mesh, P("data")))
        got_loss, got_grads, stats = jax.jit(sampled.value_grad_and_stats)(
            jax.device_put(params, NamedSharding(mesh, P())), *sharded
        )
    assert stats.num_terms == 8 and stats.num_batch_terms == NUM_EXAMPLES
    chex.assert_trees_all_close(
        (got_loss, got_grads), (loss, grads), atol=1e-12, rtol=1e-10
    )
    chex.assert_trees_all_close(
        jax.device_get(stats.layers), expected.layers, atol=1e-12, rtol=1e-10
    )


def test_donated_params_and_state(problem, single_device):
    mesh = _mesh(AxisType.Explicit)
    tx = oek.scale_by_ekfac(problem["layers"], **SETTINGS)
    step = jax.jit(_step_fn(problem["curvature"], tx), donate_argnums=(0, 1))
    history = []
    with jax.set_mesh(mesh), warnings.catch_warnings():
        # "Some donated buffers were not usable" would mean copies.
        warnings.simplefilter("error")
        params, state, batches = _place(problem, tx, mesh)
        for batch in batches:
            new_params, new_state, updates = step(params, state, batch)
            # The inputs' buffers were handed over to the outputs.
            assert all(leaf.is_deleted() for leaf in jax.tree.leaves((params, state)))
            params, state = new_params, new_state
            # Read copies: on CPU a host view of a buffer keeps it from being
            # donated (the runtime would copy it instead).
            history.append(jax.device_get(jax.tree.map(jnp.copy, (updates, state))))
    _assert_same_history(history, single_device)
