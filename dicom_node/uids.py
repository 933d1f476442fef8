"""UID checks at the boundary: a UID may name a file, so it must be safe."""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_LENIENT_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")


def uid_problem(value: object, *, strict: bool = False) -> str | None:
    """Return why ``value`` is not an acceptable UID, or None if it is.

    Accepted: 1–64 characters of digits and dots, no empty component. Leading zeros
    in a component (not allowed by PS3.5 but common in the wild) pass unless
    ``strict``. Anything else (letters, slashes, '..', spaces) is refused, so a UID
    can never escape a path.
    """
    if not isinstance(value, str) or not value:
        return "missing"
    text = value.rstrip("\x00").strip()
    if len(text) > 64:
        return f"longer than 64 characters ({len(text)})"
    pattern = _UID_RE if strict else _LENIENT_UID_RE
    if not pattern.match(text):
        return "not a UID (only digits and dots are allowed)"
    return None


def clean_uid(value: str) -> str:
    """Strip the padding a UID may carry on the wire."""
    return value.rstrip("\x00").strip()
