"""Decode one single-frame slice into Hounsfield units, written in place.

pydicom decodes every transfer syntax the node accepts: native (implicit and
explicit VR), Deflated, RLE Lossless (pylibjpeg-rle or pydicom), JPEG Baseline,
Extended and Lossless (pylibjpeg-libjpeg), JPEG-LS (pylibjpeg-libjpeg) and
JPEG 2000 (pylibjpeg-openjpeg). The stored values are signed or unsigned as
PixelRepresentation says, and BitsStored (12 or 16) is honoured by pydicom.
HU = stored * RescaleSlope + RescaleIntercept (defaults 1 and 0). Pixels equal to
PixelPaddingValue are not masked (as with ITK); they keep their rescaled value.

Fast path: for uncompressed little-endian 16-bit data (Implicit or Explicit VR Little
Endian), the header is parsed up to the pixel data and the stored values are read
straight from the file into the slice, with pydicom's rules for native data applied
the same way (signedness from PixelRepresentation; the unused high bits beyond
BitsStored are masked, or sign-extended for signed data). Every other case goes
through pydicom's decoders.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from dicom_node.errors import SeriesError

logger = logging.getLogger(__name__)

_NATIVE_LITTLE_ENDIAN = frozenset({ImplicitVRLittleEndian, ExplicitVRLittleEndian})
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
_UNDEFINED_LENGTH = 0xFFFFFFFF


def rescale(ds: Dataset) -> tuple[float, float]:
    """``(slope, intercept)`` of the modality rescale, defaults ``(1, 0)``."""
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    return (
        1.0 if slope in (None, "") else float(slope),
        0.0 if intercept in (None, "") else float(intercept),
    )


def _check_pixel_module(ds: Dataset, name: str) -> None:
    frames = int(ds.get("NumberOfFrames") or 1)
    if frames > 1:
        raise SeriesError(f"{name}: enhanced multi-frame CT is not supported yet")
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples != 1:
        raise SeriesError(f"{name}: {samples} samples per pixel, expected a grayscale image")


def _decode(ds: Dataset, name: str) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except (ValueError, NotImplementedError, RuntimeError, AttributeError, KeyError) as e:
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID", "unknown") if meta is not None else "unknown"
        raise SeriesError(
            f"{name}: cannot decode pixel data (transfer syntax {syntax}): {e}"
        ) from e


def _native_dtype(ds: Dataset) -> np.dtype | None:
    """The dtype of the stored values when the fast path applies, else None."""
    meta = getattr(ds, "file_meta", None)
    syntax = meta.get("TransferSyntaxUID") if meta is not None else None
    if syntax not in _NATIVE_LITTLE_ENDIAN or ds.get("BitsAllocated") != 16:
        return None
    bits_stored = ds.get("BitsStored")
    if not isinstance(bits_stored, int) or not 1 <= bits_stored <= 16:
        return None
    representation = ds.get("PixelRepresentation")
    if representation not in (0, 1):
        return None
    return np.dtype("<i2" if representation == 1 else "<u2")


def _read_native(fp: BinaryIO, ds: Dataset, dtype: np.dtype, shape: tuple[int, int],
                 name: str) -> np.ndarray | None:
    """Stored values read from ``fp`` (positioned at the pixel data element), or None
    when the element is not the plain one expected (then pydicom decodes it)."""
    explicit = ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    size = 12 if explicit else 8
    head = fp.read(size)
    if len(head) < size or head[:4] != _PIXEL_DATA_TAG:
        return None
    if explicit and head[4:6] not in (b"OW", b"OB"):
        return None
    length = int.from_bytes(head[8:12] if explicit else head[4:8], "little")
    count = shape[0] * shape[1]
    if length == _UNDEFINED_LENGTH:
        return None
    syntax = ds.file_meta.TransferSyntaxUID
    if length < count * dtype.itemsize:
        raise SeriesError(
            f"{name}: cannot decode pixel data (transfer syntax {syntax}): the element holds "
            f"{length} bytes, expected {count * dtype.itemsize}"
        )
    stored = np.fromfile(fp, dtype=dtype, count=count)
    if stored.size != count:
        raise SeriesError(f"{name}: cannot decode pixel data (transfer syntax {syntax}): truncated file")
    shift = 16 - int(ds.BitsStored)
    if shift:
        np.left_shift(stored, shift, out=stored)
        np.right_shift(stored, shift, out=stored)
    return stored.reshape(shape)


def _read(path: Path, name: str, header: Dataset | None = None,
          offset: int | None = None) -> tuple[Dataset, np.ndarray]:
    """The header (without pixel data) and the stored values of one slice.

    ``header`` and ``offset``: the header already read from ``path`` (as
    ``dcmread(stop_before_pixels=True)`` gives it) and the file position after it;
    then only the pixels are read.
    """
    with open(path, "rb") as fp:
        if header is not None and offset is not None:
            ds = header
            fp.seek(offset)
        else:
            ds = pydicom.dcmread(fp, stop_before_pixels=True)
        _check_pixel_module(ds, name)
        dtype = _native_dtype(ds)
        rows, columns = ds.get("Rows"), ds.get("Columns")
        if dtype is not None and isinstance(rows, int) and isinstance(columns, int):
            stored = _read_native(fp, ds, dtype, (rows, columns), name)
            if stored is not None:
                return ds, stored
    full = pydicom.dcmread(path)
    if "PixelData" not in full:
        raise SeriesError(f"{name}: no pixel data")
    stored = _decode(full, name)
    del full.PixelData  # the header is kept; the encoded pixels are not
    return full, stored


def read_slice_hu(path: Path, out: np.ndarray, index: int, header: Dataset | None = None,
                  offset: int | None = None) -> Dataset:
    """Decode the slice in ``path`` and write its HU into ``out`` (rows, columns).

    Returns the slice's header (read up to the pixel data, as
    :func:`pydicom.dcmread` with ``stop_before_pixels`` gives it). ``header`` and
    ``offset``: that header and the file position after it, when already read.

    Raises:
        SeriesError: the file cannot be read or decoded, or has another shape.
    """
    name = f"slice {index}"
    try:
        ds, stored = _read(Path(path), name, header, offset)
        slope, intercept = rescale(ds)
    except SeriesError:
        raise
    except Exception as e:  # untrusted bytes: any parser failure means "cannot read"
        raise SeriesError(f"{name}: cannot read {Path(path).name}: {type(e).__name__}: {e}") from e
    if stored.shape != out.shape:
        raise SeriesError(
            f"{name}: pixel data is {stored.shape[0]}x{stored.shape[1]}, "
            f"expected {out.shape[0]}x{out.shape[1]} (rows x columns)"
        )
    if slope != 1.0:
        np.multiply(stored, np.float32(slope), out=out, dtype=np.float32, casting="unsafe")
    else:
        out[...] = stored
    if intercept != 0.0:
        out += np.float32(intercept)
    return ds
