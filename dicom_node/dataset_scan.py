"""Check a received instance's bytes to their end, and take its header values on the way.

A C-STORE gets Success only for a dataset that parses: every element's length fits in
what was sent, sequences and items are closed, nothing is cut off. pydicom alone would
not tell: it reads lazily and stores a truncated element as it finds it, and a file
dcmdump cannot read would be acknowledged and spooled. The scan walks every element once,
without decoding values or pixel data (the same walk that finds the header elements the
node routes by), and raises :class:`~dicom_node.errors.IngestError` with 0xC000 (Cannot
Understand) naming the element and the lengths, never a value.

Deflated datasets (Deflated Explicit VR Little Endian, JPIP Referenced Deflate) are
inflated as a stream into a scratch file, never whole into memory, and refused with
0xA700 (Out of Resources) once the inflated size passes the instance limit, or
:data:`MAX_INFLATION_RATIO` times the bytes sent (a decompression bomb) past
:data:`INFLATION_FLOOR_BYTES`.
"""

from __future__ import annotations

import mmap
import struct
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Union

from pydicom.datadict import DicomDictionary

from dicom_node.errors import IngestError
from dicom_node.net import statuses

Buffer = Union[bytes, mmap.mmap]

MAX_DEPTH = 32  # nested sequences; deeper is refused (a real dataset needs fewer than 10)
MAX_INFLATION_RATIO = 200  # inflated bytes per deflated byte sent, beyond the floor below
INFLATION_FLOOR_BYTES = 64 * 2**20  # any deflated dataset may inflate to this much
_INFLATE_CHUNK = 2**20

IMPLICIT_LE = "1.2.840.10008.1.2"
EXPLICIT_BE = "1.2.840.10008.1.2.2"
DEFLATED = frozenset(("1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.95"))

_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
_PIXEL_TAGS = frozenset((0x7FE00008, 0x7FE00009, 0x7FE00010))
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_UNDEFINED = 0xFFFFFFFF
# Sequences by tag, for Implicit VR data (which carries no VR): a defined-length SQ is
# walked into; any other defined-length element is skipped whole.
_SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")


@dataclass(frozen=True)
class _Syntax:
    implicit: bool
    tag_length: struct.Struct  # group, element, 32-bit length (implicit elements and items)
    explicit: struct.Struct  # group, element, VR, 16-bit length
    long_length: struct.Struct


_LE = (struct.Struct("<HHI"), struct.Struct("<HH2sH"), struct.Struct("<I"))
_BE = (struct.Struct(">HHI"), struct.Struct(">HH2sH"), struct.Struct(">I"))
_EXPLICIT_LE_SYNTAX = _Syntax(False, *_LE)
_IMPLICIT_LE_SYNTAX = _Syntax(True, *_LE)


@dataclass
class Scan:
    """What the walk found at the top level of the dataset."""

    data: Buffer  # the dataset's bytes: the file as sent, or the inflated dataset
    deflated: bool
    elements: dict[int, tuple[bytes, int, int]] = field(default_factory=dict)  # tag -> (VR, start, length)
    in_order: bool = True  # top-level tags ascending, VRs as labelled (what a quick value reader relies on)

    def raw(self, tag: int) -> tuple[bytes, bytes] | None:
        """(VR, value bytes) of a wanted top-level element, or None when absent."""
        found = self.elements.get(tag)
        if found is None:
            return None
        vr, start, length = found
        return vr, bytes(self.data[start:start + length])


