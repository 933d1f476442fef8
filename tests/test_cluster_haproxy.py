"""Two ``dicom-node serve`` gateways behind a real HAProxy (Debian's ``haproxy``, started by
the test with the shipped example ``config/haproxy/haproxy.cfg``), on a real PostgreSQL
server and one shared spool: HAProxy sees both ready through ``/health/ready``, one study
sent in two associations through the HAProxy port (one through each gateway) is one
study, one job and one delivery, counted per gateway in the cluster view; a gateway whose
``/health/ready`` says not ready (it lost the database) is taken out of HAProxy, the
associations go to the other, and it is put back once it is ready again."""

from __future__ import annotations

import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psycopg

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.servers import PASSWORD, USER, HAProxyServer, PostgresServer
from tests.support import (
    FAKE_PLUGIN,
    REPO,
    NodeProcess,
    StoreSCP,
    dense_phantom,
    dense_route,
    free_port,
    node_config,
    storescu,
    wait_for,
)

PATIENT = StudyIdentity(patient_name="HAPROXY^SECRET", patient_id="MRN-HAPROXY-SECRET")


def _gateway(tmp_path: Path, name: str, database: str, dest_port: int) -> NodeProcess:
    cfg = node_config(tmp_path / name / "var", free_port(),
                      destinations={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}},
                      routes=dense_route(["dest"], stable=2.0), plugins=FAKE_PLUGIN,
                      cluster={"database": database, "spool": str(tmp_path / "cluster-spool"), "node_id": name,
                               "lease_seconds": 4.0})
    cfg["node"]["listener_processes"] = 1
    return NodeProcess(cfg, tmp_path / name)


def _instances_received(log: str) -> int:
    return sum(int(n) for n in re.findall(r"association \S+ \w+: .*?instances=(\d+)", log))


