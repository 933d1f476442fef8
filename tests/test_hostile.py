"""Hostile and broken peers: silent and aborting associations, unknown SOP classes and
private transfer syntaxes, oversize instances, broken pixel data. Each gets a precise
status or a recorded reason, and the node keeps serving other peers."""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom.ae import ApplicationEntity
from pynetdicom.sop_class import CTImageStorage

from dicom_node.node import Node
from phantoms.ct_writer import simple_ct_volume, write_ct_series
from tests.support import start_node, DCMTK_ENV, free_port, node_config, storescu, wait_for


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    # In the node's own process: some tests look at the listener's associations.
    n = start_node(tmp_path, node={"acse_timeout_seconds": 1, "network_timeout_seconds": 2,
                                   "listener_processes": 1},
                   retention={"ignored_days": None})
    yield n
    n.stop()


def _echo_ok(port: int) -> bool:
    return subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(port)],
                          capture_output=True, env=DCMTK_ENV).returncode == 0


def test_silent_connections_time_out_and_others_are_served(node: Node) -> None:
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(3)]
    try:
        assert _echo_ok(node.port)  # served while the silent peers sit there
        for s in silent:  # each closed by the node at the ACSE timeout (1 s)
            s.settimeout(3)
            assert s.recv(1024) == b""
        wait_for(lambda: not [a for a in node.scp.ae.active_associations if a.is_alive()], 2,
                 "the silent peers' associations to end")
    finally:
        for s in silent:
            s.close()
    assert _echo_ok(node.port)


