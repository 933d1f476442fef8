"""The manifest next to a MONAI bundle: identity, series criteria and label codes.

A bundle says nothing about which label is which finding, nor how it is coded in
DICOM. ``manifest.yaml`` fills that gap without code::

    name: lung_nodules
    display_name: AI Lung Nodules
    version: 0.1.0
    device_uid: "2.25.123..."
    for_clinical_use: false
    procedure: {scheme: LN, value: "24627-2", meaning: "Chest CT"}
    series: {modality: CT, min_slices: 64, max_slices: 2000, slice_spacing_mm: [0.5, 5.0],
             image_type_required: [ORIGINAL, PRIMARY], body_part_regex: null,
             series_description_regex: null}
    labels:
      1:
        name: Nodule
        per_component: true     # each connected component is a finding "Nodule 1", ...
        min_volume_mm3: 15      # smaller components (and measured findings) are dropped
        category: {scheme: SCT, value: "49755003", meaning: "Morphologically abnormal structure"}
        type: {scheme: SCT, value: "27925004", meaning: "Nodule"}
        site: {scheme: SCT, value: "39607008", meaning: "Lung"}
        color: [255, 64, 64]

A detection bundle (boxes with scores, e.g. the Model Zoo's ``lung_nodule_ct_detection``)
says ``kind: detection``; its ``labels`` are keyed by the detector's class index (from 0)
and ``detection`` sets the score threshold and the most findings kept::

    kind: detection
    detection: {score_threshold: 0.5, max_findings: 10}
    labels:
      0: {name: Nodule, category: ..., type: ...}

Further keys for Model Zoo bundles run unchanged:

* ``overrides``: bundle config values replaced at parse time, as MONAI's own
  ``--key value`` overrides (e.g. ``infer_patch_size: [192, 192, 80]``);
* ``requires``: Python distributions the bundle needs for what the node runs of it
  (its transforms, network, inferer and scripts), checked when the plugin is created;
* a label's ``modifier`` (e.g. laterality, SCT 24028007 "Right") and its ``role``:
  ``finding`` (measured with axes and outlines) or ``structure`` (an organ: its volume
  and mean attenuation only);
* a finding label's ``boundary``: ``mask`` (the model's mask as it is, the default) or
  ``half_maximum`` (the mask moved to the lesion's half-maximum edge on the source grid,
  the volume corrected for partial volume: :mod:`plugin.lesion_measure`; for lesions
  brighter than the lung around them);
* a finding label's ``mass``: ``{min_long_axis_mm: 30, name: Mass, type: {SCT 4147007}}``
  reports a finding at least that long as a mass ("Mass 1") instead of the label's type.

Unknown keys are errors; every error names the file and the key.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydicom.sr.coding import Code

from plugin.errors import PluginError
from plugin.types import PluginInfo, SegmentCodes, SeriesCriteria

logger = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.yaml"
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CodeSpec(_Strict):
    """A coded concept: ``{scheme: SCT, value: "78961009", meaning: "Spleen"}``."""

    scheme: str = Field(min_length=1, max_length=16)
    value: str = Field(min_length=1, max_length=64)
    meaning: str = Field(min_length=1, max_length=64)

    def code(self) -> Code:
        """The pydicom ``Code``."""
        return Code(value=self.value, scheme_designator=self.scheme, meaning=self.meaning)


class SeriesSpec(_Strict):
    """Which series the analysis wants (see :class:`plugin.types.SeriesCriteria`)."""

    modality: str = "CT"
    sop_class_uids: tuple[str, ...] = (_CT_IMAGE_STORAGE,)
    min_slices: int = Field(default=64, ge=1)
    max_slices: int = Field(default=2000, ge=1)
    slice_spacing_mm: tuple[float, float] = (0.5, 5.0)
    image_type_required: tuple[str, ...] = ("ORIGINAL", "PRIMARY")
    body_part_regex: str | None = None
    series_description_regex: str | None = None

    @field_validator("body_part_regex", "series_description_regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"not a valid regular expression: {e}") from e
        return value

    @model_validator(mode="after")
    def _ranges(self) -> SeriesSpec:
        if self.min_slices > self.max_slices:
            raise ValueError("min_slices must not exceed max_slices")
        low, high = self.slice_spacing_mm
        if not 0 < low <= high:
            raise ValueError("slice_spacing_mm must be [low, high] with 0 < low <= high")
        return self


class MassSpec(_Strict):
    """A finding at least ``min_long_axis_mm`` long is reported as this (e.g. a lung mass)."""

    min_long_axis_mm: float = Field(gt=0.0)
    name: str = Field(min_length=1, max_length=56)
    type: CodeSpec


class LabelSpec(_Strict):
    """What one label value of the bundle's output means."""

    name: str = Field(min_length=1, max_length=56)
    per_component: bool = False
    min_volume_mm3: float = Field(default=0.0, ge=0.0)
    category: CodeSpec
    type: CodeSpec
    site: CodeSpec | None = None
    modifier: CodeSpec | None = None  # Segmented Property Type Modifier, e.g. laterality
    role: Literal["finding", "structure"] = "finding"
    color: tuple[int, int, int] = (255, 0, 0)
    # "half_maximum": a finding's mask is moved to the lesion's half-maximum edge on the
    # source grid and its volume corrected for partial volume (plugin.lesion_measure)
    boundary: Literal["mask", "half_maximum"] = "mask"
    mass: MassSpec | None = None

    @field_validator("color")
    @classmethod
    def _rgb(cls, value: tuple[int, int, int]) -> tuple[int, int, int]:
        if any(not 0 <= c <= 255 for c in value):
            raise ValueError("each colour component must be in 0..255")
        return value

    def segment_codes(self) -> SegmentCodes:
        """The codes for SEG segments and SR findings of this label."""
        return SegmentCodes(
            category=self.category.code(),
            type=self.type.code(),
            site=self.site.code() if self.site is not None else None,
            color_rgb=self.color,
            modifier=self.modifier.code() if self.modifier is not None else None,
        )


