"""Event-driven reactors for pynetdicom acceptor associations.

pynetdicom 3.0 runs two polling loops per association: the DUL thread sleeps 1 ms
whenever the socket has no data and nothing is queued to send, and the association
thread sleeps 1 ms before each look at its DIMSE message queue. With a peer that sends
the next C-STORE only after the previous response (storescu, most modalities), each
instance waits for up to three of these sleeps: the request's PDUs, the hand-off of the
decoded message, the response. ``bench.profile_ingest`` measured about 2 ms of waiting
per instance; shortening the sleeps instead (busy polling) made ingest slower, because
the pollers took the GIL from the handler.

Here the loops are the same except that they *wait for work* instead of sleeping:

- :class:`WakingDUL` waits in ``select`` on the peer's socket and on a socket pair
  that :meth:`WakingDUL.send_pdu` writes a byte to, so it wakes as soon as the peer
  sends or a primitive is queued to be sent;
- :class:`WakingAssociation` waits on an event that is set when a DIMSE message is
  complete, when the DUL passes an A-RELEASE/A-ABORT up, and when the DUL stops.

Two more per-instance costs are cut: :class:`BulkRecvSocket` reads a PDU in a few
calls instead of 4 KiB at a time, and :class:`FastStoreDIMSE` encodes C-STORE
responses without pydicom; per-association, :class:`QuickCopyContexts` copies the
presentation contexts without ``deepcopy``.

Both keep a short timeout (:data:`IDLE_WAIT_S`), so timers (ARTIM, the network
timeout) and kill flags are still checked as before, just not 1000 times a second
when idle. The loop bodies are pynetdicom 3.0.4's ``run_reactor`` and
``_run_reactor`` with only the sleep replaced; :func:`supported` checks the version,
and on any other version the node uses pynetdicom's own classes.

Upstream: pynetdicom's issue #650 and pull request #651 discuss this polling sleep.
Waiting on the socket and on a wake-up pair, as here, belongs in pynetdicom itself;
offering it there (with ``bench.profile_ingest``'s figures) would let this module,
and the version pin it needs, go. Not offered yet.
"""

from __future__ import annotations

import copy
import logging
import queue
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import pynetdicom
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.transport import AssociationSocket, RequestHandler

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.005  # the longest a reactor waits before re-checking its timers


def pynetdicom_version() -> str:
    """The installed pynetdicom's version."""
    return str(pynetdicom.__version__)


def supported() -> bool:
    """True for the pynetdicom versions whose reactor loops these classes mirror (3.0.x;
    ``pyproject.toml`` pins the same series, and a test checks that they agree)."""
    return pynetdicom_version().startswith("3.0.")


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    """A queue that sets an event whenever an item is put."""

    def __init__(self, wake: threading.Event) -> None:
        super().__init__()
        self._wake = wake

    def _put(self, item: Any) -> None:
        super()._put(item)
        self._wake.set()


