"""Pick the one series of a study that a plugin's :class:`SeriesCriteria` wants.

Only headers are read. Instances are grouped by SeriesInstanceUID; each group
is checked in this order, and the first failed check is its rejection reason:

1. not produced by this node (Manufacturer ``dicom-node``), an image storage SOP
   class, not a secondary capture (this also skips SEG, SR, dose reports, PDFs);
2. Modality equals ``criteria.modality`` and the SOP class is one of
   ``criteria.sop_class_uids``;
3. no ``LOCALIZER`` and no ``DERIVED``/``SECONDARY`` in ImageType (unless the
   criteria require those values), and ImageType holds every value of
   ``criteria.image_type_required``;
4. one orientation for all instances (otherwise it is a localizer);
5. BodyPartExamined and SeriesDescription match the optional regexes
   (``re.search``, case as given);
6. multi-phase split: a series with duplicate slice positions is split into
   sub-series by AcquisitionNumber, else TemporalPositionIndex, else
   ContentTime (the first key that leaves no duplicates); if none does, the
   series is rejected. Each sub-series is a candidate of its own;
7. slice count within ``[min_slices, max_slices]``;
8. the stack passes the volume geometry checks (:func:`check_stack`) and its
   slice spacing lies in ``criteria.slice_spacing_mm``.

Tiebreak among qualifying candidates: thinnest slice spacing (compared rounded
to 0.01 mm), then most slices, then lowest SeriesNumber (missing counts as
highest), then SeriesInstanceUID (string order), then the lowest split value.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import SeriesError
from dicom_node.series.geometry import check_stack, has_duplicate_positions, orientations_agree
from dicom_node.series.headers import SliceHeader, read_headers, sop_class_name
from plugin.types import SeriesCriteria

logger = logging.getLogger(__name__)

_SPLIT_KEYS: tuple[tuple[str, Callable[[SliceHeader], object]], ...] = (
    ("AcquisitionNumber", lambda h: h.acquisition_number),
    ("TemporalPositionIndex", lambda h: h.temporal_position_index),
    ("ContentTime", lambda h: h.content_time),
)


@dataclass(frozen=True)
class Selection:
    """The chosen series, its files in slice order, and why others were rejected."""

    series_instance_uid: str
    paths: tuple[Path, ...]
    rejected: tuple[str, ...]
    slice_spacing_mm: float
    sub_series: str | None = None  # e.g. "AcquisitionNumber=2" after a split
    headers: tuple[SliceHeader, ...] = ()  # the headers of ``paths``, same order


@dataclass(frozen=True)
class _Candidate:
    label: str
    headers: tuple[SliceHeader, ...]  # in slice order
    spacing: float
    series_number: int | None
    series_uid: str
    split_value: str
    sub_series: str | None

    def sort_key(self) -> tuple[float, int, int, str, tuple[int, float, str]]:
        number = self.series_number if self.series_number is not None else 2**31
        return (
            round(self.spacing, 2),
            -len(self.headers),
            number,
            self.series_uid,
            _natural(self.split_value),
        )


def _natural(value: str) -> tuple[int, float, str]:
    """Sort numbers numerically (``"2" < "10"``), before any other text."""
    try:
        return (0, float(value), "")
    except ValueError:
        return (1, 0.0, value)


class _Rejected(Exception):
    """Internal: a series or sub-series does not qualify (message = reason)."""


def select_series(paths: Sequence[Path], criteria: SeriesCriteria) -> Selection:
    """Choose the series that best matches ``criteria`` among ``paths``.

    Raises:
        SeriesError: no series qualifies; the message lists each series and why.
    """
    headers, problems = read_headers(paths)
    groups: dict[str, list[SliceHeader]] = defaultdict(list)
    for header in headers:
        groups[header.series_instance_uid].append(header)
    candidates: list[_Candidate] = []
    rejected: list[str] = []
    if problems:
        rejected.append(f"{len(problems)} unreadable file(s)")
    for uid in sorted(groups):
        found, reasons = _evaluate_series(uid, groups[uid], criteria)
        candidates.extend(found)
        rejected.extend(reasons)
    if not candidates:
        raise SeriesError(_nothing_message(criteria, rejected))
    candidates.sort(key=_Candidate.sort_key)
    chosen = candidates[0]
    rejected.extend(
        f"{c.label}: qualified, but {chosen.label} preferred ({_why(chosen, c)})"
        for c in candidates[1:]
    )
    logger.info(
        "selected series %s (%d slices, %.2f mm); %d other(s) rejected",
        chosen.label,
        len(chosen.headers),
        chosen.spacing,
        len(rejected),
    )
    return Selection(
        series_instance_uid=chosen.series_uid,
        paths=tuple(h.path for h in chosen.headers),
        rejected=tuple(rejected),
        slice_spacing_mm=chosen.spacing,
        sub_series=chosen.sub_series,
        headers=chosen.headers,
    )


_TIEBREAK_REASONS = (
    "thinner slices",
    "more slices",
    "lower SeriesNumber",
    "lower SeriesInstanceUID",
    "lower split value",
)


def _why(chosen: _Candidate, other: _Candidate) -> str:
    """Name the tiebreak rule that put ``chosen`` before ``other``."""
    for reason, a, b in zip(_TIEBREAK_REASONS, chosen.sort_key(), other.sort_key(), strict=True):
        if a != b:
            return reason
    return "input order"


def _nothing_message(criteria: SeriesCriteria, rejected: list[str]) -> str:
    low, high = criteria.slice_spacing_mm
    wanted = (
        f"no {criteria.modality} series with >= {criteria.min_slices} slices "
        f"and slice spacing {low:g}-{high:g} mm"
    )
    return f"{wanted}: " + ("; ".join(rejected) if rejected else "no instances given")


def _evaluate_series(
    uid: str, headers: list[SliceHeader], criteria: SeriesCriteria
) -> tuple[list[_Candidate], list[str]]:
    label = f"series {uid} ({len(headers)} images)"
    try:
        _check_series_kind(headers, criteria)
        parts = _split_phases(headers)
    except _Rejected as e:
        return [], [f"{label}: {e}"]
    found: list[_Candidate] = []
    reasons: list[str] = []
    for sub_series, split_value, members in parts:
        sub_label = (
            label if sub_series is None else f"series {uid} [{sub_series}] ({len(members)} images)"
        )
        try:
            found.append(_candidate(sub_label, sub_series, split_value, members, criteria))
        except _Rejected as e:
            reasons.append(f"{sub_label}: {e}")
    return found, reasons


def _check_series_kind(headers: list[SliceHeader], criteria: SeriesCriteria) -> None:
    if any(h.is_own for h in headers):
        raise _Rejected("produced by this node")
    for h in headers:
        if not h.is_image:
            raise _Rejected(f"not an image series ({sop_class_name(h.sop_class_uid)})")
    if any(h.is_secondary_capture for h in headers):
        raise _Rejected("secondary capture")
    for h in headers:
        if h.modality != criteria.modality:
            raise _Rejected(f"modality {h.modality or 'missing'}, wanted {criteria.modality}")
        if h.sop_class_uid not in criteria.sop_class_uids:
            raise _Rejected(f"SOP class {sop_class_name(h.sop_class_uid)} not wanted")
    _check_image_type(headers, criteria)
    if not orientations_agree(headers):
        raise _Rejected("localizer (orientations differ or are missing)")
    _check_regex(criteria.body_part_regex, [h.body_part for h in headers], "BodyPartExamined")
    _check_regex(
        criteria.series_description_regex,
        [h.series_description for h in headers],
        "SeriesDescription",
    )


def _check_image_type(headers: list[SliceHeader], criteria: SeriesCriteria) -> None:
    required = {v.upper() for v in criteria.image_type_required}
    for header in headers:
        values = set(header.image_type)
        if "LOCALIZER" in values and "LOCALIZER" not in required:
            raise _Rejected("localizer")
        derived = values & {"DERIVED", "SECONDARY"}
        if derived - required:
            raise _Rejected(f"derived image (ImageType {'/'.join(sorted(derived))})")
        missing = required - values
        if missing:
            raise _Rejected(f"ImageType lacks {'/'.join(sorted(missing))}")


def _check_regex(pattern: str | None, values: list[str], keyword: str) -> None:
    if pattern is None:
        return
    if not all(re.search(pattern, value) for value in values):
        raise _Rejected(f"{keyword} does not match {pattern!r}")


def _split_phases(
    headers: list[SliceHeader],
) -> list[tuple[str | None, str, list[SliceHeader]]]:
    """Return ``(sub-series name, split value, members)``; one part when no split."""
    try:
        duplicates = has_duplicate_positions(headers)
    except SeriesError as e:
        raise _Rejected(str(e)) from e
    if not duplicates:
        return [(None, "", headers)]
    for keyword, key in _SPLIT_KEYS:
        parts: dict[str, list[SliceHeader]] = defaultdict(list)
        for header in headers:
            parts[str(key(header))].append(header)
        if len(parts) > 1 and not any(has_duplicate_positions(p) for p in parts.values()):
            logger.debug("split series into %d parts by %s", len(parts), keyword)
            ordered = sorted(parts, key=_natural)
            return [(f"{keyword}={value}", value, parts[value]) for value in ordered]
    raise _Rejected(
        "duplicate slice positions not resolved by AcquisitionNumber, "
        "TemporalPositionIndex or ContentTime"
    )


def _candidate(
    label: str,
    sub_series: str | None,
    split_value: str,
    headers: list[SliceHeader],
    criteria: SeriesCriteria,
) -> _Candidate:
    count = len(headers)
    if count < criteria.min_slices:
        raise _Rejected(f"too few slices ({count} < {criteria.min_slices})")
    if count > criteria.max_slices:
        raise _Rejected(f"too many slices ({count} > {criteria.max_slices})")
    try:
        geometry = check_stack(headers)
    except SeriesError as e:
        raise _Rejected(str(e)) from e
    spacing = geometry.spacing[2]
    low, high = criteria.slice_spacing_mm
    if not low <= spacing <= high:
        raise _Rejected(f"slice spacing {spacing:.2f} mm outside {low:g}-{high:g} mm")
    return _Candidate(
        label=label,
        headers=tuple(headers[i] for i in geometry.order),
        spacing=spacing,
        series_number=headers[0].series_number,
        series_uid=headers[0].series_instance_uid,
        split_value=split_value,
        sub_series=sub_series,
    )
