"""The version floor `pyproject.toml` states is the one CI tests.

`constraints/floor.txt` pins the oldest jax, jaxlib, flax and optax; CI
installs exactly those into a second environment and runs the tests marked
`floor` there (`.ci/run`). Here: each floor in `pyproject.toml` is its pin,
and, in that run, the installed versions are the pins.
"""

import importlib.metadata
import os
import pathlib
import re
import tomllib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
FLOORED = ("jax", "jaxlib", "flax", "optax")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints" / "floor.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name, version = requirement.split("==")
            pins[name.strip()] = version.strip()
    return pins


def test_pyproject_states_the_pinned_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    floors = {}
    for requirement in project["dependencies"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        assert match, f"dependency without a floor: {requirement}"
        floors[match[1]] = match[2]
    pins = _pins()
    assert set(FLOORED) <= set(floors)
    assert {name: floors[name] for name in FLOORED} == {
        name: pins[name] for name in FLOORED
    }


@pytest.mark.floor
def test_the_installed_versions_are_at_or_above_the_floor():
    """At or above the pins; in the floor run (`FLOOR_RUN=1`, set by
    `.ci/run`), exactly the pins, so that run tests what it says it tests."""
    pins = _pins()
    installed = {name: importlib.metadata.version(name) for name in pins}

    def release(version):
        return tuple(int(part) for part in re.findall(r"\d+", version)[:3])

    for name, pin in pins.items():
        assert release(installed[name]) >= release(pin), (name, installed[name])
    if os.environ.get("FLOOR_RUN") == "1":
        assert installed == pins
