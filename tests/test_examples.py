"""Every example runs end to end at a tiny size, so that none of them rots.

Each runs as the README runs it, `python examples/NAME.py` from the repository
root (in a process of its own, so its `import _shared` resolves as it does for
a user), for 3 steps of 16 examples, with its plot written to a temporary
folder. The processes run side by side, compiled with XLA's cheapest CPU
optimization: most of their time is compiling. The numbers are not checked:
the tests of `optax_ekfac` do that.
"""

import os
import pathlib
import re
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = sorted(
    path.stem
    for path in (ROOT / "examples").glob("*.py")
    if not path.name.startswith("_")
)
STEPS, BATCH_SIZE = 3, 16


def test_every_example_is_found():
    assert {"digits_mlp", "autoencoder", "cnn", "transformer", "nnx_mlp"} <= set(
        EXAMPLES
    )


def test_every_example_runs(tmp_path):
    # No display: matplotlib writes the files only. Compiling is most of the
    # time of 3 steps: XLA's cheapest CPU optimization saves about a third.
    xla_flags = (
        "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
    environment = {
        **os.environ,
        "MPLBACKEND": "Agg",
        "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}".strip(),
    }
    processes = {}
    for name in EXAMPLES:
        command = [
            sys.executable,
            f"examples/{name}.py",
            "--steps",
            str(STEPS),
            "--batch-size",
            str(BATCH_SIZE),
            "--out",
            str(tmp_path / f"{name}.png"),
        ]
        # Output to files, not pipes: a full pipe would stall a process.
        with open(tmp_path / f"{name}.out", "w") as out:
            processes[name] = subprocess.Popen(
                command, cwd=ROOT, env=environment, stdout=out, stderr=out
            )
    failures = []
    for name, process in processes.items():
        returncode = process.wait(timeout=600)
        output = (tmp_path / f"{name}.out").read_text()
        ran = (
            returncode == 0
            and f"{STEPS} steps, batch size {BATCH_SIZE}" in output
            and re.search(r"^ekfac\s+train ", output, re.MULTILINE)
            and (tmp_path / f"{name}.png").is_file()
        )
        if not ran:
            failures.append(
                f"examples/{name}.py (exit {returncode}):\n{output[-3000:]}"
            )
    assert not failures, "\n\n".join(failures)
