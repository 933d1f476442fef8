"""Fast inversion of a bundle's preprocessing for a thresholded prediction.

``InvertThresholdd`` is ``Invertd`` (linear interpolation) + ``AsDiscreted(threshold)``
computed only around the predicted components: 0.6 -> 0.05-0.1 s on a 512x512x300 CT,
and no full-size float copy. It falls back to those two MONAI transforms for any
recorded operation it does not support, so the result is the same either way.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    Invertd,
    InvertibleTransform,
    MapTransform,
)
from monai.utils import TraceKeys
from scipy import ndimage

logger = logging.getLogger(__name__)


class InvertThresholdd(MapTransform):
    """``Invertd`` (linear interpolation) followed by ``AsDiscreted(threshold=...)``,
    computed only around the predicted components.

    Upsampling a whole float prediction back onto a 512x512x300 source grid and then
    thresholding it costs about 0.6 s and a full-size float copy, although the result is
    zero almost everywhere. Linear interpolation is a convex combination of the
    neighbouring voxels, so a source voxel can reach ``threshold`` only next to a
    working-grid voxel that does: this transform labels the voxels ``>= threshold`` at
    the working resolution, and for each component's bounding box (plus one voxel)
    interpolates just the source voxels it covers, with the same sampling positions as
    ``Resize(align_corners=True)`` (``Zoom``'s inverse), then thresholds them. The result
    is the label map the two transforms give (up to float rounding at the threshold).

    Supported inversions: ``Orientation`` and crops (any order, found through the
    affines), then at most one ``Zoom`` (trilinear, corner-aligned, no pad/crop, as
    :class:`ZoomSpacingd` records it). Any other recorded operation makes it fall back
    to MONAI's ``Invertd`` + ``AsDiscreted``, so the result is the same either way.
    The output is a ``uint8`` MetaTensor with the source image's affine.
    """

    _INTEGER_OPS = frozenset({"Orientation", "OrientCopy", "CropForeground", "ScanCropForeground", "SpatialCrop",
                              "CenterSpatialCrop"})

    def __init__(self, keys: KeysCollection, transform: InvertibleTransform, orig_keys: str,
                 threshold: float = 0.5, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if threshold <= 0:
            raise ValueError("threshold must be positive (zero padding must stay background)")
        self.orig_key = orig_keys
        self.threshold = float(threshold)
        self.fallback = Compose([
            Invertd(keys, transform=transform, orig_keys=orig_keys, nearest_interp=False, to_tensor=True,
                    allow_missing_keys=allow_missing_keys),
            AsDiscreted(keys, threshold=threshold, allow_missing_keys=allow_missing_keys),
        ])

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        plan = _inversion_plan(d.get(self.orig_key))
        if plan is None:
            logger.debug("InvertThresholdd: unsupported inversion, using Invertd")
            return dict(self.fallback(d))
        probs = {key: torch.as_tensor(d[key]).detach().cpu() for key in self.key_iterator(d)}
        if any(p.ndim != 4 or p.shape[0] != 1 or tuple(p.shape[1:]) != plan.working_shape
               for p in probs.values()):
            return dict(self.fallback(d))  # before any key is converted (no key inverted twice)
        for key, prob in probs.items():
            pred = d[key]
            labels = plan.threshold_back(prob[0].float().numpy(), self.threshold)
            meta = {k: v for k, v in getattr(pred, "meta", {}).items()}
            meta["affine"] = torch.as_tensor(plan.source_affine, dtype=torch.float64)
            d[key] = MetaTensor(torch.from_numpy(labels)[None], meta=meta)
        return d


class _InversionPlan:
    """How source voxel indices map onto the working grid: a signed axis permutation
    plus offset onto the cropped grid (``cropped_shape``), then a corner-aligned
    linear resize from that grid to ``working_shape``."""

    def __init__(self, source_shape: tuple[int, ...], source_affine: np.ndarray,
                 cropped_shape: tuple[int, ...], working_shape: tuple[int, ...],
                 index_map: np.ndarray) -> None:
        self.source_shape = source_shape
        self.source_affine = source_affine
        self.cropped_shape = cropped_shape
        self.working_shape = working_shape
        self.index_map = index_map  # cropped index = index_map @ (source index, 1)

    def _cropped_view(self, out: np.ndarray) -> np.ndarray:
        """A view of the source-grid array ``out`` indexed by cropped-grid indices."""
        m = self.index_map
        axes = [int(np.argmax(np.abs(m[k, :3]))) for k in range(3)]
        view = out.transpose(axes)
        index: list[slice] = []
        for k, axis in enumerate(axes):
            sign, offset, n = round(m[k, axis]), round(m[k, 3]), self.source_shape[axis]
            if sign < 0:  # c = -u + o  ->  flipped index v = n - 1 - u = c + n - 1 - o
                view = np.flip(view, axis=k)
                start = n - 1 - offset
            else:  # c = u + o
                start = -offset
            if start < 0 or start + self.cropped_shape[k] > n:
                raise ValueError("the cropped grid does not lie inside the source grid")
            index.append(slice(start, start + self.cropped_shape[k]))
        return view[tuple(index)]

    def threshold_back(self, prob: np.ndarray, threshold: float) -> np.ndarray:
        """The source-grid ``uint8`` map of ``resize(prob) >= threshold``."""
        out = np.zeros(self.source_shape, dtype=np.uint8)
        hot = prob >= threshold
        if not hot.any():
            return out
        view = self._cropped_view(out)
        for box in _hot_boxes(hot):
            found = [_resize_rows(s.start, s.stop, m, n)
                     for s, m, n in zip(box, self.working_shape, self.cropped_shape)]
            rows = [r for r in found if r is not None]
            if len(rows) != len(found):
                continue
            block = prob[tuple(slice(col, col + w.shape[1]) for _, col, w in rows)]
            for axis, (_, _, weights) in enumerate(rows):
                block = np.moveaxis(np.tensordot(weights, block, axes=([1], [axis])), 0, axis)
            target = view[tuple(slice(row, row + w.shape[0]) for row, _, w in rows)]
            target |= (block >= threshold).astype(np.uint8)
        return out


def _hot_boxes(hot: np.ndarray, block: int = 4) -> list[tuple[slice, ...]]:
    """Boxes that together hold every true voxel of ``hot``: those of the connected
    groups of ``block``-sized cubes that hold one (labelling the cubes, not the
    voxels, is about 20 times less work on a mostly empty grid)."""
    where = np.nonzero(hot)
    cubes = tuple(axis // block for axis in where)
    occupied = np.zeros(tuple(int(c.max()) + 1 for c in cubes), dtype=bool)
    occupied[cubes] = True
    groups, _ = ndimage.label(occupied, structure=np.ones((3,) * hot.ndim, dtype=bool))
    return [tuple(slice(s.start * block, min(s.stop * block, n)) for s, n in zip(box, hot.shape))
            for box in ndimage.find_objects(groups) if box is not None]


def _resize_rows(start: int, stop: int, m: int, n: int) -> tuple[int, int, np.ndarray] | None:
    """Cropped-grid rows (first row, first column, weights) whose corner-aligned linear
    resize from ``m`` to ``n`` samples reads the working-grid voxels ``[start, stop)``:
    the rows whose sampling position lies within one voxel of them. Positions and
    weights are computed like torch's CPU kernel (float32 ``scale * i``)."""
    scale = np.float32((m - 1) / (n - 1)) if n > 1 else np.float32(0.0)
    rows = np.arange(n, dtype=np.int64)
    pos = scale * rows.astype(np.float32)
    near = np.flatnonzero((pos > start - 1) & (pos < stop))
    if near.size == 0:
        return None
    rows, pos = rows[near], pos[near]
    i0 = np.minimum(np.floor(pos).astype(np.int64), m - 1)
    lam = np.clip(pos - i0.astype(np.float32), 0.0, 1.0).astype(np.float32)
    i1 = i0 + (i0 < m - 1)
    first = int(i0.min())
    weights = np.zeros((rows.size, int(i1.max()) - first + 1), dtype=np.float32)
    at = np.arange(rows.size)
    np.add.at(weights, (at, i0 - first), np.float32(1.0) - lam)
    np.add.at(weights, (at, i1 - first), lam)
    return int(rows[0]), first, weights


def _inversion_plan(image: Any) -> _InversionPlan | None:
    """The plan for ``image``'s recorded operations, or None when they are not the
    supported chain (see :class:`InvertThresholdd`)."""
    if not isinstance(image, MetaTensor) or image.ndim != 4:
        return None
    ops = list(image.applied_operations)
    if not ops or ops[0].get(TraceKeys.CLASS_NAME) not in ("Orientation", "OrientCopy"):
        return None
    names = [op.get(TraceKeys.CLASS_NAME) for op in ops]
    working_shape = tuple(int(s) for s in image.shape[1:])
    affine = np.asarray(image.affine, dtype=np.float64)
    if names[-1] == "Zoom":
        extra = ops[-1].get(TraceKeys.EXTRA_INFO, {})
        if extra.get("mode") != "trilinear" or extra.get("align_corners") is not True or extra.get("do_padcrop"):
            return None
        cropped_shape = tuple(int(s) for s in ops[-1][TraceKeys.ORIG_SIZE])
        n, m = np.asarray(cropped_shape, dtype=np.float64), np.asarray(working_shape, dtype=np.float64)
        scale = np.where(m > 1, (n - 1) / np.maximum(m - 1, 1), 1.0)
        if np.any(n <= 1):
            return None
        affine = affine @ np.diag([*(1.0 / scale), 1.0])
        names = names[:-1]
    else:
        cropped_shape = working_shape
    if any(name not in InvertThresholdd._INTEGER_OPS for name in names):
        return None
    source_affine = np.asarray(ops[0][TraceKeys.EXTRA_INFO]["original_affine"], dtype=np.float64)
    source_shape = tuple(int(s) for s in ops[0][TraceKeys.ORIG_SIZE])
    index_map = np.linalg.solve(affine, source_affine)
    rounded = np.round(index_map)
    perm = np.abs(rounded[:3, :3])
    if (np.abs(index_map - rounded).max() > 1e-3 or not np.all(perm.sum(axis=0) == 1)
            or not np.all(perm.sum(axis=1) == 1) or len(source_shape) != 3):
        return None
    plan = _InversionPlan(source_shape, source_affine, cropped_shape, working_shape, rounded)
    try:
        plan._cropped_view(np.empty(source_shape, dtype=np.uint8))
    except ValueError:
        return None
    return plan
