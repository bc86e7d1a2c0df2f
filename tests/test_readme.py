"""The README's Python code runs as it is.

Each ```python block of the README is executed, in order, in a namespace
that supplies only what the README leaves to the reader: the data
(`x_train`, `y_train` from `load_digits`) and `batches`. The multi-device
block runs in a process of its own with two fake CPU devices (it sets a
global mesh), `jax.distributed.initialize` being multi-host only.
"""

import os
import pathlib
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from sklearn.datasets import load_digits

README = pathlib.Path(__file__).parent.parent / "README.md"

# The README's code runs in float32, as users run it, beside the suite's x64.
# `jax.enable_x64` is jax 0.8's name; the version floor (pyproject.toml) has
# only `jax.experimental`'s.
if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:  # pragma: no cover - jax < 0.8
    from jax.experimental import enable_x64


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def _data_namespace() -> dict:
    x, y = load_digits(return_X_y=True)
    x_train = (x / 16.0).astype(np.float32)
    y_train = y.astype(np.int32)
    batches = [
        (x_train[i : i + 128], y_train[i : i + 128]) for i in range(0, 1024, 128)
    ]
    return {"x_train": x_train, "y_train": y_train, "batches": batches}


def test_the_readme_has_the_blocks_this_test_runs():
    blocks = _python_blocks()
    assert len(blocks) == 4
    assert "nnx.Optimizer" in blocks[1]
    assert "jax.make_mesh" in blocks[2]
    assert "oek.TrainState" in blocks[3]


@pytest.mark.floor
@pytest.mark.parametrize("index", [0, 1], ids=["linen", "nnx"])
def test_a_training_loop_block_runs_and_trains(index):
    namespace = _data_namespace()
    with enable_x64(False):
        code = compile(_python_blocks()[index], f"README block {index}", "exec")
        exec(code, namespace)
    loss = float(namespace["loss"])
    assert np.isfinite(loss)
    # Eight steps from a fresh model: the loss of 10 classes starts near log(10).
    assert loss < 2.5


def test_the_plumbing_block_runs_after_the_training_loop():
    """Two steps of each loop; the transformations it builds fit the params
    (their updates are tested in tests/test_plumbing.py)."""
    namespace = _data_namespace()
    namespace["batches"] = namespace["batches"][:2]
    blocks = _python_blocks()
    with enable_x64(False):
        for index in (0, 3):
            exec(compile(blocks[index], f"README block {index}", "exec"), namespace)
        assert np.isfinite(float(namespace["loss"]))
        assert int(namespace["state"].step) == 2
        for name in ("partial_tx", "tx"):
            namespace[name].init(namespace["params"])


_DATA_SOURCE = """
import jax
import numpy as np
from sklearn.datasets import load_digits

jax.distributed.initialize = lambda *args, **kwargs: None  # one process here
x, y = load_digits(return_X_y=True)
x_train, y_train = (x / 16.0).astype(np.float32), y.astype(np.int32)
batches = [(x_train[i : i + 128], y_train[i : i + 128]) for i in (0, 128)]
"""


def test_the_multi_device_block_runs_on_two_devices(tmp_path):
    """The linen loop's set-up, then the sharding lines and the sharded loop."""
    linen, _, sharded, _ = _python_blocks()
    script = tmp_path / "readme_sharded.py"
    script.write_text(
        _DATA_SOURCE
        + linen
        + sharded
        + "assert bool(jax.numpy.isfinite(loss))\n"
        + "print('devices', jax.device_count(), 'loss', float(loss))\n"
    )
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "devices 2 loss" in result.stdout
