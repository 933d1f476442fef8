"""Partial-volume-aware measurements of one lesion on the source grid.

The conventions a radiologist's numbers rest on (see the model README, "Measurement
conventions"); every step works on the source image's voxels and HU, never on the
model's resampled grid:

* **Core.** The voxels of a mask at least 1 mm inside its boundary, the boundary lying
  half a voxel beyond the outermost voxels: the mask eroded by an ellipsoid whose
  semi-axis along each axis is ``round((1 mm + s / 2) / s)`` voxels (at least one) for
  that axis' spacing ``s``. On 5 mm slices a core voxel therefore has a mask voxel
  above and below it: its slab lies wholly inside the lesion. A lesion too small or too
  thin to have such voxels has no core; its *central* voxels stand in (those whose
  distance to the outside is at least two thirds of the largest), and the attenuation
  is flagged as not from a core (it reads low: partial volume).
* **Attenuation** (mean, standard deviation, maximum): the source HU over the core.
* **Half-maximum boundary** (``boundary: half_maximum`` in the manifest, for a lesion
  brighter than its background such as a lung nodule): the background ``B`` is the
  median HU of the lung (below -300 HU) 2-4 mm outside the model's mask, the lesion's
  level ``C`` its core mean, and the mask becomes the voxels above ``(B + C) / 2`` among
  the model's mask and its 26 neighbours, in two passes (the core taken again from the
  new mask): the edge moves by at most one voxel, so an attached vessel or chest wall is
  not followed (a vessel that the model's mask itself carries stays in it). The mask
  grows only where the model's edge lies inside the lesion (at least half the voxels
  just outside it in-plane above the half maximum); otherwise those bright voxels are what
  touches the lesion, and the mask only shrinks to the edge. Without enough lung around
  (fewer than 10 voxels) or contrast (``C - B`` under 100 HU) the model's mask is kept as it is.
* **Brighter attachment** (a solid lesion): a structure touching the lesion and brighter
  than it by :data:`MIN_CONTRAST_HU` or three robust standard deviations of its core,
  whichever is more (an enhancing vessel; :func:`brighter_attachment`), ends at the half
  maximum between the two. Brightness is judged on the image averaged over 3 x 3 pixels
  in-plane (a sharp kernel's noise would otherwise pass for a structure), and needs at
  least :data:`MIN_BACKGROUND_VOXELS` such voxels just outside the mask. The lesion's
  level is its core's most frequent HU, which the vessel's voxels in it do not move. The
  mask's voxels above that half maximum that connect to such voxels outside the mask are
  the structure's, and so is its partial-volume sleeve: the mask's voxels nearer to the
  structure than to the lesion's core by more than the core's largest per-axis reach
  (:func:`core_reach_mm`). What is left must be one body (slivers beside it go too). No
  cut when it would divide the lesion in two, or when the structure would wrap
  :data:`MAX_WRAP` or more of what is left (the lesion's own enhancing wall, a rim around
  necrosis). The removed voxels are not counted in the volume's shell. A calcification
  inside the lesion touches nothing bright outside it and stays; a vessel through a
  lesion leaves it one piece and is cut out of it. A vessel as dense as the lesion (no
  contrast), or thinner than about 4 mm (its 3 x 3 average does not reach the
  contrast), is left to the stump cut below.
* **Stumps of a dense vessel** (a solid lesion): the pieces of the mask thinner than its
  body (an opening by a ball of 0.85 of its largest depth) that a thinner structure above
  the half maximum continues outside it (for a lesion off the wall, the wall the vessel
  may run into not counted) are a vessel the model's mask carried, as dense as the lesion
  or less, and go (:mod:`plugin.stump_cut`); like a brighter attachment, they are not
  counted in the volume's shell. Not for a mask holding a 30 mm ball's volume.
* **Pleural cut**: a lesion touching the chest wall or the mediastinum (thick tissue
  outside its mask, never its own rim) ends at the pleural surface fitted around it
  (:mod:`plugin.pleural_cut`); the voxels beyond it are neither kept, grown into nor
  counted in the volume's shell.
* **Volume** with ``half_maximum``: partial-volume corrected. Each voxel contributes its
  fraction of lesion tissue ``f = (HU - B) / (C - B)``: 1 in the core, ``f`` clipped to
  [0, 1] elsewhere in the mask, and ``f`` clipped to [-0.5, 0.5] in a shell 1.5 mm deep
  (at least one voxel) around it, where blur and the slice profile spread the lesion
  below the half maximum; a shell voxel above the half maximum is another structure
  (vessel, chest wall) and counts 0. This keeps the volume within a few percent where
  the slices are as thick as the lesion, where a voxel count cannot (a 6 mm ball on
  5 mm slices is counted -24 % to +4 % depending on where the slices fall). When the
  lesion has no core, ``C`` is at least :data:`SOLID_REFERENCE_HU` (a solid nodule):
  its central voxels are diluted by partial volume and would inflate ``f``.
  Without ``half_maximum`` the volume is the voxel count times the voxel volume.
* **Composition** (with ``half_maximum``): a lesion with a fifth or more of its core
  below :data:`SUBSOLID_BELOW_HU` is *subsolid* (a solid nodule's core has next to
  none: its noise would have to reach 8 standard deviations). Its level ``C`` is then
  the ground glass's: the most frequent value (histogram peak) of its core voxels below
  that value, so the half-maximum edge and the partial-volume fractions follow the
  ground glass around it and the whole lesion is measured (its denser voxels count 1),
  not its solid part alone. The **solid component** is the part of the refined mask
  above ``(C + SOLID_REFERENCE_HU) / 2`` (and at least :data:`SUBSOLID_BELOW_HU`), its
  parts of fewer than three voxels dropped as noise; the lesion is "part_solid" when
  that component holds at least :data:`SOLID_COMPONENT_MIN_MM3` (a 3 mm ball),
  "ground_glass" otherwise. A vessel running through ground glass counts as solid: the
  convention cannot tell them apart. A lesion without a core, or with a core of less
  than :data:`SUBSOLID_MIN_CORE_MM3` (too small or thin; on 5 mm slices most nodules
  under about 20 mm), is taken as solid: partial volume alone would make a solid nodule
  read as ground glass, and a verdict on a handful of voxels is a verdict on their
  noise. The pleural cut of a subsolid lesion
  looks for the wall at a solid lesion's half maximum (ground glass is not wall).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from plugin.pleural_cut import RING_MM, beyond_pleura, touches_wall, wall_outside
from plugin.stump_cut import attached_stumps

LUNG_BELOW_HU = -300.0
MIN_BACKGROUND_VOXELS = 10
MIN_CONTRAST_HU = 100.0
SOLID_REFERENCE_HU = 0.0
CORE_DEPTH_MM = 1.0
SHELL_MM = 1.5
BACKGROUND_RING_MM = (2.0, 4.0)
PASSES = 2
GROW_WHEN_ABOVE = 0.5
SUBSOLID_BELOW_HU = -300.0
SUBSOLID_SHARE = 0.2
MODE_MIN_VOXELS = 50
SOLID_COMPONENT_MIN_MM3 = math.pi / 6.0 * 3.0**3
SUBSOLID_MIN_CORE_MM3 = SOLID_COMPONENT_MIN_MM3  # a 3 mm ball: the least core a composition is judged on
MIN_BODY_CORE_MM3 = SOLID_COMPONENT_MIN_MM3  # a 3 mm ball: a piece of a lesion that counts as a body
MAX_WRAP = 0.3  # a brighter structure around this share of a lesion's body is its own wall, not a vessel
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity: every voxel touching by a face, an edge or a corner


@dataclass(frozen=True)
class Attenuation:
    """HU statistics over a lesion's core (see the module conventions)."""

    mean: float
    sd: float
    maximum: float
    voxels: int
    from_core: bool  # False: too small or thin for a core; central voxels were used


