"""Encode a Key Object Selection document (TID 2010, title "Of Interest", CID 7010).

It selects, in this order: the key images (Secondary Capture, summary first), the source
images the findings were measured on (their key slices), the SEG and the SR, so that a
viewer with KOS support offers them as the study's key objects. The document carries the
device observer (the model, as in the SR), a Key Object Description, and the same
provenance as the other results (Manufacturer, model, software versions, device serial
number, Contributing Equipment).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import SecondaryCaptureImageStorage

from dicom_node.errors import EncodeError
from dicom_node.identity import NODE_MANUFACTURER
from dicom_node.results import common, sr_content
from plugin.types import Detection, Finding, Findings, PluginInfo, Volume

logger = logging.getLogger(__name__)

TITLE = codes.cid7010.OfInterest  # (113000, DCM, "Of Interest")
_PATIENT_STUDY = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber",
                  "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName")


def key_source_images(findings: Findings, sources: Sequence[Dataset]) -> list[Dataset]:
    """The source images the findings are shown on (their key slices), in slice order."""
    items: list[Finding | Detection] = [*findings.findings, *findings.detections]
    slices = {item.key_slice for item in items if getattr(item, "role", "finding") != "structure"}
    return [sources[z] for z in sorted(slices) if 0 <= z < len(sources)]


def selection(findings: Findings, sources: Sequence[Dataset], results: Sequence[Dataset]) -> list[Dataset]:
    """What the document selects: key images, key source images, then SEG and SR."""
    key = [ds for ds in results if ds.SOPClassUID == SecondaryCaptureImageStorage]
    others = [ds for ds in results if ds.SOPClassUID != SecondaryCaptureImageStorage]
    key.sort(key=lambda ds: int(ds.InstanceNumber))
    return [*key, *key_source_images(findings, sources), *others]


def encode_kos(
    volume: Volume,
    findings: Findings,
    info: PluginInfo,
    *,
    series_number: int,
    results: Sequence[Dataset],
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    sources: list[Dataset] | None = None,
) -> Dataset:
    """The KOS selecting ``results`` (the other result objects) and the key source images.

    Raises :class:`EncodeError` when there is nothing to select or highdicom rejects
    the inputs.
    """
    sources = sources if sources is not None else common.load_sources(volume)
    selected = selection(findings, sources, results)
    if not selected:
        raise EncodeError("no key images, key source images or results to select")
    content = hd.ko.KeyObjectSelection(
        document_title=TITLE,
        referenced_objects=selected,
        observer_device_context=sr_content.device_observer(info),
        description=description(findings, info, results),
    )
    try:
        with common.no_phi_warnings():
            kos = hd.ko.KeyObjectSelectionDocument(
                evidence=[_with_patient(selected[0], sources[0]), *selected],
                content=content,
                series_instance_uid=common.new_uid(series_instance_uid),
                series_number=series_number,
                sop_instance_uid=common.new_uid(sop_instance_uid),
                instance_number=1,
                manufacturer=NODE_MANUFACTURER,
                contributing_equipment=common.contributing_equipment(info, sources[0]),
                series_description=common.series_description(info, "KOS"),
                manufacturer_model_name=common.model_name(info),
                software_versions=list(common.software_versions(info)),
                device_serial_number=info.device_uid,
                specific_character_set=common.character_set(sources[0]),
            )
            kos.copy_patient_and_study_information(sources[0])
    except (ValueError, TypeError, AttributeError) as e:
        raise EncodeError(f"cannot build KOS: {e}") from e
    logger.info("encoded KOS %s: %d objects selected, study %s", kos.SOPInstanceUID, len(selected),
                volume.study_instance_uid)
    return kos


def description(findings: Findings, info: PluginInfo, results: Sequence[Dataset]) -> str:
    """The Key Object Description: the analysis, what it found, what is selected."""
    count = findings.count
    kinds = sorted({common.OUTPUT_LABELS.get(_kind(ds), _kind(ds)) for ds in results})
    text = (f"{common.display_name(info)} {info.version}: "
            + (f"{count} finding{'s' * (count != 1)}" if count else "no findings")
            + (f"; {', '.join(kinds)}" if kinds else "")
            + ("" if info.for_clinical_use else f". {common.NOT_FOR_DIAGNOSTIC_USE}"))
    return common.plain(text)


def _kind(ds: Dataset) -> str:
    return "SC" if ds.SOPClassUID == SecondaryCaptureImageStorage else str(ds.Modality)


def _with_patient(first: Dataset, source: Dataset) -> Dataset:
    """``first``'s identity with the patient and study attributes highdicom's KOS
    constructor reads from its first evidence item (empty where the source has none)."""
    proxy = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
        setattr(proxy, keyword, first.get(keyword))
    for keyword in _PATIENT_STUDY:
        setattr(proxy, keyword, copy.deepcopy(source.get(keyword)))
    return proxy
