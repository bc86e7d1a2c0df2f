"""The plumbing around the optimizers: partial application, TrainState,
gradient accumulation, chain order and wrappers.

Pinned here, on a token model `Embed -> Dense -> tanh -> Dense` in float64:

* `optax.multi_transform` / `optax.masked` with EKFAC on the Dense layers and
  Adam on the embedding: each part's updates are those of the same optimizer
  run on the whole model (blocks are independent), the adaptive `ekfac`'s
  those of its full-model update whose gradient leaves the embedding alone;
  a block split by the mask is refused;
* `optax_ekfac.TrainState` steps as `tx.update` does; flax's `TrainState`
  given `stats=` is refused with an error naming the cause;
* `optax_ekfac.accumulated`: `k` micro-batches give the loss, gradients,
  statistics, `scale_by_ekfac` state and adaptive update of one batch of
  `k·n` (with a padding mask, so the micro-batches have different numbers of
  real terms); the Monte-Carlo statistics are sample-major over the batch;
  `optax.MultiSteps` is refused;
* the recommended chains: clipping before `scale_by_ekfac` scales the step as
  it scales the gradient, decoupled weight decay between it and `sgd` is
  `-lr (P g + wd θ)`, a learning-rate schedule, `apply_if_finite` around the
  chain, decoupled weight decay after the adaptive `ekfac`;
* `optax.lookahead`: refused with the way around, which works (`with_stats`).
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state
from token_model import IDS, MASK, MODEL, PARAMS, TARGETS, masked_loss_fn

import optax_ekfac as oek

BATCH = (IDS, TARGETS, MASK)


CURVATURE = oek.Curvature(masked_loss_fn, fisher_type="empirical")
LAYERS = CURVATURE.layers(PARAMS, *BATCH)
LABELS = {name: "adam" if name == "Embed_0" else "ekfac" for name in PARAMS}
statistics = jax.jit(CURVATURE.value_grad_and_stats)
# Shared by several tests: one compilation of each update.
PRECONDITIONER = oek.scale_by_ekfac(LAYERS)
ADAPTIVE = oek.ekfac(LAYERS)


@functools.cache
def stepped(tx):
    """`tx.update(..., stats=...)`, jitted (once per `tx`)."""
    return jax.jit(lambda g, s, p, stats: tx.update(g, s, p, stats=stats))


def by_label(label, tree):
    return {name: tree[name] for name in tree if LABELS[name] == label}


# --- partial application --------------------------------------------------------


def test_multi_transform_runs_each_optimizer_on_its_parameters():
    """EKFAC on the Dense layers, Adam on the embedding: three steps, each
    part's updates equal to its optimizer's on the whole model."""
    ekfac = optax.chain(oek.scale_by_ekfac(LAYERS), optax.sgd(0.1, momentum=0.9))
    adam = optax.adam(1e-2)
    tx = optax.multi_transform({"ekfac": ekfac, "adam": adam}, LABELS)
    step, ekfac_step, adam_step = stepped(tx), stepped(ekfac), stepped(adam)
    state, ekfac_state, adam_state = (
        tx.init(PARAMS),
        ekfac.init(PARAMS),
        adam.init(PARAMS),
    )
    params = PARAMS
    for _ in range(3):
        _, grads, stats = statistics(params, *BATCH)
        updates, state = step(grads, state, params, stats)
        ekfac_updates, ekfac_state = ekfac_step(grads, ekfac_state, params, stats)
        adam_updates, adam_state = adam_step(grads, adam_state, params, stats)
        expected = by_label("ekfac", ekfac_updates) | by_label("adam", adam_updates)
        chex.assert_trees_all_close(updates, expected, rtol=1e-10, atol=1e-14)
        params = optax.apply_updates(params, updates)
    inner = state.inner_states["ekfac"].inner_state[0]
    assert set(inner.blocks) == {"Dense_0", "Dense_1"}


def test_masked_preconditions_the_blocks_it_receives():
    mask = {name: label == "ekfac" for name, label in LABELS.items()}
    tx = optax.masked(oek.scale_by_ekfac(LAYERS), mask)
    full = PRECONDITIONER
    _, grads, stats = statistics(PARAMS, *BATCH)
    updates, _ = stepped(tx)(grads, tx.init(PARAMS), PARAMS, stats)
    expected, _ = stepped(full)(grads, full.init(PARAMS), PARAMS, stats)
    chex.assert_trees_all_close(
        updates, by_label("ekfac", expected) | by_label("adam", grads), rtol=1e-12
    )


def test_adaptive_ekfac_under_multi_transform_moves_its_parameters_only():
    """Its quadratic model and reduction ratio are those of the full-model
    adaptive `ekfac` given a gradient that leaves the embedding alone."""
    tx = optax.multi_transform(
        {"ekfac": oek.ekfac(LAYERS), "adam": optax.adam(1e-2)}, LABELS
    )
    full = ADAPTIVE
    state, full_state = tx.init(PARAMS), full.init(PARAMS)
    step, full_step = stepped(tx), stepped(full)
    params = PARAMS
    for _ in range(2):
        _, grads, stats = statistics(params, *BATCH)
        updates, state = step(grads, state, params, stats)
        only_dense = grads | {"Embed_0": jax.tree.map(jnp.zeros_like, grads["Embed_0"])}
        full_updates, full_state = full_step(only_dense, full_state, params, stats)
        chex.assert_trees_all_close(
            by_label("ekfac", updates), by_label("ekfac", full_updates), rtol=1e-9
        )
        adapted = state.inner_states["ekfac"].inner_state
        for field in ("damping", "learning_rate", "momentum", "reduction_ratio"):
            np.testing.assert_allclose(
                getattr(adapted, field), getattr(full_state, field), rtol=1e-9
            )
        params = optax.apply_updates(params, updates)
    assert int(adapted.rejected_steps) == 0


def test_a_block_split_by_the_mask_is_refused():
    mask = {name: name != "Embed_0" for name in PARAMS}
    mask["Dense_0"] = {"kernel": True, "bias": False}
    tx = optax.masked(oek.scale_by_ekfac(LAYERS), mask)
    with pytest.raises(ValueError, match=r"Dense_0.*\['Dense_0/bias'\]"):
        tx.init(PARAMS)


# --- TrainState -------------------------------------------------------------------


def test_train_state_passes_the_statistics():
    tx = oek.ekfac(LAYERS, learning_rate=0.1, momentum=0.9)
    state = oek.TrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=tx)
    apply = jax.jit(lambda state, g, stats: state.apply_gradients(grads=g, stats=stats))
    params, opt_state = PARAMS, tx.init(PARAMS)
    for _ in range(2):
        _, grads, stats = statistics(state.params, *BATCH)
        state = apply(state, grads, stats)
        updates, opt_state = stepped(tx)(grads, opt_state, params, stats)
        params = optax.apply_updates(params, updates)
    assert int(state.step) == 2
    chex.assert_trees_all_close(state.params, params, rtol=1e-12)
    assert state.tx is tx


def test_flax_train_state_with_stats_names_the_cause():
    tx = oek.ekfac(LAYERS, learning_rate=0.1)
    state = train_state.TrainState.create(apply_fn=MODEL.apply, params=PARAMS, tx=tx)
    _, grads, stats = statistics(PARAMS, *BATCH)
    with pytest.raises(
        ValueError, match="hands stats to .replace.*optax_ekfac.TrainState"
    ):
        state.apply_gradients(grads=grads, stats=stats)


# --- gradient accumulation ------------------------------------------------------


def test_micro_batches_give_the_whole_batch():
    """Two micro-batches (9 and 6 real tokens) against one batch: loss,
    gradients, statistics, the `scale_by_ekfac` state after one update, the
    loss model, and the adaptive `ekfac`'s update."""
    loss, grads, stats = statistics(PARAMS, *BATCH)
    accumulated = jax.jit(oek.accumulated(CURVATURE, 2))
    micro_loss, micro_grads, micro_stats = accumulated(PARAMS, *BATCH)
    np.testing.assert_allclose(micro_loss, loss, rtol=1e-12)
    chex.assert_trees_all_close(micro_grads, grads, rtol=1e-10)
    chex.assert_trees_all_close(micro_stats.layers, stats.layers, rtol=1e-12)
    assert int(micro_stats.num_terms) == int(stats.num_terms) == 15
    for tx in (PRECONDITIONER, ADAPTIVE):
        updates, state = stepped(tx)(grads, tx.init(PARAMS), PARAMS, stats)
        micro_updates, micro_state = stepped(tx)(
            micro_grads, tx.init(PARAMS), PARAMS, micro_stats
        )
        chex.assert_trees_all_close(micro_updates, updates, rtol=1e-8, atol=1e-12)
        chex.assert_trees_all_close(micro_state, state, rtol=1e-8, atol=1e-12)


