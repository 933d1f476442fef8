"""``dicom-node conformance``: a DICOM Conformance Statement generated from the code.

Everything listed comes from the objects the node actually uses: the presentation
contexts the listener accepts, the association policy of the configuration, the
transfer syntaxes proposed when sending, and the IODs the encoders create. A copy is
kept in ``docs/conformance.md``; a test regenerates it and compares, so the document
never drifts from the code.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

from pydicom.uid import UID
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_node.config import Config
from dicom_node.dataset_scan import INFLATION_FLOOR_BYTES, MAX_DEPTH, MAX_INFLATION_RATIO
from dicom_node.net.scu import UNCOMPRESSED, VERIFICATION
from dicom_node.receive.reactor import MAX_PRESENTATION_CONTEXTS, MAX_TRANSFER_SYNTAXES, pdu_read_limit
from dicom_node.receive.scp import ACCEPTED_TRANSFER_SYNTAXES

SEG_STORAGE = UID("1.2.840.10008.5.1.4.1.1.66.4")
COMPREHENSIVE_3D_SR = UID("1.2.840.10008.5.1.4.1.1.88.34")
SECONDARY_CAPTURE = UID("1.2.840.10008.5.1.4.1.1.7")
KEY_OBJECT_SELECTION = UID("1.2.840.10008.5.1.4.1.1.88.59")


def _node_version() -> str:
    try:
        return version("dicom-node")
    except PackageNotFoundError:
        return "unknown"


def _uid_rows(uids: list[str]) -> list[str]:
    return [f"| {UID(u).name} | `{u}` |" for u in uids]


def _policy(config: Config) -> list[str]:
    node, callers = config.node, config.security.allowed_callers
    allow = ", ".join(f"{c.ae_title}" + (f" from {c.host}" if c.host else "") for c in callers)
    return [
        f"- AE title: `{node.ae_title}`, listening on {node.host} port {node.port}.",
        "- Called AE title must equal ours; otherwise A-ASSOCIATE-RJ rejected-permanent, "
        "source service-user, reason 7 (called AE title not recognised).",
        "- Calling AE titles: " + (f"only {allow}; others rejected with reason 3 (calling AE title "
                                   "not recognised)." if callers else "any (no allowlist configured)."),
        f"- At most {node.max_associations} concurrent associations"
        + (" (one limit over all the listener's processes)" if node.listener_processes != 1 else "")
        + "; more get A-ASSOCIATE-RJ "
        "rejected-transient, source service-provider (presentation), reason 2 (local limit exceeded).",
        f"- Maximum PDU size received: {node.max_pdu_size or 'unlimited'} bytes"
        + (f"; a PDU announced longer than {pdu_read_limit(node.max_pdu_size)} bytes closes the "
           "connection before any of it is read. " if node.max_pdu_size else ". ")
        + f"Timeouts: ACSE {node.acse_timeout_seconds:g} s, DIMSE {node.dimse_timeout_seconds:g} s, "
        f"network {node.network_timeout_seconds:g} s.",
        "- Every read of a PDU has a deadline: the ACSE timeout until the A-ASSOCIATE-RQ has been "
        "read, the network timeout after; a peer that stops half-way through a PDU is disconnected "
        "then. A connection takes an association slot only once its A-ASSOCIATE-RQ has been read; "
        f"at most {node.max_negotiating_per_host} connections per peer address and {node.max_negotiating} "
        "in all (per listener process) may still be negotiating, and over either limit the oldest "
        "of them is closed.",
        "- These PDU limits, deadlines and negotiation limits need pynetdicom 3.0.x, which the "
        "package pins. Should another pynetdicom be forced in, the node listens with pynetdicom's "
        "own server in one process without them and says so in a warning at start.",
        f"- An A-ASSOCIATE-RQ with more than {MAX_PRESENTATION_CONTEXTS} presentation contexts, or more "
        f"than {MAX_TRANSFER_SYNTAXES} transfer syntaxes in one, gets A-ASSOCIATE-RJ rejected-permanent, "
        "source service-user, reason 1 (no reason given). A PDU of unknown type gets A-ABORT "
        "(source service-provider, reason unrecognised PDU) and the connection is closed.",
        "- With TLS, the handshake must complete within the ACSE timeout; failed handshakes are "
        "logged and audited with the peer's address and the reason.",
        "- Asynchronous operations: not supported (one operation at a time per association).",
        "- Security: " + (
            f"DICOM TLS (Basic TLS Secure Transport Connection profile), {node.tls.min_version} or newer"
            + (", client certificates required (mutual TLS)" if node.tls.ca_certificates else "")
            if node.tls.enabled else
            "plain TCP in this configuration; DICOM TLS (Basic TLS Secure Transport Connection "
            "profile, TLS 1.2+) is available on the listener and per destination"
        ) + ".",
    ]


def _store_statuses(config: Config) -> list[str]:
    node = config.node
    return [
        "| Status | Meaning | When |",
        "|---|---|---|",
        "| 0x0000 | Success | the instance is flushed to disk and recorded (or is a duplicate of a stored one) |",
        f"| 0xA700 | Out of Resources | write error, free disk below {node.min_free_disk_mb} MiB, "
        f"instance over {node.max_instance_mb} MiB (not buffered past that), or a deflated dataset that inflates past "
        f"{node.max_instance_mb} MiB or past {MAX_INFLATION_RATIO} times its size on the wire (when over "
        f"{INFLATION_FLOOR_BYTES // 2**20} MiB); checked as a stream, never inflated whole in memory |",
        "| 0xA900 | Data Set does not match SOP Class | Study, Series or SOP Instance UID missing, "
        "or the SOP Class or SOP Instance UID differs from the request's Affected SOP Class/Instance UID |",
        "| 0xC000 | Cannot understand | dataset cannot be parsed to its end (an element, item or "
        f"sequence longer than the data, not closed, or nested deeper than {MAX_DEPTH}; checked "
        "without decoding pixel data), or a UID is malformed |",
    ]


def conformance_statement(config: Config) -> str:
    """The conformance statement for ``config``, as Markdown."""
    storage = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
    lines = [
        f"# DICOM Conformance Statement: dicom-node {_node_version()}",
        "",
        "Generated by `dicom-node conformance` from the code and the embedded default "
        "configuration. Do not edit by hand.",
        "",
        "## 1. Application Entity",
        "",
        "One AE, acting as Storage SCP (receiving studies), Storage SCU (sending results) "
        "and Verification SCP/SCU.",
        "",
        "## 2. Association policy (as SCP)",
        "",
        *_policy(config),
        "",
        "## 3. SOP classes accepted (SCP)",
        "",
        f"Verification (`{VERIFICATION}`) and these {len(storage)} storage SOP classes:",
        "",
        "| SOP class | UID |",
        "|---|---|",
        *_uid_rows(storage),
        "",
        "## 4. Transfer syntaxes accepted (SCP)",
        "",
        "Accepted for every storage SOP class and stored exactly as received "
        "(never decoded or transcoded on receipt):",
        "",
        "| Transfer syntax | UID |",
        "|---|---|",
        *_uid_rows(list(ACCEPTED_TRANSFER_SYNTAXES)),
        "",
        "## 5. C-STORE response statuses (SCP)",
        "",
        *_store_statuses(config),
        "",
        "Duplicates: an instance whose SOP Instance UID is already stored gets Success and "
        "the first copy is kept.",
        "",
        "## 6. Objects created and sent (SCU)",
        "",
        "| IOD | SOP class UID | Content |",
        "|---|---|---|",
        f"| Segmentation | `{SEG_STORAGE}` | BINARY, one segment per finding, Algorithm Identification, "
        "references to the source images and Frame of Reference |",
        f"| Comprehensive 3D SR | `{COMPREHENSIVE_3D_SR}` | TID 1500 Measurement Report: planar long axis "
        "and volumetric outlines per finding, device observer, image library |",
        f"| Secondary Capture Image | `{SECONDARY_CAPTURE}` | Key images, RGB, Burned In Annotation YES: a "
        "summary (findings table, model and version, series analysed, NOT FOR DIAGNOSTIC USE unless "
        "cleared for clinical use), then one image per finding on its axial key slice in lung window "
        "with outline, long axis, R/L and A/P markers and a caption (long and short axis, volume, mean "
        "HU, score); Source Image Sequence, Contributing Equipment |",
        f"| Key Object Selection Document | `{KEY_OBJECT_SELECTION}` | TID 2010, title (113000, DCM, "
        "\"Of Interest\"): the key images, the key source images, the SEG and the SR; device observer |",
        "",
        "Each analysis (revision r, from 0) puts its objects in new series of the source study: "
        "SEG 9001 + 10r, SR 9002 + 10r, key images 9003 + 10r, KOS 9004 + 10r. A route's "
        "`outputs` selects which are made (configured here: "
        + ("; ".join(f"{r.name}: {', '.join(r.outputs)}" for r in config.routes) or "no routes") + ").",
        "",
        "Results are sent by C-STORE proposing only the SOP classes needed, each with the "
        "transfer syntaxes " + ", ".join(f"{UID(u).name}" for u in UNCOMPRESSED) + ". A delivery "
        "is complete only when every instance received Success or Warning; Out of Resources "
        f"and unreachable peers are retried with exponential backoff for up to "
        f"{config.delivery.deadline_hours:g} hours; other failure statuses end the delivery.",
        "",
        "## 7. Character sets",
        "",
        "Received objects are stored as received. Created objects copy the patient and "
        "study modules of the source; text the node adds is plain ASCII.",
        "",
    ]
    return "\n".join(lines)
