"""The wheel: the package with its recipes as package data, the command, the axolotl entry point."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from helpers import REPO


def tracked_files(folder: str) -> list[str]:
    listing = subprocess.run(["git", "ls-files", folder], cwd=REPO, check=True, capture_output=True, text=True)
    return sorted(listing.stdout.split())


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel pip builds from the tracked files (copied, so the build leaves nothing in the checkout)."""
    source, out = tmp_path_factory.mktemp("source"), tmp_path_factory.mktemp("wheel")
    for name in [
        "pyproject.toml",
        "README.md",
        "LICENSE",
        *tracked_files("axolotl_chainlora"),
        *tracked_files("example_configs"),
    ]:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    (path,) = out.glob("axolotl_chainlora-*.whl")
    return path


def test_wheel_holds_the_package_and_every_recipe_once(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    modules = sorted(n for n in names if n.startswith("axolotl_chainlora/") and n.count("/") == 1)
    assert modules == tracked_files("axolotl_chainlora")
    recipes = tracked_files("example_configs")
    shipped = sorted(n.removeprefix("axolotl_chainlora/") for n in names if "/example_configs/" in n)
    assert shipped == recipes
    metadata = next(n for n in names if n.endswith("entry_points.txt"))
    entry_points = zipfile.ZipFile(wheel).read(metadata).decode()
    assert "axolotl-chainlora = axolotl_chainlora.cli:main" in entry_points
    assert "chainlora = axolotl_chainlora:ChainLoraPlugin" in entry_points


def test_installed_wheel_writes_the_demo_config_from_package_data(wheel, tmp_path):
    """Installed from the wheel (away from the source tree), the demo finds example_configs/demo.yml."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=600,
    )
    script = (
        "import axolotl_chainlora.demo as demo, pathlib, sys;"
        "assert pathlib.Path(demo.__file__).is_relative_to(sys.argv[1]), demo.__file__;"
        "print((demo.resources.files(demo.example_configs) / demo.DEMO_CONFIG).read_text())"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(target)],
        cwd=tmp_path,
        env={"PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "PATH": ""},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.rstrip("\n") == (REPO / "example_configs" / "demo.yml").read_text().rstrip("\n")