def test_monte_carlo_micro_batches_are_sample_major():
    curvature = oek.Curvature(masked_loss_fn, fisher_type="mc", num_samples=2)
    key = jax.random.key(7)
    _, _, stats = jax.jit(oek.accumulated(curvature, 2))(PARAMS, *BATCH, key=key)
    micro_statistics = jax.jit(curvature.value_grad_and_stats)
    parts = [
        micro_statistics(
            PARAMS, *(leaf[2 * i : 2 * i + 2] for leaf in BATCH), key=micro_key
        )[2]
        for i, micro_key in enumerate(jax.random.split(key, 2))
    ]
    for name, (call,) in stats.layers.items():
        for field in ("inputs", "output_grads"):
            per_sample = [
                getattr(part.layers[name][0], field).reshape(2, 2, *IDS.shape[1:], -1)
                for part in parts
            ]
            expected = jnp.concatenate(per_sample, axis=1).reshape(
                getattr(call, field).shape
            )
            np.testing.assert_array_equal(getattr(call, field), expected)


def test_multi_steps_is_refused_with_the_helper_named():
    tx = optax.MultiSteps(oek.ekfac(LAYERS, learning_rate=0.1), every_k_schedule=2)
    _, grads, stats = statistics(PARAMS, *BATCH)
    with pytest.raises(ValueError, match="MultiSteps.*optax_ekfac.accumulated"):
        tx.update(grads, tx.init(PARAMS), PARAMS, stats=stats)


