"""Nodule candidates and the small CNN that classifies them.

A second, independent detector beside the segmentation network, in the classic CAD
shape (candidate generation, then false-positive reduction):

* **Candidates** are found at the bundle's working resolution on the preprocessed image
  (intensities scaled from [-1000, 400] HU to [0, 1]): soft tissue (above -450 HU)
  inside the lungs, and of that only what is at least ``CORE_RADIUS_MM`` thick (the
  Euclidean distance to the nearest non-soft-tissue voxel). Thin vessels vanish; every
  solid nodule of 5 mm or more keeps a core, and so do thick vessel segments and
  branchings, which is why there are about 150-350 candidates per chest. A core that
  holds several blobs (a nodule on a thick vessel that runs on to the hilum) is split
  into one core per blob (:func:`split_cores`), so that nodule gets a candidate centred
  on itself instead of being a corner of the vessel tree's.
* **The classifier** (:func:`build_classifier`, a MONAI ``Classifier``) looks at a
  32 x 32 x 24 voxel patch (about 32 x 32 x 30 mm) of the scaled image centred on each
  candidate's thickest point and gives the probability that it is a nodule.
* **The outline** of a candidate is its opening: the soft tissue within
  ``CORE_RADIUS_MM`` of its core, which cuts a nodule free from the vessels it touches.

``train_candidates.py`` trains the classifier; ``transforms.ClassifyCandidatesd`` uses
it in the bundle's postprocessing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.networks.nets import Classifier
from scipy import ndimage

from plugin import components as connected

logger = logging.getLogger(__name__)
SOFT_SCALED = (-450.0 + 1000.0) / 1400.0  # -450 HU on the bundle's [-1000, 400] scale
CORE_RADIUS_MM = 2.5
SPLIT_MM = 1.0  # a blob on a core at least this much thicker than where it joins the rest is split off
OUTLINE_REACH = 1.5  # an outline stays within 1.5 x the core's thickness (+1 mm) of its centre
PATCH = (32, 32, 24)  # voxels (X, Y, Z) at the working resolution (1 x 1 x 1.25 mm)
STRUCTURE = np.ones((3, 3, 3), dtype=bool)  # 26-connectivity
CPU_BATCH, GPU_BATCH = 64, 512  # patches per forward pass of the classifier
MIRRORS = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))  # flipped axes of a (N, 1, X, Y, Z) batch


@dataclass
class Candidates:
    """Candidate cores of one image (X, Y, Z), inside the bounding box ``box``."""

    box: tuple[slice, ...]  # (X, Y, Z) where the soft tissue is, in the full image
    soft: np.ndarray  # bool, soft tissue inside the lungs, within ``box``
    cores: np.ndarray  # int32 component labels 1..count of the cores, within ``box``
    count: int
    centres: np.ndarray  # (count, 3) full-image indices of each core's thickest voxel
    thickness_mm: np.ndarray  # (count,) the distance at that voxel
    _boxes: list[tuple[slice, ...]] | None = field(default=None, repr=False)  # of each core, within ``box``

    def outline(self, index: int, spacing: np.ndarray) -> tuple[tuple[slice, ...], np.ndarray]:
        """The opening of candidate ``index`` (1-based): soft tissue within
        ``CORE_RADIUS_MM`` of its core and within ``OUTLINE_REACH`` times its thickness
        (+1 mm) of its centre (so a nodule on a thick vessel or on the chest wall does not
        take them along), as (full-image box, mask in that box)."""
        if self._boxes is None:
            self._boxes = ndimage.find_objects(self.cores)
        core_box = self._boxes[index - 1]
        assert core_box is not None
        margin = [int(np.ceil(CORE_RADIUS_MM / mm)) + 1 for mm in spacing]
        local = tuple(slice(max(s.start - m, 0), min(s.stop + m, n))
                      for s, m, n in zip(core_box, margin, self.cores.shape))
        far = ndimage.distance_transform_edt(self.cores[local] != index, sampling=spacing)
        mask = (far <= CORE_RADIUS_MM) & self.soft[local]
        centre = self.centres[index - 1] - np.array([b.start + s.start for b, s in zip(self.box, local)])
        grids = np.ogrid[tuple(slice(0, s.stop - s.start) for s in local)]
        dist2 = sum(((g - c) * mm) ** 2 for g, c, mm in zip(grids, centre, spacing))
        mask &= dist2 <= (OUTLINE_REACH * self.thickness_mm[index - 1] + 1.0) ** 2
        full = tuple(slice(b.start + s.start, b.start + s.stop) for b, s in zip(self.box, local))
        return full, mask


def find_candidates(image: np.ndarray, spacing: np.ndarray, lungs: np.ndarray,
                    step: int, split: bool = True, device: torch.device | None = None) -> Candidates:
    """Candidate cores in ``image`` (X, Y, Z, scaled to [0, 1]) with voxel ``spacing``
    (mm); ``lungs`` is a lung gate on every ``step``-th voxel
    (:func:`transforms.lung_region`). The depth map is computed on ``device`` where it
    is a CUDA device (:func:`depth_map`)."""
    gate = ndimage.find_objects(lungs.astype(np.uint8))  # soft tissue is looked for only in the lungs' box
    found = None
    if gate:
        near = tuple(slice(s.start * step, min(s.stop * step, n)) for s, n in zip(gate[0], image.shape))
        soft_near = image[near] > SOFT_SCALED
        soft_near &= lungs[np.ix_(*[np.arange(s.start, s.stop) // step for s in near])]
        found = ndimage.find_objects(soft_near.astype(np.uint8))
    if not found:
        empty = np.zeros((0, 0, 0), dtype=bool)
        return Candidates((slice(0, 0),) * 3, empty, empty.astype(np.int32), 0,
                          np.zeros((0, 3), dtype=np.int64), np.zeros(0))
    tight = [slice(s.start + o.start, s.stop + o.start) for s, o in zip(found[0], near)]
    box = tuple(slice(max(s.start - 1, 0), min(s.stop + 1, n)) for s, n in zip(tight, image.shape))
    soft = np.zeros(tuple(s.stop - s.start for s in box), dtype=bool)  # the 1-voxel margin may leave ``near``
    inner = tuple(slice(max(b.start, o.start), min(b.stop, o.stop)) for b, o in zip(box, near))
    soft[tuple(slice(i.start - b.start, i.stop - b.start) for i, b in zip(inner, box))] = \
        soft_near[tuple(slice(i.start - o.start, i.stop - o.start) for i, o in zip(inner, near))]
    padded = np.pad(soft, 1)  # outside the box is not soft tissue
    depth = depth_map(padded, spacing, device)[1:-1, 1:-1, 1:-1]
    found = connected.label(depth >= CORE_RADIUS_MM, structure=STRUCTURE)
    cores, count, boxes = found.labels, found.count, found.boxes
    if split:
        cores, split_count = split_cores(depth, found, spacing)
        if split_count != count:  # the split cores' voxels are the same, their labels and boxes new
            count = split_count
            boxes = connected.boxes_of(cores[found.where], found.where, count)
    centres, thickness = _thickest(cores, depth, count, found.where)
    centres += np.array([s.start for s in box], dtype=np.int64)
    return Candidates(box, soft, cores, count, centres, thickness, boxes)


def depth_map(mask: np.ndarray, spacing: np.ndarray, device: torch.device | None = None) -> np.ndarray:
    """Euclidean distance (mm) from each voxel of ``mask`` to the nearest voxel outside
    it, 0 outside (exact, as SciPy's ``distance_transform_edt``, to float32 rounding).

    On a CUDA ``device`` with CuPy installed: CuPy's exact transform on the GPU (only the
    mask goes there, only the distances come back). Elsewhere the ``edt`` package's
    separable transform on the CPU threads torch may use: on a real chest CT's soft
    tissue (331 x 297 x 192 voxels) 1.8 s -> 0.3 s on 2 cores against SciPy's, which
    computes a full feature transform (three index arrays) first."""
    if device is not None and device.type == "cuda":
        gpu = _cupy_ndimage()
        if gpu is not None:
            cupy, cupy_ndimage = gpu
            try:
                with cupy.cuda.Device(device.index if device.index is not None else 0):
                    found = cupy_ndimage.distance_transform_edt(cupy.asarray(mask),
                                                                sampling=tuple(map(float, spacing)))
                    return np.asarray(cupy.asnumpy(found), dtype=np.float32)
            except Exception as e:  # a CuPy that does not fit this CUDA: the CPU gives the same result
                logger.warning("depth map on the CPU: CuPy failed on %s (%s: %s)", device, type(e).__name__, e)
    import edt

    return np.asarray(edt.edt(np.ascontiguousarray(mask, dtype=bool), anisotropy=tuple(map(float, spacing)),
                              parallel=max(1, torch.get_num_threads())), dtype=np.float32)


def _cupy_ndimage() -> tuple[Any, Any] | None:
    """(cupy, cupyx.scipy.ndimage), or None where CuPy is not installed or unusable."""
    try:
        import cupy
        import cupyx.scipy.ndimage as cupy_ndimage
    except Exception:  # ImportError, or a CuPy built for another CUDA
        return None
    return cupy, cupy_ndimage


def split_cores(depth: np.ndarray, found: connected.Components,
                spacing: np.ndarray) -> tuple[np.ndarray, int]:
    """The cores ``found`` (the components of ``depth >= CORE_RADIUS_MM``) with every core
    that holds more than one blob split into one core per blob; returns (labels, new count).

    A blob is a maximum of ``depth`` (mm) whose dynamic is at least ``SPLIT_MM``: to
    reach a thicker part of its core one must descend at least that far (a nodule on a
    vessel: its radius minus the vessel's). The maxima along a tube differ by less, so
    a vessel tree stays one core. Each voxel of a split core goes to the blob whose
    surface is nearest (:func:`_nearest_blob`); a candidate's centre stays the thickest
    voxel of its share.

    Known flaws, kept because the committed classifier was trained on exactly these
    candidates (see the bundle README, "Limits"): a blob's share can include a stretch
    of vessel thicker than the blob, which then holds its centre; the dynamic is
    measured in steps of ``SPLIT_MM / 4`` from the core's maximum, and the sweep may
    stop up to that step above ``CORE_RADIUS_MM``, so a bump joined by a neck thinner
    than the last level is kept as a blob whatever its dynamic."""
    cores = found.labels
    out = cores.astype(np.int32)
    next_label = found.count
    thick = _thickest(cores, depth, found.count, found.where)[1]
    for label in np.flatnonzero(thick >= CORE_RADIUS_MM + SPLIT_MM) + 1:
        box = found.boxes[label - 1]
        mine = cores[box] == label
        local = np.where(mine, depth[box], 0.0)
        peaks = _blob_peaks(local)
        if len(peaks) < 2:
            continue
        basins = _nearest_blob(mine, peaks, local, spacing)
        region = out[box]
        for n in range(1, len(peaks)):
            next_label += 1
            region[mine & (basins == n)] = next_label
    return out, next_label


def _nearest_blob(mine: np.ndarray, peaks: list[tuple[int, ...]], local: np.ndarray,
                  spacing: np.ndarray) -> np.ndarray:
    """For each voxel of ``mine``, the index into ``peaks`` of the blob whose ball (centre
    the peak, radius its depth) has the nearest surface (an additively weighted Voronoi split)."""
    where = np.nonzero(mine)
    points = np.stack(where, axis=1) * spacing
    gaps = np.stack([np.linalg.norm(points - np.asarray(peak) * spacing, axis=1) - local[peak]
                     for peak in peaks], axis=1)
    out = np.full(mine.shape, -1, dtype=np.int32)
    out[where] = np.argmin(gaps, axis=1)
    for index, peak in enumerate(peaks):
        out[peak] = index  # each blob keeps at least its own maximum
    return out


def _blob_peaks(local: np.ndarray) -> list[tuple[int, ...]]:
    """Positions of the maxima of ``local`` (a core's depth, 0 outside it) whose dynamic
    is at least ``SPLIT_MM``, thickest first; found by lowering a threshold in steps of
    ``SPLIT_MM / 4``: a new component holds a new maximum, and a maximum meeting a
    thicker one at a level less than ``SPLIT_MM`` below its own depth is dropped."""
    positions: list[tuple[int, ...]] = []  # thickest first: found at ever lower levels
    depths: list[float] = []
    settled: list[bool] = []  # has met a thicker maximum
    dropped: list[bool] = []
    for level in np.arange(float(local.max()), CORE_RADIUS_MM - 1e-6, -SPLIT_MM / 4.0):
        labels, n = ndimage.label(local >= level, structure=STRUCTURE)
        owned = np.zeros(n + 1, dtype=bool)
        for index, position in enumerate(positions):
            component = labels[position]
            if not owned[component]:
                owned[component] = True
            elif not settled[index]:
                settled[index] = True
                dropped[index] = depths[index] - level < SPLIT_MM
        fresh = np.flatnonzero(~owned[1:])  # 0-based
        if not len(fresh):
            continue
        tops, values = _thickest(labels, local, n)
        for index in fresh[np.argsort(-values[fresh], kind="stable")]:
            positions.append(tuple(int(i) for i in tops[index]))
            depths.append(float(values[index]))
            settled.append(False)
            dropped.append(False)
    return [position for position, gone in zip(positions, dropped) if not gone]


def _thickest(labels: np.ndarray, values: np.ndarray, count: int,
              where: tuple[np.ndarray, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each label 1..``count`` of ``labels`` (all present): the index (count, 3) of
    its voxel of largest ``values`` (of equals, the first in raster order:
    deterministic) and that value (count,). ``where``: ``np.nonzero(labels)``, when the
    caller has it."""
    where = np.nonzero(labels) if where is None else where
    ids, found = labels[where], values[where]
    order = np.lexsort((-np.arange(len(ids)), found, ids))
    last = order[np.flatnonzero(np.diff(ids[order], append=count + 1))]
    return (np.stack([axis[last] for axis in where], axis=1).astype(np.int64).reshape(-1, 3),
            found[last].astype(np.float64))


def quantised(image: np.ndarray) -> np.ndarray:
    """``image`` (scaled to [0, 1]) as uint8, the classifier's input precision: rounded
    half to even and clipped, in one multi-threaded pass (NumPy's three full-size
    temporaries took 0.6 s on a real chest)."""
    scaled = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).mul(255.0)
    return scaled.round_().clamp_(0, 255).to(torch.uint8).numpy()


def patches(image_u8: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """(N, X, Y, Z) uint8 patches of ``PATCH`` centred on ``centres`` (edges replicated)."""
    half = [p // 2 for p in PATCH]
    lo = centres - np.array(half)
    hi = lo + np.array(PATCH)
    shape = np.array(image_u8.shape)
    pad_lo = np.maximum(-lo.min(axis=0), 0) if len(lo) else np.zeros(3, dtype=np.int64)
    pad_hi = np.maximum(hi.max(axis=0) - shape, 0) if len(hi) else np.zeros(3, dtype=np.int64)
    if pad_lo.any() or pad_hi.any():
        image_u8 = np.pad(image_u8, list(zip(pad_lo, pad_hi)), mode="edge")
    out = np.empty((len(centres), *PATCH), dtype=np.uint8)
    for n, (a, b, c) in enumerate(lo + pad_lo):
        out[n] = image_u8[a:a + PATCH[0], b:b + PATCH[1], c:c + PATCH[2]]
    return out


def build_classifier() -> torch.nn.Module:
    """The candidate classifier: a small MONAI ``Classifier`` (one logit, nodule)."""
    return Classifier(in_shape=(1, *PATCH), classes=1, channels=(8, 16, 32, 32),
                      strides=(2, 2, 2, 2), num_res_units=1, norm="batch")


def load_classifier(weights: str | Path) -> torch.nn.Module:
    """The candidate classifier with the ``state_dict`` at ``weights``, on the CPU, in eval mode."""
    net = build_classifier()
    net.load_state_dict(torch.load(str(weights), map_location="cpu", weights_only=True))
    net.eval()
    return net


def module_device(net: torch.nn.Module) -> torch.device:
    """The device of ``net``'s parameters (the CPU when it has none)."""
    first = next(net.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def score(net: torch.nn.Module, patch_u8: np.ndarray, batch: int | None = None,
          mirrored: bool = True) -> np.ndarray:
    """Nodule probability of each uint8 patch; with ``mirrored``, the mean over the
    patch and its seven mirror images (flipped on every combination of axes, like the
    flips of training), which evens out the classifier's whims on single nodules.
    Runs on the device of ``net``'s parameters (the patches go there as uint8), in
    batches of ``batch`` patches: by default 64 on the CPU (2.3 x faster than 256 on 2
    cores, which spill the caches: 400 candidates of a real chest in 0.55 s instead of
    1.3 s) and 512 on a GPU."""
    views = MIRRORS if mirrored else ((),)
    device = module_device(net)
    batch = batch or (CPU_BATCH if device.type == "cpu" else GPU_BATCH)
    total = torch.zeros(len(patch_u8), dtype=torch.float64, device=device)
    with torch.inference_mode():
        for start in range(0, len(patch_u8), batch):
            x = torch.from_numpy(patch_u8[start:start + batch]).to(device).float().div_(255.0)[:, None]
            for axes in views:
                view = torch.flip(x, dims=axes) if axes else x
                total[start:start + len(x)] += torch.sigmoid(net(view))[:, 0].double()
    return (total / len(views)).cpu().numpy().astype(np.float32)


def screened_score(net: torch.nn.Module, patch_u8: np.ndarray, accept: float, exact: np.ndarray,
                   batch: int | None = None) -> tuple[np.ndarray, int]:
    """:func:`score` with mirrored views where the mean can matter; returns (scores, views
    evaluated). A candidate in ``exact`` (bool per patch) gets all eight views, as does
    one whose mean may still reach ``accept``; every other one stops once the views still
    to come, each at most 1, cannot lift its mean to ``accept`` (at the earliest after
    three views: on a real chest most candidates are vessels that score about 0 on
    every view), and gets the mean of the views it had, which stays below ``accept``.
    The scores that reach ``accept`` or are ``exact`` are :func:`score`'s (same views in
    the same order; batches differ, so to float rounding, as for the batch size)."""
    device = module_device(net)
    batch = batch or (CPU_BATCH if device.type == "cpu" else GPU_BATCH)
    total = np.zeros(len(patch_u8), dtype=np.float64)
    out = np.zeros(len(patch_u8), dtype=np.float32)
    live = np.arange(len(patch_u8))
    runs = 0
    with torch.inference_mode():
        for done, axes in enumerate(MIRRORS, start=1):
            for start in range(0, len(live), batch):
                chunk = live[start:start + batch]
                x = torch.from_numpy(patch_u8[chunk]).to(device).float().div_(255.0)[:, None]
                view = torch.flip(x, dims=axes) if axes else x
                total[chunk] += torch.sigmoid(net(view))[:, 0].double().cpu().numpy()
            runs += len(live)
            hopeless = total[live] + (len(MIRRORS) - done) < accept * len(MIRRORS) - 1e-6
            stop = live[hopeless & ~exact[live]]
            out[stop] = total[stop] / done
            live = np.setdiff1d(live, stop, assume_unique=True)
    out[live] = total[live] / len(MIRRORS)
    return out, runs
