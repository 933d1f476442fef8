"""Pre-flight: ``check-config`` names every problem with its exit code, and ``serve``
fails fast, in one line, before it loads any model (issue 17, items 2 and 3)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import yaml

from tests.support import FAKE_PLUGIN, StoreSCP, dense_route, free_port, node_config, run_cli


def write(tmp_path: Path, config: dict[str, Any]) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def dense_config(tmp_path: Path, marker: Path | None = None, **sections: Any) -> dict[str, Any]:
    """A node with the test plugin (its ``marker`` file records every time it is created)."""
    plugins = {"dense": {**FAKE_PLUGIN["dense"], "options": {"threshold": 300, "marker": str(marker or
                                                                                             tmp_path / "loaded")}}}
    return node_config(tmp_path / "var", free_port(), plugins=plugins, routes=dense_route([]), **sections)


@contextmanager
def listening(port: int) -> Iterator[None]:
    """Another program holding ``port`` on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def test_a_good_configuration_is_ready_to_serve(tmp_path: Path) -> None:
    result = run_cli("check-config", str(write(tmp_path, dense_config(tmp_path))))

    assert result.returncode == 0, result.stderr
    assert "plugin dense (route 'dense-ct'): OK (module 'tests.fake_plugins')" in result.stdout
    assert "ready to serve" in result.stdout
    assert not (tmp_path / "var").exists(), "the pre-flight leaves no folder behind"
    assert not (tmp_path / "loaded").exists(), "without --deep no plugin is created"


def test_a_misspelt_plugin_is_a_configuration_error_named_by_its_route(tmp_path: Path) -> None:
    config = dense_config(tmp_path)
    config["routes"][0]["plugin"] = "lung_nodule"

    result = run_cli("check-config", str(write(tmp_path, config)))

    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "FAILED" in x]
    assert line.startswith("plugin lung_nodule (route 'dense-ct'): FAILED")
    assert "did you mean 'lung_nodules'?" in line


def test_storage_under_a_file_and_a_port_in_use_are_environment_errors(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    config = dense_config(tmp_path)
    config["node"]["storage_dir"] = str(tmp_path / "file" / "var")

    with listening(config["node"]["port"]):
        result = run_cli("check-config", str(write(tmp_path, config)))
        no_ports = run_cli("check-config", str(write(tmp_path, config)), "--no-ports")

    assert result.returncode == 3, result.stdout + result.stderr
    assert f"{tmp_path / 'file'} is a file, not a folder" in result.stderr
    assert f"node.port {config['node']['port']} on 127.0.0.1: FAILED: cannot be bound: Address already in use" \
        in result.stderr
    assert no_ports.returncode == 3 and "node.port" not in no_ports.stdout + no_ports.stderr


def test_echo_tries_every_destination(tmp_path: Path) -> None:
    up, down = free_port(), free_port()
    config = dense_config(tmp_path, destinations={"pacs": {"ae_title": "DEST", "host": "127.0.0.1", "port": up},
                                                  "old": {"ae_title": "OLD", "host": "127.0.0.1", "port": down}})
    config["delivery"]["connect_timeout_seconds"] = 3
    scp = StoreSCP(up, tmp_path / "received").start()
    try:
        result = run_cli("check-config", str(write(tmp_path, config)), "--echo")
    finally:
        scp.stop()

    assert result.returncode == 3, result.stdout + result.stderr
    assert f"destination pacs (DEST@127.0.0.1:{up}): OK (C-ECHO status 0x0000)" in result.stdout
    assert f"destination old (OLD@127.0.0.1:{down}): FAILED" in result.stderr


def test_deep_creates_the_plugin(tmp_path: Path) -> None:
    marker = tmp_path / "loaded"
    result = run_cli("check-config", str(write(tmp_path, dense_config(tmp_path, marker))), "--deep")

    assert result.returncode == 0, result.stderr
    assert "plugin dense: OK (Test Dense Lesions 0.0.1)" in result.stdout
    assert marker.exists()


def test_serve_fails_in_one_line_before_loading_any_model(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a folder")
    marker = tmp_path / "loaded"
    config = dense_config(tmp_path, marker)
    config["node"]["storage_dir"] = str(tmp_path / "file" / "var")

    with listening(config["node"]["port"]):
        serve = run_cli("serve", "--config", str(write(tmp_path, config)))

    assert serve.returncode == 3, serve.stderr
    assert "Traceback" not in serve.stderr
    errors = serve.stderr.strip().splitlines()
    assert len(errors) == 2 and all(line.startswith("error: ") for line in errors), serve.stderr
    assert "is a file, not a folder" in errors[0] and "Address already in use" in errors[1]
    assert not marker.exists(), "the model must not load when the node cannot serve"


def test_serve_names_a_misspelt_plugin_with_exit_code_2(tmp_path: Path) -> None:
    config = dense_config(tmp_path)
    config["routes"][0]["plugin"] = "dence"
    config["plugins"] = {}

    serve = run_cli("serve", "--config", str(write(tmp_path, config)))

    assert serve.returncode == 2, serve.stderr
    assert serve.stderr.startswith("error: plugin dence (route 'dense-ct'): FAILED") and "Traceback" not in serve.stderr
