"""DICOM result encoding: a highdicom SEG, a TID 1500 Comprehensive 3D SR, key images
as Secondary Capture and a Key Object Selection document."""

from __future__ import annotations

from dicom_node.results.common import result_series_numbers
from dicom_node.results.kos import encode_kos
from dicom_node.results.sc import encode_key_images
from dicom_node.results.seg import encode_seg
from dicom_node.results.sr import encode_sr

__all__ = ["encode_key_images", "encode_kos", "encode_seg", "encode_sr", "result_series_numbers"]
