"""Two ``dicom-node serve`` processes as one cluster: a real PostgreSQL server (started by
the tests), one shared spool folder, dcmtk's storescu as the PACS and storescp as the
destination. One study sent half through each node is one study, analysed by one job
and delivered once; a node killed with ``kill -9`` in the middle of a job leaves it to
the other node once its lease expires, and the results are still delivered once; a node
killed in the middle of a C-STORE stream loses nothing it acknowledged."""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path
from typing import Any

import psycopg
import pytest
from pydicom import dcmread

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.servers import PASSWORD, PostgresServer
from tests.support import (
    FAKE_PLUGIN,
    NodeProcess,
    StoreSCP,
    acknowledged_files,
    dense_phantom,
    dense_route,
    descendants,
    free_port,
    node_config,
    storescu,
    wait_for,
)

PATIENT = StudyIdentity(patient_name="CLUSTER^SECRET", patient_id="MRN-CLUSTER-SECRET")
LEASE_S = 4.0


@pytest.fixture
def study(tmp_path: Path) -> list[Path]:
    return write_ct_series(dense_phantom(40), tmp_path / "study", PATIENT, SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))


def _node(tmp_path: Path, name: str, database: str, dest_port: int, delay: float = 0.0,
          listeners: int = 1) -> NodeProcess:
    plugins: dict[str, Any] = {"dense": {**FAKE_PLUGIN["dense"], "options": {"threshold": 300, "delay": delay}}}
    cfg = node_config(tmp_path / name / "var", free_port(),
                      destinations={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}},
                      routes=dense_route(["dest"]), plugins=plugins,
                      cluster={"database": database, "spool": str(tmp_path / "cluster-spool"), "node_id": name,
                               "lease_seconds": LEASE_S})
    cfg["node"]["listener_processes"] = listeners  # >1: acceptor processes, each on the database
    return NodeProcess(cfg, tmp_path / name)


def _done(status: dict[str, Any]) -> bool:
    return any(s["state"] == "done" for s in status["studies"])


def _received_by_modality(dest: StoreSCP) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in dest.files():
        modality = str(dcmread(path, stop_before_pixels=True).Modality)
        counts[modality] = counts.get(modality, 0) + 1
    return counts


