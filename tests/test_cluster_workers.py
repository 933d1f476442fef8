"""Analysis through Celery: a ``dicom-node serve`` gateway and ``dicom-node worker``
processes on a real PostgreSQL server and a real Redis broker (both started by the tests),
one shared spool folder, dcmtk's storescu as the PACS and storescp as the destination.

- two workers, one killed with ``kill -9`` (with its processes) in the middle of a job:
  the job completes on the other, one result series of each kind, delivered once;
- the broker restarted (without persistence: its queued messages are lost) while 20 jobs
  are queued: all 20 complete, none run twice.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
import yaml
from pydicom import dcmread

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.servers import PASSWORD, PostgresServer, RedisServer
from tests.support import (
    FAKE_PLUGIN,
    REPO,
    NodeProcess,
    StoreSCP,
    dense_phantom,
    dense_route,
    descendants,
    free_port,
    node_config,
    storescu,
    wait_for,
)

PATIENT = StudyIdentity(patient_name="CELERY^SECRET", patient_id="MRN-CELERY-SECRET")
LEASE_S = 4.0


@dataclass
class WorkerProcess:
    """``dicom-node worker`` in a subprocess, as on a GPU host."""

    config_path: Path
    name: str
    workdir: Path
    concurrency: int = 1
    plugins: str | None = None
    metrics_port: int | None = None
    proc: subprocess.Popen[bytes] | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.workdir / f"{self.name}.log"

    def start(self, timeout: float = 120.0) -> "WorkerProcess":
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "dicom_node", "worker", "--config", str(self.config_path), "--name",
                 self.name, "--concurrency", str(self.concurrency),
                 *(["--plugins", self.plugins] if self.plugins else []),
                 *(["--metrics-port", str(self.metrics_port)] if self.metrics_port else [])],
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        wait_for(lambda: self.log().count("warmed up") >= self.concurrency or self._exited(), timeout,
                 f"worker {self.name} warmed up")
        assert self.proc.poll() is None, f"worker {self.name} exited:\n{self.log()}"
        return self

    def _exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill_host(self) -> None:
        """``kill -9`` the worker and every process below it, as when its host dies."""
        assert self.proc is not None
        below = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        for pid in below:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        below = descendants(self.proc.pid)
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.kill_host()
            raise AssertionError(f"worker {self.name} did not stop on SIGTERM") from None
        for pid in below:  # a worker process the warm shutdown left behind
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _gateway(tmp_path: Path, database: str, broker: str, dest_port: int, delay: float,
             routes: list[dict[str, Any]] | None = None, resend_s: float = 60.0) -> NodeProcess:
    plugins: dict[str, Any] = {"dense": {**FAKE_PLUGIN["dense"], "options": {"threshold": 300, "delay": delay}}}
    cfg = node_config(tmp_path / "gw" / "var", free_port(),
                      destinations={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}},
                      routes=routes or dense_route(["dest"]), plugins=plugins,
                      cluster={"database": database, "spool": str(tmp_path / "cluster-spool"), "broker": broker,
                               "node_id": "gw", "lease_seconds": LEASE_S, "resend_seconds": resend_s})
    cfg["node"]["listener_processes"] = 1
    return NodeProcess(cfg, tmp_path / "gw")


def _workers(tmp_path: Path, gateway: NodeProcess, names: list[str],
             plugins: list[str | None] | None = None) -> list[WorkerProcess]:
    """Workers with the gateway's configuration (their own storage folder, as on other hosts)."""
    workers = []
    for name in names:
        cfg = {**gateway.config, "node": {**gateway.config["node"], "storage_dir": str(tmp_path / name / "var")}}
        (tmp_path / name).mkdir(parents=True, exist_ok=True)
        path = tmp_path / name / "config.yaml"
        path.write_text(yaml.safe_dump(cfg))
        workers.append(WorkerProcess(path, name, tmp_path / name,
                                     plugins=plugins[len(workers)] if plugins else None))
    return workers


def _done(status: dict[str, Any]) -> bool:
    return any(s["state"] in ("done", "failed") for s in status["studies"])


def _received_by_modality(dest: StoreSCP) -> dict[str, int]:
    counts: dict[str, int] = {}
    for path in dest.files():
        modality = str(dcmread(path, stop_before_pixels=True).Modality)
        counts[modality] = counts.get(modality, 0) + 1
    return counts