def _malformed(text: str) -> IngestError:
    return IngestError(f"dataset cannot be parsed: {text}", statuses.CANNOT_UNDERSTAND)


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """One pass over a dataset's elements; lengths checked, values not decoded."""

    def __init__(self, data: Buffer, syntax: _Syntax, wanted: frozenset[int], scan: Scan) -> None:
        self.data = data
        self.syntax = syntax
        self.wanted = wanted
        self.scan = scan

    def dataset(self, pos: int, end: int, depth: int, in_item: bool = False) -> int:
        """Walk elements from ``pos`` to ``end``; in an undefined-length item, up to and
        past its Item Delimitation. Returns the position after the last byte read."""
        data, syntax = self.data, self.syntax
        last = -1
        while pos < end:
            if pos + 8 > end:
                raise _malformed(f"element header at offset {pos} cut off ({end - pos} bytes left)")
            group, elem, length = syntax.tag_length.unpack_from(data, pos)
            tag = (group << 16) | elem
            if group == 0xFFFE:
                if tag == _ITEM_END and in_item:
                    return pos + 8
                raise _malformed(f"item tag {_tag_text(tag)} outside a sequence at offset {pos}")
            if syntax.implicit:
                vr, start = b"", pos + 8
            else:
                _g, _e, vr, short = syntax.explicit.unpack_from(data, pos)
                if vr in _SHORT_VRS:
                    start, length = pos + 8, short
                elif vr in _LONG_VRS or (vr.isalpha() and vr.isupper()):  # new VRs use the long form
                    if pos + 12 > end:
                        raise _malformed(f"element {_tag_text(tag)} header cut off at offset {pos}")
                    start, length = pos + 12, syntax.long_length.unpack_from(data, pos + 8)[0]
                else:
                    raise _malformed(f"element {_tag_text(tag)} has no valid VR ({vr!r}) at offset {pos}")
            if depth == 0:
                if tag <= last:
                    self.scan.in_order = False
                if tag in self.wanted:
                    self.scan.elements[tag] = (vr, start, length)
            last = tag
            pos = self._value(tag, vr, start, length, end, depth)
        if in_item:
            raise _malformed(f"an item of undefined length is not closed by the end of its data ({end})")
        return pos

    def _value(self, tag: int, vr: bytes, start: int, length: int, end: int, depth: int) -> int:
        """Check one value and return the position after it (walking into sequences)."""
        if length == _UNDEFINED:
            if tag in _PIXEL_TAGS and vr in (b"OB", b"OW", b""):
                return self.items(tag, start, end, depth, fragments=True)
            if vr in (b"SQ", b"UN", b""):
                return self.items(tag, start, end, depth, fragments=False, implicit=vr == b"UN")
            raise _malformed(f"element {_tag_text(tag)} {vr.decode('ascii', 'replace')} has an undefined length")
        if start + length > end:
            raise _malformed(f"element {_tag_text(tag)} {vr.decode('ascii', 'replace')} announces {length} bytes "
                             f"at offset {start}, but {max(end - start, 0)} remain")
        if vr == b"SQ" or (not vr and tag in _SEQUENCE_TAGS):
            self.items(tag, start, start + length, depth, fragments=False, defined=True)
        return start + length

    def items(self, tag: int, pos: int, end: int, depth: int, *, fragments: bool,
              implicit: bool = False, defined: bool = False) -> int:
        """Walk the items of a sequence (or the fragments of encapsulated pixel data)."""
        if depth >= MAX_DEPTH:
            raise _malformed(f"sequences nested deeper than {MAX_DEPTH} at {_tag_text(tag)}")
        walker = self
        if implicit and not self.syntax.implicit:  # UN of undefined length: Implicit VR LE inside
            walker = _Walker(self.data, _IMPLICIT_LE_SYNTAX, frozenset(), self.scan)
        item_tags = self.syntax.tag_length
        while True:
            if defined and pos == end:
                return pos
            if pos + 8 > end:
                raise _malformed(f"sequence {_tag_text(tag)} cut off at offset {pos}: no "
                                 f"{'end' if defined else 'Sequence Delimitation Item'}")
            group, elem, length = item_tags.unpack_from(self.data, pos)
            item = (group << 16) | elem
            if item == _SEQUENCE_END and not defined:
                return pos + 8
            if item != _ITEM:
                raise _malformed(f"sequence {_tag_text(tag)} holds {_tag_text(item)} where an item belongs "
                                 f"(offset {pos})")
            start = pos + 8
            if length == _UNDEFINED:
                if fragments:
                    raise _malformed(f"a pixel data fragment of undefined length in {_tag_text(tag)}")
                pos = walker.dataset(start, end, depth + 1, in_item=True)
                continue
            if start + length > end:
                raise _malformed(f"an item of {_tag_text(tag)} announces {length} bytes at offset {start}, "
                                 f"but {end - start} remain")
            if not fragments:
                walker.dataset(start, start + length, depth + 1)
            pos = start + length


