"""Jobs, results and deliveries in the state database, with their transitions.

In a cluster (several nodes on one PostgreSQL database, ``owner`` set) every claim is
exclusive: a job is claimed with ``SELECT ... FOR UPDATE SKIP LOCKED`` and a delivery
by a conditional update, and the claimer holds it under a lease (``lease_owner``,
``lease_until``) that it renews while it works. A node that dies leaves its jobs and
deliveries to the others once the lease has expired (:meth:`WorkStore.requeue_expired`).
Without an owner (the embedded default) there are no leases: one node owns everything.
A finished job and a delivery between attempts keep ``lease_owner``: the node that ran
it last (``status`` shows it), with ``lease_until`` cleared.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence
from typing import Any

from dicom_node.errors import ActionRefused
from dicom_node.net import statuses
from dicom_node.storage.rows import DeliveryItem, DeliveryRow, JobRow
from dicom_node.storage.state import (
    DONE,
    FAILED,
    PENDING,
    PROCESSING,
    QUEUED,
    REJECTED,
    RUNNING,
    SUPERSEDED,
    TERMINAL_DELIVERY,
    TERMINAL_JOB,
    RECEIVING,
    Conn,
    ResultRecord,
    StateDB,
    dumps_timings,
)

log = logging.getLogger(__name__)

_REQUEUE = "UPDATE jobs SET state=?, lease_owner=NULL, lease_until=NULL, sent_at=NULL WHERE id=?"


class WorkStore:
    """Durable queue of analysis jobs and result deliveries.

    ``owner`` (a cluster's node id) makes claims leased for ``lease_seconds``.
    """

    def __init__(self, db: StateDB, owner: str | None = None, lease_seconds: float = 30.0) -> None:
        self.db = db
        self.owner = owner
        self.lease_seconds = lease_seconds

    def _lease_until(self, now: float) -> float | None:
        return None if self.owner is None else now + self.lease_seconds

    # ---- jobs -----------------------------------------------------------------

    def dispatch_study(self, study_uid: str, routes: Sequence[tuple[str, str]]) -> int:
        """Queue one job per (route, plugin) for a new revision of the study.

        Older unfinished jobs and deliveries of the study are superseded.
        Returns the new revision number (0 for the first analysis).
        """
        revision = self._dispatch(study_uid, routes, None)
        assert revision is not None
        return revision

    def dispatch_stable_study(self, study_uid: str, routes: Sequence[tuple[str, str]],
                              last_received_at: float) -> int | None:
        """:meth:`dispatch_study` for a study judged stable from its row as read: only
        while it is still receiving and its latest instance is still the one at
        ``last_received_at``. None when it changed meanwhile: another node dispatched it
        (exactly one does), or a new instance arrived and it is not stable any more."""
        return self._dispatch(study_uid, routes, last_received_at)

    def _dispatch(self, study_uid: str, routes: Sequence[tuple[str, str]],
                  expect_last_received_at: float | None) -> int | None:
        now = time.time()
        with self.db.transaction() as c:
            self.db.lock_key(c, study_uid)
            row = c.execute(
                "SELECT state, revision, last_received_at FROM studies WHERE study_uid=?", (study_uid,)
            ).fetchone()
            if expect_last_received_at is not None and (
                    row is None or row["state"] != RECEIVING or row["last_received_at"] != expect_last_received_at):
                return None
            done_before = c.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE study_uid=?", (study_uid,)
            ).fetchone()["n"]
            revision = int(row["revision"]) + 1 if done_before else int(row["revision"])
            self._supersede_older(c, study_uid, revision)
            for route, plugin in routes:
                job_id = c.execute(
                    """INSERT INTO jobs(study_uid, route, plugin, revision, state, created_at)
                       VALUES (?,?,?,?,?,?) RETURNING id""",
                    (study_uid, route, plugin, revision, QUEUED, now),
                ).fetchone()["id"]
                StateDB.transition(c, "job", str(job_id), None, QUEUED, f"route {route}")
            c.execute(
                "UPDATE studies SET state=?, revision=?, reason=NULL, updated_at=? WHERE study_uid=?",
                (PROCESSING, revision, now, study_uid),
            )
            StateDB.transition(c, "study", study_uid, row["state"], PROCESSING, f"revision {revision}")
        return revision

    @staticmethod
    def _supersede_older(c: Conn, study_uid: str, revision: int) -> None:
        jobs = c.execute(
            "SELECT id, state FROM jobs WHERE study_uid=? AND revision<? AND state IN (?,?)",
            (study_uid, revision, QUEUED, RUNNING),
        ).fetchall()
        for job in jobs:
            c.execute("UPDATE jobs SET state=? WHERE id=?", (SUPERSEDED, job["id"]))
            StateDB.transition(c, "job", str(job["id"]), job["state"], SUPERSEDED, "newer instances")
        dels = c.execute(
            """SELECT d.id FROM deliveries d JOIN jobs j ON j.id = d.job_id
               WHERE j.study_uid=? AND j.revision<? AND d.state=?""",
            (study_uid, revision, PENDING),
        ).fetchall()
        for d in dels:
            c.execute("UPDATE deliveries SET state=?, updated_at=? WHERE id=?", (SUPERSEDED, time.time(), d["id"]))
            StateDB.transition(c, "delivery", str(d["id"]), PENDING, SUPERSEDED, "newer results")

    def requeue_interrupted(self, reason: str = "node restarted") -> int:
        """On start: jobs that were running when the node stopped go back to the queue
        (in a cluster only this node's own: the others' are theirs until their leases expire;
        a cluster node also gives its own back as it stops)."""
        with self.db.transaction() as c:
            if self.owner is None:
                rows = c.execute("SELECT id FROM jobs WHERE state=?", (RUNNING,)).fetchall()
            else:
                rows = c.execute(f"SELECT id FROM jobs WHERE state=? AND lease_owner=?{self.db.skip_locked}",
                                 (RUNNING, self.owner)).fetchall()
            for r in rows:
                c.execute(_REQUEUE, (QUEUED, r["id"]))
                StateDB.transition(c, "job", str(r["id"]), RUNNING, QUEUED, reason)
        return len(rows)

    def renew_job_leases(self, job_ids: Sequence[int], now: float | None = None) -> int:
        """Extend this node's leases on the running jobs ``job_ids``; how many it still holds."""
        until = self._lease_until(time.time() if now is None else now)
        if until is None or not job_ids:
            return 0
        marks = ",".join("?" * len(job_ids))
        with self.db.transaction() as c:
            cur = c.execute(f"UPDATE jobs SET lease_until=? WHERE id IN ({marks}) AND state=? AND lease_owner=?",
                            (until, *job_ids, RUNNING, self.owner))
            return int(cur.rowcount)

    def requeue_expired(self, now: float | None = None) -> int:
        """Running jobs whose node's lease expired (it died or lost the database) go back to
        the queue, their attempt counted; deliveries need nothing: an expired lease is
        free to claim. Returns how many jobs were requeued."""
        now = time.time() if now is None else now
        with self.db.transaction() as c:
            rows = c.execute(
                f"""SELECT id, lease_owner FROM jobs WHERE state=? AND lease_until IS NOT NULL AND lease_until<?
                    ORDER BY id{self.db.skip_locked}""", (RUNNING, now)).fetchall()
            for r in rows:
                c.execute(_REQUEUE, (QUEUED, r["id"]))
                StateDB.transition(c, "job", str(r["id"]), RUNNING, QUEUED, f"lease of node {r['lease_owner']} expired")
        if rows:
            log.warning("%d running jobs of other nodes requeued: their leases expired", len(rows))
        return len(rows)

    def requeue_job(self, job_id: int, reason: str) -> bool:
        """Give a running job back to the queue without counting the attempt (its run
        was ended for a cause outside the job); False when it is no longer running."""
        with self.db.transaction() as c:
            cur = c.execute("""UPDATE jobs SET state=?, attempts=CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END,
                                   lease_owner=NULL, lease_until=NULL, sent_at=NULL WHERE id=? AND state=?""",
                            (QUEUED, job_id, RUNNING))
            if cur.rowcount:
                StateDB.transition(c, "job", str(job_id), RUNNING, QUEUED, reason)
        return bool(cur.rowcount)

    def claim_job(self) -> JobRow | None:
        """Take the oldest queued job and mark it running; the job as it is now."""
        now = time.time()
        until = self._lease_until(now)
        with self.db.transaction() as c:
            row = c.execute(
                f"SELECT * FROM jobs WHERE state=? ORDER BY id LIMIT 1{self.db.skip_locked}", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state=?, started_at=?, attempts=attempts+1, lease_owner=?, lease_until=? WHERE id=?",
                (RUNNING, now, self.owner, until, row["id"]),
            )
            StateDB.transition(c, "job", str(row["id"]), QUEUED, RUNNING, f"node {self.owner}" if self.owner else "")
            job = JobRow.from_row(row)
        return dataclasses.replace(job, state=RUNNING, started_at=now, attempts=job.attempts + 1)

    def claim_job_id(self, job_id: int, max_attempts: int) -> JobRow | None:
        """Take the queued job ``job_id`` (a Celery worker, given its id by the broker) and
        mark it running under this owner's lease; None when it is not queued (another
        worker has it, it is done, or the message was a duplicate). A job already tried
        ``max_attempts`` times (each run ended without a result: its worker died) is failed
        with that reason instead, and None returned."""
        now = time.time()
        with self.db.transaction() as c:
            row = c.execute(f"SELECT * FROM jobs WHERE id=? AND state=?{self.db.skip_locked}",
                            (job_id, QUEUED)).fetchone()
            if row is None:
                return None
            if row["attempts"] >= max_attempts:
                reason = (f"not run again: its {row['attempts']} runs ended without a result (the worker "
                          "process died: crash, out of memory, killed, or over the plugin's time limit)")
                c.execute("UPDATE jobs SET state=?, reason=?, finished_at=?, sent_at=NULL WHERE id=?",
                          (FAILED, reason, now, job_id))
                StateDB.transition(c, "job", str(job_id), QUEUED, FAILED, reason)
                self._refresh_study(c, row["study_uid"])
                log.error("job %d failed: %s", job_id, reason)
                return None
            c.execute("""UPDATE jobs SET state=?, started_at=?, attempts=attempts+1, lease_owner=?, lease_until=?,
                             sent_at=NULL WHERE id=?""", (RUNNING, now, self.owner, self._lease_until(now), job_id))
            StateDB.transition(c, "job", str(job_id), QUEUED, RUNNING, f"worker {self.owner}")
            job = JobRow.from_row(row)
        return dataclasses.replace(job, state=RUNNING, started_at=now, attempts=job.attempts + 1)

    def jobs_to_send(self, resend_seconds: float, limit: int = 100) -> list[tuple[int, str]]:
        """Queued jobs to put on the broker now, marked sent: never sent, or sent more than
        ``resend_seconds`` ago and still not taken (the broker may have lost the message).
        ``(job id, plugin)``, oldest first; several nodes calling this at once share them out."""
        now = time.time()
        with self.db.transaction() as c:
            rows = c.execute(
                f"""SELECT id, plugin FROM jobs WHERE state=? AND (sent_at IS NULL OR sent_at<?)
                    ORDER BY id LIMIT {int(limit)}{self.db.skip_locked}""", (QUEUED, now - resend_seconds)).fetchall()
            for r in rows:
                c.execute("UPDATE jobs SET sent_at=? WHERE id=?", (now, r["id"]))
        return [(int(r["id"]), str(r["plugin"])) for r in rows]

    def unsend(self, job_ids: Sequence[int]) -> None:
        """Jobs whose message did not reach the broker: to be sent at the next chance."""
        if not job_ids:
            return
        marks = ",".join("?" * len(job_ids))
        with self.db.transaction() as c:
            c.execute(f"UPDATE jobs SET sent_at=NULL WHERE id IN ({marks}) AND state=?", (*job_ids, QUEUED))

    def study_jobs(self, study_uid: str) -> list[JobRow]:
        """Every job of a study, every revision, oldest first."""
        rows = self.db.query("SELECT * FROM jobs WHERE study_uid=? ORDER BY id", (study_uid,))
        return [JobRow.from_row(row) for row in rows]

    def finish_job(
        self,
        job_id: int,
        results: Sequence[ResultRecord],
        destinations: Sequence[str],
        timings: dict[str, float],
        deadline_seconds: float,
        note: str = "",
    ) -> bool:
        """Record a job's results and queue their deliveries, atomically.

        Returns False when the job was superseded meanwhile (results are then kept
        but not delivered).
        """
        now = time.time()
        with self.db.transaction() as c:
            job = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            self.db.lock_key(c, job["study_uid"])  # as a dispatch that supersedes it does
            job = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if not self._holds(job):  # its lease expired: the run that took it over records its results
                return False
            for r in results:
                c.execute(
                    """INSERT INTO results VALUES (?,?,?,?,?,?) ON CONFLICT (sop_instance_uid) DO UPDATE SET
                           job_id=excluded.job_id, series_uid=excluded.series_uid,
                           sop_class_uid=excluded.sop_class_uid, kind=excluded.kind, path=excluded.path""",
                    (r.sop_instance_uid, job_id, r.series_uid, r.sop_class_uid, r.kind, str(r.path)),
                )
            if job["state"] != RUNNING:
                return False
            c.execute(
                "UPDATE jobs SET state=?, finished_at=?, timings=?, reason=?, lease_until=NULL WHERE id=?",
                (DONE, now, dumps_timings(timings), note or None, job_id),
            )
            StateDB.transition(c, "job", str(job_id), RUNNING, DONE, note or f"{len(results)} result objects")
            for dest in destinations if results else ():
                delivery_id = c.execute(
                    """INSERT INTO deliveries(job_id, destination, state, next_attempt_at,
                           deadline_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?) RETURNING id""",
                    (job_id, dest, PENDING, now, now + deadline_seconds, now, now),
                ).fetchone()["id"]
                for r in results:
                    c.execute(
                        "INSERT INTO delivery_items VALUES (?,?,NULL)", (delivery_id, r.sop_instance_uid)
                    )
                StateDB.transition(c, "delivery", str(delivery_id), None, PENDING, f"to {dest}")
            self._refresh_study(c, job["study_uid"], note)
        return True

    def _holds(self, job: Any) -> bool:
        """Whether this node still holds a running job (always, without leases): one whose
        lease expired and that another node took is that node's to finish."""
        return self.owner is None or job["lease_owner"] == self.owner

    def fail_job(self, job_id: int, reason: str, timings: dict[str, float] | None = None) -> None:
        """Mark a running job failed with its reason."""
        with self.db.transaction() as c:
            job = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if job is None or job["state"] != RUNNING or not self._holds(job):
                return
            c.execute(
                "UPDATE jobs SET state=?, reason=?, finished_at=?, timings=?, lease_until=NULL WHERE id=?",
                (FAILED, reason, time.time(), dumps_timings(timings or {}), job_id),
            )
            StateDB.transition(c, "job", str(job_id), RUNNING, FAILED, reason)
            self._refresh_study(c, job["study_uid"])

    # ---- deliveries -------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[DeliveryRow]:
        """Pending deliveries whose next attempt is due (and that no live node holds)."""
        rows = self.db.query(
            """SELECT * FROM deliveries WHERE state=? AND next_attempt_at<=?
               AND (lease_until IS NULL OR lease_until<?) ORDER BY next_attempt_at""",
            (PENDING, now, now),
        )
        return [DeliveryRow.from_row(row) for row in rows]

    def claim_delivery(self, delivery_id: int, now: float | None = None) -> bool:
        """Take a due delivery for this node's next attempt; False when another node holds
        it or it is no longer pending. Without an owner (one node) always True."""
        if self.owner is None:
            return True
        now = time.time() if now is None else now
        with self.db.transaction() as c:
            cur = c.execute(
                """UPDATE deliveries SET lease_owner=?, lease_until=? WHERE id=? AND state=?
                   AND (lease_until IS NULL OR lease_until<? OR lease_owner=?)""",
                (self.owner, self._lease_until(now), delivery_id, PENDING, now, self.owner))
            return bool(cur.rowcount)

    def unconfirmed_items(self, delivery_id: int) -> list[DeliveryItem]:
        """Result instances of a delivery not yet confirmed by the destination: no
        status yet, or one that is neither Success nor a Warning
        (:func:`dicom_node.net.statuses.is_success_or_warning`, the rule the delivery
        itself judges by, so an instance stored with a warning is never sent again)."""
        rows = self.db.query(
            """SELECT r.sop_instance_uid, r.sop_class_uid, r.path, i.status FROM delivery_items i
               JOIN results r ON r.sop_instance_uid = i.sop_instance_uid
               WHERE i.delivery_id=?""",
            (delivery_id,),
        )
        items = [DeliveryItem.from_row(row) for row in rows]
        return [item for item in items
                if item.status is None or not statuses.is_success_or_warning(item.status)]

    def record_status(self, delivery_id: int, sop_uid: str, status: int) -> None:
        """Store the destination's status for one instance."""
        with self.db.transaction() as c:
            c.execute(
                "UPDATE delivery_items SET status=? WHERE delivery_id=? AND sop_instance_uid=?",
                (status, delivery_id, sop_uid),
            )
            if self.owner is not None:  # still sending: the lease goes on
                c.execute("UPDATE deliveries SET lease_until=? WHERE id=? AND lease_owner=?",
                          (self._lease_until(time.time()), delivery_id, self.owner))

    def retry_delivery(self, delivery_id: int, next_at: float, error: str) -> None:
        """Keep a delivery pending and schedule the next attempt."""
        with self.db.transaction() as c:
            c.execute(
                """UPDATE deliveries SET attempts=attempts+1, next_attempt_at=?, last_error=?,
                       updated_at=?, lease_until=NULL WHERE id=? AND state=?""",
                (next_at, error, time.time(), delivery_id, PENDING),
            )
            StateDB.transition(c, "delivery", str(delivery_id), PENDING, PENDING, f"retry: {error}")

    def end_delivery(self, delivery_id: int, state: str, error: str | None = None) -> None:
        """Finish a delivery: done, failed (deadline) or rejected (failure status)."""
        assert state in (DONE, FAILED, REJECTED)
        with self.db.transaction() as c:
            row = c.execute("SELECT d.state, j.study_uid FROM deliveries d JOIN jobs j ON j.id=d.job_id WHERE d.id=?",
                            (delivery_id,)).fetchone()
            if row is None or row["state"] != PENDING:
                return
            c.execute(
                """UPDATE deliveries SET state=?, attempts=attempts+1, last_error=?, updated_at=?,
                       lease_until=NULL WHERE id=?""",
                (state, error, time.time(), delivery_id),
            )
            StateDB.transition(c, "delivery", str(delivery_id), PENDING, state, error or "")
            self._refresh_study(c, row["study_uid"])

    # ---- admin actions ----------------------------------------------------------

    def reopen_delivery(self, delivery_id: int, deadline_seconds: float, note: str) -> str:
        """Make a delivery due now (``dicom-node retry``); returns what changed.

        A failed or rejected delivery of the study's current results becomes pending
        again with a fresh deadline and backoff, and its study goes back to processing;
        a pending one is only brought forward. Raises :class:`ActionRefused` for a
        delivery that is done, superseded or of older results.
        """
        now = time.time()
        with self.db.transaction() as c:
            row = c.execute(
                """SELECT d.state, d.destination, d.attempts, j.study_uid, j.revision, s.revision AS current,
                          s.state AS study_state
                   FROM deliveries d JOIN jobs j ON j.id = d.job_id JOIN studies s ON s.study_uid = j.study_uid
                   WHERE d.id=?""", (delivery_id,)).fetchone()
            if row is None:
                raise ActionRefused(f"there is no delivery {delivery_id}")
            if row["state"] == DONE:
                raise ActionRefused(f"delivery {delivery_id} is done: {row['destination']} confirmed every instance")
            if row["state"] == SUPERSEDED or row["revision"] != row["current"]:
                raise ActionRefused(f"delivery {delivery_id} holds results the study's newer revision "
                                    f"{row['current']} replaced; its own deliveries are the ones to retry")
            if row["state"] == PENDING:
                c.execute("UPDATE deliveries SET next_attempt_at=?, updated_at=? WHERE id=?", (now, now, delivery_id))
                StateDB.transition(c, "delivery", str(delivery_id), PENDING, PENDING, f"brought forward: {note}")
                return f"delivery {delivery_id} to {row['destination']}: next attempt now (it was pending)"
            c.execute(
                """UPDATE deliveries SET state=?, attempts=0, next_attempt_at=?, deadline_at=?, updated_at=?
                   WHERE id=?""", (PENDING, now, now + deadline_seconds, now, delivery_id))
            StateDB.transition(c, "delivery", str(delivery_id), row["state"], PENDING,
                               f"{note} after {row['attempts']} attempts")
            if row["study_state"] in (DONE, FAILED):
                c.execute("UPDATE studies SET state=?, reason=NULL, updated_at=? WHERE study_uid=?",
                          (PROCESSING, now, row["study_uid"]))
                StateDB.transition(c, "study", row["study_uid"], row["study_state"], PROCESSING,
                                   f"delivery {delivery_id} retried")
        return f"delivery {delivery_id} to {row['destination']}: {row['state']} -> pending, next attempt now"

    def failed_deliveries(self) -> list[int]:
        """Failed or rejected deliveries of each study's current results (``retry --failed``)."""
        rows = self.db.query(
            """SELECT d.id FROM deliveries d JOIN jobs j ON j.id = d.job_id
               JOIN studies s ON s.study_uid = j.study_uid
               WHERE d.state IN (?,?) AND j.revision = s.revision ORDER BY d.id""", (FAILED, REJECTED))
        return [int(r["id"]) for r in rows]

    def forget_study(self, study_uid: str) -> dict[str, int]:
        """Remove every row of a study (``dicom-node forget``): instances, series, jobs,
        results, deliveries and their transitions; returns how many of each went."""
        with self.db.transaction() as c:
            jobs = [r["id"] for r in c.execute("SELECT id FROM jobs WHERE study_uid=?", (study_uid,))]
            marks = ",".join("?" * len(jobs))
            deliveries = [r["id"] for r in c.execute(
                f"SELECT id FROM deliveries WHERE job_id IN ({marks})", jobs)] if jobs else []
            dmarks = ",".join("?" * len(deliveries))
            counts = {"jobs": len(jobs), "deliveries": len(deliveries)}
            if deliveries:
                c.execute(f"DELETE FROM delivery_items WHERE delivery_id IN ({dmarks})", deliveries)
                c.execute(f"DELETE FROM deliveries WHERE id IN ({dmarks})", deliveries)
                c.execute(f"DELETE FROM transitions WHERE kind='delivery' AND key IN ({dmarks})",
                          [str(d) for d in deliveries])
            if jobs:
                counts["results"] = c.execute(f"DELETE FROM results WHERE job_id IN ({marks})", jobs).rowcount
                c.execute(f"DELETE FROM jobs WHERE id IN ({marks})", jobs)
                c.execute(f"DELETE FROM transitions WHERE kind='job' AND key IN ({marks})", [str(j) for j in jobs])
            counts["instances"] = c.execute("DELETE FROM instances WHERE study_uid=?", (study_uid,)).rowcount
            c.execute("DELETE FROM series WHERE study_uid=?", (study_uid,))
            counts["studies"] = c.execute("DELETE FROM studies WHERE study_uid=?", (study_uid,)).rowcount
            c.execute("DELETE FROM transitions WHERE kind='study' AND key=?", (study_uid,))
        return counts

    # ---- study completion -----------------------------------------------------

    @staticmethod
    def _refresh_study(c: Conn, study_uid: str, note: str = "") -> None:
        study = c.execute("SELECT state, revision FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        if study is None or study["state"] != PROCESSING:
            return
        jobs = c.execute(
            "SELECT id, state, reason FROM jobs WHERE study_uid=? AND revision=?",
            (study_uid, study["revision"]),
        ).fetchall()
        if any(j["state"] not in TERMINAL_JOB for j in jobs):
            return
        marks = ",".join("?" * len(TERMINAL_DELIVERY))
        open_dels = c.execute(
            f"""SELECT COUNT(*) AS n FROM deliveries WHERE job_id IN
                (SELECT id FROM jobs WHERE study_uid=? AND revision=?) AND state NOT IN ({marks})""",
            (study_uid, study["revision"], *TERMINAL_DELIVERY),
        ).fetchone()["n"]
        if open_dels:
            return
        bad = c.execute(
            """SELECT d.destination, d.state, d.last_error FROM deliveries d JOIN jobs j ON j.id=d.job_id
               WHERE j.study_uid=? AND j.revision=? AND d.state IN (?,?)""",
            (study_uid, study["revision"], FAILED, REJECTED),
        ).fetchall()
        reasons = [f"job {j['id']} failed: {j['reason']}" for j in jobs if j["state"] == FAILED]
        reasons += [f"delivery to {d['destination']} {d['state']}: {d['last_error']}" for d in bad]
        new_state = FAILED if reasons else DONE
        reason = "; ".join(reasons) or note or None
        started = c.execute(
            "SELECT MIN(created_at) AS t FROM jobs WHERE study_uid=? AND revision=?",
            (study_uid, study["revision"]),
        ).fetchone()["t"]
        took = f"{time.time() - started:.1f} s after dispatch" if started else ""
        c.execute(
            "UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_uid=?",
            (new_state, reason, time.time(), study_uid),
        )
        StateDB.transition(c, "study", study_uid, PROCESSING, new_state, "; ".join(filter(None, [took, reason])))
