"""Smoke test: the benchmarks' running, reporting and storage, end to end, tiny.

Not a timing test: it checks that `benchmarks/` still fits the library (one
trace per optimizer across its sweep, the numbers and files it reports), so
the benchmark code does not rot between full runs.
"""

import dataclasses
import json

import flax.linen as nn
import jax
import numpy as np
import pytest

import optax_ekfac as oek
from benchmarks import (
    autoencoder,
    cost,
    kfac_jax,
    mlp,
    records,
    reporting,
    running,
    specs,
    storage,
)


@pytest.fixture(scope="module")
def small_problem():
    """The digits MLP benchmark's problem with a narrow model and small batches."""
    full = mlp.problem(batch_size=32)
    model = mlp.MLP(hidden=(16,))

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    params = model.init(jax.random.key(0), full.train[0][:1])["params"]
    return specs.Problem(
        name="smoke",
        title="smoke MLP",
        loss_fn=loss_fn,
        params=params,
        train=full.train,
        test=full.test,
        batch_size=32,
        target_loss=2.0,
        eval_size=256,
    )


def test_compare_runs_every_optimizer_with_one_trace(small_problem, tmp_path):
    optimizers = [
        specs.ekfac(
            [
                {"learning_rate": 1e-3, "damping": 1e-2},
                {"learning_rate": 3e-3, "damping": 1e-2},
            ],
            eigen_update_every=2,
        ),
        specs.adam([1e-2]),
    ]
    settings = specs.Settings(steps=6, warmup_steps=2, eval_every=3)
    comparison = running.compare(
        small_problem, optimizers, settings, log=lambda _: None
    )

    ekfac = comparison.optimizers["EKFAC"]
    assert ekfac.traces == 1  # one compiled step serves the whole sweep
    assert len(ekfac.runs) == 2
    run = ekfac.runs[0]
    assert len(run.step_seconds) == 6
    assert run.curve.step == (0, 3, 6)
    assert np.isfinite(run.final_train_loss)
    assert run.final_train_loss < run.curve.train_loss[0]
    assert ekfac.memory.peak_bytes > 0
    summary = comparison.summary
    assert summary["Adam"].median_step_ratio_to_adam == pytest.approx(1.0)
    assert summary["EKFAC"].median_step_ratio_to_adam > 0

    target = reporting.time_to_target(comparison)
    assert target.status in ("MET", "MISSED", "NOT MEASURABLE")
    result = records.BenchmarkResult("smoke", comparison, targets=(target,))
    paths = storage.save(result, tmp_path, log=lambda _: None)
    assert sorted(p.name for p in paths) == ["smoke.json", "smoke.png"]
    saved = json.loads((tmp_path / "smoke.json").read_text())
    assert saved["summary"]["EKFAC"]["traces"] == 1
    assert saved["optimizers"]["EKFAC"]["runs"][0]["curve"]["step"] == [0, 3, 6]
    assert saved["targets"][0]["status"] == target.status


def test_flop_model_counts_the_issue_terms():
    class TwoLayers(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3)(nn.Dense(4)(x))

    x = np.ones((5, 2), np.float32)
    model = TwoLayers()
    params = model.init(jax.random.key(0), x)["params"]

    def loss_fn(params, x, targets):
        return oek.squared_error(model.apply({"params": params}, x), targets)

    layers = oek.Curvature(loss_fn).layers(params, x, np.zeros((5, 3), np.float32))
    flops = cost.flop_model(layers, 5, stats_update_every=2, eigen_update_every=4)
    blocks = [(3, 4), (5, 3)]  # (d_in + 1, d_out)
    assert flops["forward_backward"] == sum(6 * 5 * i * o for i, o in blocks)
    assert flops["factors"] == sum(5 * (i * i + o * o) / 2 for i, o in blocks)
    assert flops["scalings"] == flops["factors"]
    assert flops["eigh"] == sum(9 * (i**3 + o**3) / 4 for i, o in blocks)
    assert flops["preconditioning"] == sum(4 * i * o * (i + o) for i, o in blocks)
    counted = cost.flop_model(
        layers, 5, stats_update_every=2, eigen_update_every=4, counted=True
    )
    assert counted["factors"] == 2 * flops["factors"]
    assert counted["scalings"] == 2 * flops["scalings"] + sum(
        2 * 5 * i * o / 2 for i, o in blocks
    )
    assert flops["ekfac"] == pytest.approx(
        sum(
            flops[k]
            for k in (
                "forward_backward",
                "factors",
                "scalings",
                "eigh",
                "preconditioning",
            )
        )
    )


@pytest.fixture(scope="module")
def defaults_comparison(small_problem):
    """EKFAC's defaults against Adam, a few steps."""
    settings = specs.Settings(steps=4, warmup_steps=1, eval_every=2)
    return running.compare(
        small_problem,
        [specs.ekfac_defaults(), specs.adam([1e-2])],
        settings,
        log=lambda _: None,
    )


def test_defaults_run_and_targets_combine_over_seeds(defaults_comparison):
    """The recommended optimizer runs in the harness with one setting and one
    trace, and a target over seeds is met only where met on every seed."""
    ekfac = defaults_comparison.optimizers["EKFAC"]
    assert ekfac.traces == 1 and len(ekfac.runs) == 1
    assert ekfac.runs[0].hyperparameters == {}
    assert np.isfinite(ekfac.runs[0].final_train_loss)

    met, missed, unknown = (
        records.Target("t", verdict, "d") for verdict in (True, False, None)
    )
    assert reporting.over_seeds([met, met]).status == "MET"
    assert reporting.over_seeds([met, unknown]).status == "NOT MEASURABLE"
    assert reporting.over_seeds([met, missed, unknown]).status == "MISSED"
    assert reporting.over_seeds([met, missed]).detail.startswith("1/2 seeds")


def test_autoencoder_targets_use_kfac_jax_side_by_side_where_it_ran(
    defaults_comparison, monkeypatch
):
    """Without kfac-jax's environment the issue's figures stand in; with a run
    of it, its time relative to Adam's here and its final loss."""
    comparison = dataclasses.replace(
        defaults_comparison,
        summary={
            "EKFAC": dataclasses.replace(
                defaults_comparison.summary["EKFAC"],
                seconds_to_target=1.0,
                final_train_loss=0.5,
            ),
            "Adam": dataclasses.replace(
                defaults_comparison.summary["Adam"], seconds_to_target=4.0
            ),
        },
    )
    monkeypatch.setattr(kfac_jax, "run", lambda seed, steps: None)
    _, issue_time, issue_loss = autoencoder.targets(comparison)
    assert "issue's figures" in issue_time.description and issue_loss.met is False
    assert issue_time.detail.endswith(f"ratio {1.0 / (4.0 * 0.71 / 0.78):.2f}")

    measured = dict(
        seed=0, steps=4, steps_to_target=2, seconds_to_target=3.0, final_train_loss=0.6
    )
    monkeypatch.setattr(kfac_jax, "run", lambda seed, steps: measured)
    _, side_time, side_loss = autoencoder.targets(comparison)
    assert "side by side" in side_time.description and side_loss.met is True
    assert side_time.detail == "1.00 s against 3.00 s, ratio 0.33"
    assert side_time.met is True
