"""The node: wires storage, the listener, assembly, jobs and delivery together."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom import dcmread

from dicom_node.assembly import Assembler
from dicom_node.audit import AuditLog, config_hash
from dicom_node.config import Config
from dicom_node.delivery import Deliverer
from dicom_node.errors import StorageError
from dicom_node.jobs import JobRunner
from dicom_node.metrics import Metrics
from dicom_node.ops_http import OpsServer
from dicom_node.receive import reactor
from dicom_node.receive.ingest import Ingestor, StoreRequest
from dicom_node.receive.listener import AcceptorPool
from dicom_node.receive.scp import StorageSCP
from dicom_node.storage.spool import Spool
from dicom_node.storage.state import open_state_db
from dicom_node.storage.work import WorkStore

if TYPE_CHECKING:
    from dicom_node.celery_jobs import CeleryDispatcher

log = logging.getLogger(__name__)

# /health/ready stays not-ready this long after a C-STORE refused for the disk reserve
DISK_REFUSAL_NOT_READY_S = 60.0


class Node:
    """A running dicom-node. ``start()`` returns once the listener is up."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.audit = AuditLog(config.audit_path)
        self.db = open_state_db(config)
        cluster = config.cluster
        self.node_id = config.node_id if cluster is not None else None  # a cluster's name for this node
        self.work = WorkStore(self.db, self.node_id, cluster.lease_seconds if cluster is not None else 30.0)
        self.spool = Spool(config.spool_dir, Spool.node_slots(config.spool_dir, self.node_id))
        self.ingestor = Ingestor.for_config(config, self.spool, self.db)
        self.scp: StorageSCP | None = None
        self.acceptors: AcceptorPool | None = None
        processes = config.node.listener_process_count
        if not reactor.supported():
            log.warning("pynetdicom %s is not the 3.0 series this node was built on: it listens with "
                        "pynetdicom's own server in one process, WITHOUT the PDU-size guard, the read "
                        "deadlines and the negotiation limits of the conformance statement",
                        reactor.pynetdicom_version())
        if processes > 1 and not (reactor.supported() and hasattr(os, "memfd_create")):
            log.warning("listener_processes %d needs pynetdicom 3.0 on Linux: listening in one process",
                        processes)
            processes = 1
        if processes > 1:
            self.acceptors = AcceptorPool(config, processes, on_exit=self._settle_acceptor)
        else:
            self.scp = StorageSCP(config, self.ingestor, self.metrics, self.audit)
        self.assembler = Assembler(config, self.db, self.work, self.spool, self.audit)
        self.runner: JobRunner | CeleryDispatcher = self._runner()
        self.deliverer = Deliverer(config, self.work, self.metrics, self.audit)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.plugins_loaded = False
        self.ops: OpsServer | None = None

    def _runner(self) -> "JobRunner | CeleryDispatcher":
        """Local analysis workers; in a cluster with a broker, Celery workers instead."""
        if self.config.cluster is None or self.config.cluster.broker is None:
            return JobRunner(self.config, self.db, self.work, self.metrics, self.audit)
        from dicom_node.celery_jobs import CeleryDispatcher

        return CeleryDispatcher(self.config, self.work)

    def validate_plugins(self) -> None:
        """Load every plugin a route names, in an analysis worker, so that a broken one
        fails the start. The node's own process never imports torch or a model: it would
        hold their memory for nothing, and a plugin's import-time crash would take it down."""
        for name, info in self.runner.load_plugins().items():
            log.info("plugin %s: %s %s validated (in an analysis worker)", name, info.name, info.version)
        self.plugins_loaded = True

    def recover(self) -> None:
        """Resume after a stop or crash: adopt spooled files, requeue jobs.

        Runs before any acceptor process starts, and settles their slot folders too.
        """
        adopted = 0
        acceptors = self.acceptors.processes if self.acceptors is not None else 0
        for path in self.spool.recover(acceptors):
            if not self.db.has_instance_path(path):
                adopted += self._adopt(path)
        requeued = self.work.requeue_interrupted()
        if adopted or requeued:
            log.warning("recovery: %d spooled files registered, %d interrupted jobs requeued", adopted, requeued)

    def _settle_acceptor(self, row: int) -> None:
        """After acceptor ``row`` died: move its complete slots into place and register them."""
        _, placed = self.spool.settle_slots(Spool.acceptor_slots(self.spool.root, row, self.node_id))
        adopted = sum(self._adopt(path) for path in placed if not self.db.has_instance_path(path))
        if adopted:
            log.warning("acceptor %d: %d spooled files it left registered", row, adopted)

    def _adopt(self, path: Path) -> int:
        try:
            syntax = str(dcmread(path, stop_before_pixels=True, specific_tags=[]).file_meta.TransferSyntaxUID)
            data = path.read_bytes()
        except Exception as exc:  # unreadable leftover: keep it aside, never delete data
            path.rename(path.with_suffix(".unreadable"))
            log.error("recovery: %s unreadable (%s), set aside", path.name, type(exc).__name__)
            return 0
        outcome = self.ingestor.store(StoreRequest(data, "", "", syntax, "", ""))
        return int(outcome.status == 0)

    def start(self) -> None:
        """Validate, recover, start listening and start the background loops."""
        self.audit.record("config-loaded", sha256=config_hash(self.config.model_dump_json()),
                          ae_title=self.config.node.ae_title, port=self.config.node.port,
                          routes=[r.name for r in self.config.routes])
        self.validate_plugins()
        self.recover()
        self.runner.warm_up()
        self.listener.start()
        self._start_ops()
        self._spawn("assembly", self._assembly_loop)
        self._spawn("delivery", self._delivery_loop)

    def _start_ops(self) -> None:
        http = self.config.http
        if not http.enabled:
            return
        self.ops = OpsServer(http.host, http.port, self.health, self.metrics_registry)
        self.ops.start()
        log.info("health and metrics on http://%s:%d/health and /metrics", http.host, self.ops.port)

    def health(self) -> dict[str, Any]:
        """Liveness and readiness with every check (for /health and `status`)."""
        try:
            free_mb = self.spool.free_bytes() // 2**20
        except OSError:
            free_mb = -1
        refused_ago = time.time() - self._last_disk_refusal()
        refusing = refused_ago < DISK_REFUSAL_NOT_READY_S
        checks = {
            "database": self.db.ping(),
            "disk_above_reserve": free_mb >= self.config.node.min_free_disk_mb and not refusing,
            "plugins_loaded": self.plugins_loaded,
            "dicom_listener": self._listener_up(),
        }
        report = {"live": True, "ready": all(checks.values()), "checks": checks, "free_disk_mb": free_mb,
                  "jobs_running": self.runner.running, "analysis_workers": self.runner.warm_state}
        if refusing:
            report["not_ready_because"] = (f"a C-STORE was refused {refused_ago:.0f} s ago: free disk "
                                           f"{free_mb} MiB is too close to the reserve of "
                                           f"{self.config.node.min_free_disk_mb} MiB")
        if self.acceptors is not None:
            report["listener_processes"] = {"configured": self.acceptors.processes,
                                            "serving": self.acceptors.running}
        return report

    @property
    def listener(self) -> StorageSCP | AcceptorPool:
        """The DICOM listener: in this process, or a pool of acceptor processes."""
        listener = self.acceptors if self.acceptors is not None else self.scp
        assert listener is not None
        return listener

    def _last_disk_refusal(self) -> float:
        """Unix time of the latest C-STORE refused for the disk reserve, in any process."""
        board = self.acceptors.board if self.acceptors is not None else None
        return max(self.metrics.disk_refused_at, board.last_disk_refusal() if board is not None else 0.0)

    def _listener_up(self) -> bool:
        """In-process: the server runs; with acceptor processes: every one of them serves."""
        if self.acceptors is not None:
            return self.acceptors.server is not None and self.acceptors.running == self.acceptors.processes
        return self.scp is not None and self.scp.server is not None

    def metrics_registry(self) -> Any:
        """The Prometheus registry, with state gauges refreshed from the database."""
        if self.acceptors is not None:
            self.metrics.add_listener_totals(self.acceptors.listener_totals())
        if self.db.ping():
            self.metrics.refresh(self.db.counts())
            if self.db.clustered:
                self.metrics.refresh_cluster(self.db.cluster_view())
        return self.metrics.registry

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    def _loop(self, step: Callable[[], None], what: str) -> None:
        while not self._stop.wait(self.config.assembly.poll_seconds):
            try:
                step()
            except Exception:  # keep serving; the reason is in the log
                log.exception("%s loop error", what)

    def _assembly_loop(self) -> None:
        def step() -> None:
            self.assembler.tick()
            self.runner.tick()

        self._loop(step, "assembly")

    def _delivery_loop(self) -> None:
        self._loop(self.deliverer.tick, "delivery")

    @property
    def port(self) -> int:
        """The DICOM port actually bound."""
        return self.listener.port

    def stop(self) -> None:
        """Stop accepting, finish in-flight C-STOREs, stop the loops, close the database."""
        log.info("stopping")
        if self.acceptors is not None:
            self.metrics.add_listener_totals(self.acceptors.listener_totals())
        self.listener.stop(self.config.node.shutdown_grace_seconds)
        if self.ops is not None:
            self.ops.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.runner.stop()
        if self.node_id is not None:  # in a cluster another node may take them now, not after the lease
            try:
                self.work.requeue_interrupted("node stopped")
            except StorageError as exc:
                log.warning("jobs of this node not given back (other nodes take them after the lease): %s", exc)
        self.db.close()
        log.info("stopped")

