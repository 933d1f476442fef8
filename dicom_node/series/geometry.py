"""Geometry of a stack of single-frame slices: sorting, checks and the affine.

Slices are sorted along the slice normal ``n = row_cosine x column_cosine`` by the
projection ``ImagePositionPatient . n`` in ascending order, as ITK does; so the
voxel ``(x, y, z)`` lies at ``IPP[0] + x*dx*row + y*dy*col + z*dz*n`` (LPS, mm)
with ``dx = PixelSpacing[1]`` (column step), ``dy = PixelSpacing[0]`` (row step)
and ``dz = |IPP_last - IPP_first| / (N - 1)``, the mean slice step as ITK's
ImageSeriesReader computes it (for one slice: SpacingBetweenSlices, else
SliceThickness, else 1 mm).

Tolerances (all checks raise :class:`~dicom_node.errors.SeriesError`):

* orientation: every direction cosine within :data:`ORIENTATION_TOL` (1e-4) of
  the first slice's; row and column cosines unit length and orthogonal within
  :data:`ORTHONORMAL_TOL` (1e-3);
* pixel spacing: within :data:`PIXEL_SPACING_TOL_MM` (1e-3 mm) of the first;
* duplicates: two slices closer than :data:`DUPLICATE_TOL_MM` (0.01 mm) along n;
* slice spacing: every step within ``max(0.10 * median, 0.05 mm)`` of the median
  step (:data:`SPACING_REL_TOL`, :data:`SPACING_ABS_TOL_MM`); a larger step is
  reported as a gap, a smaller or otherwise odd one as non-uniform spacing;
* shear: the in-plane offset of every slice from the first (the part of the
  position difference not along n) at most ``max(0.05 mm, 0.1 * pixel size)``
  (:data:`SHEAR_ABS_TOL_MM`, :data:`SHEAR_REL_TOL`), which refuses gantry-tilted
  stacks; a tilted but consistent (oblique) stack is fine.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dicom_node.errors import SeriesError
from dicom_node.series.headers import SliceHeader
from plugin.types import LPS_TO_RAS

logger = logging.getLogger(__name__)

ORIENTATION_TOL = 1e-4
ORTHONORMAL_TOL = 1e-3
PIXEL_SPACING_TOL_MM = 1e-3
DUPLICATE_TOL_MM = 0.01
SPACING_REL_TOL = 0.10
SPACING_ABS_TOL_MM = 0.05
SHEAR_ABS_TOL_MM = 0.05
SHEAR_REL_TOL = 0.1


@dataclass(frozen=True)
class StackGeometry:
    """A checked, sorted stack: order, direction cosines, spacing and shape."""

    order: tuple[int, ...]  # indices into the input headers, in slice order
    row_cosine: np.ndarray  # direction of increasing column index (x)
    column_cosine: np.ndarray  # direction of increasing row index (y)
    normal: np.ndarray  # direction of increasing slice index (z)
    origin: np.ndarray  # ImagePositionPatient of slice z = 0 (LPS, mm)
    spacing: tuple[float, float, float]  # (dx, dy, dz) in mm
    shape: tuple[int, int, int]  # (X = Columns, Y = Rows, Z = slices)

    def lps_affine(self) -> np.ndarray:
        """Voxel index ``(x, y, z)`` -> LPS patient coordinates (mm)."""
        dx, dy, dz = self.spacing
        affine = np.eye(4)
        affine[:3, 0] = self.row_cosine * dx
        affine[:3, 1] = self.column_cosine * dy
        affine[:3, 2] = self.normal * dz
        affine[:3, 3] = self.origin
        return affine

    def ras_affine(self) -> np.ndarray:
        """Voxel index -> MONAI world (RAS), as ITKReader(affine_lps_to_ras=True)."""
        ras: np.ndarray = LPS_TO_RAS @ self.lps_affine()
        return ras


def slice_normal(orientation: Sequence[float]) -> np.ndarray:
    """The slice normal (row cosine x column cosine) of an ImageOrientationPatient."""
    values = np.asarray(orientation, dtype=np.float64)
    return np.cross(values[:3], values[3:])


def orientations_agree(headers: Sequence[SliceHeader]) -> bool:
    """True when all headers have an orientation and they agree within tolerance."""
    if any(h.orientation is None for h in headers):
        return False
    first = np.asarray(headers[0].orientation)
    return all(
        np.max(np.abs(np.asarray(h.orientation) - first)) <= ORIENTATION_TOL for h in headers
    )


def slice_projections(headers: Sequence[SliceHeader]) -> np.ndarray:
    """Position of each slice along the first slice's normal (mm), input order."""
    normal = slice_normal(_require_orientation(headers[0]))
    positions = np.array([_require_position(h) for h in headers])
    projections: np.ndarray = positions @ normal
    return projections