@dataclass(frozen=True)
class LesionMeasure:
    """The refined mask (inside the box it was measured in), its volume and attenuation."""

    mask: np.ndarray  # bool, same shape as the box
    volume_mm3: float
    attenuation: Attenuation
    half_maximum: bool  # the mask follows the half-maximum edge (False: the model's mask)
    background_hu: float | None = None
    composition: str = "solid"  # "solid", "part_solid" or "ground_glass" (see the module conventions)
    solid_mask: np.ndarray | None = None  # a subsolid lesion's solid component, same shape as mask
    # the mask before the stump cut (same shape), None when nothing was cut: another
    # finding touching the lesion is judged on it, so the cut changes measurements, not
    # which findings are reported
    uncut_mask: np.ndarray | None = None


def ellipsoid(radii: tuple[int, int, int]) -> np.ndarray:
    """A boolean ellipsoid structuring element with integer semi-axes (voxels)."""
    if min(radii) < 1:
        raise ValueError(f"semi-axes must be at least one voxel, got {radii}")
    grids = np.ogrid[tuple(slice(-r, r + 1) for r in radii)]
    total = sum((g / r) ** 2 for g, r in zip(grids, radii))
    return np.asarray(total <= 1.0 + 1e-9)


def _radii(spacing: tuple[float, float, float], mm: float, *, half_voxel: bool) -> tuple[int, int, int]:
    """Per-axis voxel counts reaching ``mm`` (plus half a voxel if asked), at least one."""
    out = []
    for s in spacing:
        reach = (mm + (s / 2 if half_voxel else 0.0)) / s
        out.append(max(1, int(math.floor(reach + 0.5))))
    return (out[0], out[1], out[2])


