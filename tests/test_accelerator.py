"""`benchmarks/accelerator.sh --dry-run`: the accelerator command, tiny, on CPU.

The full command runs only on a GPU; its dry run is the same script (the same
steps, parts, JSON and summary) at tiny sizes with this interpreter, so the
script can't rot between device runs. The report's verdicts are checked on
hand-made inputs too: a failed or timed-out step, a failed test and a part
that never ran must make it fail, naming them. The `precision` part's
written-out EKFAC update is checked against the library's.
"""

import functools
import json
import os
import pathlib
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

import optax_ekfac as oek
from benchmarks.accelerator import parts, report

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerator")
    env = dict(os.environ, PYTHON=sys.executable, ACCELERATOR_BUDGET_SECONDS="240")
    result = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "accelerator.sh"), "--dry-run"]
        + ["--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, out


def test_dry_run_measures_every_part_and_writes_one_json(dry_run):
    result, out = dry_run
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    assert "all steps, tests and benchmark parts ok" in output
    assert [path.name for path in out.iterdir()] == ["accelerator-cpu.json"]
    record = json.loads((out / "accelerator-cpu.json").read_text())

    assert record["dry_run"] is True
    assert set(record["steps"]) == {"device", "tests", "checks", "mlp", "transformer"}
    assert {step["status"] for step in record["steps"].values()} == {"ok"}
    assert set(record["parts"]) == set(parts.PARTS)
    assert {part["status"] for part in record["parts"].values()} == {"ok"}

    results, sizes = record["results"], parts.DRY_RUN
    assert results["device"]["library_matmul_precision"] == "HIGHEST"
    assert set(results["precision"]["matmuls"]) == set(parts.PRECISIONS)
    assert set(results["eigh"]["sizes"]) == {str(n) for n in sizes.eigh_sizes}
    assert results["eigh"]["warm_started_refresh"]["median_seconds"] is None
    assert results["sharding"]["relative_difference_per_step"] == [0.0, 0.0]
    (row,) = results["mlp_step_cost"]["widths"]["32"]
    assert row["batch_size"] == 32
    assert set(row["mean_ratio_to_adam"]) == {
        "Adam",
        "EKFAC stats every 1",
        "EKFAC stats every 10",
        "EKFAC defaults",
    }
    memory = results["memory"]["widths"]["32"]
    assert memory["EKFAC defaults"]["compiled"]["peak_bytes"] > 0
    summary = results["transformer"]["comparison"]["summary"]
    assert summary["EKFAC"]["traces"] == summary["Adam"]["traces"] == 1
    assert len(results["transformer"]["targets"]) == 2

    headline = record["headline"]
    assert "mlp 32 batch 32, EKFAC stats every 10" in headline
    assert "transformer LM, EKFAC defaults / Adam's best" in headline
    assert "eigh 32 float32" in headline


def _report(tmp_path, steps, junit=None, expect=("device",)):
    path = tmp_path / "accelerator-x.json"
    path.write_text(json.dumps({"parts": {"device": {"status": "ok"}}}))
    argv = ["--json", str(path), "--steps", *steps, "--expect", *expect]
    if junit is not None:
        argv += ["--junit", str(junit)]
    return report.main(argv), json.loads(path.read_text())


def test_report_passes_only_when_everything_ran_and_passed(tmp_path, capsys):
    code, record = _report(tmp_path, ["device 0 3 90", "tests 0 40 150"])
    assert code == 0
    assert record["steps"]["tests"] == {
        "status": "ok",
        "exit_code": 0,
        "seconds": 40,
        "limit_seconds": 150,
    }

    code, record = _report(tmp_path, ["device 0 3 90", "tests 124 150 150"])
    assert code == 1 and record["steps"]["tests"]["status"] == "timed out"
    code, _ = _report(tmp_path, ["install 1 20 240", "device 0 3 90"])
    assert code == 1
    code, record = _report(tmp_path, ["mlp skipped 0 0"], expect=("device", "memory"))
    assert code == 1
    assert record["steps"]["mlp"]["status"].startswith("skipped")
    assert record["parts"]["memory"] == {"status": "not run"}
    assert "FAILED: step mlp: skipped" in capsys.readouterr().out


def test_report_reads_failed_tests_from_junit(tmp_path, capsys):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite name="pytest">'
        '<testcase classname="tests.test_a" name="test_ok" time="1.5"/>'
        '<testcase classname="tests.test_a" name="test_bad" time="2">'
        "<failure>boom</failure></testcase>"
        "</testsuite></testsuites>"
    )
    code, record = _report(tmp_path, ["tests 1 40 150"], junit=junit)
    assert code == 1
    assert record["tests"]["counts"] == {"passed": 1, "failed": 1}
    assert record["tests"]["not_passed"] == ["tests.test_a::test_bad"]
    assert "test tests.test_a::test_bad: not passed" in capsys.readouterr().out


def _dense_problem(width=16, damping=1e-2):
    """One `Dense(10)` on inputs whose factor has condition 1e4, as the
    `precision` part's (smaller)."""
    inputs = parts.conditioned_inputs(width, 4 * width, condition=1e4)
    labels = np.random.default_rng(1).integers(0, 10, len(inputs))
    model = nn.Dense(10)
    params = model.init(jax.random.key(0), inputs[:1])["params"]

    def loss_fn(params, x, y):
        return oek.softmax_cross_entropy(model.apply({"params": params}, x), y)

    return loss_fn, params, inputs, labels


def test_written_out_update_is_the_library_update():
    """`parts.dense_ekfac_update` at float32 is `scale_by_ekfac`'s update of the
    empirical Fisher, so what its coarse matmuls change is what the library's
    would."""
    damping = 1e-2
    loss_fn, params, inputs, labels = _dense_problem(damping=damping)
    curvature = oek.Curvature(loss_fn, fisher_type="empirical")
    tx = oek.scale_by_ekfac(curvature.layers(params, inputs, labels), damping=damping)
    _, grads, stats = curvature.value_grad_and_stats(params, inputs, labels)
    update = tx.update(grads, tx.init(params), params, stats=stats)[0]
    library = np.concatenate([update["kernel"], update["bias"][None]], 0)

    rows, output_grads, gradient = parts.dense_rows(params, inputs, labels)
    np.testing.assert_allclose(
        gradient, np.concatenate([grads["kernel"], grads["bias"][None]], 0), atol=1e-6
    )
    written = parts.dense_ekfac_update(
        rows, output_grads, gradient, damping, jax.lax.Precision.HIGHEST
    )
    assert np.linalg.norm(written - library) / np.linalg.norm(library) < 1e-4


def test_written_out_update_matmuls_follow_the_precision_argument():
    """Under a bfloat16 default, `precision=HIGHEST` keeps every matmul float32
    and `precision=None` makes every one follow the default: the two updates
    the `precision` part compares."""
    rows, output_grads, gradient = parts.dense_rows(*_dense_problem()[1:])

    def precisions(precision):
        update = functools.partial(parts.dense_ekfac_update, precision=precision)
        with jax.default_matmul_precision("bfloat16"):
            jaxpr = jax.make_jaxpr(update)(rows, output_grads, gradient, 1e-4)
        return [
            eqn.params["precision"]
            for eqn in jaxpr.jaxpr.eqns
            if eqn.primitive.name == "dot_general"
        ]

    highest, default = jax.lax.Precision.HIGHEST, jax.lax.Precision.DEFAULT
    assert precisions(highest) == [(highest, highest)] * 9
    assert precisions(None) == [(default, default)] * 9
