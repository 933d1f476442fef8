"""The shipped configuration end to end: a chest-CT phantom sent to a running node
(embedded default: chest CT -> lung_nodules) yields a valid SEG and SR at a dcmtk
storescp destination, and the demo prints its findings table and writes a PNG."""

from __future__ import annotations

import subprocess
from pathlib import Path

from PIL import Image
from pydicom import dcmread

from dicom_node.config import load_config
from dicom_node.demo import run_demo
from dicom_node.results.readback import read_findings
from dicom_node.synthetic.chest_phantom import write_chest_phantom
from dicom_node.synthetic.ct_writer import StudyIdentity
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
        received = {dcmread(p, stop_before_pixels=True).Modality: p for p in dest.files()}
        assert set(received) == {"SEG", "SR"}
        for path in received.values():
            _no_errors("dciodvfy", path)
        _no_errors("dsrdump", received["SR"])
        findings = read_findings(received["SR"])
        assert findings and findings[0].name == "Nodule 1"
        truth = max(n.diameter_mm for n in phantom.nodules)
        assert abs(findings[0].long_axis_mm - truth) <= 3.0, (findings[0].long_axis_mm, truth)
        assert all(50.0 <= f.certainty_percent <= 100.0 for f in findings), findings  # the model's score
        seg = dcmread(received["SEG"])
        assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "27925004"
        assert "NOT FOR DIAGNOSTIC USE" in seg.SeriesDescription
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
    png = tmp_path / "demo" / "preview.png"
    image = Image.open(png)
    assert image.width >= 1000 and image.height >= 500
    assert {p.name[:3] for p in (tmp_path / "demo" / "received").iterdir()} == {"SEG", "SR-"}
