"""The analysis-plugin contract: types, protocol and registry.

Dependencies point one way: ``models -> plugin <- dicom_node``.
"""

from plugin.contract import AnalysisPlugin
from plugin.types import (
    Axis,
    Finding,
    Findings,
    PluginInfo,
    SegmentCodes,
    SeriesCriteria,
    SliceRef,
    Volume,
)

__all__ = [
    "AnalysisPlugin",
    "Axis",
    "Finding",
    "Findings",
    "PluginInfo",
    "SegmentCodes",
    "SeriesCriteria",
    "SliceRef",
    "Volume",
]

# Registry (light imports only; plugin.monai_bundle pulls in torch/MONAI and is loaded
# through its entry point).
from plugin.registry import available_plugins, load_plugin

__all__ += ["available_plugins", "load_plugin"]
