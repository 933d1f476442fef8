"""The shipped lung-nodule analysis: a MONAI bundle run by the generic bundle plugin."""

from __future__ import annotations

from typing import Any


def create(**options: Any) -> Any:
    """Entry point ``lung_nodules``: this folder's bundle through ``plugin.monai_bundle``."""
    from plugin.monai_bundle import create as create_bundle_plugin

    return create_bundle_plugin(bundle_package=__name__, **options)
