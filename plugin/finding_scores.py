"""Scores per finding from a segmentation bundle's postprocessing.

A segmentation bundle gives a label map; a score per finding has no place in it. The
bundle's postprocessing may put, beside ``pred``, the key :data:`SCORES_KEY`: a list of
``(point, score)`` pairs, ``point`` a position in MONAI's world space (RAS mm, as the
image's affine) inside a finding, ``score`` the model's confidence 0..1. Each finding
measured on the source grid gets the highest score of the points that fall in it (within
one voxel); a finding no point falls in keeps ``score`` None, and the report then has no
Certainty of Finding for it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence

import numpy as np

from plugin.types import Findings

logger = logging.getLogger(__name__)

SCORES_KEY = "finding_scores"


def assign_scores(findings: Findings, points: Iterable[tuple[Sequence[float], float]],
                  ras_affine: np.ndarray) -> int:
    """Set ``Finding.score`` from ``points`` (see the module docstring); returns how many
    points fell in no finding."""
    labels = findings.label_map
    if labels is None or not findings.findings:
        return 0
    by_label = {f.label: f for f in findings.findings}
    inverse = np.linalg.inv(np.asarray(ras_affine, dtype=np.float64))
    shape = np.array(labels.shape)
    unplaced = 0
    for point, score in points:
        if not 0.0 <= float(score) <= 1.0:
            raise ValueError(f"a finding score must be in 0..1, got {score}")
        index = inverse @ np.append(np.asarray(point, dtype=np.float64), 1.0)
        centre = np.rint(index[:3]).astype(int)
        low, high = np.maximum(centre - 1, 0), np.minimum(centre + 2, shape)
        if np.any(high <= low):
            unplaced += 1
            continue
        near = labels[low[0]:high[0], low[1]:high[1], low[2]:high[2]]
        values = [v for v in np.unique(near) if v in by_label]
        if not values:
            unplaced += 1
            continue
        # the voxel itself when it is a finding's, else the nearest finding's voxel around it
        own = int(labels[tuple(np.clip(centre, 0, shape - 1))])
        label = own if own in by_label else int(values[0])
        finding = by_label[label]
        finding.score = max(float(score), finding.score if finding.score is not None else 0.0)
    if unplaced:
        logger.debug("%d finding score(s) fell in no finding", unplaced)
    return unplaced
