"""Shared benchmark helpers: test data, receivers in subprocesses, dcmtk senders.

Everything runs on loopback (127.0.0.1). Receivers are started fresh for every run,
with their storage in a new folder under ``bench/out/`` (the same filesystem as the
repository, so ``fsync`` costs what it costs on the disk, not on a tmpfs).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "bench" / "out"
LOOPBACK = "127.0.0.1"
# dcmtk (storescu, storescp, echoscu and Orthanc's DICOM layer) reads TCP_NODELAY.
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """A benchmark run that is invalid (a receiver failed or lost instances)."""


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


def require_tool(name: str) -> str:
    """Absolute path of an external program, or a clear error."""
    path = shutil.which(name) or (name if Path(name).is_file() else None)
    if not path:
        raise BenchError(f"{name} is not installed (scripts/setup.sh installs dcmtk and orthanc)")
    return path


def wait_until(predicate: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """Poll ``predicate`` until it is true or fail with ``what`` (and the log's tail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    tail = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
    raise BenchError(f"timed out waiting for {what}\n{tail}")


def run_dir(prefix: str) -> Path:
    """A fresh folder under bench/out for one run."""
    OUT.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"run-{prefix}-", dir=OUT))


# ---- test data -----------------------------------------------------------------------


def ct_series(slices: int, size: int = 512) -> list[Path]:
    """Uncompressed CT slices (Explicit VR Little Endian), generated once and cached.

    The cache is ``bench/out/ct-<slices>x<size>/``; a ``complete.json`` marker is
    written last, so an interrupted generation is redone.
    """
    from phantoms.ct_writer import simple_ct_volume, write_ct_series

    folder = OUT / f"ct-{slices}x{size}"
    marker = folder / "complete.json"
    if marker.exists():
        files = sorted(folder.glob("*.dcm"))
        if json.loads(marker.read_text()).get("count") == slices == len(files):
            return files
    shutil.rmtree(folder, ignore_errors=True)
    print(f"generating {slices} CT slices {size}x{size} in {folder} ...", file=sys.stderr)
    files = write_ct_series(simple_ct_volume(slices, size, size, seed=1), folder)
    marker.write_text(json.dumps({"count": len(files), "bytes": sum(p.stat().st_size for p in files)}))
    return files


# ---- process accounting --------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (and its reaped children) from /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = text.rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime + cutime + cstime) / CLOCK_TICKS


