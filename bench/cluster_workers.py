"""Analysis throughput of a cluster with 1, 2 and 4 Celery workers (``dicom-node worker``).

The analysis is a **stand-in for GPU time**: the test plugin (``tests.fake_plugins``) sleeps
a fixed time per job, then thresholds a small phantom and the worker encodes one SR. This
machine has 2 cores, so real models cannot show scaling here; a sleeping plugin shows how
well the dispatch (gateway -> Redis -> workers -> PostgreSQL -> delivery) keeps N workers
busy, not how fast a model runs.

One gateway (``dicom-node serve`` with ``cluster.broker``), a real PostgreSQL and a real
Redis (started here, as the tests start them), N workers of one process each. One study of
12 slices is sent once; ``--jobs`` routes match it, so it makes that many jobs at once.
Measured: from the first job's start to the last job's end (database times), jobs per
minute. Run from the repository root::

    .venv/bin/python -m bench.cluster_workers --jobs 24 --sleep 2 --workers 1 2 4
"""

from __future__ import annotations

import argparse
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import psycopg
import yaml

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.servers import PostgresServer, RedisServer
from tests.support import NodeProcess, StoreSCP, dense_phantom, free_port, node_config, storescu, wait_for
from tests.test_cluster_workers import WorkerProcess

log = logging.getLogger("bench.cluster_workers")


def _gateway(root: Path, database: str, broker: str, dest_port: int, jobs: int, sleep_s: float) -> NodeProcess:
    routes = [{"name": f"r{n:03d}", "match": {"Modality": "^CT$"}, "plugin": "sleepy", "stable_seconds": 1.0,
               "destinations": ["dest"], "outputs": ["sr"]} for n in range(jobs)]
    cfg = node_config(root / "gw" / "var", free_port(),
                      destinations={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest_port}},
                      routes=routes,
                      plugins={"sleepy": {"factory": "tests.fake_plugins:create",
                                          "options": {"threshold": 300, "delay": sleep_s}}},
                      cluster={"database": database, "spool": str(root / "cluster-spool"), "broker": broker,
                               "node_id": "gw", "lease_seconds": 30, "resend_seconds": 600})
    cfg["node"]["listener_processes"] = 1
    return NodeProcess(cfg, root / "gw")


def run_once(workers: int, jobs: int, sleep_s: float, postgres: PostgresServer) -> dict[str, Any]:
    """One round: a fresh database, broker, gateway and ``workers`` workers."""
    out = Path(__file__).resolve().parent / "out"
    out.mkdir(exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="cluster-", dir=out))  # removed after the round
    redis = RedisServer().start()
    dest = StoreSCP(free_port(), root / "received").start()
    database = postgres.new_database()
    gateway = _gateway(root, database, redis.url(), dest.port, jobs, sleep_s)
    procs: list[WorkerProcess] = []
    try:
        gateway.start()
        for n in range(workers):
            cfg = {**gateway.config, "node": {**gateway.config["node"], "storage_dir": str(root / f"w{n}" / "var")}}
            (root / f"w{n}").mkdir(parents=True)
            path = root / f"w{n}" / "config.yaml"
            path.write_text(yaml.safe_dump(cfg))
            procs.append(WorkerProcess(path, f"w{n}", root / f"w{n}"))
        for proc in procs:
            proc.start(timeout=300)
        study = write_ct_series(dense_phantom(12, size=64), root / "study", StudyIdentity(),
                                SeriesLayout(pixel_spacing_mm=(1.0, 1.0)))
        assert storescu(gateway.port, study).returncode == 0

        def finished() -> int:
            with psycopg.connect(database) as conn:
                return int(conn.execute("SELECT COUNT(*) FROM jobs WHERE state='done'").fetchone()[0])  # type: ignore[index]

        wait_for(lambda: finished() == jobs, 60 + jobs * sleep_s * 3, f"{jobs} jobs done", every=0.5)
        with psycopg.connect(database) as conn:
            first, last, runs = conn.execute(
                "SELECT MIN(started_at), MAX(finished_at), SUM(attempts) FROM jobs").fetchone()  # type: ignore[misc]
        seconds = float(last) - float(first)
        return {"workers": workers, "jobs": jobs, "sleep_s": sleep_s, "seconds": round(seconds, 1),
                "jobs_per_min": round(jobs * 60 / seconds, 1), "runs": int(runs),
                "ideal_jobs_per_min": round(60 * workers / sleep_s, 1)}
    finally:
        for proc in procs:
            proc.stop()
        gateway.stop()
        dest.stop()
        redis.stop()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    """Run the rounds and print one line per round (and JSON with ``--json``)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24)
    parser.add_argument("--sleep", type=float, default=2.0, help="seconds each job sleeps (the GPU stand-in)")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    postgres = PostgresServer().start()
    try:
        for n in args.workers:
            row = run_once(n, args.jobs, args.sleep, postgres)
            log.info("%d worker(s): %d jobs of %.1f s sleep in %.1f s = %.1f jobs/min (ideal %.1f), %d runs",
                     n, row["jobs"], row["sleep_s"], row["seconds"], row["jobs_per_min"],
                     row["ideal_jobs_per_min"], row["runs"])
    finally:
        postgres.stop()


if __name__ == "__main__":
    main()
