"""Study assembly: decide when a study is stable and hand it to its routes.

A study is stable when no new analysable instance arrived for ``stable_seconds``,
judged from the database: in a cluster every node's assembler looks, and the dispatch
goes through only for the study as it was read, so exactly one node dispatches it.
When several routes match, the study waits for the longest ``stable_seconds``
among them and is then dispatched to all of them at once (one revision). A study no
route matches is recorded as ignored after ``assembly.default_stable_seconds``.
Instances that arrive later re-open the study (see ``StateDB.register_instance``);
its next dispatch is a new revision whose results supersede the older ones.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.routing import matching_routes
from dicom_node.storage.spool import Spool
from dicom_node.storage.state import IGNORED, StateDB
from dicom_node.storage.work import WorkStore

log = logging.getLogger(__name__)


class Assembler:
    """Periodic checks: stability, dispatch, and retention."""

    def __init__(self, config: Config, db: StateDB, work: WorkStore, spool: Spool,
                 audit: AuditLog | None = None) -> None:
        self.config = config
        self.db = db
        self.work = work
        self.spool = spool
        self.audit = audit
        self._last_retention = 0.0

    def tick(self, now: float | None = None) -> None:
        """Dispatch or ignore every study that has become stable."""
        now = time.time() if now is None else now
        for study in self.db.receiving_studies():
            self._check_study(study, now)
        if now - self._last_retention >= 60.0:
            self._last_retention = now
            self.apply_retention(now)

    def _check_study(self, study: dict[str, Any], now: float) -> None:
        uid = study["study_uid"]
        quiet = now - (study["last_received_at"] or now)
        routes = matching_routes(self.config.routes, self.db.study_series(uid))
        if not routes:
            if quiet >= self.config.assembly.default_stable_seconds and self.db.set_study_state(
                    uid, IGNORED, "no route matches", expect_last_received_at=study["last_received_at"]):
                self._audit(study, outcome="ignored", routes=[])
                log.info("study %s ignored: no route matches (%d instances)", uid, study["instance_count"])
            return
        if quiet < max(r.stable_seconds for r in routes):
            return
        revision = self.work.dispatch_stable_study(uid, [(r.name, r.plugin) for r in routes],
                                                   study["last_received_at"])
        if revision is None:  # another node dispatched it, or an instance arrived meanwhile
            return
        self._audit(study, outcome="dispatched", routes=[r.name for r in routes], revision=revision)
        log.info("study %s stable after %.1f s: %d instances, routes %s, revision %d",
                 uid, quiet, study["instance_count"], ",".join(r.name for r in routes), revision)

    def _audit(self, study: dict[str, Any], **fields: object) -> None:
        if self.audit is not None:
            self.audit.record("study-received", study_uid=study["study_uid"],
                              instances=study["instance_count"], **fields)

    def apply_retention(self, now: float) -> None:
        """Remove spooled studies the retention policy no longer keeps."""
        policy = self.config.retention
        for uid in self.db.studies_to_purge(now, policy.ignored_days, policy.delivered_days):
            self.spool.remove_study(uid)
            self.db.mark_purged(uid)
            log.info("study %s: spooled files removed by retention policy", uid)
