"""Transforms for bundles that care about CPU time and memory.

``ZoomSpacingd`` resamples to a target voxel spacing like MONAI's ``Spacingd`` for
axis-aligned volumes, but through ``torch.nn.functional.interpolate`` (MONAI's
``Zoom``, corner-aligned: the first and last voxel centres stay where they are, as
with ``Spacingd``) instead of a sampling grid: measured on a 512x512x300 CT to 1x1x1.25 mm,
0.2 s and +140 MiB instead of 2.4 s and +2.7 GiB. It is invertible (``Invertd``
brings predictions back to the source grid), and it must follow an orientation
transform (``Orientationd``), since it only scales the axes.

The others are drop-in equivalents of MONAI transforms with the same results (the
tests compare them bitwise, metadata and inversion included), minus full-size
passes and copies (measured on the 300-slice chest phantom, 2 cores):

* ``OrientCropForegroundd``: ``Orientationd`` + ``CropForegroundd`` in one copy of the
  cropped region only (the MONAI bundle plugin then skips its own working copy);
  ``OrientCopyd`` and ``ScanCropForegroundd`` are the two halves on their own.
  Preprocessing 1.0 -> 0.4 s of CPU; the 600-slice worker peak fell by 0.6 GiB.
* ``ScaleIntensityRangeFusedd``: ``ScaleIntensityRanged`` with one output tensor.
* ``InvertThresholdd``: ``Invertd`` + ``AsDiscreted(threshold)`` computed only around
  the predicted components (0.6 -> 0.05-0.1 s).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Hashable, Iterator, Mapping, Sequence
from typing import Any, cast

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    AsDiscreted,
    Compose,
    CropForeground,
    CropForegroundd,
    Invertd,
    InvertibleTransform,
    MapTransform,
    Orientation,
    Orientationd,
    Zoom,
)
from monai.transforms.inverse import TraceableTransform
from monai.transforms.utils import compute_divisible_spatial_size, is_positive
from monai.utils import LazyAttr, TraceKeys, ensure_tuple, ensure_tuple_rep
from scipy import ndimage

logger = logging.getLogger(__name__)


class ZoomSpacingd(MapTransform, InvertibleTransform):
    """Resample ``keys`` to ``pixdim`` (mm) by interpolation; invertible."""

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float], mode: str = "trilinear",
                 allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        self.pixdim = np.asarray(pixdim, dtype=np.float64)
        # One Zoom instance, so that the inverse finds the operation it recorded.
        self.zoomer = Zoom(zoom=1.0, mode=mode, keep_size=False, align_corners=True)

    def _zoom_for(self, img: Any) -> tuple[float, ...]:
        affine = np.asarray(img.affine if isinstance(img, MetaTensor) else np.eye(4), dtype=np.float64)
        current = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
        return tuple(float(c) for c in current / self.pixdim)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            source = d[key]
            self.zoomer.zoom = self._zoom_for(source)
            d[key] = _with_corner_affine(self.zoomer(source), source)
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            zoomed = d[key]
            d[key] = _with_corner_affine(self.zoomer.inverse(zoomed), zoomed)
        return d


def _with_corner_affine(out: Any, source: Any) -> Any:
    """Set the affine of a corner-aligned resize of ``source`` (MONAI's Zoom records the
    centre-aligned one): voxel i of ``out`` sits at i * (N - 1) / (M - 1) of ``source``."""
    if not isinstance(out, MetaTensor) or not isinstance(source, MetaTensor):
        return out
    n = np.asarray(source.shape[1:], dtype=np.float64)
    m = np.asarray(out.shape[1:], dtype=np.float64)
    scale = np.where(m > 1, (n - 1) / np.maximum(m - 1, 1), 1.0)
    affine = np.asarray(source.affine, dtype=np.float64) @ np.diag([*scale, 1.0])
    out.affine = torch.as_tensor(affine, dtype=torch.float64)
    return out


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


class ScanCropForeground(CropForeground):
    """``CropForeground`` whose bounding box is found by scanning planes inwards from
    each face (first along X, then Y within the X range, then Z within both) instead of
    evaluating ``select_fn`` on the whole image: the work is about the voxels that are
    cropped away, and no full-size mask is allocated. ``select_fn`` must be elementwise
    (such as ``lambda x: x > -500``); the box, margins and recorded operation are then
    exactly ``CropForeground``'s, so ``Invertd`` inverts it the same way."""

    def compute_bounding_box(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        data = img[list(ensure_tuple(self.channel_indices))] if self.channel_indices is not None else img
        return self.box_from_extent(_foreground_extent(data, self.select_fn), tuple(data.shape[1:]))

    def box_from_extent(self, extent: list[tuple[int, int]] | None,
                        shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        """The crop box for the foreground ``extent`` (first, last index per spatial axis;
        None when there is no foreground), with MONAI's margin, clipping and divisibility."""
        ndim = len(shape)
        margin = ensure_tuple_rep(self.margin, ndim)
        if any(m < 0 for m in margin):
            raise ValueError(f"margin value should not be negative number, got {margin}.")
        if extent is None:
            start, end = [0] * ndim, [0] * ndim
        else:
            start = [lo - m for (lo, _), m in zip(extent, margin)]
            end = [hi + m + 1 for (_, hi), m in zip(extent, margin)]
            if self.allow_smaller:
                start = [max(s, 0) for s in start]
                end = [min(e, n) for e, n in zip(end, shape)]
        box_start = np.asarray(start, dtype=np.int16)
        box_end = np.asarray(end, dtype=np.int16)
        size = box_end - box_start
        divisible = np.asarray(compute_divisible_spatial_size(size.tolist(), k=self.k_divisible))
        box_start = box_start - np.floor_divide(divisible - size, 2)
        return box_start, box_start + divisible


class ScanCropForegroundd(CropForegroundd):
    """``CropForegroundd`` with :class:`ScanCropForeground` as its cropper."""

    def __init__(self, keys: KeysCollection, source_key: str, select_fn: Any = is_positive,
                 channel_indices: Any = None, margin: Sequence[int] | int = 0, allow_smaller: bool = False,
                 k_divisible: Sequence[int] | int = 1, **kwargs: Any) -> None:
        super().__init__(keys, source_key, select_fn=select_fn, channel_indices=channel_indices, margin=margin,
                         allow_smaller=allow_smaller, k_divisible=k_divisible, **kwargs)
        pad = {k: v for k, v in kwargs.items() if k not in ("mode", "start_coord_key", "end_coord_key",
                                                            "allow_missing_keys", "lazy")}
        self.cropper = ScanCropForeground(select_fn=select_fn, channel_indices=channel_indices, margin=margin,
                                          allow_smaller=allow_smaller, k_divisible=k_divisible,
                                          lazy=kwargs.get("lazy", False), **pad)


def _foreground_extent(data: torch.Tensor, select_fn: Any) -> list[tuple[int, int]] | None:
    """First and last index along each spatial axis of ``data`` (C, ...) holding a
    voxel where ``select_fn`` is true, or None when there is none. Axes are scanned
    outermost in memory first; each later axis only within the range found before."""
    if isinstance(data, MetaTensor):
        data = data.as_tensor()  # plain tensors: no metadata handling per plane
    box = [slice(None)] * data.ndim
    found: dict[int, tuple[int, int]] = {}
    strides = data.stride()
    order = sorted(range(1, data.ndim), key=lambda a: (-strides[a], a))
    with _one_thread():
        for axis in order:
            region = data[tuple(box)]
            n = region.shape[axis]
            first = next((i for i in range(n) if _plane_hit(region, axis, i, select_fn)), None)
            if first is None:
                return None
            last = next(i for i in range(n - 1, first - 1, -1)
                        if i == first or _plane_hit(region, axis, i, select_fn))
            found[axis] = (first, last)
            box[axis] = slice(first, last + 1)
    return [found[axis] for axis in range(1, data.ndim)]


def _plane_hit(region: torch.Tensor, axis: int, index: int, select_fn: Any) -> bool:
    """Whether ``select_fn`` holds anywhere on plane ``index`` of ``region`` along ``axis``."""
    return bool(torch.as_tensor(select_fn(region.select(axis, index))).any())


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """One torch CPU thread for many small operations: the thread pool's start and
    join per plane cost more than the work (0.05 s on one thread, 0.2-0.3 s on two for
    the planes around a chest CT, and far more when the cores are busy)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class ScaleIntensityRangeFusedd(MapTransform):
    """``ScaleIntensityRanged`` (float images, ``b_min``/``b_max`` given) computed into
    one new tensor with in-place steps, instead of one temporary per arithmetic step.
    The steps and their order are MONAI's, so the values are identical."""

    def __init__(self, keys: KeysCollection, a_min: float, a_max: float, b_min: float, b_max: float,
                 clip: bool = False, allow_missing_keys: bool = False) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if a_max == a_min:
            raise ValueError("a_min and a_max must differ")
        self.a_min, self.a_max, self.b_min, self.b_max, self.clip = a_min, a_max, b_min, b_max, clip

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            img = d[key]
            if not torch.is_floating_point(torch.as_tensor(img)):
                raise TypeError("ScaleIntensityRangeFusedd expects a floating point image")
            out = torch.sub(img, self.a_min)
            out.div_(self.a_max - self.a_min).mul_(self.b_max - self.b_min).add_(self.b_min)
            if self.clip:
                out.clamp_(self.b_min, self.b_max)
            d[key] = out
        return d


class OrientCopy(Orientation):
    """``Orientation`` that always returns a new C-ordered (channel, X, Y, Z) tensor,
    copied slice by slice from the input in any memory layout, with the flips and axis
    swaps folded into that one copy.

    The node's volume is a transposed view of a slice-ordered buffer. MONAI's
    ``Orientation`` flips it into a new buffer of the same layout, which the MONAI
    bundle plugin had first copied into C order (crops and resampling are several
    times slower on the transposed layout): two full-size copies, both alive at once
    with the volume. This makes one. The affine, metadata and recorded operation are
    those ``Orientation`` gives (its own computation, run lazily, supplies them), so
    ``Invertd`` inverts it like ``Orientation``. The input is never modified.
    """

    copies_input = True  # the MONAI bundle plugin then hands it the volume without a copy

    def __call__(self, data_array: torch.Tensor, lazy: bool | None = None) -> torch.Tensor:
        if lazy or not isinstance(data_array, MetaTensor) or data_array.pending_operations:
            return _fresh_copy(super().__call__(data_array, lazy=lazy))
        meta, xform = self.plan(data_array)
        out = MetaTensor(_reoriented_copy(data_array.as_tensor().detach(), xform))
        return out.copy_meta_from(meta)

    def plan(self, data_array: MetaTensor) -> tuple[Any, np.ndarray]:
        """The metadata ``Orientation`` gives (affine, recorded operation) and the
        voxel transform (output index -> input index), without touching the data."""
        planned = cast(MetaTensor, super().__call__(data_array, lazy=True))
        op = planned.pending_operations[-1]
        xform = np.asarray(op[LazyAttr.AFFINE], dtype=np.float64)
        meta = TraceableTransform.track_transform_meta(
            data_array, sp_size=np.asarray(op[LazyAttr.SHAPE]), affine=xform,
            extra_info=dict(op[TraceKeys.EXTRA_INFO]), orig_size=op[TraceKeys.ORIG_SIZE],
            transform_info=self.get_transform_info(), lazy=False,
        )
        return meta, xform


class OrientCopyd(Orientationd):
    """``Orientationd`` with :class:`OrientCopy`: one C-ordered copy, flips included."""

    copies_input = True

    def __init__(self, keys: KeysCollection, axcodes: str | None = None, as_closest_canonical: bool = False,
                 labels: Sequence[tuple[str, str]] | None = None, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, axcodes=axcodes, as_closest_canonical=as_closest_canonical, labels=labels,
                         allow_missing_keys=allow_missing_keys)
        self.ornt_transform = OrientCopy(axcodes=axcodes, as_closest_canonical=as_closest_canonical, labels=labels)


def _reoriented_copy(source: torch.Tensor, xform: np.ndarray,
                     box: tuple[slice, ...] | None = None) -> torch.Tensor:
    """C-ordered copy of ``source`` (C, X, Y, Z) resampled by the signed axis
    permutation ``xform`` (output voxel -> input voxel), or of its ``box``, copied one output slice along
    the last axis at a time (torch's allocator, not numpy's, which asks for transparent
    huge pages: their first touch in this strided order was slower)."""
    spatial = source.ndim - 1
    lin = np.round(xform[:spatial, :spatial]).astype(int)
    axes = [int(np.flatnonzero(lin[:, k])[0]) for k in range(spatial)]  # input axis per output axis
    view = source.numpy() if source.device.type == "cpu" else source.cpu().numpy()
    view = view.transpose([0, *(a + 1 for a in axes)])
    flips = [k + 1 for k in range(spatial) if lin[axes[k], k] < 0]
    if flips:
        view = np.flip(view, axis=tuple(flips))
    if box is not None:  # spatial slices in output (reoriented) coordinates
        view = view[(slice(None), *box)]
    copy = torch.empty(view.shape, dtype=source.dtype)
    out = copy.numpy()
    for z in range(view.shape[-1]):
        out[..., z] = view[..., z]
    return copy


def _fresh_copy(img: Any) -> Any:
    """A C-ordered copy of ``img`` (metadata kept): ``Orientation`` returns its input's
    memory when there is nothing to flip or swap, or when it runs lazily, and callers
    rely on :class:`OrientCopy` never sharing it."""
    if not isinstance(img, torch.Tensor):
        return img
    return img.clone(memory_format=torch.contiguous_format)


class OrientCropForegroundd(MapTransform, InvertibleTransform):
    """:class:`OrientCopyd` then :class:`ScanCropForegroundd` (``source_key`` being the
    one key), in one copy of just the cropped region.

    The foreground box is found on the input in its own layout (the extent of the
    foreground does not depend on the orientation, only its axis labels), then only
    the box is copied, reoriented, into C order: about half of a chest CT's voxels,
    and no full-size reoriented copy. Metadata and recorded operations are those of
    the two transforms (MONAI computes them on a stand-in that holds no data), so
    ``Invertd`` undoes both. When the box would need padding (``allow_smaller=False``
    with a margin beyond the image), or the input is not a MetaTensor, the two
    transforms run one after the other instead.
    """

    copies_input = True

    def __init__(self, keys: KeysCollection, axcodes: str, select_fn: Any = is_positive, margin: Sequence[int] | int = 0,
                 allow_smaller: bool = False, k_divisible: Sequence[int] | int = 1,
                 labels: Sequence[tuple[str, str]] | None = None,
                 start_coord_key: str | None = "foreground_start_coord",
                 end_coord_key: str | None = "foreground_end_coord") -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 1:
            raise ValueError("OrientCropForegroundd takes one key (the image it crops to its own foreground)")
        self.key = self.keys[0]
        self.orient = OrientCopyd(keys, axcodes=axcodes, labels=labels)
        self.crop = ScanCropForegroundd(keys, cast(str, self.key), select_fn=select_fn, margin=margin,
                                        allow_smaller=allow_smaller, k_divisible=k_divisible,
                                        start_coord_key=start_coord_key, end_coord_key=end_coord_key)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = d[self.key]
        if not isinstance(image, MetaTensor) or image.pending_operations or image.ndim != 4:
            return self.crop(self.orient(d))
        orienter: OrientCopy = self.orient.ornt_transform  # type: ignore[assignment]
        cropper: ScanCropForeground = self.crop.cropper  # type: ignore[assignment]
        meta, xform = orienter.plan(image)
        lin = np.round(xform[:3, :3]).astype(int)
        axes = [int(np.flatnonzero(lin[:, k])[0]) for k in range(3)]
        shape = tuple(int(image.shape[1 + a]) for a in axes)
        source = image[list(ensure_tuple(cropper.channel_indices))] if cropper.channel_indices is not None else image
        extent = _foreground_extent(source, cropper.select_fn)
        if extent is not None:
            extent = [_mapped(extent[a], n, lin[a, k] < 0) for k, (a, n) in enumerate(zip(axes, shape))]
        box_start, box_end = cropper.box_from_extent(extent, shape)
        if np.any(box_start < 0) or np.any(box_end > np.asarray(shape)):
            return self.crop(self.orient(d))
        stand_in = MetaTensor(torch.empty(1, dtype=image.dtype).expand(image.shape[0], *shape))
        stand_in.copy_meta_from(meta)
        cropped = cropper.crop_pad(stand_in, box_start, box_end)
        box = tuple(slice(int(a), int(b)) for a, b in zip(box_start, box_end))
        out = MetaTensor(_reoriented_copy(image.as_tensor().detach(), xform, box))
        d[self.key] = out.copy_meta_from(cropped)
        coords: dict[Hashable, Any] = d
        if self.crop.start_coord_key is not None:
            coords[self.crop.start_coord_key] = box_start
        if self.crop.end_coord_key is not None:
            coords[self.crop.end_coord_key] = box_end
        return d

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        return self.orient.inverse(self.crop.inverse(cast(Mapping[Hashable, MetaTensor], data)))


def _mapped(extent: tuple[int, int], n: int, flipped: bool) -> tuple[int, int]:
    """An index range along an axis of ``n`` voxels, after an optional flip."""
    first, last = extent
    return (n - 1 - last, n - 1 - first) if flipped else (first, last)
