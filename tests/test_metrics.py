"""Metrics: acceptor totals are counted once, however many scrapes run at once."""

from __future__ import annotations

import threading
import time
from typing import Any

from prometheus_client import generate_latest

from dicom_node.metrics import Metrics


class _SlowLabels:
    """A counter whose ``labels`` takes a while, so that concurrent scrapes overlap."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter

    def labels(self, *values: str) -> Any:
        time.sleep(0.05)
        return self.counter.labels(*values)


def _value(metrics: Metrics, line: str) -> float:
    for row in generate_latest(metrics.registry).decode().splitlines():
        if row.startswith(line + " "):
            return float(row.split()[-1])
    return 0.0


def test_concurrent_scrapes_add_each_acceptor_count_once() -> None:
    metrics = Metrics()
    metrics.associations = _SlowLabels(metrics.associations)  # type: ignore[assignment]
    totals = {"association:accepted": 7, "instance:stored": 300, "bytes": 5000}
    start = threading.Barrier(8)

    def scrape() -> None:
        start.wait()
        metrics.add_listener_totals(totals)

    threads = [threading.Thread(target=scrape) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert _value(metrics, 'dicomnode_associations_total{outcome="accepted"}') == 7
    assert _value(metrics, 'dicomnode_instances_received_total{result="stored"}') == 300
    assert _value(metrics, "dicomnode_bytes_received_total") == 5000

    metrics.add_listener_totals({**totals, "association:accepted": 9})
    assert _value(metrics, 'dicomnode_associations_total{outcome="accepted"}') == 9
    assert _value(metrics, 'dicomnode_instances_received_total{result="stored"}') == 300
