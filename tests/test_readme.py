"""The Python code of the README and of every page under docs/ runs as printed.

Each ```python block runs as it is, in float32 as users run it, in one of two
namespaces:

* a block whose first line ends in "from the README's training loop" (e.g.
  `# model, curvature, layers, batches: from the README's training loop`)
  runs after the README's first block, the training loop, and sees only the
  names that line lists, besides the modules the README imported;
* any other block sees nothing: it defines, or imports, all it uses.

A block with a top-level `for` loop trains: it must print `step N: loss L`
every few steps over at least 20 steps, and its last loss must be below half
its first. A block that sets a mesh runs in a process of its own with two
fake CPU devices, `jax.distributed.initialize` being multi-host only, after
the README's loop up to its `for` (the definitions; the loop is tested above).
"""

import contextlib
import io
import math
import os
import pathlib
import re
import subprocess
import sys
import types

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README] + sorted((ROOT / "docs").glob("*.md"))
AFTER_README = "from the README's training loop"
LOSS_LINE = re.compile(r"^step (\d+): loss (\S+)$", re.MULTILINE)
MESH = "jax.make_mesh"

# The pages' code runs in float32, as users run it, beside the suite's x64.
# `jax.enable_x64` is jax 0.8's name; the version floor (pyproject.toml) has
# only `jax.experimental`'s.
if hasattr(jax, "enable_x64"):
    enable_x64 = jax.enable_x64
else:  # pragma: no cover - jax < 0.8
    from jax.experimental import enable_x64


def _python_blocks(page: pathlib.Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), re.S)


def _block_ids() -> list[tuple[str, int]]:
    return [
        (page.name, index)
        for page in PAGES
        for index, _ in enumerate(_python_blocks(page))
    ]


def _block(page_name: str, index: int) -> str:
    page = README if page_name == README.name else ROOT / "docs" / page_name
    return _python_blocks(page)[index]


def _names_taken_from_the_readme(code: str) -> list[str] | None:
    """The names a block's first line says it takes from the README, or None."""
    first = code.splitlines()[0]
    if not (first.startswith("#") and first.rstrip().endswith(AFTER_README)):
        return None
    listed = first.lstrip("# ").split(":")[0]
    return [name.strip() for name in listed.split(",")]


def _trains(code: str) -> bool:
    return re.search(r"^for ", code, re.MULTILINE) is not None


def _set_up(code: str) -> str:
    """A training block up to its loop: what it defines, without training."""
    loops = list(re.finditer(r"^for ", code, re.MULTILINE))
    return code[: loops[-1].start()] if loops else code


def _run(code: str, namespace: dict, name: str) -> str:
    output = io.StringIO()
    with enable_x64(False), contextlib.redirect_stdout(output):
        exec(compile(code, name, "exec"), namespace)
    return output.getvalue()


def _assert_trains(output: str, name: str) -> None:
    losses = [(int(step), float(loss)) for step, loss in LOSS_LINE.findall(output)]
    assert len(losses) >= 3 and losses[-1][0] >= 20, (
        f"{name} trains but printed no 'step N: loss L' lines over 20 steps:\n"
        + output[-2000:]
    )
    assert all(math.isfinite(loss) for _, loss in losses), losses
    assert losses[-1][1] < 0.5 * losses[0][1], f"{name}: the loss did not fall {losses}"


@pytest.fixture(scope="module")
def readme_loop():
    """The namespace and the printed output of the README's training loop."""
    namespace: dict = {}
    output = _run(_block(README.name, 0), namespace, "README.md block 0")
    return namespace, output


def _given(readme_namespace: dict, names: list[str], name: str) -> dict:
    missing = [n for n in names if n not in readme_namespace]
    assert not missing, f"{name} takes {missing} from the README, which has none"
    modules = {
        key: value
        for key, value in readme_namespace.items()
        if isinstance(value, types.ModuleType)
    }
    return {**modules, **{n: readme_namespace[n] for n in names}}


