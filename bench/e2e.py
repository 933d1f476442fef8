"""End-to-end benchmark: a chest-CT phantom (300 slices) through an analysis plugin.

    .venv/bin/python -m bench.e2e [--slices 300] [--rounds 2] [--stable 1]
        [--plugin lung_nodules|lung_nodule_ct_detection|wholeBody_ct_segmentation]
        [--device cpu|cuda] [--timeout 1800]

A node (``dicom-node serve``) runs in a subprocess with a short stable time and dcmtk
``storescp`` as destination. ``--plugin lung_nodules`` (the default) is the embedded
default configuration (chest CT -> lung_nodules), unchanged. The two MONAI Model Zoo
bundles run through the generic ``monai_bundle`` factory from ``bench/out/bundles/``
(built once by :mod:`bench.bundles`: the bundle's configs and the shipped manifest,
unchanged, with seeded random weights), with the route sending every CT to them:

* ``lung_nodule_ct_detection``: 3D RetinaNet, boxes -> one SR (no SEG);
* ``wholeBody_ct_segmentation``: SegResNet, 104 structures -> SEG + SR.

Random weights cost what the real ones cost, so timings and memory are real; the
findings are not (the detector's random boxes score about 0.1, under the manifest's
0.5 threshold: it reports "no findings").

The phantom is sent with dcmtk ``storescu`` (one association, TCP_NODELAY=1) once the
analysis worker has warmed up (model loaded). The run waits for the job to finish,
then for as many result objects at the destination as the job recorded. Measured:

* e2e: from the last acknowledged instance (storescu's end) to the last result
  acknowledged at the destination (the newest file storescp wrote), minus the stable
  wait, which is reported on its own;
* the per-stage breakdown from the node's own stage timings (state database), plus
  queue (dispatch to job start), bookkeeping and delivery;
* peak RSS of the node process and of its analysis worker (VmHWM from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import (
    DCMTK_ENV,
    LOOPBACK,
    OUT,
    REPO,
    BenchError,
    free_port,
    require_tool,
    run_dir,
    wait_until,
)

INFERENCE = "analyse.inference"  # the network's forward passes (sliding window) alone
DEFAULT_PLUGIN = "lung_nodules"  # the embedded default configuration's plugin
BUNDLE_PLUGINS = ("lung_nodule_ct_detection", "wholeBody_ct_segmentation")  # see bench.bundles
PLUGINS = (DEFAULT_PLUGIN, *BUNDLE_PLUGINS)
DEFAULT_TIMEOUT_S = 1800.0  # the detector's full-size sliding window on 2 cores: 10+ minutes
JOB_POLL_S = 0.5  # state database poll while the job runs (cheap; it does not set the figures)
FOUND = re.compile(r"found (\d+) finding\(s\)")


def chest_series(slices: int) -> list[Path]:
    """The benchmark phantom (seeded), generated once and cached under bench/out/."""
    from phantoms.chest_phantom import write_chest_phantom

    folder = OUT / f"chest-{slices}"
    marker = folder / "complete.json"
    if marker.exists() and json.loads(marker.read_text()).get("count") == slices:
        return sorted(folder.glob("*.dcm"))
    print(f"generating a {slices}-slice chest-CT phantom in {folder} ...", file=sys.stderr)
    paths, phantom = write_chest_phantom(folder, 3, slices=slices, rows=512, pixel_spacing_mm=0.7,
                                         slice_spacing_mm=1.25, nodule_diameters_mm=(20.0, 12.0, 8.0, 6.0),
                                         noise_hu=15.0)
    marker.write_text(json.dumps({"count": len(paths), "nodules_mm": [n.diameter_mm for n in phantom.nodules]}))
    return paths


def _vm_hwm_kib(pid: int) -> int:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0
    return int(text.split("VmHWM:")[1].split()[0])


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _config(storage: Path, dest_port: int, stable: float, plugin: str = DEFAULT_PLUGIN,
            bundle_dir: Path | None = None, device: str | None = None) -> dict[str, Any]:
    """The node's configuration: the embedded default, on free ports, with ``plugin``.

    ``lung_nodules`` with no ``device`` is the embedded default, unchanged. For a bundle
    plugin, ``plugins:`` names it with the ``monai_bundle`` factory and one
    route (the default's first, its plugin replaced) sends every CT study to it.
    """
    from dicom_node.config import load_config

    data = load_config(None).model_dump(mode="json")
    data["node"].update(host=LOOPBACK, port=free_port(), storage_dir=str(storage))
    data["http"]["port"] = free_port()
    data["destinations"] = {"pacs": {"ae_title": "BENCHDEST", "host": LOOPBACK, "port": dest_port}}
    if plugin == DEFAULT_PLUGIN and device is not None:  # the default otherwise: the plugin picks
        data["plugins"] = {plugin: {"options": {"device": device}}}
    elif plugin != DEFAULT_PLUGIN:
        if bundle_dir is None:
            raise ValueError(f"plugin {plugin!r} needs its bundle folder")
        data["plugins"] = {plugin: {"factory": "monai_bundle",
                                    "options": {"bundle_dir": str(bundle_dir), "device": device}}}
        route = dict(data["routes"][0])
        route.update(name=f"ct-{plugin}", plugin=plugin, match={"Modality": "^CT$"}, destinations=["pacs"])
        data["routes"] = [route]
    for route in data["routes"]:
        route["stable_seconds"] = stable
    data["assembly"]["poll_seconds"] = 0.1
    return data


def _state(storage: Path) -> tuple[dict[str, Any] | None, int]:
    """The newest job (id, state, reason) and its recorded result count, read-only."""
    db = storage / "state.sqlite3"
    if not db.exists():
        return None, 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1.0)
    except sqlite3.Error:
        return None, 0
    try:
        conn.row_factory = sqlite3.Row
        row = conn.execute("SELECT id, state, reason FROM jobs ORDER BY id DESC LIMIT 1").fetchone()
        if row is None:
            return None, 0
        count = conn.execute("SELECT COUNT(*) FROM results WHERE job_id=?", (row["id"],)).fetchone()[0]
        return dict(row), int(count)
    except sqlite3.Error:  # the node may hold the database for an instant
        return None, 0
    finally:
        conn.close()


def _wait_for_job(storage: Path, node: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    """Wait until the job is done; returns how many result objects it recorded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if node.poll() is not None:
            raise BenchError(f"the node exited ({node.returncode}) during the job\n"
                             + log.read_text(errors="replace")[-3000:])
        job, results = _state(storage)
        # a superseded job (more instances came after the stable wait) is followed by a newer one
        if job is not None and job["state"] in ("done", "failed"):
            if job["state"] != "done":
                raise BenchError(f"job {job['id']} {job['state']}: {job['reason']}")
            if results == 0:
                raise BenchError(f"job {job['id']} produced no result: {job['reason']}")
            return results
        time.sleep(JOB_POLL_S)
    job, _ = _state(storage)
    raise BenchError(f"timed out after {timeout:.0f} s waiting for the job ({job})\n"
                     + log.read_text(errors="replace")[-3000:])


def _result_kinds(folder: Path) -> list[str]:
    """The Modality (SEG, SR) of each object at the destination."""
    import pydicom

    kinds = []
    for path in sorted(folder.iterdir()):
        try:
            kinds.append(str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["Modality"]).Modality))
        except Exception:  # noqa: BLE001 - a partial or foreign file is reported, not fatal
            kinds.append("?")
    return sorted(kinds)


