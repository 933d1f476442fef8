"""Prometheus metrics of the node (its own registry, so tests can run several nodes)."""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Counters and histograms updated by the listener, the jobs and the deliveries."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._listener_seen: dict[str, int] = {}
        self._scrape_lock = threading.Lock()  # scrapes may come from several HTTP threads at once
        self.disk_refused_at = 0.0  # unix time of the latest C-STORE refused for the disk reserve
        self.associations = Counter(
            "dicomnode_associations_total", "Associations by outcome", ["outcome"], registry=self.registry
        )
        self.instances = Counter(
            "dicomnode_instances_received_total", "C-STORE requests by result", ["result"],
            registry=self.registry,
        )
        self.bytes = Counter("dicomnode_bytes_received_total", "Bytes stored", registry=self.registry)
        self.deliveries = Counter(
            "dicomnode_deliveries_total", "Delivery attempts by outcome", ["outcome"], registry=self.registry
        )
        self.stage_seconds = Histogram(
            "dicomnode_job_stage_seconds", "Analysis stage durations", ["stage"], registry=self.registry,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 60, 120, 300),
        )

        self.states = Gauge(
            "dicomnode_items", "Studies, jobs and deliveries by state", ["kind", "state"],
            registry=self.registry,
        )
        self.cluster_ingest = Gauge(
            "dicomnode_cluster_ingest_instances", "A cluster's instances registered per ingest node "
            "(cumulative, from the shared database)", ["node"], registry=self.registry,
        )
        self.cluster_ingest_bytes = Gauge(
            "dicomnode_cluster_ingest_bytes", "A cluster's bytes registered per ingest node "
            "(cumulative, from the shared database)", ["node"], registry=self.registry,
        )
        self.cluster_queue = Gauge(
            "dicomnode_cluster_queue_jobs", "A cluster's jobs queued or running, per plugin queue",
            ["plugin", "state"], registry=self.registry,
        )
        self.cluster_worker = Gauge(
            "dicomnode_cluster_worker_jobs", "A cluster's jobs per node or worker that ran them last, by state",
            ["worker", "state"], registry=self.registry,
        )
        self.queue_depth = Gauge(
            "dicomnode_queue_depth", "Jobs queued or running plus deliveries pending", registry=self.registry
        )

    def add_listener_totals(self, totals: dict[str, int]) -> None:
        """Count what acceptor processes counted (cumulative totals from the board).

        Only the increase since the last call is added, so calling it at every scrape
        is right, from any number of threads at once; the totals never go down (a
        restarted acceptor keeps its row).
        """
        with self._scrape_lock:
            seen = self._listener_seen
            for name, total in totals.items():
                delta = total - seen.get(name, 0)
                if delta <= 0:
                    continue
                kind, _, label = name.partition(":")
                if kind == "association":
                    self.associations.labels(label).inc(delta)
                elif kind == "instance":
                    self.instances.labels(label).inc(delta)
                elif kind == "bytes":
                    self.bytes.inc(delta)
                seen[name] = total

    def refresh(self, counts: dict[str, dict[str, int]]) -> None:
        """Update the state gauges from the database counts (called at scrape time)."""
        with self._scrape_lock:
            self.states.clear()
            for kind, by_state in counts.items():
                for state, n in by_state.items():
                    self.states.labels(kind, state).set(n)
        jobs, deliveries = counts.get("jobs", {}), counts.get("deliveries", {})
        self.queue_depth.set(jobs.get("queued", 0) + jobs.get("running", 0) + deliveries.get("pending", 0))

    def refresh_cluster(self, view: dict[str, list[dict[str, Any]]]) -> None:
        """Update the cluster gauges (a cluster only): instances and bytes received per ingest
        node, jobs per plugin queue and state, and per node or worker (the one that ran them
        last) and state."""
        with self._scrape_lock:
            self.cluster_ingest.clear()
            self.cluster_ingest_bytes.clear()
            self.cluster_queue.clear()
            self.cluster_worker.clear()
            for row in view.get("ingest", []):
                self.cluster_ingest.labels(row["node"]).set(row["instances"])
                self.cluster_ingest_bytes.labels(row["node"]).set(row["bytes"])
            for row in view["queues"]:
                self.cluster_queue.labels(row["plugin"], row["state"]).set(row["n"])
            for row in view["workers"]:
                self.cluster_worker.labels(row["worker"], row["state"]).set(row["n"])

    def association(self, outcome: str) -> None:
        """Count an accepted or rejected association."""
        self.associations.labels(outcome).inc()

    def instance_received(self, size: int, outcome: Any) -> None:
        """Count one C-STORE by its disposition."""
        result = outcome.disposition or ("success" if outcome.status == 0 else "failure")
        self.instances.labels(result).inc()
        if getattr(outcome, "below_disk_reserve", False):
            self.disk_refused_at = time.time()
        if outcome.disposition == "new":
            self.bytes.inc(size)

    def job_finished(self, timings: dict[str, float]) -> None:
        """Observe the stage timings of a finished job."""
        for stage, seconds in timings.items():
            self.stage_seconds.labels(stage).observe(seconds)

    def delivery(self, outcome: str) -> None:
        """Count a delivery outcome: sent, retried or failed."""
        self.deliveries.labels(outcome).inc()
