"""Analysis jobs through Celery: a cluster with ``cluster.broker`` (docs/scale-out.md).

The state database stays the one source of truth; the broker only carries job ids.

- A ``serve`` node (:class:`CeleryDispatcher`, in place of its local worker pool) puts each
  queued job's id on its plugin's queue (``dicom-node.<plugin>``), marking it sent; a job
  still queued ``cluster.resend_seconds`` after its message went out is sent again (a broker
  that restarted without persistence lost it). It also requeues the running jobs whose
  worker's lease expired (the worker died), which sends them again.
- A worker (``dicom-node worker``, :func:`run_worker`) takes ids from the queues of its
  plugins, late-acknowledged, one at a time per process. It runs a job only if it claims it
  in the database (:meth:`~dicom_node.storage.work.WorkStore.claim_job_id`: queued ->
  running under its lease, renewed while it runs); a duplicate or stale message finds the
  job not queued and is dropped. Only the run holding the lease records results and queues
  deliveries, so a re-run never yields two result series and delivery happens once (the
  ``serve`` nodes deliver, as without a broker).
- A job whose runs keep ending without a result (the worker died) is failed after
  ``cluster.max_attempts``; a plugin's ``time_limit_seconds`` fails a job that runs longer.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from celery import Celery
from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init
from celery.worker.request import Request
from kombu.exceptions import KombuError
from kombu.transport.virtual.base import QoS as VirtualQoS
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric

from dicom_node.audit import AuditLog
from dicom_node.config import Config, redact_url
from dicom_node.errors import ConfigError, StorageError
from dicom_node.jobs import PLUGIN_LOAD_TIMEOUT_S, JobRunner, loaded_plugin_infos
from dicom_node.pipeline import JobFailed, JobOutcome, load_plugin_infos, run_job_safely, warm_up
from dicom_node.workers import WorkerPool
from dicom_node.storage.rows import JobRow
from dicom_node.storage.state import StateDB, open_state_db
from dicom_node.storage.work import WorkStore
from plugin.types import PluginInfo

log = logging.getLogger(__name__)

TASK_NAME = "dicom_node.run_job"
HARD_LIMIT_GRACE_S = 30.0  # after the soft time limit, the worker process is ended this much later


def queue_name(plugin: str) -> str:
    """The broker queue of one plugin's jobs."""
    return f"dicom-node.{plugin}"


def _broker(config: Config) -> str:
    if config.cluster is None or config.cluster.broker is None:
        raise ConfigError("analysis through Celery needs cluster.broker (docs/scale-out.md)")
    return config.cluster.broker


def make_app(config: Config) -> Celery:
    """The Celery application of a cluster: its broker, late acknowledgement, one job
    reserved per worker process, no result backend (results are in the state database)."""
    app = Celery("dicom_node", broker=_broker(config), set_as_current=False)
    app.conf.update(
        task_acks_late=True,  # a worker killed mid-job leaves its message to the broker
        task_reject_on_worker_lost=True,  # a worker process that died: the message goes back
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        worker_hijack_root_logger=False,  # dicom_node.logs configures logging
        worker_proc_alive_timeout=PLUGIN_LOAD_TIMEOUT_S,  # each process loads its plugins first
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        broker_connection_retry=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a broker that restarts is waited for
        broker_connection_timeout=5,
        worker_cancel_long_running_tasks_on_connection_loss=False,  # the database decides, not the ack
    )
    app.task(name=TASK_NAME, bind=True, acks_late=True, Request=AckOrReconnect)(_run_task)
    return app


class AckOrReconnect(Request):  # type: ignore[misc]  # celery is untyped
    """A task request whose late acknowledgement, failing for a lost broker connection,
    still frees the worker's slot for the next message.

    Celery logs such a failure and carries on, but kombu's Redis transport still counts the
    message as unacknowledged, so with one message reserved per process the worker never
    takes another (celery/celery#8030, #8091: it stops consuming after a broker restart).
    Here the message is dropped from the channel's own count too; the worker's next read
    meets the lost connection and reconnects. The job is already recorded in the database,
    and the broker's copy of the message, if it kept one, is dropped by the worker that
    gets it next (the job is not queued any more).
    """

    def acknowledge(self) -> None:
        """Acknowledge the message; on a connection error, forget it locally."""
        if self.acknowledged:  # type: ignore[has-type]  # celery sets it untyped
            return
        try:
            self.message.ack()
        except self._connection_errors as exc:
            log.warning("job message not acknowledged: the broker connection was lost (%s)", type(exc).__name__)
            VirtualQoS.ack(self.message.channel.qos, self.message.delivery_tag)  # type: ignore[no-untyped-call]
        self.acknowledged = True