def test_abort_half_way_stores_only_complete_instances(node: Node, tmp_path: Path) -> None:
    files = write_ct_series(simple_ct_volume(4, 64, 64), tmp_path / "ct")
    ae = ApplicationEntity("ABORTER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    for path in files[:2]:
        assert assoc.send_c_store(dcmread(path)).Status == 0
    assoc.abort()
    # the node has handled the abort once its side of the association has ended
    wait_for(lambda: not [a for a in node.scp.ae.active_associations if a.is_alive()], 5,
             "the aborted association to end")
    assert len(list(node.spool.root.rglob("*.dcm"))) == 2
    assert _echo_ok(node.port)
    assert storescu(node.port, files).returncode == 0  # the sender retries; duplicates are fine
    assert node.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 4


def test_unknown_sop_class_and_private_transfer_syntax_are_not_accepted(node: Node, tmp_path: Path) -> None:
    ae = ApplicationEntity("ODDBALL")
    ae.add_requested_context("1.2.999.1.2.3", ["1.2.840.10008.1.2.1"])  # unknown SOP class
    ae.add_requested_context(CTImageStorage, ["1.2.999.7.7"])  # private transfer syntax
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    # pynetdicom rejects an association where no context was accepted
    accepted = assoc.accepted_contexts if assoc.is_established else []
    assert accepted == []
    if assoc.is_established:
        assoc.release()
    assert _echo_ok(node.port)
    assert not list(node.spool.root.rglob("*.dcm"))


def test_oversize_instance_is_refused_out_of_resources(tmp_path: Path) -> None:
    node = start_node(tmp_path, node={"max_instance_mb": 1})
    try:
        files = write_ct_series(simple_ct_volume(1, 1024, 1024), tmp_path / "big")  # 2 MiB
        result = storescu(node.port, files)
        assert "Out of Resources" in result.stderr or "OutOfResources" in result.stderr, result.stderr
        assert not list(node.spool.root.rglob("*.dcm"))
        assert _echo_ok(node.port)
    finally:
        node.stop()


@pytest.mark.parametrize("damage, reason", [
    ("short", "cannot decode pixel data"),
    ("missing", "no pixel data"),
])
def test_broken_pixel_data_fails_the_job_with_its_reason(tmp_path: Path, damage: str, reason: str) -> None:
    from tests.support import FAKE_PLUGIN, NodeProcess, dense_phantom, dense_route

    files = write_ct_series(dense_phantom(12, 32), tmp_path / "ct")
    ds = dcmread(files[5])
    if damage == "short":
        ds.PixelData = ds.PixelData[: len(ds.PixelData) // 2]  # half of Rows x Columns x 16 bits
    else:
        del ds.PixelData
    ds.save_as(files[5], enforce_file_format=True)
    cfg = node_config(tmp_path / "var", free_port(), plugins=FAKE_PLUGIN, routes=dense_route([]))
    proc = NodeProcess(cfg, tmp_path / "node").start()
    try:
        assert storescu(proc.port, files).returncode == 0
        status = proc.wait_for(lambda s: any(j["state"] == "failed" for j in s["jobs"]), what="job failed")
        assert reason in status["jobs"][0]["reason"] and "slice" in status["jobs"][0]["reason"]
        assert status["studies"][0]["state"] == "failed"
        assert _echo_ok(proc.port)
    finally:
        proc.stop()


@pytest.mark.parametrize("jobs, reason", [
    ({"max_series_slices": 10}, "the limit is 10 (jobs.max_series_slices)"),
    ({"max_volume_mb": 1}, "series too large"),
])
def test_resource_limits_refuse_a_series_with_a_reason(tmp_path: Path, jobs: dict, reason: str) -> None:
    from tests.support import FAKE_PLUGIN, NodeProcess, dense_phantom, dense_route

    files = write_ct_series(dense_phantom(20, 128), tmp_path / "ct")  # 20 x 128 x 128 float32 > 1 MiB
    cfg = node_config(tmp_path / "var", free_port(), plugins=FAKE_PLUGIN, routes=dense_route([]), jobs=jobs)
    proc = NodeProcess(cfg, tmp_path / "node").start()
    try:
        assert storescu(proc.port, files).returncode == 0
        status = proc.wait_for(lambda s: any(j["state"] == "failed" for j in s["jobs"]), what="job refused")
        assert reason in status["jobs"][0]["reason"], status["jobs"][0]["reason"]
    finally:
        proc.stop()


def test_character_set_garbage_is_stored_as_sent(node: Node, tmp_path: Path) -> None:
    files = write_ct_series(simple_ct_volume(1, 16, 16), tmp_path / "cs")
    ds = dcmread(files[0])
    ds.SpecificCharacterSet = "ISO_IR 999"  # no such character set
    ds.SeriesDescription = b"\xff\xfe\x80 garbage \x1b$B\x00".decode("latin-1")
    ds.save_as(files[0], enforce_file_format=True)
    result = storescu(node.port, files)
    assert result.returncode == 0 and "Received Store Response (Success)" in result.stderr
    stored = list(node.spool.root.rglob("*.dcm"))
    assert len(stored) == 1
    assert stored[0].read_bytes().endswith(files[0].read_bytes()[-1000:])  # bytes kept as sent
    assert _echo_ok(node.port)


def test_idle_association_is_aborted_at_the_network_timeout(node: Node) -> None:
    """The event-driven reactors still watch their timers while nothing arrives."""
    from dicom_node.receive.reactor import WakingAssociation

    ae = ApplicationEntity("IDLE")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        acceptors = [a for a in node.scp.ae.active_associations if a.is_alive()]
        assert acceptors and all(isinstance(a, WakingAssociation) for a in acceptors)
        deadline = time.monotonic() + 6
        while assoc.is_established and time.monotonic() < deadline:  # network timeout is 2 s
            time.sleep(0.1)
        assert assoc.is_aborted
        for acceptor in acceptors:
            acceptor.join(5)
            assert not acceptor.is_alive()
    finally:
        if assoc.is_established:
            assoc.release()
    assert _echo_ok(node.port)


def test_bulk_recv_reads_whole_pdus_across_partial_sends_and_stops_at_close() -> None:
    import threading

    from dicom_node.receive.reactor import BulkRecvSocket

    ours, peer = socket.socketpair()
    reader = BulkRecvSocket.__new__(BulkRecvSocket)
    reader.socket = ours
    payload = bytes(range(256)) * 1000

    def trickle() -> None:
        for start in range(0, len(payload), 7000):
            peer.sendall(payload[start:start + 7000])
            time.sleep(0.001)
        peer.sendall(b"tail")
        peer.close()

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        assert reader.recv(len(payload)) == payload
        assert reader.recv(100) == b"tail"  # the peer closed: what was read
        assert reader.recv(10) == b""
    finally:
        sender.join()
        ours.close()


def test_bulk_recv_grows_with_the_data_not_with_the_announced_length() -> None:
    import tracemalloc

    from dicom_node.receive.reactor import BulkRecvSocket

    ours, peer = socket.socketpair()
    reader = BulkRecvSocket.__new__(BulkRecvSocket)
    reader.socket = ours
    peer.sendall(b"x" * 3000)
    peer.close()
    tracemalloc.start()
    try:
        got = reader.recv(0xFFFFFFF0)  # announced 4 GiB, sent 3000 bytes
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        ours.close()
    assert got == b"x" * 3000
    assert peak < 8 << 20


def test_pdu_over_the_limit_is_refused_and_the_node_keeps_serving(node: Node) -> None:
    """A peer announcing a 4 GiB P-DATA-TF is disconnected at once, before any of it is
    read or allocated (the node advertises 256 KiB PDUs)."""
    import struct

    peer = socket.create_connection(("127.0.0.1", node.port))
    try:
        peer.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0) + b"\0" * 64)
        peer.settimeout(1.5)  # well under the ACSE (1 s + polling) and network (2 s) timeouts' sum
        assert peer.recv(1024) == b""  # closed by the node
    finally:
        peer.close()
    assert _echo_ok(node.port)
