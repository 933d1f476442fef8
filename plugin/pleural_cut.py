"""Where a juxtapleural lesion ends: the pleural surface fitted around it.

A lesion that touches the chest wall or the mediastinum has no visible edge there: both
are above its half maximum, and a model's mask that runs a few millimetres into the wall
inflates the volume and pulls the attenuation toward the wall's (the demo phantom's
9 mm nodule against the mediastinum: +48 % volume, +20 HU). The usual convention
(what a reader draws) ends the lesion at the pleura, the line that continues the lung's
outline across the lesion's base. This module finds that line:

* **Wall**: the tissue above the half maximum outside the lesion's mask thick enough to
  hold a ball of :data:`WALL_BALL_MM` radius (an opening, :func:`wall_outside`): chest
  wall, mediastinum, diaphragm; not a lung vessel, and not the lesion itself. A lesion
  touches it when a voxel of it is among the mask's 26 neighbours.
* **Pleural surface**: the interfaces between the tissue thick enough for that ball (the
  same opening, without leaving out the mask) and the lung (below the half
  maximum) 1-10 mm outside the lesion's mask (:data:`RING_MM`), at the midpoints between
  face-adjacent voxels, fitted by a quadratic surface over its principal plane, with
  points more than :data:`INLIER_MM` off dropped and the fit repeated.
* **Beyond**: the voxels on the wall's side of that surface (the side away from the
  lung around the lesion).

Nothing is cut when the lesion does not touch the wall, when the surface is not one
smooth sheet (fewer than :data:`MIN_POINTS` points, fewer than :data:`MIN_INLIERS` of them
within :data:`INLIER_MM`, or an RMS residual over :data:`MAX_RMS_MM`: a corner of the
pleura, a lesion between structures), or when the cut would take half of the lesion or
more (the lesion lies mostly in the wall: not what this convention is for). Nor for a
lesion wider in-plane than :data:`MAX_WIDTH_MM` (a mass): a model that marks only part
of a mass leaves the rest of it thick enough to pass for wall, and the cut would then
take more of the mass away (the real tumour in ``../shared/fixtures/real_ct``: 10 321 ->
6 127 mm³).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

WALL_BALL_MM = 5.0
RING_MM = (1.0, 10.0)
INLIER_MM = 1.5
MAX_RMS_MM = 1.0
MIN_INLIERS = 0.6
MIN_POINTS = 20
FIT_ROUNDS = 4
MAX_CUT_FRACTION = 0.5
MAX_WIDTH_MM = 30.0


def beyond_pleura(
    hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], half: float,
    *, touching: bool | None = None,
) -> np.ndarray | None:
    """The voxels of the box beyond the pleural surface next to ``mask`` (a lesion
    brighter than the lung; ``half`` its half-maximum HU), or None when there is
    nothing to cut (see the module's rules). The box needs :data:`RING_MM`'s outer
    radius of margin around the lesion. ``touching`` is :func:`touches_wall`'s verdict
    for the same inputs where the caller has it (judged here otherwise)."""
    if _width_mm(mask, spacing) > MAX_WIDTH_MM:
        return None
    if touching is None:
        touching = touches_wall(hu, mask, spacing, half)
    if not touching:
        return None
    bright = hu > half
    # the surface is fitted to the bright tissue's interface with the lung as it always was,
    # the lesion's own unmasked rim included (the fit's inlier test drops what lies off the sheet)
    wall = _opening(bright, spacing, WALL_BALL_MM)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    ring = (outside >= RING_MM[0]) & (outside <= RING_MM[1])
    lung = ~bright & ring
    points = _interface_points(wall & ring, lung, spacing)
    if len(points) < MIN_POINTS:
        return None
    surface = _fit_surface(points)
    if surface is None:
        return None
    side = _signed_height(surface, mask.shape, spacing)
    if np.median(side[lung]) > 0:
        side = -side
    beyond = side > 0
    if (beyond & mask).sum() >= MAX_CUT_FRACTION * mask.sum():
        return None
    return np.asarray(beyond)


def touches_wall(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float], half: float) -> bool:
    """Whether the lesion ``mask`` touches the wall (:func:`wall_outside` of the voxels
    above ``half``): a voxel of it among the mask's 26 neighbours."""
    wall = wall_outside(hu > half, mask, spacing)
    return bool((ndimage.binary_dilation(mask, structure=np.ones((3, 3, 3), dtype=bool)) & ~mask & wall).any())


def wall_outside(bright: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The wall beside a lesion: the ``bright`` voxels outside ``mask`` thick enough to
    hold a ball of :data:`WALL_BALL_MM` radius. The lesion is not its own wall: with its
    voxels counted, a lesion of 10 mm or more whose mask falls a voxel short of its edge
    touched "wall" (its own rim) wherever it lay."""
    return _opening(bright & ~mask, spacing, WALL_BALL_MM)


def _width_mm(mask: np.ndarray, spacing: tuple[float, float, float]) -> float:
    """The larger in-plane side (mm) of ``mask``'s bounding box."""
    xs, ys = (np.flatnonzero(mask.any(axis=other)) for other in ((1, 2), (0, 2)))
    return float(max((xs[-1] - xs[0] + 1) * spacing[0], (ys[-1] - ys[0] + 1) * spacing[1]))


def _opening(region: np.ndarray, spacing: tuple[float, float, float], radius_mm: float) -> np.ndarray:
    """Morphological opening by a ball of ``radius_mm`` (distance transforms)."""
    eroded = ndimage.distance_transform_edt(region, sampling=spacing) > radius_mm
    if not eroded.any():
        return np.zeros_like(region)
    return np.asarray(ndimage.distance_transform_edt(~eroded, sampling=spacing) <= radius_mm)


def _interface_points(first: np.ndarray, second: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Midpoints (mm, in the box's index frame) between face-adjacent voxels of
    ``first`` and ``second``."""
    found = []
    for axis in range(3):
        lower = [slice(None)] * 3
        upper = [slice(None)] * 3
        lower[axis], upper[axis] = slice(0, -1), slice(1, None)
        pairs = (first[tuple(lower)] & second[tuple(upper)]) | (second[tuple(lower)] & first[tuple(upper)])
        index = np.argwhere(pairs).astype(np.float64)
        index[:, axis] += 0.5
        found.append(index)
    return np.concatenate(found) * np.asarray(spacing, dtype=np.float64)


class _Surface:
    """A quadratic height field over a principal plane: ``h = q(u, v)``."""

    def __init__(self, centre: np.ndarray, axes: np.ndarray, coefficients: np.ndarray) -> None:
        self.centre, self.axes, self.coefficients = centre, axes, coefficients

    def residual(self, points: np.ndarray) -> np.ndarray:
        """Signed distance along the plane's normal from the surface to ``points``."""
        local = (points - self.centre) @ self.axes
        residual: np.ndarray = local[:, 0] - _quadratic_terms(local[:, 1], local[:, 2]) @ self.coefficients
        return residual


def _quadratic_terms(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    return np.stack([np.ones_like(u), u, v, u * u, u * v, v * v], axis=1)


def _fit_surface(points: np.ndarray) -> _Surface | None:
    """The quadratic surface through ``points``, refitted on its inliers; None when it
    is not one smooth sheet."""
    keep = np.ones(len(points), dtype=bool)
    surface = None
    for _ in range(FIT_ROUNDS):
        if keep.sum() < MIN_POINTS:
            return None
        centre = points[keep].mean(axis=0)
        offsets = points[keep] - centre
        _, vectors = np.linalg.eigh(offsets.T @ offsets)  # ascending: the normal first
        local = offsets @ vectors
        coefficients, *_ = np.linalg.lstsq(_quadratic_terms(local[:, 1], local[:, 2]), local[:, 0], rcond=None)
        surface = _Surface(centre, vectors, coefficients)
        keep = np.abs(surface.residual(points)) <= INLIER_MM
    assert surface is not None
    residual = surface.residual(points[keep])
    if keep.mean() < MIN_INLIERS or not keep.any() or float(np.sqrt(np.mean(residual**2))) > MAX_RMS_MM:
        return None
    return surface


def _signed_height(surface: _Surface, shape: tuple[int, ...], spacing: tuple[float, float, float]) -> np.ndarray:
    """Every voxel centre's signed distance from ``surface`` (mm, along its normal)."""
    centres = np.indices(shape, dtype=np.float64).reshape(3, -1).T * np.asarray(spacing, dtype=np.float64)
    return surface.residual(centres).reshape(shape)
