"""Admin actions against a running node: ``retry``, ``reprocess``, ``forget``, and what
``status`` shows and narrows to (issue 17, item 5)."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from dicom_node.admin import Admin
from dicom_node.config import parse_config
from dicom_node.errors import ActionRefused
from dicom_node.storage.state import StateDB
from dicom_node.storage.work import WorkStore
from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.support import FAKE_PLUGIN, NodeProcess, dense_phantom, dense_route, free_port, node_config, storescu
from tests.test_delivery import PynetdicomSCP

ACCESSION = "ACC-ADMIN-7"


def _delivery_states(status: dict[str, Any]) -> list[str]:
    return [d["state"] for d in status["deliveries"]]


def test_retry_reprocess_and_forget_on_a_running_node(tmp_path: Path) -> None:
    pacs = PynetdicomSCP(0x0000, first=[0xA900])  # refuses the first result object, then stores
    cfg = node_config(tmp_path / "var", free_port(), plugins=FAKE_PLUGIN, routes=dense_route(["pacs"]),
                      destinations={"pacs": {"ae_title": "REFUSER", "host": "127.0.0.1", "port": pacs.port}})
    node = NodeProcess(cfg, tmp_path / "node").start()
    study = write_ct_series(dense_phantom(24), tmp_path / "study",
                            StudyIdentity(accession_number=ACCESSION), SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    config = ["--config", str(node.config_path)]
    try:
        assert storescu(node.port, study).returncode == 0
        status = node.wait_for(lambda s: _delivery_states(s) == ["rejected"], what="the refused delivery")
        (row,) = status["studies"]
        uid, delivery = row["study_uid"], status["deliveries"][0]["id"]
        assert row["accession_number"] == ACCESSION and row["state"] == "failed"
        first = {r["sop_instance_uid"] for r in status["results"]}
        assert sorted(r["kind"] for r in status["results"]) == ["KOS", "SC", "SC", "SC", "SEG", "SR"]
        table = node.cli("status", *config).stdout
        assert ACCESSION in table and all(sop in table for sop in first)

        narrowed = json.loads(node.cli("status", "--json", "--accession", "OTHER", *config).stdout)
        assert narrowed["studies"] == narrowed["jobs"] == narrowed["deliveries"] == narrowed["results"] == []
        failed = json.loads(node.cli("status", "--json", "--state", "failed", "--since", "1h", *config).stdout)
        assert [s["study_uid"] for s in failed["studies"]] == [uid] and failed["jobs"] == []

        retried = node.cli("retry", "--failed", *config).stdout
        assert f"delivery {delivery} to pacs: rejected -> pending" in retried
        node.wait_for(lambda s: _delivery_states(s) == ["done"] and s["studies"][0]["state"] == "done",
                      what="the retried delivery")
        assert first <= set(pacs.received)
        again = node.cli("retry", str(delivery), *config, check=False)
        assert again.returncode == 1 and f"delivery {delivery} is done" in again.stderr

        assert "revision 1 queued for dense-ct" in node.cli("reprocess", uid, *config).stdout
        status = node.wait_for(lambda s: _delivery_states(s) == ["done", "done"]
                               and s["studies"][0]["state"] == "done", what="the re-run")
        assert status["studies"][0]["revision"] == 1
        assert len({r["sop_instance_uid"] for r in status["results"]} - first) == 6, "new result objects"
        wrong = node.cli("reprocess", uid, "--plugin", "other", *config, check=False)
        assert wrong.returncode == 1 and "no route with plugin 'other' matches" in wrong.stderr

        unconfirmed = node.cli("forget", uid, *config, check=False)
        assert unconfirmed.returncode == 1 and "--yes" in unconfirmed.stderr
        assert "24 instances" in node.cli("forget", uid, "--yes", *config).stdout
        status = node.status()
        assert status["studies"] == status["jobs"] == status["deliveries"] == status["results"] == []
        assert not (tmp_path / "var" / "spool" / uid).exists()
        assert not [p for p in (tmp_path / "var" / "results").iterdir() if any(p.iterdir())]

        audit = [json.loads(line) for line in node.cli("audit", "--event", "admin", *config).stdout.splitlines()]
        assert [a["action"] for a in audit] == ["retry", "reprocess", "forget"]
        assert all(a["user"] for a in audit) and audit[2]["instances"] == 24
    finally:
        node.stop()
        pacs.stop()


def _store(tmp_path: Path) -> tuple[Admin, WorkStore, StateDB]:
    cfg = parse_config(node_config(tmp_path / "var", free_port(), plugins=FAKE_PLUGIN, routes=dense_route([])))
    db = StateDB(cfg.database_path)
    with db.transaction() as c:
        c.execute("INSERT INTO studies(study_uid, state, updated_at, purged_at) VALUES ('1.2.3', 'done', 0, 5)")
    admin = Admin(cfg, db)
    return admin, admin.work, db


def test_refusals_name_the_reason(tmp_path: Path) -> None:
    admin, work, db = _store(tmp_path)
    with pytest.raises(ActionRefused, match="no longer in the spool"):
        admin.reprocess("1.2.3")
    with pytest.raises(ActionRefused, match="there is no study 9.9"):
        admin.forget("9.9")
    with pytest.raises(ActionRefused, match="there is no delivery 7"):
        admin.retry([7])
    work.dispatch_study("1.2.3", [("dense-ct", "dense")])
    job = work.claim_job()
    assert job is not None
    work.finish_job(job.id, [], ["x"], {}, 60)
    with db.transaction() as c:  # a failed delivery of revision 0, then the study moves on to revision 1
        c.execute("INSERT INTO deliveries(job_id, destination, state, next_attempt_at, deadline_at, created_at, "
                  "updated_at) VALUES (?, 'x', 'failed', 0, 0, 0, 0)", (job.id,))
    work.dispatch_study("1.2.3", [("dense-ct", "dense")])
    with pytest.raises(ActionRefused, match="newer revision 1 replaced"):
        admin.retry([1])
    assert work.failed_deliveries() == []
    db.close()


def test_a_database_of_an_older_version_gains_the_accession_column(tmp_path: Path) -> None:
    path = tmp_path / "state.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE studies (study_uid TEXT PRIMARY KEY, state TEXT NOT NULL, revision INTEGER "
                     "NOT NULL DEFAULT 0, instance_count INTEGER NOT NULL DEFAULT 0, first_received_at REAL, "
                     "last_received_at REAL, reason TEXT, purged_at REAL, updated_at REAL NOT NULL)")
        conn.execute("INSERT INTO studies(study_uid, state, updated_at) VALUES ('1.2', 'done', 0)")
    db = StateDB(path)
    row = db.study("1.2")
    assert row is not None and "accession_number" in row and row["accession_number"] is None
    db.close()
    StateDB(path).close()  # opening it again is a no-op
