"""The Model Zoo's lung_nodule_ct_detection bundle, run unchanged through the node.

The fixture holds the bundle's configs, its ``scripts/`` and LICENSE (see its NOTICE);
each test copies them with the shipped ``config/bundles/lung_nodule_ct_detection/
manifest.yaml``, and saves the real RetinaNet (``network_def``) with seeded random
weights as ``models/model.pt``. Random weights find nothing real: their scores are about
0.1, so the job-runner test lowers the manifest's score threshold to 0 to get boxes.
A small ``infer_patch_size`` override keeps the CPU time low.

The geometry test replaces the detector by a stub that returns known boxes in the
voxel space of the bundle's preprocessed image; the bundle's own postprocessing maps
them to world coordinates, and the SR outline must land on the known patient
coordinates of the box, for a series with a flipped row direction and resampled spacing.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
import yaml
from monai.bundle.config_parser import ConfigParser

from dicom_node import pipeline
from dicom_node.errors import PluginError
from dicom_node.pipeline import JobSpec, run_job
from dicom_node.series import build_volume
from phantoms.ct_writer import SeriesLayout, write_ct_series
from plugin.monai_bundle import MonaiBundlePlugin, _working_copy, create
from tests.results_support import dciodvfy_errors, run_tool, walk
from tests.support import BUNDLE_FIXTURES, REPO

FIXTURE = BUNDLE_FIXTURES / "lung_nodule_ct_detection"
MANIFEST = REPO / "config" / "bundles" / "lung_nodule_ct_detection" / "manifest.yaml"
SMALL_PATCH = [96, 96, 48]
CERTAINTY = ("111012", "DCM")


def make_bundle(tmp_path: Path, *, weights: bool = True, scripts: bool = True,
                **manifest_changes: Any) -> Path:
    """A copy of the detection bundle with the shipped manifest and random weights."""
    bundle = tmp_path / "lung_nodule_ct_detection"
    shutil.copytree(FIXTURE / "configs", bundle / "configs")
    if scripts:
        shutil.copytree(FIXTURE / "scripts", bundle / "scripts")
    manifest = yaml.safe_load(MANIFEST.read_text())
    manifest["overrides"] = {**manifest["overrides"], "infer_patch_size": SMALL_PATCH}
    manifest["series"]["min_slices"] = 16
    for key, value in manifest_changes.items():
        manifest[key] = {**manifest[key], **value} if isinstance(value, dict) else value
    (bundle / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    if weights:
        parser = ConfigParser()
        parser.read_config(str(bundle / "configs" / "inference.json"))
        torch.manual_seed(7)
        (bundle / "models").mkdir()
        torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")
    return bundle


def chest_series(tmp_path: Path, layout: SeriesLayout, shape_zyx: tuple[int, int, int] = (40, 96, 96)) -> list[Path]:
    """Lung (-800 HU) with a soft-tissue blob, written as a CT series."""
    hu = np.full(shape_zyx, -800.0, dtype=np.float32)
    z, y, x = (s // 2 for s in shape_zyx)
    hu[z - 4 : z + 4, y - 6 : y + 6, x - 6 : x + 6] = 40.0
    return write_ct_series(hu, tmp_path / "ct", layout=layout)


@pytest.fixture(autouse=True)
def fresh_plugins() -> Any:
    """Each test loads its own bundle in the job runner's plugin cache."""
    pipeline._PLUGINS.clear()
    yield
    pipeline._PLUGINS.clear()


def job(tmp_path: Path, bundle: Path, files: list[Path]) -> JobSpec:
    return JobSpec(job_id=1, study_uid="1.2.3", plugin_name="lung_nodule_ct_detection",
                   plugin_factory="monai_bundle", plugin_options={"bundle_dir": str(bundle), "device": "cpu"},
                   files=files, results_dir=tmp_path / "results", revision=1)


def groups(sr: pydicom.Dataset) -> list[pydicom.Dataset]:
    """The TID 1500 measurement groups of an SR."""
    return [item for item in walk(sr)
            if item.get("ValueType") == "CONTAINER" and "ConceptNameCodeSequence" in item
            and item.ConceptNameCodeSequence[0].CodeValue == "125007"]