class WakingDUL(DULServiceProvider):
    """A DUL reactor that waits on its socket and on a wake-up socket pair."""

    def __init__(self, assoc: Association, assoc_wake: threading.Event) -> None:
        super().__init__(assoc)
        self._assoc_wake = assoc_wake
        self.to_user_queue = _WakingQueue(assoc_wake)
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:  # buffer full (a wake-up is pending anyway) or reactor gone
            pass

    def send_pdu(self, primitive: Any) -> None:
        """Queue a primitive to be sent and wake the reactor."""
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        """Stop the reactor (and wake it so it notices now)."""
        super().kill_dul()
        self._wake()

    def stop_dul(self) -> bool:
        """Stop the reactor if in Sta1 (and wake it so it notices now)."""
        if self.state_machine.current_state == "Sta1":
            self._kill_thread = True
            self._wake()
        return super().stop_dul()

    def _wait_for_work(self) -> None:
        """Wait until the peer sends, a primitive is queued, or IDLE_WAIT_S passes."""
        sock = self.socket.socket if self.socket is not None else None
        if sock is None or self.socket is None or not self.socket._is_connected:
            time.sleep(self._run_loop_delay)
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            ready, _, _ = select.select([sock, self._wake_r], [], [], IDLE_WAIT_S)
        except (OSError, ValueError):  # socket closed under us: the loop finds out
            time.sleep(self._run_loop_delay)
            return
        if self._wake_r in ready:
            try:
                while self._wake_r.recv(4096):
                    pass
            except OSError:  # drained (BlockingIOError) or closed
                pass

    def run_reactor(self) -> None:
        """pynetdicom 3.0.4's DUL loop, waiting for work instead of sleeping 1 ms."""
        try:
            self._reactor_loop()
        finally:
            self._wake_r.close()
            self._wake_w.close()
            self._assoc_wake.set()

    def _reactor_loop(self) -> None:
        self._idle_timer.start()
        self.socket = cast(Any, self.socket)
        sleep = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                self._wait_for_work()
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._is_transport_event():
                    self._idle_timer.restart()
            except Exception as exc:  # as pynetdicom: abort on anything unexpected
                log.error("Exception in the DUL reactor, aborting the association: %s", type(exc).__name__)
                log.debug("DUL reactor exception", exc_info=exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False


def _element(tag: int, value: bytes) -> bytes:
    """One Implicit VR Little Endian element of the command group."""
    return struct.pack("<HHI", 0x0000, tag, len(value)) + value


def _text(value: str, pad: bytes) -> bytes | None:
    raw = value.encode("ascii", "strict") if value.isascii() and value.isprintable() else None
    if raw is None:
        return None
    return raw + pad if len(raw) % 2 else raw


def store_response_command(rsp: C_STORE) -> bytes | None:
    """The encoded command set of a C-STORE-RSP, or None when pynetdicom should encode it.

    Byte for byte what pynetdicom 3.0.4 encodes through pydicom (checked by a test)
    for the responses the node sends: Status, the affected UIDs and an optional
    plain-text Error Comment. pydicom's generic encoding took about 0.4 ms of
    GIL-held CPU per instance.
    """
    if rsp.OffendingElement is not None or rsp.Status is None or rsp.MessageIDBeingRespondedTo is None:
        return None
    class_uid = _text(str(rsp.AffectedSOPClassUID or ""), b"\0")
    instance_uid = _text(str(rsp.AffectedSOPInstanceUID or ""), b"\0")
    comment = _text(rsp.ErrorComment, b" ") if rsp.ErrorComment else b""
    if class_uid is None or instance_uid is None or comment is None:
        return None
    body = b"".join((
        _element(0x0002, class_uid) if class_uid else b"",
        _element(0x0100, struct.pack("<H", 0x8001)),
        _element(0x0120, struct.pack("<H", rsp.MessageIDBeingRespondedTo)),
        _element(0x0800, struct.pack("<H", 0x0101)),
        _element(0x0900, struct.pack("<H", rsp.Status)),
        _element(0x0902, comment) if comment else b"",
        _element(0x1000, instance_uid) if instance_uid else b"",
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


class FastStoreDIMSE(DIMSEServiceProvider):
    """pynetdicom's DIMSE provider, encoding C-STORE responses directly.

    The response goes out as one P-DATA with one command PDV, as pynetdicom sends
    it; the EVT_DIMSE_SENT notification (pynetdicom's debug log of the response;
    the node binds nothing to it) is not triggered for these responses.
    """

    def __init__(self, assoc: Association) -> None:
        super().__init__(assoc)
        self.max_dataset_bytes = 0  # 0: no limit (see receive_primitive)
        self.oversize: dict[int, int] = {}  # Message ID -> dataset bytes received, when cut
        self._dataset_bytes = 0

    def receive_primitive(self, primitive: P_DATA) -> None:
        """As pynetdicom, but a dataset growing past :attr:`max_dataset_bytes` is no longer
        buffered: its further fragments are dropped (the C-STORE is then refused, see
        :attr:`oversize`), so an oversize instance costs the limit in memory, not its size."""
        if self.max_dataset_bytes:
            self._cut_oversize(primitive)
        super().receive_primitive(primitive)

    def _cut_oversize(self, primitive: P_DATA) -> None:
        kept: list[list[Any]] = []
        for context_id, data in primitive.presentation_data_value_list:
            if data and not data[0] & 1:  # a dataset fragment (the control header's bit 0 is 0)
                self._dataset_bytes += len(data) - 1
                if self._dataset_bytes > self.max_dataset_bytes:
                    command = getattr(self.message, "command_set", None)
                    if command is not None:
                        self.oversize[int(command.MessageID)] = self._dataset_bytes
                    data = data[:1]
                if data[0] & 2:  # the last fragment
                    self._dataset_bytes = 0
            kept.append([context_id, data])
        primitive.presentation_data_value_list = kept  # type: ignore[assignment]  # the setter wants lists

    def send_msg(self, primitive: Any, context_id: int) -> None:
        """Send a DIMSE message (C-STORE responses by the direct encoder)."""
        if isinstance(primitive, C_STORE) and primitive.MessageIDBeingRespondedTo is not None:
            command = store_response_command(primitive)
            limit = self.maximum_pdu_size
            if command is not None and (limit == 0 or len(command) + 6 <= limit):
                pdata = P_DATA()
                pdata.presentation_data_value_list.append((context_id, b"\x03" + command))
                self.dul.send_pdu(pdata)
                return
        super().send_msg(primitive, context_id)


class WakingAssociation(Association):
    """An acceptor association whose reactor waits for messages instead of sleeping."""

    _on_end: Any = None  # called once when the association's thread ends (see shared_server)

    def run(self) -> None:
        """The association's thread, then its end-of-connection callback."""
        try:
            super().run()
        finally:
            on_end, self._on_end = self._on_end, None
            if on_end is not None:
                on_end()

    def install_waking(self) -> None:
        """Swap in the waking DUL and queues (before the socket is set)."""
        self._wake = threading.Event()
        self.dul = WakingDUL(self, self._wake)
        self.dimse = FastStoreDIMSE(self)
        self.dimse.max_dataset_bytes = int(getattr(self.ae, "max_instance_bytes", 0))
        self.dimse.msg_queue = _WakingQueue(self._wake)
        # The timeouts live partly in the DUL's timers: apply them to the new one.
        self.acse_timeout = self.ae.acse_timeout
        self.connection_timeout = self.ae.connection_timeout
        self.dimse_timeout = self.ae.dimse_timeout
        self.network_timeout = self.ae.network_timeout

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's acceptor loop, waiting for work instead of sleeping 1 ms."""
        self._is_paused = False
        while not self._kill:
            self._wake.wait(IDLE_WAIT_S)
            self._wake.clear()
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False
            context_id, msg = self.dimse.get_msg(block=False)
            if msg:
                self._serve_request(msg, cast(int, context_id))
            if self._released_or_aborted():
                return
            if not self.dul.is_alive():
                self.kill()
                return
            if self.dul.idle_timer_expired():
                self._on_network_timeout()
                return

    def _released_or_aborted(self) -> bool:
        if self.is_established and self.acse.is_release_requested():
            self.acse.send_release(is_response=True)
            log.info("Association Released")
            self.is_released = True
            self.is_established = False
            evt.trigger(self, evt.EVT_RELEASED, {})
            self.kill()
            return True
        if self.acse.is_aborted():
            log.info("Association Aborted%s", " (A-P-ABORT)" if self.acse.is_aborted("a-p-abort") else "")
            self.dul.receive_pdu(wait=False)
            self.is_aborted = True
            self.is_established = False
            evt.trigger(self, evt.EVT_ABORTED, {})
            self.kill()
            return True
        return False

    def _on_network_timeout(self) -> None:
        log.error("Network timeout reached")
        if self.network_timeout_response == "A-RELEASE":
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self.release()
            self._is_paused = False
        else:
            self.abort()
        self.kill()


class QuickCopyContexts(list):  # type: ignore[type-arg]
    """The server's presentation contexts, copied quickly for each new association.

    pynetdicom deep-copies the server's contexts for every association it accepts:
    with every storage SOP class and 16 transfer syntaxes that took 20 ms of CPU,
    holding the GIL while other associations wait. A context holds immutable UIDs,
    flags and one list, so a shallow copy with its own transfer syntax list is an
    equal, independent copy.
    """

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        out = []
        for cx in self:
            dup = copy.copy(cx)
            dup._transfer_syntax = list(cx._transfer_syntax)
            out.append(dup)
        return out


PDU_HEADER_BYTES = 6  # type, reserved, 32-bit length
KNOWN_PDU_TYPES = frozenset(range(0x01, 0x08))  # A-ASSOCIATE-RQ ... A-ABORT
MAX_PRESENTATION_CONTEXTS = 128  # what the one-byte, odd context IDs allow
MAX_TRANSFER_SYNTAXES = 64  # per presentation context; a modality proposes a handful
FIRST_READ_BYTES = 1 << 20  # the buffer starts at this and doubles as data arrives
MIN_PDU_LIMIT = 4 << 20  # no PDU limit below this (an A-ASSOCIATE-RQ may be large)


def associate_rq_problem(body: bytes | bytearray) -> str | None:
    """Why an A-ASSOCIATE-RQ body (after the 6-byte header) is too large to negotiate, or
    None. Counts its presentation context items and their transfer syntax sub-items
    without decoding them (PS3.8 9.3.2); a malformed body is left to pynetdicom."""
    contexts, pos, end = 0, 68, len(body)  # protocol version, AE titles, reserved
    while pos + 4 <= end:
        item_type, item_length = body[pos], int.from_bytes(body[pos + 2:pos + 4], "big")
        if item_type == 0x20:
            contexts += 1
            if contexts > MAX_PRESENTATION_CONTEXTS:
                return f"more than {MAX_PRESENTATION_CONTEXTS} presentation contexts"
            syntaxes, sub, sub_end = 0, pos + 8, min(pos + 4 + item_length, end)
            while sub + 4 <= sub_end:
                syntaxes += body[sub] == 0x40
                sub += 4 + int.from_bytes(body[sub + 2:sub + 4], "big")
            if syntaxes > MAX_TRANSFER_SYNTAXES:
                return (f"{syntaxes} transfer syntaxes in one presentation context "
                        f"(at most {MAX_TRANSFER_SYNTAXES})")
        pos += 4 + item_length
    return None


def pdu_read_limit(maximum_pdu_size: int) -> int:
    """The largest PDU the node reads from a peer (0: no limit): its advertised maximum
    (a peer may not send longer P-DATA), but never under :data:`MIN_PDU_LIMIT`."""
    return max(maximum_pdu_size + 6, MIN_PDU_LIMIT) if maximum_pdu_size else 0


class BulkRecvSocket(AssociationSocket):
    """pynetdicom's association socket, reading in as few calls as the data allows.

    pynetdicom reads at most 4096 bytes per ``recv``: 32 calls or more for each
    128 KiB PDU, each releasing and re-taking the GIL, which with several busy
    associations queues behind the other threads. This reads straight into the
    PDU's buffer, as much as has arrived; errors and the end of the stream behave
    as in pynetdicom (exceptions propagate; a closed stream returns what was read).

    The buffer grows with the data that actually arrives (from 1 MiB, doubling), so a
    peer announcing a 4 GiB PDU costs nothing until it sends it; and a PDU longer than
    :attr:`max_read` (see :func:`pdu_read_limit`) is refused before any of it is read
    (``OSError``: pynetdicom closes the connection, as for any transport error).
    """

    max_read = 0  # 0: no limit
    aborted = False  # an A-ABORT or A-ASSOCIATE-RJ was sent: nothing more is read
    header_type = 0  # the type in the last PDU header read
    on_request_read: Callable[[], None] | None = None  # called once the A-ASSOCIATE-RQ is read whole

    def read_deadline_seconds(self) -> float | None:
        """How long one read may wait for its bytes: the ACSE timeout (ARTIM) while the
        A-ASSOCIATE-RQ is awaited (Sta2, or Sta1 before the connection event is handled),
        the network timeout after; None for no limit."""
        assoc = cast("Association | None", getattr(self, "_assoc", None))
        if assoc is None:
            return None
        awaiting_request = assoc.dul.state_machine.current_state in ("Sta1", "Sta2")
        return assoc.acse_timeout if awaiting_request else assoc.network_timeout

    def recv(self, nr_bytes: int) -> bytearray:
        """Read ``nr_bytes`` from the socket, or fewer if it closes.

        A peer that stops sending half-way through a PDU (a header announcing more than
        follows, a partial A-ASSOCIATE-RQ) would otherwise block this thread, its
        connection and its association slot for good, past every pynetdicom timer: the
        read has a deadline (:meth:`read_deadline_seconds`) and raises ``TimeoutError``
        (an ``OSError``: pynetdicom closes the connection) when it passes.
        """
        if self.max_read and nr_bytes > self.max_read:
            self.aborted = True  # the stream cannot be framed any more: read nothing else
            raise OSError(f"peer announced a PDU of {nr_bytes} bytes, over the "
                          f"{self.max_read}-byte limit")
        if self.aborted:
            return bytearray()  # as a closed stream
        sock = cast(socket.socket, self.socket)
        limit = self.read_deadline_seconds()
        deadline = None if limit is None else time.monotonic() + limit
        buf = bytearray(min(nr_bytes, FIRST_READ_BYTES))
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buf):
                buf.extend(bytes(min(len(buf), nr_bytes - len(buf))))
            with memoryview(buf) as view:
                got = self._recv_by(sock, view[nr_read:], deadline)
            if got is None:
                raise TimeoutError(f"no complete PDU within {limit:g} s: {nr_read} of {nr_bytes} bytes arrived")
            if not got:
                break
            nr_read += got
        if nr_read < len(buf):
            del buf[nr_read:]
        if nr_bytes == PDU_HEADER_BYTES and nr_read:
            if buf[0] not in KNOWN_PDU_TYPES:
                self._abort_unknown_pdu(buf[0])
            self.header_type = buf[0]
        elif self.header_type == 0x01:  # the body of an A-ASSOCIATE-RQ
            self.header_type = 0
            self._bound_associate_rq(buf)
            if self.on_request_read is not None and len(buf) == nr_bytes:
                self.on_request_read()
        return buf

    def _bound_associate_rq(self, body: bytearray) -> None:
        """Refuse an A-ASSOCIATE-RQ over :data:`MAX_PRESENTATION_CONTEXTS` or
        :data:`MAX_TRANSFER_SYNTAXES` per context before pynetdicom decodes it (a 2.7 MB
        request once cost 4 s of CPU and a log line per transfer syntax): A-ASSOCIATE-RJ
        (rejected-permanent, service-user, no reason given), then close."""
        problem = associate_rq_problem(body)
        if problem is None:
            return
        log.warning("association request refused from %s: %s", self._peer_text(), problem)
        # A-ASSOCIATE-RJ: type 3, length 4, reserved, result 1, source 1, reason 1
        self._refuse(b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x01", f"A-ASSOCIATE-RQ refused: {problem}")

    def _refuse(self, reply: bytes, reason: str) -> None:
        """Send ``reply`` (an A-ASSOCIATE-RJ or A-ABORT), read nothing more, and close
        (the ``OSError`` makes pynetdicom close the connection)."""
        self.aborted = True
        try:
            cast(socket.socket, self.socket).sendall(reply)
        except OSError:
            pass
        raise OSError(reason)

    def _peer_text(self) -> str:
        try:
            host, port = cast(socket.socket, self.socket).getpeername()[:2]
            return f"{host}:{port}"
        except OSError:
            return "a closed connection"

    @staticmethod
    def _recv_by(sock: socket.socket, view: memoryview, deadline: float | None) -> int | None:
        """``recv_into`` that waits no later than ``deadline`` (None when it passes).

        Plain sockets stay blocking: a non-blocking read first (the bytes have usually
        arrived: the reactor selected the socket), and ``select`` only when they have
        not, so the common case costs one system call. TLS sockets, whose buffered
        bytes ``select`` cannot see, use a socket timeout instead.
        """
        if deadline is None:
            return sock.recv_into(view, len(view))
        if isinstance(sock, ssl.SSLSocket):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            blocking = sock.gettimeout()
            sock.settimeout(remaining)
            try:
                return sock.recv_into(view, len(view))
            except TimeoutError:
                return None
            finally:
                sock.settimeout(blocking)
        while True:
            try:
                return sock.recv_into(view, len(view), socket.MSG_DONTWAIT)
            except BlockingIOError:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not select.select([sock], [], [], remaining)[0]:
                    return None

    def _abort_unknown_pdu(self, pdu_type: int) -> None:
        """A PDU type outside PS3.8 (pynetdicom reads each PDU's 6-byte header first):
        the stream cannot be framed any more. Send an A-ABORT (service provider,
        unrecognised PDU) and close, instead of reading the rest as further PDUs."""
        abort = A_ABORT_RQ()
        abort.source = 0x02
        abort.reason_diagnostic = 0x01
        self._refuse(abort.encode(), f"unknown PDU type 0x{pdu_type:02X}: sent A-ABORT and closed the connection")


class WakingRequestHandler(RequestHandler):
    """pynetdicom's request handler, creating :class:`WakingAssociation` acceptors."""

    def _create_association(self) -> Association:
        assoc = super()._create_association()
        stock = assoc.dul  # never started; holds the socket and its connection event (Evt5)
        assoc.__class__ = WakingAssociation
        waking = cast(WakingAssociation, assoc)
        waking.install_waking()
        waking.dul.socket, stock.socket = stock.socket, None
        waking.dul.event_queue = stock.event_queue
        waking.dul.socket.__class__ = BulkRecvSocket
        bulk = cast(BulkRecvSocket, waking.dul.socket)
        bulk.max_read = pdu_read_limit(assoc.ae.maximum_pdu_size)
        take_ticket = getattr(self.server, "take_ticket", None)
        ticket = take_ticket() if take_ticket is not None else None
        gate = getattr(assoc.ae, "negotiation_gate", None)
        raw = bulk.socket

        def request_read() -> None:  # the A-ASSOCIATE-RQ is in: a slot, not negotiating any more
            if gate is not None:
                gate.admit(raw)
            if ticket is not None:
                ticket.acquire()

        def ended() -> None:
            if gate is not None:
                gate.leave(raw)
            if ticket is not None:
                ticket.release()

        bulk.on_request_read = request_read
        waking._on_end = ended
        return waking
