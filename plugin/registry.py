"""Find and create analysis plugins: entry points plus the names in the config.

Plugins are published as entry points of the group ``dicom_node.plugins``; each
entry point is a factory ``(**options) -> AnalysisPlugin``. A configured plugin names
its factory either by entry-point name (``"monai_bundle"``) or as a
``"package.module:callable"`` reference; without one, the entry point with the
plugin's own name is used.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.util
import logging
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any, cast

from plugin.errors import PluginError
from plugin.contract import AnalysisPlugin
from plugin.types import PluginInfo, SeriesCriteria

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "dicom_node.plugins"


def available_plugins() -> dict[str, str]:
    """Entry-point name -> ``module:callable`` for every installed plugin factory."""
    return {ep.name: ep.value for ep in _entry_points()}


def _entry_points() -> list[EntryPoint]:
    return sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda ep: ep.name)


def _available_text() -> str:
    names = available_plugins()
    listed = ", ".join(f"{name} ({value})" for name, value in names.items())
    return f"available entry points in {ENTRY_POINT_GROUP!r}: {listed or 'none'}"


def check_resolvable(name: str, factory: str | None = None) -> str:
    """Check, without importing the plugin, that ``name`` (or its ``factory``) names an
    installed entry point or an importable module; return where the factory comes from.

    Raises :class:`PluginError` naming the nearest installed entry point when there is one.
    """
    reference = factory or name
    if ":" not in reference:
        names = list(available_plugins())
        if reference in names:
            return f"entry point {reference!r} ({available_plugins()[reference]})"
        near = difflib.get_close_matches(reference, names, n=1, cutoff=0.6)
        hint = f"did you mean {near[0]!r}? " if near else ""
        raise PluginError(f"plugin {name!r}: no entry point named {reference!r}; {hint}{_available_text()}")
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise PluginError(f"plugin {name!r}: factory {reference!r} is not 'package.module:callable'")
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError) as e:  # a parent package is missing or broken
        raise PluginError(f"plugin {name!r}: cannot find {module_name!r}: {e}") from e
    if found is None:
        raise PluginError(f"plugin {name!r}: no module named {module_name!r} (factory {reference!r})")
    return f"module {module_name!r}"


def load_plugin(
    name: str, *, factory: str | None = None, options: dict[str, Any] | None = None
) -> AnalysisPlugin:
    """Create and check the plugin ``name`` (raises :class:`PluginError` on any failure)."""
    reference = factory or name
    make = _resolve_factory(name, reference)
    try:
        plugin = make(**(options or {}))
    except PluginError as e:
        raise PluginError(f"plugin {name!r}: {e}") from e
    except Exception as e:  # third-party factory code: reported with its type, never swallowed
        raise PluginError(
            f"plugin {name!r}: factory {reference!r} failed: {type(e).__name__}: {e}"
        ) from e
    check_plugin(name, plugin)
    if plugin.info.name != name:
        logger.warning("plugin %r reports the name %r", name, plugin.info.name)
    logger.info(
        "loaded plugin %r (%s %s) from %s", name, plugin.info.name, plugin.info.version, reference
    )
    return cast(AnalysisPlugin, plugin)


def _resolve_factory(name: str, reference: str) -> Callable[..., Any]:
    if ":" in reference:
        target = _import_reference(name, reference)
    else:
        matches = [ep for ep in _entry_points() if ep.name == reference]
        if not matches:
            raise PluginError(
                f"plugin {name!r}: no entry point named {reference!r}; {_available_text()}"
            )
        try:
            target = matches[0].load()
        except (ImportError, AttributeError) as e:
            raise PluginError(
                f"plugin {name!r}: entry point {reference!r} cannot be loaded: {e}"
            ) from e
    if not callable(target):
        raise PluginError(
            f"plugin {name!r}: factory {reference!r} is not callable; {_available_text()}"
        )
    return target  # type: ignore[no-any-return]


def _import_reference(name: str, reference: str) -> Any:
    module_name, _, attribute = reference.partition(":")
    if not module_name or not attribute:
        raise PluginError(
            f"plugin {name!r}: factory {reference!r} is not 'package.module:callable'"
        )
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise PluginError(
            f"plugin {name!r}: cannot import {module_name!r}: {e}; {_available_text()}"
        ) from e
    for part in attribute.split("."):
        try:
            target = getattr(target, part)
        except AttributeError as e:
            raise PluginError(
                f"plugin {name!r}: {module_name!r} has no {attribute!r}; {_available_text()}"
            ) from e
    return target


def check_plugin(name: str, plugin: object) -> None:
    """Raise :class:`PluginError` unless ``plugin`` satisfies :class:`AnalysisPlugin`."""
    problems = []
    if not isinstance(getattr(plugin, "info", None), PluginInfo):
        problems.append("'info' is not a PluginInfo")
    if not isinstance(getattr(plugin, "criteria", None), SeriesCriteria):
        problems.append("'criteria' is not a SeriesCriteria")
    if not callable(getattr(plugin, "analyse", None)):
        problems.append("'analyse' is not callable")
    if problems or not isinstance(plugin, AnalysisPlugin):
        raise PluginError(
            f"plugin {name!r}: {type(plugin).__name__} is not an AnalysisPlugin "
            f"({'; '.join(problems) or 'protocol mismatch'}); {_available_text()}"
        )
