"""Load harness: many concurrent dcmtk storescu senders against one node, for minutes.

    .venv/bin/python -m bench.load [--senders 16] [--slices 100] [--duration 120]

Each sender repeatedly sends its own new 100-slice study (fresh UIDs each round) over
loopback until the duration is over. The node runs with ``max_associations`` below the
number of senders, so some associations are rejected (transient, local limit
exceeded); a rejected sender waits briefly and tries again, as a PACS would. The
analysis is the test threshold plugin (cheap, so the queue drains within minutes);
results go to dcmtk ``storescp``. Afterwards the harness waits (bounded) for every
study to be analysed and delivered, then checks: zero failed C-STOREs, zero lost
instances, every study analysed exactly once and delivered exactly once. It reports
throughput and the per-study send latency percentiles.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench.common import DCMTK_ENV, LOOPBACK, OUT, REPO, free_port, require_tool, run_dir, wait_until

ROOT = "1.2.826.0.1.3680043.10.1147"  # UIDs below are all the same length per kind
REJECTED = "Association Rejected"


def _uid(sender: int, kind: int, index: int, round_: int) -> str:
    """Fixed-width components that never start with 0 (valid UIDs of equal length)."""
    return f"{ROOT}.{10 + sender}.{kind}.{1000 + index}.{10000000 + round_}"


def templates(senders: int, slices: int, size: int) -> dict[int, list[tuple[str, bytes]]]:
    """One template study per sender (round 0 UIDs), kept in memory as bytes."""
    from phantoms.ct_writer import SeriesLayout, StudyIdentity, build_slice
    from tests.support import dense_phantom

    volume = dense_phantom(slices, size)
    out: dict[int, list[tuple[str, bytes]]] = {}
    import io

    for s in range(senders):
        study = StudyIdentity(study_instance_uid=_uid(s, 1, 0, 0), frame_of_reference_uid=_uid(s, 3, 0, 0),
                              patient_id=f"LOAD-{s:02d}")
        layout = SeriesLayout(series_instance_uid=_uid(s, 2, 0, 0), pixel_spacing_mm=(1.0, 1.0))
        files = []
        for i in range(slices):
            ds = build_slice(volume[i], i, study, layout)
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = _uid(s, 4, i, 0)
            buffer = io.BytesIO()
            ds.save_as(buffer, enforce_file_format=True)
            files.append((_uid(s, 4, i, 0), buffer.getvalue()))
        out[s] = files
    return out


def materialise(template: list[tuple[str, bytes]], sender: int, round_: int, folder: Path) -> list[Path]:
    """Write one round's study: the template with every UID renewed (same lengths)."""
    folder.mkdir(parents=True, exist_ok=True)
    swaps = [(_uid(sender, k, 0, 0).encode(), _uid(sender, k, 0, round_).encode()) for k in (1, 2, 3)]
    paths = []
    for i, (sop, data) in enumerate(template):
        for old, new in swaps:
            data = data.replace(old, new)
        data = data.replace(sop.encode(), _uid(sender, 4, i, round_).encode())
        path = folder / f"{i:04d}.dcm"
        path.write_bytes(data)
        paths.append(path)
    return paths