def one_round(files: list[Path], stable: float, plugin: str = DEFAULT_PLUGIN, bundle_dir: Path | None = None,
              device: str | None = None, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, Any]:
    """One measured run; returns the figures."""
    work = run_dir("e2e")
    dest_dir = work / "received"
    dest_dir.mkdir()
    dest_port = free_port()
    storescp = subprocess.Popen([require_tool("storescp"), "-aet", "BENCHDEST", "-od", str(dest_dir), "+xa",
                                 str(dest_port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    cfg = _config(work / "var", dest_port, stable, plugin, bundle_dir, device)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    log = work / "node.log"
    node = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(work / "config.yaml")],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})

    def logged(text: str) -> bool:
        if node.poll() is not None:
            raise BenchError(f"the node exited ({node.returncode}) before {text!r}\n"
                             + log.read_text(errors="replace")[-3000:])
        return text in log.read_text(errors="replace")

    try:
        start_timeout = max(120.0, min(timeout, 600.0))  # a bundle's model load is slower on a busy machine
        wait_until(lambda: logged("dicom-node ready"), start_timeout, "node start", log)
        # the worker loads the model and warms up result encoding before the study is sent
        wait_until(lambda: logged("warmed up"), start_timeout, "worker warm-up", log)
        sent = subprocess.run([require_tool("storescu"), "-aec", "DICOMNODE", LOOPBACK, str(cfg["node"]["port"]),
                               *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True)
        last_ack = time.time()
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-2000:]}")
        expected = _wait_for_job(work / "var", node, timeout, log)
        # the delivery follows the job: seconds at most
        wait_until(lambda: len(list(dest_dir.iterdir())) >= expected, 120, f"{expected} results at the destination",
                   log)
        time.sleep(0.5)
        done = max(p.stat().st_mtime for p in dest_dir.iterdir())
        status = _status(work / "config.yaml")
        worker_rss = max((_vm_hwm_kib(c) for c in _children(node.pid)), default=0)
        node_rss = _vm_hwm_kib(node.pid)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(60)
        storescp.terminate()
        storescp.wait(10)
    figures = _figures(status, last_ack, done, node_rss, worker_rss, len(list(dest_dir.iterdir())))
    found = FOUND.findall(log.read_text(errors="replace"))
    figures.update(plugin=plugin, device=device or _default_device(), result_kinds=_result_kinds(dest_dir),
                   findings=int(found[-1]) if found else None)
    return figures


