"""Provenance shared by every result object (SEG, SR, key images, KOS).

Series numbering
----------------
Results of one analysis run ("revision") get up to four new series in the patient's
study, one per output::

    SEG                     series number = 9001 + 10 * revision
    SR                      series number = 9002 + 10 * revision
    key images (SC)         series number = 9003 + 10 * revision
    key objects (KOS)       series number = 9004 + 10 * revision

Revision 0 gives 9001-9004, revision 1 gives 9011-9014, and so on. The numbers are
deterministic, so a re-sent result lands in the same series number, and a newer
revision (late instances re-opened the study) sorts after the older one in a viewer.
The last digit leaves room for further result types (9005: PDF, ...).

Patient and study modules are copied from the first source image by highdicom
(``SOPClass.copy_patient_and_study_information``); :func:`load_sources` makes sure
the source files are the ones the volume says they are.
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.metadata
import logging
import re
import unicodedata
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

from dicom_node.errors import EncodeError
from dicom_node.identity import NODE_MANUFACTURER
from plugin.types import Detection, Finding, PluginInfo, Volume

logger = logging.getLogger(__name__)

NODE_VERSION_FALLBACK = "0.1.0"
SERIES_NUMBER_BASE = 9000
SERIES_NUMBER_STRIDE = 10
NOT_FOR_DIAGNOSTIC_USE = "NOT FOR DIAGNOSTIC USE"
LO_MAX = 64  # maximum length of a DICOM LO value

#: What a reader sees of each output in the series description.
OUTPUT_LABELS = {"SEG": "SEG", "SR": "SR", "SC": "Key images", "KOS": "Key objects"}


class ResultSeriesNumbers(NamedTuple):
    """The series numbers of one revision's results, one per output."""

    seg: int
    sr: int
    sc: int
    kos: int


def result_series_numbers(revision: int) -> ResultSeriesNumbers:
    """Deterministic series numbers for result revision ``revision``.

    ``revision`` 0 -> (9001, 9002, 9003, 9004), 1 -> (9011, ..., 9014); see the module
    docstring.
    """
    if revision < 0:
        raise ValueError(f"revision must be >= 0, got {revision}")
    base = SERIES_NUMBER_BASE + SERIES_NUMBER_STRIDE * revision
    return ResultSeriesNumbers(base + 1, base + 2, base + 3, base + 4)


def node_version() -> str:
    """Installed version of the node package (fallback when not installed)."""
    try:
        return importlib.metadata.version("dicom-node")
    except importlib.metadata.PackageNotFoundError:
        return NODE_VERSION_FALLBACK


def ascii_text(text: str, max_len: int = LO_MAX) -> str:
    """``text`` reduced to printable ASCII (accents stripped), at most ``max_len``."""
    plain = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    plain = "".join(ch for ch in plain if ch.isprintable() and ch != "\\")
    return plain.strip()[:max_len].rstrip()


def plain(text: str) -> str:
    """``text`` as printable ASCII for SR TEXT/UT values (results carry no character set
    of their own unless the source has one)."""
    return ascii_text(text, 1024)


def series_description(info: PluginInfo, kind: str) -> str:
    """Series description such as ``"AI Lung Nodules - SEG - NOT FOR DIAGNOSTIC USE"``.

    ``kind`` is a key of :data:`OUTPUT_LABELS` (``"SC"`` reads "Key images"). The
    display name gets an "AI " prefix unless it starts with "AI" already, and is
    shortened so the whole value fits in an LO (64 chars).
    """
    suffix = f" - {OUTPUT_LABELS.get(kind, kind)}"
    if not info.for_clinical_use:
        suffix += f" - {NOT_FOR_DIAGNOSTIC_USE}"
    room = max(LO_MAX - len(suffix), 0)
    return f"{display_name(info)[:room].rstrip()}{suffix}"[:LO_MAX]


def display_name(info: PluginInfo) -> str:
    """The analysis as a reader sees it: its display name (ASCII), with an "AI " prefix
    unless the name starts with "AI" already ("AI Lung Nodules", never "AI AI ...")."""
    name = ascii_text(info.display_name or info.name, LO_MAX) or "analysis"
    return name if re.match(r"AI\b", name, flags=re.IGNORECASE) else f"AI {name}"


def software_versions(info: PluginInfo) -> tuple[str, str]:
    """SoftwareVersions values: the node version and the plugin version."""
    node = ascii_text(f"{NODE_MANUFACTURER} {node_version()}")
    plugin = ascii_text(f"{info.name} {info.version}")
    return node, plugin


def model_name(info: PluginInfo) -> str:
    """ManufacturerModelName of a result: the analysis that produced it."""
    return ascii_text(info.name) or "analysis"