def has_duplicate_positions(headers: Sequence[SliceHeader]) -> bool:
    """True when two slices lie at the same position along the normal."""
    steps = np.diff(np.sort(slice_projections(headers)))
    return bool(np.any(steps < DUPLICATE_TOL_MM))


def check_stack(headers: Sequence[SliceHeader]) -> StackGeometry:
    """Sort and check a stack of slices and return its geometry.

    Raises:
        SeriesError: missing geometry, mixed orientation, pixel spacing or matrix
            size, duplicate positions, gaps, non-uniform spacing or shear.
    """
    if not headers:
        raise SeriesError("no slices to build a volume from")
    row, col = _check_orientation(headers)
    normal = np.cross(row, col)
    pixel_spacing = _check_pixel_spacing(headers)
    rows, columns = _check_matrix(headers)
    positions = np.array([_require_position(h) for h in headers])
    projections = positions @ normal
    order = np.argsort(projections, kind="stable")
    sorted_proj = projections[order]
    _check_slice_steps(sorted_proj)
    _check_shear(positions[order], normal, min(pixel_spacing))
    slice_step = _mean_step(positions[order], headers[0])
    geometry = StackGeometry(
        order=tuple(int(i) for i in order),
        row_cosine=row,
        column_cosine=col,
        normal=normal,
        origin=positions[order[0]],
        spacing=(pixel_spacing[1], pixel_spacing[0], slice_step),
        shape=(columns, rows, len(headers)),
    )
    logger.debug("stack geometry: shape %s spacing %s", geometry.shape, geometry.spacing)
    return geometry


def _require_orientation(header: SliceHeader) -> tuple[float, ...]:
    if header.orientation is None:
        raise SeriesError(
            f"instance {header.sop_instance_uid} has no valid ImageOrientationPatient"
        )
    return header.orientation


def _require_position(header: SliceHeader) -> tuple[float, ...]:
    if header.position is None:
        raise SeriesError(f"instance {header.sop_instance_uid} has no valid ImagePositionPatient")
    return header.position


def _check_orientation(headers: Sequence[SliceHeader]) -> tuple[np.ndarray, np.ndarray]:
    first = np.asarray(_require_orientation(headers[0]))
    for header in headers:
        deviation = float(np.max(np.abs(np.asarray(_require_orientation(header)) - first)))
        if deviation > ORIENTATION_TOL:
            raise SeriesError(
                f"mixed orientations: instance {header.sop_instance_uid} differs from instance "
                f"{headers[0].sop_instance_uid} by {deviation:.4g} in ImageOrientationPatient "
                f"(tolerance {ORIENTATION_TOL:g})"
            )
    row, col = first[:3], first[3:]
    off = max(abs(np.linalg.norm(row) - 1), abs(np.linalg.norm(col) - 1), abs(row @ col))
    if off > ORTHONORMAL_TOL:
        raise SeriesError(
            "ImageOrientationPatient is not orthonormal "
            f"(deviation {off:.4g}, tolerance {ORTHONORMAL_TOL:g})"
        )
    return row, col


