"""TID 1500 SR encoding: round trip, measurements, regions, provenance, validators."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes
from pydicom.uid import SegmentationStorage

from dicom_node.errors import EncodeError
from dicom_node.results import encode_sr
from dicom_node.results.common import node_version
from dicom_node.results.readback import read_findings
from dicom_node.results.sr import MEASUREMENT_CONVENTIONS, SUBSOLID_CONVENTION
from tests.support import REAL_CT

from tests import results_support as rs


@pytest.fixture(scope="module")
def case(tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """A written CT series, its Volume, two spheres and the SR file."""
    out = tmp_path_factory.mktemp("sr")
    volume = rs.build_volume(rs.write_series(out / "ct"))
    findings = rs.make_findings(volume)
    findings.summary = "2 nodules found."
    sr = encode_sr(volume, findings, rs.INFO, series_number=9002)
    path = out / "sr.dcm"
    path.write_bytes(rs.to_bytes(sr))
    return volume, findings, path


@pytest.fixture(scope="module")
def empty_case(case: tuple, tmp_path_factory: pytest.TempPathFactory) -> tuple:
    """The SR of the same study with no findings."""
    volume, findings, _ = case
    empty = dataclasses.replace(
        findings, label_map=np.zeros_like(findings.label_map), findings=[], summary=""
    )
    sr = encode_sr(
        volume, empty, rs.INFO, series_number=9012, absent_finding_type=codes.SCT.Nodule
    )
    path = tmp_path_factory.mktemp("sr_empty") / "sr.dcm"
    path.write_bytes(rs.to_bytes(sr))
    return volume, empty, path


def report_of(path: Path) -> hd.sr.MeasurementReport:
    sr = hd.sr.srread(path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR)
    return hd.sr.MeasurementReport.from_sequence(sr.content)


def single(items: list):  # type: ignore[no-untyped-def]
    assert len(items) == 1, items
    return items[0]


def test_planar_groups_long_and_short_axis(case: tuple) -> None:
    volume, findings, path = case
    report = report_of(path)
    for finding in findings.findings:
        group = single(report.get_planar_roi_measurement_groups(tracking_uid=_uid(report, finding)))
        assert group.tracking_identifier == finding.name
        assert group.finding_type == finding.codes.type
        assert group.finding_category == finding.codes.category
        assert [s.value for s in group.finding_sites] == [finding.codes.site]
        long_axis = single(group.get_measurements(name=codes.SCT.LongAxis))
        short_axis = single(group.get_measurements(name=codes.SCT.ShortAxis))
        assert long_axis.value == pytest.approx(finding.long_axis.length_mm, rel=1e-9)
        assert short_axis.value == pytest.approx(finding.short_axis.length_mm, rel=1e-9)
        assert long_axis.unit == codes.UCUM.Millimeter == short_axis.unit
        region = group.roi
        assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
        np.testing.assert_allclose(
            region.value, [finding.long_axis.start, finding.long_axis.end], rtol=1e-6
        )
        key = volume.slices[finding.key_slice].sop_instance_uid
        assert _region_source(region) == key


def test_volumetric_groups_volume_mean_hu_and_outlines(case: tuple) -> None:
    volume, findings, path = case
    report = report_of(path)
    uids = [s.sop_instance_uid for s in volume.slices]
    for finding in findings.findings:
        tracking_uid = _uid(report, finding)
        group = single(report.get_volumetric_roi_measurement_groups(tracking_uid=tracking_uid))
        assert group.tracking_identifier == finding.name
        assert group.finding_type == finding.codes.type
        volume_mm3 = single(group.get_measurements(name=codes.SCT.Volume))
        mean_hu = single(group.get_measurements(name=codes.DCM.MeanAttenuationCoefficient))
        assert volume_mm3.value == pytest.approx(finding.volume_mm3, rel=1e-9)
        assert volume_mm3.unit == codes.UCUM.CubicMillimeter
        assert mean_hu.value == pytest.approx(finding.mean_hu, rel=1e-9)
        assert mean_hu.unit == codes.UCUM.HounsfieldUnit
        spread = group.get_measurements(name=codes.DCM.AttenuationCoefficient)
        by_derivation = {m.derivation: m.value for m in spread}
        assert by_derivation == {
            codes.SCT.StandardDeviation: pytest.approx(finding.sd_hu, rel=1e-9),
            codes.SCT.Maximum: pytest.approx(finding.max_hu, rel=1e-9),
        }
        regions = group.roi
        assert len(regions) == sum(len(c) for c in finding.contours.values())
        slices = [uids.index(_region_source(r)) for r in regions]
        assert slices == sorted(finding.contours)
        for region, z in zip(regions, slices, strict=True):
            points = np.asarray(region.value)
            assert region.graphic_type == hd.sr.GraphicTypeValues.POLYLINE
            np.testing.assert_array_equal(points[0], points[-1])  # closed
            np.testing.assert_allclose(points[:-1], finding.contours[z][0], rtol=1e-6)


def test_tracking_uid_shared_by_the_two_groups_of_a_finding(case: tuple) -> None:
    _, findings, path = case
    report = report_of(path)
    planar = report.get_planar_roi_measurement_groups()
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_uid for g in planar] == [g.tracking_uid for g in volumetric]
    assert len(set(g.tracking_uid for g in planar)) == len(findings.findings)


def test_report_context_library_and_provenance(case: tuple) -> None:
    volume, findings, path = case
    sr = pydicom.dcmread(path)
    report = report_of(path)
    root = sr.ContentSequence
    procedure = _children(sr, "121058")  # Procedure reported
    assert [(c.CodeValue, c.CodingSchemeDesignator) for c in procedure] == [
        (findings.procedure.value, findings.procedure.scheme_designator)
    ]
    observer = single(report.get_observer_contexts(observer_type=codes.cid270.Device))
    attributes = observer.observer_identifying_attributes
    assert attributes.uid == rs.INFO.device_uid
    assert attributes.name == rs.INFO.display_name
    library = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in rs.walk(sr)
        if item.get("ValueType") == "IMAGE" and item.get("RelationshipType") == "CONTAINS"
    }
    drawn_on = {f.key_slice for f in findings.findings} | {z for f in findings.findings for z in f.contours}
    assert library == {volume.slices[z].sop_instance_uid for z in drawn_on}
    evidence = {
        inst.ReferencedSOPInstanceUID
        for study in sr.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for inst in series.ReferencedSOPSequence
    }
    assert evidence == {s.sop_instance_uid for s in volume.slices}
    assert root is not None and sr.StudyInstanceUID == volume.study_instance_uid
    assert sr.SeriesInstanceUID != volume.series_instance_uid
    assert sr.SeriesNumber == 9002
    assert sr.SeriesDescription == "AI Lung Nodules - SR - NOT FOR DIAGNOSTIC USE"
    assert sr.Manufacturer == "dicom-node"
    assert list(sr.SoftwareVersions) == [
        f"dicom-node {node_version()}", f"{rs.INFO.name} {rs.INFO.version}"
    ]
    source = pydicom.dcmread(volume.slices[0].path, stop_before_pixels=True)
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "StudyID", "AccessionNumber"):
        assert sr.get(keyword) == source.get(keyword), keyword
    equipment = {e.Manufacturer for e in sr.ContributingEquipmentSequence}
    assert {"dicom-node", rs.INFO.manufacturer} <= equipment


def test_a_model_score_is_the_certainty_of_finding(case: tuple) -> None:
    _, findings, path = case
    report = report_of(path)
    scored, unscored = findings.findings
    group = single(report.get_planar_roi_measurement_groups(tracking_uid=_uid(report, scored)))
    certainty = single(group.get_measurements(name=codes.DCM.CertaintyOfFinding))
    assert certainty.value == pytest.approx(87.0)
    assert certainty.unit == codes.UCUM.Percent
    group = single(report.get_planar_roi_measurement_groups(tracking_uid=_uid(report, unscored)))
    assert not group.get_measurements(name=codes.DCM.CertaintyOfFinding)
    read = {f.name: f for f in read_findings(path)}
    assert read[scored.name].certainty_percent == pytest.approx(87.0)
    assert read[scored.name].sd_hu == pytest.approx(scored.sd_hu, rel=1e-6)
    assert read[scored.name].max_hu == pytest.approx(scored.max_hu, rel=1e-6)


def test_a_finding_without_a_core_gets_no_attenuation(case: tuple, tmp_path: Path) -> None:
    """Too thin for a core: its mean would read low by partial volume, so the report
    gives its volume and says why the attenuation is missing."""
    volume, findings, _ = case
    thin = dataclasses.replace(findings.findings[1], attenuation_from_core=False)
    changed = dataclasses.replace(findings, findings=[findings.findings[0], thin])
    path = tmp_path / "sr.dcm"
    path.write_bytes(rs.to_bytes(encode_sr(volume, changed, rs.INFO, series_number=9003)))
    report = report_of(path)
    group = single(report.get_volumetric_roi_measurement_groups(tracking_uid=_uid(report, thin)))
    assert single(group.get_measurements(name=codes.SCT.Volume)).value == pytest.approx(thin.volume_mm3)
    assert not group.get_measurements(name=codes.DCM.MeanAttenuationCoefficient)
    assert not group.get_measurements(name=codes.DCM.AttenuationCoefficient)
    texts = _comments(pydicom.dcmread(path))
    assert any(t.startswith(f"Attenuation not measured for {thin.name}:") for t in texts), texts
    errors, output = rs.dciodvfy_errors(path)
    assert not errors, output


def test_an_attenuation_from_one_voxel_has_no_standard_deviation(case: tuple, tmp_path: Path) -> None:
    """A core of one voxel (a 10 mm nodule on 5 mm slices) gives a mean and a maximum, but
    no spread: a standard deviation of 0 HU would read as a noiseless measurement."""
    volume, findings, _ = case
    single_voxel = dataclasses.replace(findings.findings[1], sd_hu=0.0, attenuation_voxels=1)
    many = dataclasses.replace(findings.findings[0], attenuation_voxels=200)
    changed = dataclasses.replace(findings, findings=[many, single_voxel])
    path = tmp_path / "sr.dcm"
    path.write_bytes(rs.to_bytes(encode_sr(volume, changed, rs.INFO, series_number=9004)))
    report = report_of(path)
    for finding, derivations in ((single_voxel, {codes.SCT.Maximum}),
                                 (many, {codes.SCT.StandardDeviation, codes.SCT.Maximum})):
        group = single(report.get_volumetric_roi_measurement_groups(tracking_uid=_uid(report, finding)))
        assert single(group.get_measurements(name=codes.DCM.MeanAttenuationCoefficient)).value == pytest.approx(
            finding.mean_hu)
        assert {m.derivation for m in group.get_measurements(name=codes.DCM.AttenuationCoefficient)} == derivations
    errors, output = rs.dciodvfy_errors(path)
    assert not errors, output


def test_subsolid_findings_state_their_composition_and_solid_component(case: tuple, tmp_path: Path) -> None:
    """A part-solid nodule's solid component and a ground-glass nodule are named in the
    report's comments, with the convention; a solid one is not."""
    volume, findings, _ = case
    first, second = findings.findings
    part_solid = dataclasses.replace(first, composition="part_solid", solid_volume_mm3=81.6,
                                     solid_long_axis_mm=6.24)
    glass = dataclasses.replace(second, composition="ground_glass")
    path = tmp_path / "sr.dcm"
    changed = dataclasses.replace(findings, findings=[part_solid, glass])
    path.write_bytes(rs.to_bytes(encode_sr(volume, changed, rs.INFO, series_number=9003)))
    texts = _comments(pydicom.dcmread(path))
    assert f"{part_solid.name}: part-solid, solid component long axis 6.2 mm, volume 82 mm3." in texts
    assert f"{glass.name}: ground glass (no solid component)." in texts
    assert SUBSOLID_CONVENTION in texts
    _, _, solid_path = case
    assert SUBSOLID_CONVENTION not in _comments(pydicom.dcmread(solid_path))
    errors, output = rs.dciodvfy_errors(path)
    assert not errors, output
    _assert_dsrdump_clean(path)


