"""Ingest benchmark: dicom-node against dcmtk storescp and Orthanc, over loopback.

    .venv/bin/python -m bench.ingest [--slices 300] [--rounds 3] [--associations 1,4]

Sends ``--slices`` uncompressed 512x512 CT slices (about 0.5 MB each) with dcmtk
``storescu``. With N associations, N storescu processes run at once and each sends a
contiguous share of the same series (so every run stores each instance exactly once),
and the rate is all images / wall time from the first start to the last finish.
Receivers take turns within each round and each run gets a freshly started receiver
with empty storage. Every run is validated (storescu exit codes, one Success per file,
the receiver's own count of stored instances); an invalid run stops the benchmark.
The median over the rounds is reported as a markdown table on stdout and, with all
runs, written to ``bench/out/ingest.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    OUT,
    RECEIVERS,
    BenchError,
    NodeReceiver,
    busy_others,
    cpu_seconds,
    ct_series,
    process_table,
    run_dir,
    send,
    validate,
)

REPO_ROOT = Path(__file__).resolve().parent.parent
LABELS = {"node": "dicom-node", "storescp": "dcmtk storescp", "orthanc": "Orthanc"}


def one_run(kind: str, files: list[Path], associations: int, keep: bool,
            node_source: Path | None = None, node_settings: dict[str, Any] | None = None) -> dict[str, Any]:
    """Start a fresh receiver, send, validate, stop; return the measurements."""
    workdir = run_dir(f"{kind}-{associations}")
    receiver = RECEIVERS[kind](workdir, associations)
    if node_source is not None and isinstance(receiver, NodeReceiver):
        _run_from(receiver, node_source)
    if node_settings and isinstance(receiver, NodeReceiver):
        receiver.extra_config = {"node": {**_node_section(receiver), **node_settings}}
    try:
        receiver.start()
        cpu_before = tree_cpu_seconds(receiver.pid)
        result = send(files, receiver.port, receiver.ae_title, associations, workdir)
        cpu = tree_cpu_seconds(receiver.pid) - cpu_before
        validate(result, len(files), receiver.received(), LABELS[kind])
    finally:
        receiver.stop()
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    size = sum(p.stat().st_size for p in files)
    return {
        "receiver": kind,
        "associations": associations,
        "images": len(files),
        "bytes": size,
        "seconds": result.seconds,
        "images_per_s": len(files) / result.seconds,
        "mb_per_s": size / 1e6 / result.seconds,
        "receiver_cpu_ms_per_image": 1000 * cpu / len(files) if receiver.cpu_measurable else None,
    }


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds of a process and all its live descendants (the node's acceptor
    processes), plus its reaped children."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    total, todo = 0.0, [pid]
    while todo:
        current = todo.pop()
        total += cpu_seconds(current)
        todo.extend(children.get(current, []))
    return total


def _node_section(receiver: NodeReceiver) -> dict[str, Any]:
    """The ``node:`` section the receiver writes by default (ports, storage, disk reserve)."""
    return {"ae_title": receiver.ae_title, "host": "127.0.0.1", "port": receiver.port,
            "storage_dir": str(receiver.workdir / "storage"), "min_free_disk_mb": 1}


def parse_node_settings(items: list[str]) -> dict[str, Any]:
    """``--node-set key=value`` (YAML values) into ``node:`` settings."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--node-set {item!r}: use key=value, e.g. listener_processes=1")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _run_from(receiver: NodeReceiver, source: Path) -> None:
    """Make ``receiver`` run the node of another checkout.

    The receiver starts ``python -m dicom_node`` in this repository, and ``-m`` puts
    the working folder ahead of ``PYTHONPATH``, so this checkout's node would run
    whatever ``source`` says; ``-P`` (Python 3.11) leaves the working folder out.
    """
    receiver.source = source
    command = receiver.command

    def from_source() -> tuple[list[str], dict[str, str]]:
        cmd, env = command()
        return [cmd[0], "-P", *cmd[1:]], env

    receiver.command = from_source  # type: ignore[method-assign]


