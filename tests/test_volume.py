"""Volume building: sorting, geometry checks, decoding, affine and MONAI round trip."""

from __future__ import annotations

import random
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    EnhancedCTImageStorage,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from dicom_node.errors import SeriesError
from dicom_node.series import SliceHeader, build_volume, check_stack, select_series
from phantoms.ct_writer import (
    SeriesLayout,
    StudyIdentity,
    simple_ct_volume,
    write_ct_series,
)
from plugin.types import LPS_TO_RAS, SeriesCriteria, Volume
from tests.support import REAL_CT

SLICES, ROWS, COLUMNS = 20, 32, 32


def _hu(slices: int = SLICES, rows: int = ROWS, columns: int = COLUMNS) -> np.ndarray:
    """A test volume (z, rows, columns) that every pixel encoding holds exactly."""
    return np.clip(np.rint(simple_ct_volume(slices, rows, columns)), -1000, 2000)


def _write(
    tmp_path: Path, hu: np.ndarray | None = None, name: str = "s", **layout: Any
) -> list[Path]:
    data = _hu() if hu is None else hu
    return write_ct_series(data, tmp_path / name, StudyIdentity(), SeriesLayout(**layout))


def _edit(paths: list[Path], change: Callable[[Dataset, int], None]) -> None:
    for index, path in enumerate(paths):
        ds = pydicom.dcmread(path)
        change(ds, index)
        ds.save_as(path, enforce_file_format=True)


def _zyx(volume: Volume) -> np.ndarray:
    """The volume as (z, rows, columns), the layout the writer takes."""
    return volume.image[0].numpy().transpose(2, 1, 0)


def _ipp(path: Path) -> np.ndarray:
    return np.asarray(pydicom.dcmread(path, stop_before_pixels=True).ImagePositionPatient, float)


# --- sorting ------------------------------------------------------------------


def test_shuffled_files_are_sorted_by_position(tmp_path: Path) -> None:
    hu = _hu()
    paths = _write(tmp_path, hu)
    shuffled = paths[:]
    random.Random(3).shuffle(shuffled)
    volume = build_volume(shuffled)
    assert volume.shape == (COLUMNS, ROWS, SLICES)
    np.testing.assert_array_equal(_zyx(volume), hu)
    assert [s.path for s in volume.slices] == paths


def test_descending_positions(tmp_path: Path) -> None:
    hu = _hu()
    paths = _write(tmp_path, hu, slice_spacing_mm=-1.25, slice_thickness_mm=1.25)
    volume = build_volume(paths)
    np.testing.assert_array_equal(_zyx(volume), hu[::-1])
    assert [s.path for s in volume.slices] == paths[::-1]
    assert volume.spacing_mm == pytest.approx((0.7, 0.7, 1.25))
    np.testing.assert_allclose(volume.lps_affine()[:3, 3], _ipp(paths[-1]))


def test_negative_normal_direction(tmp_path: Path) -> None:
    """Rows run posterior to anterior, so the normal points to the feet."""
    hu = _hu()
    paths = _write(tmp_path, hu, orientation=(1.0, 0.0, 0.0, 0.0, -1.0, 0.0))
    volume = build_volume(paths)
    np.testing.assert_array_equal(_zyx(volume), hu)
    lps = volume.lps_affine()
    np.testing.assert_allclose(lps[:3, 2], [0.0, 0.0, -1.25])
    for z, path in enumerate(paths):
        np.testing.assert_allclose(lps @ [0, 0, z, 1], [*_ipp(path), 1.0], atol=1e-6)


# --- geometry errors ----------------------------------------------------------


