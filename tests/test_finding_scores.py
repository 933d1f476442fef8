"""Scores per finding from a bundle's postprocessing (plugin.finding_scores)."""

from __future__ import annotations

import numpy as np
import pytest
from pydicom.sr.codedict import codes

from plugin.finding_scores import assign_scores
from plugin.types import Axis, Finding, Findings, SegmentCodes


def _findings() -> Findings:
    labels = np.zeros((20, 20, 10), dtype=np.uint8)
    labels[2:6, 2:6, 2:5] = 1
    labels[12:15, 12:15, 6:8] = 2
    axis = Axis((0.0, 0.0), (1.0, 0.0), 1.0)
    codes_ = SegmentCodes(codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Nodule)
    findings = [Finding(label=v, name=f"Nodule {v}", codes=codes_, centroid_mm=(0.0, 0.0, 0.0),
                        volume_mm3=1.0, mean_hu=0.0, key_slice=0, long_axis=axis, short_axis=axis)
                for v in (1, 2)]
    return Findings(label_map=labels, findings=findings)


def test_points_give_their_findings_the_highest_score() -> None:
    findings = _findings()
    affine = np.diag([-0.5, -0.5, 2.0, 1.0])  # RAS, flipped in-plane as MONAI's are
    affine[:3, 3] = (30.0, 40.0, -100.0)

    def world(index: tuple[float, float, float]) -> tuple[float, ...]:
        return tuple((affine @ np.append(index, 1.0))[:3])

    unplaced = assign_scores(findings, [
        (world((3, 3, 3)), 0.4), (world((4, 4, 3)), 0.9),  # both in finding 1
        (world((15, 12, 7)), 0.7),  # a voxel beside finding 2: within one voxel
        (world((18, 2, 1)), 0.99),  # in no finding
    ], affine)
    assert [f.score for f in findings.findings] == [0.9, 0.7]
    assert unplaced == 1


def test_a_finding_no_point_falls_in_has_no_score_and_bad_scores_are_refused() -> None:
    findings = _findings()
    assign_scores(findings, [], np.eye(4))
    assert [f.score for f in findings.findings] == [None, None]
    with pytest.raises(ValueError, match="0..1"):
        assign_scores(findings, [((3.0, 3.0, 3.0), 1.5)], np.eye(4))
