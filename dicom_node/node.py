"""The node: wires storage, the listener, assembly, jobs and delivery together."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pydicom import dcmread

from dicom_node.assembly import Assembler
from dicom_node.audit import AuditLog, config_hash
from dicom_node.config import Config
from dicom_node.delivery import Deliverer
from dicom_node.errors import PluginError
from dicom_node.ingest import Ingestor, StoreRequest
from dicom_node.jobs import JobRunner
from dicom_node.metrics import Metrics
from dicom_node.net.scp import StorageSCP
from dicom_node.ops_http import OpsServer
from dicom_node.storage.spool import Spool
from dicom_node.storage.state import StateDB
from dicom_node.storage.work import WorkStore

log = logging.getLogger(__name__)


class Node:
    """A running dicom-node. ``start()`` returns once the listener is up."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.audit = AuditLog(config.audit_path)
        self.db = StateDB(config.database_path)
        self.work = WorkStore(self.db)
        self.spool = Spool(config.spool_dir)
        self.ingestor = Ingestor(
            self.spool, self.db,
            min_free_bytes=config.node.min_free_disk_mb * 2**20,
            max_instance_bytes=config.node.max_instance_mb * 2**20,
        )
        self.scp = StorageSCP(config, self.ingestor, self.metrics, self.audit)
        self.assembler = Assembler(config, self.db, self.work, self.spool, self.audit)
        self.runner = JobRunner(config, self.db, self.work, self.metrics, self.audit)
        self.deliverer = Deliverer(config, self.work, self.metrics, self.audit)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.plugins_loaded = False
        self.ops: OpsServer | None = None

    def validate_plugins(self) -> None:
        """Load every plugin a route names, so a broken one fails the start."""
        names = sorted({r.plugin for r in self.config.routes})
        if not names:
            self.plugins_loaded = True
            return
        from plugin.registry import load_plugin

        for name in names:
            spec = self.config.plugins.get(name)
            plugin = load_plugin(name, factory=spec.factory if spec else None,
                                 options=dict(spec.options) if spec else {})
            log.info("plugin %s %s validated", plugin.info.name, plugin.info.version)
            self.runner.plugin_infos[name] = plugin.info
        self.plugins_loaded = True

    def recover(self) -> None:
        """Resume after a stop or crash: adopt spooled files, requeue jobs."""
        adopted = 0
        for path in self.spool.recover():
            if not self.db.has_instance_path(path):
                adopted += self._adopt(path)
        requeued = self.work.requeue_interrupted()
        if adopted or requeued:
            log.warning("recovery: %d spooled files registered, %d interrupted jobs requeued", adopted, requeued)

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
        self.scp.start()
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
        checks = {
            "database": self.db.ping(),
            "disk_above_reserve": free_mb >= self.config.node.min_free_disk_mb,
            "plugins_loaded": self.plugins_loaded,
            "dicom_listener": self.scp.server is not None,
        }
        return {"live": True, "ready": all(checks.values()), "checks": checks, "free_disk_mb": free_mb,
                "jobs_running": self.runner.running}

    def metrics_registry(self) -> Any:
        """The Prometheus registry, with state gauges refreshed from the database."""
        if self.db.ping():
            self.metrics.refresh(self.db.counts())
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
        return self.scp.port

    def stop(self) -> None:
        """Stop accepting, finish in-flight C-STOREs, stop the loops, close the database."""
        log.info("stopping")
        self.scp.stop(self.config.node.shutdown_grace_seconds)
        if self.ops is not None:
            self.ops.stop()
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)
        self.runner.stop()
        self.db.close()
        log.info("stopped")


__all__ = ["Node", "PluginError"]
