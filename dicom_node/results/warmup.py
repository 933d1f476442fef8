"""Warm up result encoding in a worker before its first job.

The first SEG and SR a process builds pay one-time costs: highdicom loads its
standard tables (JSON, about 0.5 s here) and several modules on first use (about
0.9 s in all on a 2-core VM). :func:`warm_up_encoders` builds, checks and serialises
one SEG, one SR, the key images (SC) and a KOS from a tiny synthetic series, so that
those costs are paid at worker start instead of in the first study's stages. Nothing
is kept.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
from pydicom.filebase import DicomBytesIO

from dicom_node.errors import NodeError
from plugin.manifest import CodeSpec, LabelSpec
from plugin.measure import measure_findings
from plugin.types import PluginInfo

logger = logging.getLogger(__name__)

_SPEC = LabelSpec(
    name="Warm-up",
    per_component=True,
    category=CodeSpec(scheme="SCT", value="49755003", meaning="Morphologically abnormal structure"),
    type=CodeSpec(scheme="SCT", value="27925004", meaning="Nodule"),
)


def warm_up_encoders(info: PluginInfo) -> None:
    """Encode and serialise one SEG, SR, key image set and KOS for a tiny synthetic series."""
    from dicom_node.results.kos import encode_kos
    from dicom_node.results.sc import encode_key_images
    from dicom_node.results.seg import encode_seg
    from dicom_node.results.sr import encode_sr
    from dicom_node.series.volume import build_volume
    from phantoms.ct_writer import write_ct_series

    hu = np.full((4, 16, 16), -1000.0)
    hu[1:3, 4:9, 5:10] = 40.0
    with tempfile.TemporaryDirectory(prefix="dicom-node-warm-up-") as folder:
        volume = build_volume(write_ct_series(hu, Path(folder)))
        labels = (volume.image[0].numpy() > -500).astype(np.uint8)
        findings = measure_findings(labels, volume.image[0].numpy(), volume.lps_affine(), {1: _SPEC})
        sources = volume.source_headers
        built = [
            encode_seg(volume, findings, info, series_number=1, sources=sources),
            encode_sr(volume, findings, info, series_number=2, sources=sources),
            *encode_key_images(volume, findings, info, series_number=3, sources=sources),
        ]
        built.append(encode_kos(volume, findings, info, series_number=4, results=built, sources=sources))
        for ds in built:
            ds.save_as(DicomBytesIO(), enforce_file_format=True)


def try_warm_up_encoders(info: PluginInfo) -> bool:
    """:func:`warm_up_encoders`, logging (not raising) a failure: a failed warm-up
    only means the first job pays the start-up costs."""
    try:
        warm_up_encoders(info)
    except (NodeError, OSError, ValueError, TypeError) as e:
        logger.warning("result encoder warm-up failed (the first job pays for it): %s", e)
        return False
    return True
