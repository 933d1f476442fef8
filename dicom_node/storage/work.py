"""Jobs, results and deliveries in the state database, with their transitions."""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Sequence

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
    ResultRecord,
    StateDB,
    dumps_timings,
)


class WorkStore:
    """Durable queue of analysis jobs and result deliveries."""

    def __init__(self, db: StateDB) -> None:
        self.db = db

    # ---- jobs -----------------------------------------------------------------

    def dispatch_study(self, study_uid: str, routes: Sequence[tuple[str, str]]) -> int:
        """Queue one job per (route, plugin) for a new revision of the study.

        Older unfinished jobs and deliveries of the study are superseded.
        Returns the new revision number (0 for the first analysis).
        """
        now = time.time()
        with self.db.transaction() as c:
            row = c.execute(
                "SELECT state, revision FROM studies WHERE study_uid=?", (study_uid,)
            ).fetchone()
            done_before = c.execute(
                "SELECT COUNT(*) AS n FROM jobs WHERE study_uid=?", (study_uid,)
            ).fetchone()["n"]
            revision = int(row["revision"]) + 1 if done_before else int(row["revision"])
            self._supersede_older(c, study_uid, revision)
            for route, plugin in routes:
                cur = c.execute(
                    """INSERT INTO jobs(study_uid, route, plugin, revision, state, created_at)
                       VALUES (?,?,?,?,?,?)""",
                    (study_uid, route, plugin, revision, QUEUED, now),
                )
                StateDB.transition(c, "job", str(cur.lastrowid), None, QUEUED, f"route {route}")
            c.execute(
                "UPDATE studies SET state=?, revision=?, reason=NULL, updated_at=? WHERE study_uid=?",
                (PROCESSING, revision, now, study_uid),
            )
            StateDB.transition(c, "study", study_uid, row["state"], PROCESSING, f"revision {revision}")
        return revision

    @staticmethod
    def _supersede_older(c: sqlite3.Connection, study_uid: str, revision: int) -> None:
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

    def requeue_interrupted(self) -> int:
        """On start: jobs that were running when the node stopped go back to the queue."""
        with self.db.transaction() as c:
            rows = c.execute("SELECT id FROM jobs WHERE state=?", (RUNNING,)).fetchall()
            for r in rows:
                c.execute("UPDATE jobs SET state=? WHERE id=?", (QUEUED, r["id"]))
                StateDB.transition(c, "job", str(r["id"]), RUNNING, QUEUED, "node restarted")
        return len(rows)

    def requeue_job(self, job_id: int, reason: str) -> bool:
        """Give a running job back to the queue without counting the attempt (its run
        was ended for a cause outside the job); False when it is no longer running."""
        with self.db.transaction() as c:
            cur = c.execute("UPDATE jobs SET state=?, attempts=MAX(attempts-1, 0) WHERE id=? AND state=?",
                            (QUEUED, job_id, RUNNING))
            if cur.rowcount:
                StateDB.transition(c, "job", str(job_id), RUNNING, QUEUED, reason)
        return bool(cur.rowcount)

    def claim_job(self) -> JobRow | None:
        """Take the oldest queued job and mark it running; the job as it is now."""
        now = time.time()
        with self.db.transaction() as c:
            row = c.execute(
                "SELECT * FROM jobs WHERE state=? ORDER BY id LIMIT 1", (QUEUED,)
            ).fetchone()
            if row is None:
                return None
            c.execute(
                "UPDATE jobs SET state=?, started_at=?, attempts=attempts+1 WHERE id=?",
                (RUNNING, now, row["id"]),
            )
            StateDB.transition(c, "job", str(row["id"]), QUEUED, RUNNING)
            job = JobRow.from_row(row)
        return dataclasses.replace(job, state=RUNNING, started_at=now, attempts=job.attempts + 1)

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
            for r in results:
                c.execute(
                    "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?)",
                    (r.sop_instance_uid, job_id, r.series_uid, r.sop_class_uid, r.kind, str(r.path)),
                )
            if job["state"] != RUNNING:
                return False
            c.execute(
                "UPDATE jobs SET state=?, finished_at=?, timings=?, reason=? WHERE id=?",
                (DONE, now, dumps_timings(timings), note or None, job_id),
            )
            StateDB.transition(c, "job", str(job_id), RUNNING, DONE, note or f"{len(results)} result objects")
            for dest in destinations if results else ():
                cur = c.execute(
                    """INSERT INTO deliveries(job_id, destination, state, next_attempt_at,
                           deadline_at, created_at, updated_at) VALUES (?,?,?,?,?,?,?)""",
                    (job_id, dest, PENDING, now, now + deadline_seconds, now, now),
                )
                for r in results:
                    c.execute(
                        "INSERT INTO delivery_items VALUES (?,?,NULL)", (cur.lastrowid, r.sop_instance_uid)
                    )
                StateDB.transition(c, "delivery", str(cur.lastrowid), None, PENDING, f"to {dest}")
            self._refresh_study(c, job["study_uid"], note)
        return True

    def fail_job(self, job_id: int, reason: str, timings: dict[str, float] | None = None) -> None:
        """Mark a running job failed with its reason."""
        with self.db.transaction() as c:
            job = c.execute("SELECT * FROM jobs WHERE id=?", (job_id,)).fetchone()
            if job is None or job["state"] != RUNNING:
                return
            c.execute(
                "UPDATE jobs SET state=?, reason=?, finished_at=?, timings=? WHERE id=?",
                (FAILED, reason, time.time(), dumps_timings(timings or {}), job_id),
            )
            StateDB.transition(c, "job", str(job_id), RUNNING, FAILED, reason)
            self._refresh_study(c, job["study_uid"])

    # ---- deliveries -------------------------------------------------------------

    def due_deliveries(self, now: float) -> list[DeliveryRow]:
        """Pending deliveries whose next attempt is due."""
        rows = self.db.query(
            "SELECT * FROM deliveries WHERE state=? AND next_attempt_at<=? ORDER BY next_attempt_at",
            (PENDING, now),
        )
        return [DeliveryRow.from_row(row) for row in rows]

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

    def retry_delivery(self, delivery_id: int, next_at: float, error: str) -> None:
        """Keep a delivery pending and schedule the next attempt."""
        with self.db.transaction() as c:
            c.execute(
                """UPDATE deliveries SET attempts=attempts+1, next_attempt_at=?, last_error=?,
                       updated_at=? WHERE id=? AND state=?""",
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
                "UPDATE deliveries SET state=?, attempts=attempts+1, last_error=?, updated_at=? WHERE id=?",
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
    def _refresh_study(c: sqlite3.Connection, study_uid: str, note: str = "") -> None:
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
