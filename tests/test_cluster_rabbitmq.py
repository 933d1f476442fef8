"""Analysis through Celery on a RabbitMQ broker (``cluster.broker: amqp://``): Debian's
``rabbitmq-server``, started by the test on free loopback ports (tests.servers.py), with a
real PostgreSQL server, a ``dicom-node serve`` gateway and two ``dicom-node worker``
processes, as ``tests/test_cluster_workers.py`` runs them on Redis.

- ``check-config`` reaches the broker (AMQP protocol header) and names it without its password;
- two workers, the one running the job killed with ``kill -9`` (with its processes): RabbitMQ
  hands the unacknowledged message to the other worker, which drops it while the dead
  worker's lease holds the job; after the lease the job runs there (try 2), one result
  series of each kind, delivered once.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.servers import PASSWORD, PostgresServer, RabbitMQServer
from tests.support import StoreSCP, dense_phantom, free_port, storescu
from tests.test_cluster_config import _check_config
from tests.test_cluster_workers import WorkerProcess, _done, _gateway, _query, _received_by_modality, _workers

PATIENT = StudyIdentity(patient_name="RABBIT^SECRET", patient_id="MRN-RABBIT-SECRET")


@pytest.fixture
def rabbitmq() -> Iterator[RabbitMQServer]:
    server = RabbitMQServer().start()
    yield server
    server.stop()


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[StoreSCP]:
    scp = StoreSCP(free_port(), tmp_path / "received").start()
    yield scp
    scp.stop()


def test_check_config_reaches_rabbitmq(tmp_path: Path, postgres: PostgresServer, rabbitmq: RabbitMQServer) -> None:
    code, text = _check_config(tmp_path, {"database": postgres.new_database(),
                                          "spool": str(tmp_path / "cluster-spool"), "broker": rabbitmq.url()})
    assert code == 0, text
    assert f"cluster.broker amqp://dicomnode:***@127.0.0.1:{rabbitmq.port}//: OK (AMQP 0-9-1 answers)" in text
    assert rabbitmq.password not in text and PASSWORD not in text


def test_a_worker_killed_mid_job_on_rabbitmq_leaves_it_to_the_other_worker(
        tmp_path: Path, postgres: PostgresServer, rabbitmq: RabbitMQServer, dest: StoreSCP) -> None:
    database = postgres.new_database()
    study = write_ct_series(dense_phantom(24, size=96), tmp_path / "study", PATIENT,
                            SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    gateway = _gateway(tmp_path, database, rabbitmq.url(), dest.port, delay=6.0)
    workers: list[WorkerProcess] = []
    try:
        gateway.start()
        workers = _workers(tmp_path, gateway, ["w-a", "w-b"])
        for worker in workers:
            worker.start()
        assert storescu(gateway.port, study).returncode == 0
        status = gateway.wait_for(lambda s: any(j["state"] == "running" for j in s["jobs"]), timeout=120,
                                  what="the job running on a worker")
        [job] = status["jobs"]
        doomed = next(w for w in workers if w.name == job["node"])
        survivor = next(w for w in workers if w is not doomed)
        doomed.kill_host()
        status = gateway.wait_for(_done, timeout=120, what="the study done by the other worker")
        [job] = status["jobs"]
        assert (job["state"], job["attempts"], job["node"]) == ("done", 2, survivor.name), status
        [delivery] = status["deliveries"]
        assert delivery["state"] == "done" and delivery["attempts"] == 1
        assert _received_by_modality(dest) == {"SEG": 1, "SR": 1, "OT": 3, "KO": 1}
        assert sorted(_query(database, "SELECT kind, COUNT(DISTINCT series_uid) FROM results GROUP BY kind")) == [
            ("KOS", 1), ("SC", 1), ("SEG", 1), ("SR", 1)]
        history = [r[0] for r in _query(database, "SELECT detail FROM transitions WHERE kind='job' ORDER BY id")]
        assert history == ["route dense-ct", f"worker {doomed.name}", f"lease of node {doomed.name} expired",
                           f"worker {survivor.name}", "6 result objects"]
        assert f"amqp://dicomnode:***@127.0.0.1:{rabbitmq.port}//" in survivor.log()
        for text in (gateway.log(), survivor.log()):
            assert "SECRET" not in text and PASSWORD not in text and rabbitmq.password not in text
    finally:
        for worker in workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.kill_host()
        gateway.stop()
