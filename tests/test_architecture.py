"""Import rules of the layout: the plugin contract stands alone."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _imported_modules(folder: Path) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in sorted(folder.rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def test_the_plugin_contract_imports_nothing_from_the_node() -> None:
    """A plugin author needs nothing from dicom_node (its error is plugin.errors.PluginError)."""
    offending = {path: sorted(n for n in names if n == "dicom_node" or n.startswith("dicom_node."))
                 for path, names in _imported_modules(REPO / "plugin").items()}
    assert not {path: names for path, names in offending.items() if names}


def test_the_node_imports_no_model() -> None:
    offending = {path: sorted(n for n in names if n == "models" or n.startswith("models."))
                 for path, names in _imported_modules(REPO / "dicom_node").items()}
    assert not {path: names for path, names in offending.items() if names}