def core(mask: np.ndarray, spacing: tuple[float, float, float],
         radii: tuple[int, int, int] | None = None) -> np.ndarray:
    """The voxels of ``mask`` at least :data:`CORE_DEPTH_MM` inside its boundary, or, with
    ``radii``, at least that many voxels along each axis."""
    element = ellipsoid(radii or _radii(spacing, CORE_DEPTH_MM, half_voxel=True))
    return np.asarray(ndimage.binary_erosion(mask, structure=element, border_value=0))


def central(mask: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """The voxels whose distance to the outside is at least 2/3 of the largest."""
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    return np.asarray(mask & (depth >= depth.max() * 2.0 / 3.0))


def attenuation(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]) -> Attenuation:
    """Mean, SD and maximum HU over the core of ``mask`` (central voxels if it has none)."""
    inner = core(mask, spacing)
    from_core = bool(inner.any())
    if not from_core:
        inner = central(mask, spacing)
    values = hu[inner].astype(np.float64)
    return Attenuation(
        mean=float(values.mean()),
        sd=float(values.std(ddof=1)) if values.size > 1 else 0.0,
        maximum=float(values.max()),
        voxels=int(values.size),
        from_core=from_core,
    )


def measure_lesion(
    hu: np.ndarray,
    mask: np.ndarray,
    spacing: tuple[float, float, float],
    *,
    half_maximum: bool,
    others: np.ndarray | None = None,
) -> LesionMeasure:
    """Measure one lesion: ``hu`` and ``mask`` are a box around it with a margin of at
    least :func:`margin_voxels` (10.5 mm + one voxel: the pleural cut's ring, the
    background's 4 mm) where the image allows; ``others`` marks voxels of other
    findings in that box.

    ``spacing`` is the (x, y, z) voxel size in mm of ``hu``'s axes.
    """
    if hu.shape != mask.shape or hu.ndim != 3:
        raise ValueError(f"hu {hu.shape} and mask {mask.shape} must be the same 3D shape")
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        raise ValueError("the lesion's mask is empty")
    as_is = LesionMeasure(mask, float(mask.sum()) * float(np.prod(spacing)), attenuation(hu, mask, spacing), False)
    if not half_maximum:
        return as_is
    blocked = np.zeros_like(mask) if others is None else np.asarray(others, dtype=bool) & ~mask
    background = _background(hu, mask, blocked, spacing)
    if background is None:
        return as_is
    subsolid = is_subsolid(hu, mask, spacing)
    level = _lesion_level(hu, mask, spacing, subsolid)
    # the wall is found at a solid lesion's half maximum: ground glass is not wall
    wall_level = max(level, SOLID_REFERENCE_HU) if subsolid else level
    wall_half = (background + wall_level) / 2.0
    near_wall = level - background >= MIN_CONTRAST_HU and touches_wall(hu, mask, spacing, wall_half)
    beyond = beyond_pleura(hu, mask, spacing, wall_half, touching=True) if near_wall else None
    if beyond is not None:
        blocked = blocked | beyond
    # one voxel of growth, diagonals included: an attached vessel is not followed
    allowed = ndimage.binary_dilation(mask, structure=_FULL) & ~blocked
    refined = mask & ~blocked
    for index in range(PASSES):
        level = _lesion_level(hu, refined, spacing, subsolid)
        if level - background < MIN_CONTRAST_HU:
            return as_is
        half = (background + level) / 2.0
        if index == 0 and not _edge_inside(hu, mask, blocked, half):
            allowed = mask & ~blocked  # the model's edge is not inside the lesion: trim, never grow
        above = allowed & (hu > half)
        if not above.any():
            break
        refined = _touching(above, mask)
    uncut = None
    if not subsolid:
        brighter = brighter_attachment(hu, refined, blocked, spacing)
        if brighter is not None:
            refined, blocked = refined & ~brighter, blocked | brighter
        half = (background + _lesion_level(hu, refined, spacing)) / 2.0
        free = (hu > half) & ~blocked
        if not near_wall:  # a vessel that runs on into the wall is judged by its own thickness, not the wall's
            free &= ~wall_outside(free, refined, spacing)
        stumps = attached_stumps(refined, free, spacing)
        if stumps is not None:
            uncut = refined
            refined, blocked = refined & ~stumps, blocked | stumps
    level = _lesion_level(hu, refined, spacing, subsolid)
    volume = _partial_volume(hu, refined, blocked, spacing, background, level)
    composition, solid = "solid", None
    if subsolid:
        solid = solid_component(hu, refined, level)
        big_enough = float(solid.sum()) * float(np.prod(spacing)) >= SOLID_COMPONENT_MIN_MM3
        composition = "part_solid" if big_enough else "ground_glass"
    return LesionMeasure(refined, volume, attenuation(hu, refined, spacing), True, background,
                         composition, solid, uncut)