def _status(config: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "dicom_node", "status", "--json", "--config", str(config)],
                         capture_output=True, text=True, cwd=REPO, check=True)
    return json.loads(out.stdout)


def _figures(status: dict[str, Any], last_ack: float, done: float, node_rss: int, worker_rss: int,
             results: int) -> dict[str, Any]:
    job = status["jobs"][0]
    study = status["studies"][0]
    stable_wait = job["created_at"] - study["last_received_at"]
    stages = dict(job["timings"])
    inside = [k for k in stages if k.startswith("analyse.")]
    if inside and "analyse" in stages:  # in the plugin but in none of its sub-stages
        last = list(stages).index(inside[-1])
        rest = max(0.0, stages["analyse"] - sum(stages[k] for k in inside))
        items = list(stages.items())
        stages = dict([*items[: last + 1], ("analyse.other", rest), *items[last + 1 :]])
    stages["queue"] = job["started_at"] - job["created_at"]
    delivery = status["deliveries"][0]
    stages["delivery"] = max(0.0, done - job["finished_at"])
    e2e = done - last_ack - stable_wait
    accounted = sum(v for k, v in stages.items() if "." not in k)  # sub-stages are inside "analyse"
    stages["other"] = max(0.0, e2e - accounted)
    return {"e2e_s": e2e, "stable_wait_s": stable_wait, "stages": stages, "results": results,
            "delivery_state": delivery["state"], "node_peak_rss_mib": node_rss / 1024,
            "worker_peak_rss_mib": worker_rss / 1024,
            "non_inference_share": 1 - stages.get(INFERENCE, stages.get("analyse", 0.0)) / e2e if e2e > 0 else None,
            "non_analyse_share": 1 - stages.get("analyse", 0.0) / e2e if e2e > 0 else None}


