"""``dicom-node demo``: the product working in under two minutes, on this machine alone.

It starts a node on the embedded default configuration (free loopback ports, a
throw-away storage folder, a short stable time) and a local destination that receives
the results; generates a chest-CT phantom with nodules; sends it; shows progress;
prints the findings table read back from the SR; and writes what the destination
received (SEG, SR, the key images as Secondary Capture, the Key Object Selection) and
a PNG preview, which is the key images' own pixels, to the output folder.
"""

from __future__ import annotations

import math

import shutil
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pynetdicom import evt
from pynetdicom.ae import ApplicationEntity
from pynetdicom.presentation import AllStoragePresentationContexts

from dicom_node.config import Config, load_config, parse_config
from dicom_node.net.scu import Peer, describe_file, store_files
from dicom_node.preview import write_preview
from dicom_node.results.readback import ReportedFinding, read_findings

DEMO_NODULES_MM = (22.0, 14.0, 9.0, 6.5)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ResultReceiver:
    """A local Storage SCP standing in for the PACS: it keeps what the node sends."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.port = _free_port()
        self.received: list[Path] = []
        self._event = threading.Event()
        self._ae = ApplicationEntity("DEMOPACS")
        self._ae.supported_contexts = AllStoragePresentationContexts
        self._server: Any = None

    def start(self) -> "ResultReceiver":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._server = self._ae.start_server(("127.0.0.1", self.port), block=False,
                                             evt_handlers=[(evt.EVT_C_STORE, self._store)])
        return self

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        kind = {"OT": "SC"}.get(str(ds.Modality), str(ds.Modality))
        path = self.folder / f"{kind}-{ds.SeriesNumber}-{ds.InstanceNumber}.dcm"
        ds.save_as(path, enforce_file_format=True)
        self.received.append(path)
        self._event.set()
        return 0x0000

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()


def demo_config(storage: Path, dest_port: int) -> Config:
    """The embedded default, moved to free loopback ports and a demo storage folder."""
    data = load_config(None).model_dump(mode="json")
    data["node"].update(host="127.0.0.1", port=_free_port(), storage_dir=str(storage))
    data["http"].update(port=0)
    data["destinations"] = {"pacs": {"ae_title": "DEMOPACS", "host": "127.0.0.1", "port": dest_port}}
    for route in data["routes"]:
        route["stable_seconds"] = 2
    data["assembly"]["poll_seconds"] = 0.2
    data["logging"]["level"] = "WARNING"
    return parse_config(data, "demo")


def _say(start: float, text: str) -> None:
    print(f"[{time.monotonic() - start:5.1f} s] {text}", flush=True)


def _wait_for_results(node: Any, study_uid: str, start: float, timeout: float) -> dict[str, Any]:
    shown: set[str] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        study = node.db.study(study_uid) or {}
        jobs = node.db.query("SELECT state, reason, timings FROM jobs WHERE study_uid=?", (study_uid,))
        phase = study.get("state", "receiving")
        if jobs and jobs[0]["state"] == "running":
            phase = "analysing"
        elif jobs and jobs[0]["state"] == "done" and phase == "processing":
            phase = "delivering"
        if phase not in shown:
            shown.add(phase)
            _say(start, {"receiving": "waiting for the study to become stable (2 s without new images)",
                         "processing": "study stable: queued for analysis",
                         "analysing": f"analysing with the lung-nodule model (MONAI, {_device_text()})",
                         "delivering": "sending SEG, SR, key images and KOS to the destination",
                         "done": "results confirmed by the destination"}.get(phase, phase))
        if phase in ("done", "failed"):
            return {"study": study, "jobs": jobs}
        time.sleep(0.2)
    raise TimeoutError(f"no result within {timeout:.0f} s")


def _device_text() -> str:
    """The device the demo's plugin runs on: its default, CUDA when there is one."""
    import torch

    return f"CUDA, {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else "CPU"


def _location(f: ReportedFinding, sources: dict[str, Path]) -> str:
    path = sources.get(f.key_image_uid)
    if path is None or f.long_axis_points is None:
        return "?"
    ds = dcmread(path, stop_before_pixels=True)
    col = float(f.long_axis_points[:2, 0].mean())
    x_mm = float(ds.ImagePositionPatient[0]) + col * float(ds.PixelSpacing[1])
    centre = float(ds.ImagePositionPatient[0]) + ds.Columns * float(ds.PixelSpacing[1]) / 2
    side = "right" if x_mm < centre else "left"  # LPS: patient's right is -x
    return f"{side} lung, image {int(ds.InstanceNumber)} (z {float(ds.ImagePositionPatient[2]):.1f} mm)"


