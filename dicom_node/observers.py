"""What the node's parts report to: metrics and the audit trail, as Protocols.

The listener, the job runner and the deliverer take these collaborators optionally
(tests run them without). In the node's own process they are
:class:`dicom_node.metrics.Metrics` and :class:`dicom_node.audit.AuditLog`; in an
acceptor process the listener counts on its row of the shared board instead
(:class:`dicom_node.receive.board.BoardMetrics`). Nothing here imports them.
"""

from __future__ import annotations

from typing import Any, Protocol


class ListenerMetrics(Protocol):
    """Counts of the DICOM listener."""

    def association(self, outcome: str) -> None:
        """Count an accepted or rejected association ("accepted", "rejected_<reason>")."""

    def instance_received(self, size: int, outcome: Any) -> None:
        """Count one C-STORE by its outcome (a :class:`dicom_node.receive.ingest.StoreOutcome`)."""


class JobMetrics(Protocol):
    """Counts and stage timings of analysis jobs."""

    def job_finished(self, timings: dict[str, float]) -> None:
        """Record one finished job's stage timings (seconds)."""


class DeliveryMetrics(Protocol):
    """Counts of result deliveries."""

    def delivery(self, outcome: str) -> None:
        """Count one delivery attempt ("sent", "failed", "retried")."""


class AuditSink(Protocol):
    """The audit trail: one record per event, never raising into the caller."""

    def record(self, event: str, **fields: Any) -> None:
        """Append one record."""
