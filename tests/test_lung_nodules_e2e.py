"""The shipped configuration end to end: a chest-CT phantom sent to a running node
(embedded default: chest CT -> lung_nodules) yields a valid SEG, SR, key images and KOS
at a dcmtk storescp destination, and the demo prints its findings table and writes the
key images and a PNG of them."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread

from dicom_node.config import load_config
from dicom_node.demo import run_demo
from dicom_node.results import key_images as ki
from dicom_node.results.readback import read_findings
from phantoms.chest_phantom import write_chest_phantom
from phantoms.ct_writer import StudyIdentity
from tests.support import NodeProcess, StoreSCP, free_port, require_tool, storescu


def _shipped_config(tmp_path: Path, dest_port: int) -> dict:
    data = load_config(None).model_dump(mode="json")
    data["node"].update(host="127.0.0.1", port=free_port(), storage_dir=str(tmp_path / "var"))
    data["http"]["port"] = free_port()
    data["destinations"]["pacs"].update(ae_title="DEST", port=dest_port)
    data["routes"][0]["stable_seconds"] = 1
    data["assembly"]["poll_seconds"] = 0.2
    return data


def _no_errors(tool: str, path: Path) -> None:
    require_tool(tool)
    out = subprocess.run([tool, str(path)], capture_output=True, text=True)
    errors = [line for line in (out.stdout + out.stderr).splitlines() if line.lower().startswith("error")]
    assert out.returncode == 0 or tool == "dciodvfy", out.stderr
    assert not errors, "\n".join(errors)


def test_chest_phantom_through_the_shipped_configuration(tmp_path: Path) -> None:
    dest = StoreSCP(free_port(), tmp_path / "received").start()
    node = NodeProcess(_shipped_config(tmp_path, dest.port), tmp_path / "node").start()
    try:
        paths, phantom = write_chest_phantom(
            tmp_path / "ct", 424242, study=StudyIdentity(patient_name="NODULE^TEST", patient_id="NT-1"),
            slices=96, rows=256, pixel_spacing_mm=1.0, slice_spacing_mm=2.5,
            nodule_diameters_mm=(16.0, 10.0), noise_hu=10.0)
        assert storescu(node.port, paths).returncode == 0
        status = node.wait_for(lambda s: any(st["state"] in ("done", "failed") for st in s["studies"]),
                               timeout=240, what="analysis and delivery")
        assert status["studies"][0]["state"] == "done", status
        by_modality: dict[str, list[Path]] = {}
        for path in dest.files():
            by_modality.setdefault(dcmread(path, stop_before_pixels=True).Modality, []).append(path)
        assert sorted(by_modality) == ["KO", "OT", "SEG", "SR"]
        for path in dest.files():
            _no_errors("dciodvfy", path)
        received = {modality: paths[0] for modality, paths in by_modality.items()}
        _no_errors("dsrdump", received["SR"])
        _no_errors("dsrdump", received["KO"])
        findings = read_findings(received["SR"])
        assert findings and findings[0].name == "Nodule 1"
        truth = max(n.diameter_mm for n in phantom.nodules)
        assert abs(findings[0].long_axis_mm - truth) <= 3.0, (findings[0].long_axis_mm, truth)
        assert all(50.0 <= f.certainty_percent <= 100.0 for f in findings), findings  # the model's score
        seg = dcmread(received["SEG"])
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
        assert seg.SeriesDescription == "AI Lung Nodules - SEG - NOT FOR DIAGNOSTIC USE"
        # the key images: a summary, then one per finding whose caption gives the SR's numbers
        key = sorted((dcmread(p) for p in by_modality["OT"]), key=lambda ds: int(ds.InstanceNumber))
        assert len(key) == len(findings) + 1
        for f, ds in zip(findings, key[1:], strict=True):
            assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == f.key_image_uid
            measures = ki.Measures(f.name, f.long_axis_mm, f.short_axis_mm, f.volume_mm3, f.mean_hu,
                                   f.certainty_percent)
            assert ds.ImageComments.split("\n")[1] == ki.measures_text(measures)
    finally:
        node.stop()
        dest.stop()


def test_demo_prints_findings_and_writes_png(tmp_path: Path, capsys) -> None:  # type: ignore[no-untyped-def]
    assert run_demo(tmp_path / "demo", slices=96) == 0
    out = capsys.readouterr().out
    assert "Nodule 1" in out and "Long axis mm" in out and "PNG preview" in out
    state = tmp_path.resolve() / "demo" / "work" / "var"
    assert f"read it with: dicom-node status --storage-dir {state}" in out
    from dicom_node.cli import main

    assert main(["status", "--storage-dir", str(state), "--state", "done"]) == 0
    assert "1 done" in capsys.readouterr().out  # the demo's study, as status reads it
    received = tmp_path / "demo" / "received"
    assert {p.name.split("-")[0] for p in received.iterdir()} == {"SEG", "SR", "SC", "KO"}
    # the PNG is the key images' own pixels: the summary, then one image per nodule
    key = sorted(received.glob("SC-*.dcm"), key=lambda p: int(dcmread(p, stop_before_pixels=True).InstanceNumber))
    assert len(key) >= 2
    png = np.asarray(Image.open(tmp_path / "demo" / "preview.png").convert("RGB"))
    assert np.array_equal(png, np.concatenate([dcmread(p).pixel_array for p in key]))
