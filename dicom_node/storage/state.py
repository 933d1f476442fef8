"""The state database: instances, series, studies, jobs, results and deliveries.

SQLite in WAL mode with ``synchronous=FULL``: a commit is on disk when it returns.
The one exception is the registration of a received instance, whose spooled file is
the durable record (see :meth:`StateDB.transaction`). One connection is shared by the node's threads
behind a lock (ingest's duplicate check, :meth:`StateDB.is_stored`, reads on one of its own);
every state change is recorded in ``transitions`` with a timestamp.

:class:`StateDB` is the embedded default. A cluster keeps the same tables in PostgreSQL
(:class:`dicom_node.storage.postgres.PostgresStateDB`, a subclass that changes only how
the database is reached and locked); :func:`open_state_db` picks by the configuration.
The SQL here is written for both: ``?`` placeholders, ``ON CONFLICT``, ``RETURNING``.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from dicom_node.errors import StorageError
from dicom_node.storage.schema import ADDED_COLUMNS, SCHEMA

log = logging.getLogger(__name__)

# Study states
RECEIVING, PROCESSING, DONE, IGNORED, FAILED = "receiving", "processing", "done", "ignored", "failed"
# Job states
QUEUED, RUNNING, SUPERSEDED = "queued", "running", "superseded"
# Delivery states
PENDING, REJECTED = "pending", "rejected"
TERMINAL_JOB = (DONE, FAILED, SUPERSEDED)
TERMINAL_DELIVERY = (DONE, FAILED, REJECTED, SUPERSEDED)


@dataclass(frozen=True)
class InstanceRecord:
    """One received instance, as registered after it is safely in the spool."""

    sop_instance_uid: str
    series_uid: str
    study_uid: str
    sop_class_uid: str
    transfer_syntax: str
    path: Path
    size: int
    sha256: str
    series_attrs: dict[str, str]  # routing attributes (Modality, ...)
    analysable: bool
    accession_number: str = ""  # the study's, for the admin's searches (never logged)


@dataclass(frozen=True)
class ResultRecord:
    """One result object produced by a job."""

    sop_instance_uid: str
    series_uid: str
    sop_class_uid: str
    kind: str
    path: Path


Row = dict[str, Any]

if TYPE_CHECKING:
    from dicom_node.config import Config


class Conn(Protocol):
    """What a transaction hands out: ``execute(sql, params)`` with ``?`` placeholders, whose
    cursor has ``fetchone``/``fetchall`` (rows indexed by column name) and ``rowcount``
    (:class:`sqlite3.Connection`, or the PostgreSQL adapter)."""

    def execute(self, sql: str, parameters: Any = ..., /) -> Any: ...


def open_state_db(config: Config) -> StateDB:
    """The configuration's state database: SQLite in ``node.storage_dir``, or PostgreSQL
    at ``cluster.database`` when the configuration has a ``cluster:`` section."""
    if config.cluster is None:
        return StateDB(config.database_path)
    from dicom_node.storage.postgres import PostgresStateDB

    return PostgresStateDB(config.cluster.database, connect_timeout_s=config.cluster.connect_timeout_seconds,
                           lease_s=config.cluster.lease_seconds, node_id=config.node_id)


class StateDB:
    """Thread-safe access to the state database."""

    # Appended to a SELECT that claims rows, so that concurrent claimers pass over the rows
    # another has locked (PostgreSQL); SQLite's write transactions run one at a time.
    skip_locked = ""
    clustered = False  # True: several nodes share this database (leases apply)
    node_id: str | None = None  # a cluster node's name: the instances it registers are counted per node

    def __init__(self, path: Path, busy_timeout_s: float = 30.0) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.busy_timeout_s = busy_timeout_s
        self._waiting_since: float | None = None
        self._watch: threading.Thread | None = None
        try:
            self._conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=busy_timeout_s
            )
            self._conn.row_factory = sqlite3.Row
            self._conn.execute("PRAGMA journal_mode=WAL")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._conn.executescript(SCHEMA)
            self._add_columns()
        except sqlite3.Error as exc:
            raise StorageError(f"cannot open the state database {path}: {exc}") from exc
        self._lock = threading.RLock()
        self.path = path
        self._reader: sqlite3.Connection | None = None  # is_stored's own connection, opened on first use
        self._reader_lock = threading.Lock()
        self._writer_fd = self._open_writer_lock(path)

    def _add_columns(self) -> None:
        """Bring a database made by an older version up to the schema (new columns)."""
        for table, column, kind in ADDED_COLUMNS:
            have = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
            if column in have:
                continue
            try:
                self._conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            except sqlite3.OperationalError as exc:  # another process added it meanwhile
                if "duplicate column" not in str(exc):
                    raise

    @staticmethod
    def _open_writer_lock(path: Path) -> int | None:
        """The file whose lock orders writers of all processes (None: SQLite's own waiting)."""
        try:
            return os.open(path.with_name(path.name + ".writer-lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            log.warning("state database: no writer lock file (%s); SQLite's busy wait orders writers",
                        exc.strerror)
            return None

    @contextmanager
    def _writer_turn(self) -> Iterator[None]:
        """Wait for this process's turn to write, in the kernel.

        Several processes write this database (the node and its acceptor processes).
        SQLite makes a writer that finds the database locked poll: it sleeps 1 ms, 2 ms,
        5 ms... between tries, and with several acceptors most registrations waited so.
        An ``flock`` held for the transaction instead wakes the next writer the moment
        the lock is free, and a process that dies releases it. SQLite's own locking
        still protects the data; this only orders the writers that take it.
        """
        fd = self._writer_fd
        if fd is None:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process writes: wait, woken by the kernel
            self._waiting_since = time.monotonic()
            self._start_stall_watch()
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            finally:
                self._waiting_since = None
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _start_stall_watch(self) -> None:
        """A daemon thread that reports, once per stall, a wait for the writer lock
        longer than ``busy_timeout_s``: a writer that holds it and is stuck (stopped, or
        in I/O on a hung disk) stalls every other process, and the log must say so."""
        if self._watch is not None:
            return

        def watch() -> None:
            reported: float | None = None
            while self._writer_fd is not None:
                since = self._waiting_since
                if since is not None and since != reported and time.monotonic() - since > self.busy_timeout_s:
                    log.error("state database: waiting %.0f s for another process's write lock; ingest in this "
                              "process is stalled until it is released", time.monotonic() - since)
                    reported = since
                time.sleep(min(1.0, self.busy_timeout_s / 4))

        self._watch = threading.Thread(target=watch, name="db-writer-watch", daemon=True)
        self._watch.start()

    def close(self) -> None:
        """Close the connections."""
        with self._reader_lock:
            if self._reader is not None:
                self._reader.close()
                self._reader = None
        with self._lock:
            self._conn.close()
            if self._writer_fd is not None:
                os.close(self._writer_fd)
                self._writer_fd = None

    def lock_key(self, c: Conn, key: str) -> None:
        """Serialise this transaction with every other one that locks ``key`` (a study UID)
        until it ends. SQLite's write transactions already run one at a time."""

    @contextmanager
    def transaction(self, flush: bool = True) -> Iterator[Conn]:
        """A write transaction; commits on success, rolls back on error.

        ``flush=False`` commits without waiting for the disk (``synchronous=NORMAL``):
        the change survives a crash of the process but not of the machine. It is used
        only to register spooled instances, whose files are already flushed: after a
        power loss, start-up recovery registers any spooled file the database lost.
        """
        with self._lock, self._writer_turn():
            if not flush:
                self._conn.execute("PRAGMA synchronous=NORMAL")
            try:
                try:
                    self._conn.execute("BEGIN IMMEDIATE")
                except sqlite3.Error as exc:
                    raise StorageError(f"state database unavailable: {exc}") from exc
                try:
                    yield self._conn
                except BaseException:
                    self._conn.execute("ROLLBACK")
                    raise
                try:
                    self._conn.execute("COMMIT")
                except sqlite3.Error as exc:
                    self._conn.execute("ROLLBACK")
                    raise StorageError(f"state database commit failed: {exc}") from exc
            finally:
                if not flush:
                    self._conn.execute("PRAGMA synchronous=FULL")

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        """Run a read query and return rows as dicts."""
        with self._lock:
            try:
                return [dict(r) for r in self._conn.execute(sql, params).fetchall()]
            except sqlite3.Error as exc:
                raise StorageError(f"state database query failed: {exc}") from exc

    def ping(self) -> bool:
        """True when the database answers."""
        try:
            self.query("SELECT 1")
        except StorageError:
            return False
        return True

    @staticmethod
    def transition(
        conn: Conn, kind: str, key: str, old: str | None, new: str, detail: str = ""
    ) -> None:
        """Record a state change; every study state change also gets one log line."""
        if kind == "study":
            log.info("study %s: %s -> %s%s", key, old or "new", new, f" ({detail})" if detail else "")
        conn.execute(
            "INSERT INTO transitions(kind, key, from_state, to_state, at, detail) VALUES (?,?,?,?,?,?)",
            (kind, key, old, new, time.time(), detail or None),
        )

    # ---- instances and studies -------------------------------------------------

    def register_instance(self, rec: InstanceRecord) -> str:
        """Record a spooled instance; returns 'new', 'duplicate' or 'restored'.

        The spooled file is already flushed, so the commit does not wait for the disk
        (see :meth:`transaction`); recovery re-registers a file the database lost.
        """
        now = time.time()
        with self.transaction(flush=False) as c:
            self.lock_key(c, rec.study_uid)  # other nodes' instances of the study wait
            row = c.execute(
                "SELECT purged FROM instances WHERE sop_instance_uid=?", (rec.sop_instance_uid,)
            ).fetchone()
            if row is not None:
                if not row["purged"]:
                    return "duplicate"
                c.execute(
                    "UPDATE instances SET purged=0, path=?, size=?, sha256=? WHERE sop_instance_uid=?",
                    (str(rec.path), rec.size, rec.sha256, rec.sop_instance_uid),
                )
                self._count_ingest(c, rec.size, now)
                return "restored"
            own = c.execute(
                "SELECT 1 FROM results WHERE series_uid=? LIMIT 1", (rec.series_uid,)
            ).fetchone()
            analysable = rec.analysable and own is None
            c.execute(
                "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,0)",
                (rec.sop_instance_uid, rec.series_uid, rec.study_uid, rec.sop_class_uid,
                 rec.transfer_syntax, str(rec.path), rec.size, rec.sha256, now),
            )
            self._upsert_series(c, rec, analysable, now)
            self._touch_study(c, rec, analysable, now)
            self._count_ingest(c, rec.size, now)
        return "new"

    def _count_ingest(self, c: Conn, size: int, now: float) -> None:
        """Count a registered instance for this node (a cluster node only: the embedded
        default writes nothing more). Last in the transaction: the node's row stays locked
        only until the commit that follows."""
        if self.node_id is None:
            return
        c.execute(
            """INSERT INTO node_ingest(node_id, instances, bytes, first_received_at, last_received_at)
               VALUES (?,1,?,?,?)
               ON CONFLICT(node_id) DO UPDATE SET instances = node_ingest.instances + 1,
                   bytes = node_ingest.bytes + excluded.bytes, last_received_at = excluded.last_received_at""",
            (self.node_id, size, now, now),
        )

    @staticmethod
    def _upsert_series(c: Conn, rec: InstanceRecord, analysable: bool, now: float) -> None:
        a = rec.series_attrs
        c.execute(
            """INSERT INTO series(series_uid, study_uid, modality, body_part, series_description,
                   study_description, sop_class_uid, manufacturer, called_ae, calling_ae,
                   analysable, instance_count, last_received_at)
               VALUES (?,?,?,?,?,?,?,?,?,?,?,1,?)
               ON CONFLICT(series_uid) DO UPDATE SET
                   instance_count = series.instance_count + 1, last_received_at = excluded.last_received_at""",
            (rec.series_uid, rec.study_uid, a.get("Modality"), a.get("BodyPartExamined"),
             a.get("SeriesDescription"), a.get("StudyDescription"), rec.sop_class_uid,
             a.get("Manufacturer"), a.get("CalledAETitle"), a.get("CallingAETitle"),
             int(analysable), now),
        )

    def _touch_study(self, c: Conn, rec: InstanceRecord, analysable: bool, now: float) -> None:
        study_uid, accession = rec.study_uid, rec.accession_number or None
        row = c.execute("SELECT state FROM studies WHERE study_uid=?", (study_uid,)).fetchone()
        if row is None:
            c.execute(
                """INSERT INTO studies(study_uid, state, instance_count, first_received_at,
                       last_received_at, updated_at, accession_number) VALUES (?,?,1,?,?,?,?)""",
                (study_uid, RECEIVING, now, now, now, accession),
            )
            self.transition(c, "study", study_uid, None, RECEIVING)
            return
        c.execute(
            """UPDATE studies SET instance_count = instance_count + 1,
                   accession_number = COALESCE(accession_number, ?) WHERE study_uid=?""",
            (accession, study_uid),
        )
        if not analysable:
            return
        c.execute(
            "UPDATE studies SET last_received_at=?, updated_at=?, purged_at=NULL WHERE study_uid=?",
            (now, now, study_uid),
        )
        if row["state"] != RECEIVING:
            c.execute("UPDATE studies SET state=?, reason=NULL WHERE study_uid=?", (RECEIVING, study_uid))
            self.transition(c, "study", study_uid, row["state"], RECEIVING, "re-opened by a new instance")

    def is_stored(self, sop_instance_uid: str) -> bool:
        """True when the instance is already stored (committed and not purged).

        Reads through a connection of its own: in WAL mode a reader never waits for the
        writer, so with several associations this check (made for every C-STORE) does not
        queue behind another instance's commit, and its flush, as it would on the shared
        connection. Raises :class:`StorageError` when the database cannot answer.
        """
        try:
            with self._reader_lock:
                if self._reader is None:
                    self._reader = sqlite3.connect(self.path, isolation_level=None,
                                                   check_same_thread=False, timeout=self.busy_timeout_s)
                rows = self._reader.execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid=? AND purged=0", (sop_instance_uid,)
                ).fetchall()
        except sqlite3.Error as exc:
            raise StorageError(f"state database query failed: {exc}") from exc
        return bool(rows)

    def has_instance_path(self, path: Path) -> bool:
        """True when a spooled file is registered."""
        return bool(self.query("SELECT 1 FROM instances WHERE path=? LIMIT 1", (str(path),)))

    def receiving_studies(self) -> list[Row]:
        """Studies still collecting instances."""
        return self.query("SELECT * FROM studies WHERE state=?", (RECEIVING,))

    def study(self, study_uid: str) -> Row | None:
        """One study row."""
        rows = self.query("SELECT * FROM studies WHERE study_uid=?", (study_uid,))
        return rows[0] if rows else None

    def study_series(self, study_uid: str, analysable_only: bool = True) -> list[Row]:
        """The series of a study (only those the node may analyse, by default)."""
        sql = "SELECT * FROM series WHERE study_uid=?" + (" AND analysable=1" if analysable_only else "")
        return self.query(sql, (study_uid,))

    def study_files(self, study_uid: str) -> list[Path]:
        """Spooled files of a study's analysable series."""
        rows = self.query(
            """SELECT i.path FROM instances i JOIN series s ON s.series_uid = i.series_uid
               WHERE i.study_uid=? AND i.purged=0 AND s.analysable=1 ORDER BY i.path""",
            (study_uid,),
        )
        return [Path(r["path"]) for r in rows]

    def set_study_state(self, study_uid: str, state: str, reason: str | None = None,
                        expect_last_received_at: float | None = None) -> bool:
        """Move a study to ``state`` (recorded as a transition); False when nothing changed.

        With ``expect_last_received_at`` only a study still receiving whose latest instance
        is that one moves (the judgement of a node that read it so, see
        :meth:`WorkStore.dispatch_stable_study`).
        """
        with self.transaction() as c:
            self.lock_key(c, study_uid)
            row = c.execute("SELECT state, last_received_at FROM studies WHERE study_uid=?",
                            (study_uid,)).fetchone()
            if row is None or row["state"] == state:
                return False
            if expect_last_received_at is not None and (
                    row["state"] != RECEIVING or row["last_received_at"] != expect_last_received_at):
                return False
            c.execute(
                "UPDATE studies SET state=?, reason=?, updated_at=? WHERE study_uid=?",
                (state, reason, time.time(), study_uid),
            )
            self.transition(c, "study", study_uid, row["state"], state, reason or "")
        return True

    def mark_purged(self, study_uid: str) -> None:
        """Record that a study's spooled files were removed (retention)."""
        with self.transaction() as c:
            now = time.time()
            c.execute("UPDATE instances SET purged=1 WHERE study_uid=?", (study_uid,))
            cur = c.execute("UPDATE studies SET purged_at=?, updated_at=? WHERE study_uid=? AND purged_at IS NULL",
                            (now, now, study_uid))
            if cur.rowcount:  # once, though several nodes apply the retention policy
                self.transition(c, "study", study_uid, None, "purged", "spooled files removed")

    def studies_to_purge(self, now: float, ignored_days: float | None, delivered_days: float | None) -> list[str]:
        """Studies whose spooled files the retention policy says to remove."""
        uids: list[str] = []
        for state, days in ((IGNORED, ignored_days), (DONE, delivered_days)):
            if days is None:
                continue
            rows = self.query(
                "SELECT study_uid FROM studies WHERE state=? AND purged_at IS NULL AND updated_at <= ?",
                (state, now - days * 86400),
            )
            uids.extend(r["study_uid"] for r in rows)
        return uids

    # ---- status ----------------------------------------------------------------

    def counts(self) -> dict[str, dict[str, int]]:
        """Number of studies, jobs and deliveries by state."""
        out: dict[str, dict[str, int]] = {}
        for table in ("studies", "jobs", "deliveries"):
            rows = self.query(f"SELECT state, COUNT(*) AS n FROM {table} GROUP BY state")
            out[table] = {r["state"]: r["n"] for r in rows}
        return out

    def cluster_view(self) -> dict[str, list[dict[str, Any]]]:
        """A cluster's work as the database holds it: instances received per ingest node
        (counted at registration, never decreasing), jobs queued and running per plugin (its
        queue), and jobs per node or worker that ran them last (``lease_owner``) by state."""
        ingest = self.query("""SELECT node_id AS node, instances, bytes, first_received_at, last_received_at
                               FROM node_ingest ORDER BY node_id""")
        queues = self.query("""SELECT plugin, state, COUNT(*) AS n FROM jobs WHERE state IN ('queued', 'running')
                               GROUP BY plugin, state ORDER BY plugin, state""")
        workers = self.query("""SELECT lease_owner AS worker, state, COUNT(*) AS n FROM jobs
                                WHERE lease_owner IS NOT NULL GROUP BY lease_owner, state ORDER BY lease_owner, state""")
        return {"ingest": ingest, "queues": queues, "workers": workers}


def dumps_timings(timings: dict[str, float]) -> str:
    """Serialise stage timings for the jobs table."""
    return json.dumps({k: round(v, 4) for k, v in timings.items()})