def test_gap_is_refused(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    with pytest.raises(
        SeriesError, match=r"gap between slice 9 and 10: 2\.50 mm, expected 1\.25 mm"
    ):
        build_volume(paths[:10] + paths[11:])


def test_non_uniform_spacing_is_refused(tmp_path: Path) -> None:
    paths = _write(tmp_path)

    def shift(ds: Dataset, index: int) -> None:
        if index == 7:
            ds.ImagePositionPatient = [-180.0, -180.0, 7 * 1.25 + 0.5]

    _edit(paths, shift)
    with pytest.raises(
        SeriesError, match=r"non-uniform slice spacing between slice 6 and 7: 1\.75 mm"
    ):
        build_volume(paths)


def test_duplicate_positions_are_refused(tmp_path: Path) -> None:
    study = StudyIdentity()
    uid = pydicom.uid.generate_uid()
    paths = []
    for acquisition in (1, 2):
        layout = SeriesLayout(
            series_instance_uid=uid, acquisition_number=acquisition, series_number=acquisition
        )
        paths += write_ct_series(_hu(), tmp_path / f"p{acquisition}", study, layout)
    with pytest.raises(SeriesError, match="duplicate slice positions"):
        build_volume(paths)


def test_sheared_stack_is_refused(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    tilt = np.tan(np.radians(15.0)) * 1.25

    def shear(ds: Dataset, index: int) -> None:
        ds.ImagePositionPatient = [-180.0, -180.0 + index * tilt, index * 1.25]

    _edit(paths, shear)
    with pytest.raises(SeriesError, match="sheared stack"):
        build_volume(paths)


def test_mixed_orientation_is_refused(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(
        paths[:1], lambda ds, i: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 0, 0.9998, 0.02])
    )
    with pytest.raises(SeriesError, match="mixed orientations"):
        build_volume(paths)


def test_mixed_matrix_sizes_are_refused(tmp_path: Path) -> None:
    study, uid = StudyIdentity(), pydicom.uid.generate_uid()
    first = write_ct_series(
        _hu(10, 32, 32), tmp_path / "a", study, SeriesLayout(series_instance_uid=uid)
    )
    layout = SeriesLayout(
        series_instance_uid=uid, origin_mm=(-180.0, -180.0, 12.5), series_number=3
    )
    second = write_ct_series(_hu(10, 32, 40), tmp_path / "b", study, layout)
    with pytest.raises(
        SeriesError, match=r"mixed matrix sizes: instance [\d.]+ is 32x40, instance [\d.]+ is 32x32"
    ):
        build_volume(first + second)


def test_mixed_pixel_spacing_is_refused(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[3:4], lambda ds, i: setattr(ds, "PixelSpacing", [0.8, 0.8]))
    with pytest.raises(SeriesError, match="mixed pixel spacing"):
        build_volume(paths)


def test_several_series_are_refused(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="2 series"):
        build_volume(_write(tmp_path, name="a") + _write(tmp_path, name="b"))


def test_enhanced_multiframe_is_refused(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[:1], lambda ds, i: setattr(ds, "SOPClassUID", EnhancedCTImageStorage))
    with pytest.raises(SeriesError, match="enhanced multi-frame CT is not supported yet"):
        build_volume(paths)


def test_single_slice(tmp_path: Path) -> None:
    volume = build_volume(_write(tmp_path)[:1])
    assert volume.shape == (COLUMNS, ROWS, 1)
    assert volume.spacing_mm == pytest.approx((0.7, 0.7, 1.25))  # from SliceThickness


def test_max_voxels(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    with pytest.raises(SeriesError, match=r"too large: 32x32x20 = 20480 voxels, limit 20479"):
        build_volume(paths, max_voxels=20479)
    assert build_volume(paths, max_voxels=20480).shape == (32, 32, 20)


def test_empty_and_unreadable(tmp_path: Path) -> None:
    with pytest.raises(SeriesError, match="no slices"):
        build_volume([])
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"not dicom at all")
    with pytest.raises(SeriesError):
        build_volume([junk])


# --- pixel decoding -----------------------------------------------------------


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("bits", [12, 16])
def test_pixel_representations_give_identical_hu(tmp_path: Path, signed: bool, bits: int) -> None:
    hu = _hu()
    volume = build_volume(_write(tmp_path, hu, signed=signed, bits_stored=bits))
    assert volume.image.dtype == torch.float32
    np.testing.assert_array_equal(_zyx(volume), hu)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("syntax", [ImplicitVRLittleEndian, ExplicitVRLittleEndian])
def test_native_fast_path_matches_pydicom(tmp_path: Path, signed: bool, syntax: str) -> None:
    """Uncompressed slices read straight from the file give pydicom's values exactly,
    unused high bits (BitsStored 12, here set to junk) included."""
    paths = _write(tmp_path, _hu(), transfer_syntax=syntax, signed=signed, bits_stored=12)
    junk = np.uint16(0xA000)

    def dirty(ds: Dataset, index: int) -> None:
        raw = np.frombuffer(ds.PixelData, dtype="<u2") | junk
        ds.PixelData = raw.tobytes()
        ds.RescaleSlope = 1.5
        ds.RescaleIntercept = -1024

    _edit(paths, dirty)
    expected = np.stack(
        [pydicom.dcmread(p).pixel_array.astype(np.float32) * np.float32(1.5) - 1024 for p in paths]
    )
    volume = build_volume(paths)
    np.testing.assert_array_equal(_zyx(volume), expected)
    headers = [pydicom.dcmread(p, stop_before_pixels=True) for p in paths]
    assert [ds.SOPInstanceUID for ds in volume.source_headers] == [h.SOPInstanceUID for h in headers]
    assert all("PixelData" not in ds for ds in volume.source_headers)


def test_given_headers_are_not_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.series import volume as volume_module

    paths = _write(tmp_path)
    selection = select_series(paths, SeriesCriteria(min_slices=1))
    monkeypatch.setattr(volume_module, "read_header", lambda path: pytest.fail("header read again"))
    volume = build_volume(selection.paths, headers=selection.headers)
    np.testing.assert_array_equal(_zyx(volume), _hu())


def test_rescale_slope_is_applied(tmp_path: Path) -> None:
    hu = _hu()
    paths = _write(tmp_path, hu)

    def halve(ds: Dataset, index: int) -> None:
        stored = ds.pixel_array.astype(np.int16)
        ds.PixelData = (stored // 2).astype(np.int16).tobytes()
        ds.RescaleSlope = 2
        ds.RescaleIntercept = 10

    _edit(paths, halve)
    np.testing.assert_array_equal(_zyx(build_volume(paths)), (hu // 2) * 2 + 10)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, RLELossless, ImplicitVRLittleEndian])
@pytest.mark.parametrize("signed", [True, False])
def test_pydicom_encoded_series(tmp_path: Path, syntax: str, signed: bool) -> None:
    hu = _hu(6)
    paths = _write(tmp_path, hu, transfer_syntax=syntax, signed=signed, bits_stored=12)
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(_zyx(build_volume(paths)), hu)


def test_deflated_series(tmp_path: Path) -> None:
    hu = _hu(6)
    paths = _write(tmp_path, hu)
    _edit(
        paths,
        lambda ds, i: setattr(ds.file_meta, "TransferSyntaxUID", DeflatedExplicitVRLittleEndian),
    )
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    np.testing.assert_array_equal(_zyx(build_volume(paths)), hu)


def _dcmtk(tool: str, args: list[str], paths: list[Path], out_dir: Path) -> list[Path]:
    """Compress with a dcmtk tool; a missing tool fails the test (no skip)."""
    if shutil.which(tool) is None:
        pytest.fail(f"{tool} (dcmtk) is required for this test but is not installed")
    out_dir.mkdir()
    outputs = []
    for path in paths:
        target = out_dir / path.name
        subprocess.run([tool, *args, str(path), str(target)], check=True, capture_output=True)
        outputs.append(target)
    return outputs


@pytest.mark.parametrize(
    ("tool", "args", "syntax"),
    [
        ("dcmcjpeg", [], "1.2.840.10008.1.2.4.70"),  # JPEG Lossless SV1
        ("dcmcjpls", [], "1.2.840.10008.1.2.4.80"),  # JPEG-LS Lossless
    ],
)
@pytest.mark.parametrize("signed", [True, False])
def test_dcmtk_lossless_series(
    tmp_path: Path, tool: str, args: list[str], syntax: str, signed: bool
) -> None:
    hu = _hu(6)
    paths = _dcmtk(tool, args, _write(tmp_path, hu, signed=signed), tmp_path / "out")
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(_zyx(build_volume(paths)), hu)


@pytest.mark.parametrize(
    ("args", "syntax"), [(["+eb"], "1.2.840.10008.1.2.4.50"), (["+ee"], "1.2.840.10008.1.2.4.51")]
)
def test_dcmtk_lossy_jpeg_series(tmp_path: Path, args: list[str], syntax: str) -> None:
    """JPEG Baseline (8 bit, dcmtk rescales via slope) and Extended decode to near HU."""
    hu = _hu(4)
    paths = _dcmtk("dcmcjpeg", args, _write(tmp_path, hu), tmp_path / "out")
    assert pydicom.dcmread(paths[0]).file_meta.TransferSyntaxUID == syntax
    error = np.abs(_zyx(build_volume(paths)) - hu)
    assert error.mean() < 25.0
    assert error.max() < 200.0


# --- memory and metadata -------------------------------------------------------


def test_metatensor_metadata_and_single_copy(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    volume = build_volume(paths)
    image = volume.image
    first = pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert image.shape == (1, COLUMNS, ROWS, SLICES)
    assert image.untyped_storage().nbytes() == COLUMNS * ROWS * SLICES * 4
    assert image.affine.dtype == torch.float64
    np.testing.assert_allclose(image.meta["original_affine"], image.affine.numpy())
    assert list(image.meta["spatial_shape"]) == [COLUMNS, ROWS, SLICES]
    assert image.meta["original_channel_dim"] == 0
    assert image.meta["space"] == "RAS"
    assert image.meta["filename_or_obj"] == first.SeriesInstanceUID
    assert volume.series_instance_uid == first.SeriesInstanceUID
    assert volume.study_instance_uid == first.StudyInstanceUID
    assert volume.frame_of_reference_uid == first.FrameOfReferenceUID
    assert [s.sop_instance_uid for s in volume.slices] == [
        pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in paths
    ]
    assert all(s.sop_class_uid == first.SOPClassUID for s in volume.slices)


def test_undecodable_pixel_data(tmp_path: Path) -> None:
    paths = _write(tmp_path)
    _edit(paths[4:5], lambda ds, i: setattr(ds, "PixelData", ds.PixelData[:100]))
    with pytest.raises(SeriesError, match="slice 4: cannot decode pixel data"):
        build_volume(paths)


def test_threads_decode_what_one_thread_decodes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Slices decoded in parallel threads give the same voxels and headers, in slice order."""
    from dicom_node.series import volume as volume_module

    paths = _write(tmp_path, _hu(slices=40))
    random.Random(3).shuffle(paths)
    built = {}
    for threads in (1, 4):
        monkeypatch.setattr(volume_module, "_decode_threads", lambda n=threads: n)
        built[threads] = build_volume(paths)
    one, many = built[1], built[4]
    assert np.array_equal(one.image.numpy(), many.image.numpy())
    np.testing.assert_array_equal(_zyx(many), _hu(slices=40))
    assert [h.SOPInstanceUID for h in many.source_headers] == [s.sop_instance_uid for s in many.slices]
    assert [s.sop_instance_uid for s in one.slices] == [s.sop_instance_uid for s in many.slices]


def test_with_threads_the_first_bad_slice_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicom_node.series import volume as volume_module

    monkeypatch.setattr(volume_module, "_decode_threads", lambda: 4)
    paths = _write(tmp_path)
    _edit(paths[9:10] + paths[3:4], lambda ds, i: setattr(ds, "PixelData", ds.PixelData[:100]))
    with pytest.raises(SeriesError, match="slice 3: cannot decode pixel data"):
        build_volume(paths)


def test_tensor_shares_the_filled_buffer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The MetaTensor wraps the one preallocated buffer; nothing is copied."""
    from dicom_node.series import volume as volume_module

    buffers: list[np.ndarray] = []
    original = volume_module._fill

    def spy(*args: Any) -> np.ndarray:
        buffers.append(original(*args))
        return buffers[-1]

    monkeypatch.setattr(volume_module, "_fill", spy)
    image = build_volume(_write(tmp_path)).image
    assert image.data_ptr() == buffers[0].ctypes.data
    assert image.untyped_storage().nbytes() == buffers[0].nbytes


# --- affine -------------------------------------------------------------------

OBLIQUE = (0.8, 0.6, 0.0, 0.0, 0.0, -1.0)  # tilted in the axial plane, rows run head to feet
TILTED = (1.0, 0.0, 0.0, 0.0, float(np.cos(0.3)), float(-np.sin(0.3)))


def _itk_style_ras_affine(paths: list[Path], step: float) -> np.ndarray:
    """The ITKReader formula, written out independently: direction @ diag(spacing)."""
    ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
    row = np.asarray(ds.ImageOrientationPatient[:3], float)
    col = np.asarray(ds.ImageOrientationPatient[3:], float)
    direction = np.column_stack([row, col, np.cross(row, col)])
    spacing = [float(ds.PixelSpacing[1]), float(ds.PixelSpacing[0]), step]
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(spacing)
    affine[:3, 3] = _ipp(paths[0])
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine


@pytest.mark.parametrize("orientation", [(1.0, 0.0, 0.0, 0.0, 1.0, 0.0), OBLIQUE, TILTED])
def test_affine_matches_image_position(tmp_path: Path, orientation: tuple[float, ...]) -> None:
    paths = _write(tmp_path, orientation=orientation, pixel_spacing_mm=(0.7, 0.9))
    shuffled = paths[::-1]
    volume = build_volume(shuffled)
    lps = volume.lps_affine()
    row, col = np.asarray(orientation[:3]), np.asarray(orientation[3:])
    assert volume.spacing_mm == pytest.approx((0.9, 0.7, 1.25), abs=1e-4)
    for x, y, z in [(0, 0, 0), (5, 7, 3), (31, 31, 19), (12, 0, 19)]:
        expected = _ipp(paths[z]) + x * 0.9 * row + y * 0.7 * col
        np.testing.assert_allclose((lps @ [x, y, z, 1])[:3], expected, atol=1e-3)
    step = float(np.linalg.norm(_ipp(paths[-1]) - _ipp(paths[0]))) / (len(paths) - 1)  # as ITK
    np.testing.assert_allclose(
        volume.image.affine.numpy(), _itk_style_ras_affine(paths, step), atol=1e-6
    )
    np.testing.assert_allclose(LPS_TO_RAS @ lps, volume.image.affine.numpy())


@pytest.mark.filterwarnings("ignore:.*Orientationd:FutureWarning")
@pytest.mark.parametrize(
    "layout",
    [
        {},
        {"orientation": (1.0, 0.0, 0.0, 0.0, -1.0, 0.0)},
        {"orientation": OBLIQUE},
        {"slice_spacing_mm": -2.0, "slice_thickness_mm": 2.0, "pixel_spacing_mm": (0.6, 0.8)},
    ],
)
def test_monai_orientation_spacing_round_trip(tmp_path: Path, layout: dict[str, Any]) -> None:
    """Orientationd + Spacingd, then Invertd, bring a label map back exactly."""
    from monai.data import MetaTensor
    from monai.transforms import Compose, Invertd, Orientationd, Spacingd

    volume = build_volume(_write(tmp_path, **layout))
    labels = (torch.arange(COLUMNS * ROWS * SLICES) % 7).reshape(1, COLUMNS, ROWS, SLICES).float()
    meta = {k: v for k, v in volume.image.meta.items() if k != "affine"}
    label = MetaTensor(labels, affine=volume.image.affine.clone(), meta=meta)
    spacing = np.asarray(volume.spacing_mm)
    forward = Compose(
        [
            Orientationd(keys="label", axcodes="RAS"),
            Spacingd(keys="label", pixdim=tuple(spacing / 2), mode="nearest"),
        ]
    )
    moved = forward({"label": label})
    assert moved["label"].shape != label.shape
    inverse = Invertd(keys="label", transform=forward, orig_keys="label", nearest_interp=True)
    back = inverse(moved)["label"]
    assert back.shape == label.shape
    np.testing.assert_allclose(back.affine.numpy(), volume.image.affine.numpy(), atol=1e-6)
    assert torch.equal(back.as_tensor(), labels)


def _header(orientation: np.ndarray, position: np.ndarray, index: int) -> SliceHeader:
    return SliceHeader(
        path=Path(f"{index}.dcm"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        sop_instance_uid=f"1.2.3.{index}",
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.1",
        frame_of_reference_uid="1.2.3.2",
        modality="CT",
        manufacturer="x",
        image_type=("ORIGINAL", "PRIMARY", "AXIAL"),
        series_number=1,
        series_description="",
        body_part="",
        orientation=tuple(float(v) for v in orientation),
        position=tuple(float(v) for v in position),
        pixel_spacing=(0.8, 0.6),
        rows=16,
        columns=16,
        number_of_frames=1,
        acquisition_number=1,
        temporal_position_index=None,
        content_time=None,
        instance_number=index + 1,
        slice_thickness=None,
        spacing_between_slices=None,
    )


def _rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    result: np.ndarray = rz @ ry @ rx
    return result


@settings(max_examples=60, deadline=None)
@given(
    angles=st.tuples(*[st.floats(-np.pi, np.pi) for _ in range(3)]),
    step=st.floats(0.3, 6.0),
    count=st.integers(2, 12),
    seed=st.integers(0, 2**16),
)
def test_check_stack_sorts_any_rotation(
    angles: tuple[float, float, float], step: float, count: int, seed: int
) -> None:
    """For any rotation, shuffled slices sort along the normal and the affine hits every IPP."""
    rotation = _rotation(*angles)
    row, col = rotation[:, 0], rotation[:, 1]
    normal = np.cross(row, col)
    origin = np.array([-100.0, 50.0, 20.0])
    positions = [origin + k * step * normal for k in range(count)]
    order = np.random.default_rng(seed).permutation(count)
    headers = [_header(np.r_[row, col], positions[k], int(k)) for k in order]
    geometry = check_stack(headers)
    assert [headers[i].instance_number for i in geometry.order] == list(range(1, count + 1))
    assert geometry.spacing == pytest.approx((0.6, 0.8, step))
    lps = geometry.lps_affine()
    for z, position in enumerate(positions):
        np.testing.assert_allclose((lps @ [0, 0, z, 1])[:3], position, atol=1e-6)
    np.testing.assert_allclose((lps @ [3, 5, 0, 1])[:3], origin + 3 * 0.6 * row + 5 * 0.8 * col)


# --- real CT ------------------------------------------------------------------


def test_real_ct_slices() -> None:
    files = sorted(REAL_CT.glob("*.dcm"))
    selection = select_series(files, SeriesCriteria(min_slices=3))
    assert len(selection.paths) == 3
    assert any("not an image series (Segmentation Storage)" in r for r in selection.rejected)
    volume = build_volume(selection.paths)
    assert volume.shape == (512, 512, 3)
    assert volume.spacing_mm == pytest.approx((0.810547, 0.810547, 1.0))
    # IPP z is -126.69, -127.69, -128.69 for 01..03: ascending order is 03, 02, 01.
    assert [s.path.name for s in volume.slices] == ["03.dcm", "02.dcm", "01.dcm"]
    lps = volume.lps_affine()
    for z, slice_ref in enumerate(volume.slices):
        ipp = _ipp(slice_ref.path)
        np.testing.assert_allclose((lps @ [0, 0, z, 1])[:3], ipp, atol=1e-4)
        np.testing.assert_allclose(
            (lps @ [100, 200, z, 1])[:3], ipp + [81.0547, 162.1094, 0], atol=1e-3
        )
    hu = volume.image[0].numpy()
    # Left of the body on the middle row is air; the corners outside the scan
    # field hold PixelPaddingValue (-2000 stored, -3024 HU), left as is (as ITK does).
    assert -1100 < float(np.median(hu[:24, 250:262, :])) < -900
    assert hu.min() == -3024 and hu.max() < 4000
    centre = hu[200:312, 200:312, :]
    assert np.mean((centre > -100) & (centre < 100)) > 0.05  # soft tissue somewhere
    raw = pydicom.dcmread(volume.slices[0].path)
    expected = raw.pixel_array.T.astype(np.float32) * float(raw.RescaleSlope) + float(
        raw.RescaleIntercept
    )
    np.testing.assert_array_equal(hu[:, :, 0], expected)
