"""DICOM SEG encoding: round trip, references, geometry, provenance, dciodvfy."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from dicom_node.errors import EncodeError
from dicom_node.results import encode_seg, result_series_numbers
from dicom_node.results.common import node_version, series_description
from tests.support import REAL_CT

from tests import results_support as rs


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A written CT series, its Volume, two spheres and the SEG read back."""
    out = tmp_path_factory.mktemp("seg")
    volume = rs.build_volume(rs.write_series(out / "ct"))
    findings = rs.make_findings(volume)
    seg = encode_seg(volume, findings, rs.INFO, series_number=9001)
    path = out / "seg.dcm"
    path.write_bytes(rs.to_bytes(seg))
    return volume, findings, path


def sources(volume) -> list[pydicom.Dataset]:  # type: ignore[no-untyped-def]
    return [pydicom.dcmread(s.path, stop_before_pixels=True) for s in volume.slices]


def test_segments_labels_codes_and_colours(case: tuple) -> None:
    volume, findings, path = case
    seg = hd.seg.segread(path)
    assert seg.SegmentationType == "BINARY"
    assert seg.Modality == "SEG"
    assert len(seg.SegmentSequence) == len(findings.findings) == 2
    for number, finding in enumerate(findings.findings, start=1):
        desc = seg.get_segment_description(number)
        assert desc.segment_label == finding.name
        assert desc.segmented_property_category == finding.codes.category
        assert desc.segmented_property_type == finding.codes.type
        assert desc.anatomic_regions == [finding.codes.site]
        assert desc.algorithm_type == hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC
        assert desc.algorithm_identification is not None
        algo = desc.algorithm_identification[0]
        assert algo.AlgorithmName == rs.INFO.display_name
        assert algo.AlgorithmVersion == rs.INFO.version
        family = algo.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == ("123110", "DCM")
        expected = hd.color.CIELabColor.from_rgb(*finding.codes.color_rgb).value
        assert tuple(desc.RecommendedDisplayCIELabValue) == tuple(expected)
        assert desc.tracking_id == finding.name


def test_pixel_data_matches_label_map(case: tuple) -> None:
    volume, findings, path = case
    seg = hd.seg.segread(path)
    uids = [s.sop_instance_uid for s in volume.slices]
    got = np.zeros(volume.shape, dtype=np.uint8)
    for index, frame in enumerate(seg.PerFrameFunctionalGroupsSequence):
        number = frame.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        derivation = frame.DerivationImageSequence[0]
        source_uid = derivation.SourceImageSequence[0].ReferencedSOPInstanceUID
        z = uids.index(source_uid)
        got[:, :, z][seg.pixel_array[index].T > 0] = findings.findings[number - 1].label
    np.testing.assert_array_equal(got, findings.label_map)


def test_references_exact_source_instances(case: tuple) -> None:
    volume, _, path = case
    seg = pydicom.dcmread(path)
    assert seg.FrameOfReferenceUID == volume.frame_of_reference_uid
    assert seg.StudyInstanceUID == volume.study_instance_uid
    assert seg.SeriesInstanceUID != volume.series_instance_uid
    (series,) = seg.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == volume.series_instance_uid
    referenced = {i.ReferencedSOPInstanceUID for i in series.ReferencedInstanceSequence}
    assert referenced == {s.sop_instance_uid for s in volume.slices}


def test_per_frame_positions_are_source_positions(case: tuple) -> None:
    volume, _, path = case
    seg = pydicom.dcmread(path)
    by_uid = {d.SOPInstanceUID: d for d in sources(volume)}
    frames = seg.PerFrameFunctionalGroupsSequence
    assert len(frames) == int(seg.NumberOfFrames) < 2 * len(volume.slices)  # empties omitted
    for frame in frames:
        (derivation,) = frame.DerivationImageSequence
        (source_ref,) = derivation.SourceImageSequence
        source = by_uid[source_ref.ReferencedSOPInstanceUID]
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        np.testing.assert_allclose(
            [float(v) for v in position], [float(v) for v in source.ImagePositionPatient],
            atol=1e-4,
        )
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = shared.PlaneOrientationSequence[0].ImageOrientationPatient
    assert [float(v) for v in orientation] == [
        float(v) for v in sources(volume)[0].ImageOrientationPatient
    ]


def test_patient_study_and_provenance(case: tuple) -> None:
    volume, _, path = case
    seg = pydicom.dcmread(path)
    source = sources(volume)[0]
    for keyword in (
        "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID",
        "StudyID", "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription",
    ):
        assert seg.get(keyword) == source.get(keyword), keyword
    assert seg.SeriesNumber == 9001
    assert seg.SeriesDescription == "AI Lung Nodules - SEG - NOT FOR DIAGNOSTIC USE"
    assert seg.Manufacturer == "dicom-node"
    assert seg.ManufacturerModelName == rs.INFO.name
    versions = list(seg.SoftwareVersions)
    assert versions == [f"dicom-node {node_version()}", f"{rs.INFO.name} {rs.INFO.version}"]
    equipment = [
        (e.Manufacturer, e.get("ManufacturerModelName")) for e in seg.ContributingEquipmentSequence
    ]
    assert ("dicom-node", "dicom-node") in equipment
    assert (rs.INFO.manufacturer, rs.INFO.name) in equipment
    purposes = {
        e.PurposeOfReferenceCodeSequence[0].CodeValue for e in seg.ContributingEquipmentSequence
    }
    assert codes.DCM.ProcessingEquipment.value in purposes


