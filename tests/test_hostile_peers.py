"""Hostile peers at the protocol level, against ``dicom-node serve`` with two acceptor
processes, over raw sockets: stalled handshakes and PDUs, unknown PDU types, oversized
association requests and control characters in AE titles."""

from __future__ import annotations

import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from phantoms.ct_writer import simple_ct_volume, write_ct_series
from tests.raw_pdu import associate_rq, exchange
from tests.support import DCMTK_ENV, NodeProcess, free_port, node_config, require_tool, wait_for

ACSE_S, NETWORK_S = 2.0, 3.0
VERIFICATION = b"1.2.840.10008.1.1"
IMPLICIT = b"1.2.840.10008.1.2"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("peers")
    config = node_config(root / "var", free_port(), routes=[])
    config["node"].update(listener_processes=2, max_associations=4, acse_timeout_seconds=ACSE_S,
                          network_timeout_seconds=NETWORK_S)
    proc = NodeProcess(config, root / "work").start()
    try:
        yield proc
    finally:
        proc.stop()


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the node closes ``sock`` (reading whatever it sends), or None."""
    sock.settimeout(seconds)
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return None
    except ConnectionResetError:
        pass
    return time.monotonic() - started


def _taken_in(port: int, peers: list[socket.socket]) -> bool:
    """Whether the node has accepted each of ``peers``' connections and read all they sent:
    the node's end of each (``/proc/net/tcp``: local port ``port``, the peer's port as remote)
    is established with nothing left in its receive queue."""
    wanted = {sock.getsockname()[1] for sock in peers}
    read = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        _, local, remote, state, queues = line.split()[:5]
        if int(local.split(":")[1], 16) == port and state == "01" and int(queues.split(":")[1], 16) == 0:
            read.add(int(remote.split(":")[1], 16))
    return wanted <= read


def _stalled_request(port: int) -> socket.socket:
    """A connection that sends 20 bytes of an A-ASSOCIATE-RQ and then nothing."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(associate_rq(b"DICOMNODE", b"STALLED", [(VERIFICATION, [IMPLICIT])])[:20])
    return sock