def numeric(group: pydicom.Dataset, value: str) -> float:
    for item in group.ContentSequence:
        code = item.ConceptNameCodeSequence[0]
        if item.ValueType == "NUM" and code.CodeValue == value:
            return float(item.MeasuredValueSequence[0].NumericValue)
    raise AssertionError(f"no measurement {value}")


def test_real_detection_bundle_through_the_job_runner(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, detection={"score_threshold": 0.0, "max_findings": 3})
    files = chest_series(tmp_path, SeriesLayout(pixel_spacing_mm=(0.703125, 0.703125), slice_spacing_mm=1.25))

    outcome = run_job(job(tmp_path, bundle, files))

    assert outcome.findings == 3
    # a detection gets no SEG; the key images are a summary and one per box
    assert [r.kind for r in outcome.results] == ["SR", "SC", "SC", "SC", "SC", "KOS"]
    for result in outcome.results:
        errors, output = dciodvfy_errors(result.path)
        assert errors == [], output
    captions = [pydicom.dcmread(r.path).ImageComments.split("\n")[1] for r in outcome.results[2:5]]
    assert all(re.fullmatch(r"long axis [\d.]+ mm, box [\d.]+ x [\d.]+ x [\d.]+ mm, score \d+ %", c)
               for c in captions), captions
    path = outcome.results[0].path
    dump = run_tool("dsrdump", path)
    assert dump.returncode == 0 and "Certainty of Finding" in dump.stdout, dump.stderr
    sr = pydicom.dcmread(path)
    found = groups(sr)
    assert len(found) == 3
    scores = [numeric(g, CERTAINTY[0]) for g in found]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 100 for s in scores)
    sources = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    for group in found:
        (region,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
        assert region.GraphicType == "POLYLINE"
        points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2)
        assert len(points) >= 4 and np.array_equal(points[0], points[-1])
        assert region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID in sources
        assert numeric(group, "103339001") == pytest.approx(  # long axis: the larger in-plane side
            max(numeric(group, "103355008"), numeric(group, "131197000")), rel=1e-4)
    assert "NOT FOR DIAGNOSTIC USE" in dump.stdout


def test_nothing_found_gets_a_report_that_says_so(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path, detection={"score_threshold": 1.0})
    files = chest_series(tmp_path, SeriesLayout(), shape_zyx=(24, 80, 80))

    outcome = run_job(job(tmp_path, bundle, files))

    assert outcome.findings == 0 and [r.kind for r in outcome.results] == ["SR", "SC", "KOS"]
    for result in outcome.results:
        errors, output = dciodvfy_errors(result.path)
        assert errors == [], output
    summary = pydicom.dcmread(outcome.results[1].path)
    assert summary.ImageComments.split("\n")[0] == "No nodule detected"
    assert run_tool("dsrdump", outcome.results[0].path).returncode == 0
    texts = [item.TextValue for item in walk(pydicom.dcmread(outcome.results[0].path)) if "TextValue" in item]
    assert "Analysis completed: no nodule detected." in texts, texts


def test_thick_series_is_refused_with_the_reason(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path)
    files = chest_series(tmp_path, SeriesLayout(slice_spacing_mm=5.0), shape_zyx=(20, 64, 64))

    outcome = run_job(job(tmp_path, bundle, files))

    assert outcome.results == [] and "spacing" in outcome.note, outcome.note


class StubDetector:
    """Stands in for the bundle's inferer: known boxes (xyzxyz, preprocessed voxels)."""

    def __init__(self, boxes: np.ndarray, scores: list[float]) -> None:
        self.boxes, self.scores = boxes, scores
        self.seen: tuple[int, ...] = ()

    def __call__(self, batch: torch.Tensor, network: Any) -> list[dict[str, torch.Tensor]]:
        self.seen = tuple(batch.shape)
        return [{"box": torch.as_tensor(self.boxes, dtype=torch.float32),
                 "label": torch.zeros(len(self.boxes), dtype=torch.long),
                 "label_scores": torch.as_tensor(self.scores)}]


def voxel_box(affine_ras: np.ndarray, centre_lps: np.ndarray, size: np.ndarray) -> np.ndarray:
    """The world box (LPS centre, size) in the voxel space of ``affine_ras``, xyzxyz."""
    corners = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)]) * size / 2
    ras = (centre_lps + corners) * np.array([-1.0, -1.0, 1.0])
    voxels = (np.linalg.inv(affine_ras) @ np.hstack([ras, np.ones((8, 1))]).T).T[:, :3]
    return np.concatenate([voxels.min(axis=0), voxels.max(axis=0)])