def brighter_attachment(hu: np.ndarray, mask: np.ndarray, blocked: np.ndarray,
                        spacing: tuple[float, float, float]) -> np.ndarray | None:
    """The voxels of a solid lesion's ``mask`` that belong to a brighter structure
    continuing outside it (an enhancing vessel), or None when there is none (see below) or
    when cutting it would not leave one body of the lesion.

    Brightness is judged on ``hu`` averaged over 3 x 3 pixels in-plane. The lesion's level
    ``C`` is the most frequent value of its core (the mean would carry the vessel's
    voxels; all the mask's voxels when the core has fewer than
    :data:`MIN_BACKGROUND_VOXELS`, their median below :data:`MODE_MIN_VOXELS`); the
    attached structure's ``V`` the median of the voxels just outside the mask (26
    neighbours) above ``C + max(MIN_CONTRAST_HU, 3 sd)``, ``sd`` the core's robust spread
    (1.4826 median absolute deviations), at least :data:`MIN_BACKGROUND_VOXELS` of them.
    The boundary between the two is their half maximum ``(C + V) / 2``: the mask's voxels
    above it that are connected (26-connected, above it) to such voxels outside the mask
    are the structure's. None when they would wrap :data:`MAX_WRAP` or more of the rest of
    the mask (its 26-neighbour shell): that is the lesion's own enhancing wall. The
    structure's partial-volume sleeve goes too: the voxels nearer to it than to the rest's
    core by more than ``max(core_reach_mm(spacing))``. What is left must be one body: the
    piece with a core of at least :data:`MIN_BODY_CORE_MM3` is kept and the slivers beside
    it go too. None when no piece or two pieces have such a core (the structure would
    divide the lesion in two). A bright spot inside the lesion (a calcification) reaches no
    bright voxel outside it and stays; a vessel through the lesion leaves it one piece and
    is cut out of it."""
    if not mask.any():
        return None
    smooth = ndimage.uniform_filter(hu.astype(np.float32), size=(3, 3, 1), mode="nearest")
    inner = core(mask, spacing)
    values = (smooth[inner] if int(inner.sum()) >= MIN_BACKGROUND_VOXELS else smooth[mask]).astype(np.float64)
    level = _mode(values)
    spread = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    ring = ndimage.binary_dilation(mask, structure=_FULL) & ~mask & ~blocked
    brighter = ring & (smooth > level + max(MIN_CONTRAST_HU, 3.0 * spread))
    if int(brighter.sum()) < MIN_BACKGROUND_VOXELS:
        return None
    boundary = (level + float(np.median(smooth[brighter]))) / 2.0
    labels, _ = ndimage.label((smooth > boundary) & ~blocked, structure=_FULL)
    cut = np.isin(labels, np.unique(labels[ring & (labels > 0)])) & mask
    left = mask & ~cut
    if not cut.any() or not left.any():
        return None
    around = ndimage.binary_dilation(left, structure=_FULL) & ~left
    if float(np.mean(cut[around])) >= MAX_WRAP:
        return None  # the lesion's own wall
    body = core(left, spacing)
    if not body.any():
        return None
    to_body = ndimage.distance_transform_edt(~body, sampling=spacing)
    to_cut = ndimage.distance_transform_edt(~cut, sampling=spacing)
    rest = left & ~(to_body > to_cut + max(core_reach_mm(spacing)))
    pieces, count = ndimage.label(rest, structure=_FULL)
    cores = np.bincount(pieces[core(rest, spacing)], minlength=count + 1)[1:] * float(np.prod(spacing))
    if int(np.sum(cores >= MIN_BODY_CORE_MM3)) != 1:
        return None
    return np.asarray(mask & (pieces != int(np.argmax(cores)) + 1))


