"""The state database in PostgreSQL (dicom_node/storage/postgres.py), against a real
server the tests start (tests.servers.py): the same interface as SQLite, versioned
migrations, and the guarantees several nodes on one database need: instances arriving
through different nodes make one study, exactly one node dispatches a stable study and
claims each job and delivery, and a node killed with ``kill -9`` holds its job only
until its lease expires."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psycopg
import pytest
from prometheus_client import generate_latest

from dicom_node.errors import StorageError
from dicom_node.metrics import Metrics
from dicom_node.status_report import collect, render
from dicom_node.storage.postgres import PostgresStateDB
from dicom_node.storage.schema import postgres_migrations
from dicom_node.storage.state import InstanceRecord, ResultRecord, StateDB
from dicom_node.storage.work import WorkStore
from tests.servers import PASSWORD, PostgresServer
from tests.support import REPO

STUDY = "1.2.826.0.1.3680043.2.1125.77.1"
SR = "1.2.840.10008.5.1.4.1.1.88.22"


def _record(n: int, study: str = STUDY, series: str = "1.2.3.9") -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=f"1.2.3.9.{n}", series_uid=series, study_uid=study,
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                          path=Path(f"/spool/{study}/1.2.3.9.{n}.dcm"), size=100, sha256="0" * 64,
                          series_attrs={"Modality": "CT"}, analysable=True, accession_number="ACC1")


@pytest.fixture
def url(postgres: PostgresServer) -> str:
    return postgres.new_database()


def test_migrations_are_versioned_and_applied_once(url: str) -> None:
    dbs: list[PostgresStateDB] = []
    threads = [threading.Thread(target=lambda: dbs.append(PostgresStateDB(url))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(dbs) == 4  # four nodes starting at once: one migrates, the others wait and find it done
    rows = dbs[0].query("SELECT version, description FROM schema_migrations ORDER BY version")
    assert [(r["version"], r["description"]) for r in rows] == [(v, d) for v, d, _ in postgres_migrations()]
    assert dbs[0].schema_version() == len(postgres_migrations())
    with dbs[0].transaction() as c:
        c.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (999, "from a newer node", 0.0))
    with pytest.raises(StorageError, match="newer than this node's"):
        PostgresStateDB(url)
    for db in dbs:
        db.close()


def test_the_work_cycle_behind_the_same_interface(url: str, tmp_path: Path) -> None:
    """Register, dispatch, claim, finish, deliver, retry, end, status and forget: what the
    node does with SQLite, on PostgreSQL."""
    db = PostgresStateDB(url)
    work = WorkStore(db)
    assert [db.register_instance(_record(n)) for n in range(3)] == ["new"] * 3
    assert db.register_instance(_record(1)) == "duplicate" and db.is_stored("1.2.3.9.1")
    assert not db.is_stored("1.2.3.9.77")
    study = db.study(STUDY)
    assert study is not None and (study["state"], study["instance_count"], study["accession_number"]) == (
        "receiving", 3, "ACC1")
    assert [s["instance_count"] for s in db.study_series(STUDY)] == [3]
    assert len(db.study_files(STUDY)) == 3 and db.has_instance_path(Path(f"/spool/{STUDY}/1.2.3.9.0.dcm"))
    assert work.dispatch_study(STUDY, [("r", "p")]) == 0
    job = work.claim_job()
    assert job is not None and (job.state, job.attempts) == ("running", 1) and work.claim_job() is None
    assert work.requeue_job(job.id, "test") and work.claim_job() is not None
    results = [ResultRecord(f"1.2.3.7.{n}", "1.2.3.7", SR, "sr", tmp_path / f"{n}.dcm") for n in range(2)]
    assert work.finish_job(job.id, results, ["dest"], {"analyse": 1.5}, deadline_seconds=60)
    [delivery] = work.due_deliveries(time.time() + 1)
    assert len(work.unconfirmed_items(delivery.id)) == 2
    work.record_status(delivery.id, "1.2.3.7.0", 0)
    assert [i.sop_instance_uid for i in work.unconfirmed_items(delivery.id)] == ["1.2.3.7.1"]
    work.retry_delivery(delivery.id, time.time() + 100, "peer busy")
    assert not work.due_deliveries(time.time() + 1)
    work.end_delivery(delivery.id, "rejected", "0xA900")
    assert work.failed_deliveries() == [delivery.id]
    assert "pending" in work.reopen_delivery(delivery.id, 60, "test")
    work.end_delivery(delivery.id, "done")
    assert db.study(STUDY)["state"] == "done"  # type: ignore[index]
    # a re-opened study gets a new revision that supersedes nothing left open
    db.register_instance(_record(5))
    assert db.study(STUDY)["state"] == "receiving"  # type: ignore[index]
    assert work.dispatch_study(STUDY, [("r", "p")]) == 1
    data = collect(db)
    assert data["counts"]["jobs"] == {"done": 1, "queued": 1}
    assert [s["study_uid"] for s in data["studies"]] == [STUDY] and len(data["results"]) == 2
    assert db.counts()["deliveries"] == {"done": 1}
    assert work.forget_study(STUDY) == {"jobs": 2, "deliveries": 1, "results": 2, "instances": 4, "studies": 1}
    assert db.study(STUDY) is None
    db.close()


def _register_in_threads(work: list[tuple[PostgresStateDB, range]]) -> None:
    """Each (node, numbers) registers those instances from its own thread, all at once;
    an error in any thread fails the test."""
    errors: list[BaseException] = []

    def register(db: PostgresStateDB, numbers: range) -> None:
        try:
            for n in numbers:
                db.register_instance(_record(n))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=register, args=item) for item in work]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


def test_instances_through_two_nodes_make_one_study(url: str) -> None:
    """Two nodes register halves of one study at the same time, each from several threads."""
    nodes = [PostgresStateDB(url), PostgresStateDB(url)]
    _register_in_threads([(nodes[k % 2], range(k, 200, 4)) for k in range(4)])
    [study] = nodes[0].query("SELECT * FROM studies")
    assert study["instance_count"] == 200 and study["state"] == "receiving"
    assert nodes[1].query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == 200
    assert nodes[1].query("SELECT instance_count FROM series")[0]["instance_count"] == 200
    transitions = nodes[0].query("SELECT * FROM transitions WHERE kind='study'")
    assert [t["to_state"] for t in transitions] == ["receiving"]
    for db in nodes:
        db.close()


def test_instances_are_counted_per_ingest_node(url: str, tmp_path: Path) -> None:
    """The cluster view's ingest per node: each node's registered instances counted in the
    shared database (table ``node_ingest``, added by a migration to a database made by the
    previous version), duplicates not, a process without a node name (a worker) not, and the
    counts kept when the study is forgotten; shown by ``status`` and ``/metrics``."""
    old = PostgresStateDB(url)  # as the previous version left it: without the table and its version
    with old.transaction() as c:
        c.execute("DROP TABLE node_ingest")
        c.execute("DELETE FROM schema_migrations WHERE description='table node_ingest'")
    old.close()
    nodes = {name: PostgresStateDB(url, node_id=name) for name in ("gw-a", "gw-b")}
    assert nodes["gw-a"].schema_version() == len(postgres_migrations())  # migrated again, once
    # gw-a gets 0..29 from three threads, gw-b 30..49 from two, at the same time
    _register_in_threads([(nodes["gw-a"], range(k, 30, 3)) for k in range(3)]
                         + [(nodes["gw-b"], range(30 + k, 50, 2)) for k in range(2)])
    assert [nodes["gw-b"].register_instance(_record(n)) for n in range(5)] == ["duplicate"] * 5  # not counted
    worker = PostgresStateDB(url)  # no node name: registers, counts nothing
    assert worker.register_instance(_record(99)) == "new"
    view = worker.cluster_view()
    assert [(r["node"], r["instances"], r["bytes"]) for r in view["ingest"]] == [("gw-a", 30, 3000), ("gw-b", 20, 2000)]
    assert all(r["first_received_at"] <= r["last_received_at"] for r in view["ingest"])
    assert WorkStore(worker).forget_study(STUDY)["instances"] == 51
    data = collect(nodes["gw-b"])
    assert [(r["node"], r["instances"]) for r in data["cluster"]["ingest"]] == [("gw-a", 30), ("gw-b", 20)]
    text = render(data)
    assert "CLUSTER INGEST" in text
    rows = text.split("CLUSTER INGEST", 1)[1].split("\n\n", 1)[0].splitlines()[3:]
    assert [row.split()[:2] for row in rows] == [["gw-a", "30"], ["gw-b", "20"]]
    metrics = Metrics()
    metrics.refresh_cluster(data["cluster"])
    scraped = generate_latest(metrics.registry).decode()
    assert 'dicomnode_cluster_ingest_instances{node="gw-a"} 30.0' in scraped
    assert 'dicomnode_cluster_ingest_instances{node="gw-b"} 20.0' in scraped
    assert 'dicomnode_cluster_ingest_bytes{node="gw-b"} 2000.0' in scraped
    for db in (*nodes.values(), worker):
        db.close()


def test_sqlite_and_postgresql_have_one_schema(url: str, tmp_path: Path) -> None:
    """The embedded SQLite database and PostgreSQL's migrated one have the same tables and
    columns (the per-node ingest table included); the embedded node counts nothing in it."""
    pg = PostgresStateDB(url)
    pg_columns = {(r["table_name"], r["column_name"]) for r in pg.query(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema='public'")}
    pg.close()
    lite = StateDB(tmp_path / "state.db")
    tables = [r["name"] for r in lite.query("SELECT name FROM sqlite_master WHERE type='table'")]
    lite_columns = {(t, r["name"]) for t in tables for r in lite.query(f"PRAGMA table_info({t})")}
    assert lite_columns == pg_columns - {("schema_migrations", c) for c in ("version", "description", "applied_at")}
    assert ("node_ingest", "instances") in lite_columns
    assert lite.register_instance(_record(0)) == "new"
    assert lite.query("SELECT COUNT(*) AS n FROM node_ingest")[0]["n"] == 0
    lite.close()


def test_exactly_one_node_dispatches_a_stable_study(url: str) -> None:
    dbs = [PostgresStateDB(url) for _ in range(4)]
    dbs[0].register_instance(_record(0))
    row = dbs[0].study(STUDY)
    assert row is not None
    outcomes: list[int | None] = []
    barrier = threading.Barrier(4)

    def dispatch(db: PostgresStateDB) -> None:
        barrier.wait()
        outcomes.append(WorkStore(db, "n").dispatch_stable_study(STUDY, [("r", "p")], row["last_received_at"]))

    threads = [threading.Thread(target=dispatch, args=(db,)) for db in dbs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes, key=str) == [0, None, None, None]
    assert dbs[0].query("SELECT COUNT(*) AS n FROM jobs")[0]["n"] == 1
    # a study that received an instance after it was read is not dispatched on that reading
    dbs[0].register_instance(_record(1, study="1.2.3.4.5"))
    seen = dbs[0].study("1.2.3.4.5")
    dbs[1].register_instance(_record(2, study="1.2.3.4.5"))
    assert seen is not None and WorkStore(dbs[0]).dispatch_stable_study(
        "1.2.3.4.5", [("r", "p")], seen["last_received_at"]) is None
    for db in dbs:
        db.close()


def test_each_job_and_delivery_is_claimed_by_one_node(url: str, tmp_path: Path) -> None:
    setup = PostgresStateDB(url)
    for k in range(30):
        setup.register_instance(_record(k, study=f"1.2.3.{k}"))
        WorkStore(setup).dispatch_study(f"1.2.3.{k}", [("r", "p")])
    claimed: dict[str, list[int]] = {}
    barrier = threading.Barrier(3)

    def claim(name: str) -> None:
        db = PostgresStateDB(url)
        work = WorkStore(db, name)
        barrier.wait()
        mine = claimed.setdefault(name, [])
        while (job := work.claim_job()) is not None:
            mine.append(job.id)
        db.close()

    threads = [threading.Thread(target=claim, args=(f"node-{k}",)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    everything = sorted(sum(claimed.values(), []))
    assert everything == sorted({*everything}) and len(everything) == 30  # each once, none lost
    owners = setup.query("SELECT lease_owner, COUNT(*) AS n FROM jobs GROUP BY lease_owner")
    assert {r["lease_owner"]: r["n"] for r in owners} == {k: len(v) for k, v in claimed.items() if v}
    # deliveries: the first node to claim holds it; the other sees it taken and not due
    a, b = WorkStore(setup, "node-a", lease_seconds=30), WorkStore(PostgresStateDB(url), "node-b")
    job_id = claimed["node-0"][0] if claimed["node-0"] else everything[0]
    owner = setup.query("SELECT lease_owner FROM jobs WHERE id=?", (job_id,))[0]["lease_owner"]
    WorkStore(setup, owner).finish_job(job_id, [ResultRecord("1.2.3.8", "1.2.3", SR, "sr", tmp_path / "x")],
                                       ["dest"], {}, 60)
    [delivery] = a.due_deliveries(time.time())
    assert a.claim_delivery(delivery.id) and not b.claim_delivery(delivery.id)
    assert not b.due_deliveries(time.time())
    a.retry_delivery(delivery.id, time.time(), "peer busy")  # an attempt ends: the lease goes
    assert b.claim_delivery(delivery.id)


def test_a_job_finished_by_a_node_whose_lease_expired_is_not_recorded(url: str, tmp_path: Path) -> None:
    db = PostgresStateDB(url)
    db.register_instance(_record(0))
    slow, other = WorkStore(db, "slow", lease_seconds=2), WorkStore(db, "other")
    slow.dispatch_study(STUDY, [("r", "p")])
    job = slow.claim_job()
    assert job is not None
    assert other.requeue_expired(time.time() + 3) == 1
    again = other.claim_job()
    assert again is not None and again.id == job.id and again.attempts == 2
    result = [ResultRecord("1.2.3.8", "1.2.3", SR, "sr", tmp_path / "x")]
    assert not slow.finish_job(job.id, result, ["dest"], {}, 60)  # the other node owns it now
    assert other.finish_job(job.id, result, ["dest"], {}, 60)
    assert len(db.query("SELECT * FROM deliveries")) == 1
    db.close()


CLAIM_AND_HANG = """
import sys, time
from dicom_node.storage.postgres import PostgresStateDB
from dicom_node.storage.work import WorkStore
work = WorkStore(PostgresStateDB(sys.argv[1]), "doomed-node", lease_seconds=float(sys.argv[2]))
job = work.claim_job()
delivery = work.due_deliveries(time.time())[0]
assert work.claim_delivery(delivery.id)
print(job.id, delivery.id, flush=True)
time.sleep(600)
"""


def test_a_node_killed_holding_leases_leaves_its_work_after_the_lease(url: str, tmp_path: Path) -> None:
    db = PostgresStateDB(url)
    work = WorkStore(db, "survivor", lease_seconds=30)
    db.register_instance(_record(0))
    db.register_instance(_record(1, study="1.2.3.4.6"))
    work.dispatch_study(STUDY, [("r", "p")])
    first = work.claim_job()
    assert first is not None
    work.finish_job(first.id, [ResultRecord("1.2.3.8", "1.2.3", SR, "sr", tmp_path / "x")], ["dest"], {}, 60)
    work.dispatch_study("1.2.3.4.6", [("r", "p")])
    lease = 3.0
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    doomed = subprocess.Popen([sys.executable, "-c", CLAIM_AND_HANG, url, str(lease)], stdout=subprocess.PIPE,
                              text=True, env=env)
    try:
        assert doomed.stdout is not None
        job_id, delivery_id = map(int, doomed.stdout.readline().split())
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
        killed_at = time.time()
        # within the lease, nobody else takes its work
        assert work.requeue_expired() == 0 and work.claim_job() is None
        assert not work.due_deliveries(time.time()) and not work.claim_delivery(delivery_id)
        # after it, the job goes back to the queue and the delivery is free: another node takes both
        deadline = killed_at + lease + 10
        while work.requeue_expired() == 0:
            assert time.time() < deadline, "the dead node's job lease never expired"
            time.sleep(0.2)
        assert time.time() >= killed_at + lease - 1.0
        job = work.claim_job()
        assert job is not None and job.id == job_id and job.attempts == 2
        assert [d.id for d in work.due_deliveries(time.time())] == [delivery_id]
        assert work.claim_delivery(delivery_id)
        history = db.query("SELECT detail FROM transitions WHERE kind='job' AND key=? ORDER BY id", (str(job_id),))
        assert "lease of node doomed-node expired" in [h["detail"] for h in history]
    finally:
        if doomed.poll() is None:
            doomed.kill()
            doomed.wait()
    db.close()


def test_errors_name_the_database_without_its_password(postgres: PostgresServer) -> None:
    with pytest.raises(StorageError) as caught:
        PostgresStateDB(postgres.url(password="wrong-" + PASSWORD), connect_timeout_s=5)
    text = str(caught.value)
    assert "password authentication failed" in text and PASSWORD not in text and "***" in text
    with pytest.raises(StorageError, match="cannot reach") as caught:
        PostgresStateDB(f"postgresql://u:{PASSWORD}@127.0.0.1:1/x", connect_timeout_s=2)
    assert PASSWORD not in str(caught.value)


def test_a_restarted_server_is_reconnected(postgres: PostgresServer, url: str) -> None:
    db = PostgresStateDB(url)
    db.register_instance(_record(0))
    with psycopg.connect(postgres.url(), autocommit=True) as admin:  # end every session of that database
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname=%s AND pid <> "
                      "pg_backend_pid()", (url.rsplit("/", 1)[1],))
    with pytest.raises(StorageError):
        db.study(STUDY)
    assert db.study(STUDY) is not None and db.ping()  # the next call connects again
    assert db.register_instance(_record(1)) == "new" and db.is_stored("1.2.3.9.1")
    db.close()


def test_a_live_node_keeps_its_job_by_renewing_the_lease(url: str) -> None:
    db = PostgresStateDB(url)
    db.register_instance(_record(0))
    mine, other = WorkStore(db, "a", lease_seconds=2), WorkStore(db, "b", lease_seconds=2)
    mine.dispatch_study(STUDY, [("r", "p")])
    job = mine.claim_job()
    assert job is not None
    now = time.time()
    assert mine.renew_job_leases([job.id], now + 1.5) == 1  # held until now + 3.5
    assert other.renew_job_leases([job.id], now + 1.5) == 0  # not b's to renew
    assert other.requeue_expired(now + 3) == 0
    assert other.requeue_expired(now + 4) == 1
    assert mine.renew_job_leases([job.id]) == 0  # gone: a takes note, b may claim it
    assert other.claim_job() is not None
    assert other.requeue_interrupted("node stopped") == 1  # a stopping node gives its own back at once
    assert mine.claim_job() is not None
    db.close()


HOLD_STUDY_LOCK = """
import sys, time
from dicom_node.storage.postgres import PostgresStateDB
db = PostgresStateDB(sys.argv[1], lease_s=float(sys.argv[2]))
with db.transaction() as c:
    db.lock_key(c, sys.argv[3])
    print("locked", flush=True)
    time.sleep(600)
"""


def test_a_hung_node_holds_no_lock_longer_than_its_lease(url: str) -> None:
    """A node stopped (SIGSTOP: its connection stays open, as with a hung host) inside a
    transaction that locks a study: the server ends its session after the lease, and the
    other nodes' instances of that study go through."""
    db = PostgresStateDB(url, lease_s=30)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    hung = subprocess.Popen([sys.executable, "-c", HOLD_STUDY_LOCK, url, "2", STUDY], stdout=subprocess.PIPE,
                            text=True, env=env)
    try:
        assert hung.stdout is not None and hung.stdout.readline().strip() == "locked"
        hung.send_signal(signal.SIGSTOP)
        started = time.monotonic()
        assert db.register_instance(_record(0)) == "new"  # waits for the lock, then goes through
        waited = time.monotonic() - started
        assert 1.0 <= waited < 15, waited
    finally:
        hung.kill()
        hung.wait()
    db.close()
