"""The package's shape: each module imports only modules below it, at the top of the file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import axolotl_chainlora

PACKAGE = Path(axolotl_chainlora.__file__).parent
# bottom-up: a module imports only modules listed before it
LAYERS = (
    "log",
    "engines",
    "cores",
    "layer",
    "bnb",
    "dispatch",
    "config",
    "registration",
    "cola",
    "export",
    "__init__",
    "kernels",
    "merge",
    "plugin",
    "args",
    "demo",
    "cli",
)
# the one deferred import: axolotl loads the plugin, which imports axolotl, only when it asks for it
DEFERRED = {("__init__", "plugin")}
DATA_PACKAGES = {"example_configs"}


def package_imports(source: str, module: str) -> tuple[list[str], list[str]]:
    """The package modules `source` imports at the top of the file and inside functions; imports under
    `if TYPE_CHECKING:` (type hints only, never run) are skipped."""
    top, deferred = [], []

    def visit(node: ast.AST, in_function: bool) -> None:
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            return
        if isinstance(node, ast.ImportFrom):
            names = _imported_modules(node)
            (deferred if in_function else top).extend(names)
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] if "." in a.name else "__init__" for a in node.names]
            names = [n for n, a in zip(names, node.names) if a.name.split(".")[0] == "axolotl_chainlora"]
            (deferred if in_function else top).extend(names)
        for child in ast.iter_child_nodes(node):
            visit(child, in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    def _imported_modules(node: ast.ImportFrom) -> list[str]:
        if node.level == 0:
            if not (node.module or "").startswith("axolotl_chainlora"):
                return []
            parts = node.module.split(".")
            return [parts[1] if len(parts) > 1 else "__init__"]
        if node.module:
            return [node.module.split(".")[0]]
        # `from . import x`: a submodule, or a name of __init__
        return [
            a.name if (PACKAGE / f"{a.name}.py").exists() or a.name in DATA_PACKAGES else "__init__" for a in node.names
        ]

    visit(ast.parse(source), in_function=False)
    return [m for m in top if m not in DATA_PACKAGES and m != module], deferred


def layering_violations(sources: dict[str, str]) -> list[str]:
    violations = []
    for module, source in sources.items():
        top, deferred = package_imports(source, module)
        for imported in top:
            if LAYERS.index(imported) >= LAYERS.index(module):
                violations.append(f"{module} imports {imported}, which is not below it")
        for imported in deferred:
            if (module, imported) not in DEFERRED:
                violations.append(f"{module} imports {imported} inside a function")
    return violations


def test_every_module_has_a_place_in_the_layers():
    assert sorted(path.stem for path in PACKAGE.glob("*.py")) == sorted(LAYERS)


def test_modules_import_only_modules_below_them_at_the_top():
    sources = {path.stem: path.read_text() for path in PACKAGE.glob("*.py")}
    assert layering_violations(sources) == []


@pytest.mark.parametrize(
    ("sources", "violation"),
    [
        pytest.param(
            {"config": "from .cola import ColaCallback\n"}, "config imports cola, which is not below it", id="up"
        ),
        pytest.param({"cores": "from . import cli\n"}, "cores imports cli, which is not below it", id="up-from-dot"),
        pytest.param(
            {"layer": "def f():\n    from .bnb import Linear4bit\n"}, "layer imports bnb inside a function", id="local"
        ),
        pytest.param(
            {"export": "import axolotl_chainlora.plugin\n"},
            "export imports plugin, which is not below it",
            id="absolute",
        ),
    ],
)
def test_the_check_catches_an_import_that_points_up_or_hides_in_a_function(sources, violation):
    assert layering_violations(sources) == [violation]


def test_type_hint_imports_and_the_lazy_plugin_import_are_allowed():
    sources = {
        "layer": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .config import ChainLoraConfig\n",
        "__init__": "def __getattr__(name):\n    from .plugin import ChainLoraPlugin\n",
    }
    assert layering_violations(sources) == []
