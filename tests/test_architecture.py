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


def test_the_node_process_never_imports_torch(tmp_path: Path) -> None:
    """The node validates its plugins in an analysis worker: after start, with the shipped
    model routed, its own process has neither torch nor MONAI."""
    import os
    import subprocess
    import sys

    script = tmp_path / "start_node.py"
    script.write_text(
        "import sys\n"
        "from pathlib import Path\n"
        "from tests.support import free_port, node_config\n"
        "from dicom_node.config import parse_config\n"
        "from dicom_node.node import Node\n"
        "if __name__ == '__main__':\n"
        f"    cfg = node_config(Path({str(tmp_path / 'var')!r}), free_port(), routes=[{{'name': 'chest',\n"
        "        'match': {'Modality': '^CT$'}, 'plugin': 'lung_nodules', 'destinations': []}])\n"
        "    node = Node(parse_config(cfg))\n"
        "    node.start()\n"
        "    print('validated', sorted(node.runner.plugin_infos), 'torch' in sys.modules, 'monai' in sys.modules)\n"
        "    node.stop()\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "validated ['lung_nodules'] False False" in run.stdout, run.stdout + run.stderr[-3000:]
