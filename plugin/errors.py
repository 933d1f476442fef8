"""The plugin contract's error: what a plugin, its manifest or the registry raises when a
plugin cannot be loaded, is invalid, or failed while analysing. The node catches it; a
plugin author needs nothing from the node to raise it."""


class PluginError(Exception):
    """A plugin cannot be loaded, is invalid, or failed while analysing."""