def test_states_not_for_diagnostic_use_and_summary(case: tuple) -> None:
    _, _, path = case
    texts = _comments(pydicom.dcmread(path))
    assert any("NOT FOR DIAGNOSTIC USE" in t for t in texts)
    assert "2 nodules found." in texts
    assert MEASUREMENT_CONVENTIONS in texts


def test_never_references_a_segmentation(case: tuple) -> None:
    _, _, path = case
    sr = pydicom.dcmread(path)
    for item in rs.walk(sr):
        assert item.get("ReferencedSOPClassUID") != SegmentationStorage
        names = item.get("ConceptNameCodeSequence") or []
        meanings = {n.CodeMeaning for n in names}
        assert not meanings & {"Referenced Segment", "Referenced Segmentation Frame"}


def test_dciodvfy_and_dsrdump_accept_the_sr(case: tuple) -> None:
    _, _, path = case
    errors, output = rs.dciodvfy_errors(path)
    assert not errors, output
    _assert_dsrdump_clean(path)


def test_no_findings_sr_says_none_found(empty_case: tuple) -> None:
    _, _, path = empty_case
    report = report_of(path)
    assert not report.get_planar_roi_measurement_groups()
    assert not report.get_volumetric_roi_measurement_groups()
    group = single(report.get_image_measurement_groups())
    assert group.finding_type == codes.SCT.Nodule
    evaluation = single(group.get_qualitative_evaluations(name=codes.SCT.Nodule))
    assert evaluation.value == codes.SCT.Absent
    texts = _comments(pydicom.dcmread(path))
    assert "Analysis completed: no nodule detected." in texts
    assert any("NOT FOR DIAGNOSTIC USE" in t for t in texts)
    errors, output = rs.dciodvfy_errors(path)
    assert not errors, output
    _assert_dsrdump_clean(path)


