"""The Storage SCP: Verification and C-STORE for every storage SOP class.

Handlers are thin: they turn pynetdicom events into :mod:`dicom_node.receive.ingest` calls
and log one line per association (no PHI: AE titles, addresses, UIDs, counts).
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLosslessSV1,
    JPEGLossless,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
    HTJ2K,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
)
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.config import Config
from dicom_node.observers import AuditSink, ListenerMetrics
from dicom_node.net.scu import VERIFICATION
from dicom_node.net.statuses import OUT_OF_RESOURCES
from dicom_node.net.tls import server_context
from dicom_node.receive.ingest import Ingestor, StoreOutcome, StoreRequest
from dicom_node.receive.negotiation import NegotiationGate
from dicom_node.receive.policy import CallerPolicy, NodeAE

log = logging.getLogger(__name__)

# Accepted exactly as sent; never transcoded on receipt.
ACCEPTED_TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    HTJ2K,
    RLELossless,
]


_PREAMBLE = b"\x00" * 128 + b"DICM"
_PLAIN_UID = re.compile(r"[0-9.]{1,64}")


def _short_element(tag: int, vr: bytes, value: bytes, pad: bytes) -> bytes:
    if len(value) % 2:
        value += pad
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, len(value)) + value


_META_VERSION = struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01"
_META_TAIL = (_short_element(0x00020012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode(), b"\x00")
              + _short_element(0x00020013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode(), b" "))


def file_meta_bytes(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes | None:
    """Preamble, prefix and File Meta Information for a received dataset.

    Byte for byte what ``event.encoded_dataset(include_meta=True)`` puts before the
    dataset (pynetdicom's ``create_file_meta`` encoded by pydicom), built directly;
    None when a UID is not plain digits and dots (pydicom then encodes it).
    """
    uids = (sop_class_uid, sop_instance_uid, transfer_syntax)
    if not all(_PLAIN_UID.fullmatch(uid) for uid in uids):
        return None
    body = (_META_VERSION
            + _short_element(0x00020002, b"UI", sop_class_uid.encode(), b"\x00")
            + _short_element(0x00020003, b"UI", sop_instance_uid.encode(), b"\x00")
            + _short_element(0x00020010, b"UI", transfer_syntax.encode(), b"\x00")
            + _META_TAIL)
    length = struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body))
    return _PREAMBLE + length + body


def received_bytes(event: evt.Event) -> bytes:
    """The C-STORE dataset as sent, in the DICOM File Format (one copy of the payload)."""
    req = cast(C_STORE, event.request)
    meta = file_meta_bytes(str(req.AffectedSOPClassUID or ""), str(req.AffectedSOPInstanceUID or ""),
                           str(event.context.transfer_syntax))
    if meta is None:
        return event.encoded_dataset(include_meta=True)
    stream = req.DataSet
    if not isinstance(stream, BytesIO):
        return event.encoded_dataset(include_meta=True)
    with stream.getbuffer() as payload:
        return b"".join((meta, payload))


def _shut_down(assoc: Any) -> None:
    """Shut the association's socket down, so that a read blocked on it returns."""
    sock = getattr(getattr(getattr(assoc, "dul", None), "socket", None), "socket", None)
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


@dataclass
class AssociationStats:
    """Per-association counters for the closing log line."""

    calling_ae: str
    peer: str
    started: float = field(default_factory=time.monotonic)
    instances: int = 0
    failures: int = 0
    duplicates: int = 0  # acknowledged, first copy kept (one count here, not a log line each)
    bytes: int = 0


class StorageSCP:
    """Owns the pynetdicom AE and its listening server."""

    def __init__(self, config: Config, ingestor: Ingestor, metrics: ListenerMetrics | None = None,
                 audit: AuditSink | None = None,
                 shared_listen: Any = None, label: str = "") -> None:
        """``shared_listen`` (a :class:`~dicom_node.receive.shared_server.SharedListen`): serve on
        the node's listening socket as one of several acceptor processes, whose
        associations are logged as ``<label>/<id>``."""
        self.config = config
        self.ingestor = ingestor
        self.metrics = metrics
        self.audit = audit
        self.shared_listen = shared_listen
        self.label = label
        self.policy = CallerPolicy(config.security.allowed_callers)
        self.ae = self._make_ae()
        self.server: ThreadedAssociationServer | None = None
        self._stats: dict[int, AssociationStats] = {}
        self._lock = threading.Lock()

    def _make_ae(self) -> NodeAE:
        node = self.config.node
        self.gate = NegotiationGate(node.max_negotiating_per_host, node.max_negotiating)
        ae = NodeAE(node.ae_title, self.policy, self.shared_listen, self.gate, self._on_tls_failure)
        ae.maximum_associations = node.max_associations
        ae.max_instance_bytes = node.max_instance_mb * 2**20  # datasets past it are not buffered
        ae.maximum_pdu_size = node.max_pdu_size
        ae.acse_timeout = node.acse_timeout_seconds
        ae.dimse_timeout = node.dimse_timeout_seconds
        ae.network_timeout = node.network_timeout_seconds
        ae.add_supported_context(VERIFICATION, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(str(cx.abstract_syntax), ACCEPTED_TRANSFER_SYNTAXES)
        return ae

    @property
    def port(self) -> int:
        """The bound port (useful when configured as 0 in tests)."""
        assert self.server is not None
        return int(self.server.server_address[1])

    def start(self) -> None:
        """Start listening (non-blocking)."""
        node = self.config.node
        handlers: list[Any] = [
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        tls = server_context(node.tls) if node.tls.enabled else None
        address = (node.host, node.port)
        if self.shared_listen is not None:
            address = self.shared_listen.socket.getsockname()[:2]
        self.server = self.ae.start_server(address, block=False, evt_handlers=handlers, ssl_context=tls)
        log.info("%slistening as %s on %s:%d%s", f"{self.label}: " if self.label else "", node.ae_title,
                 node.host, self.port,
                 " (DICOM TLS" + (", client certificates required)" if node.tls.ca_certificates else ")")
                 if tls else "")

    def stop(self, grace_seconds: float) -> None:
        """Stop accepting, let in-flight associations finish, then abort the rest."""
        if self.server is None:
            return
        self.server.shutdown()
        closed = self.gate.close_all()  # nothing in flight on them
        if closed:
            log.info("closed %d connection(s) that had sent no association request", closed)
        deadline = time.monotonic() + grace_seconds
        while any(a.is_established for a in self._active()) and time.monotonic() < deadline:
            time.sleep(0.05)
        remaining = self._active()
        for assoc in remaining:
            _shut_down(assoc)  # wakes a read waiting for a stalled peer
        for assoc in remaining:
            if assoc.is_established:
                log.warning("aborting association %s at shutdown", self._id(assoc))
            assoc.abort()
        self.server = None
        log.info("listener stopped")

    def _on_tls_failure(self, peer: str, reason: str) -> None:
        if self.audit is not None:
            self.audit.record("association", outcome="rejected", reason=f"TLS handshake failed: {reason}",
                              peer=peer)

    def _id(self, assoc: Any) -> str:
        return f"{self.label}/{assoc.native_id}" if self.label else str(assoc.native_id)

    def _active(self) -> list[Any]:
        return [a for a in self.ae.active_associations if a.is_acceptor and a.is_alive()]

    # ---- handlers -----------------------------------------------------------

    def _on_echo(self, event: evt.Event) -> int:
        return 0x0000

    def _on_store(self, event: evt.Event) -> Dataset:
        req = cast(C_STORE, event.request)
        assoc = event.assoc
        cut = getattr(assoc.dimse, "oversize", {}).pop(int(req.MessageID or 0), None)
        if cut is not None:  # the dataset was not buffered past the limit (reactor.FastStoreDIMSE)
            data = b""
            limit = self.config.node.max_instance_mb
            outcome = StoreOutcome(OUT_OF_RESOURCES, f"instance over {cut} bytes exceeds the maximum of "
                                   f"{limit} MiB", "refused")
            log.warning("C-STORE refused (0x%04X): %s; sop=%s", outcome.status, outcome.comment,
                        str(req.AffectedSOPInstanceUID or "")[:64])
        else:
            data = received_bytes(event)
            outcome = self.ingestor.store(
                StoreRequest(
                    data=data,
                    sop_class_uid=str(req.AffectedSOPClassUID or ""),
                    sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                    transfer_syntax=str(event.context.transfer_syntax),
                    called_ae=assoc.acceptor.ae_title,
                    calling_ae=assoc.requestor.ae_title,
                )
            )
        stats = self._stats.get(id(assoc))
        if stats is not None:
            stats.instances += 1
            stats.bytes += len(data)
            stats.failures += outcome.status != 0
            stats.duplicates += outcome.disposition == "duplicate"
        if self.metrics is not None:
            self.metrics.instance_received(len(data), outcome)
        rsp = Dataset()
        rsp.Status = outcome.status
        if outcome.comment:
            rsp.ErrorComment = outcome.comment[:64]
        return rsp

    def _on_accepted(self, event: evt.Event) -> None:
        assoc = event.assoc
        peer = f"{assoc.requestor.address}:{assoc.requestor.port}"
        with self._lock:
            self._stats[id(assoc)] = AssociationStats(assoc.requestor.ae_title, peer)
        if self.metrics is not None:
            self.metrics.association("accepted")
        log.info("association %s accepted: calling=%s called=%s peer=%s",
                 self._id(assoc), assoc.requestor.ae_title, assoc.acceptor.ae_title, peer)
        if self.audit is not None:
            self.audit.record("association", outcome="accepted", calling_ae=assoc.requestor.ae_title.strip(),
                              called_ae=assoc.acceptor.ae_title.strip(), peer=peer)

    def _on_rejected(self, event: evt.Event) -> None:
        assoc = event.assoc
        reason = self.rejection_reason(assoc)
        if self.metrics is not None:
            self.metrics.association(f"rejected_{reason.replace(' ', '_')}")
        called = assoc.requestor.primitive.called_ae_title if assoc.requestor.primitive else "?"
        log.warning("association rejected (%s): calling=%s called=%s peer=%s",
                    reason, assoc.requestor.ae_title, called, assoc.requestor.address)
        if self.audit is not None:
            self.audit.record("association", outcome="rejected", reason=reason,
                              calling_ae=assoc.requestor.ae_title.strip(), called_ae=str(called).strip(),
                              peer=f"{assoc.requestor.address}:{assoc.requestor.port}")

    def rejection_reason(self, assoc: Any) -> str:
        """Name the reason an association was rejected (recomputed from the policy)."""
        primitive = assoc.requestor.primitive
        called = primitive.called_ae_title if primitive is not None else ""
        if called.strip() != self.config.node.ae_title.strip():
            return "called AE title not recognised"
        if not self.policy.is_allowed(assoc.requestor.ae_title, assoc.requestor.address):
            return "calling AE title not recognised"
        return "too many associations"

    def _on_closed(self, event: evt.Event) -> None:
        with self._lock:
            stats = self._stats.pop(id(event.assoc), None)
        if stats is None:
            return
        how = "released" if event.event is evt.EVT_RELEASED else "aborted"
        elapsed = time.monotonic() - stats.started
        log.info("association %s %s: calling=%s peer=%s instances=%d duplicates=%d failures=%d bytes=%d "
                 "seconds=%.2f", self._id(event.assoc), how, stats.calling_ae, stats.peer, stats.instances,
                 stats.duplicates, stats.failures, stats.bytes, elapsed)
