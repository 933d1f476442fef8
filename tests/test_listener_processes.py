"""The listener as several acceptor processes (``node.listener_processes``), with real peers.

Associations are spread over the processes; ``max_associations`` holds across all of
them; an acceptor killed with SIGKILL in the middle of transfers is restarted and
nothing it acknowledged is lost; metrics and health count every acceptor; stopping
the node (or killing it) leaves no process behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association
from pynetdicom.sop_class import CTImageStorage

from dicom_node.node import Node
from phantoms.ct_writer import simple_ct_volume, write_ct_series
from tests.support import (
    DCMTK_ENV,
    NodeProcess,
    acknowledged_files,
    descendants,
    free_port,
    node_config,
    require_tool,
    start_node,
    storescu,
)


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return write_ct_series(simple_ct_volume(120, 128, 128), tmp_path / "ct")


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _associate(port: int, title: str = "HOLDER") -> Association:
    ae = ApplicationEntity(title)
    ae.add_requested_context(CTImageStorage)
    return ae.associate("127.0.0.1", port, ae_title="DICOMNODE")


def _metric(node: Node, name: str, labels: str = "") -> float:
    from prometheus_client import generate_latest

    text = generate_latest(node.metrics_registry()).decode()
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _sop_uids(files: list[Path]) -> set[str]:
    return {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _registered(node: Node) -> set[str]:
    return {r["sop_instance_uid"] for r in node.db.query("SELECT sop_instance_uid FROM instances")}


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    """A node with two acceptor processes."""
    n = start_node(tmp_path, node={"listener_processes": 2}, retention={"ignored_days": None})
    yield n
    n.stop()


def test_associations_are_served_by_every_acceptor_and_counted_by_the_node(
        node: Node, series: list[Path]) -> None:
    assert node.acceptors is not None and len(node.acceptors.pids()) == 2
    assert all(pid != os.getpid() for pid in node.acceptors.pids())
    shares = [series[i::4] for i in range(4)]
    with_output = [subprocess.Popen(["storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                                     *map(str, share)], env=DCMTK_ENV) for share in shares]
    assert [p.wait(120) for p in with_output] == [0, 0, 0, 0]
    board = node.acceptors.board
    assert board is not None
    assert [board.counter(row, "association:accepted") for row in (0, 1)] == [2, 2]  # spread evenly
    assert sum(board.counter(row, "instance:new") for row in (0, 1)) == len(series)
    assert all(board.counter(row, "instance:new") > 0 for row in (0, 1))
    assert _registered(node) == _sop_uids(series)
    assert len(list(node.spool.root.rglob("*.dcm"))) == len(series)
    assert _metric(node, "dicomnode_instances_received_total", '{result="new"}') == len(series)
    assert _metric(node, "dicomnode_associations_total", '{outcome="accepted"}') == 4
    assert _metric(node, "dicomnode_bytes_received_total") == sum(p.stat().st_size for p in node.spool.root.rglob("*.dcm"))
    health = node.health()
    assert health["ready"] and health["checks"]["dicom_listener"]
    assert health["listener_processes"] == {"configured": 2, "serving": 2}
    audit = [json.loads(line) for line in node.config.audit_path.read_text().splitlines()]
    assert sum(1 for r in audit if r["event"] == "association" and r["outcome"] == "accepted") == 4


def test_max_associations_holds_across_acceptor_processes(tmp_path: Path) -> None:
    node = start_node(tmp_path, node={"listener_processes": 2, "max_associations": 2})
    held: list[Association] = []
    try:
        for _ in range(2):
            assoc = _associate(node.port)
            assert assoc.is_established
            held.append(assoc)
        assert node.acceptors is not None and node.acceptors.board is not None
        board = node.acceptors.board
        # one in each process: only a count shared by the processes can refuse the next
        assert [board.active(row) for row in (0, 1)] == [1, 1]
        refused = _associate(node.port, "THIRD")
        assert refused.is_rejected
        rj = refused.acceptor.primitive
        assert (rj.result, rj.result_source, rj.diagnostic) == (0x02, 0x03, 0x02)  # transient, local limit
        assert _metric(node, "dicomnode_associations_total",
                       '{outcome="rejected_too_many_associations"}') == 1
        audit = [json.loads(line) for line in node.config.audit_path.read_text().splitlines()]
        assert [r["reason"] for r in audit if r["event"] == "association" and r["outcome"] == "rejected"] \
            == ["too many associations"]
        held.pop().release()
        deadline = time.monotonic() + 5
        while True:  # the released association's slot comes back
            again = _associate(node.port, "FOURTH")
            if again.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert again.is_established
        held.append(again)
    finally:
        for assoc in held:
            assoc.release()
        node.stop()


def _wait_for_successes(log: Path, count: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while log.read_text(errors="replace").count("Received Store Response (Success)") < count:
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.01)


def test_acceptor_killed_mid_transfer_is_restarted_and_nothing_acknowledged_is_lost(
        node: Node, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    require_tool("storescu")
    files = write_ct_series(simple_ct_volume(300, 128, 128), tmp_path / "big")
    assert node.acceptors is not None
    victim = node.acceptors.pids()[0]
    logs = [tmp_path / f"storescu-{i}.log" for i in range(2)]
    senders = []
    for share, log in zip((files[0::2], files[1::2]), logs):
        with open(log, "wb") as out:
            senders.append(subprocess.Popen(
                ["storescu", "-v", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), *map(str, share)],
                stdout=out, stderr=subprocess.STDOUT, env=DCMTK_ENV))
    for log in logs:
        _wait_for_successes(log, 20)
    os.kill(victim, signal.SIGKILL)
    codes = [p.wait(120) for p in senders]
    assert any(codes) and not all(codes), codes  # the killed acceptor's peer failed, the other finished
    deadline = time.monotonic() + 30
    while not (len(node.acceptors.pids()) == 2 and victim not in node.acceptors.pids()
               and node.acceptors.running == 2):
        assert time.monotonic() < deadline, "the killed acceptor was not restarted"
        time.sleep(0.1)
    assert re.search(rf"acceptor \d \(pid {victim}\) killed by signal 9; restarting it", caplog.text), caplog.text
    acknowledged = [Path(f) for log in logs for f in acknowledged_files(log.read_text(errors="replace"))]
    assert len(acknowledged) > 40
    registered = _registered(node)
    missing = _sop_uids(acknowledged) - registered
    assert not missing, f"{len(missing)} acknowledged instances lost"
    spooled = {p.stem for p in node.spool.root.rglob("*.dcm")}
    assert _sop_uids(acknowledged) <= spooled
    # The node keeps serving: everything not yet stored goes in now, on both acceptors.
    rest = [f for f in files if str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) not in registered]
    result = storescu(node.port, rest)
    assert result.returncode == 0, result.stderr[-2000:]
    assert _registered(node) == _sop_uids(files)
    assert node.health()["checks"]["dicom_listener"]


def test_stop_finishes_in_flight_transfers_and_leaves_no_process(tmp_path: Path, ct150: list[Path]) -> None:
    """Also for an acceptor the node restarted (it must not die with the thread that restarted it)."""
    node = start_node(tmp_path, node={"listener_processes": 2}, retention={"ignored_days": None})
    assert node.acceptors is not None
    first = node.acceptors.pids()
    os.kill(first[0], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not (node.acceptors.running == 2 and first[0] not in node.acceptors.pids()):
        assert time.monotonic() < deadline, "the killed acceptor was not restarted"
        time.sleep(0.05)
    pids = node.acceptors.pids()
    results: list[subprocess.CompletedProcess[str]] = []
    senders = [threading.Thread(target=lambda share=share: results.append(storescu(node.port, share)))
               for share in (ct150[0::2], ct150[1::2])]
    for sender in senders:
        sender.start()
    board = node.acceptors.board
    assert board is not None
    while not all(board.counter(row, "instance:new") for row in (0, 1)):  # both acceptors are busy
        assert time.monotonic() < deadline + 30
        time.sleep(0.005)
    node.stop()
    for sender in senders:
        sender.join(60)
    for result in results:
        assert result.returncode == 0, result.stderr[-2000:]
    assert sum(r.stderr.count("Received Store Response (Success)") for r in results) == len(ct150)
    assert not [pid for pid in [*first, *pids] if _alive(pid)]


def test_killed_node_takes_its_acceptors_with_it_and_restarts_on_the_same_port(tmp_path: Path,
                                                                               series: list[Path]) -> None:
    cfg = node_config(tmp_path / "var", free_port(), node={"listener_processes": 2},
                      retention={"ignored_days": None})
    proc = NodeProcess(cfg, tmp_path / "run").start()
    try:
        assert proc.proc is not None
        acceptors = [pid for pid in descendants(proc.proc.pid) if "dicom_node.receive.acceptor"
                     in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")]
        assert len(acceptors) == 2
        assert storescu(proc.port, series[:10]).returncode == 0
        proc.kill9()
        deadline = time.monotonic() + 10
        while [pid for pid in acceptors if _alive(pid)]:
            assert time.monotonic() < deadline, "acceptors outlived the node"
            time.sleep(0.05)
        proc.start()  # the port is free again
        assert storescu(proc.port, series[10:20]).returncode == 0
        assert len(list((tmp_path / "var" / "spool").rglob("*.dcm"))) == 20
    finally:
        assert proc.stop() == 0


def test_acceptor_slot_folders_are_recovered_at_start(tmp_path: Path, series: list[Path]) -> None:
    """A complete slot left by any acceptor is registered; acceptors no longer configured
    lose their folder; the configured ones keep their empty slots."""
    from dicom_node.storage.spool import Spool, write_to_slot

    root = tmp_path / "var" / "spool"
    left = {}
    for row in (0, 1, 5):  # as a killed acceptor leaves them: a flushed slot never renamed, an empty one
        folder = Spool.acceptor_slots(root, row)
        folder.mkdir(parents=True)
        slot, empty = folder / f"{row}a.slot", folder / f"{row}b.slot"
        slot.touch()
        empty.touch()
        write_to_slot(slot, series[row].read_bytes())
        left[row] = (slot, empty)
    node = start_node(tmp_path, node={"listener_processes": 2}, retention={"ignored_days": None})
    try:
        assert _registered(node) == _sop_uids([series[0], series[1], series[5]])
        assert not any(slot.exists() for slot, _ in left.values())
        assert left[0][1].exists() and left[1][1].exists()
        assert not Spool.acceptor_slots(root, 5).exists()
        assert storescu(node.port, series[10:14]).returncode == 0
    finally:
        node.stop()


def test_many_writers_on_the_shared_database_fail_no_store(tmp_path: Path) -> None:
    """Small instances on 8 associations over 4 processes: the state database is written
    by all of them at a high rate, and waits for its lock instead of failing a C-STORE."""
    files = write_ct_series(simple_ct_volume(400, 16, 16), tmp_path / "small")
    node = start_node(tmp_path, node={"listener_processes": 4}, retention={"ignored_days": None})
    try:
        senders = [subprocess.Popen(["storescu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                                     *map(str, files[i::8])], env=DCMTK_ENV,
                                    stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                   for i in range(8)]
        errors = [p.communicate(timeout=180)[1].decode(errors="replace") for p in senders]
        assert [p.returncode for p in senders] == [0] * 8, "\n".join(errors)[-3000:]
        assert _registered(node) == _sop_uids(files)
        assert node.db.query("SELECT instance_count FROM studies")[0]["instance_count"] == len(files)
        assert _metric(node, "dicomnode_instances_received_total", '{result="new"}') == len(files)
        assert _metric(node, "dicomnode_instances_received_total", '{result="refused"}') == 0
    finally:
        node.stop()