# ---- the serve node's side ------------------------------------------------------------


class CeleryDispatcher:
    """Sends a cluster's queued jobs to the broker (in a ``serve`` node, instead of
    :class:`~dicom_node.jobs.JobRunner`'s local workers)."""

    def __init__(self, config: Config, work: WorkStore) -> None:
        assert config.cluster is not None
        self.config = config
        self.cluster = config.cluster
        self.work = work
        self.app = make_app(config)
        self.plugin_infos: dict[str, PluginInfo] = {}
        self._leases_kept = 0.0
        self._broker_down = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        with self.app.connection_for_write() as conn:
            self._send_errors: tuple[type[BaseException], ...] = (
                KombuError, OSError, *conn.connection_errors, *conn.channel_errors)

    def load_plugins(self) -> dict[str, PluginInfo]:
        """Nothing to load here: the workers load and warm the plugins."""
        return {}

    def warm_up(self) -> None:
        """Nothing to warm here: the workers do."""

    @property
    def warm_state(self) -> str:
        """Where analyses run (for health and ``status``)."""
        return f"Celery workers via {redact_url(self.cluster.broker or '')}"

    @property
    def running(self) -> int:
        """Jobs this node runs itself: none."""
        return 0

    def tick(self) -> None:
        """Called by the node's assembly loop: make sure the dispatch thread runs (it is
        started here, and again should it have died). Sending runs in its own thread so
        that a broker out of reach never holds up the judging of stable studies."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="celery-dispatch", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.assembly.poll_seconds):
            try:
                self.dispatch_once()
            except StorageError as exc:
                log.warning("dispatch to the broker paused: %s", exc)

    def dispatch_once(self) -> None:
        """Requeue the jobs of dead workers (about three times per lease), then send the
        queued jobs that are due."""
        now = time.time()
        if now - self._leases_kept >= self.work.lease_seconds / 3:
            self._leases_kept = now
            self.work.requeue_expired(now)
        while due := self.work.jobs_to_send(self.cluster.resend_seconds):
            if not self._send(due):
                return

    def _send(self, due: list[tuple[int, str]]) -> bool:
        for n, (job_id, plugin) in enumerate(due):
            try:
                self.app.send_task(TASK_NAME, args=[job_id], queue=queue_name(plugin), retry=False,
                                   **self.limits(plugin))
            except self._send_errors as exc:
                self.work.unsend([j for j, _ in due[n:]])
                if not self._broker_down:
                    log.warning("broker %s unreachable, %d queued jobs wait for it: %s",
                                redact_url(self.cluster.broker or ""), len(due) - n, type(exc).__name__)
                self._broker_down = True
                return False
            log.info("job %d sent to queue %s", job_id, queue_name(plugin))
        if self._broker_down:
            log.warning("broker reachable again")
            self._broker_down = False
        return True

    def limits(self, plugin: str) -> dict[str, float]:
        """Celery's time limits of one plugin's jobs (none unless configured)."""
        spec = self.config.plugins.get(plugin)
        if spec is None or spec.time_limit_seconds is None:
            return {}
        return {"soft_time_limit": spec.time_limit_seconds,
                "time_limit": spec.time_limit_seconds + HARD_LIMIT_GRACE_S}

    def stop(self) -> None:
        """Stop the dispatch thread and close the broker connections."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.app.close()


# ---- the worker's side ------------------------------------------------------------------


@dataclass
class _WorkerContext:
    """What each worker process needs; its database is opened in the process itself
    (a connection never crosses a fork)."""

    config: Config
    plugins: list[str]
    name: str
    concurrency: int = 1
    _pid: int = -1
    _runner: JobRunner | None = field(default=None, repr=False)

    def runner(self) -> JobRunner:
        """This process's job runner (its database, work store and audit), made once."""
        if self._runner is None or self._pid != os.getpid():
            assert self.config.cluster is not None
            db: StateDB = open_state_db(self.config)
            work = WorkStore(db, self.owner(), self.config.cluster.lease_seconds)
            self._runner = JobRunner(self.config, db, work, audit=AuditLog(self.config.audit_path))
            self._pid = os.getpid()
        return self._runner

    def owner(self) -> str:
        """The lease owner of this process: the worker's name, with the process's slot
        (``gpu-1.2``) when it runs several, so that a stalled process never finishes a job
        that another process of the same worker took over."""
        if self.concurrency == 1:
            return self.name
        from billiard.process import current_process

        return f"{self.name}.{getattr(current_process(), 'index', os.getpid())}"

    def specs(self) -> list[tuple[str, str | None, dict[str, Any]]]:
        return [(name, *self.config.plugin_factory(name)) for name in self.plugins]


