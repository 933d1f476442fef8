"""Boxes of a detection model, mapped from world coordinates onto the source grid.

Conventions
-----------
* Input boxes are what a detection bundle's own postprocessing returns. For the Model
  Zoo's ``lung_nodule_ct_detection`` that is ``cccwhd`` (centre x, y, z, then the
  extents along x, y, z) in **LPS world millimetres**, i.e. DICOM patient coordinates:
  its ``AffineBoxToWorldCoordinated(affine_lps_to_ras=True)`` turns the RAS affine of
  the image (read as ``ITKReader(affine_lps_to_ras=True)`` reads it, which is how the
  node's volume is built) back into LPS before it maps the boxes, so that they match
  LUNA16's world coordinates. A manifest can declare ``RAS`` or ``xyzxyz`` (two corners)
  for other bundles (``detection.box_coordinates``, ``detection.box_mode``).
* A box is axis-aligned in patient space. Its outline on the source image nearest the
  box centre is the box's cross-section through its centre, projected onto that
  image: four corners mapped through the inverse of the volume's LPS affine, in SCOORD
  pixel coordinates ``(column, row)`` (voxel index + 0.5; see :mod:`plugin.measure`).
  An outline reaching beyond the image is clipped at the image edge (never dropped).
* Long and short axis: the box's extents along the image's row and column directions
  (for an axial image, the right-left and anterior-posterior sides), larger first.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

import numpy as np

from plugin.manifest import LabelSpec
from plugin.types import Detection

logger = logging.getLogger(__name__)

BoxMode = Literal["cccwhd", "xyzxyz"]
World = Literal["LPS", "RAS"]
_RAS_LPS = np.array([-1.0, -1.0, 1.0])


def to_lps_cccwhd(boxes: np.ndarray, mode: BoxMode = "cccwhd", world: World = "LPS") -> np.ndarray:
    """Boxes ``(N, 6)`` as centre and extents in LPS millimetres."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    if mode == "xyzxyz":
        low, high = np.minimum(boxes[:, :3], boxes[:, 3:]), np.maximum(boxes[:, :3], boxes[:, 3:])
        boxes = np.hstack([(low + high) / 2, high - low])
    centres, sizes = boxes[:, :3], np.abs(boxes[:, 3:])
    if world == "RAS":
        centres = centres * _RAS_LPS
    return np.hstack([centres, sizes])


def detections_from_boxes(
    boxes: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    lps_affine: np.ndarray,
    shape: tuple[int, int, int],
    label_specs: Mapping[int, LabelSpec],
    *,
    score_threshold: float,
    max_findings: int,
) -> list[Detection]:
    """The findings among ``boxes`` (``(N, 6)`` LPS ``cccwhd``, see :func:`to_lps_cccwhd`):
    score at least ``score_threshold``, a class in ``label_specs``, the ``max_findings``
    best, numbered per class by descending score."""
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    scores = np.asarray(scores, dtype=np.float64).reshape(-1)
    if not len(boxes) == len(labels) == len(scores):
        raise ValueError(f"{len(boxes)} boxes, {len(labels)} labels and {len(scores)} scores")
    unknown = sorted(set(labels.tolist()) - set(label_specs))
    if unknown:
        logger.warning("ignoring boxes of detector classes not in the manifest: %s", unknown)
    usable = np.all(np.isfinite(boxes), axis=1) & np.all(boxes[:, 3:] > 0, axis=1) & np.isfinite(scores)
    if not usable.all():
        logger.warning("ignoring %d box(es) that are not finite or have no size", int((~usable).sum()))
    keep = [i for i in np.argsort(-scores, kind="stable")
            if usable[i] and scores[i] >= score_threshold and int(labels[i]) in label_specs]
    affine = np.asarray(lps_affine, dtype=np.float64)
    numbers: dict[int, int] = {}
    found = []
    for i in keep[:max_findings]:
        label = int(labels[i])
        numbers[label] = numbers.get(label, 0) + 1
        spec = label_specs[label]
        found.append(_detection(boxes[i], label, f"{spec.name} {numbers[label]}", spec,
                                float(scores[i]), affine, shape))
    return found


def _detection(box: np.ndarray, label: int, name: str, spec: LabelSpec, score: float,
               affine: np.ndarray, shape: tuple[int, int, int]) -> Detection:
    centre, size = box[:3], box[3:]
    inverse = np.linalg.inv(affine)
    centre_index = (inverse @ np.append(centre, 1.0))[:3]
    key_slice = int(np.clip(np.rint(centre_index[2]), 0, shape[2] - 1))
    outline, clipped = _outline(centre, size, inverse, shape)
    sides = sorted((_extent(size, affine[:3, axis]) for axis in (0, 1)), reverse=True)
    return Detection(
        label=label,
        name=name,
        codes=spec.segment_codes(),
        score=score,
        center_mm=(float(centre[0]), float(centre[1]), float(centre[2])),
        size_mm=(float(size[0]), float(size[1]), float(size[2])),
        key_slice=key_slice,
        outline=outline,
        long_axis_mm=sides[0],
        short_axis_mm=sides[1],
        clipped=clipped,
    )


def _extent(size: np.ndarray, direction: np.ndarray) -> float:
    """The extent of an axis-aligned box of ``size`` along ``direction``."""
    unit = direction / np.linalg.norm(direction)
    return float(np.abs(unit) @ size)


def _outline(centre: np.ndarray, size: np.ndarray, inverse: np.ndarray,
             shape: tuple[int, int, int]) -> tuple[np.ndarray, bool]:
    """The box's central cross-section as a closed (column, row) polygon, clipped."""
    half = size / 2
    corners = [centre + half * np.array([sx, sy, 0.0]) for sx, sy in ((-1, -1), (1, -1), (1, 1), (-1, 1))]
    pixels = np.array([(inverse @ np.append(c, 1.0))[:2] + 0.5 for c in corners])
    clipped = clip_polygon(pixels, float(shape[0]), float(shape[1]))
    changed = len(clipped) != len(pixels) or not np.allclose(clipped, pixels)
    if len(clipped) < 3:  # wholly outside the image: keep the degenerate edge on it
        clipped = np.clip(pixels, 0.0, [float(shape[0]), float(shape[1])])
        changed = True
    return np.vstack([clipped, clipped[:1]]), changed


def clip_polygon(points: np.ndarray, width: float, height: float) -> np.ndarray:
    """Sutherland-Hodgman: the part of polygon ``points`` (N, 2) inside
    ``[0, width] x [0, height]`` (an open polygon, without the closing point)."""
    edges = ((0, 0.0, 1.0), (0, width, -1.0), (1, 0.0, 1.0), (1, height, -1.0))
    result = np.asarray(points, dtype=np.float64)
    for axis, bound, sign in edges:
        if len(result) == 0:
            break
        inside = sign * (result[:, axis] - bound) >= 0
        kept: list[np.ndarray] = []
        for k in range(len(result)):
            current, previous = result[k], result[k - 1]
            if inside[k] != inside[k - 1]:
                t = (bound - previous[axis]) / (current[axis] - previous[axis])
                kept.append(previous + t * (current - previous))
            if inside[k]:
                kept.append(current)
        result = np.array(kept).reshape(-1, 2)
    return result
