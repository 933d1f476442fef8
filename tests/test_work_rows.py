"""Jobs and deliveries leave the state database as typed rows (dicom_node/storage/rows.py),
and a job given back to the queue by the runner keeps its attempt count."""

from __future__ import annotations

from pathlib import Path

from dicom_node.storage.rows import DeliveryItem, DeliveryRow, JobRow
from dicom_node.storage.state import ResultRecord, StateDB
from dicom_node.storage.work import WorkStore


def _work(tmp_path: Path) -> WorkStore:
    db = StateDB(tmp_path / "state.sqlite3")
    with db.transaction() as c:
        c.execute("INSERT INTO studies(study_uid, state, updated_at) VALUES ('1.2.3', 'receiving', 0)")
    work = WorkStore(db)
    work.dispatch_study("1.2.3", [("route", "plugin")])
    return work


def test_a_claimed_job_is_a_running_job_row(tmp_path: Path) -> None:
    work = _work(tmp_path)
    job = work.claim_job()
    assert isinstance(job, JobRow)
    assert (job.study_uid, job.route, job.plugin, job.revision) == ("1.2.3", "route", "plugin", 0)
    assert (job.state, job.attempts, job.reason) == ("running", 1, None) and job.started_at is not None
    assert work.study_jobs("1.2.3") == [job]


def test_a_requeued_job_keeps_its_attempt_count(tmp_path: Path) -> None:
    work = _work(tmp_path)
    job = work.claim_job()
    assert job is not None
    assert work.requeue_job(job.id, "another analysis's worker died")
    assert not work.requeue_job(job.id, "twice")  # only a running job goes back
    again = work.claim_job()
    assert again is not None and (again.id, again.attempts) == (job.id, 1)


def test_deliveries_and_their_items_are_typed(tmp_path: Path) -> None:
    work = _work(tmp_path)
    job = work.claim_job()
    assert job is not None
    record = ResultRecord("1.2.3.4", "1.2.3.5", "1.2.840.10008.5.1.4.1.1.88.22", "SR", tmp_path / "sr.dcm")
    work.finish_job(job.id, [record], ["dest"], {"analyse": 1.0}, deadline_seconds=60)
    [delivery] = work.due_deliveries(now=float("inf"))
    assert isinstance(delivery, DeliveryRow)
    assert (delivery.job_id, delivery.destination, delivery.state, delivery.attempts) == (job.id, "dest", "pending", 0)
    assert delivery.deadline_at - delivery.created_at == 60 and delivery.last_error is None
    assert work.unconfirmed_items(delivery.id) == [
        DeliveryItem("1.2.3.4", "1.2.840.10008.5.1.4.1.1.88.22", tmp_path / "sr.dcm", None)]
    work.record_status(delivery.id, "1.2.3.4", 0xB000)  # a warning: confirmed
    assert work.unconfirmed_items(delivery.id) == []
