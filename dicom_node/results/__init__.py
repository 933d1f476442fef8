"""DICOM result encoding: a highdicom SEG and a TID 1500 Comprehensive 3D SR."""

from __future__ import annotations

from dicom_node.results.common import result_series_numbers
from dicom_node.results.seg import encode_seg
from dicom_node.results.sr import encode_sr

__all__ = ["encode_seg", "encode_sr", "result_series_numbers"]
