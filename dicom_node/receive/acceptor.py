"""One acceptor process: the Storage SCP on the node's shared listening socket.

Started by :class:`dicom_node.receive.listener.AcceptorPool` as
``python -m dicom_node.receive.acceptor``, with the listening socket and the board's
memfd inherited and a JSON spec (configuration, row, file descriptors) on stdin. It
runs the same :class:`~dicom_node.receive.scp.StorageSCP` and
:class:`~dicom_node.receive.ingest.Ingestor` as a single-process node, on the shared spool
(with a slot pool of its own) and the shared state database, and counts on its board
row instead of in-process metrics.

It serves until SIGTERM, then stops accepting, lets in-flight associations finish
within ``shutdown_grace_seconds`` and exits 0. SIGINT is ignored (a Ctrl-C reaches
the whole process group; the node decides). It dies with the node (``PR_SET_PDEATHSIG``),
so a node killed with SIGKILL leaves no acceptor holding its port.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any

from dicom_node.audit import AuditLog
from dicom_node.config import Config, parse_config
from dicom_node.logs import setup_logging
from dicom_node.receive.board import Board, BoardMetrics
from dicom_node.receive.ingest import Ingestor
from dicom_node.receive.scp import StorageSCP
from dicom_node.receive.shared_server import SharedListen
from dicom_node.storage.spool import Spool
from dicom_node.storage.state import open_state_db

log = logging.getLogger("dicom_node.receive.acceptor")  # also when run as __main__

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent_pid: int) -> None:
    """Have the kernel kill this process when the node that started it dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError) as exc:  # not Linux: the node's stop still ends us
        log.warning("acceptor: cannot ask to die with the node: %s", exc)
    if os.getppid() != parent_pid:  # the node died before the request took effect
        os._exit(1)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MMAP_THRESHOLD = 32 << 20  # glibc's largest dynamic threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64 bit)


def keep_buffers_in_the_heap() -> None:
    """Serve received instances from the malloc heap, not from fresh mappings.

    glibc maps every block above its mmap threshold (128 KiB at first) separately and
    unmaps it when freed: in a fresh process each received instance (PDU buffers,
    the reassembled dataset, the file bytes) cost mmap/mremap/munmap calls and a page
    fault per 4 KiB touched: 0.3-0.5 ms of CPU per 0.5 MB CT slice, measured. The node
    process gets its threshold raised by the big blocks it frees while starting
    (glibc's dynamic threshold); an acceptor is started lean, so it sets it itself,
    with the trim threshold that glibc would pair with it.
    """
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
        libc.mallopt(_M_TRIM_THRESHOLD, 2 * MMAP_THRESHOLD)
    except (OSError, AttributeError) as exc:  # not glibc: its own allocator decides
        log.debug("acceptor: mallopt unavailable: %s", exc)


def build_scp(config: Config, listen: SharedListen) -> StorageSCP:
    """The Storage SCP of acceptor ``listen.row``, on its own slot pool and connections."""
    node_id = config.node_id if config.cluster is not None else None
    spool = Spool(config.spool_dir, Spool.acceptor_slots(config.spool_dir, listen.row, node_id))
    spool.reuse_free_slots()
    ingestor = Ingestor.for_config(config, spool, open_state_db(config))
    return StorageSCP(config, ingestor, BoardMetrics(listen.board, listen.row), AuditLog(config.audit_path),
                      shared_listen=listen, label=f"a{listen.row}")


def serve(spec: dict[str, Any]) -> int:
    """Serve until SIGTERM; return the exit status."""
    config = parse_config(spec["config"], "acceptor")
    setup_logging(config.logging.level, config.logging.json_format)
    die_with_parent(int(spec["parent_pid"]))
    keep_buffers_in_the_heap()
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    row = int(spec["row"])
    board = Board(int(spec["board_fd"]), int(spec["rows"]))
    sock = socket.socket(fileno=int(spec["listen_fd"]))
    scp = build_scp(config, SharedListen(sock, board, row, config.node.max_associations))
    scp.start()
    board.mark_ready(row)
    log.info("acceptor %d (pid %d) serving", row, os.getpid())
    stop.wait()
    scp.stop(config.node.shutdown_grace_seconds)
    scp.ingestor.db.close()
    log.info("acceptor %d stopped", row)
    return 0


def main() -> int:
    """Entry point: read the spec from stdin and serve."""
    return serve(json.loads(sys.stdin.read()))


if __name__ == "__main__":
    sys.exit(main())
