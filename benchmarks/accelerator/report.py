"""The end of `benchmarks/accelerator.sh`: every step's status, the tests'
outcomes and the headline ratios, added to the results JSON and printed.

Standard library only, so that it reports even where JAX would not import.
Exits 1 if any step, test or benchmark part failed, timed out or did not run.

Usage:
    python -m benchmarks.accelerator.report --json PATH [--junit FILE]
        --steps "NAME RC SECONDS LIMIT" ... --expect PART ...
"""

import argparse
import json
import pathlib
import sys
import xml.etree.ElementTree as ElementTree
from collections.abc import Sequence
from typing import Any

TIMEOUT_CODES = (124, 137)


def step_status(rc: str) -> str:
    """`ok`, `failed`, `timed out` or `skipped` from a step's exit code (or
    `skipped`, where the shell had no time left to start it)."""
    if rc == "skipped":
        return "skipped (no time left)"
    if int(rc) == 0:
        return "ok"
    return "timed out" if int(rc) in TIMEOUT_CODES else "failed"


def parse_steps(lines: Sequence[str]) -> dict[str, dict[str, Any]]:
    """`{name: {status, exit_code, seconds, limit_seconds}}` from the shell's
    `NAME RC SECONDS LIMIT` lines."""
    steps = {}
    for line in lines:
        name, rc, seconds, limit = line.split()
        steps[name] = {
            "status": step_status(rc),
            "exit_code": None if rc == "skipped" else int(rc),
            "seconds": int(seconds),
            "limit_seconds": int(limit),
        }
    return steps


def test_outcomes(junit: pathlib.Path | None) -> dict[str, Any] | None:
    """Per test its outcome and seconds, from pytest's `--junitxml` (None
    where there is no report: a dry run only collects the tests)."""
    if junit is None or not junit.exists():
        return None
    cases = []
    for case in ElementTree.parse(junit).getroot().iter("testcase"):
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            if case.find(tag) is not None:
                outcome = {"failure": "failed", "error": "error"}.get(tag, tag)
        cases.append(
            {
                "test": f"{case.get('classname')}::{case.get('name')}",
                "outcome": outcome,
                "seconds": float(case.get("time", 0.0)),
            }
        )
    counts: dict[str, int] = {}
    for case in cases:
        counts[case["outcome"]] = counts.get(case["outcome"], 0) + 1
    return {
        "counts": counts,
        "not_passed": [c["test"] for c in cases if c["outcome"] != "passed"],
        "cases": cases,
    }


def _get(value: Any, *keys: str) -> Any:
    """`value[k1][k2]...`, or None where any is missing."""
    for key in keys:
        if not isinstance(value, dict) or value.get(key) is None:
            return None
        value = value[key]
    return value


def headline(results: dict[str, Any]) -> dict[str, Any]:
    """The ratios worth quoting, from whatever parts produced numbers."""
    lines: dict[str, Any] = {}
    for width, rows in (_get(results, "mlp_step_cost", "widths") or {}).items():
        for row in rows:
            for every in ("1", "10"):
                name = f"EKFAC stats every {every}"
                lines[f"mlp {width} batch {row['batch_size']}, {name}"] = {
                    "mean_step_ratio_to_adam": row["mean_ratio_to_adam"][name],
                    "median_step_ratio_to_adam": row["median_ratio_to_adam"][name],
                    "flop_model_ratio": row["predicted_ratio_to_adam"][name],
                }
            lines[f"mlp {width} batch {row['batch_size']}, EKFAC defaults"] = {
                "mean_step_ratio_to_adam": row["mean_ratio_to_adam"]["EKFAC defaults"]
            }
    for size, row in (_get(results, "eigh", "sizes") or {}).items():
        lines[f"eigh {size} float32"] = {
            "seconds": row["median_seconds"],
            "ratio_to_matmul": row["ratio_to_matmul"],
        }
    for width, rows in (_get(results, "memory", "widths") or {}).items():
        adam, ekfac = rows.get("Adam", {}), rows.get("EKFAC defaults", {})
        device = (
            ekfac["device_peak_bytes"] / adam["device_peak_bytes"]
            if ekfac.get("device_peak_bytes") and adam.get("device_peak_bytes")
            else None
        )
        lines[f"memory mlp {width}, EKFAC defaults / Adam"] = {
            "compiled_peak_ratio": ekfac.get("compiled_ratio_to_adam"),
            "device_peak_ratio": device,
            "ekfac_device_peak_mib": (
                ekfac["device_peak_bytes"] / 2**20
                if ekfac.get("device_peak_bytes")
                else None
            ),
        }
    changes = _get(results, "precision", "ekfac_update", "relative_change_vs_float32")
    for name, change in (changes or {}).items():
        lines[f"EKFAC update, {name}"] = {"relative_change": change}
    for name, row in (_get(results, "precision", "matmuls") or {}).items():
        lines[f"float32 matmul at {name}"] = {
            "tflops": row["tflops"],
            "relative_error_vs_float64": row["relative_error_vs_float64"],
        }
    summary = _get(results, "transformer", "comparison", "summary") or {}
    if "EKFAC" in summary and "Adam" in summary:
        ekfac, adam = summary["EKFAC"], summary["Adam"]
        lines["transformer LM, EKFAC defaults / Adam's best"] = {
            "steps_to_target": [ekfac["steps_to_target"], adam["steps_to_target"]],
            "time_to_target_ratio": ekfac["time_to_target_ratio_to_adam_best"],
            "mean_step_ratio": ekfac["mean_step_ratio_to_adam"],
            "final_train_loss": [ekfac["final_train_loss"], adam["final_train_loss"]],
        }
    return lines


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=pathlib.Path, required=True)
    parser.add_argument("--junit", type=pathlib.Path, default=None)
    parser.add_argument("--steps", nargs="*", default=[])
    parser.add_argument("--expect", nargs="*", default=[], help="benchmark parts")
    args = parser.parse_args(argv)

    record = json.loads(args.json.read_text()) if args.json.exists() else {}
    record["steps"] = parse_steps(args.steps)
    parts = record.setdefault("parts", {})
    for part in args.expect:
        parts.setdefault(part, {"status": "not run"})
    tests = test_outcomes(args.junit)
    if tests is not None:
        record["tests"] = tests
    record["headline"] = headline(record.get("results") or {})
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(record, indent=1))

    print("\n=== summary")
    for name, line in record["headline"].items():
        print(f"{name}: " + ", ".join(f"{k} {_format(v)}" for k, v in line.items()))
    problems = [
        f"step {name}: {step['status']} (exit {step['exit_code']})"
        for name, step in record["steps"].items()
        if step["status"] != "ok"
    ]
    problems += [
        f"benchmark part {name}: {part['status']}"
        for name, part in parts.items()
        if part["status"] != "ok"
    ]
    problems += [
        f"test {test}: not passed" for test in (tests or {}).get("not_passed", [])
    ]
    for name, step in record["steps"].items():
        print(f"step {name}: {step['status']} in {step['seconds']} s")
    for name, part in parts.items():
        seconds = part.get("seconds")
        print(
            f"benchmark part {name}: {part['status']}"
            + ("" if seconds is None else f" in {seconds:.0f} s")
        )
    if tests is not None:
        print(f"tests: {tests['counts']}")
    print(f"wrote {args.json}")
    if problems:
        print("FAILED: " + "; ".join(problems))
        return 1
    print("all steps, tests and benchmark parts ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
