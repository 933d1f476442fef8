"""Encode the key images as Secondary Capture (highdicom ``SCImage``), for every viewer.

One series per revision (:func:`~dicom_node.results.common.result_series_numbers`),
one single-frame RGB Secondary Capture per image: instance 1 is the summary, then one
image per finding (largest first, at most :data:`MAX_KEY_IMAGES`), drawn by
:mod:`dicom_node.results.key_images`. Structures (organs of a multi-label model) appear
in the summary table only. With no findings the summary says so, and which series was
analysed.

Each image has Burned In Annotation YES, the caption's text in Image Comments, the
provenance of the SEG and SR (Manufacturer, model, software versions, device serial
number, Contributing Equipment), and references its source images (Source Image
Sequence): a finding's image its key slice, the summary the key slices of all findings
(all images of the series when there is none, the evidence for "none found").
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node.errors import EncodeError
from dicom_node.identity import NODE_MANUFACTURER
from dicom_node.results import common, key_images
from dicom_node.results.key_images import KeyView, Measures, SummaryText
from dicom_node.results.sr import absent_finding
from plugin.types import Detection, Finding, Findings, PluginInfo, Volume

logger = logging.getLogger(__name__)

MAX_KEY_IMAGES = 20
DERIVATION = (
    "Rendered by dicom-node from the source image: lung window (C -600, W 1500), the "
    "AI finding's outline and long axis burned in"
)


@dataclass(frozen=True)
class _Image:
    """One SC to build: pixels, caption text, source references, orientation."""

    pixels: np.ndarray
    text: Sequence[str]
    references: Sequence[Dataset]
    orientation: tuple[str, str] | None  # Patient Orientation (row, column); None: no image


def encode_key_images(
    volume: Volume,
    findings: Findings,
    info: PluginInfo,
    *,
    series_number: int,
    series_instance_uid: str | None = None,
    absent_finding_type: Code | None = None,
    sources: list[Dataset] | None = None,
) -> list[Dataset]:
    """The summary and one key image per finding, as Secondary Capture instances.

    Raises :class:`EncodeError` when the findings do not fit the volume or highdicom
    rejects the inputs.
    """
    sources = sources if sources is not None else common.load_sources(volume)
    views = key_views(findings, info, sources)
    images = [_summary(findings, info, sources, views, absent_finding_type)]
    warning = _warning(info)
    for view in views:
        source = sources[view.slice_index]
        orientation = _orientation(volume, source)
        letters = key_images.orientation_letters(orientation)
        pixels = key_images.render_key_image(_hu_slice(volume, view.slice_index), view, orientation, warning)
        text = [*key_images.caption_lines(view), *([warning] if warning else [])]
        images.append(_Image(pixels, text, [source], (letters[1], letters[3])))
    series_uid = common.new_uid(series_instance_uid)
    out: list[Dataset] = [_build(image, number, sources[0], info, series_number, series_uid)
           for number, image in enumerate(images, start=1)]
    logger.info("encoded %d key images (SC series %s), study %s", len(out), series_uid,
                volume.study_instance_uid)
    return out


def measures(item: Finding | Detection) -> Measures:
    """A finding's or a detection's numbers as the SR reports them (see
    :mod:`dicom_node.results.sr_content`): no attenuation for a finding too thin for a
    core, the score in percent rounded as the SR stores it."""
    score = math.nan if item.score is None else round(100.0 * item.score, 3)
    if isinstance(item, Detection):
        return Measures(item.name, long_axis_mm=item.long_axis_mm, score_percent=score, size_mm=item.size_mm)
    structure = item.role == "structure"
    return Measures(
        item.name,
        long_axis_mm=math.nan if structure else item.long_axis.length_mm,
        short_axis_mm=math.nan if structure else item.short_axis.length_mm,
        volume_mm3=item.volume_mm3,
        mean_hu=item.mean_hu if structure or item.attenuation_from_core else math.nan,
        score_percent=score,
    )


def key_views(findings: Findings, info: PluginInfo, sources: Sequence[Dataset]) -> list[KeyView]:
    """What each key image shows, in report order (structures have none)."""
    items: list[Finding | Detection] = [f for f in findings.findings if f.role != "structure"]
    items += findings.detections
    views = []
    for number, item in enumerate(items[:MAX_KEY_IMAGES], start=1):
        if not 0 <= item.key_slice < len(sources):
            raise EncodeError(f"{item.name}: key slice {item.key_slice} outside 0..{len(sources) - 1}")
        if isinstance(item, Detection):
            outlines, axis = [item.outline], None
        else:
            outlines = list(item.contours.get(item.key_slice, []))
            axis = (item.long_axis.start, item.long_axis.end)
        header = f"{item.name} ({number} of {len(items)})  -  {_analysis(info)}"
        views.append(KeyView(measures(item), item.key_slice, outlines, axis, header,
                             _where(sources, item.key_slice)))
    return views


def _analysis(info: PluginInfo) -> str:
    return f"{common.display_name(info)} {common.ascii_text(info.version)}"


def _warning(info: PluginInfo) -> str:
    return "" if info.for_clinical_use else common.NOT_FOR_DIAGNOSTIC_USE


def _where(sources: Sequence[Dataset], z: int) -> str:
    """The key slice as a reader finds it: series, image number, position."""
    source = sources[z]
    image = source.get("InstanceNumber")
    text = f"Series {source.get('SeriesNumber', '?')}, image {image if image is not None else z + 1}"
    position = source.get("ImagePositionPatient")
    if position is not None and len(position) == 3:
        text += f", z {float(position[2]):.1f} mm"
    return text + f" (slice {z + 1} of {len(sources)})"


def _series_text(sources: Sequence[Dataset]) -> str:
    first = sources[0]
    description = common.ascii_text(str(first.get("SeriesDescription", "")), 40)
    return (f"Analysed: series {first.get('SeriesNumber', '?')}"
            + (f" '{description}'" if description else "")
            + f", {first.get('Modality', '')} {len(sources)} images")


def _summary(findings: Findings, info: PluginInfo, sources: list[Dataset], views: list[KeyView],
             absent_finding_type: Code | None) -> _Image:
    items: list[Finding | Detection] = [*findings.findings, *findings.detections]
    if items:
        title = f"{common.display_name(info)}: {len(items)} finding{'s' * (len(items) != 1)}"
    else:
        title = f"No {absent_finding(findings, absent_finding_type).meaning.lower()} detected"
    notes = [findings.summary] if findings.summary else []
    if views:
        notes.append(f"The next {len(views)} image{'s' * (len(views) != 1)}: one per finding, on its key slice.")
    text = SummaryText(
        title=common.ascii_text(title, 200),
        lines=[f"Model: {common.ascii_text(info.name, 80)} {common.ascii_text(info.version, 40)}"
               f" ({common.display_name(info)})", _series_text(sources)],
        rows=[measures(item) for item in items[: key_images.MAX_TABLE_ROWS]],
        warning=f"{common.NOT_FOR_DIAGNOSTIC_USE}: automated result, not cleared for clinical use"
        if not info.for_clinical_use else "",
        notes=[common.plain(n) for n in notes],
        more=max(0, len(items) - key_images.MAX_TABLE_ROWS),
    )
    references = [sources[z] for z in sorted({v.slice_index for v in views})] or sources
    return _Image(key_images.render_summary(text), key_images.summary_lines(text), references, None)


def _orientation(volume: Volume, source: Dataset) -> list[float]:
    """Image Orientation (Patient) of a source slice; from the volume's affine (the same
    directions) when the header lacks it."""
    if len(source.get("ImageOrientationPatient") or []) == 6:
        return [float(v) for v in source.ImageOrientationPatient]
    axes = volume.lps_affine()[:3, :2]
    return [float(v) for v in (axes / np.linalg.norm(axes, axis=0)).T.ravel()]


def _hu_slice(volume: Volume, z: int) -> np.ndarray:
    """Slice ``z`` of the volume in HU as (rows, columns)."""
    plane = volume.image[0, :, :, z]
    array = plane.detach().cpu().numpy() if hasattr(plane, "detach") else np.asarray(plane)
    return np.asarray(array, dtype=np.float32).T


def _source_item(source: Dataset) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = source.SOPClassUID
    item.ReferencedSOPInstanceUID = source.SOPInstanceUID
    item.PurposeOfReferenceCodeSequence = [
        hd.sr.CodedConcept.from_code(codes.DCM.SourceImageForImageProcessingOperation)
    ]
    return item


def _build(image: _Image, number: int, source: Dataset, info: PluginInfo,
           series_number: int, series_uid: str) -> hd.sc.SCImage:
    try:
        with common.no_phi_warnings():
            sc = hd.sc.SCImage(
                pixel_array=image.pixels,
                photometric_interpretation="RGB",
                bits_allocated=8,
                coordinate_system="PATIENT",
                study_instance_uid=source.StudyInstanceUID,
                series_instance_uid=series_uid,
                series_number=series_number,
                sop_instance_uid=common.new_uid(None),
                instance_number=number,
                manufacturer=NODE_MANUFACTURER,
                patient_orientation=image.orientation or ("L", "P"),
                contributing_equipment=common.contributing_equipment(info, source),
                series_description=common.series_description(info, "SC"),
                manufacturer_model_name=common.model_name(info),
                software_versions=list(common.software_versions(info)),
                device_serial_number=info.device_uid,
                specific_character_set=common.character_set(source),
            )
            sc.copy_patient_and_study_information(source)
    except (ValueError, TypeError) as e:
        raise EncodeError(f"cannot build key image {number}: {e}") from e
    if image.orientation is None:  # the summary is text: no patient orientation (Type 2C, empty)
        del sc.PatientOrientation
        sc.add_new("PatientOrientation", "CS", None)
    if source.get("BodyPartExamined"):
        sc.BodyPartExamined = source.BodyPartExamined
    else:  # Laterality is needed unless the body part says it is unpaired: the slice shows both sides
        sc.ImageLaterality = "B"
    sc.BurnedInAnnotation = "YES"
    sc.ImageComments = "\n".join(common.plain(line) for line in image.text)
    sc.DerivationDescription = DERIVATION if image.orientation else "Summary of the AI analysis, rendered as text"
    sc.SourceImageSequence = [_source_item(ref) for ref in image.references]
    if any(ref.get("LossyImageCompression") == "01" for ref in image.references):
        sc.LossyImageCompression = "01"
    return sc
