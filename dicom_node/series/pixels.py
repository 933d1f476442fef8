"""Decode one single-frame slice into Hounsfield units, written in place.

pydicom decodes every transfer syntax the node accepts: native (implicit and
explicit VR), Deflated, RLE Lossless (pylibjpeg-rle or pydicom), JPEG Baseline,
Extended and Lossless (pylibjpeg-libjpeg), JPEG-LS (pylibjpeg-libjpeg) and
JPEG 2000 (pylibjpeg-openjpeg). The stored values are signed or unsigned as
PixelRepresentation says, and BitsStored (12 or 16) is honoured by pydicom.
HU = stored * RescaleSlope + RescaleIntercept (defaults 1 and 0). Pixels equal to
PixelPaddingValue are not masked (as with ITK); they keep their rescaled value.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicom_node.errors import SeriesError

logger = logging.getLogger(__name__)


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
    if "PixelData" not in ds:
        raise SeriesError(f"{name}: no pixel data")


def _decode(ds: Dataset, name: str) -> np.ndarray:
    try:
        return np.asarray(ds.pixel_array)
    except (ValueError, NotImplementedError, RuntimeError, AttributeError, KeyError) as e:
        meta = getattr(ds, "file_meta", None)
        syntax = meta.get("TransferSyntaxUID", "unknown") if meta is not None else "unknown"
        raise SeriesError(
            f"{name}: cannot decode pixel data (transfer syntax {syntax}): {e}"
        ) from e


def read_slice_hu(path: Path, out: np.ndarray, index: int) -> None:
    """Decode the slice in ``path`` and write its HU into ``out`` (rows, columns).

    Raises:
        SeriesError: the file cannot be read or decoded, or has another shape.
    """
    name = f"slice {index}"
    try:
        ds = pydicom.dcmread(path)
        _check_pixel_module(ds, name)
        stored = _decode(ds, name)
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
    out[...] = stored
    if slope != 1.0:
        out *= np.float32(slope)
    if intercept != 0.0:
        out += np.float32(intercept)
