"""The protocol every analysis plugin implements."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from plugin.types import Findings, PluginInfo, SeriesCriteria, Volume


@runtime_checkable
class AnalysisPlugin(Protocol):
    """An analysis: metadata, the series it wants, and ``analyse``.

    A plugin is created once when the node starts (and validated then), and
    ``analyse`` is called in a worker process for each selected series.
    """

    info: PluginInfo
    criteria: SeriesCriteria

    def analyse(self, volume: Volume) -> Findings:
        """Analyse one volume and return findings on its source grid."""
        ...
