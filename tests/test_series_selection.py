"""Series selection: which series of a study a plugin gets, and why others do not."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    XRayRadiationDoseSRStorage,
    generate_uid,
)

from dicom_node.errors import SeriesError
from dicom_node.series import build_volume, select_series
from phantoms.ct_writer import (
    SeriesLayout,
    StudyIdentity,
    simple_ct_volume,
    write_ct_series,
)
from plugin.types import SeriesCriteria

CRITERIA = SeriesCriteria(min_slices=10)
_FOLDERS = itertools.count()


@pytest.fixture
def study() -> StudyIdentity:
    return StudyIdentity()


def _series(
    tmp_path: Path, study: StudyIdentity, slices: int = 16, size: int = 16, **layout: Any
) -> tuple[str, list[Path]]:
    spec = SeriesLayout(**layout)
    hu = simple_ct_volume(slices, size, size)
    folder = tmp_path / f"series_{next(_FOLDERS)}"
    return spec.series_instance_uid, write_ct_series(hu, folder, study, spec)


def _edit(paths: list[Path], change: Callable[[Dataset, int], None]) -> None:
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        change(ds, index)
        ds.save_as(path, enforce_file_format=True)


def _non_image(
    tmp_path: Path, study: StudyIdentity, sop_class: str, modality: str
) -> tuple[str, Path]:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = study.study_instance_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = modality
    ds.Manufacturer = "Some Vendor"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID(sop_class)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    path = tmp_path / f"{modality}_{ds.SOPInstanceUID[-6:]}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return str(ds.SeriesInstanceUID), path


def _reason(rejected: tuple[str, ...], uid: str) -> str:
    matches = [r for r in rejected if uid in r]
    assert len(matches) == 1, rejected
    return matches[0]


def test_single_series_is_selected_in_slice_order(tmp_path: Path, study: StudyIdentity) -> None:
    uid, paths = _series(tmp_path, study)
    selection = select_series(paths[::-1], CRITERIA)
    assert selection.series_instance_uid == uid
    assert selection.paths == tuple(paths)
    assert selection.rejected == ()
    assert selection.slice_spacing_mm == pytest.approx(1.25)
    assert selection.sub_series is None


def test_localizers_are_skipped(tmp_path: Path, study: StudyIdentity) -> None:
    uid, paths = _series(tmp_path, study)
    scout_uid, scout = _series(
        tmp_path, study, slices=12, series_number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    tri_uid, tri = _series(tmp_path, study, slices=12, series_number=3)
    planes = [[1, 0, 0, 0, 1, 0], [0, 1, 0, 0, 0, -1], [1, 0, 0, 0, 0, -1]]
    _edit(tri, lambda ds, i: setattr(ds, "ImageOrientationPatient", planes[i % 3]))
    selection = select_series(scout + paths + tri, CRITERIA)
    assert selection.series_instance_uid == uid
    assert _reason(selection.rejected, scout_uid).endswith(": localizer")
    assert "localizer (orientations differ" in _reason(selection.rejected, tri_uid)


def test_nothing_qualifies_message(tmp_path: Path, study: StudyIdentity) -> None:
    few_uid, few = _series(tmp_path, study, slices=3)
    scout_uid, scout = _series(
        tmp_path, study, slices=2, series_number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    with pytest.raises(SeriesError) as caught:
        select_series(few + scout, SeriesCriteria())
    message = str(caught.value)
    assert message.startswith("no CT series with >= 64 slices")
    assert f"series {few_uid} (3 images): too few slices (3 < 64)" in message
    assert f"series {scout_uid} (2 images): localizer" in message
    for phi in (study.patient_name, study.patient_id, study.patient_birth_date):
        assert phi not in message


def test_multi_phase_series_is_split_by_acquisition(tmp_path: Path, study: StudyIdentity) -> None:
    uid = generate_uid()
    _, arterial = _series(tmp_path, study, series_instance_uid=uid, acquisition_number=1)
    _, venous = _series(tmp_path, study, series_instance_uid=uid, acquisition_number=2)
    selection = select_series(venous + arterial, CRITERIA)
    assert selection.series_instance_uid == uid
    assert selection.sub_series == "AcquisitionNumber=1"
    assert selection.paths == tuple(arterial)
    reason = _reason(selection.rejected, uid)
    assert "[AcquisitionNumber=2] (16 images): qualified, but" in reason
    assert reason.endswith("(lower split value)")
    assert build_volume(selection.paths).shape == (16, 16, 16)


def test_multi_phase_prefers_the_longer_phase(tmp_path: Path, study: StudyIdentity) -> None:
    uid = generate_uid()
    _, short = _series(tmp_path, study, slices=12, series_instance_uid=uid, acquisition_number=1)
    _, long = _series(tmp_path, study, slices=16, series_instance_uid=uid, acquisition_number=2)
    selection = select_series(short + long, CRITERIA)
    assert selection.sub_series == "AcquisitionNumber=2"
    assert selection.paths == tuple(long)


def test_split_falls_back_to_temporal_position(tmp_path: Path, study: StudyIdentity) -> None:
    uid = generate_uid()
    _, first = _series(tmp_path, study, series_instance_uid=uid)
    _, second = _series(tmp_path, study, series_instance_uid=uid)
    _edit(first, lambda ds, i: setattr(ds, "TemporalPositionIndex", 1))
    _edit(second, lambda ds, i: setattr(ds, "TemporalPositionIndex", 2))
    selection = select_series(first + second, CRITERIA)
    assert selection.sub_series == "TemporalPositionIndex=1"
    assert selection.paths == tuple(first)


def test_unresolved_duplicates_are_rejected(tmp_path: Path, study: StudyIdentity) -> None:
    uid = generate_uid()
    _, first = _series(tmp_path, study, series_instance_uid=uid)
    _, second = _series(tmp_path, study, series_instance_uid=uid)
    _edit(first + second, lambda ds, i: setattr(ds, "ContentTime", "120000"))
    with pytest.raises(
        SeriesError, match=f"series {uid} \\(32 images\\): duplicate slice positions not resolved"
    ):
        select_series(first + second, CRITERIA)


def test_own_and_non_image_objects_are_skipped(tmp_path: Path, study: StudyIdentity) -> None:
    uid, paths = _series(tmp_path, study)
    own_uid, own = _series(tmp_path, study, series_number=900)
    _edit(own, lambda ds, i: setattr(ds, "Manufacturer", "dicom-node"))
    seg_uid, seg = _non_image(tmp_path, study, SegmentationStorage, "SEG")
    dose_uid, dose = _non_image(tmp_path, study, XRayRadiationDoseSRStorage, "SR")
    sc_uid, sc = _series(tmp_path, study, series_number=999)
    _edit(sc, lambda ds, i: setattr(ds, "SOPClassUID", SecondaryCaptureImageStorage))
    derived_uid, derived = _series(
        tmp_path, study, series_number=5, image_type=("DERIVED", "SECONDARY", "AXIAL")
    )
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\x00" * 10)
    selection = select_series([*paths, *own, seg, dose, *sc, *derived, junk], CRITERIA)
    assert selection.series_instance_uid == uid
    assert _reason(selection.rejected, own_uid).endswith("produced by this node")
    assert _reason(selection.rejected, seg_uid).endswith(
        "not an image series (Segmentation Storage)"
    )
    assert "not an image series (X-Ray Radiation Dose SR Storage)" in _reason(
        selection.rejected, dose_uid
    )
    assert _reason(selection.rejected, sc_uid).endswith("secondary capture")
    assert "derived image" in _reason(selection.rejected, derived_uid)
    assert "1 unreadable file(s)" in selection.rejected


def test_modality_sop_class_and_image_type(tmp_path: Path, study: StudyIdentity) -> None:
    mr_uid, mr = _series(tmp_path, study, series_number=3)
    _edit(mr, lambda ds, i: setattr(ds, "Modality", "MR"))
    sop_uid, sop = _series(tmp_path, study, series_number=4)
    _edit(sop, lambda ds, i: setattr(ds, "SOPClassUID", "1.2.840.10008.5.1.4.1.1.2.1"))
    typ_uid, typ = _series(tmp_path, study, series_number=6, image_type=("ORIGINAL", "SECONDARY"))
    req_uid, req = _series(tmp_path, study, series_number=7, image_type=("ORIGINAL",))
    with pytest.raises(SeriesError) as caught:
        select_series(mr + sop + typ + req, CRITERIA)
    message = str(caught.value)
    assert f"series {mr_uid} (16 images): modality MR, wanted CT" in message
    assert (
        f"series {sop_uid} (16 images): SOP class Enhanced CT Image Storage not wanted" in message
    )
    assert f"series {typ_uid} (16 images): derived image (ImageType SECONDARY)" in message
    assert f"series {req_uid} (16 images): ImageType lacks PRIMARY" in message


def test_regexes_on_body_part_and_description(tmp_path: Path, study: StudyIdentity) -> None:
    chest_uid, chest = _series(
        tmp_path, study, series_number=2, body_part="CHEST", series_description="Lung 1mm"
    )
    abd_uid, abd = _series(
        tmp_path, study, series_number=3, body_part="ABDOMEN", series_description="Lung 1mm"
    )
    soft_uid, soft = _series(
        tmp_path, study, series_number=4, body_part="CHEST", series_description="Soft tissue"
    )
    criteria = SeriesCriteria(
        min_slices=10, body_part_regex="CHEST|THORAX", series_description_regex="Lung"
    )
    selection = select_series(abd + soft + chest, criteria)
    assert selection.series_instance_uid == chest_uid
    assert "BodyPartExamined does not match 'CHEST|THORAX'" in _reason(selection.rejected, abd_uid)
    assert "SeriesDescription does not match 'Lung'" in _reason(selection.rejected, soft_uid)
    with pytest.raises(SeriesError):
        select_series(
            chest, SeriesCriteria(min_slices=10, series_description_regex="lung")
        )  # case as given


def test_slice_count_and_spacing_limits(tmp_path: Path, study: StudyIdentity) -> None:
    thick_uid, thick = _series(tmp_path, study, series_number=2, slice_spacing_mm=6.0)
    many_uid, many = _series(tmp_path, study, series_number=3, slices=30)
    criteria = SeriesCriteria(min_slices=10, max_slices=20)
    with pytest.raises(SeriesError) as caught:
        select_series(thick + many, criteria)
    message = str(caught.value)
    assert f"series {thick_uid} (16 images): slice spacing 6.00 mm outside 0.5-5 mm" in message
    assert f"series {many_uid} (30 images): too many slices (30 > 20)" in message


def test_geometry_problems_reject_a_series(tmp_path: Path, study: StudyIdentity) -> None:
    good_uid, good = _series(tmp_path, study, series_number=9)
    gap_uid, gap = _series(tmp_path, study, series_number=2, slice_spacing_mm=0.625)
    selection = select_series(good + gap[:5] + gap[6:], CRITERIA)
    assert selection.series_instance_uid == good_uid
    assert "gap between slice 4 and 5: 1.25 mm, expected 0.62 mm" in _reason(
        selection.rejected, gap_uid
    )


@pytest.mark.parametrize(
    ("a", "b", "winner", "why"),
    [
        ({"slice_spacing_mm": 1.0}, {"slice_spacing_mm": 2.0, "slices": 20}, "a", "thinner slices"),
        ({"slices": 12}, {"slices": 16}, "b", "more slices"),
        ({"series_number": 7}, {"series_number": 3}, "b", "lower SeriesNumber"),
        (
            {"series_instance_uid": "1.2.3.5"},
            {"series_instance_uid": "1.2.3.4"},
            "b",
            "lower SeriesInstanceUID",
        ),
    ],
)
def test_tiebreak(
    tmp_path: Path,
    study: StudyIdentity,
    a: dict[str, Any],
    b: dict[str, Any],
    winner: str,
    why: str,
) -> None:
    a_uid, a_paths = _series(tmp_path, study, **{"series_number": 5, **a})
    b_uid, b_paths = _series(tmp_path, study, **{"series_number": 5, **b})
    selection = select_series(a_paths + b_paths, CRITERIA)
    chosen, other = (a_uid, b_uid) if winner == "a" else (b_uid, a_uid)
    assert selection.series_instance_uid == chosen
    assert _reason(selection.rejected, other).endswith(f"preferred ({why})")


def test_oblique_series_qualifies(tmp_path: Path, study: StudyIdentity) -> None:
    uid, paths = _series(tmp_path, study, orientation=(0.8, 0.6, 0.0, -0.6, 0.8, 0.0))
    assert select_series(paths, CRITERIA).series_instance_uid == uid


def test_large_study_selection_is_fast(tmp_path: Path, study: StudyIdentity) -> None:
    """600 slices of 128x128: only headers are read, so this takes well under a second or two."""
    uid, paths = _series(tmp_path, study, slices=600, size=128, slice_spacing_mm=0.625)
    _, scout = _series(
        tmp_path, study, slices=2, series_number=1, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER")
    )
    start = time.perf_counter()
    selection = select_series(paths + scout, SeriesCriteria())
    elapsed = time.perf_counter() - start
    assert selection.series_instance_uid == uid
    assert len(selection.paths) == 600
    assert elapsed < 5.0, f"selection of 600 slices took {elapsed:.2f} s"
    assert np.isclose(selection.slice_spacing_mm, 0.625)