def outline_in_patient(sr: pydicom.Dataset, group: pydicom.Dataset, files: list[Path]) -> tuple[np.ndarray, pydicom.Dataset]:
    """The group's outline in LPS mm, mapped through its source image's geometry."""
    (region,) = [i for i in group.ContentSequence if i.ValueType == "SCOORD"]
    uid = region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID
    source = next(ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in files)
                  if ds.SOPInstanceUID == uid)
    row_dir, col_dir = (np.asarray(source.ImageOrientationPatient[i:i + 3], dtype=float) for i in (0, 3))
    row_step, col_step = (float(v) for v in source.PixelSpacing)  # between rows, between columns
    origin = np.asarray(source.ImagePositionPatient, dtype=float)
    points = np.asarray(region.GraphicData, dtype=float).reshape(-1, 2) - 0.5  # SCOORD -> pixel centre
    patient = origin + points[:, :1] * col_step * row_dir + points[:, 1:] * row_step * col_dir
    return patient, source


def test_stub_boxes_land_at_their_patient_coordinates(tmp_path: Path) -> None:
    # rows run to the patient's right (-x), columns anterior; 0.8 x 0.9 x 2 mm resampled
    layout = SeriesLayout(pixel_spacing_mm=(0.9, 0.8), slice_spacing_mm=2.0, origin_mm=(40.0, -30.0, 10.0),
                          orientation=(-1.0, 0.0, 0.0, 0.0, 1.0, 0.0))
    files = chest_series(tmp_path, layout, shape_zyx=(24, 72, 80))
    volume = build_volume(files)
    plugin = create(bundle_dir=str(make_bundle(tmp_path)), device="cpu")
    assert isinstance(plugin, MonaiBundlePlugin)
    pre = plugin.preprocessing({"image": _working_copy(volume.image)})["image"]
    affine_ras = np.asarray(pre.affine, dtype=float)
    shape = tuple(pre.shape[1:])
    centre = np.array([10.0, 5.0, -14.0])  # LPS, inside the volume (slices run from z 10 down to -36)
    size = np.array([12.0, 8.0, 6.0])
    edge = volume.lps_affine() @ np.array([0.0, 36.0, 12.0, 1.0])  # centre on the first column
    outside = voxel_box(affine_ras, centre + np.array([0.0, 0.0, 200.0]), size)  # removed by the bundle
    boxes = np.stack([voxel_box(affine_ras, centre, size), outside, voxel_box(affine_ras, edge[:3], size)])
    # the bundle's detector_ops ran before its inferer was built: it slides a window
    assert plugin.inferer.sliding_window_size == np.prod(SMALL_PATCH)
    stub = StubDetector(boxes, [0.9, 0.85, 0.8])
    plugin.inferer = stub

    findings = plugin.analyse(volume)

    assert stub.seen[2:] == shape
    inner, clipped = findings.detections
    assert (inner.score, clipped.score) == pytest.approx((0.9, 0.8))  # each score stays with its box
    assert np.allclose(inner.center_mm, centre, atol=1e-3) and np.allclose(inner.size_mm, size, atol=1e-3)
    assert not inner.clipped
    assert clipped.size_mm[0] == pytest.approx(size[0] / 2, abs=0.05)  # the bundle cut it at the edge
    assert inner.long_axis_mm == pytest.approx(12.0, abs=1e-3)
    from dicom_node.results import encode_sr

    sr = encode_sr(volume, findings, plugin.info, series_number=902)
    path = tmp_path / "sr.dcm"
    sr.save_as(path, enforce_file_format=True)
    errors, output = dciodvfy_errors(path)
    assert errors == [], output
    first, second = groups(pydicom.dcmread(path))
    patient, source = outline_in_patient(sr, first, files)
    expected_xy = centre[:2] + np.array([[-1, -1], [1, -1], [1, 1], [-1, 1], [-1, -1]]) * size[:2] / 2
    assert sorted(map(tuple, patient[:-1, :2].round(3))) == sorted(map(tuple, expected_xy[:-1].round(3)))
    assert abs(float(source.ImagePositionPatient[2]) - centre[2]) <= 1.0  # nearest 2 mm slice
    # the edge box: cut by the bundle's ClipBoxToImaged at the first column's centre, not dropped
    patient, _ = outline_in_patient(sr, second, files)
    cols = np.asarray([i for i in second.ContentSequence if i.ValueType == "SCOORD"][0].GraphicData)[0::2]
    assert cols.min() == pytest.approx(0.5, abs=0.01)
    assert patient[:, 0].max() == pytest.approx(float(volume.lps_affine()[0, 3]), abs=0.01)


