"""The state database in PostgreSQL, for several nodes sharing one state (a cluster).

:class:`PostgresStateDB` is a :class:`~dicom_node.storage.state.StateDB` whose tables
live in PostgreSQL (psycopg 3): the same schema (:func:`~dicom_node.storage.schema.
postgres_migrations`, applied in order under an advisory lock, so nodes starting
together migrate once) and the same SQL, whose ``?`` placeholders become psycopg's
``%s``. What differs is locking, since several nodes write at once:

- the writes that judge a study (registering an instance, dispatching it, finishing a
  job) take a transaction-scoped advisory lock on the study UID, so instances arriving
  through different nodes assemble into one study and exactly one node dispatches it;
- claims read with ``FOR UPDATE SKIP LOCKED`` (:attr:`skip_locked`), so two nodes never
  take the same queued job;
- a commit that registers a spooled instance does not wait for the WAL flush
  (``synchronous_commit = off``), as SQLite's ``synchronous=NORMAL`` does: the spooled
  file is the durable record, and recovery registers a file the database lost.

A connection that breaks (the server restarted) is opened again on the next use; the
operation that met the break fails with :class:`~dicom_node.errors.StorageError`.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import dict_row

from dicom_node.config import redact_url
from dicom_node.errors import StorageError
from dicom_node.storage.schema import postgres_migrations
from dicom_node.storage.state import Conn, Row, StateDB

log = logging.getLogger(__name__)

MIGRATION_LOCK = 0x64636D6E  # advisory lock key held while migrating ("dcmn")


@functools.lru_cache(maxsize=512)
def to_pg(sql: str) -> str:
    """SQL with ``?`` placeholders as psycopg's ``%s`` (a literal ``%`` doubled).

    The node's SQL never has a ``?`` or a ``%`` inside a string literal.
    """
    return sql.replace("%", "%%").replace("?", "%s")


class _PgConn:
    """The connection a transaction hands out: ``execute`` with ``?`` placeholders."""

    def __init__(self, conn: psycopg.Connection[Row]) -> None:
        self._pg = conn

    def execute(self, sql: str, parameters: Any = (), /) -> psycopg.Cursor[Row]:
        return self._pg.execute(to_pg(sql), tuple(parameters))


def describe_error(exc: psycopg.Error, url: str) -> str:
    """One line for a psycopg error, never with the URL's password."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    try:
        password = urlsplit(url).password
    except ValueError:
        password = None
    return text.replace(password, "***") if password else text


