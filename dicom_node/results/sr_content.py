"""TID 1500 content items for the SR: measurement groups, observer, comments.

Per finding there are two groups sharing one tracking identifier and UID:

* TID 1410 planar group: the long axis as a 2-point SCOORD POLYLINE on the key
  slice, with Long axis and Short axis (mm).
* TID 1411 volumetric group: closed SCOORD POLYLINE outlines on each slice the
  finding spans, with Volume (mm3), Mean Attenuation Coefficient (HU) and the
  Attenuation Coefficient's Standard Deviation and Maximum (HU; derivation SCT
  386136009 and 56851009), all over the finding's core (:mod:`plugin.lesion_measure`);
  no Standard Deviation when the core is a single voxel.
  A finding too thin for a core (fewer than 3 slices on thick slices) gets no
  attenuation: its voxels are diluted by partial volume, and a solid nodule would read as
  ground glass; the report's comments say so.
* Where the model gives a score per finding, the planar group carries it as (111012,
  DCM, "Certainty of Finding") in percent.

A structure (an organ of a multi-label model, ``Finding.role == "structure"``) gets one
TID 1501 group without a region: Volume and Mean Attenuation Coefficient, its finding
site carrying the laterality. A detection (a box of a detection model) gets one TID
1410 planar group: the box's cross-section as a closed SCOORD POLYLINE on the source
image nearest its centre, with Long axis (the larger in-plane side), Width, Depth and
Height (the box's right-left, anterior-posterior and inferior-superior extents, mm) and
the detector's score as (111012, DCM, "Certainty of Finding") in percent, as the CAD
templates of PS3.16 report a finding's certainty (e.g. TID 4104, Single Image Finding).

Nothing references the SEG (OHIF 3.13 rejects an SR whose groups reference
segments). Pixel coordinates are used as given: :mod:`plugin.types` defines them
in SCOORD image coordinates, ``(column, row)``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.errors import EncodeError
from dicom_node.results import common
from plugin.types import Detection, Finding, PluginInfo, Volume

logger = logging.getLogger(__name__)

# TID 1500 row "Qualitative Evaluations" container (the concept TID 1500 names).
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
NO_FINDINGS_ID = "No findings"

Group = (
    hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations
    | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    | hd.sr.MeasurementsAndQualitativeEvaluations
)


def device_observer(info: PluginInfo) -> hd.sr.ObserverContext:
    """TID 1002 observer context of the device: the model that produced the findings."""
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=info.device_uid,
        name=common.plain(info.display_name or info.name),
        manufacturer_name=common.plain(info.manufacturer),
        model_name=common.plain(f"{info.name} {info.version}"),
    )
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=device,
    )


def observation_context(info: PluginInfo) -> hd.sr.ObservationContext:
    """TID 1001 with a device observer: the model that produced the findings."""
    return hd.sr.ObservationContext(observer_device_context=device_observer(info))


def algorithm_id(info: PluginInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 algorithm identification for each measurement group."""
    return hd.sr.AlgorithmIdentification(
        name=common.plain(info.display_name or info.name),
        version=common.plain(info.version),
        family=codes.cid7162.ArtificialIntelligence,
        manufacturer=common.plain(info.manufacturer),
    )


def finding_groups(
    volume: Volume, finding: Finding, info: PluginInfo, sources: Sequence[Dataset]
) -> list[Group]:
    """The planar (long axis) and the volumetric (outlines) group of one finding."""
    tracking = _tracking(volume, info, finding)
    if finding.role == "structure":
        return [_structure_group(finding, info, tracking)]
    return [
        _planar_group(finding, info, sources, tracking),
        _volumetric_group(finding, info, sources, tracking),
    ]


def detection_group(
    volume: Volume, detection: Detection, info: PluginInfo, sources: Sequence[Dataset]
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """The planar group of one detected box (see the module docstring)."""
    mm = codes.UCUM.Millimeter
    width, depth, height = detection.size_mm
    region = _region(_closed(detection.outline), sources, detection.key_slice, detection)
    return _planar(detection, info, _tracking(volume, info, detection), region, [
        hd.sr.Measurement(name=codes.SCT.LongAxis, value=detection.long_axis_mm, unit=mm),
        hd.sr.Measurement(name=codes.SCT.Width, value=width, unit=mm),
        hd.sr.Measurement(name=codes.SCT.Depth, value=depth, unit=mm),
        hd.sr.Measurement(name=codes.DCM.Height, value=height, unit=mm),
        certainty(detection.score),
    ])


def _planar(
    item: Finding | Detection,
    info: PluginInfo,
    tracking: hd.sr.TrackingIdentifier,
    region: hd.sr.ImageRegion,
    measurements: list[hd.sr.Measurement],
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    """A TID 1410 planar group of ``item`` (a finding or a detection) on ``region``."""
    return hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_region=region,
        finding_type=item.codes.type,
        finding_category=item.codes.category,
        finding_sites=_sites(item),
        algorithm_id=algorithm_id(info),
        measurements=measurements,
    )


def _tracking(volume: Volume, info: PluginInfo, item: Finding | Detection) -> hd.sr.TrackingIdentifier:
    return hd.sr.TrackingIdentifier(
        uid=common.tracking_uid(volume, info, item),
        identifier=common.plain(item.name),
    )


def _structure_group(
    finding: Finding, info: PluginInfo, tracking: hd.sr.TrackingIdentifier
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    site = hd.sr.FindingSite(anatomic_location=finding.codes.type, laterality=finding.codes.modifier)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding.codes.type,
        finding_category=finding.codes.category,
        finding_sites=[site],
        algorithm_id=algorithm_id(info),
        measurements=_volume_measurements(finding),
    )


def _volume_measurements(finding: Finding) -> list[hd.sr.Measurement]:
    hu = codes.UCUM.HounsfieldUnit
    measurements = [
        hd.sr.Measurement(
            name=codes.SCT.Volume,
            value=finding.volume_mm3,
            unit=codes.UCUM.CubicMillimeter,
        ),
    ]
    if finding.role == "structure" or finding.attenuation_from_core:
        measurements.append(
            hd.sr.Measurement(name=codes.DCM.MeanAttenuationCoefficient, value=finding.mean_hu, unit=hu))
        if finding.has_spread:
            measurements.append(hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=finding.sd_hu,
                                                  unit=hu, derivation=codes.SCT.StandardDeviation))
        measurements.append(hd.sr.Measurement(name=codes.DCM.AttenuationCoefficient, value=finding.max_hu,
                                              unit=hu, derivation=codes.SCT.Maximum))
    return measurements


