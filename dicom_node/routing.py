"""Route rules: which stable studies go to which plugin.

A route matches a study when at least one of its analysable series satisfies every
entry of the route's ``match``. Each value is a regular expression searched in the
attribute (``re.search``; anchor with ``^…$`` for an exact match). An empty
``match`` matches every study.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from dicom_node.config import Route

# Route match key -> column of the series table.
SERIES_COLUMNS = {
    "Modality": "modality",
    "BodyPartExamined": "body_part",
    "SeriesDescription": "series_description",
    "StudyDescription": "study_description",
    "SOPClassUID": "sop_class_uid",
    "Manufacturer": "manufacturer",
    "CalledAETitle": "called_ae",
    "CallingAETitle": "calling_ae",
}


def series_matches(route: Route, series: dict[str, Any]) -> bool:
    """True when one series satisfies every entry of the route's match."""
    for key, pattern in route.match.items():
        value = series.get(SERIES_COLUMNS[key]) or ""
        if not re.search(pattern, str(value)):
            return False
    return True


def matching_routes(routes: Sequence[Route], series: Sequence[dict[str, Any]]) -> list[Route]:
    """Routes that match a study, given its analysable series."""
    return [r for r in routes if any(series_matches(r, s) for s in series)]
