"""Hostile datasets sent to a running node (``dicom-node serve``, two acceptor processes)
by a pynetdicom peer: corrupt element lengths, a SOP class that is not the one announced,
and a deflate bomb. None may be acknowledged or stored; the node keeps serving.
"""

from __future__ import annotations

import re
import sqlite3
import struct
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import (
    CTImageStorage,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    MRImageStorage,
    generate_uid,
)
from pynetdicom import AE, _config

from tests.support import NodeProcess, free_port, node_config

STUDY = generate_uid()


def _base(sop_class: str = CTImageStorage) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = "CT"
    ds.StudyInstanceUID = STUDY
    ds.SeriesInstanceUID = generate_uid()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    return ds


def _file(folder: Path, name: str, ds: Dataset, syntax: str, tail: bytes = b"") -> Path:
    """``ds`` encoded in ``syntax``, with raw ``tail`` bytes after its last element."""
    ds.file_meta.TransferSyntaxUID = syntax
    path = folder / f"{name}.dcm"
    ds.save_as(path, enforce_file_format=True, implicit_vr=syntax == ImplicitVRLittleEndian, little_endian=True)
    path.write_bytes(path.read_bytes() + tail)
    return path


def _explicit(tag: int, vr: bytes, length: int, present: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UT", b"UN", b"SQ"):
        return struct.pack("<HH2sHI", tag >> 16, tag & 0xFFFF, vr, 0, length) + present
    return struct.pack("<HH2sH", tag >> 16, tag & 0xFFFF, vr, length) + present


# the five datasets of issue 15 whose element lengths run past the data
CORRUPT = {
    "lo-0x1000-8-present": (ExplicitVRLittleEndian, _explicit(0x00290010, b"LO", 0x1000, b"ACME 1.0")),
    "ut-0xfffffff0": (ExplicitVRLittleEndian, _explicit(0x00291000, b"UT", 0xFFFFFFF0, b"text" * 4)),
    "lo-0xffff": (ExplicitVRLittleEndian, _explicit(0x00290010, b"LO", 0xFFFF, b"ACME 1.0")),
    "pixel-data-524288-100-present": (ExplicitVRLittleEndian, _explicit(0x7FE00010, b"OW", 524288, bytes(100))),
    "implicit-0xffffff": (ImplicitVRLittleEndian, struct.pack("<HHI", 0x0029, 0x1000, 0xFFFFFF) + bytes(64)),
}


def _deflate_bomb(folder: Path) -> Path:
    """1.1 MiB on the wire that inflates to 1.19 GB: a valid header, then an OB of zeros.

    The zeros are one 16 MiB block compressed after a full flush, repeated: each copy is
    the same bytes because a full flush resets the compressor.
    """
    ds = _base()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    meta = DicomBytesIO()
    meta.write(b"\0" * 128 + b"DICM")
    write_file_meta_info(meta, ds.file_meta)
    header = DicomBytesIO()
    header.is_little_endian, header.is_implicit_VR = True, False
    write_dataset(header, ds)
    zeros, copies = 16 * 2**20, 71
    head = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    start = (head.compress(header.getvalue() + _explicit(0x00291010, b"OB", zeros * copies, b""))
             + head.flush(zlib.Z_FULL_FLUSH))
    block = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    repeated = block.compress(bytes(zeros)) + block.flush(zlib.Z_FULL_FLUSH)
    final = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS).flush(zlib.Z_FINISH)
    path = folder / "bomb.dcm"
    path.write_bytes(meta.getvalue() + start + repeated * copies + final)
    return path


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    root = tmp_path_factory.mktemp("hostile")
    config = node_config(root / "var", free_port(), routes=[])
    config["node"]["listener_processes"] = 2
    proc = NodeProcess(config, root / "work").start()
    try:
        yield proc
    finally:
        proc.stop()