class DetectionSpec(_Strict):
    """How a detection bundle's boxes become findings."""

    score_threshold: float = Field(default=0.5, ge=0.0, le=1.0)
    max_findings: int = Field(default=10, ge=1, le=1000)
    # how the bundle's postprocessing gives its boxes (see plugin.boxes)
    box_mode: Literal["cccwhd", "xyzxyz"] = "cccwhd"
    box_coordinates: Literal["LPS", "RAS"] = "LPS"


class Manifest(_Strict):
    """A validated ``manifest.yaml``."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    display_name: str = Field(min_length=1, max_length=64)
    version: str = Field(min_length=1, max_length=64)
    device_uid: str = Field(min_length=1, max_length=64)
    manufacturer: str = Field(default="dicom-node", min_length=1, max_length=64)
    for_clinical_use: bool = False
    procedure: CodeSpec
    series: SeriesSpec = SeriesSpec()
    kind: Literal["segmentation", "detection"] = "segmentation"
    detection: DetectionSpec = DetectionSpec()
    overrides: dict[str, Any] = Field(default_factory=dict)
    requires: tuple[str, ...] | None = None
    # output channels the bundle's metadata names and ``labels`` does not: "report" them
    # under the bundle's name with a fallback code (SCT 91723000), or "ignore" them
    unlisted_labels: Literal["report", "ignore"] = "report"
    labels: dict[int, LabelSpec] = Field(min_length=1)

    @field_validator("device_uid")
    @classmethod
    def _uid(cls, value: str) -> str:
        if not _UID_RE.match(value):
            raise ValueError("not a valid DICOM UID (digits and dots, no leading zeros)")
        return value

    @field_validator("labels")
    @classmethod
    def _label_values(cls, value: dict[int, LabelSpec], info: ValidationInfo) -> dict[int, LabelSpec]:
        if info.data.get("kind") == "detection":
            if any(k < 0 for k in value):
                raise ValueError("detector class indices must be >= 0")
        elif any(k < 1 for k in value):
            raise ValueError("label values must be >= 1 (0 is background)")
        return value

    def plugin_info(self) -> PluginInfo:
        """Provenance of every result this analysis produces."""
        return PluginInfo(
            name=self.name,
            version=self.version,
            device_uid=self.device_uid,
            display_name=self.display_name,
            manufacturer=self.manufacturer,
            for_clinical_use=self.for_clinical_use,
        )

    def series_criteria(self) -> SeriesCriteria:
        """The series this analysis wants."""
        s = self.series
        return SeriesCriteria(
            modality=s.modality,
            sop_class_uids=tuple(s.sop_class_uids),
            image_type_required=tuple(s.image_type_required),
            min_slices=s.min_slices,
            max_slices=s.max_slices,
            slice_spacing_mm=(float(s.slice_spacing_mm[0]), float(s.slice_spacing_mm[1])),
            body_part_regex=s.body_part_regex,
            series_description_regex=s.series_description_regex,
        )

    def procedure_code(self) -> Code:
        """The procedure reported in the SR."""
        return self.procedure.code()

    def segment_codes(self) -> dict[int, SegmentCodes]:
        """Codes per label value."""
        return {value: spec.segment_codes() for value, spec in sorted(self.labels.items())}


def _describe(error: ValidationError) -> str:
    parts = []
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"]) or "(top level)"
        parts.append(f"{key}: {item['msg']}")
    return "; ".join(parts)


def parse_manifest(data: Any, source: str = MANIFEST_NAME) -> Manifest:
    """Validate an already loaded manifest mapping; ``source`` names it in errors."""
    if not isinstance(data, dict):
        raise PluginError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        raise PluginError(f"{source}: invalid manifest: {_describe(e)}") from e


def load_manifest(path: Path) -> Manifest:
    """Load and validate ``path`` (a ``manifest.yaml`` or the folder holding one)."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise PluginError(f"{path}: cannot read the manifest: {e.strerror or e}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PluginError(f"{path}: not valid YAML: {e}") from e
    manifest = parse_manifest(data, str(path))
    logger.debug("loaded manifest %s (%s %s)", path, manifest.name, manifest.version)
    return manifest
