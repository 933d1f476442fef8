"""Encode findings as a Comprehensive 3D SR holding a TID 1500 Measurement Report.

The report names the imaging procedure analysed (``Findings.procedure``), a device
observer (the model), an image library (TID 1600) of the source images the
measurements are drawn on (all source images when there is no finding: they are
the evidence for "none found"), two measurement
groups per finding (see :mod:`dicom_node.results.sr_content`) and, in the TID 1500
"Qualitative Evaluations" container, free-text comments: the plugin summary and,
unless the plugin is cleared for clinical use, "NOT FOR DIAGNOSTIC USE".

A study without findings still gets an SR: one group whose qualitative evaluation
says the finding type is absent, so the reader knows the analysis ran.
"""

from __future__ import annotations

import logging
from typing import Any, cast

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.errors import EncodeError
from dicom_node.identity import NODE_MANUFACTURER
from dicom_node.results import common, sr_content
from plugin.types import Finding, Findings, PluginInfo, Volume

logger = logging.getLogger(__name__)

DEFAULT_ABSENT_FINDING = codes.SCT.Finding  # (404684003, SCT, "Finding")


def encode_sr(
    volume: Volume,
    findings: Findings,
    info: PluginInfo,
    *,
    series_number: int,
    series_instance_uid: str | None = None,
    instance_number: int = 1,
    sop_instance_uid: str | None = None,
    absent_finding_type: Code | None = None,
    sources: list[Dataset] | None = None,
) -> Dataset:
    """Build the TID 1500 SR for ``findings`` on ``volume``.

    ``absent_finding_type`` names what was looked for when there are no findings
    (e.g. SCT Nodule); it defaults to ``findings.looked_for``, then SCT "Finding". Raises :class:`EncodeError`
    when the inputs cannot be encoded.
    """
    sources = sources if sources is not None else common.load_sources(volume)
    report = _report(volume, findings, info, sources, absent_finding_type)
    kwargs: dict[str, Any] = {
        "series_instance_uid": common.new_uid(series_instance_uid),
        "series_number": series_number,
        "sop_instance_uid": common.new_uid(sop_instance_uid),
        "instance_number": instance_number,
    }
    try:
        with common.no_phi_warnings():
            sr = _document(sources, report, findings, info, **kwargs)
    except (ValueError, TypeError, AttributeError) as e:
        raise EncodeError(f"cannot build SR: {e}") from e
    logger.info(
        "encoded SR %s: %d findings, study %s",
        sr.SOPInstanceUID, findings.count, volume.study_instance_uid,
    )
    return sr


def _document(
    sources: list[Dataset],
    report: hd.sr.MeasurementReport,
    findings: Findings,
    info: PluginInfo,
    **kwargs: Any,
) -> hd.sr.Comprehensive3DSR:
    """Call highdicom; ``kwargs`` carry the series/instance numbering.

    highdicom's constructor deep-copies the whole content tree (for its ``content``
    property) and walks it twice (evidence, SCOORD3D check): 0.4-0.6 s for a report of
    about a thousand items, most of the SR stage. The same document is built here
    from a root container without children, then given the report's root items; the
    report's tree (already highdicom content items) serves as ``content``. The checks
    the constructor would have made on the tree are made by :func:`_check_tree`.
    """
    root = report[0]
    _check_tree(root, sources)
    sr = hd.sr.Comprehensive3DSR(
        evidence=sources,
        content=_childless(root),
        manufacturer=NODE_MANUFACTURER,
        is_complete=True,
        is_final=False,
        is_verified=False,
        performed_procedure_codes=[findings.procedure],
        contributing_equipment=common.contributing_equipment(info),
        series_description=common.series_description(info, "SR"),
        manufacturer_model_name=common.model_name(info),
        software_versions=list(common.software_versions(info)),
        device_serial_number=info.device_uid,
        specific_character_set=common.character_set(sources[0]),
        **kwargs,
    )
    for tag, value in root.items():
        sr[tag] = value
    sr._content = hd.sr.ContentSequence([cast(hd.sr.ContentItem, root)], is_root=True)
    return sr


def _childless(root: Dataset) -> Dataset:
    """A shallow copy of the root content item with an empty Content Sequence."""
    stub = Dataset()
    for element in root:
        if element.keyword != "ContentSequence":
            stub.add(element)
    stub.ContentSequence = []
    return stub


