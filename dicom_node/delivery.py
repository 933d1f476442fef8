"""Delivery: send result objects to destinations until every one is confirmed.

A delivery is done only when every instance got Success or Warning. A peer that
cannot be reached, aborts, or answers Out of Resources is retried with exponential
backoff (``retry_initial_seconds`` doubling up to ``retry_max_seconds``) until the
deadline; the schedule is in the database, so retries survive restarts. A failure
status that a retry cannot cure (e.g. 0xA900, 0xC000) ends the delivery as
*rejected* at once. Only unconfirmed instances are sent again.
"""

from __future__ import annotations

import logging
import time

from dicom_node.observers import AuditSink, DeliveryMetrics
from dicom_node.config import Config, Destination
from dicom_node.errors import DeliveryError
from dicom_node.net import statuses
from dicom_node.net.scu import Peer, describe_file, store_files
from dicom_node.net.tls import client_context
from dicom_node.storage.rows import DeliveryRow
from dicom_node.storage.state import DONE, FAILED, REJECTED
from dicom_node.storage.work import WorkStore

log = logging.getLogger(__name__)


def peer_for(dest: Destination) -> Peer:
    """The SCU peer of a configured destination, with its TLS context when enabled."""
    tls = client_context(dest.tls) if dest.tls.enabled else None
    return Peer(dest.ae_title, dest.host, dest.port, tls, dest.tls.server_hostname)


def backoff_seconds(attempts: int, initial: float, maximum: float) -> float:
    """Delay before attempt number ``attempts + 1``."""
    return float(min(maximum, initial * (2 ** min(attempts, 30))))


class Deliverer:
    """Works through due deliveries, one association per delivery attempt."""

    def __init__(self, config: Config, work: WorkStore, metrics: DeliveryMetrics | None = None,
                 audit: AuditSink | None = None) -> None:
        self.config = config
        self.work = work
        self.metrics = metrics
        self.audit = audit

    def tick(self, now: float | None = None) -> None:
        """Attempt every delivery that is due."""
        now = time.time() if now is None else now
        for delivery in self.work.due_deliveries(now):
            if self.work.claim_delivery(delivery.id):  # in a cluster: unless another node took it
                self.attempt(delivery)

    def _peer(self, name: str) -> Peer | None:
        dest = self.config.destinations.get(name)
        return peer_for(dest) if dest else None

    def attempt(self, delivery: DeliveryRow) -> None:
        """One attempt at one delivery; updates its state."""
        did = delivery.id
        peer = self._peer(delivery.destination)
        if peer is None:
            self.work.end_delivery(did, FAILED, f"destination {delivery.destination!r} is not configured")
            return
        try:
            files = [describe_file(item.path) for item in self.work.unconfirmed_items(did)]
        except DeliveryError as exc:
            self.work.end_delivery(did, FAILED, f"result file unreadable: {exc}")
            return
        calling = self.config.delivery.calling_ae_title or self.config.node.ae_title
        try:
            result = store_files(
                peer, files, calling, timeout=self.config.delivery.connect_timeout_seconds,
                on_status=lambda f, s: self.work.record_status(did, f.sop_instance_uid, s),
            )
        except DeliveryError as exc:
            if self.audit is not None:
                self.audit.record("delivery", delivery_id=did, job_id=delivery.job_id,
                                  destination=delivery.destination, peer=str(peer),
                                  outcome="no association", error=str(exc))
            self._retry_or_fail(delivery, str(exc))
            return
        self._evaluate(delivery, peer, result, len(files))

    def _evaluate(self, delivery: DeliveryRow, peer: Peer, result: dict[str, int], expected: int) -> None:
        did = delivery.id
        bad = {uid: s for uid, s in result.items() if not statuses.is_success_or_warning(s)}
        if self.audit is not None:
            self.audit.record("delivery", delivery_id=did, job_id=delivery.job_id,
                              destination=delivery.destination, peer=str(peer),
                              statuses={uid: s for uid, s in result.items()},
                              outcome="done" if len(result) == expected and not bad else "not confirmed")
        if len(result) == expected and not bad:
            self.work.end_delivery(did, DONE)
            if self.metrics is not None:
                self.metrics.delivery("sent")
            log.info("delivery %d to %s done: %d instances confirmed", did, peer, expected)
            return
        permanent = {uid: s for uid, s in bad.items() if s >= 0 and not statuses.is_retryable_failure(s)}
        if permanent:
            detail = ", ".join(f"{uid}=0x{s:04X}" for uid, s in permanent.items())
            self.work.end_delivery(did, REJECTED, f"{peer} refused: {detail}")
            if self.metrics is not None:
                self.metrics.delivery("failed")
            log.error("delivery %d to %s rejected (not retried): %s", did, peer, detail)
            return
        missing = expected - len(result)
        detail = ", ".join(f"{uid}=0x{s:04X}" if s >= 0 else f"{uid}=no response" for uid, s in bad.items())
        self._retry_or_fail(delivery, f"{peer}: {detail or ''}{' ' if detail else ''}{missing} not sent".strip())

    def _retry_or_fail(self, delivery: DeliveryRow, error: str) -> None:
        did = delivery.id
        now = time.time()
        delay = backoff_seconds(delivery.attempts, self.config.delivery.retry_initial_seconds,
                                self.config.delivery.retry_max_seconds)
        if now + delay > delivery.deadline_at:
            self.work.end_delivery(did, FAILED, f"deadline passed; last error: {error}")
            if self.metrics is not None:
                self.metrics.delivery("failed")
            log.error("delivery %d failed for good (deadline passed): %s", did, error)
            return
        self.work.retry_delivery(did, now + delay, error)
        if self.metrics is not None:
            self.metrics.delivery("retried")
        log.warning("delivery %d attempt %d failed, retry in %.0f s: %s",
                    did, delivery.attempts + 1, delay, error)