def solid_component(hu: np.ndarray, mask: np.ndarray, ground_glass_hu: float) -> np.ndarray:
    """The solid part of a subsolid lesion's ``mask``: its voxels above the half way
    from the ground glass to a solid nodule (:data:`SOLID_REFERENCE_HU`), at least
    :data:`SUBSOLID_BELOW_HU`, without 26-connected parts of fewer than three voxels."""
    threshold = max((ground_glass_hu + SOLID_REFERENCE_HU) / 2.0, SUBSOLID_BELOW_HU)
    dense = mask & (hu > threshold)
    labels, n = ndimage.label(dense, structure=_FULL)
    if n == 0:
        return dense
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= 3
    keep[0] = False
    return np.asarray(keep[labels])


def _background(
    hu: np.ndarray, mask: np.ndarray, blocked: np.ndarray, spacing: tuple[float, float, float]
) -> float | None:
    """Median HU of the lung 2-4 mm outside ``mask``, or None with too few such voxels."""
    near, far = BACKGROUND_RING_MM
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    ring = (outside >= near) & (outside <= far) & ~blocked & (hu < LUNG_BELOW_HU)
    if int(ring.sum()) < MIN_BACKGROUND_VOXELS:
        return None
    return float(np.median(hu[ring]))


def core_reach_mm(spacing: tuple[float, float, float]) -> tuple[float, float, float]:
    """How deep (mm, per axis) :func:`core` erodes on a grid of ``spacing``: whole voxels,
    so on 5 mm slices a lesion needs three slices to have a core."""
    radii = _radii(spacing, CORE_DEPTH_MM, half_voxel=True)
    return (radii[0] * spacing[0], radii[1] * spacing[1], radii[2] * spacing[2])


def is_subsolid(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
                reach_mm: tuple[float, float, float] | None = None) -> bool:
    """Whether the lesion ``mask`` has a core (:func:`core`) of which at least
    :data:`SUBSOLID_SHARE` lies below :data:`SUBSOLID_BELOW_HU` in ``hu``: ground glass or
    part-solid. Without a core (too small or too thin for its slices) it is solid. With
    ``reach_mm`` (:func:`core_reach_mm` of the source grid) the core is the one the
    source grid would give, on a resampled grid of ``spacing``. A core of less than
    :data:`SUBSOLID_MIN_CORE_MM3` counts as none (on 8 mm slices of 0.65 mm pixels a
    one-voxel core of a 32 mm branching structure would otherwise decide)."""
    radii = None if reach_mm is None else (max(1, round(reach_mm[0] / spacing[0])),
                                           max(1, round(reach_mm[1] / spacing[1])),
                                           max(1, round(reach_mm[2] / spacing[2])))
    inner = core(mask, spacing, radii)
    core_mm3 = float(inner.sum()) * float(np.prod(spacing))
    return core_mm3 >= SUBSOLID_MIN_CORE_MM3 and float(np.mean(hu[inner] < SUBSOLID_BELOW_HU)) >= SUBSOLID_SHARE


def stands_out(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float]) -> bool:
    """Whether the lesion ``mask`` (a subsolid one: its level the ground glass's) is at
    least :data:`MIN_CONTRAST_HU` above the lung 2-4 mm around it, the contrast
    :func:`measure_lesion` needs to find its edge; True when there is too little lung
    around it to tell. ``hu`` must reach 4 mm beyond the mask."""
    background = _background(hu, mask, np.zeros_like(mask), spacing)
    if background is None:
        return True
    return _lesion_level(hu, mask, spacing, subsolid=True) - background >= MIN_CONTRAST_HU


