"""Encode a plugin's label map as a DICOM Segmentation (highdicom, BINARY).

One segment per :class:`~plugin.types.Finding`, numbered in list order from 1. Every
frame is derived from one source image, so each frame references that exact
instance and carries its Image Position (Patient); empty frames are omitted by
default, which keeps that mapping exact (checked in the tests).

With no findings there is nothing to segment: :func:`encode_seg` raises
:class:`~dicom_node.errors.EncodeError` and the caller sends only the SR.
"""

from __future__ import annotations

import logging
from typing import Any

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset

from dicom_node.errors import EncodeError
from dicom_node.identity import NODE_MANUFACTURER
from dicom_node.results import common
from plugin.types import Finding, Findings, PluginInfo, Volume

logger = logging.getLogger(__name__)


def encode_seg(
    volume: Volume,
    findings: Findings,
    info: PluginInfo,
    *,
    series_number: int,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    omit_empty_frames: bool = True,
    sources: list[Dataset] | None = None,
) -> Dataset:
    """Build the SEG instance for ``findings`` on ``volume``.

    Raises :class:`EncodeError` when there are no findings, when the label map does
    not fit the volume, or when highdicom rejects the inputs.
    """
    if not findings.findings:
        raise EncodeError("no findings: no SEG is produced (send the SR only)")
    if findings.label_map is None:
        raise EncodeError("findings without a label map (detections) have no SEG")
    common.check_grid(volume, findings.label_map.shape)
    sources = sources if sources is not None else common.load_sources(volume)
    frames = segment_frames(findings)
    descriptions = [
        segment_description(number, finding, volume, info)
        for number, finding in enumerate(findings.findings, start=1)
    ]
    seg = _build(
        sources, frames, descriptions, info,
        series_number=series_number,
        series_instance_uid=common.new_uid(series_instance_uid),
        sop_instance_uid=common.new_uid(sop_instance_uid),
        instance_number=instance_number,
        omit_empty_frames=omit_empty_frames,
    )
    logger.info(
        "encoded SEG %s: %d segments, %d frames, study %s",
        seg.SOPInstanceUID, len(descriptions), int(seg.NumberOfFrames),
        volume.study_instance_uid,
    )
    return seg


def segment_frames(findings: Findings) -> np.ndarray:
    """Segment-number frames ``(frames, rows, columns)`` from the label map.

    The label map is ``(X, Y, Z)`` = (columns, rows, slices) holding each finding's
    ``label``; SEG frames are ``(rows, columns)``, one per slice, holding segment
    numbers 1..n in findings order (highdicom's label-map input style, which keeps
    memory at one byte per voxel however many findings there are).
    """
    label_map = np.asarray(findings.label_map)
    if not np.issubdtype(label_map.dtype, np.integer) or (
        np.issubdtype(label_map.dtype, np.signedinteger) and label_map.min() < 0
    ):
        raise EncodeError("label map must hold non-negative integers")
    lookup = np.zeros(int(label_map.max()) + 1, dtype=np.uint16)
    for number, finding in enumerate(findings.findings, start=1):
        if not 0 < finding.label < len(lookup):
            raise EncodeError(f"{finding.name} (label {finding.label}) has no voxels")
        if lookup[finding.label]:
            raise EncodeError(f"label {finding.label} is used by two findings")
        lookup[finding.label] = number
    dtype = np.uint8 if len(findings.findings) < 256 else np.uint16
    x, y, z = label_map.shape
    frames = np.zeros((z, y, x), dtype=dtype)
    # Only slices that hold a label are touched: one pass to find them, then one
    # gather of those slices (no per-slice Python loop).
    held = np.flatnonzero(label_map.any(axis=(0, 1)))
    slab = label_map[:, :, held]
    frames[held] = lookup[slab].astype(dtype, copy=False).transpose(2, 1, 0)
    counts = np.bincount(slab[slab != 0], minlength=len(lookup))[: len(lookup)]
    for finding in findings.findings:
        if counts[finding.label] == 0:
            raise EncodeError(f"{finding.name} (label {finding.label}) has no voxels")
    return frames


def segment_description(
    number: int, finding: Finding, volume: Volume, info: PluginInfo
) -> hd.seg.SegmentDescription:
    """Segment ``number`` for ``finding``: label, codes, algorithm, colour, tracking."""
    codes = finding.codes
    description = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=common.ascii_text(finding.name) or f"Segment {number}",
        segmented_property_category=codes.category,
        segmented_property_type=codes.type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=common.algorithm_identification(info),
        tracking_uid=common.tracking_uid(volume, info, finding),
        tracking_id=common.ascii_text(finding.name) or f"Segment {number}",
        anatomic_regions=[codes.site] if codes.site is not None else None,
        display_color=hd.color.CIELabColor.from_rgb(*codes.color_rgb),
    )
    if codes.modifier is not None:  # e.g. laterality of "Kidney" (PS3.3 C.8.20.2, Type 3)
        item = hd.sr.CodedConcept.from_code(codes.modifier)
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [item]
    return description


def _build(
    sources: list[Dataset],
    frames: np.ndarray,
    descriptions: list[hd.seg.SegmentDescription],
    info: PluginInfo,
    **kwargs: Any,
) -> hd.seg.Segmentation:
    """Call highdicom; ``kwargs`` carry the series/instance numbering."""
    try:
        with common.no_phi_warnings():
            return hd.seg.Segmentation(
                source_images=sources,
                pixel_array=frames,
                segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
                segment_descriptions=descriptions,
                manufacturer=NODE_MANUFACTURER,
                manufacturer_model_name=common.model_name(info),
                software_versions=list(common.software_versions(info)),  # type: ignore[arg-type]
                device_serial_number=info.device_uid,
                content_description=common.ascii_text(
                    f"{info.display_name or info.name} segmentation"
                ),
                content_label="AI_SEG",
                series_description=common.series_description(info, "SEG"),
                contributing_equipment=common.contributing_equipment(info),
                specific_character_set=common.character_set(sources[0]),
                **kwargs,
            )
    except (ValueError, TypeError) as e:
        raise EncodeError(f"cannot build SEG: {e}") from e