def test_outline_beyond_the_image_is_clipped_at_its_edge() -> None:
    from plugin.boxes import detections_from_boxes
    from plugin.manifest import load_manifest

    labels = load_manifest(MANIFEST).labels
    affine = np.diag([0.8, 0.9, 2.0, 1.0])
    affine[:3, 3] = (-20.0, -30.0, 0.0)
    boxes = np.array([[-20.0, 0.0, 10.0, 10.0, 6.0, 4.0],     # centre on column 0, half outside
                      [-100.0, 0.0, 10.0, 10.0, 6.0, 4.0]])   # wholly outside: kept on the edge
    found = detections_from_boxes(boxes, np.array([0, 0]), np.array([0.9, 0.8]), affine, (50, 60, 10),
                                  labels, score_threshold=0.5, max_findings=5)

    assert [d.name for d in found] == ["Nodule 1", "Nodule 2"] and all(d.clipped for d in found)
    cols, rows = found[0].outline[:, 0], found[0].outline[:, 1]
    assert cols.min() == 0.0 and cols.max() == pytest.approx(0.5 + 5.0 / 0.8)
    assert rows.min() == pytest.approx(0.5 + (30.0 - 3.0) / 0.9) and found[0].key_slice == 5
    assert found[1].outline[:, 0].max() == 0.0  # degenerate, on the image edge, never outside


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"weights": False}, "no weights"),
        ({"scripts": False}, "no scripts/ package"),
        ({"requires": ["torchvision", "no-such-package-xyz"]}, "no-such-package-xyz"),
        ({"overrides": {"no_such_key": 1}}, "no_such_key"),
    ],
)
def test_start_fails_with_the_bundle_name_and_reason(tmp_path: Path, change: dict[str, Any], reason: str) -> None:
    files_changes = {k: v for k, v in change.items() if k in ("weights", "scripts")}
    manifest_changes = {k: v for k, v in change.items() if k not in files_changes}
    bundle = make_bundle(tmp_path, **files_changes, **manifest_changes)

    with pytest.raises(PluginError) as caught:
        create(bundle_dir=str(bundle), device="cpu")

    assert "lung_nodule_ct_detection" in str(caught.value) and reason in str(caught.value), caught.value


def test_oblique_series_is_refused_for_boxes(tmp_path: Path) -> None:
    from tests.test_monai_bundle_plugin import make_volume

    plugin = create(bundle_dir=str(make_bundle(tmp_path)), device="cpu")
    plugin.inferer = StubDetector(np.zeros((0, 6)), [])
    angle = np.radians(20.0)  # a gantry tilt of 20 degrees about the patient's x axis
    affine = np.diag([-0.7, -0.7, 1.25, 1.0])
    affine[1:3, 1:3] = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]) @ np.diag([-0.7, 1.25])

    with pytest.raises(PluginError, match="tilted by 20.0 degrees"):
        plugin.analyse(make_volume(np.full((48, 48, 24), -800.0, dtype=np.float32), affine))


def test_box_modes_and_world_conventions() -> None:
    from plugin.boxes import to_lps_cccwhd

    lps = to_lps_cccwhd(np.array([[10.0, -20.0, 30.0, 4.0, 6.0, 8.0]]), "cccwhd", "LPS")
    ras = to_lps_cccwhd(np.array([[-10.0, 20.0, 30.0, 4.0, 6.0, 8.0]]), "cccwhd", "RAS")
    corners = to_lps_cccwhd(np.array([[12.0, -17.0, 34.0, 8.0, -23.0, 26.0]]), "xyzxyz", "LPS")
    assert np.allclose(lps, ras) and np.allclose(lps, corners)
