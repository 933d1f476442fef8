"""The analysis pipeline, run inside a worker process (never in the listener).

Stages: select (series selection) -> volume (series to volume) -> analyse (the
plugin) -> seg, sr, sc, kos (result encoding, the outputs the route asks for) -> write
(durable result files). Each stage is timed; the timings go to the state database and
the log.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO

from dicom_node.config import ALL_OUTPUTS
from dicom_node.errors import NodeError, PluginError, SeriesError
from dicom_node.storage.spool import write_durably
from dicom_node.storage.state import ResultRecord

log = logging.getLogger(__name__)

_PLUGINS: dict[str, Any] = {}
_REPORTS: Any = None  # in a worker: where it says which job it starts (see dicom_node.workers)


@dataclass(frozen=True)
class JobSpec:
    """Everything a worker needs to run one job (picklable)."""

    job_id: int
    study_uid: str
    plugin_name: str
    plugin_factory: str | None
    plugin_options: dict[str, Any]
    files: list[Path]
    results_dir: Path
    revision: int
    max_series_slices: int = 2000
    max_volume_mb: int = 4096
    outputs: tuple[str, ...] = ALL_OUTPUTS  # the route's outputs (see config.Route.outputs)


@dataclass
class JobOutcome:
    """What a worker reports back."""

    results: list[ResultRecord] = field(default_factory=list)  # the result files written
    timings: dict[str, float] = field(default_factory=dict)
    note: str = ""  # why nothing was produced, when nothing was
    findings: int = 0


@dataclass(frozen=True)
class JobFailed:
    """A job that did not produce an outcome, and why."""

    reason: str
    worker_died: bool = False  # the worker process ended (crash, out of memory, killed)


WORKER_DIED = JobFailed("the analysis worker process died (crash or out of memory)", worker_died=True)


@contextmanager
def _stage(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start


def get_plugin(name: str, factory: str | None, options: dict[str, Any]) -> Any:
    """Load a plugin once per worker process."""
    if name not in _PLUGINS:
        from plugin.registry import load_plugin

        _PLUGINS[name] = load_plugin(name, factory=factory, options=options)
        freeze_heap()
    return _PLUGINS[name]


def load_plugin_infos(plugins: list[tuple[str, str | None, dict[str, Any]]]) -> dict[str, Any]:
    """In a worker: load each plugin (kept there for the jobs) and return its identity
    (:class:`plugin.types.PluginInfo`), so that the node validates plugins without
    importing torch or a model itself."""
    return {name: get_plugin(name, factory, options).info for name, factory, options in plugins}


def freeze_heap() -> None:
    """Move every object alive now (modules, the model, the encoders' tables) out of
    the garbage collector's reach.

    A job leaves many long-lived objects (source headers, SR content), so a full
    collection runs during most jobs; it walked these hundreds of thousands of
    permanent objects too, 0.2-0.25 s at a random stage (SEG or SR as a rule). After
    the freeze it walks only the job's own objects: about 0.03 s.
    """
    gc.collect()
    gc.freeze()


def warm_up(plugins: list[tuple[str, str | None, dict[str, Any]]]) -> int:
    """Load plugins into this worker ahead of the first job (model load off the clock),
    and build one SEG and SR (the encoders' one-time start-up off the clock too)."""
    from dicom_node.results.warmup import try_warm_up_encoders

    loaded = [get_plugin(name, factory, options) for name, factory, options in plugins]
    for plugin in loaded:  # optional: a GPU plugin pays CUDA's start-up here, not in a study
        getattr(plugin, "warm_up", lambda: None)()
    if loaded:
        try_warm_up_encoders(loaded[0].info)
        freeze_heap()
    log.info("analysis worker %d warmed up (%s)", os.getpid(), ", ".join(p[0] for p in plugins))
    return os.getpid()


def worker_init(torch_threads: int | None, log_level: str = "INFO", json_logs: bool = False,
                node_pid: int | None = None, reports: Any = None) -> None:
    """Process initialiser: logging like the parent's, thread settings for inference;
    the worker ends when the node ``node_pid`` (default: its parent now) is gone. With
    ``reports`` (a multiprocessing queue) the worker puts ``(job id, its pid)`` there as
    it starts each job."""
    global _REPORTS
    import torch

    _REPORTS = reports

    from dicom_node.logs import setup_logging

    setup_logging(log_level, json_logs)

    threads = torch_threads or max(1, os.cpu_count() or 1)
    torch.set_num_threads(threads)
    _no_numpy_huge_pages()
    _exit_with_parent(node_pid or os.getppid())


def _exit_with_parent(parent_pid: int, every_s: float = 1.0) -> None:
    """End this worker when the node that started it is gone (killed with kill -9, say):
    an orphaned worker would go on holding memory and CPU, or finish a job that the
    restarted node has already requeued. A daemon thread checks the parent every second
    (the node may die while this worker is still starting: then it ends at once)."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(every_s)
        log.warning("analysis worker %d: the node (pid %d) is gone; exiting", os.getpid(), parent_pid)
        os._exit(3)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _no_numpy_huge_pages() -> None:
    """Stop numpy asking for transparent huge pages for its large arrays (as the
    environment variable ``NUMPY_MADVISE_HUGEPAGE=0`` does; one set there wins).

    With the kernel's usual ``defrag=madvise`` setting, the first touch of such an
    array may stall on memory compaction: building a 512x512x300 volume took
    0.9-1.5 s instead of 0.3 s in a fresh worker on the 2-core VM. Later jobs gain
    nothing measurable from huge pages.
    """
    if "NUMPY_MADVISE_HUGEPAGE" in os.environ:
        return
    import importlib

    try:
        setter = getattr(importlib.import_module("numpy._core.multiarray"), "_set_madvise_hugepage")  # noqa: B009
    except (ImportError, AttributeError):
        log.debug("numpy offers no huge page switch; left as it is")
        return
    setter(False)


def _write(ds: Dataset, folder: Path, kind: str) -> ResultRecord:
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    path = folder / f"{kind}-{ds.SOPInstanceUID}.dcm"
    write_durably(path, buffer.getvalue())
    return ResultRecord(str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPClassUID), kind, path)


def run_job(spec: JobSpec) -> JobOutcome:
    """Run one analysis job end to end; raises NodeError subclasses on failure."""
    from dicom_node.series import build_volume, select_series

    outcome = JobOutcome()
    t = outcome.timings
    plugin = get_plugin(spec.plugin_name, spec.plugin_factory, spec.plugin_options)
    with _stage(t, "select"):
        try:
            selection = select_series(spec.files, plugin.criteria)
        except SeriesError as exc:
            outcome.note = str(exc)
            log.info("job %d study %s: nothing to analyse: %s", spec.job_id, spec.study_uid, exc)
            return outcome
    if len(selection.paths) > spec.max_series_slices:
        raise SeriesError(f"series {selection.series_instance_uid} has {len(selection.paths)} slices; "
                          f"the limit is {spec.max_series_slices} (jobs.max_series_slices)")
    with _stage(t, "volume"):
        volume = build_volume(selection.paths, max_voxels=spec.max_volume_mb * 2**20 // 4,
                              headers=selection.headers)
    with _stage(t, "analyse"):
        findings = plugin.analyse(volume)
    for name, seconds in getattr(findings, "timings", {}).items():
        t[f"analyse.{name}"] = float(seconds)
    outcome.findings = findings.count
    datasets = encode_results(volume, findings, plugin.info, spec, t)
    with _stage(t, "write"):
        folder = spec.results_dir / str(spec.job_id)
        outcome.results = [_write(ds, folder, kind) for kind, ds in datasets]
    return outcome


def encode_results(volume: Any, findings: Any, info: Any, spec: JobSpec,
                   t: dict[str, float]) -> list[tuple[str, Dataset]]:
    """The result objects of ``spec.outputs``, as ``(kind, dataset)``, each stage timed.

    A SEG needs a segmented finding; a KOS needs something to select (it selects the
    other results, so it is built last).
    """
    from dicom_node.results import encode_key_images, encode_kos, encode_seg, encode_sr, result_series_numbers
    from dicom_node.results.common import load_sources
    from dicom_node.results.kos import key_source_images

    numbers = result_series_numbers(spec.revision)
    outputs = set(spec.outputs)
    datasets: list[tuple[str, Dataset]] = []
    with _stage(t, "seg"):
        sources = load_sources(volume)  # source headers, read once for every object
        if "seg" in outputs and findings.findings:
            datasets.append(("SEG", encode_seg(volume, findings, info, series_number=numbers.seg,
                                               sources=sources)))
    if "sr" in outputs:
        with _stage(t, "sr"):
            datasets.append(("SR", encode_sr(volume, findings, info, series_number=numbers.sr,
                                             sources=sources)))
    if "sc" in outputs:
        with _stage(t, "sc"):
            datasets += [("SC", ds) for ds in encode_key_images(volume, findings, info, series_number=numbers.sc,
                                                                sources=sources)]
    if "kos" in outputs and (datasets or key_source_images(findings, sources)):
        with _stage(t, "kos"):
            datasets.append(("KOS", encode_kos(volume, findings, info, series_number=numbers.kos,
                                               results=[ds for _, ds in datasets], sources=sources)))
    return datasets


def run_job_safely(spec: JobSpec) -> JobOutcome | JobFailed:
    """Worker entry point: an outcome, or the failure with its reason."""
    if _REPORTS is not None:
        _REPORTS.put((spec.job_id, os.getpid()))
    try:
        return run_job(spec)
    except (NodeError, PluginError) as exc:
        return JobFailed(f"{type(exc).__name__}: {exc}")
    except MemoryError:
        return JobFailed("out of memory during analysis")
    except Exception as exc:  # a plugin bug must not kill the worker silently
        log.exception("job %d failed unexpectedly", spec.job_id)
        return JobFailed(f"unexpected {type(exc).__name__}: {exc}")
