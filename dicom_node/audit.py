"""Audit trail in the spirit of IHE ATNA / DICOM PS3.15 A.5: append-only JSON lines.

One record per event: association (accepted or rejected, and why), study received
(instance count), analysis run (plugin, version, outcome), result delivered or
failed (destination, instance UIDs, statuses), configuration loaded (its hash).
Records carry UIDs, AE titles, addresses and counts; never patient names or IDs.
Each record is appended with ``O_APPEND`` and flushed to disk before returning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class AuditLog:
    """Appends audit records to ``path`` (thread-safe, durable per record)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def record(self, event: str, **fields: Any) -> None:
        """Append one record; an audit failure is logged, never raised into the caller."""
        entry = {"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                 "event": event, **fields}
        line = (json.dumps(entry, default=str, separators=(",", ":")) + "\n").encode()
        try:
            with self._lock:
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, line)
                    os.fdatasync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.error("audit record %s could not be written: %s", event, exc.strerror)


def config_hash(config_json: str) -> str:
    """SHA-256 of the effective configuration (as canonical JSON)."""
    return hashlib.sha256(config_json.encode()).hexdigest()


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """``--since``: an ISO 8601 time (UTC if no zone) or a duration back from now (30m, 2h, 7d)."""
    now = now or datetime.now(timezone.utc)
    match = _DURATION.match(text.strip())
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNITS[match[2]])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError as exc:
        raise ValueError(f"--since {text!r}: use an ISO time (2026-12-01T08:00) or a duration (30m, 2h, 7d)") from exc
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


def read_records(path: Path, since: datetime | None = None, event: str | None = None) -> Iterator[dict[str, Any]]:
    """Records of the audit log, oldest first, filtered by time and event type."""
    if not path.exists():
        return
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line after a crash
            if event and entry.get("event") != event:
                continue
            if since and datetime.fromisoformat(entry["time"]) < since:
                continue
            yield entry
