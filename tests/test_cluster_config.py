"""The ``cluster:`` section (dicom_node/config.py): absent by default, validated like the
rest, and ``dicom-node check-config`` checks that its database, spool and broker answer,
against real PostgreSQL and Redis servers, without ever printing a password."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.config import load_config, parse_config, redact_url
from dicom_node.errors import ConfigError
from dicom_node.storage.schema import postgres_migrations
from tests.servers import PASSWORD, PostgresServer, RedisServer
from tests.support import free_port, node_config, run_cli


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    server = RedisServer().start()
    yield server
    server.stop()


def _cluster(**fields: Any) -> dict[str, Any]:
    return {"database": f"postgresql://node:{PASSWORD}@db.example:5432/dicomnode", "spool": "/mnt/spool", **fields}


def test_absent_by_default_and_nothing_moves() -> None:
    config = load_config(None)
    assert config.cluster is None
    assert config.spool_dir == config.node.storage_dir / "spool"
    assert config.results_dir == config.node.storage_dir / "results"


def test_a_cluster_shares_spool_and_results_and_names_the_node(tmp_path: Path) -> None:
    config = parse_config(node_config(tmp_path, 11119, cluster=_cluster(broker="redis://broker:6379/0")))
    assert config.cluster is not None and config.cluster.lease_seconds == 30
    assert (config.spool_dir, config.results_dir) == (Path("/mnt/spool/spool"), Path("/mnt/spool/results"))
    assert config.database_path == tmp_path / "state.sqlite3"  # not used, unchanged
    assert config.node_id == f"{socket.gethostname()}-11119"
    named = parse_config(node_config(tmp_path, 1, cluster=_cluster(node_id="gateway-1")))
    assert named.node_id == "gateway-1"


@pytest.mark.parametrize(("fields", "message"), [
    ({"database": f"mysql://u:{PASSWORD}@h/db"}, "cluster.database: cluster.database must be a postgresql:// or "
                                                 "postgres:// URL"),
    ({"database": f"postgresql://u:{PASSWORD}@:5432/db"}, "cluster.database names no host"),
    ({"database": f"postgresql://u:{PASSWORD}@h:port/db"}, "the port is not a number"),
    ({"broker": f"http://u:{PASSWORD}@h"}, "cluster.broker must be a redis:// or rediss:// or amqp:// or amqps:// URL"),
    ({"spool": None}, "cluster.spool"),
    ({"node_id": "a/b"}, "cluster.node_id"),
    ({"lease_second": 5}, "cluster.lease_second: unknown key (did you mean lease_seconds?)"),
])
def test_mistakes_are_named_without_the_password(tmp_path: Path, fields: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(node_config(tmp_path, 1, cluster=_cluster(**fields)))
    assert message in str(caught.value) and PASSWORD not in str(caught.value)


def test_redact_url() -> None:
    assert redact_url(f"postgresql://node:{PASSWORD}@db:5432/x") == "postgresql://node:***@db:5432/x"
    assert redact_url("redis://broker:6379/0") == "redis://broker:6379/0"
    assert redact_url(f"redis://:{PASSWORD}@broker/0") == "redis://:***@broker/0"


def _check_config(tmp_path: Path, cluster: dict[str, Any]) -> tuple[int, str]:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(node_config(tmp_path / "var", free_port(), cluster=cluster)))
    out = run_cli("check-config", str(path), timeout=120)
    return out.returncode, out.stdout + out.stderr


def test_check_config_reaches_database_spool_and_broker(tmp_path: Path, postgres: PostgresServer,
                                                        redis: RedisServer) -> None:
    url = postgres.new_database()
    code, text = _check_config(tmp_path, {"database": url, "spool": str(tmp_path / "cluster-spool"), "broker": redis.url()})
    assert code == 0, text
    assert "cluster.database postgresql://dicomnode:***@127.0.0.1" in text
    newest = len(postgres_migrations())
    assert f"schema version 0 of {newest}, empty: the first node to start creates the tables" in text
    assert f"cluster.spool {tmp_path / 'cluster-spool'}: OK (can be created)" in text
    assert f"cluster.broker redis://:***@127.0.0.1:{redis.port}/0: OK (Redis answers PING)" in text
    assert PASSWORD not in text and redis.password not in text
    assert not (tmp_path / "cluster-spool").exists()  # check-config changes nothing
    assert not postgres_tables(url)


def postgres_tables(url: str) -> list[str]:
    import psycopg

    with psycopg.connect(url) as conn:
        return [r[0] for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname='public'")]


def test_check_config_names_each_unreachable_part(tmp_path: Path, postgres: PostgresServer,
                                                  redis: RedisServer) -> None:
    spool = tmp_path / "a-file"
    spool.write_text("not a folder")
    code, text = _check_config(tmp_path, {"database": postgres.url(password="wrong-" + PASSWORD),
                                          "spool": str(spool), "broker": redis.url(password="wrong")})
    assert code == 3, text
    assert "cluster.database postgresql://dicomnode:***@" in text and "password authentication failed" in text
    assert f"cluster.spool {spool}: FAILED: {spool} is a file, not a folder" in text
    assert "cluster.broker redis://:***@" in text and "Redis refused the URL's credentials" in text
    assert PASSWORD not in text and "environment error" in text
    closed = free_port()
    code, text = _check_config(tmp_path, {"database": f"postgresql://u:{PASSWORD}@127.0.0.1:{closed}/x",
                                          "spool": str(tmp_path), "broker": f"redis://127.0.0.1:{closed}/0"})
    assert code == 3 and "cannot connect" in text and "Connection refused" in text and PASSWORD not in text
    code, text = _check_config(tmp_path, {"database": postgres.new_database(), "spool": str(tmp_path),
                                          "broker": f"redis://127.0.0.1:{redis.port}/0"})
    assert code == 3 and "Redis wants a password" in text, text
