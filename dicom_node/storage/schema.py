"""SQLite schema of the state database (WAL, synchronous=FULL)."""

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
    updated_at REAL NOT NULL
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
"""

# Columns added after the first release: (table, column, type). A database made by an
# older version gains them when opened (see ``StateDB``); new ones have them already.
ADDED_COLUMNS = (("studies", "accession_number", "TEXT"),)
