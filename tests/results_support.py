"""Test support for the result encoders: a small CT series, its Volume, two spheres.

Kept independent of ``dicom_node.series`` (written elsewhere): the Volume is built
here directly from the written geometry.
"""

from __future__ import annotations

import io
import shutil
import subprocess
from dataclasses import dataclass
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from phantoms.ct_writer import SeriesLayout, StudyIdentity, write_ct_series
from plugin.types import (
    LPS_TO_RAS,
    Axis,
    Finding,
    Findings,
    PluginInfo,
    SegmentCodes,
    SliceRef,
    Volume,
)

ROWS, COLUMNS, SLICES = 48, 64, 16  # rows != columns catches transposition errors
PROCEDURE = Code("24627-2", "LN", "CT Chest")
INFO = PluginInfo(
    name="lung_nodules",
    version="1.2.3",
    device_uid="1.2.826.0.1.3680043.10.1234.1",
    display_name="Lung Nodules",
    manufacturer="dicom-node",
    for_clinical_use=False,
)


@dataclass(frozen=True)
class Sphere:
    """A sphere in voxel centre (x=column, y=row, z=slice) and radius in mm."""

    x: int
    y: int
    z: int
    radius_mm: float
    hu: float


SPHERES = (Sphere(20, 20, 6, 4.5, 120.0), Sphere(44, 30, 10, 3.0, 80.0))


def write_series(out_dir: Path, spheres: tuple[Sphere, ...] = SPHERES) -> list[Path]:
    """Write a (SLICES, ROWS, COLUMNS) CT with ``spheres`` painted in."""
    layout = SeriesLayout()
    hu = np.full((SLICES, ROWS, COLUMNS), -800.0, dtype=np.float32)
    for sphere in spheres:
        hu[sphere_mask(sphere, layout_spacing(layout)).transpose(2, 1, 0)] = sphere.hu
    return write_ct_series(hu, out_dir, StudyIdentity(patient_name="TEST^RESULTS"), layout)


def layout_spacing(layout: SeriesLayout) -> tuple[float, float, float]:
    """(x, y, z) spacing of a layout: column step, row step, slice step."""
    return layout.pixel_spacing_mm[1], layout.pixel_spacing_mm[0], layout.slice_spacing_mm


def sphere_mask(sphere: Sphere, spacing: tuple[float, float, float]) -> np.ndarray:
    """Boolean (X, Y, Z) mask of ``sphere``."""
    xx, yy, zz = np.meshgrid(
        np.arange(COLUMNS), np.arange(ROWS), np.arange(SLICES), indexing="ij"
    )
    d2 = ((xx - sphere.x) * spacing[0]) ** 2 + ((yy - sphere.y) * spacing[1]) ** 2
    d2 = d2 + ((zz - sphere.z) * spacing[2]) ** 2
    return d2 <= sphere.radius_mm**2


def build_volume(paths: list[Path]) -> Volume:
    """A Volume (MetaTensor (1, X, Y, Z), RAS affine) from single-frame files."""
    datasets = sorted(
        (pydicom.dcmread(p) for p in paths), key=lambda d: float(d.ImagePositionPatient[2])
    )
    paths_by_uid = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in paths}
    first = datasets[0]
    hu = np.stack([_hu(d) for d in datasets], axis=-1)  # (rows, columns, slices)
    image = MetaTensor(
        torch.from_numpy(np.ascontiguousarray(hu.transpose(1, 0, 2))[None]),
        affine=torch.from_numpy(LPS_TO_RAS @ lps_affine(datasets)),
    )
    slices = [
        SliceRef(d.SOPInstanceUID, d.SOPClassUID, Path(paths_by_uid[d.SOPInstanceUID]))
        for d in datasets
    ]
    spacing = np.linalg.norm(lps_affine(datasets)[:3, :3], axis=0)
    return Volume(
        image=image,
        slices=slices,
        study_instance_uid=first.StudyInstanceUID,
        series_instance_uid=first.SeriesInstanceUID,
        frame_of_reference_uid=first.FrameOfReferenceUID,
        spacing_mm=(float(spacing[0]), float(spacing[1]), float(spacing[2])),
    )


def _hu(ds: Dataset) -> np.ndarray:
    return ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(
        ds.RescaleIntercept
    )