_CONTEXT: _WorkerContext | None = None


def _warm_process(**_: Any) -> None:
    """Celery's ``worker_process_init``: load and warm the plugins once per process."""
    if _CONTEXT is None:
        return
    warm_up(_CONTEXT.specs())
    runner = _CONTEXT.runner()
    from dicom_node.pipeline import get_plugin

    for name, factory, options in _CONTEXT.specs():
        runner.plugin_infos[name] = get_plugin(name, factory, options).info


def _run_task(task: Any, job_id: int) -> str:
    """The Celery task: run job ``job_id`` if this worker claims it in the database."""
    if _CONTEXT is None:
        raise ConfigError("the task runs only in a dicom-node worker")
    cluster = _CONTEXT.config.cluster
    assert cluster is not None
    runner = _CONTEXT.runner()
    job = runner.work.claim_job_id(job_id, cluster.max_attempts)
    if job is None:
        log.info("job %d: not queued any more (taken, done or failed); message dropped", job_id)
        return "dropped"
    if job.attempts > 1:  # files of an earlier run that died: never recorded, never delivered
        shutil.rmtree(_CONTEXT.config.results_dir / str(job_id), ignore_errors=True)
    _run_claimed(runner, job)
    return "ran"


def _run_claimed(runner: JobRunner, job: JobRow) -> None:
    spec = runner._spec(job)
    log.info("job %d started on worker %s: study %s route %s plugin %s, try %d, %d files", job.id,
             runner.work.owner, job.study_uid, job.route, job.plugin, job.attempts, len(spec.files))
    started = time.monotonic()
    stop = threading.Event()
    keeper = threading.Thread(target=_keep_lease, args=(runner.work, job.id, stop), name="lease", daemon=True)
    keeper.start()
    result: JobOutcome | JobFailed
    try:
        try:
            result = run_job_safely(spec)
        except SoftTimeLimitExceeded:
            result = _over_time(runner.config, job.plugin)
    finally:
        stop.set()
        keeper.join()
    if isinstance(result, JobFailed) and result.reason.startswith("unexpected SoftTimeLimitExceeded"):
        result = _over_time(runner.config, job.plugin)
    if isinstance(result, JobFailed):
        runner.work.fail_job(job.id, result.reason)
        runner._audit(job, "failed", reason=result.reason)
        log.error("job %d failed after %.1f s: %s", job.id, time.monotonic() - started, result.reason)
        return
    runner._record(job, result, time.monotonic() - started)


def _over_time(config: Config, plugin: str) -> JobFailed:
    spec = config.plugins.get(plugin)
    limit = spec.time_limit_seconds if spec is not None else None
    return JobFailed(f"stopped: over the plugin's time limit of {limit:g} s (plugins.{plugin}.time_limit_seconds)"
                     if limit else "stopped: over the plugin's time limit")


def _keep_lease(work: WorkStore, job_id: int, stop: threading.Event) -> None:
    """Renew the lease on a running job three times per lease until ``stop``."""
    while not stop.wait(work.lease_seconds / 3):
        try:
            if not work.renew_job_leases([job_id]):
                log.warning("job %d: lease lost (the database was out of reach too long); "
                            "another worker runs it, this run's results will not be recorded", job_id)
                return
        except StorageError as exc:
            log.warning("job %d: lease not renewed: %s", job_id, exc)


def validate_plugins(config: Config, specs: list[tuple[str, str | None, dict[str, Any]]]) -> dict[str, PluginInfo]:
    """Load the plugins once in a spawned process, as ``serve`` does, so that a worker host
    that cannot load one refuses to start (PluginError with the reason) instead of failing
    every job it takes."""
    pool = WorkerPool(1, (config.jobs.torch_threads, config.logging.level, config.logging.json_format, os.getpid()))
    try:
        infos = loaded_plugin_infos(pool.submit(load_plugin_infos, specs), PLUGIN_LOAD_TIMEOUT_S,
                                    "the spawned process")
    finally:
        pool.stop()
    return infos


