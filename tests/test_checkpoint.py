"""The state is a pytree of arrays: orbax saves and restores it, training resumed
from a checkpoint continues bit for bit, and runs are deterministic."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import orbax.checkpoint as ocp
import pytest

import optax_ekfac as oek

BATCH_SIZE = 8
STEPS = 7
SAVED_AFTER = 2  # the resumed run's steps hold eigen updates (every 3rd update)


class _Encoder(nn.Module):
    @nn.compact
    def __call__(self, h):
        return jnp.tanh(nn.Dense(6)(h))


class _Model(nn.Module):
    """Keys with "/" ("encoder/Dense_0", "norm/scale") and an embedding, whose
    input eigenbasis is None."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(13, 5, name="embed")(ids).mean(1)
        h = nn.LayerNorm(name="norm")(_Encoder(name="encoder")(h))
        return nn.Dense(4, name="head")(h)


@pytest.fixture(scope="module")
def training():
    """Data in a fixed order, a Monte-Carlo Fisher (so keys matter), a step."""
    model = _Model()
    ids = jax.random.randint(jax.random.key(0), (STEPS * BATCH_SIZE, 7), 0, 13)
    labels = jax.random.randint(jax.random.key(1), (STEPS * BATCH_SIZE,), 0, 4)
    params = model.init(jax.random.key(2), ids[:1])["params"]
    curvature = oek.Curvature(
        lambda p, ids, y: oek.softmax_cross_entropy(model.apply({"params": p}, ids), y),
        fisher_type="mc",
    )
    layers = curvature.layers(params, ids[:BATCH_SIZE], labels[:BATCH_SIZE])
    tx = oek.ekfac(
        layers, 0.05, momentum=0.9, damping=1e-2, eigen_update_every=3, decay=0.9
    )

    def make_step(base_key):
        @jax.jit
        def step(params, opt_state, index):
            start = index * BATCH_SIZE
            batch = [
                jax.lax.dynamic_slice_in_dim(array, start, BATCH_SIZE)
                for array in (ids, labels)
            ]
            key = jax.random.fold_in(base_key, index)
            loss, grads, stats = curvature.value_grad_and_stats(params, *batch, key=key)
            updates, opt_state = tx.update(grads, opt_state, params, stats=stats)
            return optax.apply_updates(params, updates), opt_state, loss

        return step

    def run(step, params, opt_state, indices):
        losses = []
        for index in indices:
            params, opt_state, loss = step(params, opt_state, index)
            losses.append(loss)
        return params, opt_state, losses

    return dict(
        params=params,
        tx=tx,
        make_step=make_step,
        step=make_step(jax.random.key(3)),
        run=run,
    )


def _trained(training, steps):
    params = training["params"]
    return training["run"](
        training["step"], params, training["tx"].init(params), range(steps)
    )


def test_the_state_is_a_pytree_of_arrays(training):
    _, opt_state, _ = _trained(training, SAVED_AFTER)
    state = opt_state[0]
    assert isinstance(state, oek.ScaleByEkfacState)
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(state))
    assert state.blocks["embed"].input_eigenbasis is None
    assert "encoder/Dense_0" in state.blocks and "norm/scale" in state.second_moments
    chex.assert_trees_all_equal_structs(
        state, jax.eval_shape(training["tx"].init, training["params"])[0]
    )


@pytest.mark.parametrize("use_ocdbt", [True, False])
def test_orbax_restores_the_state_exactly(training, tmp_path, use_ocdbt):
    params, opt_state, _ = _trained(training, SAVED_AFTER)
    saved = dict(params=params, opt_state=opt_state)
    abstract = dict(
        params=jax.eval_shape(lambda: params),
        opt_state=jax.eval_shape(training["tx"].init, params),
    )
    handler = ocp.StandardCheckpointHandler(use_ocdbt=use_ocdbt)
    with ocp.Checkpointer(handler) as checkpointer:
        checkpointer.save(tmp_path / "step", args=ocp.args.StandardSave(saved))
        restored = checkpointer.restore(
            tmp_path / "step", args=ocp.args.StandardRestore(abstract)
        )
    chex.assert_trees_all_equal_structs(restored, saved)
    chex.assert_trees_all_equal_dtypes(restored, saved)
    chex.assert_trees_all_equal(restored, saved)


def test_resumed_training_continues_bit_for_bit(training, tmp_path):
    uninterrupted = _trained(training, STEPS)

    params, opt_state, first_losses = _trained(training, SAVED_AFTER)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(tmp_path / "step", dict(params=params, opt_state=opt_state))
    # A new process: nothing but the checkpoint and a target of the same shape.
    abstract = dict(
        params=jax.eval_shape(lambda: training["params"]),
        opt_state=jax.eval_shape(training["tx"].init, training["params"]),
    )
    with ocp.StandardCheckpointer() as checkpointer:
        restored = checkpointer.restore(tmp_path / "step", abstract)
    resumed = training["run"](
        training["step"],
        restored["params"],
        restored["opt_state"],
        range(SAVED_AFTER, STEPS),
    )
    assert int(resumed[1][0].count) == STEPS
    chex.assert_trees_all_equal(
        (resumed[0], resumed[1], first_losses + resumed[2]), uninterrupted
    )


def test_the_same_inputs_and_keys_give_the_same_run(training):
    # Two compilations of the same step, from the same keys: bitwise equal.
    first = _trained(training, 4)
    again = training["run"](
        training["make_step"](jax.random.key(3)),
        training["params"],
        training["tx"].init(training["params"]),
        range(4),
    )
    chex.assert_trees_all_equal(again, first)
    # ... and the keys matter: the Monte-Carlo labels change with them.
    other_keys = training["run"](
        training["make_step"](jax.random.key(4)),
        training["params"],
        training["tx"].init(training["params"]),
        range(4),
    )
    with pytest.raises(AssertionError):
        chex.assert_trees_all_equal(other_keys[1], first[1])
