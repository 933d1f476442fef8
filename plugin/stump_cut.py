"""Where a solid lesion ends along a vessel as dense as itself: the stumps cut by shape.

A network's mask can carry a stretch of a vessel it merged with the nodule. When the
vessel is no brighter than the lesion (no contrast), attenuation cannot tell them apart
(:func:`plugin.lesion_measure.brighter_attachment` needs 100 HU), and the half-maximum
edge keeps both: a 20.5 mm phantom nodule with three stumps read +18 %. The shape can
tell them apart, as in semi-automatic nodule volumetry (a morphological opening detaches
the vessels): a stump is thinner than the lesion's body, and the vessel goes on outside
the mask.

* **Body**: the mask opened by a ball of radius :data:`BODY_FRACTION` of its largest
  depth ``R`` (the distance from its deepest voxel to the outside): the union of the
  balls of that radius that fit in it. A sphere is its own body, and so is each lobe as
  thick as the ball; a tube thinner than the ball is not body.
* **Attachments**: the structures outside the mask above the half maximum (not blocked:
  other findings, beyond the pleura, an enhancing vessel already cut; nor, for a lesion
  that does not touch the wall, the wall, :func:`plugin.pleural_cut.wall_outside`, so
  that a vessel running on into it is judged by its own thickness) that touch it,
  reach at least :data:`ATTACHMENT_REACH_MM` away from it and are thinner than the ball
  (their deepest voxel within two ball radii of the mask no deeper than the radius; one
  with no voxel there, on thick slices, is not judged thin): a vessel that the opening
  can take away. The lesion's own partial-volume edge mostly lies within a voxel of the
  mask and is no attachment (on 5 mm slices a cap slice the mask left out can be one;
  what protects the cap then is that only pieces beyond the body by more than a slice
  are cut); the rest of a lesion that the mask holds only in part is as thick as the
  part, and is none either.
* **Stumps**: the pieces of the mask outside the body, more than one voxel (the grid's
  largest spacing) beyond it, that touch an attachment. They are not the lesion. A lobe
  or a thin part of the lesion that no attachment continues stays, and so does the base
  of a stump within that spacing of the body: on 5 mm slices 5 mm in-plane too (a step
  along each axis instead mended the thick-slice stumps but cut the lobes that a vessel
  touches; the model README, "Tried, not kept").

Nothing is cut for a lesion whose largest depth is under :data:`MIN_DEPTH_MM` (a body
and a vessel cannot be told apart on so few voxels) or whose mask holds the volume of a
ball of :data:`MAX_DIAMETER_MM` or more, stumps included (a mass: a lobulated mass is
lobes thinner than its body, and the phantom masses lost a third to a half of their
volume when cut; an elongated lesion under that volume is cut, and if its long axis
falls under 30 mm it is named a nodule rather than a mass), when the attachments cover
:data:`MAX_EXIT_SHARE` or more of the voxels around the mask (the lesion lies in
something larger, or is part of it), or when the stumps would take :data:`MAX_CUT_SHARE`
or more of the mask.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

BODY_FRACTION = 0.85
ATTACHMENT_REACH_MM = 2.5
MIN_DEPTH_MM = 3.0
MAX_DIAMETER_MM = 30.0  # a mask holding a ball of this diameter's volume, stumps included, is a mass
MAX_EXIT_SHARE = 0.3
MAX_CUT_SHARE = 0.6
_FULL = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity


def attached_stumps(mask: np.ndarray, above_half: np.ndarray,
                    spacing: tuple[float, float, float]) -> np.ndarray | None:
    """The voxels of a solid lesion's ``mask`` that are stumps of a structure going on
    outside it (see the module's rules), or None when there are none or nothing may be
    cut. ``above_half`` marks the box's voxels above the lesion's half maximum that are
    free to be an attachment (blocked voxels already removed); ``spacing`` is the voxel
    size (mm) along the box's axes."""
    if mask.shape != above_half.shape or mask.ndim != 3:
        raise ValueError(f"mask {mask.shape} and above_half {above_half.shape} must be the same 3D shape")
    mask, above_half = np.asarray(mask, dtype=bool), np.asarray(above_half, dtype=bool)
    if not mask.any():
        return None
    if float(mask.sum()) * float(np.prod(spacing)) >= math.pi / 6.0 * MAX_DIAMETER_MM**3:
        return None
    depth = ndimage.distance_transform_edt(np.pad(mask, 1), sampling=spacing)[1:-1, 1:-1, 1:-1]
    deepest = float(depth.max())
    if deepest < MIN_DEPTH_MM:
        return None
    radius = BODY_FRACTION * deepest
    exits = _attachment_exits(mask, above_half, radius, spacing)
    if exits is None:
        return None
    body = _body(mask, depth, radius, spacing)
    beyond = mask & (ndimage.distance_transform_edt(~body, sampling=spacing) > max(spacing))
    pieces, count = ndimage.label(beyond, structure=_FULL)
    if count == 0:
        return None
    reached = np.unique(pieces[ndimage.binary_dilation(exits, structure=_FULL) & beyond])
    stumps = np.isin(pieces, reached[reached > 0])
    if not stumps.any() or float(stumps.sum()) >= MAX_CUT_SHARE * float(mask.sum()):
        return None
    return np.asarray(stumps)


def _attachment_exits(mask: np.ndarray, above_half: np.ndarray, radius_mm: float,
                      spacing: tuple[float, float, float]) -> np.ndarray | None:
    """The voxels just outside ``mask`` (26 neighbours) where an attachment thinner than
    a ball of ``radius_mm`` leaves it, or None when there is none or the attachments wrap
    :data:`MAX_EXIT_SHARE` or more of it."""
    ring = ndimage.binary_dilation(mask, structure=_FULL) & ~mask
    outside = above_half & ~mask
    labels, count = ndimage.label(outside, structure=_FULL)
    if count == 0:
        return None
    away = ndimage.distance_transform_edt(~mask, sampling=spacing)
    index = np.arange(1, count + 1)
    reach = np.asarray(ndimage.maximum(away, labels, index=index))
    own_depth = ndimage.distance_transform_edt(outside, sampling=spacing)
    near = np.where(away <= 2.0 * radius_mm, labels, 0)
    thickness = np.asarray(ndimage.maximum(own_depth, near, index=index), dtype=np.float64)
    thickness[np.bincount(near.ravel(), minlength=count + 1)[1:] == 0] = np.inf  # none near: not judged thin
    vessel = np.zeros(count + 1, dtype=bool)
    vessel[1:] = (reach >= ATTACHMENT_REACH_MM) & (thickness <= radius_mm)
    exits = ring & vessel[labels]
    if not exits.any() or float(exits.sum()) >= MAX_EXIT_SHARE * float(ring.sum()):
        return None
    return np.asarray(exits)


def _body(mask: np.ndarray, depth: np.ndarray, radius_mm: float,
          spacing: tuple[float, float, float]) -> np.ndarray:
    """The union of the balls of ``radius_mm`` centred on the voxels deeper than it
    (``depth``: the distance to the outside), within ``mask``: every lobe as thick as the
    ball is body, however many there are."""
    reach = ndimage.distance_transform_edt(depth <= radius_mm, sampling=spacing)
    return np.asarray(mask & (reach <= radius_mm))
