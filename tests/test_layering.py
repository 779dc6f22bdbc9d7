"""The package layout is its layering: each folder is one layer, and no import points to a higher one."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_grokfast"

#: layer of each subpackage: a module may import its own layer and lower ones only
LAYERS = {"core": 0, "callbacks": 1, "integrations": 1, "tasks": 2, "cli": 3}
#: third-party frameworks the core never imports
FRAMEWORKS = ("lightning", "pytorch_lightning", "transformers", "accelerate", "optuna", "matplotlib", "jsonargparse")
#: 0.2 module path -> its home now (kept as deprecated aliases)
MOVED = {
    "lightning_grokfast.filters": "lightning_grokfast.core.filters",
    "lightning_grokfast.hook": "lightning_grokfast.integrations.hook",
    "lightning_grokfast.functional": "lightning_grokfast.integrations.functional",
    "lightning_grokfast.callback": "lightning_grokfast.callbacks.grokfast",
    "lightning_grokfast.detector": "lightning_grokfast.callbacks.detector",
    "lightning_grokfast.dashboard": "lightning_grokfast.callbacks.dashboard",
}


def _imports(path: Path) -> list[str]:
    """Every module a file imports, at module level or inside functions (lazy imports count too)."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.append(node.module)
            if node.module == "lightning_grokfast":
                names += [f"lightning_grokfast.{alias.name}" for alias in node.names]
    return names


def _layer_files() -> list[tuple[str, Path]]:
    return [(layer, path) for layer in LAYERS for path in sorted((PACKAGE / layer).rglob("*.py"))]


@pytest.mark.parametrize(("layer", "path"), _layer_files(), ids=lambda v: str(v).rsplit("lightning_grokfast/", 1)[-1])
def test_no_module_imports_a_higher_layer(layer, path):
    for name in _imports(path):
        parts = name.split(".")
        if parts[0] != "lightning_grokfast" or len(parts) < 2 or parts[1] not in LAYERS:
            continue
        target = parts[1]
        assert LAYERS[target] < LAYERS[layer] or target == layer, f"{path.name} ({layer}) imports {name}"


@pytest.mark.parametrize("path", sorted((PACKAGE / "core").glob("*.py")), ids=lambda p: p.name)
def test_the_core_imports_no_framework(path):
    for name in _imports(path):
        assert name.split(".")[0] not in FRAMEWORKS, f"core/{path.name} imports {name}"
        assert not name.startswith("lightning_grokfast.") or name.startswith("lightning_grokfast.core"), name


def test_the_core_imports_with_torch_alone():
    code = (
        "import sys, lightning_grokfast.core.filters, lightning_grokfast.core.binding, lightning_grokfast.core.ops\n"
        f"loaded = sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_a_0_2_module_path_still_works_and_names_its_new_home(old, new):
    sys.modules.pop(old, None)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_the_0_2_filters_path_gives_the_same_class():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from lightning_grokfast.filters import GradientFilter  # the import path the 0.2 README documents

    from lightning_grokfast import GradientFilter as Public

    assert GradientFilter is Public


def test_the_cli_classes_stay_importable_from_the_cli_package():
    from lightning_grokfast.cli import GrokfastCLI, TaskCLI
    from lightning_grokfast.cli.fit import GrokfastCLI as Moved

    assert GrokfastCLI is Moved and issubclass(TaskCLI, GrokfastCLI)
