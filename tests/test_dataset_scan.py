"""The structure check of received datasets (dicom_node/dataset_scan.py): it accepts what
dcmtk reads and refuses what dcmtk cannot, without decoding values."""

from __future__ import annotations

import subprocess
import zlib
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from dicom_node.dataset_scan import INFLATION_FLOOR_BYTES, MAX_DEPTH, inflation_limit, scan_instance
from dicom_node.errors import IngestError
from tests.support import require_tool

PYDICOM_FILES = Path(pydicom.__file__).parent / "data"


def _scan_problem(data: bytes, max_instance_bytes: int = 2**31) -> IngestError | None:
    try:
        with scan_instance(data, frozenset(), max_instance_bytes=max_instance_bytes):
            return None
    except IngestError as exc:
        return exc


def test_agrees_with_dcmdump_on_pydicom_test_files() -> None:
    """pydicom's own test files (big endian, deflated, JPEG, RLE, nested sequences, and
    deliberately broken ones): the scan accepts exactly those dcmtk reads."""
    dcmdump = require_tool("dcmdump")
    checked = 0
    for path in sorted(PYDICOM_FILES.rglob("*")):
        data = path.read_bytes() if path.is_file() else b""
        # DICOMDIRs are never sent by C-STORE; one file has no transfer syntax, which the
        # node always writes into the file meta it builds
        if data[128:132] != b"DICM" or path.name.startswith("DICOMDIR") or "missing_tsyntax" in path.name:
            continue
        readable = subprocess.run([dcmdump, "-q", str(path)], capture_output=True).returncode == 0
        problem = _scan_problem(data)
        assert (problem is None) == readable, f"{path.name}: dcmdump {'reads' if readable else 'fails'}, scan {problem}"
        checked += 1
    assert checked > 150


def _file(ds: Dataset, syntax: str) -> bytes:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = syntax
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    return buf.getvalue()


def _nested(depth: int, undefined: bool) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    inner = ds
    for level in range(depth):
        item = Dataset()
        item.CodeValue = f"L{level}"
        inner.ContentSequence = Sequence([item])
        inner.ContentSequence.is_undefined_length = undefined
        item.is_undefined_length_sequence_item = undefined
        inner = item
    return ds


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
@pytest.mark.parametrize("undefined", [False, True])
def test_nested_sequences_accepted_and_their_truncation_refused(syntax: str, undefined: bool) -> None:
    data = _file(_nested(6, undefined), syntax)
    assert _scan_problem(data) is None
    for cut in (8, 20, 40):
        problem = _scan_problem(data[:-cut])
        assert problem is not None and problem.status == 0xC000, cut


def test_sequences_nested_too_deep_refused() -> None:
    assert _scan_problem(_file(_nested(MAX_DEPTH - 1, True), ExplicitVRLittleEndian)) is None
    problem = _scan_problem(_file(_nested(MAX_DEPTH + 1, True), ExplicitVRLittleEndian))
    assert problem is not None and "nested deeper" in str(problem)


def test_item_outside_a_sequence_refused() -> None:
    data = _file(_nested(0, False), ExplicitVRLittleEndian) + bytes.fromhex("feff00e0") + (0).to_bytes(4, "little")
    problem = _scan_problem(data)
    assert problem is not None and "outside a sequence" in str(problem)


def _deflated(payload_zeros: int) -> bytes:
    ds = _nested(2, True)
    ds.add_new(0x00291010, "OB", bytes(payload_zeros))
    plain = _file(ds, ExplicitVRLittleEndian)
    meta = _file(_nested(0, False), DeflatedExplicitVRLittleEndian)
    meta_end = 144 + int.from_bytes(meta[140:144], "little")
    dataset_start = 144 + int.from_bytes(plain[140:144], "little")
    deflate = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return meta[:meta_end] + deflate.compress(plain[dataset_start:]) + deflate.flush()


def test_deflated_read_and_inflation_bounded() -> None:
    small = _deflated(1000)
    with scan_instance(small, frozenset({0x00080016}), max_instance_bytes=2**31) as scan:
        assert scan.deflated and scan.raw(0x00080016) == (b"UI", CTImageStorage.encode() + b"\0")
    # past the instance limit
    problem = _scan_problem(small, max_instance_bytes=500)
    assert problem is not None and problem.status == 0xA700
    # past the ratio: a few hundred KB of zeros compress about a thousandfold
    bomb = _deflated(INFLATION_FLOOR_BYTES + 2**20)
    assert inflation_limit(len(bomb), 2**31) == INFLATION_FLOOR_BYTES
    problem = _scan_problem(bomb)
    assert problem is not None and problem.status == 0xA700 and "inflates past" in str(problem)
    # not deflate at all
    broken = small[:200] + b"\xff" * 64
    problem = _scan_problem(broken)
    assert problem is not None and problem.status == 0xC000