def _kill_host(node: NodeProcess) -> None:
    """``kill -9`` the node and every process below it, as when its host dies."""
    assert node.proc is not None
    below = descendants(node.proc.pid)
    node.kill9()
    for pid in below:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_one_study_through_two_nodes_is_one_study_one_job_one_delivery(
        tmp_path: Path, postgres: PostgresServer, dest: StoreSCP, study: list[Path]) -> None:
    database = postgres.new_database()
    nodes = [_node(tmp_path, "gw-a", database, dest.port, listeners=2), _node(tmp_path, "gw-b", database, dest.port)]
    try:
        for node in nodes:
            node.start()
        halves = [study[: len(study) // 2], study[len(study) // 2:]]
        outputs: list[str] = []

        def send(node: NodeProcess, files: list[Path]) -> None:
            out = storescu(node.port, files)
            assert out.returncode == 0, out.stderr
            outputs.append(out.stdout + out.stderr)

        senders = [threading.Thread(target=send, args=(n, h)) for n, h in zip(nodes, halves)]
        for t in senders:
            t.start()
        for t in senders:
            t.join()
        assert sum(len(acknowledged_files(o)) for o in outputs) == len(study)
        status = nodes[0].wait_for(_done, timeout=180, what="the study done")
        status = nodes[1].status()  # the same state, seen through the other node
        [row] = status["studies"]
        assert (row["instance_count"], row["revision"]) == (len(study), 0)
        [job] = status["jobs"]
        assert job["state"] == "done" and job["attempts"] == 1 and job["node"] in ("gw-a", "gw-b")
        [delivery] = status["deliveries"]
        assert delivery["state"] == "done" and delivery["node"] in ("gw-a", "gw-b")
        text = nodes[1].cli("status", "--config", str(nodes[1].config_path)).stdout
        assert "node" in text.split("JOBS\n", 1)[1].splitlines()[0] and job["node"] in text
        assert _received_by_modality(dest) == {"SEG": 1, "SR": 1, "OT": 3, "KO": 1}
        spool_root = tmp_path / "cluster-spool"
        assert len(list((spool_root / "spool" / row["study_uid"]).glob("*.dcm"))) == len(study)
        assert {p.name for p in (spool_root / "spool" / ".slots").iterdir()} == {"gw-a", "gw-b"}
        for node in nodes:
            log = node.log()
            assert "SECRET" not in log and PASSWORD not in log
    finally:
        for node in nodes:
            node.stop()


def test_a_node_killed_mid_job_leaves_it_to_the_other_after_its_lease(
        tmp_path: Path, postgres: PostgresServer, dest: StoreSCP, study: list[Path]) -> None:
    database = postgres.new_database()
    doomed = _node(tmp_path, "gw-doomed", database, dest.port, delay=120.0).start()
    survivor = _node(tmp_path, "gw-survivor", database, dest.port)
    try:
        assert storescu(doomed.port, study).returncode == 0
        doomed.wait_for(lambda s: any(j["state"] == "running" for j in s["jobs"]), timeout=120,
                        what="the job running on the doomed node")
        _kill_host(doomed)
        survivor.start()
        status = survivor.wait_for(_done, timeout=120, what="the study done by the survivor")
        [job] = status["jobs"]
        assert job["state"] == "done" and job["attempts"] == 2 and job["node"] == "gw-survivor"
        [delivery] = status["deliveries"]
        assert delivery["state"] == "done"
        assert _received_by_modality(dest) == {"SEG": 1, "SR": 1, "OT": 3, "KO": 1}
        assert "running jobs of other nodes requeued: their leases expired" in survivor.log()
    finally:
        if doomed.proc is not None and doomed.proc.poll() is None:
            _kill_host(doomed)
        survivor.stop()


def test_an_ingest_node_killed_mid_stream_loses_nothing_it_acknowledged(
        tmp_path: Path, postgres: PostgresServer, ct150: list[Path]) -> None:
    """kill -9 of a node while storescu streams to it: every instance that got Success is
    registered (once) and in the shared spool; the PACS sends the rest through the other
    node, and the study is whole."""
    database = postgres.new_database()
    keep = {"routes": [], "retention": {"ignored_days": None}}  # no analysis: ingest only

    def ingest_node(name: str) -> NodeProcess:
        cfg = node_config(tmp_path / name / "var", free_port(), **keep,
                          cluster={"database": database, "spool": str(tmp_path / "cluster-spool"), "node_id": name,
                                   "lease_seconds": LEASE_S})
        cfg["node"]["listener_processes"] = 1
        return NodeProcess(cfg, tmp_path / name)

    doomed, other = ingest_node("gw-doomed").start(), ingest_node("gw-other").start()
    def registered() -> int:
        with psycopg.connect(database) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM instances").fetchone()[0])  # type: ignore[index]

    try:
        out: dict[str, str] = {}

        def send() -> None:
            result = storescu(doomed.port, ct150)
            out["text"] = result.stdout + result.stderr

        sender = threading.Thread(target=send)
        sender.start()
        wait_for(lambda: registered() >= 20, 120, "20 instances registered")
        _kill_host(doomed)
        sender.join(120)
        acked = acknowledged_files(out["text"])
        assert 20 <= len(acked) < len(ct150)
        with psycopg.connect(database) as conn:
            paths = {r[0]: r[1] for r in conn.execute("SELECT sop_instance_uid, path FROM instances")}
        for name in acked:
            uid = str(dcmread(name, stop_before_pixels=True).SOPInstanceUID)
            assert uid in paths and Path(paths[uid]).is_file(), uid
        # the PACS retries the whole study through the other node: duplicates are Success, nothing twice
        assert storescu(other.port, ct150).returncode == 0
        with psycopg.connect(database) as conn:
            [(study_count, instances)] = conn.execute("SELECT COUNT(*), SUM(instance_count) FROM studies").fetchall()
        assert (study_count, instances, registered()) == (1, len(ct150), len(ct150))
    finally:
        if doomed.proc is not None and doomed.proc.poll() is None:
            _kill_host(doomed)
        other.stop()
