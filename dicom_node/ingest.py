"""The C-STORE path: check, spool durably, register, answer.

This module does only I/O and bookkeeping; it never decodes pixel data or
transcodes. Every failure maps to a named DIMSE status with a short comment that
carries UIDs and counts, never patient data.

Duplicates: an instance whose SOP Instance UID is already stored is answered with
Success and not stored again (the first copy is kept). It does not re-open the
study, so a PACS that re-sends a study it already sent causes no new analysis.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID

from dicom_node.errors import IngestError, StorageError
from dicom_node.net import statuses
from dicom_node.storage.spool import Spool
from dicom_node.storage.state import InstanceRecord, StateDB
from dicom_node.uids import clean_uid, uid_problem

log = logging.getLogger(__name__)

ROUTING_TAGS = ("Modality", "BodyPartExamined", "SeriesDescription", "StudyDescription", "Manufacturer")
HEADER_TAGS = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", *ROUTING_TAGS]


@dataclass(frozen=True)
class StoreRequest:
    """A received C-STORE: the bytes as sent plus the association's context."""

    data: bytes  # preamble + file meta + dataset, as sent
    sop_class_uid: str  # from the request (Affected SOP Class UID)
    sop_instance_uid: str  # from the request (Affected SOP Instance UID)
    transfer_syntax: str
    called_ae: str
    calling_ae: str


@dataclass(frozen=True)
class StoreOutcome:
    """The status to answer and what happened."""

    status: int
    comment: str = ""
    disposition: str = ""  # new, duplicate, restored, refused
    study_uid: str = ""


def is_analysable_class(sop_class_uid: str) -> bool:
    """Image storage classes may be analysed; SR, SEG, PR, KO, SC, dose... may not."""
    name = UID(sop_class_uid).name
    return "Image Storage" in name and "Secondary Capture" not in name


def _header(req: StoreRequest) -> dict[str, str]:
    try:
        ds = dcmread(BytesIO(req.data), stop_before_pixels=True, specific_tags=HEADER_TAGS)
    except (InvalidDicomError, ValueError, EOFError, OSError, KeyError, TypeError) as exc:
        raise IngestError(f"cannot parse dataset: {type(exc).__name__}", statuses.CANNOT_UNDERSTAND) from exc
    out: dict[str, str] = {}
    for keyword in HEADER_TAGS:
        try:
            value = ds.get(keyword)
        except (ValueError, TypeError, KeyError) as exc:
            raise IngestError(f"cannot decode {keyword}", statuses.CANNOT_UNDERSTAND) from exc
        if value is not None and str(value) != "":
            out[keyword] = str(value)
    return out


def _checked_uids(req: StoreRequest, header: dict[str, str]) -> tuple[str, str, str]:
    uids = []
    for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = header.get(keyword)
        if value is None:
            raise IngestError(f"missing {keyword}", statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS)
        problem = uid_problem(value)
        if problem:
            raise IngestError(f"invalid {keyword}: {problem}", statuses.CANNOT_UNDERSTAND)
        uids.append(clean_uid(value))
    request_uid = clean_uid(req.sop_instance_uid)
    if request_uid and request_uid != uids[2]:
        raise IngestError(
            "SOPInstanceUID differs from the request's Affected SOP Instance UID",
            statuses.DATASET_DOES_NOT_MATCH_SOP_CLASS,
        )
    return uids[0], uids[1], uids[2]


class Ingestor:
    """Turns C-STORE requests into durable, registered instances."""

    def __init__(self, spool: Spool, db: StateDB, *, min_free_bytes: int, max_instance_bytes: int) -> None:
        self.spool = spool
        self.db = db
        self.min_free_bytes = min_free_bytes
        self.max_instance_bytes = max_instance_bytes

    def store(self, req: StoreRequest) -> StoreOutcome:
        """Handle one C-STORE; never raises."""
        try:
            return self._store(req)
        except IngestError as exc:
            log.warning("C-STORE refused (0x%04X): %s; sop=%s", exc.status, exc, clean_uid(req.sop_instance_uid)[:64])
            return StoreOutcome(exc.status, str(exc), "refused")

    def _store(self, req: StoreRequest) -> StoreOutcome:
        if len(req.data) > self.max_instance_bytes:
            raise IngestError(
                f"instance of {len(req.data)} bytes exceeds the maximum of {self.max_instance_bytes}",
                statuses.OUT_OF_RESOURCES,
            )
        header = _header(req)
        study_uid, series_uid, sop_uid = _checked_uids(req, header)
        sop_class = clean_uid(header.get("SOPClassUID", req.sop_class_uid))
        if self._is_duplicate(sop_uid):
            log.info("duplicate instance ignored, first copy kept: sop=%s study=%s", sop_uid, study_uid)
            return StoreOutcome(statuses.SUCCESS, "", "duplicate", study_uid)
        self._check_space(len(req.data))
        try:
            spooled = self.spool.store(study_uid, sop_uid, req.data)
            record = InstanceRecord(
                sop_instance_uid=sop_uid,
                series_uid=series_uid,
                study_uid=study_uid,
                sop_class_uid=sop_class,
                transfer_syntax=req.transfer_syntax,
                path=spooled.path,
                size=spooled.size,
                sha256=spooled.sha256,
                series_attrs={**{k: header[k] for k in ROUTING_TAGS if k in header},
                              "SOPClassUID": sop_class, "CalledAETitle": req.called_ae.strip(),
                              "CallingAETitle": req.calling_ae.strip()},
                analysable=is_analysable_class(sop_class),
            )
            disposition = self.db.register_instance(record)
        except StorageError as exc:
            raise IngestError(str(exc), statuses.OUT_OF_RESOURCES) from exc
        return StoreOutcome(statuses.SUCCESS, "", disposition, study_uid)

    def _is_duplicate(self, sop_uid: str) -> bool:
        try:
            rows = self.db.query(
                "SELECT 1 FROM instances WHERE sop_instance_uid=? AND purged=0", (sop_uid,)
            )
        except StorageError as exc:
            raise IngestError(str(exc), statuses.OUT_OF_RESOURCES) from exc
        return bool(rows)

    def _check_space(self, incoming: int) -> None:
        try:
            free = self.spool.free_bytes()
        except OSError as exc:
            raise IngestError(f"cannot check free space: {exc.strerror}", statuses.OUT_OF_RESOURCES) from exc
        if free - incoming < self.min_free_bytes:
            raise IngestError(
                f"free disk space {free // 2**20} MiB is below the reserve of {self.min_free_bytes // 2**20} MiB",
                statuses.OUT_OF_RESOURCES,
            )