def _mode(values: np.ndarray) -> float:
    """The most frequent value (HU) of ``values``: the peak of their histogram in 10 HU
    bins, smoothed over 20 HU; the median for fewer than :data:`MODE_MIN_VOXELS` values.
    On thick slices a part-solid lesion's core mixes ground glass and solid tissue in
    each voxel; the peak stays at the ground glass, where the median moves."""
    if values.size < MODE_MIN_VOXELS:
        return float(np.median(values))
    low, high = float(values.min()), float(values.max())
    bins = max(1, int(np.ceil((high - low) / 10.0)))
    counts, edges = np.histogram(values, bins=bins, range=(low, low + 10.0 * bins))
    smooth = ndimage.gaussian_filter1d(counts.astype(np.float64), sigma=2.0, mode="constant")
    peak = int(np.argmax(smooth))
    return float((edges[peak] + edges[peak + 1]) / 2.0)


def _lesion_level(hu: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
                  subsolid: bool = False) -> float:
    """The lesion's own HU: its core mean, or at least the solid reference without a
    core; for a subsolid lesion its ground glass's (the most frequent value of the core
    voxels below :data:`SUBSOLID_BELOW_HU`)."""
    if subsolid:
        inner = core(mask, spacing)
        glass = hu[inner & (hu < SUBSOLID_BELOW_HU)] if inner.any() else hu[mask & (hu < SUBSOLID_BELOW_HU)]
        if glass.size:
            return _mode(glass)
    att = attenuation(hu, mask, spacing)
    return att.mean if att.from_core else max(att.mean, SOLID_REFERENCE_HU)


def _edge_inside(hu: np.ndarray, mask: np.ndarray, blocked: np.ndarray, half: float) -> bool:
    """Whether the model's edge lies inside the lesion: most of the voxels just outside
    its mask in-plane (:data:`GROW_WHEN_ABOVE` of them; in-plane, because across thick
    slices the lesion fades by partial volume) are above the half maximum. Otherwise the
    bright voxels there are what touches the lesion (a vessel, the chest wall), and the
    mask may only shrink to the half-maximum edge."""
    ring = ndimage.binary_dilation(mask, structure=np.ones((3, 3, 1), dtype=bool)) & ~mask & ~blocked
    return bool(ring.any()) and float(np.mean(hu[ring] > half)) >= GROW_WHEN_ABOVE


def _touching(candidate: np.ndarray, seed: np.ndarray) -> np.ndarray:
    """The parts of ``candidate`` (26-connected) that overlap ``seed``."""
    labels, n = ndimage.label(candidate, structure=_FULL)
    if n == 0:
        return candidate
    keep = np.unique(labels[seed & candidate])
    keep = keep[keep > 0]
    if keep.size == 0:
        return candidate
    return np.isin(labels, keep)


def _partial_volume(
    hu: np.ndarray,
    mask: np.ndarray,
    blocked: np.ndarray,
    spacing: tuple[float, float, float],
    background: float,
    level: float,
) -> float:
    """Partial-volume corrected volume (mm³), see the module conventions."""
    fraction = (hu.astype(np.float64) - background) / (level - background)
    inner = core(mask, spacing)
    edge = mask & ~inner
    shell_element = ellipsoid(_radii(spacing, SHELL_MM, half_voxel=False))
    shell = ndimage.binary_dilation(mask, structure=shell_element) & ~mask & ~blocked
    shell &= fraction <= 0.5
    total = float(inner.sum())
    total += float(np.clip(fraction[edge], 0.0, 1.0).sum())
    total += float(np.clip(fraction[shell], -0.5, 0.5).sum())
    return total * float(np.prod(spacing))


def margin_voxels(spacing: tuple[float, float, float]) -> tuple[int, int, int]:
    """The box margin :func:`measure_lesion` needs around a lesion, per axis."""
    reach = max(BACKGROUND_RING_MM[1], SHELL_MM, RING_MM[1]) + 0.5
    return tuple(int(math.ceil(reach / s)) + 1 for s in spacing)  # type: ignore[return-value]