class PostgresStateDB(StateDB):
    """The state database on a PostgreSQL server (see the module's docstring)."""

    skip_locked = " FOR UPDATE SKIP LOCKED"
    clustered = True

    def __init__(self, url: str, connect_timeout_s: float = 10.0, lease_s: float = 30.0,
                 node_id: str | None = None) -> None:
        self.url = url
        self.node_id = node_id  # counts the instances this node registers (``node_ingest``)
        self.lease_s = lease_s
        busy_timeout_s = lease_s
        self.where = redact_url(url)
        self.busy_timeout_s = busy_timeout_s  # how long a lock is waited for
        self.connect_timeout_s = connect_timeout_s
        self._lock = threading.RLock()
        self._reader_lock = threading.Lock()
        self._pg: psycopg.Connection[Row] | None = None
        self._pg_reader: psycopg.Connection[Row] | None = None
        self._writer_fd = None
        self._closed = False
        with self._lock:
            self.migrate()

    def __repr__(self) -> str:
        return f"PostgresStateDB({self.where})"

    def _connect(self) -> psycopg.Connection[Row]:
        lease_ms = max(1000, int(self.lease_s * 1000))
        try:
            # a node that hangs or vanishes inside a transaction holds its locks no longer than
            # a lease: the server ends such a session (and the kernel's keepalives a dead peer's)
            conn = psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                   connect_timeout=max(1, round(self.connect_timeout_s)),
                                   application_name="dicom-node", keepalives=1,
                                   keepalives_idle=max(1, int(self.lease_s / 3)), keepalives_interval=2,
                                   keepalives_count=3, tcp_user_timeout=lease_ms)
            for name, value in (("lock_timeout", f"{int(self.busy_timeout_s * 1000)}ms"),
                                ("idle_in_transaction_session_timeout", f"{lease_ms}ms")):
                conn.execute("SELECT set_config(%s, %s, false)", (name, value))
        except psycopg.Error as exc:
            raise StorageError(f"cannot reach the state database {self.where}: "
                               f"{describe_error(exc, self.url)}") from exc
        return conn

    def _connection(self) -> psycopg.Connection[Row]:
        """The shared connection (call with ``_lock`` held), opened again after a break."""
        if self._closed:
            raise StorageError("the state database is closed")
        if self._pg is None or self._pg.closed:
            self._pg = self._connect()
        return self._pg

    def migrate(self) -> int:
        """Apply the migrations this database lacks, once across nodes; the version now."""
        steps = postgres_migrations()
        try:
            conn = self._connection()
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATION_LOCK,))
                conn.execute("""CREATE TABLE IF NOT EXISTS schema_migrations (
                                    version INTEGER PRIMARY KEY, description TEXT NOT NULL,
                                    applied_at DOUBLE PRECISION NOT NULL)""")
                rows = conn.execute("SELECT version FROM schema_migrations").fetchall()
                have = {int(r["version"]) for r in rows}
                newest = max((v for v, _, _ in steps), default=0)
                if have and max(have) > newest:
                    raise StorageError(f"the state database {self.where} has schema version {max(have)}, newer "
                                       f"than this node's {newest}: upgrade this node")
                for version, description, sql in steps:
                    if version in have:
                        continue
                    conn.execute(sql)  # several statements: allowed without parameters
                    conn.execute("INSERT INTO schema_migrations VALUES (%s, %s, %s)",
                                 (version, description, time.time()))
                    log.info("state database: migration %d (%s) applied", version, description)
        except psycopg.Error as exc:
            raise StorageError(f"cannot migrate the state database {self.where}: "
                               f"{describe_error(exc, self.url)}") from exc
        return newest

    def schema_version(self) -> int:
        """The newest migration applied."""
        rows = self.query("SELECT MAX(version) AS v FROM schema_migrations")
        return int(rows[0]["v"] or 0)

    def close(self) -> None:
        """Close the connections."""
        with self._reader_lock:
            if self._pg_reader is not None:
                self._pg_reader.close()
                self._pg_reader = None
        with self._lock:
            self._closed = True
            if self._pg is not None:
                self._pg.close()
                self._pg = None

    def lock_key(self, c: Conn, key: str) -> None:
        """Hold an advisory lock on ``key`` (a study UID) until this transaction ends."""
        c.execute("SELECT pg_advisory_xact_lock(hashtextextended(?, 0))", (key,))

    @contextmanager
    def transaction(self, flush: bool = True) -> Iterator[Conn]:
        """A write transaction; commits on success, rolls back on error (any error: a
        psycopg one is raised as :class:`StorageError`). ``flush=False``: the commit does
        not wait for the server's WAL flush (see the module's docstring)."""
        with self._lock:
            try:
                conn = self._connection()
                with conn.transaction():
                    if not flush:
                        conn.execute("SET LOCAL synchronous_commit = off")
                    yield _PgConn(conn)
            except psycopg.Error as exc:
                raise StorageError(f"state database {self.where}: {describe_error(exc, self.url)}") from exc

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[Row]:
        """Run a read query and return rows as dicts."""
        with self._lock:
            try:
                return self._connection().execute(to_pg(sql), params).fetchall()
            except psycopg.Error as exc:
                raise StorageError(f"state database query failed: {describe_error(exc, self.url)}") from exc

    def is_stored(self, sop_instance_uid: str) -> bool:
        """True when the instance is already stored, on a connection of its own (as
        :meth:`StateDB.is_stored`, so that C-STOREs never queue behind a commit)."""
        try:
            with self._reader_lock:
                if self._pg_reader is None or self._pg_reader.closed:
                    self._pg_reader = self._connect()
                rows = self._pg_reader.execute(
                    "SELECT 1 FROM instances WHERE sop_instance_uid=%s AND purged=0", (sop_instance_uid,)
                ).fetchall()
        except psycopg.Error as exc:
            raise StorageError(f"state database query failed: {describe_error(exc, self.url)}") from exc
        return bool(rows)
