"""Postprocessing specific to the lung-nodule bundle.

The bundle uses ``ClassifyCandidatesd`` (the second detector, below), which applies the
lung gate and tube filter of ``KeepInLungsd`` itself; ``KeepInLungsd`` stays usable on
its own. ``KeepInLungsd`` drops predicted components that lie mostly outside the lungs. It
works at the network's working resolution, before ``Invertd``, on the preprocessed
image (intensities scaled from [-1000, 400] HU to [0, 1]): the lungs are the air
(below -500 HU) not connected to the outside of the body, with holes filled slice by
slice (so nodules inside the lung count as lung) and dilated a little (so nodules on
the pleura do too). A predicted component is kept when at least ``min_inside`` of its
voxels are in that region. It removes false positives in soft tissue far from the
lungs (abdomen, mediastinum, chest wall) and never moves or reshapes a kept finding.
"""

from __future__ import annotations

import time
from collections.abc import Hashable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.transforms import MapTransform
from scipy import ndimage

from models.lung_nodules.candidates import (
    MIRRORS,
    PATCH,
    Candidates,
    find_candidates,
    load_classifier,
    module_device,
    patches,
    quantised,
    score,
    screened_score,
)
from plugin import components as connected
from plugin.finding_scores import SCORES_KEY
from plugin.lesion_measure import BACKGROUND_RING_MM, core_reach_mm, is_subsolid, stands_out

AIR_SCALED = (-500.0 + 1000.0) / 1400.0  # -500 HU after ScaleIntensityRanged [-1000, 400] -> [0, 1]
SOFT_SCALED = (-300.0 + 1000.0) / 1400.0  # -300 HU: soft tissue, above lung and its partial volume


