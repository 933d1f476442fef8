"""The acceptor's shared-socket server keeps the board's association count exact."""

from __future__ import annotations

import socket
import threading
import time
from pathlib import Path

import pytest
from pynetdicom.ae import ApplicationEntity
from pynetdicom.sop_class import Verification

from dicom_node.config import parse_config
from dicom_node.receive.acceptor import build_scp
from dicom_node.receive.board import Board
from dicom_node.receive.shared_server import SharedListen
from tests.support import free_port, node_config


def _wait_for(predicate: object, seconds: float = 10.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(0.05)
    return False


def test_a_connection_whose_thread_cannot_start_is_not_counted(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    config = parse_config(node_config(tmp_path / "var", free_port()))
    config.spool_dir.mkdir(parents=True, exist_ok=True)
    listening = socket.create_server(("127.0.0.1", 0))
    port = listening.getsockname()[1]
    board = Board.create(1)
    scp = build_scp(config, SharedListen(listening, board, 0, 4))
    scp.start()
    try:
        real_start = threading.Thread.start

        def no_thread_for_connections(thread: threading.Thread) -> None:
            if getattr(getattr(thread, "_target", None), "__name__", "") == "process_request_thread":
                raise RuntimeError("can't start new thread")
            real_start(thread)

        monkeypatch.setattr(threading.Thread, "start", no_thread_for_connections)
        with socket.create_connection(("127.0.0.1", port), timeout=5) as peer:
            assert peer.recv(1) == b""  # the node closed it: no association without a thread
        assert _wait_for(lambda: board.active(0) == 0), "the failed connection still counts"
        monkeypatch.undo()

        ae = ApplicationEntity("ECHOER")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", port, ae_title=config.node.ae_title)
        assert assoc.is_established
        assert board.active(0) == 1
        assert assoc.send_c_echo().Status == 0x0000
        assoc.release()
        assert _wait_for(lambda: board.active(0) == 0)
    finally:
        monkeypatch.undo()
        scp.stop(1)
        scp.ingestor.db.close()
        board.close()
