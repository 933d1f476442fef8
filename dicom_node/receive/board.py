"""The listener board: what the acceptor processes share with each other and the node.

A small block of shared memory (a ``memfd``, passed to every acceptor process) with
one row per acceptor: its pid and readiness (written by the node), the associations
it holds now, and its cumulative counters (associations by outcome, C-STOREs by
result, bytes stored) that the node turns into its Prometheus metrics. Each row has
one writer (its acceptor; the node only when the acceptor is dead), so nothing a
killed acceptor counted is lost: the row outlives it.

The global association limit: an acceptor counts a connection in its row once its
A-ASSOCIATE-RQ has been read and takes it out when the association ends, both under a POSIX record
lock on the memfd (released by the kernel when a process dies), and at negotiation
compares its own count plus every other row's with ``max_associations``.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import struct
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

# Counter names, in row order after pid, ready and active.
ASSOCIATION_OUTCOMES = (
    "accepted",
    "rejected_called_AE_title_not_recognised",
    "rejected_calling_AE_title_not_recognised",
    "rejected_too_many_associations",
)
INSTANCE_RESULTS = ("new", "duplicate", "restored", "refused", "success", "failure")
COUNTERS = (*(f"association:{o}" for o in ASSOCIATION_OUTCOMES),
            *(f"instance:{r}" for r in INSTANCE_RESULTS), "bytes")
_PID, _READY, _ACTIVE, _CONNECTED, _DISK_REFUSED_AT = 0, 1, 2, 3, 4
_FIRST_COUNTER = 5
_FIELDS = _FIRST_COUNTER + len(COUNTERS)
_CELL = struct.Struct("=q")
_ROW_BYTES = _FIELDS * _CELL.size


class Board:
    """Shared rows of the acceptor processes (see the module's docstring)."""

    def __init__(self, fd: int, rows: int) -> None:
        self.fd = fd
        self.rows = rows
        self._map = mmap.mmap(fd, rows * _ROW_BYTES)
        self._lock = threading.Lock()  # POSIX record locks are per process, not per thread

    @classmethod
    def create(cls, rows: int) -> "Board":
        """A new, zeroed board (in the node), whose fd the acceptors inherit."""
        fd = os.memfd_create("dicom-node-listener")  # close-on-exec; passed with pass_fds
        os.ftruncate(fd, rows * _ROW_BYTES)
        return cls(fd, rows)

    def close(self) -> None:
        """Unmap and close (the memory goes when every process has closed it)."""
        self._map.close()
        os.close(self.fd)

    # ---- cells ------------------------------------------------------------------

    def _get(self, row: int, field: int) -> int:
        return int(_CELL.unpack_from(self._map, (row * _FIELDS + field) * _CELL.size)[0])

    def _set(self, row: int, field: int, value: int) -> None:
        _CELL.pack_into(self._map, (row * _FIELDS + field) * _CELL.size, value)

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Exclusive across threads and processes (a dead holder's lock is released)."""
        with self._lock:
            fcntl.lockf(self.fd, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.lockf(self.fd, fcntl.LOCK_UN)

    # ---- the node's view ------------------------------------------------------------

    def set_process(self, row: int, pid: int) -> None:
        """Record a freshly started acceptor (not ready yet, holding nothing)."""
        with self.locked():
            self._set(row, _PID, pid)
            self._set(row, _READY, 0)
            self._set(row, _ACTIVE, 0)

    def clear_process(self, row: int) -> None:
        """Forget a dead acceptor's process and associations (its counters stay)."""
        self.set_process(row, 0)

    def pid(self, row: int) -> int:
        """The acceptor's pid (0: none)."""
        return self._get(row, _PID)

    def ready(self, row: int) -> bool:
        """True once the acceptor serves."""
        return self._get(row, _READY) == 1

    def counter(self, row: int, name: str) -> int:
        """One counter of one acceptor."""
        return self._get(row, _FIRST_COUNTER + COUNTERS.index(name))

    def totals(self) -> dict[str, int]:
        """Every counter summed over all rows (monotonic: rows are never reset)."""
        return {name: sum(self._get(r, _FIRST_COUNTER + i) for r in range(self.rows))
                for i, name in enumerate(COUNTERS)}

    # ---- an acceptor's view ------------------------------------------------------------

    def mark_ready(self, row: int) -> None:
        """The acceptor ``row`` serves now."""
        self._set(row, _READY, 1)

    def acquire(self, row: int) -> None:
        """Count an association of acceptor ``row`` (its A-ASSOCIATE-RQ has been read)."""
        with self.locked():
            self._set(row, _ACTIVE, self._get(row, _ACTIVE) + 1)

    def release(self, row: int) -> None:
        """An association of acceptor ``row`` ended."""
        with self.locked():
            self._set(row, _ACTIVE, max(0, self._get(row, _ACTIVE) - 1))

    def connected(self, row: int, change: int) -> None:
        """Acceptor ``row`` accepted (+1) or lost (-1) a connection (what balancing reads)."""
        with self._lock:
            self._set(row, _CONNECTED, max(0, self._get(row, _CONNECTED) + change))

    def active(self, row: int) -> int:
        """Connections acceptor ``row`` holds now."""
        return self._get(row, _ACTIVE)

    def others_active(self, row: int) -> int:
        """Connections held by the other acceptors (read under the lock)."""
        with self.locked():
            return sum(self._get(r, _ACTIVE) for r in range(self.rows) if r != row)

    def least_loaded(self, row: int) -> bool:
        """True when no other ready acceptor holds fewer connections than ``row``."""
        mine = self._get(row, _CONNECTED)
        return all(self._get(r, _CONNECTED) >= mine for r in range(self.rows)
                   if r != row and self._get(r, _PID) and self._get(r, _READY) == 1)

    def mark_disk_refusal(self, row: int) -> None:
        """Acceptor ``row`` refused a C-STORE for the disk reserve, now (unix time)."""
        with self._lock:
            self._set(row, _DISK_REFUSED_AT, int(time.time()))

    def last_disk_refusal(self) -> float:
        """Unix time of the latest C-STORE refused for the disk reserve by any acceptor (0: never)."""
        return float(max(self._get(r, _DISK_REFUSED_AT) for r in range(self.rows)))

    def add(self, row: int, counter: str, amount: int = 1) -> None:
        """Add to one of acceptor ``row``'s counters (its only writer)."""
        field = _FIRST_COUNTER + COUNTERS.index(counter)
        with self._lock:
            self._set(row, field, self._get(row, field) + amount)


class BoardMetrics:
    """The listener's metrics interface (as :class:`dicom_node.metrics.Metrics`), on a board row."""

    def __init__(self, board: Board, row: int) -> None:
        self.board = board
        self.row = row

    def association(self, outcome: str) -> None:
        """Count an accepted or rejected association."""
        if outcome in ASSOCIATION_OUTCOMES:
            self.board.add(self.row, f"association:{outcome}")

    def instance_received(self, size: int, outcome: object) -> None:
        """Count one C-STORE by its disposition (as ``Metrics.instance_received``)."""
        status, disposition = getattr(outcome, "status", 1), getattr(outcome, "disposition", "")
        result = disposition or ("success" if status == 0 else "failure")
        if result in INSTANCE_RESULTS:
            self.board.add(self.row, f"instance:{result}")
        if disposition == "new":
            self.board.add(self.row, "bytes", size)
        if getattr(outcome, "below_disk_reserve", False):
            self.board.mark_disk_refusal(self.row)