def _meta(data: Buffer) -> tuple[str, int]:
    """(transfer syntax UID, offset of the dataset) from the File Meta Information."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise _malformed("no DICOM preamble")
    pos, syntax, end = 132, None, len(data)
    while pos + 8 <= end and data[pos:pos + 2] == b"\x02\x00":
        group, elem, vr, short = _EXPLICIT_LE_SYNTAX.explicit.unpack_from(data, pos)
        if vr in _SHORT_VRS:
            start, length = pos + 8, short
        else:
            if pos + 12 > end:
                raise _malformed("file meta information cut off")
            start, length = pos + 12, _EXPLICIT_LE_SYNTAX.long_length.unpack_from(data, pos + 8)[0]
        if start + length > end:
            raise _malformed(f"file meta element (0002,{elem:04X}) runs past the data")
        if elem == 0x0010:
            syntax = bytes(data[start:start + length]).rstrip(b" \0").decode("ascii", "replace")
        pos = start + length
    if not syntax:
        raise _malformed("no transfer syntax in the file meta information")
    return syntax, pos


def _syntax_for(uid: str) -> _Syntax:
    if uid == IMPLICIT_LE:
        return _IMPLICIT_LE_SYNTAX
    if uid == EXPLICIT_BE:
        return _Syntax(False, *_BE)
    return _EXPLICIT_LE_SYNTAX  # Explicit VR Little Endian and every encapsulated syntax


def _inflate_to(compressed: memoryview, scratch: IO[bytes], limit: int) -> int:
    """Inflate raw deflate data into ``scratch`` in chunks; refuse past ``limit`` bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    pending: bytes | memoryview = compressed
    while True:
        try:
            chunk = inflater.decompress(pending, _INFLATE_CHUNK)
            if not chunk and inflater.unconsumed_tail:
                raise zlib.error("no progress")
            last = not chunk
            if last:
                chunk = inflater.flush()  # what zlib still holds once the input is used up (< 32 KiB)
        except zlib.error as exc:
            raise _malformed(f"deflated data cannot be inflated ({exc})") from exc
        total += len(chunk)
        if total > limit:
            raise IngestError(f"deflated dataset inflates past {limit} bytes (sent: {len(compressed)} bytes)",
                              statuses.OUT_OF_RESOURCES)
        scratch.write(chunk)
        if last:
            return total
        pending = inflater.unconsumed_tail


def inflation_limit(sent_bytes: int, max_instance_bytes: int) -> int:
    """The most a deflated dataset of ``sent_bytes`` may inflate to."""
    return min(max_instance_bytes, max(INFLATION_FLOOR_BYTES, MAX_INFLATION_RATIO * sent_bytes))


@contextmanager
def scan_instance(data: bytes, wanted: frozenset[int], *, max_instance_bytes: int,
                  scratch_dir: Path | None = None) -> Iterator[Scan]:
    """Check ``data`` (preamble, file meta, dataset) to its end and yield what was found.

    Raises :class:`~dicom_node.errors.IngestError`: 0xC000 for a dataset that cannot
    be parsed, 0xA700 for a deflated one that inflates too far.
    """
    syntax_uid, offset = _meta(data)
    if syntax_uid not in DEFLATED:
        syntax = _syntax_for(syntax_uid)
        scan = Scan(data, False)
        if syntax.implicit and bytes(data[offset + 4:offset + 6]) in _SHORT_VRS | _LONG_VRS:
            # Explicit VR data sent under Implicit VR: pydicom reads it as explicit, and so
            # does the walk; its values are left to pydicom
            syntax, scan.in_order = _EXPLICIT_LE_SYNTAX, False
        _Walker(data, syntax, wanted, scan).dataset(offset, len(data), 0)
        yield scan
        return
    limit = inflation_limit(len(data), max_instance_bytes)
    with tempfile.TemporaryFile(dir=scratch_dir, prefix="inflate-") as scratch:
        size = _inflate_to(memoryview(data)[offset:], scratch, limit)
        if size == 0:
            raise _malformed("deflated dataset is empty")
        scratch.flush()
        with mmap.mmap(scratch.fileno(), size, access=mmap.ACCESS_READ) as inflated:
            scan = Scan(inflated, True)
            _Walker(inflated, _EXPLICIT_LE_SYNTAX, wanted, scan).dataset(0, size, 0)
            yield scan
