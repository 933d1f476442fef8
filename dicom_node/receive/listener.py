"""The DICOM listener as several acceptor processes (``node.listener_processes`` > 1).

One Python process serving C-STOREs is bound by its GIL to about one core. Here the
node binds and listens once, and N acceptor processes (:mod:`dicom_node.receive.acceptor`)
inherit the socket and serve associations on it, each with the Storage SCP and
ingest path of a single-process node. What they share lives on a
:class:`~dicom_node.receive.board.Board`: the global association count and the counters
the node's metrics are made of.

The pool watches its acceptors: one that exits while the node runs (a crash, a
``kill -9``) is logged, its slot folder is settled (complete slots moved into place
and handed to ``on_exit`` to be registered, partial ones discarded) and it is
started again, with a growing delay if it keeps dying. Connections waiting in the
listen queue meanwhile are served by the other acceptors.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from dicom_node.config import Config
from dicom_node.errors import NodeError
from dicom_node.receive.board import Board

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # an acceptor must be serving this long after it was started
WATCH_S = 0.2  # how often the pool looks at its acceptors
RESTART_DELAYS_S = (0.0, 1.0, 2.0, 5.0, 10.0, 30.0)  # after successive quick deaths
QUICK_DEATH_S = 10.0  # an acceptor that lived less than this died "quickly"
BACKLOG = 128


class ListenerError(NodeError):
    """The listener could not be started."""


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket (SO_REUSEADDR, as pynetdicom binds its own)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


class _Acceptor:
    """One acceptor process and its restart history."""

    def __init__(self, row: int) -> None:
        self.row = row
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.quick_deaths = 0
        self.restart_at = 0.0

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class AcceptorPool:
    """N acceptor processes on one listening socket (see the module's docstring)."""

    def __init__(self, config: Config, processes: int,
                 on_exit: Callable[[int], None] | None = None) -> None:
        """``on_exit(row)`` runs in the pool's thread after acceptor ``row`` died and before
        it is started again (the node settles its slot folder there)."""
        self.config = config
        self.processes = processes
        self.on_exit = on_exit
        self.board: Board | None = None
        self.socket: socket.socket | None = None
        self._acceptors = [_Acceptor(row) for row in range(processes)]
        self._stopping = threading.Event()  # no more restarts
        self._done = threading.Event()  # every acceptor is gone: the watcher may end
        self._first_start_failed = threading.Event()
        self._watcher: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def port(self) -> int:
        """The bound port."""
        assert self.socket is not None
        return int(self.socket.getsockname()[1])

    @property
    def running(self) -> int:
        """Acceptors alive and serving."""
        board = self.board
        if board is None or self.socket is None:
            return 0
        return sum(1 for a in self._acceptors if a.alive and board.ready(a.row))

    @property
    def server(self) -> Any:
        """Like ``StorageSCP.server``: something (the socket) while the listener is up."""
        return self.socket

    def start(self) -> None:
        """Bind, start every acceptor, and return once all of them serve."""
        node = self.config.node
        try:
            self.socket = listen_socket(node.host, node.port)
        except OSError as exc:
            raise ListenerError(f"cannot listen on {node.host}:{node.port}: {exc.strerror}") from exc
        self.board = Board.create(self.processes)
        # The watcher starts (and restarts) every acceptor: an acceptor dies with the
        # thread that started it (PR_SET_PDEATHSIG), and this one lives until they are gone.
        self._watcher = threading.Thread(target=self._watch, name="acceptor-pool", daemon=True)
        self._watcher.start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while self.running < self.processes:
            failed = self._first_start_failed.is_set() or any(
                a.proc is not None and not a.alive for a in self._acceptors)
            if failed or time.monotonic() > deadline:
                self.stop(0)
                raise ListenerError("acceptor processes did not start; see the log")
            time.sleep(0.02)
        log.info("listening as %s on %s:%d with %d acceptor processes%s", node.ae_title, node.host,
                 self.port, self.processes, " (DICOM TLS)" if node.tls.enabled else "")

    def _spawn(self, acceptor: _Acceptor) -> None:
        assert self.board is not None and self.socket is not None
        spec = {
            "config": self.config.model_dump(mode="json"),
            "row": acceptor.row,
            "rows": self.processes,
            "listen_fd": self.socket.fileno(),
            "board_fd": self.board.fd,
            "parent_pid": os.getpid(),
        }
        # -P: the working folder must not shadow the dicom_node this node runs.
        proc = subprocess.Popen(
            [sys.executable, "-P", "-m", "dicom_node.receive.acceptor"],
            stdin=subprocess.PIPE, pass_fds=(self.socket.fileno(), self.board.fd),
            env={**os.environ, "PYTHONPATH": _package_root()},
        )
        assert proc.stdin is not None
        proc.stdin.write(json.dumps(spec).encode())
        proc.stdin.close()
        self.board.set_process(acceptor.row, proc.pid)
        acceptor.proc = proc
        acceptor.started = time.monotonic()

    def _watch(self) -> None:
        try:
            with self._lock:
                for acceptor in self._acceptors:
                    self._spawn(acceptor)
        except Exception:
            log.exception("acceptor processes could not be started")
            self._first_start_failed.set()
        while not self._done.wait(WATCH_S):
            if self._stopping.is_set():
                continue
            for acceptor in self._acceptors:
                try:
                    self._check(acceptor)
                except Exception:  # keep watching the others; the reason is in the log
                    log.exception("acceptor %d: restart failed", acceptor.row)

    def _check(self, acceptor: _Acceptor) -> None:
        with self._lock:
            if self._stopping.is_set() or acceptor.alive:
                return
            if acceptor.proc is not None:
                self._on_death(acceptor)
            if time.monotonic() < acceptor.restart_at:
                return
            self._spawn(acceptor)
            log.warning("acceptor %d restarted (pid %d)", acceptor.row, acceptor.proc.pid if acceptor.proc else 0)

    def _on_death(self, acceptor: _Acceptor) -> None:
        assert acceptor.proc is not None and self.board is not None
        code = acceptor.proc.returncode
        how = f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
        log.error("acceptor %d (pid %d) %s; restarting it", acceptor.row, acceptor.proc.pid, how)
        acceptor.proc = None
        self.board.clear_process(acceptor.row)
        lived = time.monotonic() - acceptor.started
        acceptor.quick_deaths = acceptor.quick_deaths + 1 if lived < QUICK_DEATH_S else 0
        delay = RESTART_DELAYS_S[min(acceptor.quick_deaths, len(RESTART_DELAYS_S) - 1)]
        acceptor.restart_at = time.monotonic() + delay
        if self.on_exit is not None:
            self.on_exit(acceptor.row)

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting; acceptors finish in-flight associations within the grace, then exit."""
        self._stopping.set()
        with self._lock:
            procs = [a.proc for a in self._acceptors if a.proc is not None]
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            if self.socket is not None:
                self.socket.close()
            deadline = time.monotonic() + grace_seconds + 10
            for proc in procs:
                try:
                    proc.wait(max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    log.error("acceptor pid %d did not stop in time; killing it", proc.pid)
                    proc.kill()
                    proc.wait()
            for acceptor in self._acceptors:
                acceptor.proc = None
            self._done.set()
            if self._watcher is not None and self._watcher is not threading.current_thread():
                self._watcher.join(timeout=10)
            if self.board is not None:
                self.board.close()
            self.board = None
            self.socket = None
        log.info("listener stopped")

    def pids(self) -> list[int]:
        """The acceptors' process ids (for tests and status)."""
        return [a.proc.pid for a in self._acceptors if a.proc is not None and a.alive]

    def listener_totals(self) -> dict[str, int]:
        """The acceptors' cumulative counters (for the node's metrics)."""
        return self.board.totals() if self.board is not None else {}


def _package_root() -> str:
    """The folder holding the running ``dicom_node`` package (first on the acceptors' path)."""
    import dicom_node

    root = os.path.dirname(os.path.dirname(os.path.abspath(dicom_node.__file__)))
    extra = os.environ.get("PYTHONPATH")
    return root + (os.pathsep + extra if extra else "")
