"""Where the node's ingest time goes, per instance (one association).

    .venv/bin/python -m bench.profile_ingest [--slices 300] [--rounds 2]

Runs the node in this process (default durable settings, storage under bench/out),
wraps the stages of the C-STORE path with wall-clock timers, sends the series with
one dcmtk ``storescu`` association and prints the mean milliseconds per instance of
each stage. "Waiting" is the rest of the wall time per instance: storescu reading and
sending the next file, and the hand-offs between the association's threads (the node
replaces pynetdicom's 1 ms polling sleeps by waits on the socket and the queues, see
``dicom_node/receive/reactor.py``; stock pynetdicom spends about 2 ms per instance there).
Background work (slot files made ahead, batched folder syncs, sha256 in a worker
thread) is timed too but is not on the C-STORE's path.

Timers add a few microseconds per call; the rate printed is therefore a little lower
than ``bench.ingest`` measures. For a sampling profile of the whole process use
py-spy (``pip install py-spy``; ``py-spy record -p PID -f raw --threads``) on a
``dicom-node serve`` process instead.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import os
import shutil
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

from bench.common import LOOPBACK, ct_series, free_port, run_dir, send, validate

TOTALS: defaultdict[str, float] = defaultdict(float)
CALLS: Counter[str] = Counter()
_LOCK = threading.Lock()


def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` with its wall time added to ``TOTALS[name]``."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            with _LOCK:
                TOTALS[name] += time.perf_counter() - start
                CALLS[name] += 1

    return wrapper


# (label, owner, attribute); order = the order of the table.
def _stages() -> list[tuple[str, Any, str]]:
    from pynetdicom import dimse, dul, events

    from dicom_node.receive import ingest, reactor, scp
    from dicom_node.storage import spool, state

    os_proxy = SimpleNamespace(**{k: getattr(os, k) for k in dir(os) if not k.startswith("__")})
    hash_proxy = SimpleNamespace(sha256=hashlib.sha256)
    spool.os = os_proxy  # type: ignore[assignment]
    spool.hashlib = hash_proxy  # type: ignore[assignment]
    return [
        ("DUL: read + decode the PDUs", dul.DULServiceProvider, "_read_pdu_data"),
        ("DIMSE: reassemble P-DATA into the message", dimse.DIMSEServiceProvider, "receive_primitive"),
        ("C-STORE handler, all of it (_on_store)", scp.StorageSCP, "_on_store"),
        ("  received bytes (file meta + payload)", scp, "received_bytes"),
        ("  event.encoded_dataset (pydicom file meta + payload)", events.Event, "encoded_dataset"),
        ("  Ingestor.store, all of it", ingest.Ingestor, "store"),
        ("    header parse", ingest, "_header"),
        ("    duplicate check (SELECT)", ingest.Ingestor, "_is_duplicate"),
        ("    free-space check (statvfs)", ingest.Ingestor, "_check_space"),
        ("    spool write, all of it (Spool.store)", spool.Spool, "store"),
        ("      take a free slot (made ahead by a background thread)", spool.SlotPool, "take"),
        ("      write into the slot + flush (write_to_slot)", spool, "write_to_slot"),
        ("        os.open of the slot", os_proxy, "open"),
        ("        os.pwrite of the bytes and the stamp", os_proxy, "pwrite"),
        ("        fdatasync of the slot", os_proxy, "fdatasync"),
        ("        os.close", os_proxy, "close"),
        ("      rename the slot to its final name", os_proxy, "replace"),
        ("      sha256 (a worker thread, overlaps the write)", hash_proxy, "sha256"),
        ("      folder fsync (old layout; now batched in the background)", spool, "_sync_dir"),
        ("    SQLite register + commit (no flush: synchronous=NORMAL)", state.StateDB, "register_instance"),
        ("DIMSE: encode the response", dimse.DIMSEServiceProvider, "send_msg"),
        ("DIMSE: encode the response (the node's C-STORE-RSP encoder)", reactor.FastStoreDIMSE, "send_msg"),
        ("DUL: encode + send a PDU", dul.DULServiceProvider, "_send"),
    ]


def instrument() -> list[str]:
    """Wrap every stage that exists in this version of the node; return their labels."""
    labels = []
    for label, owner, attr in _stages():
        if hasattr(owner, attr):
            setattr(owner, attr, timed(label, getattr(owner, attr)))
            labels.append(label)
    return labels


def _override_dul_delay(delay: float) -> None:
    from pynetdicom import dul

    original = dul.DULServiceProvider.run_reactor

    def run_reactor(self: Any) -> None:
        self._run_loop_delay = delay
        original(self)

    dul.DULServiceProvider.run_reactor = run_reactor  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile_ingest", description=__doc__.split("\n\n")[0])
    p.add_argument("--slices", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2, help="runs (fresh node each); the stage table sums all")
    p.add_argument("--dul-delay", type=float, default=None,
                   help="experiment: override pynetdicom's DUL reactor sleep (seconds; the node's reactor only "
                        "sleeps it when the socket is closed)")
    args = p.parse_args(argv)
    files = ct_series(args.slices)
    labels = instrument()
    if args.dul_delay is not None:
        _override_dul_delay(args.dul_delay)

    from dicom_node.config import parse_config
    from dicom_node.node import Node

    wall = 0.0
    images = 0
    for _ in range(args.rounds):
        workdir = run_dir("profile")
        config = parse_config({
            "node": {"host": LOOPBACK, "port": free_port(), "storage_dir": str(workdir / "storage"),
                     "min_free_disk_mb": 1, "listener_processes": 1},  # in this process, to be timed
            "http": {"enabled": False},
            "retention": {"ignored_days": None},
        })
        node = Node(config)
        node.start()
        try:
            result = send(files, node.port, config.node.ae_title, 1, workdir)
            stored = len(list((workdir / "storage" / "spool").rglob("*.dcm")))
            validate(result, len(files), stored, "node")
        finally:
            node.stop()
            shutil.rmtree(workdir, ignore_errors=True)
        wall += result.seconds
        images += len(files)
        print(f"run: {len(files) / result.seconds:.1f} images/s (instrumented)", file=sys.stderr)
    per = 1000 / images
    print(f"## Node ingest, one association: {images / wall:.1f} images/s instrumented, "
          f"{wall * per:.2f} ms wall per instance\n")
    print("| stage | ms per instance | calls per instance |")
    print("|---|---:|---:|")
    for label in (k for k in labels if CALLS[k]):
        print(f"| {label} | {TOTALS[label] * per:.3f} | {CALLS[label] / images:.1f} |")
    critical = sum(TOTALS[k] for k in labels if k.startswith(("DUL", "DIMSE", "C-STORE")))
    print(f"| waiting (storescu, polling sleeps, thread hand-offs) | {(wall - critical) * per:.3f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
