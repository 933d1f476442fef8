"""Two ``dicom-node serve`` gateways behind a real HAProxy (Debian's ``haproxy``, started by
the test with the shipped example ``config/haproxy/haproxy.cfg``), on a real PostgreSQL
server and one shared spool: HAProxy sees both ready through ``/health/ready``, one study
sent in two associations through the HAProxy port (one through each gateway) is one
study, one job and one delivery."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.servers import HAProxyServer, PostgresServer
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


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(free_port(), tmp_path / "received").start()
    yield scp
    scp.stop()


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
        for gw in gateways:
            assert "SECRET" not in gw.log()
    finally:
        if proxy is not None:
            proxy.stop()
        for gw in gateways:
            gw.stop()
