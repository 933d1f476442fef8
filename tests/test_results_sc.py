"""Key images (Secondary Capture) and the Key Object Selection: read back and checked
against the SEG and the SR of the same findings, and validated with dciodvfy/dsrdump."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.sr.codedict import codes
from pydicom.uid import KeyObjectSelectionDocumentStorage, SecondaryCaptureImageStorage
from scipy import ndimage

from dicom_node.config import parse_config
from dicom_node.jobs import JobRunner
from dicom_node.pipeline import JobSpec, encode_results
from dicom_node.preview import write_preview
from dicom_node.results import encode_seg, encode_sr
from dicom_node.results import key_images as ki
from dicom_node.results.kos import encode_kos
from dicom_node.results.readback import ReportedFinding, read_findings
from dicom_node.results.sc import encode_key_images
from dicom_node.storage.rows import JobRow
from plugin.types import Detection, Findings, SegmentCodes
from tests import results_support as rs

WARNING = "NOT FOR DIAGNOSTIC USE"


def _write(ds: pydicom.Dataset, path: Path) -> Path:
    path.write_bytes(rs.to_bytes(ds))
    return path


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Two spheres: SEG, SR, key images and KOS written to files."""
    out = tmp_path_factory.mktemp("sc")
    ct = rs.write_series(out / "ct")
    volume = rs.build_volume(ct)
    findings = rs.make_findings(volume)
    seg = encode_seg(volume, findings, rs.INFO, series_number=9001)
    sr = encode_sr(volume, findings, rs.INFO, series_number=9002)
    scs = encode_key_images(volume, findings, rs.INFO, series_number=9003)
    kos = encode_kos(volume, findings, rs.INFO, series_number=9004, results=[seg, sr, *scs])
    return {
        "volume": volume, "findings": findings,
        "seg": _write(seg, out / "seg.dcm"), "sr": _write(sr, out / "sr.dcm"),
        "sc": [_write(ds, out / f"sc{n}.dcm") for n, ds in enumerate(scs, start=1)],
        "kos": _write(kos, out / "kos.dcm"),
        "ct": {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in ct},
    }


