"""Pre-flight for Model Zoo bundles: ``check-config --deep`` and ``serve`` name the
bundle and the reason when it cannot load (missing weights, scripts or packages)."""

from __future__ import annotations

from pathlib import Path

import yaml

from tests.support import free_port, run_cli
from tests.test_detection_bundle import make_bundle


def write_config(tmp_path: Path, bundle: Path) -> Path:
    config = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port(),
                 "storage_dir": str(tmp_path / "var")},
        "http": {"port": free_port()},
        "plugins": {"nodules": {"factory": "monai_bundle",
                                "options": {"bundle_dir": str(bundle), "device": "cpu"}}},
        "routes": [{"name": "chest-ct", "match": {"Modality": "CT"}, "plugin": "nodules"}],
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_check_config_deep_names_the_bundle_and_the_missing_weights(tmp_path: Path) -> None:
    config = write_config(tmp_path, make_bundle(tmp_path, weights=False))

    shallow = run_cli("check-config", str(config))
    deep = run_cli("check-config", str(config), "--deep")

    assert shallow.returncode == 0, shallow.stderr
    assert deep.returncode == 3, deep.stdout + deep.stderr
    (line,) = [x for x in deep.stderr.splitlines() if "FAILED" in x]
    assert "lung_nodule_ct_detection" in line and "no weights" in line and "models/model.pt" in line


def test_check_config_deep_loads_a_working_bundle(tmp_path: Path) -> None:
    config = write_config(tmp_path, make_bundle(tmp_path))

    deep = run_cli("check-config", str(config), "--deep")

    assert deep.returncode == 0, deep.stderr
    assert "plugin nodules: OK (Lung nodule CT detection (MONAI Model Zoo) 0.6.8)" in deep.stdout


def test_serve_refuses_to_start_without_the_bundle_scripts(tmp_path: Path) -> None:
    config = write_config(tmp_path, make_bundle(tmp_path, scripts=False))

    serve = run_cli("serve", "--config", str(config))

    assert serve.returncode != 0
    last = serve.stderr.strip().splitlines()[-1]
    assert last.startswith("error: plugin 'nodules'") and "lung_nodule_ct_detection" in last, serve.stderr
    assert "scripts.detection_inferer.RetinaNetInferer" in last and "no scripts/ package" in last
    assert "Traceback" not in serve.stderr