def process_table() -> dict[int, tuple[str, float]]:
    """Every process's command line and CPU seconds (for 'what else was running')."""
    table: dict[int, tuple[str, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        table[int(entry.name)] = (cmd[:100], cpu_seconds(int(entry.name)))
    return table


def busy_others(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                seconds: float, exclude: set[int], min_share: float = 0.1) -> list[str]:
    """Processes not started by the benchmark that used over ``min_share`` of a CPU."""
    lines = []
    for pid, (cmd, cpu) in after.items():
        if pid in exclude or pid not in before or not cmd:
            continue
        share = (cpu - before[pid][1]) / seconds if seconds > 0 else 0.0
        if share >= min_share:
            lines.append(f"pid {pid} {share:.0%} of a CPU: {cmd}")
    return lines


# ---- receivers -----------------------------------------------------------------------


@dataclass
class Receiver:
    """A Storage SCP in a subprocess with its own storage folder."""

    workdir: Path
    associations: int = 1  # how many the run will open at once
    ae_title: str = "RECEIVER"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    name = "receiver"

    @property
    def log_path(self) -> Path:
        return self.workdir / "receiver.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def cpu_measurable(self) -> bool:
        """Whether the receiver's CPU time is all in its own process."""
        return True

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def ready(self) -> bool:
        return echo_ok(self.ae_title, self.port)

    def received(self) -> int:
        """Instances the receiver stored (checked independently of the sender)."""
        raise NotImplementedError

    def start(self, timeout: float = 60.0) -> Receiver:
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd, env = self.command()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise BenchError(f"{self.name} exited with {self.proc.returncode}:\n"
                                 + self.log_path.read_text(errors="replace")[-3000:])
            return self.ready()

        wait_until(up, timeout, f"{self.name} to start", self.log_path)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def echo_ok(ae_title: str, port: int) -> bool:
    """True when a C-ECHO to ``ae_title`` on loopback succeeds."""
    result = subprocess.run(["echoscu", "-to", "2", "-aec", ae_title, LOOPBACK, str(port)],
                            capture_output=True, env=DCMTK_ENV, check=False)
    return result.returncode == 0


@dataclass
class NodeReceiver(Receiver):
    """``dicom-node serve`` with its default (durable) settings, on loopback, no routes.

    Only what a benchmark needs differs from the defaults: free ports, a fresh storage
    folder, a 1 MiB disk reserve, and retention off so that the received files can be
    counted after the run (with no routes, a study would otherwise be 'ignored' and
    removed 10 s after its last instance).
    """

    ae_title: str = "DICOMNODE"
    extra_config: dict[str, Any] = field(default_factory=dict)
    source: Path = REPO  # the checkout whose dicom_node runs (for A/B comparisons)
    name = "node"

    def command(self) -> tuple[list[str], dict[str, str]]:
        config: dict[str, Any] = {
            "node": {"ae_title": self.ae_title, "host": LOOPBACK, "port": self.port,
                     "storage_dir": str(self.workdir / "storage"), "min_free_disk_mb": 1},
            "http": {"host": LOOPBACK, "port": free_port()},
            "retention": {"ignored_days": None},
            **self.extra_config,
        }
        path = self.workdir / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        env = {**os.environ, "PYTHONPATH": str(self.source)}
        return [sys.executable, "-m", "dicom_node", "serve", "--config", str(path)], env

    def ready(self) -> bool:
        return "dicom-node ready" in self.log_path.read_text(errors="replace")

    def received(self) -> int:
        import sqlite3

        storage = self.workdir / "storage"
        files = sum(1 for p in (storage / "spool").rglob("*.dcm"))
        conn = sqlite3.connect(f"file:{storage / 'state.sqlite3'}?mode=ro", uri=True)
        try:
            rows = conn.execute("SELECT COUNT(*) FROM instances WHERE purged=0").fetchone()[0]
        finally:
            conn.close()
        return min(files, int(rows))


@dataclass
class StoreSCPReceiver(Receiver):
    """dcmtk ``storescp`` writing every instance to a folder.

    For concurrent associations it runs with ``--fork`` (a child process per
    association; storescp otherwise serves one association at a time). Its children's
    CPU time cannot be read reliably, so :attr:`cpu_measurable` is then False.
    """

    ae_title: str = "STORESCP"
    name = "storescp"

    @property
    def cpu_measurable(self) -> bool:
        return self.associations == 1

    def command(self) -> tuple[list[str], dict[str, str]]:
        out = self.workdir / "files"
        out.mkdir(parents=True, exist_ok=True)
        fork = ["--fork"] if self.associations > 1 else []
        return [require_tool("storescp"), *fork, "-aet", self.ae_title, "-od", str(out), str(self.port)], DCMTK_ENV

    def received(self) -> int:
        return sum(1 for p in (self.workdir / "files").iterdir() if p.is_file() and p.stat().st_size > 0)


@dataclass
class OrthancReceiver(Receiver):
    """Orthanc with its own configuration: free ports, own storage, no plugins, no auth, local only."""

    ae_title: str = "ORTHANC"
    http_port: int = field(default_factory=free_port)
    name = "orthanc"

    def command(self) -> tuple[list[str], dict[str, str]]:
        config = {
            "Name": "bench",
            "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"),
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "SslEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomModalities": {},
            "OrthancPeers": {},
            "SaveJobs": False,
        }
        path = self.workdir / "orthanc.json"
        path.write_text(json.dumps(config, indent=2))
        orthanc = shutil.which("Orthanc") or require_tool("/usr/sbin/Orthanc")
        return [orthanc, str(path)], DCMTK_ENV

    def _get(self, route: str) -> Any:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{self.http_port}{route}", timeout=10) as rsp:
            return json.load(rsp)

    def ready(self) -> bool:
        try:
            self._get("/system")
        except OSError:
            return False
        return echo_ok(self.ae_title, self.port)

    def received(self) -> int:
        return int(self._get("/statistics")["CountInstances"])


RECEIVERS: dict[str, type[Receiver]] = {
    "node": NodeReceiver,
    "storescp": StoreSCPReceiver,
    "orthanc": OrthancReceiver,
}


# ---- sending ---------------------------------------------------------------------------


@dataclass
class SendResult:
    """What the storescu processes of one run did."""

    seconds: float  # first start to last finish
    returncodes: list[int]
    responses: int  # Store Responses seen, any status
    successes: int  # Store Responses with Success
    logs: list[Path]


def split(files: Sequence[Path], parts: int) -> list[list[Path]]:
    """``files`` cut into ``parts`` contiguous chunks of nearly equal size."""
    size, rest = divmod(len(files), parts)
    chunks, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < rest else 0)
        chunks.append(list(files[start:end]))
        start = end
    return chunks


def send(files: Sequence[Path], port: int, called: str, associations: int, workdir: Path) -> SendResult:
    """Send ``files`` with ``associations`` concurrent storescu processes (each a share)."""
    storescu = require_tool("storescu")
    chunks = split(files, associations)
    logs = [workdir / f"storescu-{i}.log" for i in range(len(chunks))]
    cmds = [[storescu, "-v", "-R", "-aec", called, "-aet", "BENCHSCU", LOOPBACK, str(port), *map(str, chunk)]
            for chunk in chunks]
    with ExitStack() as stack:
        handles = [stack.enter_context(open(log, "wb")) for log in logs]
        procs: list[subprocess.Popen[bytes]] = []
        start = time.perf_counter()
        try:
            for cmd, handle in zip(cmds, handles):
                procs.append(subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=DCMTK_ENV))
            codes = [p.wait(timeout=1800) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        seconds = time.perf_counter() - start
    responses = successes = 0
    for log in logs:
        text = log.read_text(errors="replace")
        responses += text.count("Received Store Response")
        successes += text.count("Received Store Response (Success)")
    return SendResult(seconds, codes, responses, successes, logs)


def validate(result: SendResult, expected: int, received: int, who: str) -> None:
    """Refuse a run in which anything failed: a broken receiver must not look fast."""
    problems = []
    if any(result.returncodes):
        problems.append(f"storescu exit codes {result.returncodes}")
    if result.responses != expected or result.successes != expected:
        problems.append(f"{result.successes} Success of {result.responses} responses for {expected} files")
    if received != expected:
        problems.append(f"{who} stored {received} of {expected} instances")
    if problems:
        tail = result.logs[0].read_text(errors="replace")[-2000:] if result.logs else ""
        raise BenchError(f"invalid run against {who}: " + "; ".join(problems) + "\n" + tail)
