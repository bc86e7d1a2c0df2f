"""Smoke test: `benchmarks/studies/distributed_eigh.py` runs on the fake-device mesh.

Not a timing test: it keeps the benchmark from rotting between full runs.
"""

import json

from benchmarks.studies import distributed_eigh

NUM_DEVICES = 4


def test_distributed_eigh_benchmark_runs(tmp_path):
    argv = ["--quick", "--steps", "1", "--devices", str(NUM_DEVICES)]
    result = distributed_eigh.main(argv + ["--out", str(tmp_path)])
    saved = json.loads((tmp_path / "distributed_eigh.json").read_text())
    assert saved["ratio"] == result.sections["ratio"] > 0
    assert len(saved["shares"]) == NUM_DEVICES
    assert sorted(f for share in saved["shares"] for f in share) == sorted(
        factor["factor"] for factor in saved["factors"]
    )
