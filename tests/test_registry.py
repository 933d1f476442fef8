"""The plugin registry: entry points, "module:callable" references and protocol checks."""

from __future__ import annotations

from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from dicom_node.errors import PluginError
from plugin import registry
from plugin.contract import AnalysisPlugin
from plugin.registry import available_plugins, load_plugin
from plugin.types import Findings, PluginInfo, SeriesCriteria, Volume


class FakePlugin:
    """A minimal plugin that finds nothing."""

    def __init__(self, name: str = "fake", min_slices: int = 10) -> None:
        self.info = PluginInfo(name=name, version="1.0", device_uid="2.25.42", display_name="Fake")
        self.criteria = SeriesCriteria(min_slices=min_slices)

    def analyse(self, volume: Volume) -> Findings:
        return Findings(label_map=np.zeros(volume.shape, dtype=np.uint8), findings=[])


def make_fake(**options: Any) -> FakePlugin:
    """Factory used by the tests (referenced as ``<this module>:make_fake``)."""
    return FakePlugin(**options)


def make_broken(**options: Any) -> object:
    """A factory whose product is not a plugin."""
    return object()


def make_failing(**options: Any) -> FakePlugin:
    """A factory that fails."""
    raise RuntimeError("weights missing")


def make_bad_criteria(**options: Any) -> FakePlugin:
    """A factory whose plugin has criteria of the wrong type."""
    plugin = FakePlugin()
    plugin.criteria = {"min_slices": 3}  # type: ignore[assignment]
    return plugin


def ref(function: Any) -> str:
    """``module:callable`` for a function of this module, however pytest imported it."""
    return f"{function.__module__}:{function.__name__}"


@pytest.fixture
def fake_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    """Add an entry point "fake" next to the installed ones."""
    installed = registry._entry_points()
    fake = EntryPoint(name="fake", value=ref(make_fake), group=registry.ENTRY_POINT_GROUP)
    monkeypatch.setattr(registry, "_entry_points", lambda: [*installed, fake])


def test_the_monai_bundle_entry_point_is_installed() -> None:
    assert available_plugins()["monai_bundle"] == "plugin.monai_bundle:create"


def test_module_reference_with_options() -> None:
    plugin = load_plugin("fake", factory=ref(make_fake), options={"min_slices": 20})
    assert isinstance(plugin, AnalysisPlugin)
    assert plugin.criteria.min_slices == 20


def test_entry_point_named_like_the_plugin(fake_entry_point: None) -> None:
    plugin = load_plugin("fake")
    assert plugin.info.name == "fake"


def test_entry_point_named_by_factory(fake_entry_point: None) -> None:
    plugin = load_plugin("my_analysis", factory="fake", options={"name": "my_analysis"})
    assert plugin.info.name == "my_analysis"


def test_unknown_entry_point_lists_the_available_ones() -> None:
    with pytest.raises(PluginError, match=r"no entry point named 'nope'.*monai_bundle"):
        load_plugin("nope")


def test_bad_references() -> None:
    with pytest.raises(PluginError, match="cannot import"):
        load_plugin("x", factory="no_such_module_xyz:make")
    with pytest.raises(PluginError, match="has no"):
        load_plugin("x", factory=f"{make_fake.__module__}:missing")
    with pytest.raises(PluginError, match="not 'package.module:callable'"):
        load_plugin("x", factory=":make")


def test_product_that_is_not_a_plugin() -> None:
    with pytest.raises(
        PluginError, match=r"not an AnalysisPlugin.*'info' is not a PluginInfo.*monai_bundle"
    ):
        load_plugin("broken", factory=ref(make_broken))


def test_wrong_attribute_types_are_reported() -> None:
    with pytest.raises(PluginError, match="'criteria' is not a SeriesCriteria"):
        load_plugin("bad", factory=ref(make_bad_criteria))


def test_failing_factory_is_wrapped() -> None:
    with pytest.raises(
        PluginError, match="plugin 'failing'.*RuntimeError: weights missing"
    ) as info:
        load_plugin("failing", factory=ref(make_failing))
    assert isinstance(info.value.__cause__, RuntimeError)


def test_monai_bundle_factory_errors_name_the_plugin(tmp_path: Path) -> None:
    with pytest.raises(PluginError, match="plugin 'lungs'.*not a folder"):
        load_plugin("lungs", factory="monai_bundle", options={"bundle_dir": str(tmp_path / "none")})
