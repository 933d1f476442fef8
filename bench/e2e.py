"""End-to-end benchmark: a 300-slice chest-CT phantom through the shipped analysis.

    .venv/bin/python -m bench.e2e [--slices 300] [--rounds 2] [--stable 1]

A node (``dicom-node serve``, embedded default configuration: chest CT -> lung_nodules)
runs in a subprocess with a short stable time and dcmtk ``storescp`` as destination.
The phantom is sent with dcmtk ``storescu`` (one association, TCP_NODELAY=1). Measured:

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
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from bench.common import DCMTK_ENV, LOOPBACK, OUT, REPO, free_port, require_tool, run_dir, wait_until

INFERENCE = "analyse.inference"  # the network's forward passes (sliding window) alone


def chest_series(slices: int) -> list[Path]:
    """The benchmark phantom (seeded), generated once and cached under bench/out/."""
    from dicom_node.synthetic.chest_phantom import write_chest_phantom

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


def _config(storage: Path, dest_port: int, stable: float) -> dict[str, Any]:
    from dicom_node.config import load_config

    data = load_config(None).model_dump(mode="json")
    data["node"].update(host=LOOPBACK, port=free_port(), storage_dir=str(storage))
    data["http"]["port"] = free_port()
    data["destinations"] = {"pacs": {"ae_title": "BENCHDEST", "host": LOOPBACK, "port": dest_port}}
    for route in data["routes"]:
        route["stable_seconds"] = stable
    data["assembly"]["poll_seconds"] = 0.1
    return data


def one_round(files: list[Path], stable: float) -> dict[str, Any]:
    """One measured run; returns the figures."""
    work = run_dir("e2e")
    dest_dir = work / "received"
    dest_dir.mkdir()
    dest_port = free_port()
    storescp = subprocess.Popen([require_tool("storescp"), "-aet", "BENCHDEST", "-od", str(dest_dir), "+xa",
                                 str(dest_port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    cfg = _config(work / "var", dest_port, stable)
    (work / "config.yaml").write_text(yaml.safe_dump(cfg))
    log = work / "node.log"
    node = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(work / "config.yaml")],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        wait_until(lambda: "dicom-node ready" in log.read_text(errors="replace"), 120, "node start", log)
        # the worker loads the model and warms up result encoding before the study is sent
        wait_until(lambda: "warmed up" in log.read_text(errors="replace"), 120, "worker warm-up", log)
        sent = subprocess.run([require_tool("storescu"), "-aec", "DICOMNODE", LOOPBACK, str(cfg["node"]["port"]),
                               *map(str, files)], env=DCMTK_ENV, capture_output=True, text=True)
        last_ack = time.time()
        if sent.returncode != 0:
            raise RuntimeError(f"storescu failed: {sent.stderr[-2000:]}")
        wait_until(lambda: len(list(dest_dir.iterdir())) >= 2, 600, "results at the destination", log)
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
    return _figures(status, last_ack, done, node_rss, worker_rss, len(list(dest_dir.iterdir())))


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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    parser = argparse.ArgumentParser(prog="python -m bench.e2e", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--stable", type=float, default=1.0, help="stable_seconds of the route")
    args = parser.parse_args(argv)
    files = chest_series(args.slices)
    rounds = []
    for i in range(args.rounds):
        figures = one_round(files, args.stable)
        print(f"round {i + 1}: e2e {figures['e2e_s']:.2f} s, stages "
              + " ".join(f"{k}={v:.2f}" for k, v in figures["stages"].items()), file=sys.stderr)
        rounds.append(figures)
    print(f"\n### End to end: {args.slices}-slice chest CT (512x512), {os.cpu_count()} cores, CPU only\n")
    print(markdown(rounds))
    (OUT / "e2e.json").write_text(json.dumps(rounds, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