def algorithm_identification(info: PluginInfo) -> hd.AlgorithmIdentificationSequence:
    """SEG Algorithm Identification (family: DCM 123110 Artificial Intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=ascii_text(info.display_name or info.name) or "analysis",
        family=codes.cid7162.ArtificialIntelligence,
        version=ascii_text(info.version, 64) or "unknown",
        source=ascii_text(info.manufacturer) or None,
    )


def contributing_equipment(info: PluginInfo, source: Dataset | None = None) -> list[hd.ContributingEquipment]:
    """Contributing Equipment per IHE AI Results: the node and the algorithm, after the
    acquisition equipment of ``source`` when given (highdicom adds that one itself to the
    SEG and the SR; the key images and the KOS pass their source here)."""
    acquisition = []
    if source is not None:
        try:
            acquisition = [hd.ContributingEquipment.for_image_acquisition(source)]
        except (ValueError, AttributeError):  # not an image, or no Manufacturer
            logger.debug("source image names no acquisition equipment")
    now = datetime.datetime.now(datetime.timezone.utc)
    node = hd.ContributingEquipment(
        manufacturer=NODE_MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=NODE_MANUFACTURER,
        software_versions=ascii_text(node_version()),
        contribution_datetime=now,
        contribution_description="Series selection, volume building, result encoding",
    )
    algorithm = hd.ContributingEquipment(
        manufacturer=ascii_text(info.manufacturer) or NODE_MANUFACTURER,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=model_name(info),
        software_versions=ascii_text(info.version) or "unknown",
        device_serial_number=info.device_uid,
        contribution_datetime=now,
        contribution_description=ascii_text(
            f"AI analysis: {info.display_name or info.name}", LO_MAX
        ),
    )
    return [*acquisition, node, algorithm]


def tracking_uid(volume: Volume, info: PluginInfo, finding: Finding | Detection) -> str:
    """Deterministic tracking UID of one finding (shared by its SEG segment and SR groups)."""
    sources = [
        volume.study_instance_uid,
        volume.series_instance_uid,
        info.name,
        info.version,
        str(finding.label),
        finding.name,
    ]
    return str(generate_uid(entropy_srcs=sources))


def new_uid(uid: str | None) -> str:
    """``uid`` if given, else a fresh UID."""
    return str(uid) if uid else str(generate_uid())


def load_sources(volume: Volume) -> list[Dataset]:
    """The source headers (no pixels) in volume order, checked.

    The headers the volume builder kept are used when there is one per slice;
    otherwise they are read from the source files.

    Raises :class:`EncodeError` when a file cannot be read or is not the instance,
    study or frame of reference the volume names.
    """
    if not volume.slices:
        raise EncodeError("volume has no source slices")
    kept = volume.source_headers
    if len(kept) == len(volume.slices) and all(isinstance(ds, Dataset) for ds in kept):
        datasets = list(kept)
    else:
        datasets = [_read_header(ref.path) for ref in volume.slices]
    for ref, ds in zip(volume.slices, datasets, strict=True):
        _check_source(volume, ref.sop_instance_uid, ds)
    logger.debug(
        "loaded %d source headers for study %s", len(datasets), volume.study_instance_uid
    )
    return datasets


def _read_header(path: object) -> Dataset:
    try:
        return pydicom.dcmread(path, stop_before_pixels=True)  # type: ignore[arg-type]
    except (OSError, InvalidDicomError) as e:
        raise EncodeError(f"cannot read source image {path}: {e}") from e


def _check_source(volume: Volume, sop_instance_uid: str, ds: Dataset) -> None:
    if ds.get("SOPInstanceUID") != sop_instance_uid:
        raise EncodeError(
            f"source file holds {ds.get('SOPInstanceUID')}, expected {sop_instance_uid}"
        )
    if ds.get("StudyInstanceUID") != volume.study_instance_uid:
        raise EncodeError(f"source {sop_instance_uid} is not in study {volume.study_instance_uid}")
    if ds.get("FrameOfReferenceUID") != volume.frame_of_reference_uid:
        raise EncodeError(f"source {sop_instance_uid} has another frame of reference")


def character_set(source: Dataset) -> str | list[str] | None:
    """Specific Character Set for a result, taken from its source image.

    An empty or absent value means the default repertoire: return ``None`` so the
    attribute is left out (highdicom rejects an empty value). An empty first value
    of a multi-valued set is the default repertoire with extensions, written
    ``ISO 2022 IR 6``.
    """
    raw = source.get("SpecificCharacterSet")
    if not raw:
        return None
    values = [str(v) for v in raw] if isinstance(raw, (list, MultiValue)) else [str(raw)]
    if len(values) > 1 and not values[0]:
        values[0] = "ISO 2022 IR 6"
    if not values[0]:
        return None
    return values if len(values) > 1 else values[0]


@contextlib.contextmanager
def no_phi_warnings() -> Iterator[None]:
    """Silence highdicom's person-name warning: its text quotes the patient's name."""
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r"The string .* person name", category=UserWarning
        )
        yield


def check_grid(volume: Volume, findings_shape: Sequence[int]) -> None:
    """Raise :class:`EncodeError` unless the label map is on the volume grid."""
    if tuple(findings_shape) != tuple(volume.shape):
        raise EncodeError(
            f"label map shape {tuple(findings_shape)} != volume shape {volume.shape}"
        )
    if volume.shape[2] != len(volume.slices):
        raise EncodeError(
            f"volume has {volume.shape[2]} slices but {len(volume.slices)} source references"
        )
