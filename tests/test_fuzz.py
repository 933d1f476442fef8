"""Fuzzing the two places hostile bytes reach: the C-STORE path and series -> volume.

Mutated copies of a valid CT instance (bytes flipped, value lengths rewritten to
absurd values, truncation, garbage inserted) go through ``Ingestor.store`` and then,
when stored, through ``build_volume``. Neither may raise anything but its own
documented error: the C-STORE path answers a DIMSE status, the volume builder raises
SeriesError. What the C-STORE path acknowledges must parse to its end (dcmdump reads
it). Inputs that once broke this are kept in ``tests/fuzz_corpus/`` and replayed first.
"""

from __future__ import annotations

import io
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import dcmread
from pynetdicom.dsutils import split_dataset

from dicom_node.errors import SeriesError
from dicom_node.receive.ingest import Ingestor, StoreRequest
from dicom_node.series import build_volume
from dicom_node.storage.spool import Spool
from dicom_node.storage.state import StateDB
from phantoms.ct_writer import simple_ct_volume, write_ct_series
from tests.support import require_tool

CORPUS = Path(__file__).parent / "fuzz_corpus"
STATUSES = {0x0000, 0xA700, 0xA900, 0xC000}


@pytest.fixture(scope="module")
def valid(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = write_ct_series(simple_ct_volume(1, 16, 16), tmp_path_factory.mktemp("seed"))[0]
    return path.read_bytes()


@pytest.fixture(scope="module")
def ingestor(tmp_path_factory: pytest.TempPathFactory) -> Ingestor:
    root = tmp_path_factory.mktemp("fuzz")
    return Ingestor(Spool(root / "spool"), StateDB(root / "state.sqlite3"),
                    min_free_bytes=0, max_instance_bytes=2**24)


def _check(ingestor: Ingestor, data: bytes) -> None:
    before = ingestor.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"]
    outcome = ingestor.store(StoreRequest(data, "1.2.840.10008.5.1.4.1.1.2", "", "1.2.840.10008.1.2.1",
                                          "DICOMNODE", "FUZZER"))
    assert outcome.status in STATUSES, hex(outcome.status)
    if outcome.status != 0 or outcome.disposition != "new":
        return
    assert ingestor.db.query("SELECT COUNT(*) AS n FROM instances")[0]["n"] == before + 1
    stored = ingestor.db.query("SELECT path FROM instances ORDER BY rowid DESC LIMIT 1")[0]["path"]
    assert Path(stored).is_relative_to(ingestor.spool.root)
    # what was acknowledged parses to its end: dcmtk reads every element
    dump = subprocess.run([require_tool("dcmdump"), "-q", stored], capture_output=True)
    assert dump.returncode == 0, dump.stderr.decode(errors="replace")
    try:
        build_volume([Path(stored)])
    except SeriesError:
        pass


_counter = iter(range(10**6))


def _fresh_uid(data: bytes) -> bytes:
    """Give the instance a new SOP Instance UID of the same length (not a duplicate)."""
    try:
        uid = str(dcmread(io.BytesIO(data), stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                  .SOPInstanceUID)
    except Exception:  # too damaged to find the UID: use the bytes as they are
        return data
    fresh = uid[:-6] + f"{next(_counter) % 10**6:06d}"
    return data.replace(uid.encode(), fresh.encode())


def _mutations() -> st.SearchStrategy[tuple[str, int, int]]:
    return st.tuples(st.sampled_from(["flip", "length", "truncate", "insert"]),
                     st.integers(0, 10**6), st.integers(0, 2**32 - 1))


def _mutate(data: bytes, kind: str, where: int, value: int) -> bytes:
    header_end = split_dataset_offset(data)
    pos = header_end + where % max(1, len(data) - header_end)
    if kind == "flip":
        return data[:pos] + bytes([data[pos] ^ (value & 0xFF or 1)]) + data[pos + 1:]
    if kind == "truncate":
        return data[:pos]
    if kind == "insert":
        return data[:pos] + value.to_bytes(4, "little") * 3 + data[pos:]
    # rewrite a 16- or 32-bit value length near pos (absurd lengths, up to 4 GB)
    pos -= pos % 2
    return data[:pos] + struct.pack("<I", value) + data[pos + 4:]


def split_dataset_offset(data: bytes) -> int:
    """Offset where the dataset starts (after preamble and file meta)."""
    group_len = struct.unpack("<I", data[140:144])[0]
    return 144 + group_len


def test_corpus_replays(ingestor: Ingestor, valid: bytes) -> None:
    paths = sorted(CORPUS.glob("*.dcm"))
    assert len(paths) >= 5
    for path in paths:
        _check(ingestor, _fresh_uid(path.read_bytes()))
    _check(ingestor, valid)  # the unmutated seed is stored


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_mutated_instances_never_crash(ingestor: Ingestor, valid: bytes, mutation: tuple[str, int, int]) -> None:
    _check(ingestor, _mutate(_fresh_uid(valid), *mutation))


def test_split_offset_matches_pynetdicom(valid: bytes, tmp_path: Path) -> None:
    path = tmp_path / "x.dcm"
    path.write_bytes(valid)
    assert split_dataset_offset(valid) == split_dataset(path)[1]
    assert dcmread(path).Rows == 16
