"""Analytic lesions rendered the way a CT scanner sees them, for measurement tests.

An ellipsoid of uniform attenuation in a uniform lung background. Each voxel's value
is the fraction of its box (pixel x pixel x slice, the slice profile a rectangle as
thick as the spacing) that the ellipsoid fills, found by supersampling; then an
in-plane Gaussian blur (the scanner's point spread) and Gaussian noise. The truth is
analytic: the volume is ``4/3 pi a b c``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class RenderedLesion:
    """A rendered lesion: HU and the voxel-centre truth mask, both indexed (x, y, z)."""

    hu: np.ndarray
    truth: np.ndarray  # voxel centres inside the ellipsoid
    spacing: tuple[float, float, float]
    volume_mm3: float  # analytic


def _rotation(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([[math.cos(a), -math.sin(a), 0.0], [math.sin(a), math.cos(a), 0.0], [0.0, 0.0, 1.0]])


def render_ellipsoid(
    semi_axes_mm: tuple[float, float, float],
    spacing: tuple[float, float, float],
    *,
    angle_deg: float = 0.0,
    offset_voxels: tuple[float, float, float] = (0.0, 0.0, 0.0),
    lesion_hu: float = 35.0,
    background_hu: float = -850.0,
    psf_sigma_mm: float = 0.4,
    noise_hu: float = 0.0,
    seed: int = 0,
    margin_mm: float = 8.0,
    vessel: tuple[float, float] | None = None,
    vessel_hu: float | None = None,
    wall: tuple[float, float, float] | None = None,
    lobe: tuple[float, float] | None = None,
) -> RenderedLesion:
    """Render an ellipsoid (semi-axes along x, y, z before an in-plane rotation).

    ``vessel`` = (radius, y offset) mm adds a tube of the lesion's attenuation along x,
    through the whole box at that y and z = 0 (a vessel the lesion sits on); it is not
    part of the truth. With ``vessel_hu`` the tube has that attenuation instead (an
    enhancing vessel) where the lesion does not fill the space.

    ``wall`` = (distance mm, in-plane angle of its normal in degrees, HU) adds a chest
    wall: the half-space beyond a plane at that distance from the lesion's centre. The
    lesion is drawn on the lung's side only, and the truth and ``volume_mm3`` are that
    part (a sphere's, for a wall: the ball minus the cap beyond the plane).

    ``lobe`` = (radius, y offset) mm adds a ball centred at that y (a lobulated lesion's
    lobe, part of the truth; with a sphere, and no rotation)."""
    radii = np.asarray(semi_axes_mm, dtype=np.float64)
    if lobe is not None:
        assert np.ptp(radii) == 0 and angle_deg == 0.0 and wall is None, "a lobe is drawn on a sphere, without a wall"
    size = [int(math.ceil((radii.max() + margin_mm) / s)) for s in spacing]
    shape = tuple(2 * n + 1 for n in size)
    inverse = _rotation(angle_deg).T
    subs = [max(2, int(math.ceil(s / 0.2))) for s in spacing]
    offsets = [(np.arange(n) + 0.5) / n - 0.5 for n in subs]
    occupancy = np.zeros(shape, dtype=np.float64)
    wall_occupancy = np.zeros(shape, dtype=np.float64)
    vessel_occupancy = np.zeros(shape, dtype=np.float64)
    normal = None if wall is None else np.array([math.cos(math.radians(wall[1])), math.sin(math.radians(wall[1])), 0.0])
    centres = [(np.arange(m) - (m - 1) / 2 - o) * s for m, o, s in zip(shape, offset_voxels, spacing)]
    for k, zc in enumerate(centres[2]):
        z = (zc + offsets[2] * spacing[2])  # (nz,)
        if normal is None and np.min(np.abs(z)) > radii.max():
            continue
        x = (centres[0][:, None] + offsets[0][None, :] * spacing[0]).reshape(-1)
        y = (centres[1][:, None] + offsets[1][None, :] * spacing[1]).reshape(-1)
        X, Y, Z = np.meshgrid(x, y, z, indexing="ij")
        points = np.stack([X, Y, Z], axis=-1) @ inverse.T
        inside = np.sum((points / radii) ** 2, axis=-1) <= 1.0
        if lobe is not None:
            inside |= X**2 + (Y - lobe[1]) ** 2 + Z**2 <= lobe[0] ** 2
        tube = np.zeros_like(inside)
        if vessel is not None:
            tube = ((Y - vessel[1]) ** 2 + Z**2 <= vessel[0] ** 2) & ~inside
            if vessel_hu is None:
                inside |= tube
        if normal is not None:
            beyond = X * normal[0] + Y * normal[1] > wall[0]  # type: ignore[index]
            inside &= ~beyond
            tube &= ~beyond
            wall_occupancy[:, :, k] = _box_mean(beyond, shape, subs, z.size)
        if vessel_hu is not None:
            vessel_occupancy[:, :, k] = _box_mean(tube, shape, subs, z.size)
        occupancy[:, :, k] = _box_mean(inside, shape, subs, z.size)
    sigma = [psf_sigma_mm / spacing[0], psf_sigma_mm / spacing[1], 0.0]
    occupancy = ndimage.gaussian_filter(occupancy, sigma=sigma, mode="nearest")
    hu = background_hu + occupancy * (lesion_hu - background_hu)
    if vessel_hu is not None:
        hu += ndimage.gaussian_filter(vessel_occupancy, sigma=sigma, mode="nearest") * (vessel_hu - background_hu)
    if wall is not None:
        hu += ndimage.gaussian_filter(wall_occupancy, sigma=sigma, mode="nearest") * (wall[2] - background_hu)
    if noise_hu:
        hu = hu + np.random.default_rng(seed).normal(0.0, noise_hu, size=shape)
    X, Y, Z = np.meshgrid(*centres, indexing="ij")
    points = np.stack([X, Y, Z], axis=-1) @ inverse.T
    truth = np.sum((points / radii) ** 2, axis=-1) <= 1.0
    volume = 4.0 / 3.0 * math.pi * float(np.prod(radii))
    if lobe is not None:
        truth |= X**2 + (Y - lobe[1]) ** 2 + Z**2 <= lobe[0] ** 2
        volume += _ball_outside(lobe[0], abs(lobe[1]), float(radii[0]))
    if normal is not None:
        assert wall is not None and np.ptp(radii) == 0, "a wall is drawn beside a sphere"
        truth &= X * normal[0] + Y * normal[1] <= wall[0]
        r, d = float(radii[0]), wall[0]
        if d < r:  # the cap beyond the plane (a wall farther away leaves the ball whole)
            volume -= math.pi * (r - d) ** 2 * (2 * r + d) / 3.0
    return RenderedLesion(hu.astype(np.float32), truth, tuple(spacing), volume)  # type: ignore[arg-type]


def _ball_outside(r: float, d: float, big: float) -> float:
    """The volume of a ball of radius ``r`` outside a ball of radius ``big`` whose centre
    lies ``d`` from its own (the two overlap: ``big - r < d < big + r``)."""
    assert big - r < d < big + r, "the lobe must cross the lesion's surface"
    lens = math.pi * (big + r - d) ** 2 * (d**2 + 2 * d * r - 3 * r**2 + 2 * d * big + 6 * r * big - 3 * big**2) / (12 * d)
    return 4.0 / 3.0 * math.pi * r**3 - lens


def _box_mean(inside: np.ndarray, shape: tuple[int, ...], subs: list[int], nz: int) -> np.ndarray:
    """Each voxel's fraction of supersamples inside (in-plane voxel boxes, all z samples)."""
    return inside.reshape(shape[0], subs[0], shape[1], subs[1], nz).mean(axis=(1, 3, 4))
