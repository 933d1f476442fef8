"""An association server on a listening socket shared by several acceptor processes.

The node binds and listens once; every acceptor process inherits that socket and
runs this server on it (see :mod:`dicom_node.receive.acceptor`). The kernel queues each
connection once and whichever process accepts it first serves it, so a connection
waits for no particular process, and one that dies leaves the queue to the others.

To spread associations evenly, an acceptor that holds more connections than another
ready acceptor lets it take the next one: it waits up to :data:`BALANCE_WAIT_S` for
the connection to be taken, then takes it itself (the other may be stuck).

Every connection whose A-ASSOCIATE-RQ has been read is counted in the acceptor's row
of the :class:`~dicom_node.receive.board.Board` until its association ends, which is what
the global ``max_associations`` limit reads (:class:`~dicom_node.receive.policy.NodeAE`);
connections still negotiating are held by the gate (:mod:`dicom_node.receive.negotiation`).
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import threading
import time
from dataclasses import dataclass, field
from typing import Any, cast

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.receive.board import Board

log = logging.getLogger(__name__)

BALANCE_WAIT_S = 0.05  # longest a busier acceptor leaves a connection to a less busy one
_BALANCE_STEP_S = 0.002


@dataclass
class SharedListen:
    """What an acceptor process needs to serve on the shared socket."""

    socket: socket.socket
    board: Board
    row: int
    max_associations: int


@dataclass
class Ticket:
    """One accepted connection's slot on the board: taken once its A-ASSOCIATE-RQ has
    been read (:meth:`acquire`), given back exactly once when it ends."""

    board: Board
    row: int
    handed_over: bool = False  # to an association, which releases it when it ends
    _held: bool = False
    _done: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.board.connected(self.row, +1)

    def acquire(self) -> None:
        """The connection's request has been read: it counts against ``max_associations``."""
        with self._lock:
            if self._held or self._done:
                return
            self._held = True
        self.board.acquire(self.row)

    def release(self) -> None:
        """The connection ended (or never became an association)."""
        with self._lock:
            if self._done:
                return
            self._done = True
            held = self._held
        self.board.connected(self.row, -1)
        if held:
            self.board.release(self.row)


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, with two changes to what happens on accept:

    - every connection is counted in the AE's :class:`~dicom_node.receive.negotiation.NegotiationGate`
      until its A-ASSOCIATE-RQ has been read (it takes no association slot meanwhile);
    - the TLS handshake runs in the connection's own thread with the ACSE timeout as
      its deadline, not in the accept loop, where one silent peer would stall every
      TLS caller. A failed handshake is logged and audited with the peer and the reason.
    """

    def _accept(self) -> tuple[socket.socket, Any]:
        return cast(socket.socket, self.socket).accept()

    def _abandon(self, address: Any) -> None:
        """A connection accepted by :meth:`_accept` is dropped before it is served."""

    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept, hold the connection at the gate, and prepare TLS without a handshake."""
        client, address = self._accept()
        if self.ssl_context:
            try:
                client = self.ssl_context.wrap_socket(client, server_side=True, do_handshake_on_connect=False)
            except BaseException:
                client.close()
                self._abandon(address)
                raise
        gate = getattr(self.ae, "negotiation_gate", None)
        if gate is not None:
            gate.enter(client, str(address[0]))
        return client, address

    def finish_request(self, request: Any, client_address: Any) -> None:
        """In the connection's thread: the TLS handshake (with a deadline), then the association."""
        if isinstance(request, ssl.SSLSocket) and not self._handshake(request, client_address):
            return
        super().finish_request(request, client_address)

    def _handshake(self, sock: ssl.SSLSocket, address: Any) -> bool:
        deadline = self.ae.acse_timeout
        sock.settimeout(deadline)
        try:
            sock.do_handshake()
        except (OSError, ValueError) as exc:
            peer = f"{address[0]}:{address[1]}"
            reason = f"no handshake within {deadline:g} s" if isinstance(exc, TimeoutError) else \
                (getattr(exc, "reason", None) or type(exc).__name__)
            log.warning("TLS handshake failed with %s: %s", peer, reason)
            callback = getattr(self.ae, "on_tls_failure", None)
            if callback is not None:
                callback(peer, str(reason))
            gate = getattr(self.ae, "negotiation_gate", None)
            if gate is not None:
                gate.leave(sock)
            sock.close()
            return False
        finally:
            if sock.fileno() != -1:
                sock.settimeout(None)
        return True


class SharedSocketServer(GatedAssociationServer):
    """pynetdicom's threaded server on an inherited, already listening socket."""

    def server_bind(self) -> None:
        """Use the inherited socket instead of binding a new one."""
        shared: SharedListen = getattr(self.ae, "shared_listen")  # noqa: B009 (set on NodeAE at run time)
        if self.socket is not None:
            self.socket.close()
        self.socket = shared.socket
        self.socket.settimeout(0.0)  # accept() must not wait when another process was quicker
        self.server_address = self.socket.getsockname()
        self._shared = shared
        self._tickets: dict[Any, Ticket] = {}
        self._local = threading.local()

    def server_activate(self) -> None:
        """Already listening (the node called ``listen``)."""

    def server_close(self) -> None:
        """Close this process's copy of the socket; the others keep listening."""
        if self.socket is not None:
            self.socket.close()

    def _leave_to_less_busy(self) -> None:
        """Wait while a less busy acceptor may take the waiting connection."""
        board, row, sock = self._shared.board, self._shared.row, self._shared.socket
        deadline = time.monotonic() + BALANCE_WAIT_S
        while not board.least_loaded(row) and time.monotonic() < deadline:
            time.sleep(_BALANCE_STEP_S)
            ready, _, _ = select.select([sock], [], [], 0)
            if not ready:
                raise BlockingIOError("taken by another acceptor")

    def _accept(self) -> tuple[socket.socket, Any]:
        """Accept (unless another acceptor does) and give the connection its ticket."""
        self._leave_to_less_busy()
        client, address = self._shared.socket.accept()  # BlockingIOError: another process took it
        self._tickets[address] = Ticket(self._shared.board, self._shared.row)
        return client, address

    def _abandon(self, address: Any) -> None:
        ticket = self._tickets.pop(address, None)
        if ticket is not None:
            ticket.release()

    def process_request(self, request: Any, client_address: Any) -> None:
        """Start the connection's thread; if that fails (no thread can be started),
        release its ticket, so that it does not count against ``max_associations``
        for as long as this acceptor lives."""
        try:
            super().process_request(request, client_address)
        except BaseException:
            ticket = self._tickets.pop(client_address, None)
            if ticket is not None:
                ticket.release()
            raise

    def finish_request(self, request: Any, client_address: Any) -> None:
        """Hand the connection's ticket to its association (released when it ends)."""
        ticket = self._tickets.pop(client_address, None)
        self._local.ticket = ticket
        try:
            super().finish_request(request, client_address)
        finally:
            self._local.ticket = None
            if ticket is not None and not ticket.handed_over:
                ticket.release()

    def take_ticket(self) -> Ticket | None:
        """The ticket of the connection this thread is turning into an association."""
        ticket: Ticket | None = getattr(self._local, "ticket", None)
        if ticket is not None:
            ticket.handed_over = True
        return ticket
