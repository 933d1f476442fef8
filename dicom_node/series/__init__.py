"""Series selection and volume building.

* :func:`select_series` picks the series of a study that a plugin's criteria want
  (headers only) and says why every other series was rejected.
* :func:`build_volume` turns the files of one series into a checked
  :class:`plugin.types.Volume` (MONAI ``MetaTensor``, RAS affine).

Both raise :class:`dicom_node.errors.SeriesError` with a plain-words reason.
"""

from __future__ import annotations

from dicom_node.series.geometry import StackGeometry, check_stack
from dicom_node.series.headers import SliceHeader, read_header, read_headers
from dicom_node.series.selection import Selection, select_series
from dicom_node.series.volume import build_volume

__all__ = [
    "Selection",
    "SliceHeader",
    "StackGeometry",
    "build_volume",
    "check_stack",
    "read_header",
    "read_headers",
    "select_series",
]
