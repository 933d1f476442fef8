"""The analysis worker pool: spawned processes that the runner can end, and that say
which job each one runs.

A :class:`concurrent.futures.ProcessPoolExecutor` breaks as a whole when one worker
dies: every future in flight gets :class:`BrokenProcessPool`, and the pool ends its
other workers right after. To fail only the job that killed its worker, the pool
keeps two things of its own, without the executor's internals:

- a handle on every process it starts (its multiprocessing context records them), so
  :meth:`WorkerPool.stop` ends them and :meth:`WorkerPool.worker_ended` sees which had
  ended when the break was noticed;
- each worker's report ``(job id, pid)`` as it starts a job (a queue the workers get
  through the initialiser).

The rule (see :meth:`WorkerPool.worker_ended`): after a break, a job whose worker had
ended is the one that crashed (or was killed); every other job in flight was only
caught in the break.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from multiprocessing.connection import wait
from multiprocessing.context import SpawnContext, SpawnProcess
from typing import Any, TypeVar

from dicom_node.pipeline import worker_init

log = logging.getLogger(__name__)

T = TypeVar("T")


class _RecordingSpawnContext(SpawnContext):
    """The spawn context, keeping a handle on every process it creates."""

    def __init__(self) -> None:
        super().__init__()
        self.processes: list[SpawnProcess] = []
        self._lock = threading.Lock()

    # typeshed declares Process as the class; a factory is what the executor calls
    def Process(self, *args: Any, **kwargs: Any) -> SpawnProcess:  # type: ignore[override]  # noqa: N802
        """A new spawn process, recorded."""
        process = SpawnProcess(*args, **kwargs)
        with self._lock:
            self.processes.append(process)
        return process

    def started(self) -> list[SpawnProcess]:
        """The processes created so far (some may not have started yet)."""
        with self._lock:
            return list(self.processes)


def _sentinel(process: SpawnProcess) -> int | None:
    try:
        return process.sentinel
    except ValueError:  # created but not started yet
        return None


class WorkerPool:
    """Up to ``size`` spawned analysis workers, initialised by
    :func:`dicom_node.pipeline.worker_init` with ``initargs``."""

    def __init__(self, size: int, initargs: tuple[Any, ...]) -> None:
        self._context = _RecordingSpawnContext()
        self._reports = self._context.SimpleQueue()
        self._executor = ProcessPoolExecutor(max_workers=size, mp_context=self._context,
                                             initializer=worker_init, initargs=(*initargs, self._reports))
        self._job_of: dict[int, int] = {}  # worker pid -> the job it started last
        self._crashed: set[int] | None = None  # after a break: jobs whose worker had ended
        self._lock = threading.Lock()

    def submit(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """Run ``fn(*args)`` in a worker; raises BrokenProcessPool once the pool broke."""
        return self._executor.submit(fn, *args)

    def collect_reports(self) -> None:
        """Read the workers' reports of the jobs they started (called often, so that
        the queue's pipe never fills)."""
        with self._lock:
            while not self._reports.empty():
                job_id, pid = self._reports.get()
                self._job_of[pid] = job_id

    def worker_ended(self, job_id: int) -> bool:
        """After the pool broke: whether ``job_id`` ran in a worker that had ended when
        the break was noticed (it crashed, ran out of memory or was killed).

        The executor marks every future broken before it ends its other workers, so on
        the first call (in the executor's thread, from a future's callback) the workers
        that died are the only ones ended. A job no worker reported is not counted as
        the crash (it had not started, or its worker died before it began).
        """
        self.collect_reports()
        with self._lock:
            if self._crashed is None:
                processes = [(p, s) for p in self._context.started() if (s := _sentinel(p)) is not None]
                ended = set(wait([s for _, s in processes], timeout=0))
                self._crashed = {self._job_of[p.pid] for p, s in processes
                                 if s in ended and p.pid in self._job_of}
                log.warning("analysis worker pool broke; worker(s) %s had ended; job(s) %s ran there",
                            sorted(p.pid or 0 for p, s in processes if s in ended), sorted(self._crashed))
            return job_id in self._crashed

    def stop(self) -> None:
        """End the pool and every worker now (their jobs' futures end as broken)."""
        self._executor.shutdown(wait=False, cancel_futures=True)
        for process in self._context.started():
            if process.is_alive():
                process.terminate()