def markdown(rounds: list[dict[str, Any]]) -> str:
    """Median figures as a Markdown table."""
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    stage_names = list(rounds[0]["stages"])
    lines = ["| measure | median | rounds |", "|---|---|---|",
             f"| e2e, last instance acknowledged -> last result acknowledged (stable wait excluded) | "
             f"{med('e2e_s'):.2f} s | " + ", ".join(f"{r['e2e_s']:.2f}" for r in rounds) + " |",
             f"| stable wait (reported apart) | {med('stable_wait_s'):.2f} s | |"]
    for name in stage_names:
        values = [r["stages"].get(name, 0.0) for r in rounds]
        lines.append(f"| stage: {name} | {statistics.median(values):.2f} s | "
                     + ", ".join(f"{v:.2f}" for v in values) + " |")
    lines.append(f"| everything except model inference (network forward) | {100 * med('non_inference_share'):.0f} % of e2e | |")
    lines.append(f"| everything except the analyse stage (plugin, incl. pre/postprocessing) | "
                 f"{100 * med('non_analyse_share'):.0f} % of e2e | |")
    lines.append(f"| peak RSS, node process | {med('node_peak_rss_mib'):.0f} MiB | |")
    lines.append(f"| peak RSS, analysis worker | {med('worker_peak_rss_mib'):.0f} MiB | |")
    if "result_kinds" in rounds[0]:
        lines.append("| results at the destination | " + " + ".join(rounds[0]["result_kinds"]) + " | "
                     + ", ".join(" + ".join(r["result_kinds"]) for r in rounds) + " |")
        lines.append("| findings reported | " + _findings(rounds[0]["findings"]) + " | "
                     + ", ".join(_findings(r["findings"]) for r in rounds) + " |")
    return "\n".join(lines)


def _findings(count: int | None) -> str:
    return "?" if count is None else "none (\"no findings\")" if count == 0 else str(count)


def _default_device() -> str:
    """What a plugin given no device picks (as ``MonaiBundlePlugin._pick_device``)."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _title(args: argparse.Namespace) -> str:
    what = f"{args.plugin} on {args.device or _default_device()}"
    if args.plugin in BUNDLE_PLUGINS:
        what += " (MONAI bundle, random weights: timings and memory real, findings not)"
    return f"### End to end: {args.slices}-slice chest CT (512x512), {what}, {os.cpu_count()} cores"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stable", type=float, default=1.0, help="stable_seconds of the route")
    parser.add_argument("--plugin", choices=PLUGINS, default=DEFAULT_PLUGIN,
                        help=f"the analysis plugin (default {DEFAULT_PLUGIN}, the embedded configuration)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None,
                        help="the plugin's device (bundles: default cpu; lung_nodules: default as the "
                             "embedded configuration has it, the plugin's own choice)")
    parser.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT_S,
                        help=f"seconds to wait for the job's results (default {DEFAULT_TIMEOUT_S:.0f})")
    args = parser.parse_args(argv)
    bundle_dir = None
    if args.plugin in BUNDLE_PLUGINS:
        args.device = args.device or "cpu"
        from bench.bundles import bundle_dir as build_bundle

        bundle_dir = build_bundle(args.plugin)
    files = chest_series(args.slices)
    rounds = []
    for i in range(args.rounds):
        figures = one_round(files, args.stable, args.plugin, bundle_dir, args.device, args.timeout)
        print(f"round {i + 1}: e2e {figures['e2e_s']:.2f} s, stages "
              + " ".join(f"{k}={v:.2f}" for k, v in figures["stages"].items()), file=sys.stderr)
        rounds.append(figures)
    print(f"\n{_title(args)}\n")
    print(markdown(rounds))
    name = "e2e.json" if args.plugin == DEFAULT_PLUGIN else f"e2e-{args.plugin}.json"
    (OUT / name).write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