def _get(port: int, path: str) -> tuple[int, str]:
    """Status and body of ``GET path`` on a gateway's ops port."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as rsp:
            return rsp.status, rsp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _ingest(status: dict[str, Any]) -> dict[str, int]:
    """Instances registered per ingest node, from the cluster view of ``status --json``."""
    return {r["node"]: r["instances"] for r in status["cluster"]["ingest"]}


def test_the_shipped_example_is_valid() -> None:
    out = subprocess.run(["haproxy", "-c", "-f", str(REPO / "config" / "haproxy" / "haproxy.cfg")],
                         capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stdout + out.stderr


def test_one_study_through_haproxy_half_to_each_gateway_is_one_study_one_job_one_delivery(
        tmp_path: Path, postgres: PostgresServer, dest: StoreSCP) -> None:
    database = postgres.new_database()
    study = write_ct_series(dense_phantom(40), tmp_path / "study", PATIENT, SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    gateways = [_gateway(tmp_path, name, database, dest.port) for name in ("gw-a", "gw-b")]
    proxy: HAProxyServer | None = None
    try:
        for gw in gateways:
            gw.start()
        proxy = HAProxyServer({gw.config["cluster"]["node_id"]: (gw.port, gw.config["http"]["port"])
                               for gw in gateways}).start()
        wait_for(lambda: set(proxy.server_states().values()) == {"UP"}, 30, "both gateways UP in haproxy")
        half = len(study) // 2
        for files in (study[:half], study[half:]):  # two associations: leastconn alternates
            out = storescu(proxy.port, files)
            assert out.returncode == 0, out.stdout + out.stderr
        received = [_instances_received(gw.log()) for gw in gateways]
        assert received == [half, len(study) - half], received
        status: dict[str, Any] = gateways[0].wait_for(
            lambda s: any(r["state"] == "done" for r in s["studies"]), timeout=180, what="the study done")
        [row] = status["studies"]
        assert row["instance_count"] == len(study)
        [job] = status["jobs"]
        assert job["state"] == "done" and job["attempts"] == 1
        [delivery] = status["deliveries"]
        assert delivery["state"] == "done"
        assert len(dest.files()) == 6  # SEG, SR, three key images, KOS: once
        # the cluster view, from either gateway: instances received per ingest node
        assert _ingest(gateways[1].status()) == {"gw-a": half, "gw-b": len(study) - half}
        text = gateways[1].cli("status", "--config", str(gateways[1].config_path)).stdout
        rows = text.split("CLUSTER INGEST", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
        assert [r.split()[:2] for r in rows] == [["gw-a", str(half)], ["gw-b", str(len(study) - half)]], text
        code, metrics = _get(gateways[0].config["http"]["port"], "/metrics")
        assert code == 200
        assert f'dicomnode_cluster_ingest_instances{{node="gw-a"}} {float(half)}' in metrics
        assert f'dicomnode_cluster_ingest_instances{{node="gw-b"}} {float(len(study) - half)}' in metrics
        for gw in gateways:
            assert "SECRET" not in gw.log()
    finally:
        if proxy is not None:
            proxy.stop()
        for gw in gateways:
            gw.stop()


def test_haproxy_takes_out_a_gateway_that_is_not_ready_and_puts_it_back(
        tmp_path: Path, postgres: PostgresServer, dest: StoreSCP) -> None:
    """gw-a reaches the database as its own role; the role refused (its sessions ended),
    gw-a's ``/health/ready`` answers 503 while its process and listener run: HAProxy marks it
    DOWN and sends every new association to gw-b; the role allowed again, gw-a is ready,
    UP, and gets associations again."""
    database = postgres.new_database()
    with psycopg.connect(database, autocommit=True) as conn:
        conn.execute("CREATE ROLE gw_a LOGIN SUPERUSER PASSWORD 'gw-a-secret-1234'")
    own_role = database.replace(f"{USER}:{PASSWORD}@", "gw_a:gw-a-secret-1234@")
    assert own_role != database
    first = write_ct_series(dense_phantom(20, size=64), tmp_path / "first", PATIENT,
                            SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    other = StudyIdentity(patient_name=PATIENT.patient_name, patient_id=PATIENT.patient_id, accession_number="ACC2")
    second = write_ct_series(dense_phantom(20, size=64, seed=1), tmp_path / "second", other,
                             SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    gateways = [_gateway(tmp_path, "gw-a", own_role, dest.port), _gateway(tmp_path, "gw-b", database, dest.port)]
    proxy: HAProxyServer | None = None

    def set_login(allowed: bool) -> None:
        with psycopg.connect(database, autocommit=True) as conn:
            conn.execute(f"ALTER ROLE gw_a {'LOGIN' if allowed else 'NOLOGIN'}")
            if not allowed:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename='gw_a'")

    try:
        for gw in gateways:
            gw.start()
        proxy = HAProxyServer({gw.config["cluster"]["node_id"]: (gw.port, gw.config["http"]["port"])
                               for gw in gateways}).start()
        wait_for(lambda: proxy.server_states() == {"gw-a": "UP", "gw-b": "UP"}, 30, "both gateways UP")
        set_login(False)
        code, body = _get(gateways[0].config["http"]["port"], "/health/ready")
        assert code == 503 and json.loads(body)["checks"]["database"] is False, body
        assert gateways[0].proc is not None and gateways[0].proc.poll() is None  # running, not ready
        wait_for(lambda: proxy.server_states().get("gw-a") == "DOWN", 30, "gw-a DOWN in haproxy")
        assert proxy.server_states()["gw-b"] == "UP"
        half = len(first) // 2
        for files in (first[:half], first[half:]):  # both associations go to gw-b
            out = storescu(proxy.port, files)
            assert out.returncode == 0, out.stdout + out.stderr
        assert [_instances_received(gw.log()) for gw in gateways] == [0, len(first)]
        set_login(True)
        wait_for(lambda: proxy.server_states().get("gw-a") == "UP", 30, "gw-a UP again")
        assert _get(gateways[0].config["http"]["port"], "/health/ready")[0] == 200
        half = len(second) // 2
        for files in (second[:half], second[half:]):  # leastconn alternates again
            out = storescu(proxy.port, files)
            assert out.returncode == 0, out.stdout + out.stderr
        assert _instances_received(gateways[0].log()) > 0, "gw-a got no association after it was UP"
        status = gateways[1].wait_for(lambda s: len(s["studies"]) == 2 and all(
            r["state"] == "done" for r in s["studies"]), timeout=180, what="both studies done")
        assert sorted(r["instance_count"] for r in status["studies"]) == [len(first), len(second)]
        ingest = _ingest(status)
        assert ingest["gw-b"] >= len(first) and sum(ingest.values()) == len(first) + len(second), ingest
        assert ingest["gw-a"] == _instances_received(gateways[0].log())
        for gw in gateways:
            assert "SECRET" not in gw.log() and "gw-a-secret-1234" not in gw.log()
            assert "ConnectionResetError" not in gw.log()  # HAProxy's checks hanging up on a 503: no error
    finally:
        if proxy is not None:
            proxy.stop()
        for gw in gateways:
            gw.stop()
