"""Import rules of the layout: the plugin contract stands alone, models use only the contract
(and the phantom generator), the node imports no model, and the phantom generator is neutral."""

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


def _offending(folder: str, packages: tuple[str, ...]) -> dict[str, list[str]]:
    """The modules under ``folder`` that import one of ``packages`` (or a module of one),
    at the top or inside a function, with what they import."""
    found = {path: sorted(n for n in names if n.split(".", 1)[0] in packages)
             for path, names in _imported_modules(REPO / folder).items()}
    return {path: names for path, names in found.items() if names}


def test_the_plugin_contract_imports_nothing_from_the_node() -> None:
    """A plugin author needs nothing from dicom_node (its error is plugin.errors.PluginError)."""
    assert not _offending("plugin", ("dicom_node",))


def test_net_imports_nothing_from_the_receive_side() -> None:
    """``dicom_node.net`` is the peer plumbing (SCU, TLS, statuses) that both sides use: it
    imports nothing from ``dicom_node.receive`` (ingest included), at the top or inside a
    function, so no import runs back up the layers."""
    net = REPO / "dicom_node" / "net"
    assert (net / "__init__.py").is_file() and (REPO / "dicom_node" / "receive" / "__init__.py").is_file()
    problems: list[str] = []
    for path in sorted(net.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:  # relative: resolve against dicom_node.net
                    base = ["dicom_node", "net"][: max(0, 2 - (node.level - 1))]
                    module = ".".join(base + ([node.module] if node.module else []))
                else:
                    module = node.module or ""
                names = [module] + [f"{module}.{a.name}" for a in node.names]
            else:
                continue
            bad = [n for n in names if n == "dicom_node.receive" or n.startswith("dicom_node.receive.")
                   or n.split(".")[-1] == "ingest"]
            problems += [f"{path.relative_to(REPO)}:{node.lineno} imports {n}" for n in bad]
    assert not problems


def test_the_receive_side_reaches_the_database_through_statedb_only() -> None:
    """Ingest (and the rest of ``dicom_node.receive``) opens no SQLite connection of its own:
    every statement is a method of ``dicom_node.storage.state.StateDB``."""
    assert not _offending("dicom_node/receive", ("sqlite3",))


def test_the_node_imports_no_model() -> None:
    assert not _offending("dicom_node", ("models",))


def test_models_import_nothing_from_the_node() -> None:
    """A model (its plugin, training and evaluation scripts) needs only the plugin contract
    and the phantom generator; what runs a model through the node lives in ``bench/``."""
    assert not _offending("models", ("dicom_node", "bench", "tests"))


def test_the_phantom_generator_is_neutral() -> None:
    """The node, the models, the benchmarks and the tests all use ``phantoms``: it imports
    none of them."""
    assert (REPO / "phantoms" / "__init__.py").is_file()
    assert not _offending("phantoms", ("dicom_node", "plugin", "models", "bench", "tests"))


def test_models_import_their_neighbours_by_package_name() -> None:
    """No ``sys.path`` edits and no bare sibling imports (``from candidates import ...``): a
    module imported under two names is two modules, with two copies of its state."""
    problems: list[str] = []
    for path in sorted((REPO / "models").rglob("*.py")):
        siblings = {p.stem for p in path.parent.glob("*.py")} - {"__init__"}
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.Attribute) and node.attr == "path" and isinstance(node.value, ast.Name) \
                    and node.value.id == "sys":
                problems.append(f"{where} uses sys.path")
            elif isinstance(node, ast.Import):
                problems += [f"{where} imports {a.name}" for a in node.names if a.name.split(".")[0] in siblings]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module \
                    and node.module.split(".")[0] in siblings:
                problems.append(f"{where} imports from {node.module}")
    assert not problems


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
