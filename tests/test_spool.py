"""The slot spool: one flush per instance, and recovery of every crash leftover.

The leftovers are made the way a crash makes them: a slot written and flushed by the
real code but never renamed (power cut after Success), a slot whose write was cut
short or whose stamp was written over bytes that never reached the disk (power cut
before the flush returned), empty slots. A real node then starts on that storage.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.node import Node
from dicom_node.storage import spool as spool_mod
from dicom_node.storage.spool import PREAMBLE, Spool, stamp_matches, write_to_slot
from phantoms.ct_writer import simple_ct_volume, write_ct_series
from tests.support import start_node


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return write_ct_series(simple_ct_volume(6, 32, 32), tmp_path / "ct")


def _uids(path: Path) -> tuple[str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)


def _spool_root(tmp_path: Path) -> Path:
    return tmp_path / "var" / "spool"


def test_store_one_flush_stamped_bytes_as_sent(tmp_path: Path, series: list[Path],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    spool = Spool(tmp_path / "spool")
    flushes: list[str] = []
    real_fdatasync, real_sync_dir = spool_mod.os.fdatasync, spool_mod._sync_dir
    spool.slots.take()  # the pool is made (and its folder synced) ahead of need
    spool.slots._thread.join(5)  # type: ignore[union-attr]
    monkeypatch.setattr(spool_mod.os, "fdatasync", lambda fd: (flushes.append("file"), real_fdatasync(fd)))
    monkeypatch.setattr(spool_mod, "_sync_dir", lambda p: (flushes.append(f"dir {p.name}"), real_sync_dir(p)))
    data = series[0].read_bytes()
    study, sop = _uids(series[0])
    stored = spool.store(study, sop, data)
    assert flushes == ["file"]  # the folder syncs happen later, in the background
    on_disk = stored.path.read_bytes()
    assert stored.path == spool.path_for(study, sop)
    assert on_disk[PREAMBLE:] == data[PREAMBLE:]  # only the preamble holds the stamp
    assert stamp_matches(on_disk) and not stamp_matches(data)
    assert dcmread(stored.path).SOPInstanceUID == sop


def _leave_slot(root: Path, data: bytes) -> Path:
    """A slot written and flushed by the real code, then the process died before the rename."""
    spool = Spool(root)
    slot = spool.slots.take()
    write_to_slot(slot, data)
    return slot


def test_recovery_adopts_flushed_slots_and_discards_partial_ones(tmp_path: Path, series: list[Path]) -> None:
    root = _spool_root(tmp_path)
    acknowledged = _leave_slot(root, series[0].read_bytes())  # flushed: may have been answered Success
    cut_short = _leave_slot(root, series[1].read_bytes())
    cut_short.write_bytes(cut_short.read_bytes()[:-100])  # the length in the stamp no longer matches
    torn = _leave_slot(root, series[2].read_bytes())
    torn_bytes = bytearray(torn.read_bytes())
    torn_bytes[-1000:-500] = bytes(500)  # stamp on disk, some data never reached it
    torn.write_bytes(bytes(torn_bytes))
    unstamped = _leave_slot(root, series[3].read_bytes())
    unstamped.write_bytes(series[3].read_bytes())  # bytes written, stamp not yet
    empty = Spool(root).slots.take()

    node = start_node(tmp_path, retention={"ignored_days": None})
    try:
        study, sop = _uids(series[0])
        final = node.spool.path_for(study, sop)
        assert final.exists() and not acknowledged.exists()
        assert final.read_bytes()[PREAMBLE:] == series[0].read_bytes()[PREAMBLE:]
        rows = node.db.query("SELECT sop_instance_uid, path FROM instances")
        assert rows == [{"sop_instance_uid": sop, "path": str(final)}]
        for gone in (cut_short, torn, unstamped):
            assert not gone.exists()
        assert empty.exists() and empty.stat().st_size == 0  # back in the pool
        assert sorted(p.name for p in node.spool.root.rglob("*.dcm")) == [final.name]
    finally:
        node.stop()


def test_recovery_keeps_the_first_copy_and_sets_unreadable_slots_aside(tmp_path: Path, series: list[Path]) -> None:
    root = _spool_root(tmp_path)
    first = Spool(root).store(*_uids(series[0]), series[0].read_bytes())
    again = _leave_slot(root, series[0].read_bytes())  # the same instance, sent again, cut before its rename
    garbage = b"\0" * PREAMBLE + b"DICM" + b"\xff" * 300
    strange = _leave_slot(root, garbage)  # stamped and complete, but no readable dataset

    node = start_node(tmp_path, retention={"ignored_days": None})
    try:
        assert not again.exists() and first.path.exists()
        assert not strange.exists() and strange.with_suffix(".unreadable").exists()
        assert len(node.db.query("SELECT 1 FROM instances")) == 1
    finally:
        node.stop()


def test_node_restarted_on_a_spool_serves_and_refills_its_pool(tmp_path: Path, series: list[Path]) -> None:
    from tests.support import storescu

    node: Node = start_node(tmp_path, retention={"ignored_days": None})
    try:
        assert storescu(node.port, series).returncode == 0
        assert len(list(node.spool.root.rglob("*.dcm"))) == len(series)
        slots = list(node.spool.slots.folder.rglob("*.slot"))  # the node's and every acceptor's
        assert slots and all(p.stat().st_size == 0 for p in slots)  # every used slot was renamed
    finally:
        node.stop()


def test_no_slot_can_be_made_is_a_storage_error(tmp_path: Path, series: list[Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Disk or inodes full with the pool empty: a StorageError (the C-STORE gets
    0xA700 Out of Resources), not an unexpected exception (0x0110)."""
    import errno

    from dicom_node.errors import StorageError

    def no_space(self: object, n: int) -> list[Path]:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(spool_mod.SlotPool, "_make", no_space)
    spool = Spool(tmp_path / "spool")
    study, sop = _uids(series[0])
    with pytest.raises(StorageError, match="No space left on device"):
        spool.store(study, sop, series[0].read_bytes())
    assert not spool.path_for(study, sop).exists()
