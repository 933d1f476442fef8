"""The SCU side: C-ECHO and C-STORE to a peer, checking every status.

Only the presentation contexts the files need are proposed: one per SOP class for
uncompressed data (the file's transfer syntax first, then Explicit and Implicit VR
Little Endian, between which pynetdicom converts), plus one per compressed transfer
syntax actually present, sent as stored.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.association import Association

from dicom_node.errors import DeliveryError

log = logging.getLogger(__name__)

MAX_CONTEXTS = 128
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
VERIFICATION = "1.2.840.10008.1.1"


@dataclass(frozen=True)
class Peer:
    """Where to connect: AE title, host and port, and TLS when used."""

    ae_title: str
    host: str
    port: int
    tls: ssl.SSLContext | None = None
    server_hostname: str | None = None

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls else "")


@dataclass(frozen=True)
class OutgoingFile:
    """A file to send and what it is."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str


def describe_file(path: Path) -> OutgoingFile:
    """Read a file's meta header; raises DeliveryError if it is not DICOM."""
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
        meta = ds.file_meta
        return OutgoingFile(
            path,
            str(meta.get("MediaStorageSOPClassUID") or ds.SOPClassUID),
            str(meta.get("MediaStorageSOPInstanceUID") or ds.SOPInstanceUID),
            str(meta.TransferSyntaxUID),
        )
    except (InvalidDicomError, AttributeError, OSError, ValueError) as exc:
        raise DeliveryError(f"{path}: not a DICOM file with file meta ({type(exc).__name__})") from exc


def plan_contexts(files: Iterable[OutgoingFile]) -> list[tuple[str, list[str]]]:
    """The presentation contexts (abstract syntax, transfer syntaxes) to propose."""
    plan: dict[tuple[str, str], list[str]] = {}
    for f in files:
        ts = UID(f.transfer_syntax)
        if ts.is_compressed or ts not in UNCOMPRESSED:
            plan.setdefault((f.sop_class_uid, str(ts)), [str(ts)])
        else:
            syntaxes = plan.setdefault((f.sop_class_uid, "uncompressed"), [])
            for candidate in (str(ts), *UNCOMPRESSED):
                if candidate not in syntaxes:
                    syntaxes.append(candidate)
    if len(plan) > MAX_CONTEXTS:
        raise DeliveryError(f"{len(plan)} presentation contexts needed; at most {MAX_CONTEXTS} per association")
    return [(sop_class, syntaxes) for (sop_class, _), syntaxes in plan.items()]


def _make_ae(calling_ae: str, timeout: float) -> ApplicationEntity:
    ae = ApplicationEntity(calling_ae)
    ae.acse_timeout = timeout
    ae.dimse_timeout = max(timeout, 60.0)
    ae.network_timeout = max(timeout, 60.0)
    ae.connection_timeout = timeout
    return ae


def _associate(ae: ApplicationEntity, peer: Peer) -> Association:
    connected = threading.Event()
    answered = threading.Event()  # any PDU from the peer: an accept, a reject or its own abort
    tls_args = (peer.tls, peer.server_hostname or peer.host) if peer.tls is not None else None
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls_args,
                         evt_handlers=[(evt.EVT_CONN_OPEN, lambda _: connected.set()),
                                       (evt.EVT_PDU_RECV, lambda _: answered.set())])
    if assoc.is_established:
        return assoc
    if not connected.is_set():
        problem = _tls_problem(peer) if peer.tls is not None else None
        raise DeliveryError(f"cannot connect to {peer}: {problem or 'refused or unreachable'}")
    if assoc.is_rejected:
        raise DeliveryError(f"association rejected by {peer} (check its AE title and allowlist)")
    if not answered.is_set():  # our own ACSE timeout ended it, not the peer
        raise DeliveryError(f"no answer from {peer} within {ae.acse_timeout:g} s: it accepted the connection "
                            "but sent nothing back (is that port a DICOM service?)")
    raise DeliveryError(f"association aborted by {peer}")


def _tls_problem(peer: Peer, timeout: float = 5.0) -> str | None:
    """Why a TLS connection to ``peer`` fails (e.g. certificate verify failed), if it does."""
    assert peer.tls is not None
    try:
        with socket.create_connection((peer.host, peer.port), timeout=timeout) as raw:
            with peer.tls.wrap_socket(raw, server_hostname=peer.server_hostname or peer.host):
                return None
    except ssl.SSLError as exc:
        return f"TLS handshake failed: {exc.reason or exc}"
    except OSError as exc:
        return exc.strerror or str(exc)


def echo(peer: Peer, calling_ae: str, timeout: float = 10.0) -> int:
    """C-ECHO ``peer``; returns the status, raises DeliveryError when unreachable."""
    ae = _make_ae(calling_ae, timeout)
    ae.add_requested_context(VERIFICATION)
    assoc = _associate(ae, peer)
    try:
        rsp = assoc.send_c_echo()
    finally:
        assoc.release()
    if "Status" not in rsp:
        raise DeliveryError(f"no C-ECHO response from {peer} within {ae.dimse_timeout:g} s")
    return int(rsp.Status)


def store_files(
    peer: Peer,
    files: Sequence[OutgoingFile],
    calling_ae: str,
    *,
    timeout: float = 10.0,
    on_status: Callable[[OutgoingFile, int], None] | None = None,
) -> dict[str, int]:
    """C-STORE ``files`` over one association; returns SOP Instance UID -> status.

    A file whose context was not accepted gets status -1; a lost response -2.
    Raises DeliveryError when no association can be established.
    """
    ae = _make_ae(calling_ae, timeout)
    for sop_class, syntaxes in plan_contexts(files):
        ae.add_requested_context(sop_class, syntaxes)
    assoc = _associate(ae, peer)
    statuses: dict[str, int] = {}
    try:
        for f in files:
            status = _store_one(assoc, f)
            statuses[f.sop_instance_uid] = status
            if on_status is not None:
                on_status(f, status)
            if not assoc.is_established:
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


def _store_one(assoc: Association, f: OutgoingFile) -> int:
    try:
        ds = dcmread(f.path)
        rsp = assoc.send_c_store(ds)
    except ValueError as exc:
        log.warning("not sent, no accepted context: sop=%s (%s)", f.sop_instance_uid, exc)
        return -1
    except (OSError, InvalidDicomError) as exc:
        log.warning("cannot read %s for sending: %s", f.path, exc)
        return -1
    if "Status" not in rsp:
        return -2
    return int(rsp.Status)
