"""Delivery against real SCPs: refusals, deadlines, and the CLI's echo and send."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import Verification

from dicom_node.config import parse_config
from dicom_node.delivery import Deliverer, backoff_seconds
from dicom_node.storage.state import ResultRecord, StateDB
from dicom_node.storage.work import WorkStore
from phantoms.ct_writer import simple_ct_volume, write_ct_series
from tests.support import NodeProcess, StoreSCP, free_port, node_config


class PynetdicomSCP:
    """A pynetdicom Storage SCP answering a fixed status (a real peer, in-process)."""

    def __init__(self, status: int, first: list[int] | None = None) -> None:
        self.status = status
        self.first = list(first or [])  # answered, in order, before ``status``
        self.received: list[str] = []
        self.ae = ApplicationEntity("REFUSER")
        self.ae.supported_contexts = AllStoragePresentationContexts
        self.ae.add_supported_context(Verification)
        self.port = free_port()
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._store)])

    def _store(self, event: evt.Event) -> int:
        self.received.append(str(event.request.AffectedSOPInstanceUID))
        return self.first.pop(0) if self.first else self.status

    def stop(self) -> None:
        self.server.shutdown()


@pytest.fixture
def results(tmp_path: Path) -> list[Path]:
    return write_ct_series(simple_ct_volume(2, 16, 16), tmp_path / "results")


def _setup(tmp_path: Path, port: int, files: list[Path], **delivery: Any) -> tuple[WorkStore, Deliverer, int]:
    cfg = parse_config(node_config(tmp_path / "var", free_port(),
                                   destinations={"d": {"ae_title": "REFUSER", "host": "127.0.0.1", "port": port}},
                                   delivery=delivery))
    db = StateDB(cfg.database_path)
    work = WorkStore(db)
    with db.transaction() as c:
        c.execute("INSERT INTO studies(study_uid, state, updated_at) VALUES ('1.2.3', 'receiving', 0)")
    work.dispatch_study("1.2.3", [("r", "p")])
    job = work.claim_job()
    assert job is not None
    from pydicom import dcmread

    records = []
    for f in files:
        ds = dcmread(f, stop_before_pixels=True)
        records.append(ResultRecord(ds.SOPInstanceUID, ds.SeriesInstanceUID, ds.SOPClassUID, "SR", f))
    work.finish_job(job.id, records, ["d"], {}, deadline_seconds=cfg.delivery.deadline_hours * 3600)
    return work, Deliverer(cfg, work), job.id


def test_failure_status_is_rejected_not_retried(tmp_path: Path, results: list[Path]) -> None:
    scp = PynetdicomSCP(0xA900)
    try:
        work, deliverer, _ = _setup(tmp_path, scp.port, results)
        deliverer.tick()
        row = work.db.query("SELECT * FROM deliveries")[0]
        assert row["state"] == "rejected" and "0xA900" in row["last_error"]
        deliverer.tick(now=row["next_attempt_at"] + 10**6)
        assert len(scp.received) == len(results)  # one attempt only: a refusal is not retried
        study = work.db.query("SELECT state, reason FROM studies")[0]
        assert study["state"] == "failed" and "rejected" in study["reason"]
    finally:
        scp.stop()


def test_out_of_resources_is_retried_and_only_unconfirmed_resent(tmp_path: Path, results: list[Path]) -> None:
    scp = PynetdicomSCP(0xA700)
    try:
        work, deliverer, _ = _setup(tmp_path, scp.port, results)
        deliverer.tick()
        row = work.db.query("SELECT * FROM deliveries")[0]
        assert row["state"] == "pending" and row["attempts"] == 1 and "0xA700" in row["last_error"]
        scp.status = 0x0000
        deliverer.tick(now=row["next_attempt_at"])
        assert work.db.query("SELECT state FROM deliveries")[0]["state"] == "done"
        assert work.db.query("SELECT state FROM studies")[0]["state"] == "done"
    finally:
        scp.stop()


@pytest.mark.parametrize("warning", [0x0001, 0x0107, 0x0116, 0xB000])
def test_an_instance_stored_with_a_warning_is_not_sent_again(tmp_path: Path, results: list[Path],
                                                             warning: int) -> None:
    scp = PynetdicomSCP(0x0000, first=[warning, 0xA700])  # the first stored with a warning, the second refused for now
    try:
        work, deliverer, _ = _setup(tmp_path, scp.port, results)
        deliverer.tick()
        row = work.db.query("SELECT * FROM deliveries")[0]
        assert row["state"] == "pending" and "0xA700" in row["last_error"]
        first, second = scp.received
        deliverer.tick(now=row["next_attempt_at"])
        assert work.db.query("SELECT state FROM deliveries")[0]["state"] == "done"
        assert scp.received == [first, second, second]  # only the refused one again
    finally:
        scp.stop()


def test_deadline_ends_in_failed(tmp_path: Path, results: list[Path]) -> None:
    work, deliverer, _ = _setup(tmp_path, free_port(), results, deadline_hours=0.0001)
    deliverer.tick()
    row = work.db.query("SELECT * FROM deliveries")[0]
    assert row["state"] == "failed"
    assert "deadline" in row["last_error"] and "cannot connect" in row["last_error"]


def test_a_peer_that_never_answers_is_named_as_our_timeout_not_its_abort() -> None:
    import socket

    from dicom_node.errors import DeliveryError
    from dicom_node.net.scu import Peer, echo

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts TCP (the kernel does), never reads or answers
    try:
        with pytest.raises(DeliveryError) as raised:
            echo(Peer("SILENT", "127.0.0.1", silent.getsockname()[1]), "NODE", timeout=1.0)
        assert "no answer from" in str(raised.value) and "within 1 s" in str(raised.value)
        assert "aborted" not in str(raised.value)
    finally:
        silent.close()


def test_backoff_doubles_up_to_maximum() -> None:
    assert [backoff_seconds(n, 5, 300) for n in range(8)] == [5, 10, 20, 40, 80, 160, 300, 300]


def test_cli_echo_and_send(tmp_path: Path, results: list[Path]) -> None:
    dest = StoreSCP(free_port(), tmp_path / "got").start()
    try:
        cfg = node_config(tmp_path / "var", free_port(),
                          destinations={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}})
        node = NodeProcess(cfg, tmp_path / "cli")
        node.config_path.write_text(__import__("yaml").safe_dump(cfg))
        out = node.cli("echo", "dest", "--config", str(node.config_path))
        assert "status 0x0000 (Success)" in out.stdout
        out = node.cli("echo", f"DEST@127.0.0.1:{dest.port}")
        assert out.returncode == 0
        down = node.cli("echo", f"DEST@127.0.0.1:{free_port()}", check=False)
        assert down.returncode != 0 and "cannot connect" in down.stderr
        unknown = node.cli("echo", "nowhere", "--config", str(node.config_path), check=False)
        assert unknown.returncode != 0 and "unknown destination 'nowhere'" in unknown.stderr
        (results[0].parent / "notes.txt").write_text("not dicom")
        sent = node.cli("send", str(results[0].parent), "--to", "dest", "--config", str(node.config_path))
        assert "sent 2 of 2 instances" in sent.stdout and "1 non-DICOM files skipped" in sent.stdout
        assert len(dest.files()) == 2
        missing = node.cli("status", "--config", str(node.config_path), check=False)
        assert missing.returncode != 0 and "no state database" in missing.stderr
    finally:
        dest.stop()
