"""The locks (locks/*.txt): inside pyproject.toml's ranges, quoted rightly in the README, and enforced on the venv."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pip_lock
import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# each leg: its lock, the venv scripts/install.sh builds, the extras it installs
LEGS = {
    "0.21": (REPO / "locks/axolotl-0.21.txt", REPO / ".venv", ("axolotl", "test", "bench", "deepspeed")),
    # the 0.19 leg names axolotl==0.19.0 itself: the `axolotl` extra is 0.21's
    "0.19": (REPO / "locks/axolotl-0.19.txt", REPO / ".venv-axolotl-0.19", ("test", "bench", "deepspeed")),
}


def lock_python(lock_path: Path) -> str:
    """The Python version the lock's header records."""
    return re.search(r"Python (\d+\.\d+\.\d+)", lock_path.read_text()).group(1)


def declared_requirements(extras: tuple[str, ...]) -> list[Requirement]:
    project = PYPROJECT["project"]
    lines = project["dependencies"] + [line for extra in extras for line in project["optional-dependencies"][extra]]
    return [Requirement(line) for line in lines]


def outside_declared_ranges(lock: dict[str, str], requirements: list[Requirement]) -> list[str]:
    """The declared requirements that the locked versions miss: not locked, or locked outside the range."""
    misses = []
    for requirement in requirements:
        version = lock.get(canonicalize_name(requirement.name))
        if version is None or not requirement.specifier.contains(version, prereleases=True):
            misses.append(f"{requirement}: locked {version}")
    return misses


@pytest.mark.parametrize("leg", list(LEGS))
def test_each_lock_lies_inside_the_declared_ranges(leg):
    lock_path, _, extras = LEGS[leg]
    lock = pip_lock.parse(lock_path.read_text())
    assert outside_declared_ranges(lock, declared_requirements(extras)) == []
    assert lock["axolotl"] == f"{leg}.0"
    assert lock_python(lock_path) in SpecifierSet(PYPROJECT["project"]["requires-python"])
    # the control: a lock that moved transformers past the range is caught
    misses = outside_declared_ranges({**lock, "transformers": "5.99.0"}, declared_requirements(extras))
    assert len(misses) == 1 and misses[0].startswith("transformers") and misses[0].endswith(": locked 5.99.0")


def readme_versions_table() -> dict[str, list[str]]:
    """package -> [declared, tested 0.21, tested 0.19], from the table under the README's '### Versions'."""
    section = (REPO / "README.md").read_text().split("### Versions", 1)[1]
    table = next(block for block in section.split("\n\n") if block.startswith("|"))
    rows = table.splitlines()[2:]
    return {cells[0]: cells[1:] for cells in ([cell.strip() for cell in row.strip("|").split("|")] for row in rows)}


def stale_declared_cells(table: dict[str, list[str]]) -> list[str]:
    """Rows whose 'declared' range is not pyproject.toml's (the text before any note in parentheses)."""
    project = PYPROJECT["project"]
    declared = {"python": SpecifierSet(project["requires-python"])}
    declared |= {canonicalize_name(r.name): r.specifier for r in declared_requirements(("axolotl", "deepspeed"))}
    misses = []
    for package, (declared_cell, *_) in table.items():
        name = canonicalize_name(package)
        if name in declared and SpecifierSet(declared_cell.split(" (")[0]) != declared[name]:
            misses.append(f"{package}: README {declared_cell}, pyproject.toml {declared[name]}")
    return misses


def stale_tested_cells(table: dict[str, list[str]]) -> list[str]:
    """Cells whose tested version is not the lock's (Python: the lock header's)."""
    misses = []
    for column, (lock_path, _, _) in enumerate(LEGS.values(), start=1):
        lock = pip_lock.parse(lock_path.read_text()) | {"python": lock_python(lock_path)}
        for package, cells in table.items():
            if cells[column] != lock[canonicalize_name(package)]:
                misses.append(f"{package}: README {cells[column]}, {lock_path.name} {lock[canonicalize_name(package)]}")
    return misses


def test_the_readme_quotes_the_locks_and_the_declared_ranges():
    table = readme_versions_table()
    assert {"Python", "axolotl", "torch", "transformers", "peft", "deepspeed"} <= table.keys()
    assert stale_declared_cells(table) == []
    assert stale_tested_cells(table) == []
    # the controls: a stale tested version and a stale range are each caught
    stale = {**table, "peft": [">=0.20.0,<0.23", "0.21.1", table["peft"][2]]}
    assert stale_declared_cells(stale) == ["peft: README >=0.20.0,<0.23, pyproject.toml <0.22,>=0.20.0"]
    assert stale_tested_cells(stale) == ["peft: README 0.21.1, axolotl-0.21.txt 0.21.2"]


def test_differences_names_each_kind_of_drift():
    lock = pip_lock.parse("# header\ntorch==2.14.1\nPyYAML==6.0.2\nregex==2026.12.2\n")
    assert pip_lock.differences(lock, dict(lock)) == []
    venv = {"torch": "2.14.1", "pyyaml": "6.0.3", "openai": "3.63.0"}
    assert pip_lock.differences(lock, venv) == [
        "openai: installed 3.63.0, not in the lock",
        "pyyaml: locked 6.0.2, installed 6.0.3",
        "regex: locked 2026.12.2, not installed",
    ]
    with pytest.raises(ValueError, match="'torch>=2.9' is not a name==version pin"):
        pip_lock.parse("torch>=2.9\n")


def running_leg() -> tuple[Path, Path] | None:
    """(lock, venv) of the leg this interpreter is, when it is a venv scripts/install.sh built; else None."""
    leg = ".".join(importlib.metadata.version("axolotl").split(".")[:2])
    if leg not in LEGS:
        return None
    lock_path, venv, _ = LEGS[leg]
    return (lock_path, venv) if Path(sys.prefix).resolve() == venv.resolve() else None


def run_check(lock_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "scripts/pip_lock.py"), "check", str(lock_path)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.mark.skipif(running_leg() is None, reason="runs in a venv of scripts/install.sh (.venv, .venv-axolotl-0.19)")
def test_this_venv_is_its_lock(tmp_path):
    """What CI installs is what the lock says; an edited lock is refused, naming the package."""
    lock_path, _ = running_leg()
    result = run_check(lock_path)
    assert result.returncode == 0, result.stderr
    edited = tmp_path / "lock.txt"
    edited.write_text(re.sub(r"(?m)^peft==.*$", "peft==0.0.1", lock_path.read_text()))
    refused = run_check(edited)
    assert refused.returncode == 1
    assert "peft: locked 0.0.1, installed " in refused.stderr
