"""Shared fixtures: generated CT series written once per session, a PostgreSQL server per
session, and a storescp destination per test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from phantoms.ct_writer import SeriesLayout, StudyIdentity, simple_ct_volume, write_ct_series
from tests.servers import PostgresServer
from tests.support import StoreSCP, free_port


@pytest.fixture(scope="session")
def ct150(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A 150-slice 512x512 CT series (uncompressed, Explicit VR Little Endian)."""
    folder = tmp_path_factory.mktemp("ct150")
    study = StudyIdentity(patient_name="SECRET^PATIENT", patient_id="PID-SECRET-150")
    return write_ct_series(simple_ct_volume(150, 512, 512), folder, study, SeriesLayout())


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A real PostgreSQL server for the session (tests.servers.py); each test takes a
    fresh database with ``postgres.new_database()``."""
    server = PostgresServer().start()
    yield server
    server.stop()


@pytest.fixture
def dest(tmp_path: Path) -> Iterator[StoreSCP]:
    """A real storescp (dcmtk) on a free loopback port, receiving into the test's folder."""
    scp = StoreSCP(free_port(), tmp_path / "received").start()
    yield scp
    scp.stop()
