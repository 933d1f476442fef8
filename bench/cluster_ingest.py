"""Ingest through HAProxy with 1 and 2 ``dicom-node serve`` gateways on one PostgreSQL and one spool.

The gateways are cluster nodes (``cluster:`` section): one real PostgreSQL server (started
here, as the tests start it), one shared spool folder (standing in for the NFS mount),
no broker and no routes (nothing is analysed: only ingest is measured). Debian's
``haproxy`` runs the shipped example (``config/haproxy/haproxy.cfg``, its servers and port
replaced by loopback ones, as in ``tests/test_cluster_haproxy.py``) in front of them.

Each run sends the cached series of ``--slices`` uncompressed 512x512 CT slices (about
0.5 MB each, ``bench.common.ct_series``) with ``--associations`` concurrent dcmtk
``storescu`` processes, each a contiguous share of the series (one study), and measures
images/s from the first start to the last finish. Setups, each with a fresh database,
spool and gateways:

- ``direct-1``: one gateway, no HAProxy (what HAProxy costs);
- ``haproxy-1``: one gateway behind HAProxy;
- ``haproxy-2``: two gateways behind HAProxy (``balance leastconn`` spreads the associations).

Every run is validated: every storescu exits 0 with one Success per file, the database
holds every instance once, and the per-node ingest counts of the cluster view
(``node_ingest``) add up to the files sent; they give the split between gateways. The
median over ``--rounds`` is printed as a markdown table and all runs are written to
``bench/out/cluster_ingest.json``. Run from the repository root::

    nice -n 10 .venv/bin/python -m bench.cluster_ingest --slices 300 --associations 4 --rounds 3
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import statistics
from pathlib import Path
from typing import Any

import psycopg

from bench.common import OUT, BenchError, ct_series, run_dir, send, validate
from tests.servers import HAProxyServer, PostgresServer
from tests.support import NodeProcess, free_port, node_config, wait_for

log = logging.getLogger("bench.cluster_ingest")

SETUPS = {"direct-1": (1, False), "haproxy-1": (1, True), "haproxy-2": (2, True)}


def _gateway(root: Path, name: str, database: str, listeners: int) -> NodeProcess:
    """A cluster gateway without routes (only ingest), retention off so the files stay."""
    cfg = node_config(root / name / "var", free_port(), retention={"ignored_days": None},
                      cluster={"database": database, "spool": str(root / "cluster-spool"), "node_id": name})
    cfg["node"]["listener_processes"] = listeners
    return NodeProcess(cfg, root / name)


def _stored(database: str) -> tuple[int, dict[str, int]]:
    """Instances in the database, and instances registered per ingest node."""
    with psycopg.connect(database) as conn:
        row = conn.execute("SELECT COUNT(*) FROM instances WHERE purged=0").fetchone()
        per_node = conn.execute("SELECT node_id, instances FROM node_ingest ORDER BY node_id").fetchall()
    return int(row[0]) if row else 0, {str(n): int(c) for n, c in per_node}


def one_run(setup: str, files: list[Path], associations: int, listeners: int,
            postgres: PostgresServer) -> dict[str, Any]:
    """Fresh database, spool and gateways (and HAProxy): send, validate, stop."""
    gateways_n, proxied = SETUPS[setup]
    root = run_dir(f"cluster-{setup}")
    database = postgres.new_database()
    gateways = [_gateway(root, f"gw-{chr(ord('a') + k)}", database, listeners) for k in range(gateways_n)]
    proxy: HAProxyServer | None = None
    try:
        for gw in gateways:
            gw.start(timeout=120)
        port = gateways[0].port
        if proxied:
            proxy = HAProxyServer({str(gw.config["cluster"]["node_id"]): (gw.port, int(gw.config["http"]["port"]))
                                   for gw in gateways})
            proxy.start()
            wait_for(lambda: set(proxy.server_states().values()) == {"UP"}, 60, "the gateways UP in haproxy")
            port = proxy.port
        result = send(files, port, "DICOMNODE", associations, root)
        stored, per_node = _stored(database)
        validate(result, len(files), stored, f"{setup} ({gateways_n} gateway(s))")
        if sum(per_node.values()) != len(files):
            raise BenchError(f"per-node ingest counts {per_node} do not add up to {len(files)}")
    finally:
        if proxy is not None:
            proxy.stop()
        for gw in gateways:
            gw.stop()
        shutil.rmtree(root, ignore_errors=True)
    size = sum(p.stat().st_size for p in files)
    return {"setup": setup, "gateways": gateways_n, "haproxy": proxied, "associations": associations,
            "listener_processes": listeners, "images": len(files), "seconds": round(result.seconds, 2),
            "images_per_s": round(len(files) / result.seconds, 1),
            "mb_per_s": round(size / 1e6 / result.seconds, 1), "per_node": per_node}


def markdown(runs: list[dict[str, Any]], setups: list[str]) -> str:
    """The median per setup, as a markdown table."""
    lines = ["| setup | gateways | associations | images/s (median) | MB/s | runs (images/s) | split per node (last run) |",
             "|---|---|---|---|---|---|---|"]
    for setup in setups:
        rows = [r for r in runs if r["setup"] == setup]
        if not rows:
            continue
        rates = [r["images_per_s"] for r in rows]
        split = ", ".join(f"{k} {v}" for k, v in rows[-1]["per_node"].items())
        lines.append(f"| {setup} | {rows[0]['gateways']} | {rows[0]['associations']} | "
                     f"{statistics.median(rates):.0f} | {statistics.median(r['mb_per_s'] for r in rows):.0f} | "
                     f"{', '.join(f'{x:.0f}' for x in rates)} | {split} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the setups in turn, ``--rounds`` times; print the table, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--associations", type=int, default=4, help="concurrent storescu processes")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--listener-processes", type=int, default=1,
                        help="acceptor processes per gateway (node.listener_processes)")
    parser.add_argument("--setups", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    files = ct_series(args.slices)
    postgres = PostgresServer().start()
    runs: list[dict[str, Any]] = []
    started = dt.datetime.now(dt.timezone.utc)
    try:
        for round_no in range(args.rounds):
            for setup in args.setups:  # setups take turns within each round
                row = one_run(setup, files, args.associations, args.listener_processes, postgres)
                row["round"] = round_no
                runs.append(row)
                log.info("round %d %s: %d images in %.2f s = %.1f images/s, per node %s", round_no, setup,
                         row["images"], row["seconds"], row["images_per_s"], row["per_node"])
    finally:
        postgres.stop()
    table = markdown(runs, args.setups)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "cluster_ingest.json").write_text(json.dumps(
        {"started": started.isoformat(timespec="seconds"), "host": platform.node(), "cpus": os.cpu_count(),
         "load_before_end": os.getloadavg(), "args": vars(args), "runs": runs}, indent=2))
    log.info("%s", table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
