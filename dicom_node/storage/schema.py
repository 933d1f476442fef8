"""Schema of the state database: SQLite (WAL, synchronous=FULL), or PostgreSQL in a cluster.

One schema for both. SQLite runs :data:`SCHEMA` (``CREATE ... IF NOT EXISTS``: tables
added later are created there too) and adds :data:`ADDED_COLUMNS` a database made by an
older version lacks. PostgreSQL gets the same tables as numbered migrations
(:func:`postgres_migrations`): version 1 is :data:`SCHEMA` with PostgreSQL's types,
version 1 + n applies the n-th entry of :data:`MIGRATIONS` (a column or a table added);
the versions applied are recorded in its ``schema_migrations`` table.

To change the schema: add the column or table to :data:`SCHEMA` and append it to
:data:`MIGRATIONS` (never reorder or remove entries: their places are versions).
"""

import re
from dataclasses import dataclass

# Instances registered per ingest node (a cluster only: ``StateDB.node_id`` set), counted
# when registered, so the count survives retention and costs no scan of ``instances``.
NODE_INGEST_TABLE = """
CREATE TABLE IF NOT EXISTS node_ingest (
    node_id TEXT PRIMARY KEY,
    instances INTEGER NOT NULL DEFAULT 0,
    bytes INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL,
    last_received_at REAL
);
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS studies (
    study_uid TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    revision INTEGER NOT NULL DEFAULT 0,
    instance_count INTEGER NOT NULL DEFAULT 0,
    first_received_at REAL,
    last_received_at REAL,
    reason TEXT,
    purged_at REAL,
    updated_at REAL NOT NULL,
    accession_number TEXT
);
CREATE INDEX IF NOT EXISTS studies_state ON studies(state);
CREATE TABLE IF NOT EXISTS series (
    series_uid TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    modality TEXT, body_part TEXT, series_description TEXT, study_description TEXT,
    sop_class_uid TEXT, manufacturer TEXT, called_ae TEXT, calling_ae TEXT,
    analysable INTEGER NOT NULL DEFAULT 1,
    instance_count INTEGER NOT NULL DEFAULT 0,
    last_received_at REAL
);
CREATE INDEX IF NOT EXISTS series_study ON series(study_uid);
CREATE TABLE IF NOT EXISTS instances (
    sop_instance_uid TEXT PRIMARY KEY,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    sha256 TEXT NOT NULL,
    received_at REAL NOT NULL,
    purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS instances_study ON instances(study_uid);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    plugin TEXT NOT NULL,
    revision INTEGER NOT NULL,
    state TEXT NOT NULL,
    reason TEXT,
    timings TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    lease_owner TEXT,
    lease_until REAL,
    sent_at REAL,
    UNIQUE (study_uid, route, revision)
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE TABLE IF NOT EXISTS results (
    sop_instance_uid TEXT PRIMARY KEY,
    job_id INTEGER NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    kind TEXT NOT NULL,
    path TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS results_series ON results(series_uid);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    deadline_at REAL NOT NULL,
    last_error TEXT,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    lease_owner TEXT,
    lease_until REAL
);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS delivery_items (
    delivery_id INTEGER NOT NULL,
    sop_instance_uid TEXT NOT NULL,
    status INTEGER,
    PRIMARY KEY (delivery_id, sop_instance_uid)
);
CREATE TABLE IF NOT EXISTS transitions (
    id INTEGER PRIMARY KEY,
    kind TEXT NOT NULL,
    key TEXT NOT NULL,
    from_state TEXT,
    to_state TEXT NOT NULL,
    at REAL NOT NULL,
    detail TEXT
);
CREATE INDEX IF NOT EXISTS transitions_key ON transitions(kind, key);
""" + NODE_INGEST_TABLE


@dataclass(frozen=True)
class AddColumn:
    """A migration: one column added to a table."""

    table: str
    column: str
    kind: str  # SQLite type; PostgreSQL's by :func:`postgres_types`


@dataclass(frozen=True)
class AddTable:
    """A migration: one table added (its ``CREATE TABLE IF NOT EXISTS``, also in :data:`SCHEMA`)."""

    table: str
    ddl: str


# Changes after the first release, in order: entry n is PostgreSQL's version 1 + n. A SQLite
# database made by an older version gains the columns when opened (see ``StateDB``) and the
# tables from :data:`SCHEMA`; new ones have them already.
# In a cluster a node that claims a running job or a delivery holds it until lease_until
# (Unix time) and renews it while it works; a node that dies leaves it for others after that.
MIGRATIONS: tuple[AddColumn | AddTable, ...] = (
    AddColumn("studies", "accession_number", "TEXT"),
    AddColumn("jobs", "lease_owner", "TEXT"),
    AddColumn("jobs", "lease_until", "REAL"),
    AddColumn("deliveries", "lease_owner", "TEXT"),
    AddColumn("deliveries", "lease_until", "REAL"),
    AddColumn("jobs", "sent_at", "REAL"),  # a queued job's latest message to the Celery broker (cluster.broker)
    AddTable("node_ingest", NODE_INGEST_TABLE),  # per-node ingest counts in the cluster view
)

# (table, column, type) of every column added after the first release (SQLite adds them).
ADDED_COLUMNS = tuple((m.table, m.column, m.kind) for m in MIGRATIONS if isinstance(m, AddColumn))


def postgres_types(sql: str) -> str:
    """SQLite DDL in PostgreSQL's types: identity keys, BIGINT, DOUBLE PRECISION."""
    sql = re.sub(r"\bid INTEGER PRIMARY KEY\b", "id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY", sql)
    sql = re.sub(r"\bINTEGER\b", "BIGINT", sql)
    return re.sub(r"\bREAL\b", "DOUBLE PRECISION", sql)


def postgres_migrations() -> list[tuple[int, str, str]]:
    """(version, description, SQL) of every PostgreSQL migration, oldest first."""
    steps = [(1, "tables", postgres_types(SCHEMA))]
    for n, step in enumerate(MIGRATIONS, start=2):
        if isinstance(step, AddColumn):
            steps.append((n, f"{step.table}.{step.column}", postgres_types(
                f"ALTER TABLE {step.table} ADD COLUMN IF NOT EXISTS {step.column} {step.kind}")))
        else:
            steps.append((n, f"table {step.table}", postgres_types(step.ddl)))
    return steps
