"""Typed rows of the work tables: a job, a delivery and one instance a delivery sends.

They are built from SQLite rows where they leave the state database
(:class:`dicom_node.storage.work.WorkStore`), so that the runner and the deliverer
use attributes, not string keys.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class JobRow:
    """One row of ``jobs``: an analysis of one revision of a study by one route's plugin."""

    id: int
    study_uid: str
    route: str
    plugin: str
    revision: int
    state: str
    attempts: int
    created_at: float
    reason: str | None = None
    timings: str | None = None  # JSON, as stored
    started_at: float | None = None
    finished_at: float | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> JobRow:
        """From a ``SELECT * FROM jobs`` row (a :class:`sqlite3.Row` or a dict)."""
        return cls(id=int(row["id"]), study_uid=str(row["study_uid"]), route=str(row["route"]),
                   plugin=str(row["plugin"]), revision=int(row["revision"]), state=str(row["state"]),
                   attempts=int(row["attempts"]), created_at=float(row["created_at"]), reason=row["reason"],
                   timings=row["timings"], started_at=_opt_float(row["started_at"]),
                   finished_at=_opt_float(row["finished_at"]))


@dataclass(frozen=True)
class DeliveryRow:
    """One row of ``deliveries``: one job's results to one destination."""

    id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    deadline_at: float
    created_at: float
    updated_at: float
    last_error: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DeliveryRow:
        """From a ``SELECT * FROM deliveries`` row (a :class:`sqlite3.Row` or a dict)."""
        return cls(id=int(row["id"]), job_id=int(row["job_id"]), destination=str(row["destination"]),
                   state=str(row["state"]), attempts=int(row["attempts"]),
                   next_attempt_at=float(row["next_attempt_at"]), deadline_at=float(row["deadline_at"]),
                   created_at=float(row["created_at"]), updated_at=float(row["updated_at"]),
                   last_error=row["last_error"])


@dataclass(frozen=True)
class DeliveryItem:
    """A result instance a delivery sends, with the destination's status so far (None: none yet)."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path
    status: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> DeliveryItem:
        """From a row of ``delivery_items`` joined with ``results``."""
        status = row["status"]
        return cls(sop_instance_uid=str(row["sop_instance_uid"]), sop_class_uid=str(row["sop_class_uid"]),
                   path=Path(row["path"]), status=None if status is None else int(status))
