"""Read our TID 1500 SR back with highdicom: the findings as a viewer sees them."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.sr.codedict import codes


@dataclass
class ReportedFinding:
    """One finding as stored in the SR (a planar plus a volumetric group)."""

    name: str
    tracking_uid: str
    long_axis_mm: float = float("nan")
    short_axis_mm: float = float("nan")
    volume_mm3: float = float("nan")
    mean_hu: float = float("nan")
    sd_hu: float = float("nan")
    max_hu: float = float("nan")
    certainty_percent: float = float("nan")
    key_image_uid: str = ""
    long_axis_points: np.ndarray | None = None  # (2, 2) column, row
    outlines: dict[str, list[np.ndarray]] = field(default_factory=dict)  # image UID -> (N, 2)


def _image_uid(region: object) -> str:
    """The SOP Instance UID an SCOORD region is drawn on."""
    return str(region.ContentSequence[0].ReferencedSOPSequence[0].ReferencedSOPInstanceUID)  # type: ignore[attr-defined]


def _value(group: object, concept: object, derivation: object | None = None) -> float:
    found = group.get_measurements(name=concept)  # type: ignore[attr-defined]
    if derivation is not None:
        found = [m for m in found if m.derivation == derivation]
    return float(found[0].value) if found else float("nan")


def read_findings(sr_path: Path) -> list[ReportedFinding]:
    """The findings of a TID 1500 SR written by the node, in report order."""
    content: Any = hd.sr.srread(sr_path).content
    out: dict[str, ReportedFinding] = {}
    for group in content.get_planar_roi_measurement_groups():
        uid = str(group.tracking_uid)
        item = out.setdefault(uid, ReportedFinding(str(group.tracking_identifier), uid))
        item.long_axis_mm = _value(group, codes.SCT.LongAxis)
        item.short_axis_mm = _value(group, codes.SCT.ShortAxis)
        item.certainty_percent = _value(group, codes.DCM.CertaintyOfFinding)
        roi = group.roi
        item.key_image_uid = _image_uid(roi)
        item.long_axis_points = np.asarray(roi.value, dtype=float).reshape(-1, 2)
    for group in content.get_volumetric_roi_measurement_groups():
        uid = str(group.tracking_uid)
        item = out.setdefault(uid, ReportedFinding(str(group.tracking_identifier), uid))
        item.volume_mm3 = _value(group, codes.SCT.Volume)
        item.mean_hu = _value(group, codes.DCM.MeanAttenuationCoefficient)
        item.sd_hu = _value(group, codes.DCM.AttenuationCoefficient, codes.SCT.StandardDeviation)
        item.max_hu = _value(group, codes.DCM.AttenuationCoefficient, codes.SCT.Maximum)
        for region in group.roi or []:
            ref = _image_uid(region)
            item.outlines.setdefault(ref, []).append(np.asarray(region.value, dtype=float).reshape(-1, 2))
    return list(out.values())