def certainty(score: float) -> hd.sr.Measurement:
    """A model's score 0..1 as (111012, DCM, "Certainty of Finding") in percent."""
    return hd.sr.Measurement(
        name=codes.DCM.CertaintyOfFinding,
        value=round(100.0 * score, 3),
        unit=codes.UCUM.Percent,
    )


def no_findings_group(
    info: PluginInfo, finding_type: Code
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """TID 1501 group stating that ``finding_type`` is absent (the analysis ran)."""
    tracking = hd.sr.TrackingIdentifier(uid=common.new_uid(None), identifier=NO_FINDINGS_ID)
    absent = hd.sr.QualitativeEvaluation(name=finding_type, value=codes.SCT.Absent)
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=finding_type,
        algorithm_id=algorithm_id(info),
        qualitative_evaluations=[absent],
    )


def comments_container(texts: Sequence[str]) -> hd.sr.ContainerContentItem:
    """TID 1500 "Qualitative Evaluations" container holding TEXT Comment items."""
    container = hd.sr.ContainerContentItem(
        name=QUALITATIVE_EVALUATIONS,
        relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
    )
    container.ContentSequence = hd.sr.ContentSequence(
        [
            hd.sr.TextContentItem(
                name=codes.DCM.Comment,
                value=common.plain(text),
                relationship_type=hd.sr.RelationshipTypeValues.CONTAINS,
            )
            for text in texts
        ]
    )
    return container


def _planar_group(
    finding: Finding,
    info: PluginInfo,
    sources: Sequence[Dataset],
    tracking: hd.sr.TrackingIdentifier,
) -> hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations:
    axis = finding.long_axis
    line = np.array([axis.start, axis.end], dtype=np.float32)
    region = _region(line, sources, finding.key_slice, finding)
    mm = codes.UCUM.Millimeter
    measurements = [
        hd.sr.Measurement(name=codes.SCT.LongAxis, value=axis.length_mm, unit=mm),
        hd.sr.Measurement(name=codes.SCT.ShortAxis, value=finding.short_axis.length_mm, unit=mm),
    ]
    if finding.score is not None:
        measurements.append(certainty(finding.score))
    return _planar(finding, info, tracking, region, measurements)


def _volumetric_group(
    finding: Finding,
    info: PluginInfo,
    sources: Sequence[Dataset],
    tracking: hd.sr.TrackingIdentifier,
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    regions = [
        _region(_closed(outline), sources, z, finding)
        for z in sorted(finding.contours)
        for outline in finding.contours[z]
    ]
    if not regions:
        raise EncodeError(f"{finding.name} has no contours for its volumetric group")
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        referenced_regions=regions,
        finding_type=finding.codes.type,
        finding_category=finding.codes.category,
        finding_sites=_sites(finding),
        algorithm_id=algorithm_id(info),
        measurements=_volume_measurements(finding),
    )


def _sites(finding: Finding | Detection) -> list[hd.sr.FindingSite] | None:
    site = finding.codes.site
    return [hd.sr.FindingSite(anatomic_location=site)] if site is not None else None


def _closed(outline: np.ndarray) -> np.ndarray:
    """``outline`` as float32 (N, 2) with the first point repeated at the end."""
    points = np.asarray(outline, dtype=np.float32).reshape(-1, 2)
    if len(points) and not np.array_equal(points[0], points[-1]):
        points = np.vstack([points, points[:1]])
    return points


def _region(
    points: np.ndarray, sources: Sequence[Dataset], z: int, finding: Finding | Detection
) -> hd.sr.ImageRegion:
    if not 0 <= z < len(sources):
        raise EncodeError(f"{finding.name}: slice index {z} outside 0..{len(sources) - 1}")
    source = sources[z]
    _check_points(points, source, finding)
    try:
        return hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POLYLINE,
            graphic_data=points,
            source_image=hd.sr.SourceImageForRegion(
                referenced_sop_class_uid=source.SOPClassUID,
                referenced_sop_instance_uid=source.SOPInstanceUID,
            ),
        )
    except (ValueError, TypeError) as e:
        raise EncodeError(f"{finding.name}: invalid region on slice {z}: {e}") from e


def _check_points(points: np.ndarray, source: Dataset, finding: Finding | Detection) -> None:
    if len(points) < 2 or not np.all(np.isfinite(points)):
        raise EncodeError(f"{finding.name}: a region needs >= 2 finite points")
    cols, rows = float(source.Columns), float(source.Rows)
    inside = (points[:, 0] >= 0) & (points[:, 0] <= cols)
    inside &= (points[:, 1] >= 0) & (points[:, 1] <= rows)
    if not np.all(inside):
        raise EncodeError(f"{finding.name}: region points lie outside the image")