@pytest.fixture(scope="module")
def empty_case(case: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The same study with no findings: SR, the summary image and the KOS."""
    out = tmp_path_factory.mktemp("sc_empty")
    volume = case["volume"]
    empty = Findings(label_map=np.zeros(volume.shape, dtype=np.uint8), findings=[],
                     procedure=rs.PROCEDURE, looked_for=codes.SCT.Nodule)
    sr = encode_sr(volume, empty, rs.INFO, series_number=9012)
    scs = encode_key_images(volume, empty, rs.INFO, series_number=9013)
    kos = encode_kos(volume, empty, rs.INFO, series_number=9014, results=[sr, *scs])
    return {"sr": sr, "sc": [_write(ds, out / f"sc{n}.dcm") for n, ds in enumerate(scs, start=1)],
            "kos": _write(kos, out / "kos.dcm")}


def test_dciodvfy_accepts_every_key_image_and_the_kos(case: dict, empty_case: dict) -> None:
    for path in [*case["sc"], case["kos"], *empty_case["sc"], empty_case["kos"]]:
        errors, output = rs.dciodvfy_errors(path)
        assert errors == [], f"{path.name}:\n{output}"
    for path in (case["kos"], empty_case["kos"]):
        dump = rs.run_tool("dsrdump", path)
        assert dump.returncode == 0 and "Of Interest" in dump.stdout, dump.stderr


def test_summary_first_then_one_image_per_finding(case: dict) -> None:
    images = [pydicom.dcmread(p) for p in case["sc"]]
    assert [int(ds.InstanceNumber) for ds in images] == [1, 2, 3]
    assert len({ds.SeriesInstanceUID for ds in images}) == 1
    summary = images[0]
    lines = summary.ImageComments.split("\n")
    assert lines[0] == "AI Lung Nodules: 2 findings"
    assert "Model: lung_nodules 1.2.3" in lines[1]
    assert lines[2].startswith("Analysed: series 2 ") and "16 images" in lines[2]
    assert lines[3].startswith(WARNING)
    for ds in images:
        assert ds.SOPClassUID == SecondaryCaptureImageStorage and ds.Modality == "OT"
        assert (ds.BurnedInAnnotation, ds.SamplesPerPixel, ds.PhotometricInterpretation) == ("YES", 3, "RGB")
        assert (ds.Rows, ds.Columns) == (ki.HEIGHT, ki.WIDTH)
        assert ds.SeriesNumber == 9003
        assert ds.SeriesDescription == f"AI Lung Nodules - Key images - {WARNING}"
        assert "DERIVED" in ds.ImageType
    for ds in images[1:]:
        assert list(ds.PatientOrientation) == ["L", "P"]  # rows run to the patient's left, columns back
        assert ds.ImageComments.split("\n")[3] == WARNING


def test_same_provenance_and_study_as_seg_and_sr(case: dict) -> None:
    seg, sr = pydicom.dcmread(case["seg"]), pydicom.dcmread(case["sr"])
    source = pydicom.dcmread(next(iter(case["ct"].values())), stop_before_pixels=True)
    for path in [*case["sc"], case["kos"]]:
        ds = pydicom.dcmread(path)
        for keyword in ("StudyInstanceUID", "PatientName", "PatientID", "PatientBirthDate", "AccessionNumber",
                        "StudyDate", "StudyID"):
            assert ds.get(keyword) == source.get(keyword), keyword
        for keyword in ("Manufacturer", "ManufacturerModelName", "SoftwareVersions", "DeviceSerialNumber"):
            assert ds.get(keyword) == seg.get(keyword) == sr.get(keyword), keyword
        def equipment(d: pydicom.Dataset) -> list[tuple[str, ...]]:
            return [(e.Manufacturer, e.get("ManufacturerModelName"), e.get("DeviceSerialNumber"),
                     e.get("ContributionDescription")) for e in d.ContributingEquipmentSequence]

        assert equipment(ds) == equipment(sr) == equipment(seg)  # acquisition, node, model, highdicom


def test_key_images_reference_the_slices_the_sr_measures_on(case: dict) -> None:
    reported = read_findings(case["sr"])
    images = [pydicom.dcmread(p) for p in case["sc"]]
    key_uids = [f.key_image_uid for f in reported]
    for ds, uid in zip(images[1:], key_uids, strict=True):
        (item,) = ds.SourceImageSequence
        assert item.ReferencedSOPInstanceUID == uid
        assert item.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    assert {i.ReferencedSOPInstanceUID for i in images[0].SourceImageSequence} == set(key_uids)


def _seg_mask(seg: pydicom.Dataset, source_uid: str, segment: int) -> np.ndarray:
    """The SEG's frame of ``segment`` on the source image ``source_uid`` (rows, columns)."""
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        ref = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        if ref == source_uid and item.SegmentIdentificationSequence[0].ReferencedSegmentNumber == segment:
            return frame.astype(bool)
    raise AssertionError(f"the SEG has no frame of segment {segment} on {source_uid}")


def _canvas_mask(mask: np.ndarray, to_canvas: ki.PanelMap) -> np.ndarray:
    """``mask`` drawn on the key image canvas through the whole-slice panel's map."""
    ys, xs = np.mgrid[0:ki.HEIGHT, 0:ki.WIDTH]
    columns = np.floor((xs + 0.5 - to_canvas.x0) / to_canvas.scale_x).astype(int)
    rows = np.floor((ys + 0.5 - to_canvas.y0) / to_canvas.scale_y).astype(int)
    inside = (columns >= 0) & (columns < mask.shape[1]) & (rows >= 0) & (rows < mask.shape[0])
    inside &= xs < ki.PANEL
    out = np.zeros((ki.HEIGHT, ki.WIDTH), dtype=bool)
    out[inside] = mask[rows[inside], columns[inside]]
    return out


def test_outline_is_drawn_where_the_seg_has_the_finding(case: dict) -> None:
    seg = pydicom.dcmread(case["seg"])
    for number, path in enumerate(case["sc"][1:], start=1):
        sc = pydicom.dcmread(path)
        source_uid = sc.SourceImageSequence[0].ReferencedSOPInstanceUID
        mask = _seg_mask(seg, source_uid, number)
        to_canvas, _ = ki.slice_panel_map(*mask.shape)
        pixels = sc.pixel_array
        red = np.all(pixels == ki.OUTLINE, axis=-1)
        red[:, ki.PANEL:] = False  # the whole-slice panel
        assert red.sum() > 20, f"finding {number}: no outline drawn"
        truth = _canvas_mask(mask, to_canvas)
        edge = truth & ~ndimage.binary_erosion(truth)
        to_edge = ndimage.distance_transform_edt(~edge)
        tolerance = 1.5 * to_canvas.scale_x + 2  # a source pixel and a half, plus the line
        assert to_edge[red].max() <= tolerance, f"finding {number}: outline off the SEG's boundary"
        to_red = ndimage.distance_transform_edt(~red)
        assert to_red[edge].max() <= tolerance, f"finding {number}: part of the SEG's boundary not outlined"
        ys, xs = np.nonzero(red)
        ty, tx = np.nonzero(truth)
        assert abs(xs.mean() - tx.mean()) <= to_canvas.scale_x and abs(ys.mean() - ty.mean()) <= to_canvas.scale_y


def test_panel_shows_the_source_slice_in_lung_window(case: dict) -> None:
    """The whole-slice panel is the source image (read from its file), so the map the
    outline test uses is the one the pixels were drawn with."""
    for path in case["sc"][1:]:
        sc = pydicom.dcmread(path)
        source = pydicom.dcmread(case["ct"][sc.SourceImageSequence[0].ReferencedSOPInstanceUID])
        hu = source.pixel_array * float(source.RescaleSlope) + float(source.RescaleIntercept)
        grey = ki.windowed(hu)
        to_canvas, _ = ki.slice_panel_map(*hu.shape)
        rows, columns = np.mgrid[0:hu.shape[0], 0:hu.shape[1]]
        x, y = to_canvas(columns + 0.5, rows + 0.5)
        shown = sc.pixel_array[y.astype(int), x.astype(int)].astype(int)
        plain = (shown[..., 0] == shown[..., 1]) & (shown[..., 1] == shown[..., 2])  # no overlay there
        assert plain.mean() > 0.8
        assert np.abs(shown[..., 0][plain] - grey[plain]).mean() < 2.0


def _measures(f: ReportedFinding) -> ki.Measures:
    return ki.Measures(f.name, f.long_axis_mm, f.short_axis_mm, f.volume_mm3, f.mean_hu, f.certainty_percent)


def test_caption_numbers_are_the_srs(case: dict) -> None:
    reported = read_findings(case["sr"])
    for f, path in zip(reported, case["sc"][1:], strict=True):
        sc = pydicom.dcmread(path)
        header, numbers, where, warning = sc.ImageComments.split("\n")
        assert header.startswith(f"{f.name} (") and warning == WARNING
        # the numbers, read as a reader reads them, are the SR's at the shown precision
        found = dict(re.findall(r"(long axis|short axis|volume|mean|score) (-?[\d.]+)", numbers))
        assert float(found["long axis"]) == pytest.approx(f.long_axis_mm, abs=0.05)
        assert float(found["short axis"]) == pytest.approx(f.short_axis_mm, abs=0.05)
        assert float(found["volume"]) == pytest.approx(f.volume_mm3, abs=0.5)
        assert float(found["mean"]) == pytest.approx(f.mean_hu, abs=0.5)
        if np.isnan(f.certainty_percent):
            assert "score" not in found
        else:
            assert float(found["score"]) == pytest.approx(f.certainty_percent, abs=0.5)
        # and the burned-in caption is exactly that text, drawn from the SR's values
        expected = ki.caption_band([header, ki.measures_text(_measures(f)), where], WARNING)
        assert np.array_equal(sc.pixel_array[: ki.CAPTION_HEIGHT], expected)
        source = pydicom.dcmread(case["ct"][f.key_image_uid], stop_before_pixels=True)
        assert f"image {source.InstanceNumber}," in where
    table = pydicom.dcmread(case["sc"][0]).ImageComments.split("\n")
    for f in reported:
        assert " | ".join(ki.table_row(_measures(f))) in table


def test_no_findings_gets_one_summary_that_says_so(case: dict, empty_case: dict) -> None:
    (path,) = empty_case["sc"]
    summary = pydicom.dcmread(path)
    lines = summary.ImageComments.split("\n")
    assert lines[0] == "No nodule detected"
    assert lines[2].startswith("Analysed: series 2 ")
    assert summary.PatientOrientation is None or summary.PatientOrientation == ""
    assert {i.ReferencedSOPInstanceUID for i in summary.SourceImageSequence} == set(case["ct"])


def _kos_references(kos: pydicom.Dataset) -> list[str]:
    return [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID for item in kos.ContentSequence
            if item.ValueType in ("IMAGE", "COMPOSITE")]


def test_kos_selects_key_images_key_slices_seg_and_sr(case: dict) -> None:
    kos = pydicom.dcmread(case["kos"])
    assert kos.SOPClassUID == KeyObjectSelectionDocumentStorage and kos.Modality == "KO"
    assert kos.ConceptNameCodeSequence[0].CodeValue == "113000"  # Of Interest (CID 7010)
    assert (kos.SeriesNumber, kos.SeriesDescription) == (9004, f"AI Lung Nodules - Key objects - {WARNING}")
    scs = [pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in case["sc"]]
    key_slices = sorted((f.key_slice, case["volume"].slices[f.key_slice].sop_instance_uid)
                        for f in case["findings"].findings)
    seg = pydicom.dcmread(case["seg"], stop_before_pixels=True).SOPInstanceUID
    sr = pydicom.dcmread(case["sr"], stop_before_pixels=True).SOPInstanceUID
    assert _kos_references(kos) == [*scs, *(uid for _, uid in key_slices), seg, sr]
    evidence = {i.ReferencedSOPInstanceUID for study in kos.CurrentRequestedProcedureEvidenceSequence
                for series in study.ReferencedSeriesSequence for i in series.ReferencedSOPSequence}
    assert evidence == set(_kos_references(kos))
    (text,) = [i.TextValue for i in kos.ContentSequence if i.ConceptNameCodeSequence[0].CodeValue == "113012"]
    assert text == f"AI Lung Nodules 1.2.3: 2 findings; Key images, SEG, SR. {WARNING}"
    device = [i.UID for i in rs.walk(kos) if i.get("ValueType") == "UIDREF"]
    assert rs.INFO.device_uid in device


def test_kos_without_findings_selects_the_summary_and_the_sr(empty_case: dict) -> None:
    kos = pydicom.dcmread(empty_case["kos"])
    summary = pydicom.dcmread(empty_case["sc"][0], stop_before_pixels=True)
    assert _kos_references(kos) == [summary.SOPInstanceUID, empty_case["sr"].SOPInstanceUID]


def test_detections_and_structures(case: dict, tmp_path: Path) -> None:
    """A detection's box is a key image (no long-axis line); a structure is a table row only."""
    volume, findings = case["volume"], case["findings"]
    structure = dataclasses.replace(findings.findings[1], name="Spleen", role="structure")
    box = np.array([[14.0, 14.0], [27.0, 14.0], [27.0, 27.0], [14.0, 27.0]])
    nodule = SegmentCodes(codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule)
    detection = Detection(label=1, name="Nodule 1", codes=nodule, score=0.91, center_mm=(0.0, 0.0, 0.0),
                          size_mm=(9.1, 9.1, 7.5), key_slice=6, outline=box, long_axis_mm=9.1, short_axis_mm=9.1)
    mixed = Findings(label_map=None, findings=[structure], detections=[detection], procedure=rs.PROCEDURE)
    summary, key = encode_key_images(volume, mixed, rs.INFO, series_number=9003)
    assert "Spleen | - | - |" in summary.ImageComments and "Nodule 1 | 9.1 | - | - | - | 91" in summary.ImageComments
    assert key.ImageComments.split("\n")[1] == "long axis 9.1 mm, box 9.1 x 9.1 x 7.5 mm, score 91 %"
    assert not np.all(key.pixel_array == ki.AXIS, axis=-1).any()  # a box has no long axis
    assert np.all(key.pixel_array == ki.OUTLINE, axis=-1).sum() > 20
    errors, output = rs.dciodvfy_errors(_write(key, tmp_path / "key.dcm"))
    assert errors == [], output


def test_orientation_markers_follow_the_image_orientation() -> None:
    assert ki.orientation_letters([1, 0, 0, 0, 1, 0]) == ("R", "L", "A", "P")  # axial, as acquired
    assert ki.orientation_letters([-1, 0, 0, 0, 1, 0]) == ("L", "R", "A", "P")  # flipped left-right
    assert ki.orientation_letters([1, 0, 0, 0, 0, -1]) == ("R", "L", "H", "F")  # coronal


def test_outputs_choose_the_objects(case: dict, tmp_path: Path) -> None:
    volume, findings = case["volume"], case["findings"]

    def kinds(outputs: tuple[str, ...], found: Findings = findings) -> list[str]:
        spec = JobSpec(job_id=1, study_uid="1", plugin_name="p", plugin_factory=None, plugin_options={},
                       files=[], results_dir=tmp_path, revision=2, outputs=outputs)
        built = encode_results(volume, found, rs.INFO, spec, {})
        assert all(int(ds.SeriesNumber) // 10 == 902 for _, ds in built)  # revision 2: 9021...
        return [kind for kind, _ in built]

    assert kinds(("seg", "sr", "sc", "kos")) == ["SEG", "SR", "SC", "SC", "SC", "KOS"]
    assert kinds(("sr", "kos")) == ["SR", "KOS"]
    assert kinds(("kos",)) == ["KOS"]  # the key source images alone
    empty = dataclasses.replace(findings, label_map=np.zeros_like(findings.label_map), findings=[])
    assert kinds(("seg", "kos"), empty) == []  # nothing to segment, nothing to select


def test_a_job_gets_its_routes_outputs() -> None:
    config = parse_config({"routes": [{"name": "r", "plugin": "p", "outputs": ["sr", "kos"]}]})
    runner = JobRunner(config, db=SimpleNamespace(study_files=lambda uid: []), work=None)  # type: ignore[arg-type]
    job = JobRow(id=1, study_uid="1.2", route="r", plugin="p", revision=0, state="running", attempts=1,
                 created_at=0.0)
    assert runner._spec(job).outputs == ("sr", "kos")
    assert runner._spec(dataclasses.replace(job, route="removed since")).outputs == ("seg", "sr", "sc", "kos")


def test_preview_png_is_the_key_images_pixels(case: dict, tmp_path: Path) -> None:
    png = write_preview([case["sr"], *reversed(case["sc"])], tmp_path / "preview.png")
    sheet = np.asarray(Image.open(png).convert("RGB"))
    stacked = np.concatenate([pydicom.dcmread(p).pixel_array for p in case["sc"]])
    assert np.array_equal(sheet, stacked)
