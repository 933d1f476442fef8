"""The node end to end, as an admin runs it: `dicom-node serve` in a subprocess,
dcmtk storescu as the sender and dcmtk storescp as the destination.

The analysis is the test-only threshold plugin (tests/fake_plugins.py); the shipped
configuration uses the real model.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.support import (
    DCMTK_ENV,
    FAKE_PLUGIN,
    NodeProcess,
    StoreSCP,
    dense_phantom,
    dense_route,
    free_port,
    node_config,
    acknowledged_files,
    descendants,
    require_tool,
    storescu,
    wait_for,
)

PATIENT = StudyIdentity(patient_name="DOE^JANE^SECRET", patient_id="MRN-77123-SECRET", patient_birth_date="19511231")


def _node(tmp_path: Path, dest_port: int, **sections: Any) -> NodeProcess:
    sections = {"destinations": {"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}},
                "routes": dense_route(["dest"]), "plugins": FAKE_PLUGIN, **sections}
    cfg = node_config(tmp_path / "var", free_port(), **sections)
    return NodeProcess(cfg, tmp_path / "node")


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return write_ct_series(dense_phantom(40), tmp_path / "study", PATIENT, SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))


def _dciodvfy_errors(path: Path) -> list[str]:
    require_tool("dciodvfy")
    out = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True)
    return [line for line in (out.stdout + out.stderr).splitlines() if line.startswith("Error")]


def _results(dest: StoreSCP) -> dict[str, list[Any]]:
    """What the destination received, by modality (the key images are OT, the KOS is KO)."""
    out: dict[str, list[Any]] = {"SEG": [], "SR": [], "OT": [], "KO": []}
    for path in dest.files():
        ds = dcmread(path)
        out.setdefault(ds.Modality, []).append((path, ds))
    return out


def _study_state(status: dict[str, Any], state: str) -> bool:
    return any(s["state"] == state for s in status["studies"])


def test_study_analysed_and_delivered(tmp_path: Path, dest: StoreSCP, study: list[Path]) -> None:
    node = _node(tmp_path, dest.port).start()
    try:
        assert storescu(node.port, study).returncode == 0
        status = node.wait_for(lambda s: _study_state(s, "done"), what="study done")
        job = status["jobs"][0]
        assert job["state"] == "done" and {"select", "volume", "analyse", "seg", "sr", "sc", "kos"} <= set(job["timings"])
        assert status["deliveries"][0]["state"] == "done"
        results = _results(dest)
        # SEG, SR, the key images (a summary and one per lesion) and the KOS, in their own series
        assert [len(results[m]) for m in ("SEG", "SR", "OT", "KO")] == [1, 1, 3, 1]
        source = dcmread(study[0], stop_before_pixels=True)
        for path, ds in sum(results.values(), []):
            assert ds.StudyInstanceUID == source.StudyInstanceUID
            assert ds.PatientID == source.PatientID
            assert not _dciodvfy_errors(path), _dciodvfy_errors(path)
        seg = results["SEG"][0][1]
        assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Lesion 1", "Lesion 2"]
        assert {m: {int(ds.SeriesNumber) for _, ds in results[m]} for m in results} == {
            "SEG": {9001}, "SR": {9002}, "OT": {9003}, "KO": {9004}}
        assert seg.SeriesDescription == "AI Test Dense Lesions - SEG - NOT FOR DIAGNOSTIC USE"
        text = node.cli("status", "--config", str(node.config_path)).stdout
        assert "done" in text and source.StudyInstanceUID in text and "ready" in text
        assert "analysis workers warm" in text
        _check_ops_endpoints(node, instances=len(study))
        _check_audit(node, source.StudyInstanceUID)
        # no PHI in any log line of the whole run
        log = node.log()
        for secret in ("DOE^JANE", "SECRET", "MRN-77123", "19511231"):
            assert secret not in log
    finally:
        node.stop()


def _get(url: str) -> tuple[int, str]:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _check_ops_endpoints(node: NodeProcess, instances: int) -> None:
    base = f"http://127.0.0.1:{node.config['http']['port']}"
    code, body = _get(base + "/health/ready")
    health = __import__("json").loads(body)
    assert code == 200 and health["ready"] and all(health["checks"].values()), body
    assert health["analysis_workers"] == "warm", body  # a job ran: the workers warmed up before it
    assert _get(base + "/health/live")[0] == 200
    code, metrics = _get(base + "/metrics")
    assert code == 200
    assert f'dicomnode_instances_received_total{{result="new"}} {float(instances)}' in metrics
    assert 'dicomnode_associations_total{outcome="accepted"}' in metrics
    assert 'dicomnode_items{kind="studies",state="done"} 1.0' in metrics
    assert 'dicomnode_deliveries_total{outcome="sent"} 1.0' in metrics
    assert 'dicomnode_job_stage_seconds_count{stage="analyse"} 1.0' in metrics
    assert "dicomnode_queue_depth 0.0" in metrics
    assert _get(base + "/nope")[0] == 404


def _check_audit(node: NodeProcess, study_uid: str) -> None:
    import json

    out = node.cli("audit", "--config", str(node.config_path), "--since", "1h").stdout
    records = [json.loads(line) for line in out.splitlines()]
    events = [r["event"] for r in records]
    assert events[0] == "config-loaded" and len(records[0]["sha256"]) == 64
    association = next(r for r in records if r["event"] == "association")
    assert association["outcome"] == "accepted" and association["calling_ae"] == "STORESCU"
    received = next(r for r in records if r["event"] == "study-received")
    assert received["study_uid"] == study_uid and received["instances"] == 40
    analysis = next(r for r in records if r["event"] == "analysis")
    assert (analysis["plugin"], analysis["version"], analysis["outcome"]) == ("dense_test", "0.0.1", "done")
    delivery = next(r for r in records if r["event"] == "delivery")
    assert delivery["outcome"] == "done" and set(delivery["statuses"].values()) == {0}
    assert sorted(delivery["statuses"]) == sorted(analysis["results"])
    only = node.cli("audit", "--config", str(node.config_path), "--event", "analysis").stdout
    assert len(only.splitlines()) == 1
    future = node.cli("audit", "--config", str(node.config_path), "--since", "2999-01-01T00:00").stdout
    assert future == ""
    raw = (Path(node.config["node"]["storage_dir"]) / "audit.jsonl").read_text()
    for secret in ("DOE^JANE", "SECRET", "MRN-77123", "19511231"):
        assert secret not in raw


def test_late_instances_reopen_and_supersede(tmp_path: Path, dest: StoreSCP, study: list[Path]) -> None:
    node = _node(tmp_path, dest.port).start()
    try:
        assert storescu(node.port, study[:-5]).returncode == 0
        node.wait_for(lambda s: _study_state(s, "done"), what="first revision done")
        first = _results(dest)
        assert storescu(node.port, study[-5:]).returncode == 0
        node.wait_for(lambda s: _study_state(s, "done") and len(s["jobs"]) == 2, what="second revision")
        both = _results(dest)
        assert [len(both[m]) for m in ("SEG", "SR", "OT", "KO")] == [2, 2, 6, 2]
        first_uids = {d.SOPInstanceUID for _, d in sum(first.values(), [])}
        new = [ds for _, ds in sum(both.values(), []) if ds.SOPInstanceUID not in first_uids]
        assert sorted({int(ds.SeriesNumber) for ds in new}) == [9011, 9012, 9013, 9014]
        old_series = {ds.SeriesInstanceUID for _, ds in sum(first.values(), [])}
        assert not {ds.SeriesInstanceUID for ds in new} & old_series
        # loop safety: our own results coming back (SEG, SR, key images, KOS), and a re-sent
        # study, trigger nothing
        sent = node.cli("send", str(dest.out_dir), "--to", f"DICOMNODE@127.0.0.1:{node.port}")
        assert "sent 12 of 12 instances" in sent.stdout
        assert storescu(node.port, study).returncode == 0
        # Every instance is registered before its Success, and a registration that re-opens
        # the study sets it receiving at once; it returns to done only as a new revision
        # with a new job. So once the 12 results are recorded (the 40 CT slices again are
        # duplicates, not counted), "done, revision 1, two jobs" proves nothing was started.
        status = node.wait_for(lambda s: s["studies"][0]["instance_count"] == 40 + 12, timeout=30,
                               what="our 12 results recorded in the study")
        assert [(s["state"], s["revision"]) for s in status["studies"]] == [("done", 1)]
        assert len(status["jobs"]) == 2
        records = node.cli("audit", "--config", str(node.config_path), "--event", "study-received").stdout
        assert [json.loads(line)["outcome"] for line in records.splitlines()] == ["dispatched", "dispatched"]
    finally:
        node.stop()


def test_destination_down_then_up(tmp_path: Path, study: list[Path]) -> None:
    port = free_port()
    node = _node(tmp_path, port).start()
    scp = StoreSCP(port, tmp_path / "late")
    try:
        assert storescu(node.port, study).returncode == 0
        status = node.wait_for(lambda s: s["deliveries"] and s["deliveries"][0]["attempts"] >= 2,
                               what="delivery retries")
        assert status["deliveries"][0]["state"] == "pending"
        assert "cannot connect" in status["deliveries"][0]["last_error"]
        text = node.cli("status", "--config", str(node.config_path)).stdout
        assert "pending" in text and "cannot connect" in text
        assert node.stop() == 0  # the retry schedule survives a restart
        scp.start()
        node.start()
        status = node.wait_for(lambda s: _study_state(s, "done"), what="delivered after retry")
        assert status["deliveries"][0]["state"] == "done"
        assert len(scp.files()) == 6  # SEG, SR, three key images, KOS
    finally:
        scp.stop()
        node.stop()


def test_kill9_mid_transfer_loses_nothing(tmp_path: Path, dest: StoreSCP, ct150: list[Path]) -> None:
    node = _node(tmp_path, dest.port).start()
    require_tool("storescu")
    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), *map(str, ct150)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=DCMTK_ENV,
    )
    spool = Path(node.config["node"]["storage_dir"]) / "spool"
    wait_for(lambda: len(list(spool.rglob("*.dcm"))) >= 40, 60, "40 instances spooled", every=0.02)
    assert node.proc is not None
    workers = descendants(node.proc.pid)  # acceptors, analysis workers
    node.kill9()
    assert workers, "the node started no process"
    _, err = sender.communicate(timeout=60)
    acked = acknowledged_files(err)
    assert 40 <= len(acked) < 150, f"{len(acked)} acknowledged"
    wait_for(lambda: not [pid for pid in workers if Path(f"/proc/{pid}").exists()], 15,
             "the killed node's processes to end on their own")
    node.start()
    try:
        stored = {p.stem for p in spool.rglob("*.dcm")}
        with sqlite3.connect(spool.parent / "state.sqlite3") as db:
            registered = {uid for (uid,) in db.execute("SELECT sop_instance_uid FROM instances")}
        for path in acked:
            uid = dcmread(path, stop_before_pixels=True).SOPInstanceUID
            assert uid in stored and uid in registered
        assert not list(spool.rglob(".incoming-*"))
        assert storescu(node.port, ct150).returncode == 0  # the rest (and duplicates) again
        status = node.wait_for(lambda s: _study_state(s, "done"), timeout=180, what="processed after restart")
        assert status["studies"][0]["instance_count"] == 150
        assert status["deliveries"][0]["state"] == "done"
        # no dense lesions: the SR, the summary image saying so, and the KOS selecting both
        assert sorted(ds.Modality for _, ds in sum(_results(dest).values(), [])) == ["KO", "OT", "SR"]
    finally:
        node.stop()


def test_sigterm_finishes_in_flight_and_exits_cleanly(tmp_path: Path, dest: StoreSCP, ct150: list[Path]) -> None:
    node = _node(tmp_path, dest.port).start()
    sender = subprocess.Popen(
        ["storescu", "-v", "-aec", "DICOMNODE", "127.0.0.1", str(node.port), *map(str, ct150)],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=DCMTK_ENV,
    )
    spool = Path(node.config["node"]["storage_dir"]) / "spool"
    wait_for(lambda: len(list(spool.rglob("*.dcm"))) >= 20, 60, "20 instances spooled", every=0.02)
    assert node.stop() == 0
    _, err = sender.communicate(timeout=60)
    acked = acknowledged_files(err)
    stored = {p.stem for p in spool.rglob("*.dcm")}
    assert all(dcmread(p, stop_before_pixels=True).SOPInstanceUID in stored for p in acked)
    assert "stopped" in node.log()
    with sqlite3.connect(spool.parent / "state.sqlite3") as db:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM instances").fetchone()[0] == len(stored)
    # the listener is gone
    refused = subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                             capture_output=True, env=DCMTK_ENV)
    assert refused.returncode != 0


def test_sigterm_mid_analysis_requeues_the_job_and_the_next_start_finishes_it(
        tmp_path: Path, dest: StoreSCP, study: list[Path]) -> None:
    """Stopping the node ends its analysis workers; the job they were running is not a
    failure: it stays running in the database and the next start runs it again."""
    slow = {"dense": {"factory": "tests.fake_plugins:create", "options": {"delay": 60}}}
    node = _node(tmp_path, dest.port, plugins=slow).start()
    try:
        assert storescu(node.port, study).returncode == 0
        node.wait_for(lambda s: any(j["state"] == "running" for j in s["jobs"]), what="job running")
    finally:
        assert node.stop() == 0
    with sqlite3.connect(tmp_path / "var" / "state.sqlite3") as db:
        assert db.execute("SELECT state, reason FROM jobs").fetchall() == [("running", None)]
    node = _node(tmp_path, dest.port).start()
    try:
        status = node.wait_for(lambda s: _study_state(s, "done"), what="study done after the restart")
        assert [j["state"] for j in status["jobs"]] == ["done"]
        assert status["deliveries"][0]["state"] == "done"
    finally:
        node.stop()


def test_crashing_plugin_fails_job_but_node_keeps_serving(tmp_path: Path, dest: StoreSCP, study: list[Path]) -> None:
    plugins = {"dense": {"factory": "tests.fake_plugins:create", "options": {"crash": True}}}
    node = _node(tmp_path, dest.port, plugins=plugins).start()
    try:
        assert storescu(node.port, study).returncode == 0
        status = node.wait_for(lambda s: _study_state(s, "failed"), what="job failed")
        assert "worker process died" in status["jobs"][0]["reason"]
        echo = subprocess.run(["echoscu", "-aec", "DICOMNODE", "127.0.0.1", str(node.port)],
                              capture_output=True, env=DCMTK_ENV)
        assert echo.returncode == 0
    finally:
        node.stop()


def test_unknown_plugin_fails_at_start(tmp_path: Path) -> None:
    cfg = node_config(tmp_path / "var", free_port(),
                      routes=[{"name": "r", "plugin": "no_such_plugin", "destinations": []}])
    node = NodeProcess(cfg, tmp_path / "node")
    with pytest.raises(AssertionError, match="no_such_plugin"):
        node.start(timeout=60)


def test_no_qualifying_series_is_recorded_with_the_reason(tmp_path: Path, dest: StoreSCP) -> None:
    short = write_ct_series(dense_phantom(5), tmp_path / "short", PATIENT)
    node = _node(tmp_path, dest.port).start()
    try:
        assert storescu(node.port, short).returncode == 0
        status = node.wait_for(lambda s: _study_state(s, "done"), what="study done without analysis")
        reason = status["studies"][0]["reason"]
        assert "too few slices (5 < 8)" in reason, reason
        assert status["jobs"][0]["reason"] == reason and not status["deliveries"]
        assert "nothing to analyse" in node.log() and not dest.files()
    finally:
        node.stop()
