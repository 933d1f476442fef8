"""Run as a service (issue 17, item 7): ``scripts/install.sh`` lays out /opt, /etc and
/var/lib (here under a scratch root), the systemd unit passes ``systemd-analyze
verify``, and the installed node serves as an unprivileged user with those paths."""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.support import DCMTK_ENV, REPO, free_port, require_tool

USER = "nobody"  # an unprivileged user every Debian system has


@pytest.fixture(scope="module")
def installed() -> Iterator[Path]:
    """``install.sh --root`` into a scratch root other users can enter (pytest's own
    temporary folders are private to root)."""
    assert os.geteuid() == 0, "the install test needs root, as install.sh does"
    root = Path(tempfile.mkdtemp(prefix="dicom-node-install-"))
    root.chmod(0o755)
    try:
        run = subprocess.run(["bash", str(REPO / "scripts" / "install.sh"), "--root", str(root), "--user", USER],
                             capture_output=True, text=True, timeout=1200, check=False)
        assert run.returncode == 0, run.stdout + run.stderr
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_the_unit_passes_systemd_analyze_verify(installed: Path) -> None:
    require_tool("systemd-analyze")
    unit = installed / "etc" / "systemd" / "system" / "dicom-node.service"

    verify = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False)

    assert verify.returncode == 0, verify.stdout + verify.stderr
    text = unit.read_text()
    assert f"ExecStart={installed}/opt/dicom-node/.venv/bin/dicom-node serve --config " \
           f"{installed}/etc/dicom-node/config.yaml" in text
    assert f"User={USER}" in text and "KillSignal=SIGTERM" in text and "Restart=on-failure" in text


def test_the_shipped_unit_names_the_standard_paths() -> None:
    text = (REPO / "config" / "systemd" / "dicom-node.service").read_text()
    assert "ExecStart=/opt/dicom-node/.venv/bin/dicom-node serve --config /etc/dicom-node/config.yaml" in text
    assert "User=dicom-node" in text and "StateDirectory=dicom-node" in text
    assert "/var/lib/dicom-node/audit.jsonl" in (REPO / "config" / "systemd" / "dicom-node.logrotate").read_text()


def test_the_installed_node_serves_as_an_unprivileged_user(installed: Path) -> None:
    require_tool("setpriv")
    echoscu = require_tool("echoscu")
    config_path = installed / "etc" / "dicom-node" / "config.yaml"
    state = installed / "var" / "lib" / "dicom-node"
    config = yaml.safe_load(config_path.read_text())
    assert config["node"]["storage_dir"] == str(state)
    port = free_port()
    config["node"].update(host="127.0.0.1", port=port)
    config["http"] = {**config.get("http", {}), "host": "127.0.0.1", "port": free_port()}
    config_path.write_text(yaml.safe_dump(config))  # stays root's, readable by the node's group
    user = pwd.getpwnam(USER)
    assert oct(config_path.stat().st_mode & 0o777) == "0o640"

    node = subprocess.Popen(
        ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--init-groups",
         str(installed / "opt" / "dicom-node" / ".venv" / "bin" / "dicom-node"), "serve", "--config", str(config_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd="/")
    try:
        output = ""
        deadline = time.monotonic() + 180
        assert node.stdout is not None
        while "dicom-node ready" not in output and time.monotonic() < deadline and node.poll() is None:
            output += node.stdout.readline()
        assert "dicom-node ready" in output, output
        echo = subprocess.run([echoscu, "-aec", "DICOMNODE", "127.0.0.1", str(port)], env=DCMTK_ENV,
                              capture_output=True, text=True, timeout=30, check=False)
        assert echo.returncode == 0, echo.stderr
        database = state / "state.sqlite3"
        assert database.stat().st_uid == user.pw_uid and (state / "audit.jsonl").stat().st_uid == user.pw_uid
    finally:
        node.send_signal(signal.SIGTERM)
        rest, _ = node.communicate(timeout=120)
    assert node.returncode == 0, output + rest
