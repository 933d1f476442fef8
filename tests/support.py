"""Test helpers: free ports, a node in a subprocess, dcmtk peers, generated studies."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import yaml

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"  # third-party test material, each part with its NOTICE
REAL_CT = FIXTURES / "dicom" / "real_ct_3slice"  # three real CT slices, a SEG and an SR (dcmqi)
BUNDLE_FIXTURES = FIXTURES / "monai_bundles"  # Model Zoo bundle configs (no weights)
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
T = TypeVar("T")


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """Path of a tool CI installs; fail (never skip) when it is missing."""
    from shutil import which

    path = which(name)
    assert path, f"{name} is not installed: run the README's test command (it installs dcmtk, dicom3tools, orthanc)"
    return path


def wait_for(predicate: Callable[[], T | None], timeout: float, what: str, every: float = 0.1) -> T:
    """Poll ``predicate`` until it returns something true and return that; fail after
    ``timeout`` seconds naming ``what``. Tests observe state (status, the audit trail, a
    log, a peer's API) this way instead of sleeping a fixed time."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(every)


def tcp_listening(port: int) -> bool:
    """Whether a socket listens on TCP ``port`` (``/proc/net/tcp``: no connection is made,
    which a TLS or a strict server would count as a failed peer)."""
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, _, state = line.split()[:4]
        if state == "0A" and int(local.split(":")[1], 16) == port:
            return True
    return False


def run_cli(*args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """``python -m dicom_node ARGS`` from the checkout, as an admin would run it."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=env, check=False)


def node_config(storage: Path, port: int, **sections: Any) -> dict[str, Any]:
    """A minimal config for a test node on loopback with quick polling."""
    cfg: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port,
                 "storage_dir": str(storage), "min_free_disk_mb": 1, "shutdown_grace_seconds": 5},
        "assembly": {"default_stable_seconds": 1, "poll_seconds": 0.2},
        "delivery": {"retry_initial_seconds": 0.5, "retry_max_seconds": 2},
        "http": {"port": free_port()},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key] = {**cfg[key], **value}
        else:
            cfg[key] = value
    return cfg


def start_node(tmp_path: Path, **sections: Any) -> Any:
    """An in-process node (real listener on a free loopback port), started."""
    from dicom_node.config import parse_config
    from dicom_node.node import Node

    node = Node(parse_config(node_config(tmp_path / "var", free_port(), **sections)))
    node.start()
    return node


def descendants(pid: int) -> set[int]:
    """The pids of every process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        parents[int(stat.parent.name)] = int(fields[1])
    found: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


@dataclass
class NodeProcess:
    """``dicom-node serve`` in a subprocess, as an admin would run it."""

    config: dict[str, Any]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / "config.yaml"
        self.log_path = self.workdir / "node.log"

    @property
    def port(self) -> int:
        return int(self.config["node"]["port"])

    def start(self, timeout: float = 60.0) -> "NodeProcess":
        self.config_path.write_text(yaml.safe_dump(self.config))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        offset = len(self.log())
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if "dicom-node ready" in self.log()[offset:]:
                return self
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited with {self.proc.returncode}:\n{self.log()}")
            time.sleep(0.1)
        raise AssertionError(f"node did not start in {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError("node did not stop on SIGTERM") from None

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def status(self) -> dict[str, Any]:
        import json

        out = self.cli("status", "--json", "--config", str(self.config_path))
        return json.loads(out.stdout)

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        result = subprocess.run([sys.executable, "-m", "dicom_node", *args], capture_output=True,
                                text=True, cwd=REPO, env=env, timeout=120)
        if check:
            assert result.returncode == 0, result.stderr + result.stdout
        return result

    def wait_for(self, predicate: Any, timeout: float = 120.0, what: str = "condition") -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        status: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status = self.status()
            if predicate(status):
                return status
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; status: {status}\nlog:\n{self.log()[-4000:]}")


@dataclass
class StoreSCP:
    """dcmtk ``storescp`` as a destination."""

    port: int
    out_dir: Path
    ae_title: str = "DEST"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "StoreSCP":
        require_tool("storescp")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.ae_title, "-od", str(self.out_dir), "+xa", str(self.port)],
            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            ok = subprocess.run(["echoscu", "-aec", self.ae_title, "127.0.0.1", str(self.port)],
                                capture_output=True, env=DCMTK_ENV).returncode == 0
            if ok:
                return self
            time.sleep(0.1)
        raise AssertionError("storescp did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def files(self) -> list[Path]:
        return sorted(p for p in self.out_dir.iterdir() if p.is_file())


def storescu(port: int, files: list[Path] | Path, *extra: str, called: str = "DICOMNODE",
             calling: str = "STORESCU", timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run dcmtk storescu (verbose) against a node on loopback."""
    require_tool("storescu")
    targets = [str(files)] if isinstance(files, Path) else [str(f) for f in files]
    args = ["storescu", "-v", "-aec", called, "-aet", calling, *extra]
    if isinstance(files, Path) and files.is_dir():
        args += ["+sd", "+r"]
    return subprocess.run([*args, "127.0.0.1", str(port), *targets], capture_output=True, text=True,
                          env=DCMTK_ENV, timeout=timeout)


def acknowledged_files(storescu_output: str) -> list[str]:
    """Files storescu saw acknowledged with Success, from its -v output."""
    acked, current = [], None
    for line in storescu_output.splitlines():
        if "Sending file:" in line:
            current = line.split("Sending file:", 1)[1].strip()
        elif "Received Store Response (Success)" in line and current:
            acked.append(current)
            current = None
    return acked


def dense_phantom(slices: int, size: int = 128, seed: int = 0) -> np.ndarray:
    """A body-like volume with two dense spheres the test plugin finds (HU > 300)."""
    from phantoms.ct_writer import simple_ct_volume

    vol = simple_ct_volume(slices, size, size, seed=seed)
    zz, yy, xx = np.mgrid[0:slices, 0:size, 0:size]
    for cz, cy, cx, r in ((slices // 2, size // 2, size // 3, 6), (slices // 3, size // 2, 2 * size // 3, 4)):
        vol[(zz - cz) ** 2 + (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 600.0
    return vol


FAKE_PLUGIN = {"dense": {"factory": "tests.fake_plugins:create", "options": {"threshold": 300}}}


def dense_route(destinations: list[str], stable: float = 1.0) -> list[dict[str, Any]]:
    return [{"name": "dense-ct", "match": {"Modality": "^CT$"}, "plugin": "dense",
             "stable_seconds": stable, "destinations": destinations}]