def test_the_pages_have_the_blocks_this_test_runs():
    readme = _python_blocks(README)
    assert len(readme) == 1 and "oek.ekfac(layers)" in readme[0]
    blocks = [_block(*block_id) for block_id in _block_ids()]
    assert sum(MESH in code for code in blocks) == 1
    assert sum(_trains(code) for code in blocks) >= 8


@pytest.mark.floor
def test_the_readme_training_loop_trains(readme_loop):
    namespace, output = readme_loop
    _assert_trains(output, "README.md block 0")
    assert "layers_0  Dense" in output  # print(layers)


@pytest.mark.parametrize(
    "page_name, index",
    [
        # The NNX loop also runs at the version floor.
        pytest.param(*block_id, marks=pytest.mark.floor)
        if "nnx.Optimizer" in _block(*block_id)
        else block_id
        for block_id in _block_ids()
        if block_id != (README.name, 0) and MESH not in _block(*block_id)
    ],
    ids=lambda value: str(value),
)
def test_a_block_runs_as_printed(page_name, index, readme_loop):
    code, name = _block(page_name, index), f"{page_name} block {index}"
    names = _names_taken_from_the_readme(code)
    namespace = {} if names is None else _given(readme_loop[0], names, name)
    output = _run(code, namespace, name)
    if _trains(code):
        _assert_trains(output, name)


_SHARDED_SCRIPT = """
import types

import jax

jax.distributed.initialize = lambda *args, **kwargs: None  # one process here
with jax.enable_x64(False):
    exec(compile({readme!r}, "README.md block 0 up to its loop", "exec"))
    _given = {{
        _name: _value
        for _name, _value in globals().items()
        if _name in {names!r} or isinstance(_value, types.ModuleType)
    }}
    print("--- the block ---")
    exec(compile({block!r}, {name!r}, "exec"), _given)
print("devices", jax.device_count())
"""


def test_the_multi_device_block_trains_on_two_devices(tmp_path):
    ((page_name, index),) = [
        block_id for block_id in _block_ids() if MESH in _block(*block_id)
    ]
    code, name = _block(page_name, index), f"{page_name} block {index}"
    names = _names_taken_from_the_readme(code)
    assert names is not None
    script = tmp_path / "sharded.py"
    script.write_text(
        _SHARDED_SCRIPT.format(
            readme=_set_up(_block(README.name, 0)), names=names, block=code, name=name
        )
    )
    # The suite's flags (conftest.py), and two devices.
    flags = os.environ.get("XLA_FLAGS", "")
    env = dict(
        os.environ, XLA_FLAGS=f"{flags} --xla_force_host_platform_device_count=2"
    )
    result = subprocess.run(
        [sys.executable, str(script)], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout.split("--- the block ---")[1]
    assert "devices 2" in output
    _assert_trains(output, name)


def test_every_row_of_the_bad_inputs_table_names_a_test_that_exists():
    """docs/bad-inputs.md backs each row with `FILE::TEST` (`::TEST`: the
    cell's previous file; "same test": the row above's)."""
    rows = [
        line
        for line in (ROOT / "docs" / "bad-inputs.md").read_text().splitlines()
        if line.startswith("| ") and not line.startswith(("| input", "| ---"))
    ]
    assert len(rows) >= 30
    for row in rows:
        cell = row.rstrip(" |").rsplit(" | ", 1)[1]
        if cell == "same test":
            continue
        names = re.findall(r"`([\w.]*)::(\w+)`", cell)
        assert names, f"no test named in {row!r}"
        file = None
        for file_name, test in names:
            file = file_name or file
            source = (ROOT / "tests" / file).read_text()
            assert f"\ndef {test}(" in source, f"{file}::{test} in {row!r}"


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces
    to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_link_between_the_pages_leads_somewhere():
    for page in PAGES:
        text = page.read_text()
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if target.startswith(("http://", "https://")):
                continue
            path, _, anchor = target.partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.is_file(), f"{page.name} links to {target}, not a file"
            if anchor:
                headings = re.findall(r"^#+ (.*)$", linked.read_text(), re.MULTILINE)
                assert anchor in {_anchor(heading) for heading in headings}, (
                    f"{page.name} links to {target}, no such heading"
                )