def _check_tree(root: Dataset, sources: list[Dataset]) -> None:
    """What highdicom checks on the content tree: every referenced image or composite
    object is in ``sources`` (the evidence), and no SCOORD3D item (Comprehensive SR)."""
    known = {source.SOPInstanceUID for source in sources}
    pending = list(root.get("ContentSequence", []))
    while pending:
        item = pending.pop()
        value_type = item.get("ValueType")
        if value_type == "SCOORD3D":
            raise ValueError("Comprehensive SR does not support content items with SCOORD3D value type.")
        if value_type in ("IMAGE", "COMPOSITE"):
            uid = item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            if uid not in known:
                raise ValueError(f"no evidence for the referenced SOP instance {uid}")
        pending.extend(item.get("ContentSequence", []))


def absent_finding(findings: Findings, override: Code | None = None) -> Code:
    """What the analysis looked for, named when nothing was found: ``override``, else
    ``findings.looked_for``, else SCT "Finding"."""
    return override or findings.looked_for or DEFAULT_ABSENT_FINDING


MEASUREMENT_CONVENTIONS = (
    "Measurements on the source images: long and short axis on the axial slice of largest "
    "extent, the short axis the longest diameter perpendicular to the long one; attenuation "
    "(mean, standard deviation, maximum) over the core, the voxels at least 1 mm inside the "
    "boundary; volume from the mask (where the model's manifest asks for it: moved to the "
    "half-maximum edge, a brighter structure touching a solid finding, such as an enhancing "
    "vessel, cut at the half maximum between the two, and corrected for partial volume)."
)
SUBSOLID_CONVENTION = (
    "Subsolid findings (a fifth of the core or more below -300 HU) are measured whole, ground glass "
    "included: the edge is the ground glass's half maximum. Their solid component is the "
    "part above half way from the ground glass to soft tissue."
)


def composition_text(finding: Finding) -> str | None:
    """The report's line on a subsolid finding's composition; None for a solid one."""
    if finding.composition == "ground_glass":
        return f"{finding.name}: ground glass (no solid component)."
    if finding.composition == "part_solid" and finding.solid_long_axis_mm is not None:
        return (f"{finding.name}: part-solid, solid component long axis "
                f"{finding.solid_long_axis_mm:.1f} mm, volume {finding.solid_volume_mm3 or 0.0:.0f} mm3.")
    return None


def comments(findings: Findings, info: PluginInfo, absent: Code) -> list[str]:
    """Free-text comments of the report (intended use, summary, none found)."""
    texts = []
    if not info.for_clinical_use:
        texts.append(
            f"{common.NOT_FOR_DIAGNOSTIC_USE}: automated result of "
            f"{info.display_name or info.name} {info.version}, not cleared for clinical use."
        )
    if findings.summary:
        texts.append(findings.summary)
    thin = [f.name for f in findings.findings if f.role != "structure" and not f.attenuation_from_core]
    if thin:
        texts.append(
            f"Attenuation not measured for {', '.join(thin)}: thinner than three slices, so "
            "every voxel is diluted by partial volume (a solid nodule would read as ground glass)."
        )
    subsolid = [text for text in map(composition_text, findings.findings) if text]
    texts.extend(subsolid)
    if findings.findings and any(f.role != "structure" for f in findings.findings):
        texts.append(MEASUREMENT_CONVENTIONS)
    if subsolid:
        texts.append(SUBSOLID_CONVENTION)
    if not findings.count:
        texts.append(f"Analysis completed: no {absent.meaning.lower()} detected.")
    return texts


def library_images(findings: Findings, sources: list[Dataset]) -> list[Dataset]:
    """The images for the image library: those the findings are drawn on."""
    if not findings.count:
        return sources
    used: set[int] = {detection.key_slice for detection in findings.detections}
    for finding in findings.findings:
        used.add(finding.key_slice)
        used.update(finding.contours if finding.role != "structure" else ())
    return [sources[z] for z in sorted(used) if 0 <= z < len(sources)]


def _report(
    volume: Volume,
    findings: Findings,
    info: PluginInfo,
    sources: list[Dataset],
    absent_finding_type: Code | None,
) -> hd.sr.MeasurementReport:
    absent = absent_finding(findings, absent_finding_type)
    groups: list[sr_content.Group] = []
    for finding in findings.findings:
        groups.extend(sr_content.finding_groups(volume, finding, info, sources))
    for detection in findings.detections:
        groups.append(sr_content.detection_group(volume, detection, info, sources))
    if not groups:
        groups.append(sr_content.no_findings_group(info, absent))
    try:
        report = hd.sr.MeasurementReport(
            observation_context=sr_content.observation_context(info),
            procedure_reported=findings.procedure,
            imaging_measurements=groups,
            referenced_images=library_images(findings, sources),
        )
    except (ValueError, TypeError) as e:
        raise EncodeError(f"cannot build measurement report: {e}") from e
    texts = comments(findings, info, absent)
    if texts:
        report[0].ContentSequence.append(sr_content.comments_container(texts))
    return report