def _check_pixel_spacing(headers: Sequence[SliceHeader]) -> tuple[float, float]:
    first = headers[0].pixel_spacing
    if first is None or min(first) <= 0:
        raise SeriesError(f"instance {headers[0].sop_instance_uid} has no valid PixelSpacing")
    for header in headers:
        ps = header.pixel_spacing
        if (
            ps is None
            or max(abs(a - b) for a, b in zip(ps, first, strict=True)) > PIXEL_SPACING_TOL_MM
        ):
            raise SeriesError(
                f"mixed pixel spacing: instance {header.sop_instance_uid} has {_fmt(ps)} mm, "
                f"instance {headers[0].sop_instance_uid} has {_fmt(first)} mm"
            )
    return float(first[0]), float(first[1])


def _check_matrix(headers: Sequence[SliceHeader]) -> tuple[int, int]:
    rows, columns = headers[0].rows, headers[0].columns
    if not rows or not columns:
        raise SeriesError(f"instance {headers[0].sop_instance_uid} has no Rows/Columns")
    for header in headers:
        if (header.rows, header.columns) != (rows, columns):
            raise SeriesError(
                f"mixed matrix sizes: instance {header.sop_instance_uid} is "
                f"{header.rows}x{header.columns}, instance {headers[0].sop_instance_uid} is "
                f"{rows}x{columns} (rows x columns)"
            )
    return rows, columns


def _mean_step(sorted_positions: np.ndarray, first: SliceHeader) -> float:
    """``|IPP_last - IPP_first| / (N - 1)``, as ITK's ImageSeriesReader computes it."""
    if len(sorted_positions) == 1:
        return float(first.spacing_between_slices or first.slice_thickness or 1.0)
    span = float(np.linalg.norm(sorted_positions[-1] - sorted_positions[0]))
    return span / (len(sorted_positions) - 1)


def _check_slice_steps(sorted_proj: np.ndarray) -> None:
    """Check duplicates, gaps and uniformity of the steps along the normal."""
    if len(sorted_proj) == 1:
        return
    steps = np.diff(sorted_proj)
    duplicate = int(np.argmin(steps))
    if steps[duplicate] < DUPLICATE_TOL_MM:
        raise SeriesError(
            f"duplicate slice positions: slices {duplicate} and {duplicate + 1} are both at "
            f"{sorted_proj[duplicate]:.2f} mm along the slice normal "
            "(multi-phase series not split?)"
        )
    median = float(np.median(steps))
    tolerance = max(SPACING_REL_TOL * median, SPACING_ABS_TOL_MM)
    worst = int(np.argmax(np.abs(steps - median)))
    step = float(steps[worst])
    if abs(step - median) > tolerance:
        kind = "gap" if step > median else "non-uniform slice spacing"
        if kind == "gap" and step < 1.5 * median:
            kind = "non-uniform slice spacing"
        raise SeriesError(
            f"{kind} between slice {worst} and {worst + 1}: {step:.2f} mm, "
            f"expected {median:.2f} mm (tolerance {tolerance:.2f} mm)"
        )


def _check_shear(sorted_positions: np.ndarray, normal: np.ndarray, pixel: float) -> None:
    offsets = sorted_positions - sorted_positions[0]
    in_plane = offsets - np.outer(offsets @ normal, normal)
    drift = np.linalg.norm(in_plane, axis=1)
    worst = int(np.argmax(drift))
    tolerance = max(SHEAR_ABS_TOL_MM, SHEAR_REL_TOL * pixel)
    if drift[worst] > tolerance:
        raise SeriesError(
            f"sheared stack (gantry tilt?): slice {worst} is offset {drift[worst]:.2f} mm "
            f"in-plane from slice 0 (tolerance {tolerance:.2f} mm); positions do not lie "
            "along the slice normal"
        )


def _fmt(values: tuple[float, ...] | None) -> str:
    return "none" if values is None else "/".join(f"{v:g}" for v in values)
