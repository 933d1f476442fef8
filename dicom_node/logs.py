"""Logging set-up for the entry point (library modules only use getLogger)."""

from __future__ import annotations

import json
import logging
import sys
import time

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
THIRD_PARTY_QUIET = ("highdicom", "monai")


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(level: str = "INFO", json_format: bool = False) -> None:
    """Configure the root logger once, at the entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs PDU and dataset details at INFO/DEBUG; keep it to warnings.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    # highdicom (about a dozen "copy attributes of module ..." lines per result) and MONAI
    # speak at INFO about their own steps: warnings only, unless the node logs at DEBUG.
    chatty = logging.DEBUG if logging.getLevelName(level) == logging.DEBUG else logging.WARNING
    for name in THIRD_PARTY_QUIET:
        logging.getLogger(name).setLevel(chatty)
    # Library warnings (deprecations, and some that quote element values) go to the
    # log, and only errors among them are kept: they could carry patient data.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