def test_dciodvfy_reports_no_errors(case: tuple) -> None:
    _, _, path = case
    errors, output = rs.dciodvfy_errors(path)
    assert not errors, output


def test_no_findings_raises(case: tuple) -> None:
    volume, findings, _ = case
    empty = dataclasses.replace(findings, label_map=np.zeros_like(findings.label_map), findings=[])
    with pytest.raises(EncodeError, match="no findings"):
        encode_seg(volume, empty, rs.INFO, series_number=9001)


def test_label_map_off_grid_raises(case: tuple) -> None:
    volume, findings, _ = case
    wrong = dataclasses.replace(findings, label_map=findings.label_map[:, :-1, :])
    with pytest.raises(EncodeError, match="shape"):
        encode_seg(volume, wrong, rs.INFO, series_number=9001)


def test_finding_without_voxels_raises(case: tuple) -> None:
    volume, findings, _ = case
    ghost = dataclasses.replace(findings.findings[1], label=7, name="Nodule 3")
    wrong = dataclasses.replace(findings, findings=[*findings.findings, ghost])
    with pytest.raises(EncodeError, match="Nodule 3"):
        encode_seg(volume, wrong, rs.INFO, series_number=9001)
    twice = dataclasses.replace(findings, findings=[findings.findings[0]] * 2)
    with pytest.raises(EncodeError, match="two findings"):
        encode_seg(volume, twice, rs.INFO, series_number=9001)


def test_series_numbers_are_deterministic() -> None:
    assert result_series_numbers(0) == (9001, 9002, 9003, 9004)
    assert result_series_numbers(1) == (9011, 9012, 9013, 9014)
    assert (result_series_numbers(2).sc, result_series_numbers(2).kos) == (9023, 9024)
    assert result_series_numbers(7) == result_series_numbers(7)
    with pytest.raises(ValueError):
        result_series_numbers(-1)


def test_series_description_fits_lo_and_is_ascii() -> None:
    info = dataclasses.replace(rs.INFO, display_name="Détection de nodules pulmonaires " * 4)
    text = series_description(info, "SEG")
    assert len(text) <= 64 and text.isascii()
    assert text.endswith(" - SEG - NOT FOR DIAGNOSTIC USE")
    clinical = dataclasses.replace(rs.INFO, for_clinical_use=True)
    assert series_description(clinical, "SR") == "AI Lung Nodules - SR"


def test_series_description_never_says_ai_twice() -> None:
    shipped = dataclasses.replace(rs.INFO, display_name="AI Lung Nodules")  # as the manifest names it
    assert series_description(shipped, "SEG") == "AI Lung Nodules - SEG - NOT FOR DIAGNOSTIC USE"
    assert series_description(rs.INFO, "SEG") == series_description(shipped, "SEG")
    assert series_description(shipped, "SC") == "AI Lung Nodules - Key images - NOT FOR DIAGNOSTIC USE"
    assert series_description(shipped, "KOS") == "AI Lung Nodules - Key objects - NOT FOR DIAGNOSTIC USE"
    assert series_description(dataclasses.replace(rs.INFO, display_name="Aid tool"), "SR").startswith("AI Aid tool")


def test_real_ct_references_match_dcmqi_seg(case: tuple, tmp_path: Path) -> None:
    """Our SEG on three real CT slices references what dcmqi's liver SEG references."""
    volume = rs.build_volume(sorted(REAL_CT.glob("0[1-3].dcm")))
    x, y, _ = volume.shape
    label_map = np.zeros(volume.shape, dtype=np.uint8)
    label_map[x // 2 - 20 : x // 2 + 20, y // 2 - 10 : y // 2 + 30, :] = 1
    _, synthetic, _ = case
    findings = dataclasses.replace(
        synthetic, label_map=label_map, findings=synthetic.findings[:1]
    )
    ours = encode_seg(volume, findings, rs.INFO, series_number=9001)
    path = tmp_path / "real_seg.dcm"
    path.write_bytes(rs.to_bytes(ours))
    ours = pydicom.dcmread(path)
    theirs = pydicom.dcmread(REAL_CT / "liver_seg.dcm")

    assert ours.FrameOfReferenceUID == theirs.FrameOfReferenceUID
    assert ours.StudyInstanceUID == theirs.StudyInstanceUID
    assert _referenced(ours) == _referenced(theirs)
    assert _frame_refs(ours) == _frame_refs(theirs)
    errors, output = rs.dciodvfy_errors(path)
    assert not errors, output


def _referenced(seg: pydicom.Dataset) -> dict[str, set[str]]:
    return {
        s.SeriesInstanceUID: {i.ReferencedSOPInstanceUID for i in s.ReferencedInstanceSequence}
        for s in seg.ReferencedSeriesSequence
    }


def _frame_refs(seg: pydicom.Dataset) -> set[tuple[str, tuple[float, ...]]]:
    """(source SOP Instance UID, rounded frame position) of every frame."""
    refs = set()
    for frame in seg.PerFrameFunctionalGroupsSequence:
        uid = frame.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        position = frame.PlanePositionSequence[0].ImagePositionPatient
        refs.add((uid, tuple(round(float(v), 3) for v in position)))
    return refs