def lps_affine(datasets: Sequence[Dataset]) -> np.ndarray:
    """Voxel (x=column, y=row, z=slice) -> LPS mm, from sorted single-frame headers."""
    iop = np.array(datasets[0].ImageOrientationPatient, dtype=float)
    row_step, col_step = (float(v) for v in datasets[0].PixelSpacing)
    origin = np.array(datasets[0].ImagePositionPatient, dtype=float)
    last = np.array(datasets[-1].ImagePositionPatient, dtype=float)
    affine = np.eye(4)
    affine[:3, 0] = iop[:3] * col_step
    affine[:3, 1] = iop[3:] * row_step
    affine[:3, 2] = (last - origin) / max(len(datasets) - 1, 1)
    affine[:3, 3] = origin
    return affine


def make_findings(volume: Volume, spheres: tuple[Sphere, ...] = SPHERES) -> Findings:
    """Findings for ``spheres``, largest first, with hand-made axes and outlines."""
    label_map = np.zeros(volume.shape, dtype=np.uint8)
    findings = []
    hu = volume.image[0].numpy()
    for number, sphere in enumerate(spheres, start=1):
        mask = sphere_mask(sphere, volume.spacing_mm)
        label_map[mask] = number
        findings.append(_finding(number, sphere, mask, volume, hu))
    return Findings(label_map=label_map, findings=findings, procedure=PROCEDURE)


def _finding(
    number: int, sphere: Sphere, mask: np.ndarray, volume: Volume, hu: np.ndarray
) -> Finding:
    sx, sy, sz = volume.spacing_mm
    radius_px = sphere.radius_mm / sx
    cx, cy = sphere.x + 0.5, sphere.y + 0.5  # SCOORD: pixel centre at +0.5
    centre = volume.lps_affine() @ np.array([sphere.x, sphere.y, sphere.z, 1.0])
    return Finding(
        label=number,
        name=f"Nodule {number}",
        codes=SegmentCodes(
            category=codes.SCT.MorphologicallyAbnormalStructure,
            type=codes.SCT.Nodule,
            site=codes.SCT.Lung,
            color_rgb=((255, 0, 0), (0, 128, 255))[number - 1],
        ),
        centroid_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        volume_mm3=float(mask.sum() * sx * sy * sz),
        mean_hu=float(hu[mask].mean()),
        sd_hu=float(hu[mask].std()),
        max_hu=float(hu[mask].max()),
        score=(0.87, None)[number - 1],  # the first finding has a model score, the second none
        key_slice=sphere.z,
        long_axis=Axis((cx - radius_px, cy), (cx + radius_px, cy), 2 * sphere.radius_mm),
        short_axis=Axis((cx, cy - radius_px), (cx, cy + radius_px), 2 * sphere.radius_mm * 0.9),
        contours=_outlines(mask, cx, cy, sx),
    )


def _outlines(mask: np.ndarray, cx: float, cy: float, step: float) -> dict[int, list[np.ndarray]]:
    """A 16-gon around the disc on each slice the mask covers (not closed)."""
    outlines: dict[int, list[np.ndarray]] = {}
    angles = np.linspace(0, 2 * np.pi, 16, endpoint=False)
    for z in np.flatnonzero(mask.any(axis=(0, 1))):
        xs = np.flatnonzero(mask[:, :, z].any(axis=1))
        r = (xs.max() - xs.min() + 1) / 2 + 0.5
        outlines[int(z)] = [np.stack([cx + r * np.cos(angles), cy + r * np.sin(angles)], 1)]
    return outlines


def to_bytes(ds: Dataset) -> bytes:
    """Write ``ds`` in DICOM file format and return the bytes."""
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def run_tool(tool: str, path: Path) -> subprocess.CompletedProcess[str]:
    """Run a DICOM validation tool; fail (not skip) when it is missing."""
    exe = shutil.which(tool)
    assert exe is not None, f"{tool} is not installed (needed to validate results)"
    return subprocess.run(
        [exe, str(path)], capture_output=True, text=True, timeout=60, check=False
    )


def dciodvfy_errors(path: Path) -> tuple[list[str], str]:
    """Lines of dciodvfy output that contain "Error", and the whole output."""
    result = run_tool("dciodvfy", path)
    output = result.stdout + result.stderr
    return [line for line in output.splitlines() if "Error" in line], output


def walk(ds: Dataset):  # type: ignore[no-untyped-def]
    """Yield every dataset nested in ``ds`` (including ``ds``)."""
    yield ds
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                yield from walk(item)