def test_stalled_peers_take_no_slot_and_are_cut_at_the_acse_timeout(node: NodeProcess, tmp_path: Path) -> None:
    files = write_ct_series(simple_ct_volume(3, 32, 32), tmp_path / "ct")
    stalled = [_stalled_request(node.port) for _ in range(20)]  # five times max_associations
    try:
        wait_for(lambda: _taken_in(node.port, stalled), 10, "the node to read the 20 stalled requests")
        sent = subprocess.run([require_tool("storescu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.port),
                               *map(str, files)], capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
        assert sent.returncode == 0, sent.stderr
        for sock in stalled:  # each is closed within the ACSE timeout (plus a second)
            waited = _closed_within(sock, ACSE_S + 1.5)
            assert waited is not None
    finally:
        for sock in stalled:
            sock.close()


def test_a_pdu_stalled_half_way_is_cut_at_the_network_timeout(node: NodeProcess) -> None:
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(associate_rq(b"DICOMNODE", b"STALLED", [(VERIFICATION, [IMPLICIT])]))
        sock.settimeout(5)
        assert sock.recv(1) == b"\x02"  # A-ASSOCIATE-AC
        sock.recv(65536)
        sock.sendall(struct.pack(">BBI", 0x04, 0, 2**20) + bytes(10))  # P-DATA of 1 MiB: 10 bytes come
        waited = _closed_within(sock, NETWORK_S + 3)
        assert waited is not None and waited < NETWORK_S + 1
    assert "no complete PDU within 3 s: 10 of 1048576 bytes arrived" in node.log()


def test_unknown_pdu_type_gets_an_abort(node: NodeProcess) -> None:
    with socket.create_connection(("127.0.0.1", node.port)) as sock:
        sock.sendall(b"\x09\x00\x00\x00\x00\x10" + bytes(16))
        sock.settimeout(5)
        reply = sock.recv(100)
        # A-ABORT, source service provider (2), reason unrecognised PDU (1)
        assert reply == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x01"
        assert _closed_within(sock, 2) is not None


def test_huge_association_request_refused_in_a_few_log_lines(node: NodeProcess) -> None:
    """2.7 MB, 100 000 bogus transfer syntaxes: once 4 s of CPU and a log line each."""
    syntaxes = [f"X.BOGUS.TRANSFER.{i:06d}.X".encode() for i in range(100_000)]
    contexts = [(b"1.2.840.10008.5.1.4.1.1.2", syntaxes[i:i + 2000]) for i in range(0, len(syntaxes), 2000)]
    request = associate_rq(b"DICOMNODE", b"FLOODER", contexts)
    assert len(request) > 2.6e6
    before = len(node.log().splitlines())
    started = time.monotonic()
    reply = exchange(node.port, request)
    assert time.monotonic() - started < 2
    assert reply == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x01"  # A-ASSOCIATE-RJ, permanent, no reason
    # the connection's last line: pynetdicom closes it with the reason the reactor gave
    wait_for(lambda: "pynetdicom.dul: A-ASSOCIATE-RQ refused: 2000 transfer syntaxes" in node.log(), 10,
             "the refused request's connection closed")
    added = node.log().splitlines()[before:]
    assert 1 <= len(added) <= 4, added
    assert any("2000 transfer syntaxes in one presentation context (at most 64)" in line for line in added)


def test_control_characters_from_a_peer_are_escaped_in_the_log(node: NodeProcess) -> None:
    forged = b"EVIL\nFORGED LINE"  # a calling AE title (16 bytes) that would start a fake log line
    before = len(node.log())
    exchange(node.port, associate_rq(b"DICOMNODE", forged, [(VERIFICATION, [IMPLICIT])]))
    # the last line about this request: pynetdicom gives up decoding it (and says why)
    wait_for(lambda: "pynetdicom.dul: Invalid 'Calling AE Title' value 'EVIL\\nFORGED LINE'" in node.log()[before:],
             10, "the forged request's last log line")
    added = node.log()[before:]
    assert "EVIL\\nFORGED LINE" in added
    assert not any(line.startswith("FORGED") for line in added.splitlines())
    assert "Traceback" not in added  # pynetdicom's tracebacks for a peer's errors: one line each


def test_sigterm_with_stalled_peers_ends_within_the_grace_time(tmp_path: Path) -> None:
    config = node_config(tmp_path / "var", free_port(), routes=[])
    config["node"].update(listener_processes=2, shutdown_grace_seconds=3)  # ACSE 30 s, network 60 s
    proc = NodeProcess(config, tmp_path / "work").start()
    stalled = [_stalled_request(proc.port) for _ in range(4)]
    mid_pdu = socket.create_connection(("127.0.0.1", proc.port))
    try:
        mid_pdu.sendall(associate_rq(b"DICOMNODE", b"STALLED", [(VERIFICATION, [IMPLICIT])]))
        mid_pdu.settimeout(5)
        assert mid_pdu.recv(1) == b"\x02"
        mid_pdu.sendall(struct.pack(">BBI", 0x04, 0, 2**20) + bytes(10))
        wait_for(lambda: _taken_in(proc.port, [*stalled, mid_pdu]), 10, "the node to read what the peers sent")
        started = time.monotonic()
        assert proc.stop() == 0
        assert time.monotonic() - started < 3 + 3  # the grace, and the node's own shutdown
    finally:
        for sock in [*stalled, mid_pdu]:
            sock.close()
        proc.stop()


def test_slots_of_peers_that_vanish_are_free_at_once(node: NodeProcess) -> None:
    """max_associations (4) peers associate and drop the connection without a release:
    their slots are free again at once, not after a timeout."""
    gone = []
    for _ in range(4):
        sock = socket.create_connection(("127.0.0.1", node.port))
        sock.sendall(associate_rq(b"DICOMNODE", b"VANISHING", [(VERIFICATION, [IMPLICIT])]))
        sock.settimeout(5)
        assert sock.recv(1) == b"\x02"
        gone.append(sock)
    for sock in gone:
        sock.close()
    # each drop is seen at once and its association closed, before any timeout (3 s) could
    wait_for(lambda: node.log().count("aborted: calling=VANISHING") == 4, 2.5,
             "the four dropped associations to close")
    echo = subprocess.run([require_tool("echoscu"), "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=30)
    assert echo.returncode == 0, echo.stderr
