"""The analysis job alone: the node's own job runner on one series, stage by stage.

    .venv/bin/python -m bench.jobs [--series phantom|FOLDER] [--slices 300] [--rounds 3]
        [--device cpu|cuda] [--plugin lung_nodules|lung_nodule_ct_detection|wholeBody_ct_segmentation]
        [--concurrency 1,2] [--studies 6] [--open-criteria]

No network and no node: :func:`dicom_node.pipeline.run_job` (select -> volume ->
analyse -> SEG -> SR -> key images -> KOS -> write, exactly what an analysis worker runs) on the cached
300-slice chest phantom of ``bench.e2e`` or on the DICOM series in ``FOLDER`` (such as
the real chest CT in ``../shared/fixtures/real_ct/``). The plugin is loaded (and, on
CUDA, warmed up) once before the first round, as the node's workers do, so the rounds
are what a study costs. Reported per stage: the first round, then the fastest and
slowest of the others, the network's share, and studies per minute.

``--concurrency 1,2``: throughput of that many warmed worker processes taking
``--studies`` jobs at once, as the node's ``jobs.max_concurrent_analyses`` runs them:
on a GPU, one study's CPU stages overlap another's network.

``--open-criteria``: the plugin's series criteria opened (any slice count and spacing,
derived images too), for evaluation series the shipped criteria refuse (the real CT
here has 30 slices of 8 mm). Said in the table's title when used.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench.common import OUT, REPO
from bench.e2e import DEFAULT_PLUGIN, PLUGINS, chest_series

STAGES = ("select", "volume", "analyse.preprocessing", "analyse.inference", "analyse.postprocessing",
          "analyse.measure", "seg", "sr", "sc", "kos", "write")
NETWORK = "analyse.inference"
REAL_CT = REPO.parent / "shared" / "fixtures" / "real_ct"


def plugin_entry(plugin: str, device: str | None, amp: bool | None = None) -> tuple[str | None, dict[str, Any]]:
    """(factory, options) for ``plugin``: the shipped lung_nodules, or a Model Zoo bundle
    built by :mod:`bench.bundles` (random weights) run through the ``monai_bundle`` factory."""
    options: dict[str, Any] = {"device": device} if device else {}
    if amp is not None:
        options["amp"] = amp
    if plugin == DEFAULT_PLUGIN:
        return None, options
    from bench.bundles import bundle_dir

    return "monai_bundle", {**options, "bundle_dir": str(bundle_dir(plugin))}


def series_files(series: str, slices: int) -> list[Path]:
    """The phantom (``phantom``) or the ``.dcm`` files of a folder."""
    if series == "phantom":
        return chest_series(slices)
    folder = Path(series)
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in (".dcm", ""))
    if not files:
        raise SystemExit(f"no DICOM files in {folder}")
    return files


def prepare(plugin: str, factory: str | None, options: dict[str, Any], open_criteria: bool) -> dict[str, Any]:
    """Load (and warm up) the plugin in this process, as a worker does; returns its facts."""
    from dicom_node.pipeline import get_plugin, warm_up

    started = time.monotonic()
    warm_up([(plugin, factory, options)])
    loaded = get_plugin(plugin, factory, options)
    if open_criteria:
        loaded.criteria = replace(loaded.criteria, min_slices=1, slice_spacing_mm=(0.0, 20.0),
                                  image_type_required=())
    device = str(getattr(loaded, "device", "cpu"))
    return {"load_s": time.monotonic() - started, "device": device}


def one_job(plugin: str, factory: str | None, options: dict[str, Any], files: list[Path],
            job_id: int) -> dict[str, Any]:
    """Run one job with the node's runner in this process (plugin prepared); its stage
    timings and wall time."""
    from dicom_node.pipeline import JobSpec, run_job

    results = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    try:
        spec = JobSpec(job_id=job_id, study_uid="bench", plugin_name=plugin, plugin_factory=factory,
                       plugin_options=options, files=files, results_dir=results, revision=1)
        started = time.monotonic()
        outcome = run_job(spec)
        wall = time.monotonic() - started
    finally:
        shutil.rmtree(results, ignore_errors=True)
    return {"timings": dict(outcome.timings), "job_s": wall, "findings": outcome.findings,
            "note": outcome.note, "results": len(outcome.results)}


def _worker_init(plugin: str, factory: str | None, options: dict[str, Any], open_criteria: bool) -> None:
    import logging

    logging.basicConfig(level=logging.WARNING)
    prepare(plugin, factory, options, open_criteria)


def _pid() -> int:
    time.sleep(1.0)  # holds its process, so that every worker process is started (and warmed)
    return os.getpid()


def throughput(plugin: str, factory: str | None, options: dict[str, Any], files: list[Path],
               workers: int, studies: int, open_criteria: bool) -> dict[str, Any]:
    """Studies per minute of ``workers`` warmed processes taking ``studies`` jobs."""
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                             initargs=(plugin, factory, options, open_criteria)) as pool:
        pids = {f.result() for f in [pool.submit(_pid) for _ in range(workers)]}
        started = time.monotonic()
        jobs = [pool.submit(one_job, plugin, factory, options, files, n) for n in range(studies)]
        done = [f.result() for f in jobs]
        wall = time.monotonic() - started
    return {"workers": workers, "warmed_processes": len(pids), "studies": studies, "wall_s": wall,
            "per_minute": 60.0 * studies / wall, "job_s": [d["job_s"] for d in done]}


def compare_with_cpu(plugin: str, factory: str | None, options: dict[str, Any],
                     files: list[Path]) -> dict[str, Any]:
    """The prepared plugin's findings against the same plugin on the CPU, on one series:
    Dice of the label maps (foreground) and the findings' volumes side by side."""
    import numpy as np

    from dicom_node.pipeline import get_plugin
    from dicom_node.series import build_volume, select_series
    from plugin.registry import load_plugin

    here = get_plugin(plugin, factory, options)
    on_cpu = load_plugin(plugin, factory=factory, options={**options, "device": "cpu"})
    selection = select_series(files, here.criteria)
    volume = build_volume(selection.paths, headers=selection.headers)
    found = [p.analyse(volume) for p in (here, on_cpu)]
    out: dict[str, Any] = {"findings": [[(f.name, round(float(f.volume_mm3 or 0), 1)) for f in x.findings]
                                        for x in found]}
    first, second = (x.label_map for x in found)
    if first is not None and second is not None:
        a, b = np.asarray(first) > 0, np.asarray(second) > 0
        total = int(a.sum() + b.sum())
        out["dice"] = 1.0 if total == 0 else 2.0 * int((a & b).sum()) / total
        out["labels_equal"] = bool(np.array_equal(np.asarray(first), np.asarray(second)))
    return out


