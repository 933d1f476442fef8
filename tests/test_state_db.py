"""The state database's writer lock (dicom_node/storage/state.py): writers of all
processes take turns, and a wait longer than the busy timeout for a writer that is
stuck holding the lock is reported in the log (ingest there is stalled, not failing)."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from dicom_node.storage.state import InstanceRecord, StateDB

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold_writer_lock(db_path: Path, seconds: float) -> subprocess.Popen[str]:
    """Another process that takes the writer lock and keeps it (as a stopped acceptor would)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(db_path) + ".writer-lock", str(seconds)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    return holder


def test_a_writer_waits_for_its_turn(tmp_path: Path) -> None:
    db = StateDB(tmp_path / "state.sqlite3", busy_timeout_s=10)
    holder = _hold_writer_lock(db.path, 0.5)
    try:
        started = time.monotonic()
        with db.transaction() as conn:
            conn.execute("SELECT 1")
        assert time.monotonic() - started >= 0.2  # it waited for the other writer
    finally:
        holder.wait()
    db.close()


def test_a_stuck_writer_is_reported_in_the_log(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    db = StateDB(tmp_path / "state.sqlite3", busy_timeout_s=0.4)
    holder = _hold_writer_lock(db.path, 30)
    done = threading.Event()

    def write() -> None:
        with db.transaction() as conn:
            conn.execute("SELECT 1")
        done.set()

    writer = threading.Thread(target=write, daemon=True)
    try:
        with caplog.at_level(logging.ERROR, logger="dicom_node.storage.state"):
            writer.start()
            deadline = time.monotonic() + 10
            while "write lock" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)
            assert "stalled" in caplog.text
            assert not done.is_set()
    finally:
        holder.kill()  # the stuck writer is gone: the kernel releases its lock
        holder.wait()
    assert done.wait(5)
    writer.join(5)
    db.close()


def _instance(tmp_path: Path, sop_uid: str, study_uid: str = "1.2.3") -> InstanceRecord:
    return InstanceRecord(sop_instance_uid=sop_uid, series_uid=study_uid + ".1", study_uid=study_uid,
                          sop_class_uid="1.2.840.10008.5.1.4.1.1.2", transfer_syntax="1.2.840.10008.1.2.1",
                          path=tmp_path / f"{sop_uid}.dcm", size=1, sha256="0" * 64,
                          series_attrs={"Modality": "CT"}, analysable=True)


def test_is_stored_answers_while_another_write_is_open(tmp_path: Path) -> None:
    """The duplicate check of every C-STORE reads on its own connection: it neither waits
    for a write in progress nor sees a purged instance."""
    db = StateDB(tmp_path / "state.sqlite3")
    assert db.register_instance(_instance(tmp_path, "1.2.3.1.1")) == "new"
    assert db.is_stored("1.2.3.1.1") and not db.is_stored("1.2.3.1.2")
    in_write, release = threading.Event(), threading.Event()

    def write() -> None:
        with db.transaction():
            in_write.set()
            release.wait(10)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        assert in_write.wait(10)
        started = time.monotonic()
        assert db.is_stored("1.2.3.1.1")
        assert time.monotonic() - started < 2
    finally:
        release.set()
        writer.join()
    db.mark_purged("1.2.3")
    assert not db.is_stored("1.2.3.1.1")
    db.close()