def lung_region(image: np.ndarray, dilate_voxels: int = 4, min_voxels: int = 20000,
                step: int = 2) -> np.ndarray:
    """Boolean mask of the lungs on every ``step``-th voxel of ``image`` (X, Y, Z): air
    not connected to the border, holes filled per axial slice, dilated by about
    ``dilate_voxels`` voxels of ``image``. Voxel ``(i, j, k)`` of ``image`` is lung when
    ``mask[i // step, j // step, k // step]`` is (a gate, so half resolution is plenty:
    0.1 s instead of 0.6 s for a chest at the working resolution)."""
    small = image[::step, ::step, ::step]
    labels, _ = ndimage.label(small < AIR_SCALED)
    border = np.unique(np.concatenate([labels[0].ravel(), labels[-1].ravel(), labels[:, 0].ravel(),
                                       labels[:, -1].ravel()]))
    keep = np.bincount(labels.ravel()) >= min_voxels / step ** 3
    keep[border] = False
    keep[0] = False
    lungs = fill_holes_per_slice(keep[labels])
    iterations = -(-dilate_voxels // step)
    if iterations:
        lungs = ndimage.binary_dilation(lungs, iterations=iterations)
    return lungs


_IN_PLANE = np.zeros((3, 3, 3), dtype=bool)
_IN_PLANE[:, :, 1] = ndimage.generate_binary_structure(2, 1)


def fill_holes_per_slice(mask: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.binary_fill_holes`` of every axial slice (Z) of ``mask`` (X, Y, Z),
    all slices in one labelling (three times faster than slice by slice): a slice's
    background pixels 4-connected to its edge stay background, the others are holes."""
    mask = np.asarray(mask, dtype=bool)
    background, count = ndimage.label(~mask, structure=_IN_PLANE)
    edge = np.concatenate([background[0].ravel(), background[-1].ravel(), background[:, 0].ravel(),
                           background[:, -1].ravel()])
    outside = np.zeros(count + 1, dtype=bool)
    outside[edge] = True
    outside[0] = True  # the mask itself
    filled: np.ndarray = mask | ~outside[background]
    return filled


def elongation(where: tuple[np.ndarray, ...], ids: np.ndarray, count: int,
               spacing: np.ndarray) -> np.ndarray:
    """Per component (index 1..count): sqrt of the largest over the middle eigenvalue
    of its voxels' covariance in mm (each voxel counted as a box, so one voxel is not
    degenerate). About 1 for a ball or a flat disc, large for a tube."""
    n = np.maximum(np.bincount(ids, minlength=count + 1), 1).astype(np.float64)
    coords = [axis.astype(np.float64) * mm for axis, mm in zip(where, spacing)]
    mean = [np.bincount(ids, weights=c, minlength=count + 1) / n for c in coords]
    cov = np.zeros((count + 1, 3, 3))
    for a in range(3):
        for b in range(a, 3):
            m = np.bincount(ids, weights=coords[a] * coords[b], minlength=count + 1) / n
            cov[:, a, b] = cov[:, b, a] = m - mean[a] * mean[b]
    cov += np.diag(spacing ** 2 / 12.0)
    eig = np.linalg.eigvalsh(cov)  # ascending
    return np.sqrt(eig[:, 2] / np.maximum(eig[:, 1], 1e-9))


def outside_or_tubular(components: np.ndarray, count: int, region: np.ndarray, step: int,
                       spacing: np.ndarray, min_inside: float | np.ndarray,
                       max_elongation: float | np.ndarray | None,
                       where: tuple[np.ndarray, ...] | None = None) -> np.ndarray:
    """Per component label (0..count): True where less than ``min_inside`` (one value,
    or one per label) of it lies in the lung ``region`` (gated every ``step`` voxels)
    or, with ``max_elongation`` (one value, or one per label), where it is a tube
    (:func:`elongation`). ``where``: ``np.nonzero(components)``, when the caller has it."""
    where = np.nonzero(components) if where is None else where
    ids = components[where]
    in_lung = region[tuple(axis // step for axis in where)]
    total = np.bincount(ids, minlength=count + 1)
    inside = np.bincount(ids[in_lung], minlength=count + 1)
    drop: np.ndarray = inside < min_inside * total
    if max_elongation is not None:
        drop |= elongation(where, ids, count, spacing) > max_elongation
    drop[0] = False
    return drop


def domes(components: np.ndarray, count: int, image: np.ndarray, spacing: np.ndarray,
          candidates: np.ndarray, max_flatness: float = 0.35, below_mm: float = 10.0,
          min_soft_below: float = 0.8, boxes: list[tuple[slice, ...]] | None = None) -> np.ndarray:
    """Per component label (0..count): True for a component of ``candidates`` (a mask of
    labels) that is the top of the abdomen seen through the lung bases, not a mass: a
    flat slab (its height under ``max_flatness`` times its smaller in-plane width) with
    soft tissue ``below_mm`` under its lowest slice over ``min_soft_below`` of its
    footprint. Where the lung base wraps around the liver or spleen, their top is a
    round soft-tissue island on an axial slice, a mass to a network that was shown
    masses; the network marks the first few millimetres of it, a wide thin cap on the
    abdomen. A mass is a lump in 3D, however flattened against the wall. A flat slab
    whose lowest slice lies within ``below_mm`` of the scan's lowest one counts as a cap
    too: nothing below it can be seen, and on validation chests every such slab (six, on
    three of twenty scans with a mass) was the abdomen's top, where a scan ends at the
    lung bases. Slices holding under 5 % of the largest section do not count. ``image`` is (X, Y, Z) in RAS order
    (Z up), scaled as the bundle scales it. ``boxes``: the components' bounding boxes,
    when the caller has them (:class:`plugin.components.Components`)."""
    out = np.zeros(count + 1, dtype=bool)
    boxes = ndimage.find_objects(components, max_label=count) if boxes is None else boxes
    for index in np.flatnonzero(candidates[1:]) + 1:
        box = boxes[index - 1]
        if box is None:
            continue
        mask = components[box] == index
        areas = mask.sum(axis=(0, 1))
        solid = np.flatnonzero(areas >= 0.05 * areas.max())
        height = (solid[-1] - solid[0] + 1) * spacing[2]
        width = min((np.ptp(np.flatnonzero(mask.any(axis=(1, 2)))) + 1) * spacing[0],
                    (np.ptp(np.flatnonzero(mask.any(axis=(0, 2)))) + 1) * spacing[1])
        if height >= max_flatness * width:
            continue
        below = box[2].start + int(solid[0]) - max(int(round(below_mm / spacing[2])), 1)
        if below < 0:  # the scan ends under it: nothing to look at, a cap at the scan's end
            out[index] = True
            continue
        footprint = mask[:, :, solid[0]]
        out[index] = float(np.mean(image[box[0], box[1], below][footprint] > SOFT_SCALED)) >= min_soft_below
    return out


def _piece_maxima(prob: np.ndarray, found: connected.Components,
                  ) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, np.ndarray]]]:
    """Per component 1..count its highest ``prob`` and that voxel, and ``(component index
    0..count-1, voxel)`` for the most probable voxel of each piece of each component on
    every axial slice (Z) it covers. A component can become several findings on the
    source grid (thick slices part it, the pleural cut trims it), and a score needs a
    point inside each of them. Taken in each component's box: SciPy's labelled maximum
    over the whole volume sorts it (6 s on a chest)."""
    highest = np.full(found.count, -np.inf)
    best = [np.zeros(3) for _ in range(found.count)]
    pieces_out: list[tuple[int, np.ndarray]] = []
    for index, box in enumerate(found.boxes):
        mask = found.labels[box] == index + 1
        values = prob[box]
        for z in range(mask.shape[2]):
            pieces, n = ndimage.label(mask[:, :, z])
            for x, y in ndimage.maximum_position(values[:, :, z], pieces, np.arange(1, n + 1)) if n else ():
                point = np.array([box[0].start + x, box[1].start + y, box[2].start + z], dtype=np.float64)
                pieces_out.append((index, point))
                if values[x, y, z] > highest[index]:
                    highest[index], best[index] = float(values[x, y, z]), point
    return highest, best, pieces_out


class KeepInLungsd(MapTransform):
    """Zero the predicted components of ``keys`` that lie mostly outside the lungs or,
    when ``max_elongation`` is set, that are tubes rather than blobs (see
    :func:`elongation`): vessel segments, which the network confuses with nodules on
    thick-slice scans. Kept components are never changed."""

    def __init__(self, keys: KeysCollection, image_key: str = "image", min_inside: float = 0.3,
                 threshold: float = 0.5, step: int = 2, max_elongation: float | None = None,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.step = step
        self.max_elongation = max_elongation
        self.image_key = image_key
        self.min_inside = min_inside
        self.threshold = threshold

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        image = np.asarray(torch.as_tensor(d[self.image_key]).detach().cpu()[0], dtype=np.float32)
        region = lung_region(image, step=self.step)
        for key in self.key_iterator(d):
            pred = d[key]
            array = torch.as_tensor(pred).detach().cpu()[0].numpy()
            found = connected.label(array > self.threshold)
            if found.count == 0:
                continue
            drop = outside_or_tubular(found.labels, found.count, region, self.step, _spacing(pred),
                                      self.min_inside, self.max_elongation, found.where)
            if drop.any():
                d[key] = _as_pred(np.where(drop[found.labels], 0, array).astype(array.dtype), pred)
        return d


class _Clock:
    """Wall-clock laps (seconds) of a transform's steps, summed by name."""

    def __init__(self) -> None:
        self.laps: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = self.laps.get(name, 0.0) + now - self._last
        self._last = now


def _spacing(pred: torch.Tensor) -> np.ndarray:
    return np.asarray(affine_to_spacing(np.asarray(getattr(pred, "affine", np.eye(4)), dtype=np.float64), r=3))


def _as_pred(array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
    data = torch.from_numpy(array)[None].to(like.dtype)
    if isinstance(like, MetaTensor):
        return MetaTensor(data, meta=like.meta, applied_operations=like.applied_operations)
    return data


def subsolid_components(prob: np.ndarray, image: np.ndarray, spacing: np.ndarray,
                        threshold: float = 0.5, source_spacing: np.ndarray | None = None) -> np.ndarray:
    """The components of ``prob`` (X, Y, Z, above ``threshold``) that measure subsolid
    on ``image`` (scaled as the bundle scales it): a core of which a fifth or more lies
    below -300 HU (:func:`plugin.lesion_measure.is_subsolid`, the convention the report
    uses), the core being as deep as on the ``source_spacing`` grid the report measures
    on (so on 5 mm slices a component needs three slices' depth). The subsolid network
    marks ground glass and part-solid nodules whole, but on 3-5 mm slices it also marks
    vessel segments one to four slices thick, diluted to -270..+20 HU by partial volume
    (validation chests, stage 7): solid, or without a core, to this test. A component
    must also stand out from the lung 2-4 mm around it by the contrast the report needs
    to find its edge (:func:`plugin.lesion_measure.stands_out`): a stretch of dense lung
    (-770 HU) is "subsolid" by its core alone. Boolean mask."""
    out = np.zeros(prob.shape, dtype=bool)
    found = connected.label(prob > threshold)
    mm = (float(spacing[0]), float(spacing[1]), float(spacing[2]))
    source = mm if source_spacing is None else (float(source_spacing[0]), float(source_spacing[1]),
                                                 float(source_spacing[2]))
    reach = core_reach_mm(source)
    reach_out = [int(np.ceil(BACKGROUND_RING_MM[1] / s)) + 1 for s in mm]
    for index, box in enumerate(found.boxes, start=1):
        grown = tuple(slice(max(0, b.start - m), min(n, b.stop + m)) for b, m, n in zip(box, reach_out, prob.shape))
        mask = found.labels[grown] == index
        hu = image[grown].astype(np.float32) * 1400.0 - 1000.0
        if is_subsolid(hu, mask, mm, reach) and stands_out(hu, mask, mm):
            out[grown] |= mask
    return out


def source_spacing(tensor: Any) -> np.ndarray | None:
    """The voxel size (mm) of the grid ``tensor`` was loaded on, before the bundle's
    crop and resampling (the first recorded operation's original affine), in the
    working grid's axis order (RAS, as the bundle orients); None when not recorded."""
    ops = getattr(tensor, "applied_operations", None)
    if not ops:
        return None
    affine = ops[0].get("extra_info", {}).get("original_affine")
    if affine is None:
        return None
    source = np.asarray(affine, dtype=np.float64)[:3, :3]
    working = np.asarray(tensor.affine, dtype=np.float64)[:3, :3]
    # each working axis runs along one source axis (orientation permutes, never rotates)
    order = np.argmax(np.abs(np.linalg.solve(source, working)), axis=0)
    sizes: np.ndarray = np.sqrt((source ** 2).sum(axis=0))[order]
    return sizes


class MassChanneld(MapTransform):
    """Merge the channels of :class:`models.lung_nodules.networks.NoduleAndMassNet`
    (probabilities, after the sigmoid) into one: the nodule channel, plus the components
    of the mass channel wider in-plane than the candidate classifier's patch along both
    axes (32 mm: what :class:`ClassifyCandidatesd` treats as a mass), plus, with a third
    channel, the subsolid channel's components that measure subsolid on the image
    (:func:`subsolid_components`). Where a subsolid component overlaps the nodule
    channel (a part-solid nodule's solid core) the finding is their union: the whole
    nodule. The mass channel's smaller components and the subsolid channel's solid ones
    are dropped: there the nodule network, trained longer on solid nodules, decides. A
    one-channel prediction passes unchanged."""

    def __init__(self, keys: KeysCollection, threshold: float = 0.5, image_key: str = "image",
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.threshold = threshold
        self.image_key = image_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """The merged (1, X, Y, Z) prediction under each key."""
        d = dict(data)
        for key in self.key_iterator(d):
            pred = d[key]
            if pred.shape[0] == 1:
                continue
            prob = torch.as_tensor(pred).detach().cpu().numpy()
            found = connected.label(prob[1] > self.threshold)
            wide = ClassifyCandidatesd.wider_than_a_patch(found.labels, found.count, found.boxes)
            merged = prob[0].copy()
            if wide[1:].any():
                chosen = wide[found.ids]
                masses = tuple(axis[chosen] for axis in found.where)
                merged[masses] = np.maximum(merged[masses], prob[1][masses])
            if prob.shape[0] > 2:
                image = np.asarray(torch.as_tensor(d[self.image_key]).detach().cpu()[0], dtype=np.float32)
                subsolid = subsolid_components(prob[2], image, _spacing(pred), self.threshold,
                                               source_spacing(d[self.image_key]))
                merged[subsolid] = np.maximum(merged[subsolid], prob[2][subsolid])
            d[key] = _as_pred(merged, pred)
        return d


class ClassifyCandidatesd(MapTransform):
    """The second detector (see :mod:`models.lung_nodules.candidates`). With
    ``min_inside`` set it first does what :class:`KeepInLungsd` does (on the same lung
    region and components, so the bundle needs only this transform). Then it scores
    every nodule candidate with the candidate classifier and

    * drops a predicted component of ``keys`` whose candidates all score below ``veto``
      (the classifier does not confirm it: mostly vessel segments on thick slices);
      components with no candidate at all (thinner than 5 mm) are left alone;
    * adds the outline (:meth:`Candidates.outline`, probability 1) of each candidate
      scoring at least ``accept``: the nodules that the segmentation network misses or
      only marks with a speck. Where the network marks the nodule too, the finding is
      the union of both (on validation phantoms that outlined nodules better than either).

    A component wider in-plane than the classifier's patch (32 mm along both axes: a
    mass) is never vetoed, the classifier having never seen one whole, and the lung gate
    asks only ``mass_min_inside`` of it to lie in the lungs: a mass against the chest
    wall or the mediastinum is not a hole in the lungs, so most of it lies outside the
    lung region (a 66 mm phantom mass at the pleura: 26 % inside). Its tube limit is
    ``mass_max_elongation`` (2.5) instead of ``max_elongation`` (2.0, set for vessel
    segments): a lobulated mass can be twice as long as it is wide (a held-out 76 mm mass
    at the chest wall, elongation 2.1, vanished under 2.0), while the mass network's
    wide false components on validation chests that the other rules keep are
    branching vessel stretches of elongation 3.0-7.2.

    A score is the mean over the patch and its mirror images (``mirrored``, see
    :func:`candidates.score`). The defaults are the bundle's settings. Runs at the
    working resolution, on the preprocessed image, before the inversion."""

    def __init__(self, keys: KeysCollection, weights: str | Path, image_key: str = "image",
                 accept: float = 0.7, veto: float = 0.5, mirrored: bool = True,
                 min_inside: float | None = None, max_elongation: float | None = None,
                 threshold: float = 0.5, step: int = 2, mass_min_inside: float = 0.2,
                 mass_max_elongation: float = 2.5,
                 allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.net = load_classifier(weights)
        self.mass_min_inside = mass_min_inside
        self.mass_max_elongation = mass_max_elongation
        self.image_key = image_key
        self.accept, self.veto, self.mirrored = accept, veto, mirrored
        self.min_inside, self.max_elongation = min_inside, max_elongation
        self.threshold, self.step = threshold, step
        self.profile: dict[str, float] = {}  # the last call's step times (s), candidates and views scored

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        """The merged prediction under each key, and under ``finding_scores`` the score
        of each finding with a point inside it (see :meth:`finding_scores`). What it cost
        is left in :attr:`profile`."""
        d = dict(data)
        clock = _Clock()
        tensor = torch.as_tensor(d[self.image_key]).detach()
        image = np.asarray(tensor.cpu()[0], dtype=np.float32)
        spacing = _spacing(d[self.image_key])
        region = lung_region(image, step=self.step)
        clock.lap("lung_gate")
        probs = {key: torch.as_tensor(d[key]).detach().cpu()[0].numpy() for key in self.key_iterator(d)}
        cands = find_candidates(image, spacing, region, self.step, device=tensor.device)
        clock.lap("candidates")
        scores, views = self.score_candidates(image, cands, list(probs.values()), tensor.device)
        clock.lap("classifier")
        for key, prob in probs.items():
            pred = d[key]
            merged = self.merge(prob, cands, scores, spacing, region, image)
            d[key] = _as_pred(merged, pred)
            clock.lap("merge")
            if isinstance(pred, MetaTensor):
                affine = np.asarray(pred.affine, dtype=np.float64)
                d[SCORES_KEY] = [(tuple((affine @ np.append(point, 1.0))[:3].tolist()), value)
                                 for point, value in self.finding_scores(prob, merged, cands, scores)]
                clock.lap("finding_scores")
        self.profile = {**clock.laps, "candidates_count": float(cands.count), "views": float(views)}
        return d

    def finding_scores(self, prob: np.ndarray, merged: np.ndarray, cands: Candidates,
                       scores: np.ndarray) -> list[tuple[np.ndarray, float]]:
        """A score per finding of ``merged`` (26-connected components above the
        threshold), with a voxel inside it: the higher of the segmentation network's
        highest probability there (``prob``, before the merge) and the best classifier
        score of a candidate whose core lies in it. The voxel is the network's most
        probable one, or for a finding only a candidate made, that candidate's centre."""
        found = connected.label(merged > self.threshold, structure=np.ones((3, 3, 3), dtype=bool))
        components, count = found.labels, found.count
        if count == 0:
            return []
        network, points, pieces = _piece_maxima(prob, found)
        best = np.full(count + 1, -1.0)
        if cands.count:
            in_box = components[cands.box]
            overlap = (in_box > 0) & (cands.cores > 0)
            np.maximum.at(best, in_box[overlap], scores[cands.cores[overlap] - 1])
            for candidate in np.argsort(scores):  # ascending: the best candidate's centre wins
                centre = cands.centres[candidate]
                label = int(components[tuple(int(c) for c in centre)])
                if label and network[label - 1] <= self.threshold:
                    points[label - 1] = np.asarray(centre, dtype=np.float64)
        values = np.clip(np.maximum(network, best[1:]), 0.0, 1.0)
        scored = [(points[i], float(values[i])) for i in range(count)]
        return scored + [(point, float(values[i])) for i, point in pieces]

    def scored_candidates(self, image: np.ndarray, spacing: np.ndarray, region: np.ndarray,
                          device: torch.device | None = None) -> tuple[Candidates, np.ndarray]:
        """The candidates of ``image`` and the classifier's score of each (every view of
        every candidate); the depth map and the classifier run on ``device`` (the
        image's: the plugin's device), the CPU by default."""
        device = device or torch.device("cpu")
        cands = find_candidates(image, spacing, region, self.step, device=device)
        return cands, self.score_candidates(image, cands, None, device)[0]

    def score_candidates(self, image: np.ndarray, cands: Candidates, probs: list[np.ndarray] | None,
                         device: torch.device) -> tuple[np.ndarray, int]:
        """The classifier's score of each candidate and the views it took. With the
        predictions ``probs``, the mirrored mean is screened (:func:`candidates.screened_score`):
        a candidate whose core touches a predicted component (where the veto and a
        finding's score read it) gets every view; any other matters only if it reaches
        ``accept`` and stops once it cannot. Same merge and finding scores as scoring
        every view; without ``probs`` every view of every candidate is scored."""
        if module_device(self.net) != device:
            self.net.to(device)
        found = patches(quantised(image), cands.centres)
        if not self.mirrored or probs is None:
            return score(self.net, found, mirrored=self.mirrored), len(found) * (len(MIRRORS) if self.mirrored else 1)
        exact = np.zeros(cands.count + 1, dtype=bool)
        for prob in probs:
            exact[cands.cores[(prob[cands.box] > self.threshold) & (cands.cores > 0)]] = True
        return screened_score(self.net, found, self.accept, exact[1:])

    @staticmethod
    def wider_than_a_patch(components: np.ndarray, count: int,
                           boxes: list[tuple[slice, ...]] | None = None) -> np.ndarray:
        """Per component (index 0 unused): wider in-plane, along both axes, than the
        classifier's patch. The classifier sees 32 x 32 mm around a candidate: inside a
        mass it sees only soft tissue, a view it was never taught, so it does not veto
        a component that large (a mass must never vanish because it is too big).
        ``boxes``: the components' bounding boxes, when the caller has them."""
        wide = np.zeros(count + 1, dtype=bool)
        if count == 0:
            return wide
        if boxes is None:
            boxes = ndimage.find_objects(components, max_label=count)
        for index, box in enumerate(boxes, start=1):
            if box is not None:
                wide[index] = (box[0].stop - box[0].start > PATCH[0]) and (box[1].stop - box[1].start > PATCH[1])
        return wide

    def merge(self, prob: np.ndarray, cands: Candidates, scores: np.ndarray,
              spacing: np.ndarray, region: np.ndarray, image: np.ndarray | None = None) -> np.ndarray:
        """``prob`` (X, Y, Z) with dropped components zeroed and accepted candidates added;
        with the ``image`` it was predicted on, wide components that are the abdomen's top
        (:func:`domes`) are dropped too."""
        found = connected.label(prob > self.threshold)
        components, count = found.labels, found.count
        drop = np.zeros(count + 1, dtype=bool)
        wide = self.wider_than_a_patch(components, count, found.boxes)
        if count and self.min_inside is not None:
            needed = np.where(wide, min(self.min_inside, self.mass_min_inside), self.min_inside)
            tube = None if self.max_elongation is None else np.where(
                wide, max(self.max_elongation, self.mass_max_elongation), self.max_elongation)
            drop = outside_or_tubular(components, count, region, self.step, spacing, needed, tube, found.where)
        if cands.count:
            in_box = components[cands.box]
            overlap = (in_box > 0) & (cands.cores > 0)
            best = np.full(count + 1, -1.0)
            np.maximum.at(best, in_box[overlap], scores[cands.cores[overlap] - 1])
            drop |= (best >= 0) & (best < self.veto) & ~wide
            drop[0] = False
        if image is not None and wide.any():
            drop |= domes(components, count, image, spacing, wide & ~drop, boxes=found.boxes)
        out = prob.copy()
        if drop.any():  # zeroed voxel by voxel: a full-size gather and where cost 0.2-0.4 s on a real chest
            gone = drop[found.ids]
            out[tuple(axis[gone] for axis in found.where)] = 0
        for index in np.flatnonzero(scores >= self.accept) + 1:
            box, mask = cands.outline(int(index), spacing)
            out[box][mask] = 1.0
        return out