def test_clinical_use_drops_the_disclaimer(case: tuple) -> None:
    volume, findings, _ = case
    clinical = dataclasses.replace(rs.INFO, for_clinical_use=True)
    sr = encode_sr(volume, findings, clinical, series_number=9002)
    assert sr.SeriesDescription == "AI Lung Nodules - SR"
    assert not any("NOT FOR DIAGNOSTIC USE" in t for t in _comments(sr))


def test_bad_regions_raise(case: tuple) -> None:
    volume, findings, _ = case
    no_outline = dataclasses.replace(findings.findings[0], contours={})
    with pytest.raises(EncodeError, match="no contours"):
        encode_sr(volume, dataclasses.replace(findings, findings=[no_outline]), rs.INFO,
                  series_number=9002)
    axis = dataclasses.replace(findings.findings[0].long_axis, end=(500.0, 10.0))
    outside = dataclasses.replace(findings.findings[0], long_axis=axis)
    with pytest.raises(EncodeError, match="outside the image"):
        encode_sr(volume, dataclasses.replace(findings, findings=[outside]), rs.INFO,
                  series_number=9002)


def test_real_ct_sr_validates(case: tuple, tmp_path: Path) -> None:
    """An SR on real scanner slices (empty character set, Implicit VR) validates."""
    volume = rs.build_volume(sorted(REAL_CT.glob("0[1-3].dcm")))
    _, findings, _ = case
    finding = dataclasses.replace(findings.findings[0], key_slice=1, contours={
        z: [np.array([[200.0, 200.0], [260.0, 200.0], [260.0, 240.0], [200.0, 240.0]])]
        for z in range(3)
    })
    real = dataclasses.replace(
        findings, label_map=np.zeros(volume.shape, np.uint8), findings=[finding]
    )
    path = tmp_path / "real_sr.dcm"
    path.write_bytes(rs.to_bytes(encode_sr(volume, real, rs.INFO, series_number=9002)))
    errors, output = rs.dciodvfy_errors(path)
    assert not errors, output
    _assert_dsrdump_clean(path)


def _assert_dsrdump_clean(path: Path) -> None:
    result = rs.run_tool("dsrdump", path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "error" not in result.stderr.lower(), result.stderr
    assert "Imaging Measurement Report" in result.stdout


def _uid(report: hd.sr.MeasurementReport, finding) -> str:  # type: ignore[no-untyped-def]
    groups = report.get_planar_roi_measurement_groups()
    return single([g.tracking_uid for g in groups if g.tracking_identifier == finding.name])


def _region_source(region: hd.sr.ImageRegion) -> str:
    image = region.ContentSequence[0]
    return str(image.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)


def _children(sr: pydicom.Dataset, concept: str) -> list[pydicom.Dataset]:
    """Coded values of root-level items with concept name code ``concept``."""
    return [
        item.ConceptCodeSequence[0]
        for item in sr.ContentSequence
        if item.ConceptNameCodeSequence[0].CodeValue == concept
    ]


def _comments(sr: pydicom.Dataset) -> list[str]:
    return [
        str(item.TextValue)
        for item in rs.walk(sr)
        if item.get("ValueType") == "TEXT"
        and item.ConceptNameCodeSequence[0].CodeValue == codes.DCM.Comment.value
    ]
