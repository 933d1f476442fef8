"""``dicom-node status``: studies, jobs and deliveries with states and times."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from dicom_node.config import Config
from dicom_node.storage.state import StateDB


def probe_health(config: Config) -> dict[str, Any]:
    """Ask a running node's health endpoint; says 'not running' when nobody answers."""
    http = config.http
    if not http.enabled or http.port == 0:
        return {"running": None, "detail": "health endpoint not configured"}
    host = "127.0.0.1" if http.host in ("0.0.0.0", "") else http.host
    try:
        with urllib.request.urlopen(f"http://{host}:{http.port}/health", timeout=2) as rsp:
            return {"running": True, **json.loads(rsp.read())}
    except urllib.error.HTTPError as err:
        return {"running": True, **json.loads(err.read() or b"{}")}
    except (OSError, ValueError):
        return {"running": False, "detail": f"no answer on {host}:{http.port}"}


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


@dataclass(frozen=True)
class StatusFilter:
    """What ``status`` narrows to: an accession number, a state, a time (epoch seconds)."""

    accession: str | None = None
    state: str | None = None
    since: float | None = None


def _where(clauses: list[tuple[str, object]]) -> tuple[str, tuple[object, ...]]:
    used = [(sql, value) for sql, value in clauses if value is not None]
    return (" WHERE " + " AND ".join(sql for sql, _ in used) if used else "", tuple(v for _, v in used))


