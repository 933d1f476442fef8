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

from phantoms.ct_writer import StudyIdentity
from tests.servers import PASSWORD, PostgresServer, RabbitMQServer
from tests.support import StoreSCP
from tests.test_cluster_config import _check_config
from tests.test_cluster_workers import kill_the_busy_worker

PATIENT = StudyIdentity(patient_name="RABBIT^SECRET", patient_id="MRN-RABBIT-SECRET")


@pytest.fixture
def rabbitmq() -> Iterator[RabbitMQServer]:
    server = RabbitMQServer().start()
    yield server
    server.stop()


def test_check_config_reaches_rabbitmq(tmp_path: Path, postgres: PostgresServer, rabbitmq: RabbitMQServer) -> None:
    code, text = _check_config(tmp_path, {"database": postgres.new_database(),
                                          "spool": str(tmp_path / "cluster-spool"), "broker": rabbitmq.url()})
    assert code == 0, text
    assert f"cluster.broker amqp://dicomnode:***@127.0.0.1:{rabbitmq.port}//: OK (AMQP 0-9-1 answers)" in text
    assert rabbitmq.password not in text and PASSWORD not in text


def test_a_worker_killed_mid_job_on_rabbitmq_leaves_it_to_the_other_worker(
        tmp_path: Path, postgres: PostgresServer, rabbitmq: RabbitMQServer, dest: StoreSCP) -> None:
    with kill_the_busy_worker(tmp_path, postgres.new_database(), rabbitmq.url(), dest, PATIENT) as run:
        assert f"amqp://dicomnode:***@127.0.0.1:{rabbitmq.port}//" in run.survivor.log()
        for text in (run.gateway.log(), run.survivor.log()):
            assert "SECRET" not in text and rabbitmq.password not in text