# --- chain order ------------------------------------------------------------------


@pytest.fixture(scope="module")
def first_batch():
    _, grads, stats = statistics(PARAMS, *BATCH)
    directions, _ = stepped(PRECONDITIONER)(
        grads, PRECONDITIONER.init(PARAMS), PARAMS, stats
    )
    return grads, stats, directions


def test_clipping_before_the_preconditioner_scales_the_step(first_batch):
    grads, stats, directions = first_batch
    max_norm = 0.5 * float(optax.tree.norm(grads))
    tx = optax.chain(
        optax.clip_by_global_norm(max_norm), oek.scale_by_ekfac(LAYERS), optax.sgd(0.1)
    )
    updates, _ = stepped(tx)(grads, tx.init(PARAMS), PARAMS, stats)
    expected = jax.tree.map(lambda d: -0.1 * 0.5 * d, directions)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10)


def test_decoupled_weight_decay_between_the_preconditioner_and_sgd(first_batch):
    grads, stats, directions = first_batch
    tx = optax.chain(
        oek.scale_by_ekfac(LAYERS), optax.add_decayed_weights(1e-2), optax.sgd(0.1)
    )
    updates, _ = stepped(tx)(grads, tx.init(PARAMS), PARAMS, stats)
    expected = jax.tree.map(lambda d, p: -0.1 * (d + 1e-2 * p), directions, PARAMS)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10)


def test_a_learning_rate_schedule_and_apply_if_finite(first_batch):
    grads, stats, directions = first_batch
    # Values exact in float32, the schedule's dtype.
    schedule = optax.linear_schedule(0.25, 0.125, transition_steps=1)
    tx = optax.apply_if_finite(oek.ekfac(LAYERS, learning_rate=schedule), 3)
    step = stepped(tx)
    state = tx.init(PARAMS)
    updates, state = step(grads, state, PARAMS, stats)
    chex.assert_trees_all_close(
        updates, jax.tree.map(lambda d: -0.25 * d, directions), rtol=1e-10
    )
    nan_grads = jax.tree.map(lambda g: g * jnp.nan, grads)
    updates, state = step(nan_grads, state, PARAMS, stats)
    assert int(state.total_notfinite) == 1
    assert all(jnp.all(u == 0) for u in jax.tree.leaves(updates))
    updates, state = step(grads, state, PARAMS, stats)
    assert int(state.inner_state[0].count) == 2  # the NaN step left no trace
    assert float(optax.tree.norm(updates)) > 0


def test_decoupled_weight_decay_after_the_adaptive_ekfac():
    _, grads, stats = statistics(PARAMS, *BATCH)
    tx = optax.chain(ADAPTIVE, optax.add_decayed_weights(-1e-3))
    updates, _ = stepped(tx)(grads, tx.init(PARAMS), PARAMS, stats)
    step, _ = stepped(ADAPTIVE)(grads, ADAPTIVE.init(PARAMS), PARAMS, stats)
    expected = jax.tree.map(lambda u, p: u - 1e-3 * p, step, PARAMS)
    chex.assert_trees_all_close(updates, expected, rtol=1e-10)


# --- wrappers that drop extra arguments ---------------------------------------


def test_lookahead_is_refused_and_with_stats_is_the_way_around(first_batch):
    grads, stats, directions = first_batch
    tx = oek.ekfac(LAYERS, learning_rate=0.1)
    lookahead_params = optax.LookaheadParams.init_synced(PARAMS)
    lookahead = optax.lookahead(tx, sync_period=2, slow_step_size=0.5)
    state = lookahead.init(lookahead_params)
    with pytest.raises(ValueError, match="lookahead.*optax_ekfac.with_stats"):
        lookahead.update(grads, state, lookahead_params)

    @jax.jit
    def update(grads, state, params, stats):
        bound = optax.lookahead(
            oek.with_stats(tx, stats), sync_period=2, slow_step_size=0.5
        )
        return bound.update(grads, state, params)

    updates, state = update(grads, state, lookahead_params, stats)
    chex.assert_trees_all_close(
        updates.fast, jax.tree.map(lambda d: -0.1 * d, directions), rtol=1e-10
    )
