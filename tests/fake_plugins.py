"""A test-only plugin: labels dense voxels (HU above a threshold) as lesions.

It exercises the whole node (selection, volume, plugin contract, SEG/SR, delivery)
without a trained model. The shipped configuration uses the real analysis instead.
"""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from plugin.manifest import parse_manifest
from plugin.measure import measure_findings
from plugin.types import Findings, Volume

MANIFEST = {
    "name": "dense_test",
    "display_name": "Test Dense Lesions",
    "version": "0.0.1",
    "device_uid": "2.25.302114372215371409370436186462245938102",
    "for_clinical_use": False,
    "procedure": {"scheme": "LN", "value": "24627-2", "meaning": "Chest CT"},
    "series": {"modality": "CT", "min_slices": 8, "max_slices": 2000, "slice_spacing_mm": [0.5, 5.0],
               "image_type_required": ["ORIGINAL", "PRIMARY"]},
    "labels": {1: {"name": "Lesion", "per_component": True, "min_volume_mm3": 1,
                   "category": {"scheme": "SCT", "value": "49755003", "meaning": "Morphologically abnormal structure"},
                   "type": {"scheme": "SCT", "value": "27925004", "meaning": "Nodule"},
                   "site": {"scheme": "SCT", "value": "39607008", "meaning": "Lung"},
                   "color": [255, 64, 64]}},
}


class DensePlugin:
    """Threshold segmentation; ``crash=True`` kills the worker process (tests); ``marker``:
    a file that gets one line each time the plugin is created (tests of when it loads);
    ``delay``: seconds each analysis sleeps first (a long analysis, for stop tests; a
    crashing plugin crashes after it)."""

    def __init__(self, threshold: float = 300.0, crash: bool = False, marker: str | None = None,
                 delay: float = 0.0) -> None:
        if marker:
            with open(marker, "a", encoding="utf-8") as f:
                f.write(f"created in {os.getpid()}\n")
        self.manifest = parse_manifest(MANIFEST, "test manifest")
        self.info = self.manifest.plugin_info()
        self.criteria = self.manifest.series_criteria()
        self.threshold = threshold
        self.crash = crash
        self.delay = delay
        self.warm_ups = 0

    def warm_up(self) -> None:
        """The optional warm-up hook (a GPU plugin initialises CUDA here); counted."""
        self.warm_ups += 1

    def analyse(self, volume: Volume) -> Findings:
        time.sleep(self.delay)
        if self.crash:
            os._exit(3)
        hu = volume.image[0].numpy()
        labels = (hu > self.threshold).astype(np.uint8)
        return measure_findings(labels, hu, volume.lps_affine(), self.manifest.labels,
                                procedure=self.manifest.procedure_code())


def create(**options: Any) -> DensePlugin:
    """Factory referenced as ``tests.fake_plugins:create``."""
    return DensePlugin(**options)