def _query(database: str, sql: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(database) as conn:
        return conn.execute(sql).fetchall()  # type: ignore[arg-type]


@dataclass
class KilledMidJob:
    """What :func:`kill_the_busy_worker` leaves for a test's own checks."""

    gateway: NodeProcess
    doomed: WorkerProcess
    survivor: WorkerProcess


@contextmanager
def kill_the_busy_worker(tmp_path: Path, database: str, broker_url: str, dest: StoreSCP, patient: StudyIdentity,
                         metrics: bool = False) -> Iterator[KilledMidJob]:
    """The scenario of both brokers: a gateway and two workers, one study; the worker
    running its job is killed with ``kill -9`` (with its processes). Checked here: the
    job is done on the other worker (try 2), delivered once, one result series of each
    kind, the job's history, and no PHI or password in the logs. Yields for the caller's own checks, then stops them all."""
    study = write_ct_series(dense_phantom(24, size=96), tmp_path / "study", patient,
                            SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    gateway = _gateway(tmp_path, database, broker_url, dest.port, delay=6.0)
    workers: list[WorkerProcess] = []
    try:
        gateway.start()
        workers = _workers(tmp_path, gateway, ["w-a", "w-b"])
        for worker in workers:
            if metrics:
                worker.metrics_port = free_port()  # each worker's own /metrics
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
        # one result series of each kind recorded, all of them the survivor's run
        assert sorted(_query(database, "SELECT kind, COUNT(DISTINCT series_uid) FROM results GROUP BY kind")) == [
            ("KOS", 1), ("SC", 1), ("SEG", 1), ("SR", 1)]
        history = [r[0] for r in _query(database, "SELECT detail FROM transitions WHERE kind='job' ORDER BY id")]
        assert history == ["route dense-ct", f"worker {doomed.name}", f"lease of node {doomed.name} expired",
                           f"worker {survivor.name}", "6 result objects"]
        for text in (gateway.log(), survivor.log()):
            assert str(patient.patient_id) not in text and PASSWORD not in text
        yield KilledMidJob(gateway, doomed, survivor)
    finally:
        for worker in workers:
            if worker.proc is not None and worker.proc.poll() is None:
                worker.kill_host()
        gateway.stop()


def test_a_worker_killed_mid_job_leaves_it_to_the_other_worker(
        tmp_path: Path, postgres: PostgresServer, redis: RedisServer, dest: StoreSCP) -> None:
    with kill_the_busy_worker(tmp_path, postgres.new_database(), redis.url(), dest, PATIENT,
                              metrics=True) as run:
        with urllib.request.urlopen(f"http://127.0.0.1:{run.survivor.metrics_port}/metrics", timeout=10) as rsp:
            metrics = rsp.read().decode()
        assert f'dicomnode_worker_jobs{{state="done",worker="{run.survivor.name}"}} 1.0' in metrics, metrics
        assert "dicomnode_worker_database_up 1.0" in metrics
        for text in (run.gateway.log(), run.survivor.log()):
            assert "SECRET" not in text and redis.password not in text


def test_a_broker_restart_during_a_queue_of_20_jobs_loses_none_and_runs_none_twice(
        tmp_path: Path, postgres: PostgresServer, redis: RedisServer, dest: StoreSCP) -> None:
    database = postgres.new_database()
    study = write_ct_series(dense_phantom(12, size=64), tmp_path / "study", PATIENT,
                            SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    routes = [{"name": f"r{n:02d}", "match": {"Modality": "^CT$"}, "plugin": "dense", "stable_seconds": 1.0,
               "destinations": ["dest"], "outputs": ["sr"]} for n in range(20)]
    gateway = _gateway(tmp_path, database, redis.url(), dest.port, delay=0.5, routes=routes, resend_s=3.0)
    workers: list[WorkerProcess] = []
    try:
        gateway.start()
        workers = _workers(tmp_path, gateway, ["w-a", "w-b"])
        workers[0].concurrency = 2  # two processes: each its own lease owner, w-a.<slot>
        for worker in workers:
            worker.start()
        assert storescu(gateway.port, study).returncode == 0

        def finished() -> int:
            return int(_query(database, "SELECT COUNT(*) FROM jobs WHERE state='done'")[0][0])

        wait_for(lambda: finished() >= 3, 120, "3 jobs done")
        assert finished() < 15, "the queue ran out before the broker restart"
        redis.stop()
        time.sleep(1.0)
        redis.start()
        status = gateway.wait_for(_done, timeout=180, what="all 20 jobs done")
        jobs = status["jobs"]
        assert len(jobs) == 20 and {j["state"] for j in jobs} == {"done"}, jobs
        assert {j["attempts"] for j in jobs} == {1}, "a job ran twice"
        runs = _query(database, "SELECT key, COUNT(*) FROM transitions WHERE kind='job' AND to_state='running' "
                                "GROUP BY key")
        assert len(runs) == 20 and {n for _, n in runs} == {1}
        assert len(status["deliveries"]) == 20 and {d["state"] for d in status["deliveries"]} == {"done"}
        assert _received_by_modality(dest) == {"SR": 20}
        assert all(re.fullmatch(r"w-a\.\d+|w-b", j["node"]) for j in jobs), [j["node"] for j in jobs]
        assert "broker" in gateway.log() and redis.password not in gateway.log()
        # the cluster view: per-plugin queue and per-worker jobs, in status and /metrics
        view = status["cluster"]
        assert view["queues"] == [] and sum(r["n"] for r in view["workers"] if r["state"] == "done") == 20
        assert {r["worker"] for r in view["workers"]} == {j["node"] for j in jobs}
        text = gateway.cli("status", "--config", str(gateway.config_path)).stdout
        assert "CLUSTER QUEUES" in text and "CLUSTER WORKERS" in text
        with urllib.request.urlopen(f"http://127.0.0.1:{gateway.config['http']['port']}/metrics", timeout=10) as rsp:
            metrics = rsp.read().decode()
        done = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                if line.startswith("dicomnode_cluster_worker_jobs{") and 'state="done"' in line]
        assert sum(done) == 20, metrics
    finally:
        for worker in workers:
            worker.stop()
        gateway.stop()


def test_a_job_that_keeps_killing_workers_and_one_over_its_time_limit_fail_with_their_reasons(
        tmp_path: Path, postgres: PostgresServer, redis: RedisServer, dest: StoreSCP) -> None:
    """Two plugins, each on its own queue and worker: one kills its worker process at
    every run (failed after cluster.max_attempts runs), one runs past its
    time_limit_seconds (stopped and failed at once)."""
    database = postgres.new_database()
    study = write_ct_series(dense_phantom(12, size=64), tmp_path / "study", PATIENT,
                            SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
    routes = [{"name": name, "match": {"Modality": "^CT$"}, "plugin": name, "stable_seconds": 1.0,
               "destinations": ["dest"]} for name in ("crashy", "slow")]
    gateway = _gateway(tmp_path, database, redis.url(), dest.port, delay=0.0, routes=routes, resend_s=3.0)
    gateway.config["plugins"] = {
        "crashy": {"factory": FAKE_PLUGIN["dense"]["factory"], "options": {"crash": True}},
        "slow": {"factory": FAKE_PLUGIN["dense"]["factory"], "options": {"delay": 60}, "time_limit_seconds": 2},
    }
    gateway.config["cluster"]["max_attempts"] = 2
    workers: list[WorkerProcess] = []
    try:
        gateway.start()
        workers = _workers(tmp_path, gateway, ["w-crashy", "w-slow"], plugins=["crashy", "slow"])
        for worker in workers:
            worker.start()
        assert storescu(gateway.port, study).returncode == 0
        status = gateway.wait_for(_done, timeout=120, what="the study failed")
        jobs = {j["route"]: j for j in status["jobs"]}
        assert jobs["crashy"]["state"] == "failed" and jobs["crashy"]["attempts"] == 2
        assert "its 2 runs ended without a result" in jobs["crashy"]["reason"]
        assert jobs["slow"]["state"] == "failed" and jobs["slow"]["attempts"] == 1
        assert jobs["slow"]["node"] == "w-slow"
        assert "over the plugin's time limit of 2 s" in jobs["slow"]["reason"]
        [study_row] = status["studies"]
        assert study_row["state"] == "failed" and "time limit" in study_row["reason"]
        assert status["deliveries"] == [] and dest.files() == []
        text = gateway.cli("status", "--config", str(gateway.config_path)).stdout
        assert "its 2 runs ended without a result" in text
    finally:
        for worker in workers:
            worker.stop()
        gateway.stop()


def test_a_worker_refuses_to_start_without_a_broker_an_unknown_plugin_or_one_that_cannot_load(tmp_path: Path) -> None:
    """Checked before any broker or database connection: each refusal is one line."""
    cluster = {"database": "postgresql://u:pw-secret@127.0.0.1:1/x", "spool": str(tmp_path / "cluster-spool")}
    cfg = node_config(tmp_path / "var", free_port(), routes=dense_route([]), cluster=cluster,
                      plugins={"dense": {"factory": "tests.fake_plugins:no_such_factory"}})
    path = tmp_path / "config.yaml"

    def worker(config: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
        path.write_text(yaml.safe_dump(config))
        return subprocess.run([sys.executable, "-m", "dicom_node", "worker", "--config", str(path), *extra],
                              capture_output=True, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
                              timeout=120, check=False)

    out = worker(cfg)
    assert out.returncode == 2 and "needs cluster.broker" in out.stderr, out.stderr
    cfg["cluster"]["broker"] = f"redis://:pw-secret@127.0.0.1:{free_port()}/0"
    out = worker(cfg, "--plugins", "dense,other")
    assert out.returncode == 2 and "--plugins: other not routed or configured" in out.stderr, out.stderr
    out = worker(cfg)
    assert out.returncode == 3 and "no_such_factory" in out.stderr, out.stderr
    assert "pw-secret" not in out.stderr + out.stdout
