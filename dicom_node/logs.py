"""Logging set-up for the entry point (library modules only use getLogger)."""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from typing import Any

TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
THIRD_PARTY_QUIET = ("highdicom", "monai")
MAX_MESSAGE_CHARS = 2000  # a longer message is cut, with the count of what was left out
# control characters (newline, carriage return, NUL, escape...) as visible escapes, so that
# a peer-supplied string (an AE title, a UID, an error comment) cannot forge a log line
_CONTROL = {code: f"\\x{code:02x}" for code in [*range(0x20), 0x7F]}
_CONTROL.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t"})


def safe_message(message: str) -> str:
    """``message`` on one line, control characters escaped, at most MAX_MESSAGE_CHARS long."""
    text = message.translate(_CONTROL)
    if len(text) > MAX_MESSAGE_CHARS:
        text = f"{text[:MAX_MESSAGE_CHARS]}... [{len(text) - MAX_MESSAGE_CHARS} more characters]"
    return text


class TextFormatter(logging.Formatter):
    """The text format, one line per message. A traceback, when there is one, follows
    with every line indented, so that no line of it can pass for a log record."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = safe_message(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: Any) -> str:  # noqa: N802 (logging's name)
        lines = super().formatException(ei).splitlines()
        return "\n".join("    " + line.translate(_CONTROL) for line in lines)


class PeerErrorsOnOneLine(logging.Filter):
    """pynetdicom logs a traceback for what a peer did wrong (a PDU cut short, one it
    cannot decode): a line per event, with the exception's text, is enough. The
    traceback stays at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.name.startswith("pynetdicom") and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            text = record.getMessage()
            detail = f"{type(exc).__name__}: {exc}"
            record.msg = text if text == str(exc) else f"{text} ({detail})"
            record.args = None
            record.exc_info = None
            record.exc_text = None
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": safe_message(record.getMessage()),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class RepeatLimiter(logging.Filter):
    """At most :attr:`per_window` warnings and errors of one kind (logger and message
    template) per :attr:`window_s`: a peer refused 500 times, or a disk that stays full,
    writes a few lines, then one that says how many more were left out."""

    def __init__(self, per_window: int = 20, window_s: float = 60.0) -> None:
        super().__init__()
        self.per_window = per_window
        self.window_s = window_s
        self._kinds: dict[tuple[str, str], list[float]] = {}  # kind -> [window start, count, left out]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, str(record.msg))
        now = time.monotonic()
        with self._lock:
            entry = self._kinds.get(kind)
            left_out = 0
            if entry is None or now - entry[0] >= self.window_s:
                left_out = int(entry[2]) if entry is not None else 0
                entry = self._kinds[kind] = [now, 0, 0]
                if len(self._kinds) > 10000:  # one-off messages: forget the oldest windows
                    for old in sorted(self._kinds, key=lambda k: self._kinds[k][0])[:5000]:
                        del self._kinds[old]
                    self._kinds[kind] = entry
            entry[1] += 1
            if entry[1] > self.per_window + 1:
                entry[2] += 1
                return False
        note = ""
        if left_out:
            note = f" [{left_out} more like this in the previous {self.window_s:g} s were not logged]"
        elif entry[1] == self.per_window + 1:
            note = f" [repeated: more like this are counted, not logged, for up to {self.window_s:g} s]"
        if note:
            record.msg, record.args = record.getMessage() + note, None
        return True


def setup_logging(level: str = "INFO", json_format: bool = False) -> None:
    """Configure the root logger once, at the entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_format else TextFormatter(TEXT_FORMAT))
    if logging.getLevelName(level) != logging.DEBUG:
        handler.addFilter(PeerErrorsOnOneLine())
    handler.addFilter(RepeatLimiter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs PDU and dataset details at INFO/DEBUG; keep it to warnings. Its
    # utils warn once per non-conformant value a peer sends (a flood: one line per bogus
    # transfer syntax of an A-ASSOCIATE-RQ), and pydicom warns with element values
    # (which may be patient data): errors only.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)
    logging.getLogger("pynetdicom.utils").setLevel(logging.ERROR)
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # highdicom (about a dozen "copy attributes of module ..." lines per result) and MONAI
    # speak at INFO about their own steps: warnings only, unless the node logs at DEBUG.
    chatty = logging.DEBUG if logging.getLevelName(level) == logging.DEBUG else logging.WARNING
    for name in THIRD_PARTY_QUIET:
        logging.getLogger(name).setLevel(chatty)
    # Library warnings (deprecations, and some that quote element values) go to the
    # log, and only errors among them are kept: they could carry patient data.
    logging.captureWarnings(True)
    logging.getLogger("py.warnings").setLevel(logging.ERROR)
