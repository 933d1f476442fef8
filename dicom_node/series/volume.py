"""Build a checked 3D :class:`~plugin.types.Volume` from the files of one series.

The result is a MONAI ``MetaTensor`` of shape ``(1, X, Y, Z)``, float32 HU, with
``X`` the column index, ``Y`` the row index and ``Z`` the slice index sorted
along the slice normal (see :mod:`dicom_node.series.geometry`). Its affine is in
MONAI's RAS world, equal to what ``ITKReader(affine_lps_to_ras=True)`` gives.

Memory: one float32 buffer of ``Z x Y x X`` values is allocated once (after the
``max_voxels`` check) and filled one decoded slice at a time, by parallel threads. The tensor is a
transposed view of that buffer (``torch.from_numpy``, no copy), which is the
same memory layout ITKReader produces.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data.meta_tensor import MetaTensor
from monai.utils.enums import MetaKeys, SpaceKeys
from pydicom.dataset import Dataset

from dicom_node.errors import SeriesError
from dicom_node.series.geometry import StackGeometry, check_stack
from dicom_node.series.headers import SliceHeader, read_header, sop_class_name
from dicom_node.series.pixels import read_slice_hu
from plugin.types import SliceRef, Volume

logger = logging.getLogger(__name__)
DECODE_THREADS = 8  # more gain nothing: decoding is bound by memory bandwidth


def build_volume(
    paths: Sequence[Path],
    *,
    max_voxels: int | None = None,
    headers: Sequence[SliceHeader] | None = None,
) -> Volume:
    """Read, check and stack the slices in ``paths`` (any order) into a Volume.

    ``headers``: the already read headers of ``paths`` (same order, e.g. from series
    selection), so that they are not read again. The source headers read with the
    pixels are kept in ``Volume.source_headers`` for result encoding.

    Raises:
        SeriesError: unreadable files; more than one series; enhanced multi-frame
            or non-image objects; inconsistent or irregular geometry (see
            :func:`~dicom_node.series.geometry.check_stack`); more voxels than
            ``max_voxels``; pixel data that cannot be decoded.
    """
    if not paths:
        raise SeriesError("no slices given to build a volume from")
    if headers is None or len(headers) != len(paths):
        headers = [read_header(Path(p)) for p in paths]
    headers = list(headers)
    _check_instances(headers)
    geometry = check_stack(headers)
    _check_size(geometry, max_voxels)
    ordered = [headers[i] for i in geometry.order]
    sources: list[Dataset] = []
    buffer = _fill(ordered, geometry, sources)
    image = _to_metatensor(buffer, geometry, ordered[0].series_instance_uid)
    first = ordered[0]
    logger.info(
        "built volume for series %s: shape %s, spacing %s mm",
        first.series_instance_uid,
        geometry.shape,
        tuple(round(s, 4) for s in geometry.spacing),
    )
    return Volume(
        image=image,
        slices=[SliceRef(h.sop_instance_uid, h.sop_class_uid, h.path) for h in ordered],
        study_instance_uid=first.study_instance_uid,
        series_instance_uid=first.series_instance_uid,
        frame_of_reference_uid=first.frame_of_reference_uid,
        spacing_mm=geometry.spacing,
        source_headers=sources,
    )


def _check_instances(headers: list[SliceHeader]) -> None:
    series = {h.series_instance_uid for h in headers}
    if len(series) > 1:
        raise SeriesError(f"files belong to {len(series)} series, expected one")
    frames = {h.frame_of_reference_uid for h in headers}
    if len(frames) > 1:
        raise SeriesError(f"slices have {len(frames)} different frames of reference")
    if len({h.sop_instance_uid for h in headers}) != len(headers):
        raise SeriesError("the same SOP instance is given more than once")
    for header in headers:
        if header.is_multiframe:
            raise SeriesError("enhanced multi-frame CT is not supported yet")
        if not header.is_image:
            raise SeriesError(
                f"not an image: SOP instance {header.sop_instance_uid} is "
                f"{sop_class_name(header.sop_class_uid)}"
            )


def _check_size(geometry: StackGeometry, max_voxels: int | None) -> None:
    x, y, z = geometry.shape
    voxels = x * y * z
    if max_voxels is not None and voxels > max_voxels:
        raise SeriesError(f"series too large: {x}x{y}x{z} = {voxels} voxels, limit {max_voxels}")


def _fill(ordered: list[SliceHeader], geometry: StackGeometry, sources: list[Dataset]) -> np.ndarray:
    """Allocate the (Z, Y, X) float32 buffer once and decode the slices into it, in
    parallel threads (reading, unpacking and rescaling a slice release the GIL; each
    thread writes only its own slices); the slice headers read on the way are appended
    to ``sources`` in slice order. The first slice that fails (in slice order) raises."""
    x, y, z = geometry.shape
    buffer = np.empty((z, y, x), dtype=np.float32)

    def decode(index: int) -> Dataset:
        header = ordered[index]
        return read_slice_hu(header.path, buffer[index], index, header.dataset, header.pixel_data_offset)

    workers = min(_decode_threads(), len(ordered))
    if workers <= 1:
        sources.extend(decode(index) for index in range(len(ordered)))
        return buffer
    with ThreadPoolExecutor(workers, thread_name_prefix="volume") as pool:
        sources.extend(pool.map(decode, range(len(ordered))))
    return buffer


def _decode_threads() -> int:
    """Threads for decoding: the CPUs this process may use, at most ``DECODE_THREADS``."""
    return max(1, min(len(os.sched_getaffinity(0)), DECODE_THREADS))


def _to_metatensor(buffer: np.ndarray, geometry: StackGeometry, series_uid: str) -> MetaTensor:
    """Wrap the buffer as (1, X, Y, Z) without copying and attach MONAI metadata."""
    view = buffer.transpose(2, 1, 0)[np.newaxis]
    affine = geometry.ras_affine()
    meta: dict[str, Any] = {
        MetaKeys.ORIGINAL_AFFINE: affine.copy(),
        MetaKeys.SPATIAL_SHAPE: np.asarray(geometry.shape),
        MetaKeys.ORIGINAL_CHANNEL_DIM: 0,
        MetaKeys.SPACE: SpaceKeys.RAS,
        "spacing": np.asarray(geometry.spacing),
        "filename_or_obj": series_uid,
    }
    tensor = torch.from_numpy(view)
    return MetaTensor(tensor, affine=torch.as_tensor(affine, dtype=torch.float64), meta=meta)