def collect(db: StateDB, limit: int = 50, only: StatusFilter = StatusFilter()) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (``--json``), narrowed by ``only``:
    studies by accession number, state and last change; jobs and deliveries of those
    accession numbers by their own state and time; the result objects of the jobs shown."""
    of_accession = "study_uid IN (SELECT study_uid FROM studies WHERE accession_number=?)"
    where, params = _where([("accession_number=?", only.accession), ("state=?", only.state),
                            ("updated_at>=?", only.since)])
    studies = db.query(
        f"""SELECT study_uid, accession_number, state, revision, instance_count, first_received_at,
                  last_received_at, reason, purged_at FROM studies{where} ORDER BY updated_at DESC LIMIT ?""",
        (*params, limit))
    where, params = _where([(of_accession, only.accession), ("state=?", only.state),
                            ("COALESCE(finished_at, started_at, created_at)>=?", only.since)])
    node = ", lease_owner AS node" if db.clustered else ""  # in a cluster: the node that ran it (last)
    jobs = db.query(
        f"""SELECT id, study_uid, route, plugin, revision, state, attempts, reason, timings,
                  created_at, started_at, finished_at{node} FROM jobs{where} ORDER BY id DESC LIMIT ?""",
        (*params, limit))
    for job in jobs:
        job["timings"] = json.loads(job["timings"]) if job["timings"] else {}
    where, params = _where([("j." + of_accession, only.accession), ("d.state=?", only.state),
                            ("d.updated_at>=?", only.since)])
    deliveries = db.query(
        f"""SELECT d.id, d.job_id, j.study_uid, d.destination, d.state, d.attempts, d.next_attempt_at,
                  d.last_error, d.created_at, d.updated_at{node.replace("lease", "d.lease")} FROM deliveries d
           JOIN jobs j ON j.id = d.job_id{where} ORDER BY d.id DESC LIMIT ?""", (*params, limit))
    shown = [job["id"] for job in jobs]
    results = db.query(
        f"""SELECT job_id, kind, series_uid, sop_instance_uid, sop_class_uid FROM results
            WHERE job_id IN ({",".join("?" * len(shown))}) ORDER BY job_id DESC, kind""",
        tuple(shown)) if shown else []
    data = {"counts": db.counts(), "studies": studies, "jobs": jobs, "deliveries": deliveries,
            "results": results}
    if db.clustered:
        data["cluster"] = db.cluster_view()
    return data


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body]) if rows else line + "\n(none)"


def _node_line(node: dict[str, Any] | None) -> str:
    if not node or node.get("running") is None:
        return "node: " + str((node or {}).get("detail", "unknown"))
    if not node["running"]:
        return f"node: NOT RUNNING ({node['detail']})"
    failing = [k for k, ok in node.get("checks", {}).items() if not ok]
    state = "ready" if node.get("ready") else "NOT READY: " + ", ".join(failing)
    workers = f"; analysis workers {node['analysis_workers']}" if node.get("analysis_workers") else ""
    return (f"node: running, {state}; free disk {node.get('free_disk_mb')} MiB, "
            f"{node.get('jobs_running')} jobs running{workers}")


def _cluster_section(view: dict[str, list[dict[str, Any]]]) -> str:
    """Per-node ingest, per-plugin queues and per-node/worker jobs (a cluster only)."""
    def pivot(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for r in rows:
            out.setdefault(str(r[key]), {})[str(r["state"])] = int(r["n"])
        return out

    queues = [[plugin, str(c.get("queued", 0)), str(c.get("running", 0))]
              for plugin, c in pivot(view["queues"], "plugin").items()]
    workers = [[name, str(c.get("running", 0)), str(c.get("done", 0)), str(c.get("failed", 0))]
               for name, c in pivot(view["workers"], "worker").items()]
    ingest = [[str(r["node"]), str(r["instances"]), f"{int(r['bytes']) / 2**20:.1f}",
               _when(r["first_received_at"]), _when(r["last_received_at"])] for r in view.get("ingest", [])]
    return ("CLUSTER INGEST (instances registered per ingest node, since the database was created)\n"
            + _table(["node", "instances", "MiB", "first received", "last received"], ingest) + "\n\n"
            "CLUSTER QUEUES (jobs per plugin)\n" + _table(["plugin", "queued", "running"], queues) + "\n\n"
            "CLUSTER WORKERS (jobs by the node or worker that ran them last)\n"
            + _table(["node/worker", "running", "done", "failed"], workers))


def render(data: dict[str, Any]) -> str:
    """Human-readable tables."""
    counts = data["counts"]
    summary = "  ".join(
        f"{kind}: " + (", ".join(f"{n} {s}" for s, n in sorted(c.items())) or "none")
        for kind, c in counts.items()
    )
    studies = [[s["study_uid"], s["accession_number"] or "-", s["state"], str(s["revision"]),
                str(s["instance_count"]), _when(s["last_received_at"]), s["reason"] or ""]
               for s in data["studies"]]
    jobs = [[str(j["id"]), j["study_uid"], j["route"], j["state"], str(j["attempts"]),
             _when(j["finished_at"] or j["started_at"] or j["created_at"]),
             " ".join(f"{k}={v:.1f}s" for k, v in j["timings"].items()), j["reason"] or ""]
            for j in data["jobs"]]
    deliveries = [[str(d["id"]), str(d["job_id"]), d["destination"], d["state"], str(d["attempts"]),
                   _when(d["next_attempt_at"]) if d["state"] == "pending" else _when(d["updated_at"]),
                   d["last_error"] or ""] for d in data["deliveries"]]
    job_headers = ["id", "study", "route", "state", "tries", "time", "stages", "reason"]
    delivery_headers = ["id", "job", "destination", "state", "tries", "next/last", "last error"]
    if any("node" in row for row in (*data["jobs"], *data["deliveries"])):  # a cluster: which node
        job_headers.insert(4, "node")
        delivery_headers.insert(4, "node")
        for row, job in zip(jobs, data["jobs"]):
            row.insert(4, job.get("node") or "-")
        for row, delivery in zip(deliveries, data["deliveries"]):
            row.insert(4, delivery.get("node") or "-")
    cluster = [_cluster_section(data["cluster"])] if data.get("cluster") else []
    return "\n\n".join([
        _node_line(data.get("node")) + "\n" + summary, *cluster,
        "STUDIES\n" + _table(["study", "accession", "state", "rev", "instances", "last received", "reason"],
                             studies),
        "JOBS\n" + _table(job_headers, jobs),
        "DELIVERIES\n" + _table(delivery_headers, deliveries),
        "RESULTS\n" + _table(["job", "kind", "series", "SOP instance"],
                             [[str(r["job_id"]), r["kind"], r["series_uid"], r["sop_instance_uid"]]
                              for r in data.get("results", [])]),
    ])
