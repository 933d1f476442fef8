"""A crashing analysis worker costs only its own job: with two analyses in flight, the
other one is given back to the queue (not failed, no attempt counted) and the node
rebuilds its pool and finishes it.

The node runs as an admin runs it (`dicom-node serve`), dcmtk sends and receives.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any


from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from tests.support import NodeProcess, StoreSCP, dense_phantom, free_port, node_config, storescu

# The slow analysis outlives the crash by far, so it is in flight when the other worker dies.
PLUGINS = {"slow": {"factory": "tests.fake_plugins:create", "options": {"delay": 12}},
           "crashing": {"factory": "tests.fake_plugins:create", "options": {"delay": 3, "crash": True}}}


def _routes(destinations: list[str]) -> list[dict[str, Any]]:
    return [{"name": name, "match": {"SeriesDescription": f"^{name.upper()}$"}, "plugin": name,
             "stable_seconds": 1, "destinations": destinations} for name in PLUGINS]


def _study(tmp_path: Path, description: str) -> list[Path]:
    layout = SeriesLayout(pixel_spacing_mm=(1.0, 1.0), series_description=description)
    return write_ct_series(dense_phantom(20), tmp_path / description, StudyIdentity(), layout)


def _job(status: dict[str, Any], route: str) -> dict[str, Any]:
    return next(j for j in status["jobs"] if j["route"] == route)


def test_a_worker_crash_requeues_the_other_job_in_flight(tmp_path: Path, dest: StoreSCP) -> None:
    cfg = node_config(tmp_path / "var", free_port(), plugins=PLUGINS, routes=_routes(["dest"]),
                      destinations={"dest": {"ae_title": "DEST", "host": "127.0.0.1", "port": dest.port}},
                      jobs={"max_concurrent_analyses": 2})
    node = NodeProcess(cfg, tmp_path / "node").start()
    try:
        assert storescu(node.port, _study(tmp_path, "SLOW")).returncode == 0
        assert storescu(node.port, _study(tmp_path, "CRASHING")).returncode == 0
        node.wait_for(lambda s: len(s["jobs"]) == 2 and all(j["state"] == "running" for j in s["jobs"]),
                      what="both analyses in flight")
        status = node.wait_for(lambda s: {j["state"] for j in s["jobs"]} == {"done", "failed"}
                               and all(d["state"] == "done" for d in s["deliveries"]),
                               timeout=180, what="one job done and delivered, the crashing one failed")
        crashed, slow = _job(status, "crashing"), _job(status, "slow")
        assert crashed["state"] == "failed" and "worker process died" in crashed["reason"]
        assert slow["state"] == "done" and slow["attempts"] == 1, slow
        assert [d["job_id"] for d in status["deliveries"]] == [slow["id"]]
        assert dest.files()
    finally:
        node.stop()
    with sqlite3.connect(tmp_path / "var" / "state.sqlite3") as db:
        requeued = db.execute("SELECT detail FROM transitions WHERE kind='job' AND key=? AND to_state='queued'"
                              " AND from_state='running'", (str(slow["id"]),)).fetchall()
    assert len(requeued) == 1 and "another analysis" in requeued[0][0], requeued
