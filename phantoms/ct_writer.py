"""Write a CT series (one file per slice) from a volume of Hounsfield units.

The generated objects are valid CT Image Storage instances with a fake patient.
They are used by the demo, the tests and the benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    generate_uid,
)

CT_IMAGE_STORAGE = CTImageStorage


@dataclass
class StudyIdentity:
    """Patient and study attributes shared by all series of one study."""

    patient_name: str = "PHANTOM^CHEST"
    patient_id: str = "PHANTOM-0001"
    patient_birth_date: str = "19600101"
    patient_sex: str = "O"
    study_instance_uid: str = field(default_factory=generate_uid)
    study_id: str = "1"
    accession_number: str = "ACC0001"
    study_date: str = "20260101"
    study_time: str = "120000"
    study_description: str = "CT CHEST"
    frame_of_reference_uid: str = field(default_factory=generate_uid)


@dataclass
class SeriesLayout:
    """Geometry and encoding of a generated series."""

    pixel_spacing_mm: tuple[float, float] = (0.7, 0.7)  # (row step, column step)
    slice_spacing_mm: float = 1.25
    slice_thickness_mm: float | None = None
    origin_mm: tuple[float, float, float] = (-180.0, -180.0, 0.0)
    orientation: tuple[float, ...] = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
    signed: bool = True  # True: signed, intercept 0; False: unsigned, intercept -1024
    bits_stored: int = 16  # 12 or 16
    transfer_syntax: str = ExplicitVRLittleEndian
    series_number: int = 2
    series_description: str = "Chest CT 1.25mm"
    body_part: str = "CHEST"
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    series_instance_uid: str = field(default_factory=generate_uid)
    acquisition_number: int = 1


def _stored_values(hu: np.ndarray, layout: SeriesLayout) -> tuple[np.ndarray, float]:
    """Map HU to stored pixel values and return them with the intercept."""
    intercept = 0.0 if layout.signed else -1024.0
    values = np.rint(hu - intercept)
    if layout.signed:
        low, high = (-2048, 2047) if layout.bits_stored == 12 else (-32768, 32767)
        return np.clip(values, low, high).astype(np.int16), intercept
    high = 4095 if layout.bits_stored == 12 else 65535
    return np.clip(values, 0, high).astype(np.uint16), intercept


def _slice_position(layout: SeriesLayout, index: int) -> list[float]:
    row_dir = np.array(layout.orientation[:3])
    col_dir = np.array(layout.orientation[3:])
    normal = np.cross(row_dir, col_dir)
    pos = np.array(layout.origin_mm) + normal * layout.slice_spacing_mm * index
    return [round(float(v), 4) for v in pos]


def _base_dataset(study: StudyIdentity, layout: SeriesLayout) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.ImageType = list(layout.image_type)
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-node synthetic"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.patient_birth_date
    ds.PatientSex = study.patient_sex
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.StudyDescription = study.study_description
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = layout.series_instance_uid
    ds.SeriesNumber = layout.series_number
    ds.SeriesDescription = layout.series_description
    ds.BodyPartExamined = layout.body_part
    ds.FrameOfReferenceUID = study.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.KVP = 120
    ds.AcquisitionNumber = layout.acquisition_number
    ds.PatientPosition = "FFS"
    ds.ImageOrientationPatient = [float(v) for v in layout.orientation]
    ds.PixelSpacing = [float(v) for v in layout.pixel_spacing_mm]
    thickness = layout.slice_thickness_mm or layout.slice_spacing_mm
    ds.SliceThickness = float(thickness)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = layout.bits_stored
    ds.HighBit = layout.bits_stored - 1
    ds.PixelRepresentation = 1 if layout.signed else 0
    ds.RescaleSlope = 1
    ds.RescaleType = "HU"
    ds.WindowCenter = -600
    ds.WindowWidth = 1500
    return ds


def build_slice(
    hu_slice: np.ndarray, index: int, study: StudyIdentity, layout: SeriesLayout
) -> Dataset:
    """Build one CT slice dataset (uncompressed, with file meta)."""
    ds = _base_dataset(study, layout)
    stored, intercept = _stored_values(hu_slice, layout)
    ds.RescaleIntercept = intercept
    ds.SOPInstanceUID = generate_uid()
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = _slice_position(layout, index)
    ds.SliceLocation = ds.ImagePositionPatient[2]
    ds.Rows, ds.Columns = (int(v) for v in hu_slice.shape)
    ds.PixelData = stored.tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = UID(ExplicitVRLittleEndian)
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta = meta
    return ds


def _encode(ds: Dataset, transfer_syntax: str) -> None:
    if transfer_syntax in (ExplicitVRLittleEndian, ImplicitVRLittleEndian):
        ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        return
    ds.compress(UID(transfer_syntax))


def write_ct_series(
    hu_zyx: np.ndarray,
    out_dir: Path,
    study: StudyIdentity | None = None,
    layout: SeriesLayout | None = None,
) -> list[Path]:
    """Write ``hu_zyx`` (slices, rows, columns) as a CT series into ``out_dir``.

    Returns the file paths in slice order.
    """
    study = study or StudyIdentity()
    layout = layout or SeriesLayout()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for index in range(hu_zyx.shape[0]):
        ds = build_slice(hu_zyx[index], index, study, layout)
        _encode(ds, layout.transfer_syntax)
        path = out_dir / f"{layout.series_number:03d}_{index + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def simple_ct_volume(
    slices: int, rows: int = 512, columns: int = 512, seed: int = 0
) -> np.ndarray:
    """A quick body-like HU volume (ellipse of soft tissue in air, with noise)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:rows, 0:columns]
    body = ((yy - rows / 2) / (rows * 0.4)) ** 2 + ((xx - columns / 2) / (columns * 0.45)) ** 2 <= 1
    base = np.where(body, 40.0, -1000.0).astype(np.float32)
    vol = np.repeat(base[None], slices, axis=0)
    vol += rng.normal(0, 10, size=vol.shape).astype(np.float32)
    return vol
