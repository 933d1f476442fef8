"""Admin actions on the state database: retry a delivery, re-run an analysis, forget a
study. They work whether or not the node is running (the node's loops pick up what
they change, as the state database is shared), and each one is audited with the
user who ran it. They never touch patient data beyond removing it (``forget``).
"""

from __future__ import annotations

import getpass
import logging
import shutil
from dataclasses import dataclass, field

from dicom_node.audit import AuditLog
from dicom_node.config import Config
from dicom_node.errors import ActionRefused
from dicom_node.routing import matching_routes
from dicom_node.storage.spool import Spool
from dicom_node.storage.state import RECEIVING, RUNNING, StateDB
from dicom_node.storage.work import WorkStore

log = logging.getLogger(__name__)


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (containers)
        return "unknown"


@dataclass
class Admin:
    """The admin actions of one configuration's storage folder."""

    config: Config
    db: StateDB
    audit: AuditLog = field(init=False)
    work: WorkStore = field(init=False)

    def __post_init__(self) -> None:
        self.audit = AuditLog(self.config.audit_path)
        self.work = WorkStore(self.db)

    def _record(self, action: str, **fields: object) -> None:
        self.audit.record("admin", action=action, user=_user(), **fields)

    def retry(self, delivery_ids: list[int]) -> list[str]:
        """Send deliveries again now (failed, rejected, or pending ones brought forward)."""
        done = []
        for delivery_id in delivery_ids:
            text = self.work.reopen_delivery(delivery_id, self.config.delivery.deadline_hours * 3600,
                                             f"retry requested by {_user()}")
            self._record("retry", delivery_id=delivery_id)
            done.append(text)
        return done

    def retry_failed(self) -> list[str]:
        """Retry every failed or rejected delivery of the studies' current results."""
        return self.retry(self.work.failed_deliveries())

    def reprocess(self, study_uid: str, plugin: str | None = None) -> str:
        """Analyse a study again with the routes that match it now (only those of
        ``plugin`` when given): a new revision whose results replace the older ones."""
        study = self.db.study(study_uid)
        if study is None:
            raise ActionRefused(f"there is no study {study_uid}")
        if study["state"] == RECEIVING:
            raise ActionRefused(f"study {study_uid} is still receiving: it is analysed once it is stable")
        if study["purged_at"] or not self.db.study_files(study_uid):
            raise ActionRefused(f"study {study_uid}: its images are no longer in the spool (retention): "
                                "send the study again")
        routes = matching_routes(self.config.routes, self.db.study_series(study_uid))
        if plugin is not None:
            routes = [r for r in routes if r.plugin == plugin]
        if not routes:
            which = f" with plugin {plugin!r}" if plugin else ""
            configured = ", ".join(f"{r.name} ({r.plugin})" for r in self.config.routes) or "none"
            raise ActionRefused(f"no route{which} matches study {study_uid} (routes: {configured})")
        revision = self.work.dispatch_study(study_uid, [(r.name, r.plugin) for r in routes])
        names = [r.name for r in routes]
        self._record("reprocess", study_uid=study_uid, routes=names, revision=revision)
        return f"study {study_uid}: revision {revision} queued for {', '.join(names)}"

    def forget(self, study_uid: str) -> str:
        """Remove a study's spooled images, its results and its state, for good."""
        if self.db.study(study_uid) is None:
            raise ActionRefused(f"there is no study {study_uid}")
        jobs = self.work.study_jobs(study_uid)
        if any(job.state == RUNNING for job in jobs):
            raise ActionRefused(f"a job of study {study_uid} is running: wait for it to end")
        # Files first: a crash in between leaves rows without files (forget again), never
        # files without rows, which start-up recovery would register as a new study.
        Spool(self.config.spool_dir).remove_study(study_uid)
        for job in jobs:
            shutil.rmtree(self.config.results_dir / str(job.id), ignore_errors=True)
        counts = self.work.forget_study(study_uid)
        self._record("forget", study_uid=study_uid, **counts)
        log.info("study %s forgotten: %s", study_uid, counts)
        return (f"study {study_uid} forgotten: {counts.get('instances', 0)} instances, "
                f"{counts.get('results', 0)} result objects, {counts['jobs']} jobs, "
                f"{counts['deliveries']} deliveries")
