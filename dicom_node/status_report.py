"""``dicom-node status``: studies, jobs and deliveries with states and times."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
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


def collect(db: StateDB, limit: int = 50) -> dict[str, Any]:
    """Everything ``status`` shows, as plain data (``--json``)."""
    studies = db.query(
        """SELECT study_uid, state, revision, instance_count, first_received_at, last_received_at,
                  reason, purged_at FROM studies ORDER BY updated_at DESC LIMIT ?""", (limit,))
    jobs = db.query(
        """SELECT id, study_uid, route, plugin, revision, state, attempts, reason, timings,
                  created_at, started_at, finished_at FROM jobs ORDER BY id DESC LIMIT ?""", (limit,))
    for job in jobs:
        job["timings"] = json.loads(job["timings"]) if job["timings"] else {}
    deliveries = db.query(
        """SELECT d.id, d.job_id, j.study_uid, d.destination, d.state, d.attempts, d.next_attempt_at,
                  d.last_error, d.created_at, d.updated_at FROM deliveries d
           JOIN jobs j ON j.id = d.job_id ORDER BY d.id DESC LIMIT ?""", (limit,))
    return {"counts": db.counts(), "studies": studies, "jobs": jobs, "deliveries": deliveries}


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths))
    body = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join([line, "  ".join("-" * w for w in widths), *body]) if rows else line + "\n(none)"


def _node_line(node: dict[str, Any] | None) -> str:
    if not node or node.get("running") is None:
        return "node: " + (node or {}).get("detail", "unknown")
    if not node["running"]:
        return f"node: NOT RUNNING ({node['detail']})"
    failing = [k for k, ok in node.get("checks", {}).items() if not ok]
    state = "ready" if node.get("ready") else "NOT READY: " + ", ".join(failing)
    workers = f"; analysis workers {node['analysis_workers']}" if node.get("analysis_workers") else ""
    return (f"node: running, {state}; free disk {node.get('free_disk_mb')} MiB, "
            f"{node.get('jobs_running')} jobs running{workers}")


def render(data: dict[str, Any]) -> str:
    """Human-readable tables."""
    counts = data["counts"]
    summary = "  ".join(
        f"{kind}: " + (", ".join(f"{n} {s}" for s, n in sorted(c.items())) or "none")
        for kind, c in counts.items()
    )
    studies = [[s["study_uid"], s["state"], str(s["revision"]), str(s["instance_count"]),
                _when(s["last_received_at"]), s["reason"] or ""] for s in data["studies"]]
    jobs = [[str(j["id"]), j["study_uid"], j["route"], j["state"], str(j["attempts"]),
             _when(j["finished_at"] or j["started_at"] or j["created_at"]),
             " ".join(f"{k}={v:.1f}s" for k, v in j["timings"].items()), j["reason"] or ""]
            for j in data["jobs"]]
    deliveries = [[str(d["id"]), str(d["job_id"]), d["destination"], d["state"], str(d["attempts"]),
                   _when(d["next_attempt_at"]) if d["state"] == "pending" else _when(d["updated_at"]),
                   d["last_error"] or ""] for d in data["deliveries"]]
    return "\n\n".join([
        _node_line(data.get("node")) + "\n" + summary,
        "STUDIES\n" + _table(["study", "state", "rev", "instances", "last received", "reason"], studies),
        "JOBS\n" + _table(["id", "study", "route", "state", "tries", "time", "stages", "reason"], jobs),
        "DELIVERIES\n" + _table(["id", "job", "destination", "state", "tries", "next/last", "last error"],
                                deliveries),
    ])
