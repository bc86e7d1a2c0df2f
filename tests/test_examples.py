"""Every example runs end to end at a tiny size, so that none of them rots.

Each runs as a script, as `python examples/NAME.py` runs it (`runpy` with the
script's own folder first on `sys.path`, so its `import _shared` resolves as
it does for a user), for 3 steps of 16 examples, with its plot written to a
temporary folder. They run one after the other in one fresh process of their
own (float32, one device, as users run them): starting Python and importing
JAX once instead of once per example. Compiling is most of their time, so
they compile with XLA's cheapest CPU optimization, and the transformer reads
windows of 16 characters rather than 64. The numbers are not checked: the
tests of `optax_ekfac` do that.
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
# Smaller problems where an example has a size of its own to set.
EXTRA_ARGUMENTS = {"transformer": ["--sequence-length", "16"]}
DIVIDER = "=== example "

_RUNNER = """
import runpy
import sys
import traceback

sys.path.insert(0, "examples")
for name, argv in {commands!r}:
    print({divider!r} + name, flush=True)
    sys.argv = [f"examples/{{name}}.py", *argv]
    try:
        runpy.run_path(f"examples/{{name}}.py", run_name="__main__")
    except BaseException:
        traceback.print_exc(file=sys.stdout)
        print("failed:", name)
    sys.stdout.flush()
"""


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
    commands = [
        (
            name,
            ["--steps", str(STEPS), "--batch-size", str(BATCH_SIZE)]
            + ["--out", str(tmp_path / f"{name}.png")]
            + EXTRA_ARGUMENTS.get(name, []),
        )
        for name in EXAMPLES
    ]
    script = tmp_path / "run_examples.py"
    script.write_text(_RUNNER.format(commands=commands, divider=DIVIDER))
    # Output to a file, not a pipe: a full pipe would stall the process.
    with open(tmp_path / "examples.out", "w") as out:
        returncode = subprocess.run(
            [sys.executable, str(script)],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
            timeout=600,
        ).returncode
    output = (tmp_path / "examples.out").read_text()
    assert returncode == 0, output[-3000:]
    outputs = dict(
        re.findall(
            rf"^{DIVIDER}(\w+)\n(.*?)(?=^{DIVIDER}|\Z)", output, re.MULTILINE | re.S
        )
    )
    assert sorted(outputs) == EXAMPLES, output[-3000:]
    failures = [
        f"examples/{name}.py:\n{text[-3000:]}"
        for name, text in outputs.items()
        if f"failed: {name}" in text
        or f"{STEPS} steps, batch size {BATCH_SIZE}" not in text
        or not re.search(r"^ekfac\s+train ", text, re.MULTILINE)
        or not (tmp_path / f"{name}.png").is_file()
    ]
    assert not failures, "\n\n".join(failures)
