"""Value types exchanged between the node and an analysis plugin.

Conventions (shared by every producer and consumer of these types):

* A :class:`Volume` holds a MONAI ``MetaTensor`` of shape ``(1, X, Y, Z)`` where
  ``X`` runs along a row (the DICOM column index), ``Y`` down the columns (the DICOM
  row index) and ``Z`` over the sorted source slices. This is the layout MONAI's
  ``ITKReader`` produces, so bundle transforms behave as they do on files.
* The ``MetaTensor`` affine maps voxel indices to MONAI's world space (RAS, as
  ``ITKReader`` with ``affine_lps_to_ras=True``). DICOM patient coordinates are LPS;
  :meth:`Volume.lps_affine` gives that affine.
* A label map in :class:`Findings` is an integer array of shape ``(X, Y, Z)`` on the
  source grid (the same grid as the volume, no resampling).
* Pixel coordinates inside a :class:`Finding` are ``(column, row)`` on the source
  image ``slices[z]``, as a DICOM SCOORD expects.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.sr.coding import Code

# RAS <-> LPS flips the first two world axes.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass(frozen=True)
class PluginInfo:
    """Identification of an analysis, written into every result as provenance."""

    name: str
    version: str
    device_uid: str
    display_name: str
    manufacturer: str = "dicom-node"
    for_clinical_use: bool = False


@dataclass(frozen=True)
class SeriesCriteria:
    """Which series a plugin wants; see ``dicom_node.series.selection``."""

    modality: str = "CT"
    sop_class_uids: tuple[str, ...] = ("1.2.840.10008.5.1.4.1.1.2",)
    image_type_required: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    min_slices: int = 64
    max_slices: int = 2000
    slice_spacing_mm: tuple[float, float] = (0.5, 5.0)
    body_part_regex: str | None = None
    series_description_regex: str | None = None


@dataclass(frozen=True)
class SliceRef:
    """One source image of a volume, in sorted order."""

    sop_instance_uid: str
    sop_class_uid: str
    path: Path


@dataclass
class Volume:
    """A checked 3D image built from one series, plus its provenance."""

    image: Any  # monai.data.MetaTensor, shape (1, X, Y, Z), float32 HU, RAS affine
    slices: list[SliceRef]
    study_instance_uid: str
    series_instance_uid: str
    frame_of_reference_uid: str
    spacing_mm: tuple[float, float, float]  # (x: column step, y: row step, z: slice step)
    # The source headers (pydicom Datasets without pixel data) in slice order, when the
    # builder kept them; result encoding then reads no source file again.
    source_headers: list[Any] = field(default_factory=list, repr=False, compare=False)

    def lps_affine(self) -> np.ndarray:
        """Voxel index (x, y, z) -> DICOM patient coordinates (LPS, mm)."""
        ras = np.asarray(self.image.affine, dtype=np.float64)
        return LPS_TO_RAS @ ras

    @property
    def shape(self) -> tuple[int, int, int]:
        """Spatial shape ``(X, Y, Z)``."""
        return tuple(int(s) for s in self.image.shape[1:])  # type: ignore[return-value]


@dataclass(frozen=True)
class SegmentCodes:
    """Codes describing what a label value is (SEG segment and SR finding)."""

    category: Code
    type: Code
    site: Code | None = None
    color_rgb: tuple[int, int, int] = (255, 0, 0)
    modifier: Code | None = None  # Segmented Property Type Modifier (e.g. laterality)


@dataclass(frozen=True)
class Axis:
    """A measured line on one source image, pixel coordinates (column, row)."""

    start: tuple[float, float]
    end: tuple[float, float]
    length_mm: float


@dataclass
class Finding:
    """One connected finding (e.g. a nodule), numbered largest first from 1."""

    label: int  # value of this finding in Findings.label_map
    name: str  # "Nodule 1"
    codes: SegmentCodes
    centroid_mm: tuple[float, float, float]  # LPS patient coordinates
    volume_mm3: float
    mean_hu: float
    key_slice: int  # z index of the axial slice of largest extent
    long_axis: Axis
    short_axis: Axis
    # z index -> closed outlines on that slice, each an (N, 2) array of (column, row);
    # for a "structure" (an organ, see the manifest's role) the key slice only
    contours: dict[int, list[np.ndarray]] = field(default_factory=dict)
    role: str = "finding"  # "finding" (a lesion: axes, outlines) or "structure" (an organ)
    # attenuation over the finding's core (see plugin.lesion_measure); a finding too thin
    # for a core (fewer than 3 slices on thick slices) has from_core False: its mean
    # reads low by partial volume and the report leaves its attenuation out
    sd_hu: float = 0.0
    max_hu: float = 0.0
    attenuation_from_core: bool = True
    attenuation_voxels: int | None = None  # how many voxels the attenuation is over (None: not said)
    score: float | None = None  # the model's confidence 0..1, where the model gives one
    # "solid", "part_solid" or "ground_glass" (plugin.lesion_measure, for a label measured at
    # its half-maximum edge; "solid" otherwise); a part-solid finding's solid component:
    # its volume and its long axis on its own axial slice of largest extent
    composition: str = "solid"
    solid_volume_mm3: float | None = None
    solid_long_axis_mm: float | None = None

    @property
    def has_spread(self) -> bool:
        """Whether ``sd_hu`` is a measured spread: not from a single voxel, whose
        standard deviation of 0 HU would read as no noise."""
        return self.attenuation_voxels is None or self.attenuation_voxels >= 2


@dataclass
class Detection:
    """One box of a detection model, mapped onto the source grid (see :mod:`plugin.boxes`).

    The box is axis-aligned in patient space; ``size_mm`` is its extent along the patient
    axes: (right-left, anterior-posterior, inferior-superior), i.e. (width, depth, height).
    """

    label: int  # the detector's class index
    name: str  # "Nodule 1", numbered by descending score
    codes: SegmentCodes
    score: float  # the detector's score, 0..1
    center_mm: tuple[float, float, float]  # LPS patient coordinates
    size_mm: tuple[float, float, float]  # (width, depth, height)
    key_slice: int  # z index of the source image nearest the box centre
    outline: np.ndarray  # (N, 2) closed polygon (column, row) on slices[key_slice], clipped
    long_axis_mm: float  # the larger in-plane box side
    short_axis_mm: float  # the smaller in-plane box side
    clipped: bool = False  # the box reached beyond the image and was cut at its edge


@dataclass
class Findings:
    """What an analysis returns: a label map on the source grid plus measurements
    (segmentation models), or boxes with scores (detection models)."""

    label_map: np.ndarray | None  # (X, Y, Z) integer, 0 = background; None for detections
    findings: list[Finding]
    procedure: Code = field(
        default_factory=lambda: Code("25045-6", "LN", "CT unspecified body region")
    )
    summary: str = ""
    # optional sub-stage timings of the analysis (seconds), e.g. preprocessing,
    # inference, postprocessing, measure; the node records them with its own stages
    timings: dict[str, float] = field(default_factory=dict)
    detections: list[Detection] = field(default_factory=list)
    # what was looked for (e.g. SCT Nodule), named by the report when nothing was found
    looked_for: Code | None = None

    @property
    def count(self) -> int:
        """How many findings the report lists (segmented findings and detections)."""
        return len(self.findings) + len(self.detections)