def markdown(rounds: list[dict[str, Any]]) -> str:
    """Stage table: first round, then min-max of the others."""
    later = rounds[1:] or rounds
    lines = ["| stage | first job (s) | later jobs (s) |", "|---|---|---|"]

    def span(values: list[float]) -> str:
        lo, hi = min(values), max(values)
        return f"{lo:.2f}" if abs(hi - lo) < 0.005 else f"{lo:.2f}–{hi:.2f}"

    for stage in STAGES:
        if not any(stage in r["timings"] for r in rounds):
            continue
        name = f"**{stage.split('.')[-1]} (the network)**" if stage == NETWORK else stage.split(".")[-1]
        lines.append(f"| {name} | {rounds[0]['timings'].get(stage, 0.0):.2f} | "
                     f"{span([r['timings'].get(stage, 0.0) for r in later])} |")
    lines.append(f"| **job** | {rounds[0]['job_s']:.2f} | {span([r['job_s'] for r in later])} |")
    share = [1.0 - r["timings"].get(NETWORK, 0.0) / r["job_s"] for r in later]
    lines.append(f"| not the network | {100 * (1 - rounds[0]['timings'].get(NETWORK, 0) / rounds[0]['job_s']):.0f} % "
                 f"| {100 * min(share):.0f}–{100 * max(share):.0f} % |")
    lines.append(f"| findings | {rounds[0]['findings']} | {', '.join(str(r['findings']) for r in later)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the rounds (and throughput runs) and print the tables."""
    parser = argparse.ArgumentParser(prog="python -m bench.jobs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--series", default="phantom", help="'phantom' (default) or a folder of one DICOM series")
    parser.add_argument("--slices", type=int, default=300, help="phantom slices (default 300)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="the plugin's device (default: the plugin's own choice, CUDA when present)")
    parser.add_argument("--plugin", choices=PLUGINS, default=DEFAULT_PLUGIN)
    parser.add_argument("--concurrency", default="", help="comma-separated worker counts for a throughput run")
    parser.add_argument("--studies", type=int, default=6, help="jobs per throughput run")
    parser.add_argument("--open-criteria", action="store_true",
                        help="accept any slice count and spacing (evaluation series only)")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision on CUDA (the plugin's default: on)")
    parser.add_argument("--compare-cpu", action="store_true",
                        help="also run the series on the CPU and report the Dice of the two label maps")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    if args.series != "phantom" and not Path(args.series).is_dir():
        print(f"bench.jobs: skipped, no series folder {args.series} (the real CT lives in {REAL_CT})",
              file=sys.stderr)
        return 0
    files = series_files(args.series, args.slices)
    factory, options = plugin_entry(args.plugin, args.device, args.amp)
    facts = prepare(args.plugin, factory, options, args.open_criteria)
    print(f"plugin {args.plugin} loaded and warmed up in {facts['load_s']:.1f} s on {facts['device']}",
          file=sys.stderr)
    rounds = []
    for n in range(args.rounds):
        rounds.append(one_job(args.plugin, factory, options, files, n))
        print(f"round {n + 1}: job {rounds[-1]['job_s']:.2f} s, "
              + " ".join(f"{k}={v:.2f}" for k, v in rounds[-1]["timings"].items()), file=sys.stderr)
    what = "phantom" if args.series == "phantom" else Path(args.series).name
    title = (f"### Job runner: {len(files)}-slice {what}, {args.plugin} on {facts['device']}, "
             f"{os.cpu_count()} cores{', series criteria opened' if args.open_criteria else ''}")
    print(f"\n{title}\n\n{markdown(rounds)}")
    runs = []
    for workers in [int(w) for w in args.concurrency.split(",") if w.strip()]:
        runs.append(throughput(args.plugin, factory, options, files, workers, args.studies, args.open_criteria))
        print(f"\n{workers} worker(s): {args.studies} studies in {runs[-1]['wall_s']:.1f} s = "
              f"{runs[-1]['per_minute']:.1f} studies per minute")
    compared = compare_with_cpu(args.plugin, factory, options, files) if args.compare_cpu else None
    if compared is not None:
        print(f"\nagainst the CPU: Dice {compared.get('dice', float('nan')):.5f}, label maps "
              f"{'identical' if compared.get('labels_equal') else 'differ'}; findings {compared['findings']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"title": title, "facts": facts, "rounds": rounds, "throughput": runs,
                                         "compared": compared}, indent=1))
    (OUT / f"jobs-{args.plugin}-{facts['device'].split(':')[0]}.json").write_text(
        json.dumps({"title": title, "rounds": rounds, "throughput": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
