"""Connections still negotiating: accepted, but no complete A-ASSOCIATE-RQ yet.

A port scanner, a broken modality or an attacker can open connections and send
nothing, or half an A-ASSOCIATE-RQ. Such a connection must not take an association
slot: ``max_associations`` counts only connections whose request has been read
(:mod:`dicom_node.receive.board`, :class:`~dicom_node.receive.policy.NodeAE`). Those still
negotiating are held here, under their own limits, per peer address
(``node.max_negotiating_per_host``) and in total (``node.max_negotiating``), per acceptor
process. A new connection over a limit closes the *oldest* one still negotiating (from
that address, or overall): a real caller sends its request within milliseconds of
connecting, so a flood of silent connections cannot lock it out. Every read also has a
deadline (the ACSE timeout before the request, see :mod:`dicom_node.receive.reactor`).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass
class _Waiting:
    sock: socket.socket
    host: str
    since: float


class NegotiationGate:
    """The connections of one process that have not sent a complete A-ASSOCIATE-RQ."""

    def __init__(self, per_host: int, total: int) -> None:
        self.per_host = per_host
        self.total = total
        self._waiting: dict[int, _Waiting] = {}  # id(socket) -> entry
        self._holding: set[int] = set()  # id(socket) of connections past their request
        self._lock = threading.Lock()

    def enter(self, sock: socket.socket, host: str) -> None:
        """Count a new connection; close the oldest others over a limit."""
        with self._lock:
            self._prune()
            self._waiting[id(sock)] = _Waiting(sock, host, time.monotonic())
            victims = self._over_limits(host)
            for victim in victims:
                self._waiting.pop(id(victim.sock), None)
        for victim in victims:
            log.warning("closed a connection from %s that sent no association request in %.1f s: "
                        "too many connections still negotiating", victim.host, time.monotonic() - victim.since)
            _shut(victim.sock)

    def admit(self, sock: socket.socket) -> None:
        """The connection's A-ASSOCIATE-RQ has been read: it holds a slot from now on."""
        with self._lock:
            self._waiting.pop(id(sock), None)
            self._holding.add(id(sock))

    def leave(self, sock: socket.socket) -> None:
        """The connection ended (or failed its TLS handshake)."""
        with self._lock:
            self._waiting.pop(id(sock), None)
            self._holding.discard(id(sock))

    def holding(self) -> int:
        """Connections of this process whose request was read and that have not ended."""
        with self._lock:
            return len(self._holding)

    def close_all(self) -> int:
        """Close every connection still negotiating (shutdown: none has anything in flight)."""
        with self._lock:
            waiting = list(self._waiting.values())
            self._waiting.clear()
        for entry in waiting:
            _shut(entry.sock)
        return len(waiting)

    def _over_limits(self, host: str) -> list[_Waiting]:
        """The oldest entries to close so that both limits hold (the newest is kept)."""
        ordered = sorted(self._waiting.values(), key=lambda w: w.since)
        from_host = [w for w in ordered if w.host == host]
        victims = from_host[:max(0, len(from_host) - self.per_host)]
        rest = [w for w in ordered if w not in victims]
        victims += rest[:max(0, len(rest) - self.total)]
        return victims

    def _prune(self) -> None:
        for key, entry in list(self._waiting.items()):
            if entry.sock.fileno() == -1:  # closed meanwhile
                del self._waiting[key]


def _shut(sock: socket.socket) -> None:
    """Wake the thread reading ``sock`` (it sees the stream end) and drop the connection."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