@pytest.fixture(autouse=True)
def raw_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Send the files' bytes as they are: pynetdicom otherwise decodes and re-encodes
    them, which mends a truncated element."""
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)


def _send(port: int, path: Path, syntax: str) -> int:
    ae = AE(ae_title="HOSTILE")
    ae.add_requested_context(CTImageStorage, [syntax])
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
        return int(status.Status)
    finally:
        assoc.release()


def _stored(node: NodeProcess) -> set[str]:
    db = Path(node.config["node"]["storage_dir"]) / "state.sqlite3"
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        return {row[0] for row in conn.execute("SELECT sop_instance_uid FROM instances")}


@pytest.mark.parametrize("name", sorted(CORRUPT))
def test_corrupt_lengths_refused_and_not_stored(node: NodeProcess, tmp_path: Path, name: str) -> None:
    syntax, tail = CORRUPT[name]
    ds = _base()
    path = _file(tmp_path, name, ds, syntax, tail)
    assert _send(node.port, path, syntax) == 0xC000
    assert ds.SOPInstanceUID not in _stored(node)
    assert "dataset cannot be parsed" in node.log()
    # the same dataset without the broken element is accepted: the node still serves
    good = _base()
    assert _send(node.port, _file(tmp_path, "good", good, syntax), syntax) == 0x0000
    assert good.SOPInstanceUID in _stored(node)


def test_sop_class_must_match_the_request(node: NodeProcess, tmp_path: Path) -> None:
    ds = _base(sop_class=MRImageStorage)
    path = _file(tmp_path, "mr-as-ct", ds, ExplicitVRLittleEndian)
    # announced as CT Image Storage: the file meta's class (the first, in group 0002) is what is sent
    assert len(MRImageStorage) == len(CTImageStorage)
    path.write_bytes(path.read_bytes().replace(MRImageStorage.encode(), CTImageStorage.encode(), 1))
    assert _send(node.port, path, ExplicitVRLittleEndian) == 0xA900
    assert ds.SOPInstanceUID not in _stored(node)
    assert "SOPClassUID differs from the request's Affected SOP Class UID" in node.log()


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmHWM for {pid}")


def test_deflate_bomb_refused_in_bounded_memory(node: NodeProcess, tmp_path: Path) -> None:
    bomb = _deflate_bomb(tmp_path)
    assert bomb.stat().st_size < 1.2 * 2**20
    assert _send(node.port, bomb, DeflatedExplicitVRLittleEndian) == 0xA700
    acceptors = [int(pid) for pid in re.findall(r"acceptor \d+ \(pid (\d+)\) serving", node.log())]
    assert len(acceptors) == 2, node.log()
    peaks = {pid: _peak_rss_mib(pid) for pid in acceptors}
    assert max(peaks.values()) < 300, peaks
    assert "deflated dataset inflates past" in node.log()
    # an ordinary deflated instance is accepted
    good = _base()
    path = _file(tmp_path, "deflated", good, DeflatedExplicitVRLittleEndian)
    assert _send(node.port, path, DeflatedExplicitVRLittleEndian) == 0x0000
    assert good.SOPInstanceUID in _stored(node)


def test_oversize_instance_is_not_buffered_whole(tmp_path: Path) -> None:
    """A 32 MiB instance against max_instance_mb 1: refused with 0xA700, and the acceptor
    stops buffering at the limit (its peak memory grows by far less than the instance)."""
    config = node_config(tmp_path / "var", free_port(), routes=[])
    config["node"].update(listener_processes=2, max_instance_mb=1)
    proc = NodeProcess(config, tmp_path / "work").start()
    try:
        ds = _base()
        ds.add_new(0x00291010, "OB", bytes(32 * 2**20))
        path = _file(tmp_path, "big", ds, ExplicitVRLittleEndian)
        acceptors = [int(pid) for pid in re.findall(r"acceptor \d+ \(pid (\d+)\) serving", proc.log())]
        before = {pid: _peak_rss_mib(pid) for pid in acceptors}
        assert _send(proc.port, path, ExplicitVRLittleEndian) == 0xA700
        growth = {pid: _peak_rss_mib(pid) - before[pid] for pid in acceptors}
        assert max(growth.values()) < 12, growth
        assert "exceeds the maximum of 1 MiB" in proc.log()
        assert ds.SOPInstanceUID not in _stored(proc)
        small = _base()
        assert _send(proc.port, _file(tmp_path, "small", small, ExplicitVRLittleEndian), ExplicitVRLittleEndian) == 0
    finally:
        proc.stop()