def _median_or_none(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Median per (associations, receiver)."""
    rows = []
    keys = sorted({(r["associations"], r["receiver"]) for r in runs},
                  key=lambda k: (k[0], list(RECEIVERS).index(k[1])))
    for assoc, kind in keys:
        mine = [r for r in runs if (r["associations"], r["receiver"]) == (assoc, kind)]
        rows.append({
            "associations": assoc,
            "receiver": kind,
            "images_per_s": statistics.median(r["images_per_s"] for r in mine),
            "mb_per_s": statistics.median(r["mb_per_s"] for r in mine),
            "receiver_cpu_ms_per_image": _median_or_none([r["receiver_cpu_ms_per_image"] for r in mine]),
            "rounds": [round(r["images_per_s"], 1) for r in mine],
        })
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    """The results table, with the node's ratio to each other receiver."""
    lines = [
        "| associations | receiver | images/s (median) | MB/s | node / this | receiver CPU ms/image | images/s per round |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        node = next((r for r in rows if r["associations"] == row["associations"] and r["receiver"] == "node"), None)
        ratio = f"{node['images_per_s'] / row['images_per_s']:.2f}" if node and row["receiver"] != "node" else ""
        cpu = row["receiver_cpu_ms_per_image"]
        lines.append(
            f"| {row['associations']} | {LABELS[row['receiver']]} | {row['images_per_s']:.1f} "
            f"| {row['mb_per_s']:.1f} | {ratio} | {'n/a' if cpu is None else f'{cpu:.2f}'} "
            f"| {', '.join(map(str, row['rounds']))} |"
        )
    return "\n".join(lines)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's ingest targets, checked against this run (information, not a test)."""
    rate = {(r["associations"], r["receiver"]): r["images_per_s"] for r in rows}
    lines = []
    node1, orthanc1 = rate.get((1, "node")), rate.get((1, "orthanc"))
    if node1 is not None:
        lines.append(f"- 1 association: node {node1:.0f} images/s, target >= 150: "
                     f"{'met' if node1 >= 150 else 'NOT met'}")
    if node1 is not None and orthanc1 is not None:
        lines.append(f"- 1 association: node >= Orthanc ({orthanc1:.0f}): {'met' if node1 >= orthanc1 else 'NOT met'}")
    node4, orthanc4 = rate.get((4, "node")), rate.get((4, "orthanc"))
    if node4 is not None and orthanc4 is not None:
        lines.append(f"- 4 associations: node {node4:.0f} >= 1.2 x Orthanc ({1.2 * orthanc4:.0f}): "
                     f"{'met' if node4 >= 1.2 * orthanc4 else 'NOT met'}")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=300, help="images per run (default 300)")
    p.add_argument("--size", type=int, default=512, help="rows = columns of each slice (default 512)")
    p.add_argument("--rounds", type=int, default=3, help="runs per receiver and association count (default 3)")
    p.add_argument("--associations", default="1,4",
                   help="comma-separated concurrent association counts (default 1,4)")
    p.add_argument("--receivers", default="node,storescp,orthanc",
                   help=f"comma-separated, from {','.join(RECEIVERS)} (default all)")
    p.add_argument("--json", type=Path, default=OUT / "ingest.json", help="where to write all runs")
    p.add_argument("--keep", action="store_true", help="keep each run's folder (storage, logs) in bench/out")
    p.add_argument("--node-source", type=Path, default=None,
                   help="run the node from another checkout (A/B comparisons; default this one)")
    p.add_argument("--node-set", action="append", default=[], metavar="KEY=VALUE",
                   help="a node: setting for the node's runs, e.g. listener_processes=1 (repeatable)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    counts = [int(v) for v in args.associations.split(",") if v.strip()]
    kinds = [v.strip() for v in args.receivers.split(",") if v.strip()]
    unknown = [k for k in kinds if k not in RECEIVERS]
    if unknown or not counts or min(counts) < 1:
        print(f"bad --receivers {unknown} or --associations {counts}", file=sys.stderr)
        return 2
    try:
        node_settings = parse_node_settings(args.node_set)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    files = ct_series(args.slices, args.size)
    started = dt.datetime.now(dt.UTC)
    before, t0 = process_table(), time.monotonic()
    load_before = os.getloadavg()
    runs: list[dict[str, Any]] = []
    try:
        for assoc in counts:
            for rnd in range(args.rounds):
                for kind in kinds:
                    run = one_run(kind, files, assoc, args.keep, args.node_source, node_settings)
                    run["round"] = rnd + 1
                    runs.append(run)
                    print(f"  {LABELS[kind]:15s} assoc={assoc} round {rnd + 1}: "
                          f"{run['images_per_s']:.1f} images/s", file=sys.stderr)
    except BenchError as exc:
        print(f"benchmark stopped: {exc}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - t0
    others = busy_others(before, process_table(), elapsed, exclude={os.getpid()})
    rows = summarise(runs)
    size = sum(p.stat().st_size for p in files)
    print(f"## Ingest: {len(files)} CT slices {args.size}x{args.size} uncompressed "
          f"({size / 1e6:.0f} MB), storescu over loopback, median of {args.rounds} rounds\n")
    print(markdown(rows))
    goals = targets(rows)
    if goals:
        print("\nTargets (issue 'Benchmarks'):\n" + "\n".join(goals))
    print(f"\n{started:%Y-%m-%d %H:%M} UTC, {platform.node()}, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.2f} before, {os.getloadavg()[0]:.2f} after.")
    print("Other processes using CPU during the benchmark: "
          + ("; ".join(others) if others else "none over 10% of a CPU."))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "started_utc": started.isoformat(), "cpus": os.cpu_count(), "slices": len(files),
        "bytes": size, "rounds": args.rounds, "node_source": str(args.node_source or REPO_ROOT),
        "node_settings": node_settings, "other_processes": others, "summary": rows, "runs": runs,
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