@dataclass
class Tally:
    """What the senders did (shared, under a lock)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    studies: list[str] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    images: int = 0
    failures: int = 0
    rejections: int = 0


def sender(index: int, template: list[tuple[str, bytes]], port: int, until: float, work: Path,
           tally: Tally) -> None:
    """Send new studies until ``until``; retry rejected associations."""
    round_ = 1
    while time.monotonic() < until:
        files = materialise(template, index, round_, work / f"s{index:02d}" / f"r{round_}")
        start = time.monotonic()
        while True:
            run = subprocess.run([require_tool("storescu"), "-v", "-aec", "DICOMNODE", "-aet", f"LOAD{index:02d}",
                                  LOOPBACK, str(port), *map(str, files)], capture_output=True, text=True,
                                 env=DCMTK_ENV)
            if REJECTED in run.stderr and "Received Store Response" not in run.stderr:
                with tally.lock:
                    tally.rejections += 1
                time.sleep(0.2)
                continue
            break
        elapsed = time.monotonic() - start
        ok = run.stderr.count("Received Store Response (Success)")
        with tally.lock:
            tally.studies.append(_uid(index, 1, 0, round_))
            tally.latencies.append(elapsed)
            tally.images += ok
            tally.failures += len(files) - ok
        for path in files:
            path.unlink()
        round_ += 1


def _status(config: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "dicom_node", "status", "--json", "--limit", "100000",
                          "--config", str(config)], capture_output=True, text=True, cwd=REPO, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)})
    return json.loads(out.stdout)


def run(args: argparse.Namespace) -> dict[str, Any]:
    """One load run; returns the figures and the checks."""
    work = run_dir("load")
    dest = work / "received"
    dest.mkdir()
    dest_port, port = free_port(), free_port()
    storescp = subprocess.Popen([require_tool("storescp"), "-aet", "LOADDEST", "-od", str(dest), "+xa",
                                 str(dest_port)], env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    cfg = {
        "node": {"ae_title": "DICOMNODE", "host": LOOPBACK, "port": port, "storage_dir": str(work / "var"),
                 "max_associations": args.max_associations},
        "http": {"port": free_port()},
        "destinations": {"dest": {"ae_title": "LOADDEST", "host": LOOPBACK, "port": dest_port}},
        "plugins": {"dense": {"factory": "tests.fake_plugins:create", "options": {"threshold": 300}}},
        "routes": [{"name": "load", "match": {"Modality": "^CT$"}, "plugin": "dense", "stable_seconds": 2,
                    "destinations": ["dest"]}],
        "assembly": {"poll_seconds": 0.2},
        "retention": {"delivered_days": None},
    }
    config = work / "config.yaml"
    config.write_text(yaml.safe_dump(cfg))
    log = work / "node.log"
    node = subprocess.Popen([sys.executable, "-m", "dicom_node", "serve", "--config", str(config)],
                            stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=REPO,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    tally = Tally()
    try:
        wait_until(lambda: "dicom-node ready" in log.read_text(errors="replace"), 120, "node start", log)
        print(f"generating {args.senders} template studies ...", file=sys.stderr)
        temps = templates(args.senders, args.slices, args.size)
        until = time.monotonic() + args.duration
        started = time.monotonic()
        threads = [threading.Thread(target=sender, args=(i, temps[i], port, until, work, tally))
                   for i in range(args.senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        send_seconds = time.monotonic() - started
        queue_at_end = _status(config)["counts"]
        wait_until(lambda: _settled(_status(config), len(tally.studies)), args.drain_timeout,
                   "every study analysed and delivered", log)
        drained = time.monotonic() - started - send_seconds
        status = _status(config)
    finally:
        node.send_signal(signal.SIGTERM)
        node.wait(120)
        storescp.terminate()
        storescp.wait(10)
    return _report(args, tally, status, send_seconds, drained, queue_at_end, dest)


def _settled(status: dict[str, Any], studies: int) -> bool:
    done = [s for s in status["studies"] if s["state"] in ("done", "failed")]
    return len(done) >= studies


def _report(args: argparse.Namespace, tally: Tally, status: dict[str, Any], send_seconds: float,
            drained: float, queue_at_end: dict[str, Any], dest: Path) -> dict[str, Any]:
    jobs_per_study: dict[str, int] = {}
    for job in status["jobs"]:
        jobs_per_study[job["study_uid"]] = jobs_per_study.get(job["study_uid"], 0) + 1
    delivered = [d for d in status["deliveries"] if d["state"] == "done"]
    instances = sum(s["instance_count"] for s in status["studies"])
    received = len(list(dest.iterdir()))
    lat = sorted(tally.latencies)
    checks = {
        "failed C-STOREs": tally.failures,
        "lost instances": len(tally.studies) * args.slices - instances,
        "studies not analysed exactly once": sum(1 for s in tally.studies if jobs_per_study.get(s) != 1),
        "studies not delivered exactly once": len(tally.studies) - len(delivered),
        "studies not done": sum(1 for s in status["studies"] if s["state"] != "done"),
    }
    return {
        "senders": args.senders, "max_associations": args.max_associations, "studies": len(tally.studies),
        "slices": args.slices, "size": args.size,
        "images": tally.images, "send_seconds": send_seconds, "images_per_s": tally.images / send_seconds,
        "latency_p50_s": statistics.median(lat), "latency_p95_s": lat[int(0.95 * (len(lat) - 1))],
        "rejected_associations_retried": tally.rejections, "drain_seconds": drained,
        "queue_when_sending_stopped": queue_at_end, "result_objects_received": received, "checks": checks,
    }


def markdown(r: dict[str, Any]) -> str:
    """The figures as a Markdown table."""
    rows = [
        ("senders (concurrent storescu) / node max_associations", f"{r['senders']} / {r['max_associations']}"),
        (f"studies sent ({r['slices']} slices of {r['size']}x{r['size']} each, new UIDs each round)",
         str(r["studies"])),
        ("sending time", f"{r['send_seconds']:.0f} s"),
        ("ingest throughput", f"{r['images_per_s']:.0f} images/s"),
        ("per-study send latency p50 / p95", f"{r['latency_p50_s']:.2f} s / {r['latency_p95_s']:.2f} s"),
        ("associations rejected (local limit) and retried", str(r["rejected_associations_retried"])),
        ("jobs queued when sending stopped", str(r["queue_when_sending_stopped"].get("jobs", {}))),
        ("time to drain the analysis queue after sending", f"{r['drain_seconds']:.0f} s"),
    ] + [(name, str(value)) for name, value in r["checks"].items()]
    return "\n".join(["| measure | value |", "|---|---|", *(f"| {a} | {b} |" for a, b in rows)])


def main(argv: list[str] | None = None) -> int:
    """Run the harness, print the table; exit 1 when a check fails."""
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--senders", type=int, default=16)
    parser.add_argument("--slices", type=int, default=100)
    parser.add_argument("--size", type=int, default=128, help="rows and columns of each slice")
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of sending")
    parser.add_argument("--max-associations", type=int, default=12)
    parser.add_argument("--drain-timeout", type=float, default=1200.0)
    args = parser.parse_args(argv)
    result = run(args)
    print(f"\n### Load: {args.senders} concurrent senders for {args.duration:.0f} s, {os.cpu_count()} cores\n")
    print(markdown(result))
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "load.json").write_text(json.dumps(result, indent=1))
    return 0 if not any(result["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
