"""Exception hierarchy: one base for the node, one subclass per stage."""

from __future__ import annotations

# The plugin contract's own error (plugin/errors.py), re-exported for the node's modules.
from plugin.errors import PluginError

__all__ = ["ActionRefused", "ConfigError", "DeliveryError", "EncodeError", "IngestError", "NodeError",
           "PluginError", "SeriesError", "StorageError"]


class NodeError(Exception):
    """Base class of every error the node raises on purpose."""


class ConfigError(NodeError):
    """The configuration is invalid; the message names the key and the reason."""


class IngestError(NodeError):
    """An incoming instance cannot be accepted."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class StorageError(NodeError):
    """The spool or the state database failed."""


class SeriesError(NodeError):
    """No usable series, or a series cannot be built into a volume."""


class EncodeError(NodeError):
    """A result object (SEG, SR) cannot be created."""


class DeliveryError(NodeError):
    """A result could not be delivered to a destination."""


class ActionRefused(NodeError):
    """An admin action (retry, reprocess, forget) cannot be done; the message says why."""
