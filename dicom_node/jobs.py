"""Job runner: takes queued jobs from the database and runs them in worker processes.

Workers are separate processes (spawned), so a plugin that crashes, hangs or eats
memory never takes the listener down: the job is marked failed with its reason and
the pool is rebuilt. The other jobs in flight when a worker dies go back to the queue
without an attempt counted (:mod:`dicom_node.workers` tells them apart); one caught in
:data:`MAX_BREAKS` breaks is failed. The queue lives in the database and survives restarts.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from concurrent.futures.process import BrokenProcessPool
from typing import Any

from dicom_node.observers import AuditSink, JobMetrics
from dicom_node.config import ALL_OUTPUTS, Config, Route
from dicom_node.errors import PluginError
from dicom_node.pipeline import (
    WORKER_DIED,
    JobFailed,
    JobOutcome,
    JobSpec,
    load_plugin_infos,
    run_job_safely,
    warm_up,
)
from dicom_node.storage.rows import JobRow
from dicom_node.storage.state import StateDB
from dicom_node.storage.work import WorkStore
from dicom_node.workers import WorkerPool
from plugin.types import PluginInfo

log = logging.getLogger(__name__)

PLUGIN_LOAD_TIMEOUT_S = 600.0  # model loading, CUDA's start-up included
MAX_BREAKS = 3  # a job in flight in this many pool breaks, its own worker never the one ended, fails


def loaded_plugin_infos(future: Future[dict[str, PluginInfo]], timeout_s: float,
                        loader: str) -> dict[str, PluginInfo]:
    """What a worker process (``loader``, for the message) returned from
    ``load_plugin_infos``, or PluginError with one line saying why it could not load them."""
    try:
        return future.result(timeout=timeout_s)
    except PluginError:
        raise
    except BrokenProcessPool as exc:
        raise PluginError(f"{loader} died while loading the plugins (crash or out of memory)") from exc
    except FutureTimeout as exc:
        raise PluginError(f"the plugins did not load within {timeout_s:g} s") from exc
    except Exception as exc:  # whatever a plugin's import or constructor raised, in one line
        raise PluginError(f"cannot load the plugins: {type(exc).__name__}: {exc}") from exc


class JobRunner:
    """Dispatches jobs to a process pool, at most ``max_concurrent_analyses`` at once."""

    def __init__(self, config: Config, db: StateDB, work: WorkStore, metrics: JobMetrics | None = None,
                 audit: AuditSink | None = None) -> None:
        self.config = config
        self.db = db
        self.work = work
        self.metrics = metrics
        self.audit = audit
        self.plugin_infos: dict[str, PluginInfo] = {}
        self._pool: WorkerPool | None = None
        self._running: dict[int, Future[JobOutcome | JobFailed]] = {}
        self._warming: list[Future[int]] = []
        self._breaks: dict[int, int] = {}  # job id -> pool breaks it was caught in (not its crash)
        self._lock = threading.Lock()
        self._stopping = False
        self._leases_kept = 0.0  # when the cluster leases were last renewed (time.time())

    def _get_pool(self) -> WorkerPool:
        with self._lock:
            if self._pool is None:
                self._pool = WorkerPool(
                    self.config.jobs.max_concurrent_analyses,
                    (self.config.jobs.torch_threads, self.config.logging.level,
                     self.config.logging.json_format, os.getpid()),
                )
            return self._pool

    def _drop_pool(self, pool: WorkerPool) -> None:
        """Forget a broken pool (the next submit starts a new one)."""
        with self._lock:
            if self._pool is pool:
                self._pool = None

    def load_plugins(self, timeout_s: float = PLUGIN_LOAD_TIMEOUT_S) -> dict[str, PluginInfo]:
        """Load every routed plugin in an analysis worker (never in the node's process) and
        keep their identities; a plugin that cannot load raises PluginError with the
        worker's one-line reason."""
        specs = [(name, *self.config.plugin_factory(name)) for name in self.config.routed_plugins()]
        if not specs:
            return {}
        future = self._get_pool().submit(load_plugin_infos, specs)
        infos = loaded_plugin_infos(future, timeout_s, "the analysis worker")
        self.plugin_infos.update(infos)
        return infos

    def warm_up(self) -> None:
        """Start the workers now and load every routed plugin in them, so the first
        study does not wait for process start and model loading."""
        specs = [(name, *self.config.plugin_factory(name)) for name in self.config.routed_plugins()]
        if not specs:
            return
        pool = self._get_pool()
        self._warming = [pool.submit(warm_up, specs) for _ in range(self.config.jobs.max_concurrent_analyses)]

    @property
    def warm_state(self) -> str:
        """The analysis workers' warm-up, for health and ``status``: "warming up (n of m)"
        while plugins load (CUDA's start-up included), "warm", "not started" (no routed
        plugin), or why the warm-up failed (the first job then loads the plugin itself)."""
        if not self._warming:
            return "not started"
        done = [f for f in self._warming if f.done()]
        if len(done) < len(self._warming):
            return f"warming up ({len(done)} of {len(self._warming)} ready)"
        failed = next((e for e in (f.exception() for f in done) if e is not None), None)
        return "warm" if failed is None else f"warm-up failed: {type(failed).__name__}: {failed}"

    def tick(self) -> None:
        """Start queued jobs while there is capacity."""
        pool = self._pool
        if pool is not None:
            pool.collect_reports()
        if self.work.owner is not None:
            self._keep_leases()
        while len(self._running) < self.config.jobs.max_concurrent_analyses:
            job = self.work.claim_job()
            if job is None:
                return
            self._submit(job)

    def _keep_leases(self, now: float | None = None) -> None:
        """In a cluster, about three times per lease: renew this node's leases on the jobs it
        runs, and requeue the jobs of nodes whose leases expired (they died)."""
        now = time.time() if now is None else now
        if now - self._leases_kept < self.work.lease_seconds / 3:
            return
        self._leases_kept = now
        with self._lock:
            running = list(self._running)
        self.work.renew_job_leases(running, now)
        self.work.requeue_expired(now)

    def _spec(self, job: JobRow) -> JobSpec:
        factory, options = self.config.plugin_factory(job.plugin)
        route = self._route(job)
        return JobSpec(
            job_id=job.id,
            study_uid=job.study_uid,
            plugin_name=job.plugin,
            plugin_factory=factory,
            plugin_options=options,
            files=self.db.study_files(job.study_uid),
            results_dir=self.config.results_dir,
            revision=job.revision,
            max_series_slices=self.config.jobs.max_series_slices,
            max_volume_mb=self.config.jobs.max_volume_mb,
            outputs=tuple(route.outputs) if route else ALL_OUTPUTS,
        )

    def _route(self, job: JobRow) -> Route | None:
        """The job's route in the configuration (None when it was removed since)."""
        return next((r for r in self.config.routes if r.name == job.route), None)

    def _submit(self, job: JobRow) -> None:
        spec = self._spec(job)
        log.info("job %d started: study %s route %s plugin %s, %d files",
                 spec.job_id, spec.study_uid, job.route, spec.plugin_name, len(spec.files))
        pool = self._get_pool()
        try:
            future = pool.submit(run_job_safely, spec)
        except BrokenProcessPool:
            self._drop_pool(pool)
            pool = self._get_pool()
            future = pool.submit(run_job_safely, spec)
        started = time.monotonic()
        with self._lock:
            self._running[spec.job_id] = future
        future.add_done_callback(lambda f: self._done(job, pool, f, started))

    def _done(self, job: JobRow, pool: WorkerPool, future: Future[JobOutcome | JobFailed],
              started: float) -> None:
        job_id = job.id
        with self._lock:
            self._running.pop(job_id, None)
        elapsed = time.monotonic() - started
        result: JobOutcome | JobFailed
        try:
            result = future.result()
        except BrokenProcessPool:
            self._drop_pool(pool)
            if self._stopping:
                return  # ended by stop(): the job stays running and is requeued at the next start
            if not pool.worker_ended(job_id):
                self._caught_in_break(job)
                return
            result = WORKER_DIED
        except Exception as exc:  # pool-level failure: record it, never lose the job
            result = JobFailed(f"worker error: {type(exc).__name__}: {exc}")
        if self._stopping and isinstance(result, JobFailed):
            return  # ended by stop(): the job stays running and is requeued at the next start
        self._breaks.pop(job_id, None)
        if isinstance(result, JobFailed):
            self.work.fail_job(job_id, result.reason)
            self._audit(job, "failed", reason=result.reason)
            log.error("job %d failed after %.1f s: %s", job_id, elapsed, result.reason)
            return
        self._record(job, result, elapsed)

    def _caught_in_break(self, job: JobRow) -> None:
        """The pool broke while ``job`` ran but its own worker was not the one that
        ended: back to the queue, no attempt counted; failed after MAX_BREAKS of these
        (a job that breaks the pool in a way no worker's end shows)."""
        job_id = job.id
        breaks = self._breaks[job_id] = self._breaks.get(job_id, 0) + 1
        if breaks < MAX_BREAKS:
            self.work.requeue_job(job_id, "requeued: another analysis's worker process died")
            log.warning("job %d requeued: another analysis's worker process died", job_id)
            return
        self._breaks.pop(job_id, None)
        reason = f"the analysis worker pool broke {breaks} times while this job ran (crash or out of memory)"
        self.work.fail_job(job_id, reason)
        self._audit(job, "failed", reason=reason)
        log.error("job %d failed: %s", job_id, reason)

    def _record(self, job: JobRow, outcome: JobOutcome, elapsed: float) -> None:
        route = self._route(job)
        destinations = route.destinations if route else []
        records = outcome.results
        deadline = self.config.delivery.deadline_hours * 3600
        current = self.work.finish_job(job.id, records, destinations, outcome.timings, deadline,
                                       note=outcome.note)
        self._audit(job, "done" if current else "superseded", reason=outcome.note or None,
                    findings=outcome.findings, results=[r.sop_instance_uid for r in records])
        stages = " ".join(f"{k}={v:.2f}s" for k, v in outcome.timings.items())
        if self.metrics is not None:
            self.metrics.job_finished(outcome.timings)
        if not current:
            log.info("job %d finished but was superseded by newer instances; results not delivered", job.id)
            return
        log.info("job %d done in %.1f s: study %s, %d findings, %d result objects%s; %s",
                 job.id, elapsed, job.study_uid, outcome.findings, len(records),
                 f" ({outcome.note})" if outcome.note else "", stages)

    def _audit(self, job: JobRow, outcome: str, **fields: Any) -> None:
        if self.audit is None:
            return
        info = self.plugin_infos.get(job.plugin)
        self.audit.record("analysis", job_id=job.id, study_uid=job.study_uid, route=job.route,
                          plugin=info.name if info else job.plugin,
                          version=info.version if info else None, outcome=outcome, **fields)

    def stop(self) -> None:
        """Stop the pool; running jobs go back to the queue on the next start."""
        self._stopping = True  # workers ended from here on are not failures of their jobs
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.stop()  # an analysis in flight is requeued at the next start

    @property
    def running(self) -> int:
        """Jobs in flight."""
        return len(self._running)