def print_table(findings: list[ReportedFinding], sources: dict[str, Path]) -> None:
    """The findings table a radiologist would read."""
    rows = [(f.name, _location(f, sources), f"{f.long_axis_mm:.1f}", f"{f.short_axis_mm:.1f}",
             f"{f.volume_mm3:.0f}", "not measured" if math.isnan(f.mean_hu) else f"{f.mean_hu:.0f}",
             "-" if math.isnan(f.certainty_percent) else f"{f.certainty_percent:.0f}")
            for f in findings]
    head = ("Nodule", "Location", "Long axis mm", "Short axis mm", "Volume mm3", "Mean HU", "Score %")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if not rows:
        print("(no nodule found)")


def print_truth(phantom: Any) -> None:
    """What the phantom holds, to compare with the table: each nodule's volume from the
    generator's label voxels (an irregular nodule is a union of balls) and its HU."""
    from scipy import ndimage

    components, _ = ndimage.label(phantom.labels_zyx > 0, structure=np.ones((3, 3, 3), dtype=bool))
    voxel_mm3 = float(np.prod(phantom.spacing_zyx))
    print("Phantom truth (largest first):")
    rows = []
    for nodule in phantom.nodules:
        index = tuple(int(round(c)) for c in nodule.centre_voxel_zyx)
        label = int(components[index])
        volume = float((components == label).sum()) * voxel_mm3 if label else float("nan")
        where = "juxtapleural" if nodule.juxtapleural else "juxtavascular" if nodule.juxtavascular else "in the lung"
        rows.append((volume, f"  {nodule.diameter_mm:.1f} mm {nodule.kind} nodule ({where}): volume "
                             f"{volume:.0f} mm3, {nodule.hu:.0f} HU"))
    for _, text in sorted(rows, key=lambda r: -r[0]):
        print(text)


def run_demo(out_dir: Path, slices: int = 300, seed: int = 7, timeout: float = 600) -> int:
    """Run the whole demo; returns a process exit code."""
    from dicom_node.node import Node
    from phantoms.chest_phantom import write_chest_phantom
    from phantoms.ct_writer import StudyIdentity

    start = time.monotonic()
    out_dir = out_dir.resolve()
    work = out_dir / "work"
    shutil.rmtree(work, ignore_errors=True)
    shutil.rmtree(out_dir / "received", ignore_errors=True)
    receiver = ResultReceiver(out_dir / "received").start()
    config = demo_config(work / "var", receiver.port)
    _say(start, "starting the node (embedded default configuration; loading the model) ...")
    node = Node(config)
    node.start()
    try:
        _say(start, f"node {config.node.ae_title} listening on 127.0.0.1:{node.port}; destination "
                    f"DEMOPACS on 127.0.0.1:{receiver.port}")
        paths, phantom = write_chest_phantom(
            work / "ct", seed, study=StudyIdentity(patient_name="DEMO^PHANTOM", patient_id="DEMO-0001"),
            slices=slices, rows=512, pixel_spacing_mm=0.7, slice_spacing_mm=1.25, noise_hu=15.0,
            nodule_diameters_mm=DEMO_NODULES_MM, signed=True, bits_stored=16)
        sizes = ", ".join(f"{n.diameter_mm:.1f}" for n in phantom.nodules)
        _say(start, f"generated a chest-CT phantom: {len(paths)} slices 512x512, nodules of {sizes} mm")
        files = [describe_file(p) for p in paths]
        done = [0]

        def progress(_: Any, status: int) -> None:
            done[0] += 1
            if done[0] % 50 == 0 or done[0] == len(files):
                _say(start, f"sent {done[0]}/{len(files)} slices")

        statuses = store_files(Peer(config.node.ae_title, "127.0.0.1", node.port), files, "DEMOSCU",
                               on_status=progress)
        assert all(s == 0 for s in statuses.values()), "the node refused some slices"
        study_uid = str(dcmread(paths[0], stop_before_pixels=True).StudyInstanceUID)
        state = _wait_for_results(node, study_uid, start, timeout)
        if state["study"].get("state") != "done":
            print(f"analysis did not succeed: {state['study'].get('reason')}", file=sys.stderr)
            return 1
        sr = next(p for p in receiver.received if p.name.startswith("SR-"))
        sources = {dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
        findings = read_findings(sr)
        print()
        print_table(findings, sources)
        print()
        print_truth(phantom)
        print()
        preview = write_preview(receiver.received, out_dir / "preview.png")
        for path in sorted(receiver.received):
            print(f"  {path.name.split('-')[0]}: {path}")
        print(f"  PNG preview (the key images' pixels): {preview}")
        state_dir = config.node.storage_dir
        print(f"  node state (studies, jobs, deliveries, audit trail): {state_dir}")
        print(f"  read it with: dicom-node status --storage-dir {state_dir}")
        _say(start, "demo finished (the source CT is in " + str(work / "ct") + ")")
        return 0
    finally:
        node.stop()
        receiver.stop()