class WorkerMetrics:
    """A worker's own ``/metrics`` (Prometheus): its jobs by state (the runs it made last)
    and its plugins' jobs queued and running, read from the database at each scrape with
    a short-lived connection (the worker's main process keeps none: its analysis
    processes are forked from it)."""

    def __init__(self, config: Config, name: str, plugins: list[str]) -> None:
        assert config.cluster is not None
        self.cluster = config.cluster
        self.name = name
        self.plugins = plugins

    def collect(self) -> Iterator[Metric]:
        """The gauges, as of now (prometheus_client's collector protocol)."""
        import psycopg

        jobs = GaugeMetricFamily("dicomnode_worker_jobs", "This worker's jobs by state (the last run of each)",
                                 labels=["worker", "state"])
        queue = GaugeMetricFamily("dicomnode_worker_queue_jobs", "Jobs of this worker's plugins queued or running",
                                  labels=["plugin", "state"])
        up = GaugeMetricFamily("dicomnode_worker_database_up", "Whether the state database answered this scrape")
        try:
            with psycopg.connect(self.cluster.database, connect_timeout=max(1, round(self.cluster.connect_timeout_seconds)),
                                 application_name="dicom-node-worker-metrics") as conn:
                for state, n in conn.execute(
                        "SELECT state, COUNT(*) FROM jobs WHERE lease_owner = %s OR starts_with(lease_owner, %s) "
                        "GROUP BY state", (self.name, self.name + ".")):
                    jobs.add_metric([self.name, state], n)
                for plugin, state, n in conn.execute(
                        "SELECT plugin, state, COUNT(*) FROM jobs WHERE plugin = ANY(%s) AND state IN ('queued', 'running') "
                        "GROUP BY plugin, state", (self.plugins,)):
                    queue.add_metric([plugin, state], n)
            up.add_metric([], 1)
        except psycopg.Error as exc:
            log.warning("worker metrics: the state database did not answer: %s", type(exc).__name__)
            up.add_metric([], 0)
        yield from (jobs, queue, up)


def serve_metrics(config: Config, name: str, plugins: list[str], port: int) -> int:
    """Start the worker's ``/metrics`` on ``http.host``:``port``; the port bound."""
    registry = CollectorRegistry()
    registry.register(WorkerMetrics(config, name, plugins))
    server, _ = start_http_server(port, addr=config.http.host, registry=registry)
    bound = int(server.server_port)
    log.info("worker metrics on http://%s:%d/metrics", config.http.host, bound)
    return bound


def default_worker_name() -> str:
    """A worker's name, unique per process: ``<host>-worker-<pid>``."""
    return f"{socket.gethostname()}-worker-{os.getpid()}"


def run_worker(config: Config, plugins: list[str], concurrency: int, name: str | None = None,
               metrics_port: int | None = None) -> int:
    """Run a Celery worker for ``plugins`` until stopped (SIGTERM: warm shutdown); its exit code."""
    global _CONTEXT
    _broker(config)
    known = set(config.routed_plugins()) | set(config.plugins)
    unknown = [p for p in plugins if p not in known]
    if unknown:
        raise ConfigError(f"--plugins: {', '.join(unknown)} not routed or configured "
                          f"(known: {', '.join(sorted(known)) or 'none'})")
    if concurrency < 1:
        raise ConfigError("--concurrency must be 1 or more")
    if not plugins:
        raise ConfigError("no plugins to take jobs for: no route names one, and --plugins names none")
    name = name or default_worker_name()
    _CONTEXT = _WorkerContext(config, plugins, name, concurrency)
    for plugin, info in validate_plugins(config, _CONTEXT.specs()).items():
        log.info("plugin %s: %s %s validated (in a separate process)", plugin, info.name, info.version)
    if metrics_port is not None:
        serve_metrics(config, name, plugins, metrics_port)
    worker_process_init.connect(_warm_process, weak=False)
    app = make_app(config)
    queues = [queue_name(p) for p in plugins]
    assert config.cluster is not None and config.cluster.broker is not None
    log.info("dicom-node worker %s: plugins %s, %d processes, broker %s, state %s, spool %s", name,
             ", ".join(plugins), concurrency, redact_url(config.cluster.broker),
             redact_url(config.cluster.database), config.cluster.spool)
    worker = app.Worker(hostname=f"{name}@{socket.gethostname()}", queues=queues, concurrency=concurrency,
                        pool="prefork", without_mingle=True, without_gossip=True, without_heartbeat=True,
                        loglevel=config.logging.level, quiet=True, optimization="fair")
    worker.start()
    return int(worker.exitcode or 0)
