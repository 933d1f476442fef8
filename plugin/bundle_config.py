"""Reading a MONAI bundle's config for in-memory inference, unchanged on disk.

* :func:`apply_overrides`: values replaced at parse time, as MONAI's own
  ``python -m monai.bundle run --key value`` does (the manifest's ``overrides``, then
  the node config's plugin option ``overrides``).
* :func:`check_requirements`: the Python distributions the manifest's ``requires`` names
  are installed; a missing one fails the plugin's creation with the bundle's name and
  the install hint, not at the first study. ``metadata.json``'s
  ``required_packages_version`` (formerly ``optional_packages_version``) lists what the
  bundle's whole workflow needs, its evaluator and handlers included (pytorch-ignite
  for nearly every bundle), which the node does not run: a missing one of those is a
  warning (:func:`metadata_packages`), not a refusal.
* :func:`bundle_scripts`: the bundle's own ``scripts/`` package importable for its
  ``_target_`` references (e.g. ``scripts.detection_inferer.RetinaNetInferer``), as
  ``monai.bundle run`` makes it by putting the bundle root first on ``sys.path``.
  ``scripts`` is a generic name: a ``scripts`` package of another bundle imported
  earlier in this process is dropped from ``sys.modules`` first.
* :func:`run_required`: the expressions the bundle's evaluator requires before it runs
  (``"_requires_"``, e.g. the detector's ``detector_ops`` that set its box selector and
  sliding window), without building the evaluator itself.
* :func:`strip_io_config`: file loading and saving transforms removed (see
  :mod:`plugin.monai_bundle`).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterable
from contextlib import contextmanager
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

from monai.bundle.config_parser import ConfigParser

DROPPED_TARGETS = frozenset(
    name + suffix
    for name in ("LoadImage", "SaveImage", "EnsureChannelFirst")
    for suffix in ("", "d", "D", "Dict")
)
REQUIREMENT_KEYS = ("required_packages_version", "optional_packages_version")
SCRIPTS_PACKAGE = "scripts"


class BundleConfigError(ValueError):
    """The bundle's config cannot be used as it is (the message says why)."""


def apply_overrides(parser: ConfigParser, overrides: dict[str, Any]) -> None:
    """Set each ``id`` (``a#b`` for nested keys) of ``overrides`` in the parsed config."""
    for key, value in overrides.items():
        if key not in parser:
            raise BundleConfigError(f"override {key!r}: the bundle config has no such key")
        parser[key] = value


def metadata_packages(parser: ConfigParser) -> list[str]:
    """The distributions ``metadata.json`` lists for the bundle's whole workflow."""
    for key in REQUIREMENT_KEYS:
        listed = parser.get(f"{parser.meta_key}#{key}")
        if isinstance(listed, dict):
            return sorted(str(name) for name in listed)
    return []


def missing_packages(packages: Iterable[str]) -> list[str]:
    """The distributions among ``packages`` that are not installed."""
    missing = []
    for name in packages:
        try:
            version(name)
        except PackageNotFoundError:
            missing.append(name)
    return missing


def check_requirements(packages: Iterable[str]) -> None:
    """Raise :class:`BundleConfigError` naming every distribution that is not installed."""
    missing = missing_packages(packages)
    if missing:
        raise BundleConfigError(
            f"needs Python package(s) not installed: {', '.join(missing)} (for detection "
            "bundles: bash scripts/setup.sh --detection; else pip install them into the "
            "node's environment)"
        )


@contextmanager
def bundle_scripts(bundle_dir: Path) -> Iterator[None]:
    """Make ``bundle_dir/scripts`` importable as ``scripts`` while the bundle is built;
    another bundle's ``scripts`` is never used in its place."""
    for name in [m for m in sys.modules if m == SCRIPTS_PACKAGE or m.startswith(SCRIPTS_PACKAGE + ".")]:
        module_file = getattr(sys.modules[name], "__file__", None) or ""
        if not module_file or not Path(module_file).resolve().is_relative_to(bundle_dir):
            del sys.modules[name]
    if not (bundle_dir / SCRIPTS_PACKAGE).is_dir():
        yield
        return
    sys.path.insert(0, str(bundle_dir))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        if str(bundle_dir) in sys.path:
            sys.path.remove(str(bundle_dir))


def check_scripts(parser: ConfigParser, bundle_dir: Path, keys: Iterable[str]) -> None:
    """Raise :class:`BundleConfigError` when what ``keys`` build names the bundle's
    ``scripts`` package (``"_target_": "scripts...."``) and the bundle has no ``scripts/``."""
    named = sorted({target for key in keys for target in _targets(parser.get(key), parser)
                    if target.split(".", 1)[0] == SCRIPTS_PACKAGE})
    if named and not (bundle_dir / SCRIPTS_PACKAGE / "__init__.py").is_file():
        raise BundleConfigError(
            f"the config uses {', '.join(named)} but the bundle has no {SCRIPTS_PACKAGE}/ package "
            "(copy the whole bundle folder, scripts/ included)"
        )


def _targets(node: Any, parser: ConfigParser, depth: int = 0) -> Iterator[str]:
    """Every ``_target_`` in ``node``, following ``@id`` references (a few levels deep)."""
    if depth > 8:
        return
    if isinstance(node, str) and node.startswith("@"):
        yield from _targets(parser.get(node[1:]), parser, depth + 1)
    elif isinstance(node, dict):
        if isinstance(node.get("_target_"), str):
            yield node["_target_"]
        for value in node.values():
            yield from _targets(value, parser, depth + 1)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value, parser, depth + 1)


def run_required(parser: ConfigParser, owner: str = "evaluator") -> list[str]:
    """Evaluate the ids that ``owner`` (the bundle's evaluator) lists in ``_requires_``."""
    node = parser.get(owner)
    wanted = node.get("_requires_") if isinstance(node, dict) else None
    refs = wanted if isinstance(wanted, list) else [wanted] if wanted is not None else []
    ran = []
    for ref in refs:
        if isinstance(ref, str) and ref.startswith("@"):
            parser.get_parsed_content(ref[1:], instantiate=True)
            ran.append(ref[1:])
    return ran


def _is_dropped(item: Any) -> bool:
    target = item.get("_target_") if isinstance(item, dict) else None
    return isinstance(target, str) and target.rsplit(".", 1)[-1] in DROPPED_TARGETS


def strip_io_config(parser: ConfigParser) -> list[str]:
    """Remove dropped transforms from the transform lists of pre- and postprocessing."""
    dropped: list[str] = []
    for key in ("preprocessing", "postprocessing"):
        node = parser[key]
        if not isinstance(node, dict):
            continue
        list_id = f"{key}#transforms"
        ref = node.get("transforms")
        if isinstance(ref, str) and ref.startswith("@") and isinstance(parser.get(ref[1:]), list):
            list_id = ref[1:]
        items = parser.get(list_id)
        if isinstance(items, list):
            dropped += [str(t["_target_"]) for t in items if _is_dropped(t)]
            parser[list_id] = [t for t in items if not _is_dropped(t)]
    return dropped
