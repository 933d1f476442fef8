"""The spool: received instances as files, written durably before Success.

Layout: ``<spool>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``. A file is written to a
hidden temporary name in the same folder, flushed with ``fdatasync``, renamed into
place and the folder is synced. Each instance thus pays two flushes here (file, then
folder); its database registration then commits without a third flush, since a
spooled file the database lost in a power cut is registered again at start. Their cost depends on the disk: 1.5 ms + 0.1 ms was
measured on one ext4 machine, but 1.8-2.6 ms + 1.5-2.0 ms on the 2-vCPU benchmark VM
(``python -m bench.profile_ingest``), where they are most of an instance's time.
Associations never wait on each other here.

A crash can leave a temporary file (never acknowledged: removed on start) or a
renamed file whose database row was never committed (complete, because it was synced
before the rename: re-registered on start).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from dicom_node.errors import StorageError

log = logging.getLogger(__name__)

TMP_PREFIX = ".incoming-"
SUFFIX = ".dcm"

# The checksum is computed while the file is written and flushed (hashlib and the
# flushes release the GIL), instead of after them on the C-STORE's critical path.
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-sha256")


@dataclass(frozen=True)
class SpooledFile:
    """A file made durable in the spool."""

    path: Path
    size: int
    sha256: str


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_durably(path: Path, data: bytes) -> SpooledFile:
    """Write ``data`` to ``path`` atomically and durably (temp, sync, rename, dir sync)."""
    digest = _HASHERS.submit(_sha256, data)
    folder = path.parent
    new_folder = not folder.exists()
    if new_folder:
        folder.mkdir(parents=True, exist_ok=True)
        _sync_dir(folder.parent)
    tmp = folder / f"{TMP_PREFIX}{uuid.uuid4().hex}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fdatasync(fd)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    _sync_dir(folder)
    return SpooledFile(path, len(data), digest.result())


class Spool:
    """Received instances on disk, one folder per study."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path_for(self, study_uid: str, sop_uid: str) -> Path:
        """Where an instance lives (UIDs must already be validated)."""
        return self.root / study_uid / f"{sop_uid}{SUFFIX}"

    def store(self, study_uid: str, sop_uid: str, data: bytes) -> SpooledFile:
        """Write one instance durably; raises StorageError on any I/O failure."""
        path = self.path_for(study_uid, sop_uid)
        try:
            return write_durably(path, data)
        except OSError as exc:
            raise StorageError(f"disk write failed: {exc.strerror}") from exc

    def free_bytes(self) -> int:
        """Free space for unprivileged writers on the spool's filesystem."""
        return shutil.disk_usage(self.root).free

    def remove_study(self, study_uid: str) -> None:
        """Delete a study's folder (retention)."""
        shutil.rmtree(self.root / study_uid, ignore_errors=True)

    def recover(self) -> list[Path]:
        """Remove unacknowledged temporary files; return every complete file."""
        complete: list[Path] = []
        removed = 0
        for study_dir in self.root.iterdir():
            if not study_dir.is_dir():
                continue
            for entry in study_dir.iterdir():
                if entry.name.startswith(TMP_PREFIX):
                    entry.unlink(missing_ok=True)
                    removed += 1
                elif entry.suffix == SUFFIX:
                    complete.append(entry)
        if removed:
            log.warning("spool recovery: removed %d partial files never acknowledged", removed)
        return complete
