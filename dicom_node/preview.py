"""PNG preview of the results: the key images (Secondary Capture) as one picture.

The preview is not drawn again: it is the pixel data of the SC instances the node sent
(summary first, then one image per finding, see :mod:`dicom_node.results.sc`), stacked
top to bottom, so the PNG shows exactly what a PACS viewer shows.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import SecondaryCaptureImageStorage


def key_image_pixels(images: Sequence[Path | Dataset]) -> list[np.ndarray]:
    """The RGB pixels of the key images among ``images``, in instance order."""
    datasets = [ds if isinstance(ds, Dataset) else dcmread(ds) for ds in images]
    key = [ds for ds in datasets if ds.SOPClassUID == SecondaryCaptureImageStorage]
    key.sort(key=lambda ds: (str(ds.SeriesInstanceUID), int(ds.InstanceNumber)))
    return [np.asarray(ds.pixel_array) for ds in key]


def write_preview(images: Sequence[Path | Dataset], out: Path) -> Path:
    """The key images among ``images`` (files or datasets), one below the other, as a PNG.

    Raises :class:`ValueError` when there is no key image among them.
    """
    pixels = key_image_pixels(images)
    if not pixels:
        raise ValueError("no key image (Secondary Capture) among the results")
    sheet = Image.new("RGB", (max(p.shape[1] for p in pixels), sum(p.shape[0] for p in pixels)))
    y = 0
    for array in pixels:
        sheet.paste(Image.fromarray(array), (0, y))
        y += array.shape[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
