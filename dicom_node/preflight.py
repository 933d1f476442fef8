"""Pre-flight checks: what ``check-config`` reports and what ``serve`` verifies before
it loads any model.

Each check returns :class:`Check` results instead of raising, so that one run names
every problem. A problem is either in the configuration (exit code 2: the file must
change) or in the environment (exit code 3: a folder, a port, a peer or a model on
this machine). Nothing here changes the machine: a storage folder that does not exist
yet is created to prove it can be, written to, and removed again.
"""

from __future__ import annotations

import errno
import os
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from dicom_node.config import Config, redact_url

EXIT_OK, EXIT_CONFIG, EXIT_ENVIRONMENT = 0, 2, 3

Kind = Literal["config", "environment"]


@dataclass(frozen=True)
class Check:
    """One checked item: what it is, whether it passed, and why (or what was found)."""

    subject: str
    ok: bool
    detail: str
    kind: Kind = "environment"

    def line(self) -> str:
        """``subject: OK (detail)`` or ``subject: FAILED: detail``."""
        return f"{self.subject}: OK ({self.detail})" if self.ok else f"{self.subject}: FAILED: {self.detail}"


def exit_code(checks: Iterable[Check]) -> int:
    """2 when any configuration check failed, else 3 when any other did, else 0."""
    failed = {c.kind for c in checks if not c.ok}
    return EXIT_CONFIG if "config" in failed else EXIT_ENVIRONMENT if failed else EXIT_OK


def plugin_names(config: Config) -> list[Check]:
    """Every plugin a route names resolves to an installed entry point or module
    (nothing is imported but the module's parent packages). A name that resolves to
    nothing is a configuration error, reported against the routes that use it."""
    from dicom_node.errors import PluginError
    from plugin.registry import check_resolvable

    checks = []
    for name in config.routed_plugins():
        routes = ", ".join(repr(r.name) for r in config.routes if r.plugin == name)
        subject = f"plugin {name} (route {routes})"
        factory, _ = config.plugin_factory(name)
        try:
            checks.append(Check(subject, True, check_resolvable(name, factory), "config"))
        except PluginError as exc:
            checks.append(Check(subject, False, str(exc), "config"))
    return checks


def plugin_loads(config: Config) -> list[Check]:
    """Load every routed plugin with its weights, as ``serve`` does (``--deep``)."""
    from dicom_node.errors import PluginError
    from plugin.registry import load_plugin

    checks = []
    for name in config.routed_plugins():
        factory, options = config.plugin_factory(name)
        try:
            info = load_plugin(name, factory=factory, options=options).info
        except PluginError as exc:
            checks.append(Check(f"plugin {name}", False, str(exc)))
            continue
        checks.append(Check(f"plugin {name}", True, f"{info.display_name} {info.version}"))
    return checks


def _reason(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def storage(path: Path, key: str = "node.storage_dir") -> Check:
    """``node.storage_dir`` (or the folder of ``key``) exists as a folder (or can be
    created) and takes a file."""
    subject = f"{key} {path}"
    path = Path(os.path.abspath(path))
    missing: list[Path] = []
    existing = path
    while not existing.exists():
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        return Check(subject, False, f"{existing} is a file, not a folder")
    try:
        for folder in reversed(missing):
            folder.mkdir()
        probe = path / f".preflight-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"ok")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        where = exc.filename or path
        return Check(subject, False, f"cannot {'create' if missing else 'write'} {where}: {_reason(exc)}")
    finally:
        for folder in missing:  # leave the machine as found
            try:
                folder.rmdir()
            except OSError:
                pass
    return Check(subject, True, "writable" if not missing else "can be created")


def port(key: str, host: str, number: int) -> Check:
    """A TCP port can be bound (and is released again at once)."""
    subject = f"{key} {number} on {host}"
    if number == 0:
        return Check(subject, True, "any free port")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the listener does
        try:
            sock.bind((host, number))
        except OSError as exc:
            hint = " (another program, or a running dicom-node, listens there)" \
                if exc.errno == errno.EADDRINUSE else ""
            return Check(subject, False, f"cannot be bound: {_reason(exc)}{hint}")
    return Check(subject, True, "free")


def ports(config: Config) -> list[Check]:
    """The DICOM port and, when enabled, the health/metrics port."""
    checks = [port("node.port", config.node.host, config.node.port)]
    if config.http.enabled:
        checks.append(port("http.port", config.http.host, config.http.port))
    return checks


def destinations(config: Config) -> list[Check]:
    """Every destination answers C-ECHO with Success (``--echo``)."""
    from dicom_node.delivery import peer_for
    from dicom_node.errors import DeliveryError
    from dicom_node.net.scu import echo

    calling = config.delivery.calling_ae_title or config.node.ae_title
    checks = []
    for name, dest in config.destinations.items():
        subject = f"destination {name} ({dest.ae_title}@{dest.host}:{dest.port})"
        try:
            status = echo(peer_for(dest), calling, timeout=config.delivery.connect_timeout_seconds)
        except (DeliveryError, OSError) as exc:  # OSError: the TLS files (ssl.SSLError)
            checks.append(Check(subject, False, str(exc)))
            continue
        checks.append(Check(subject, status == 0, f"C-ECHO status 0x{status:04X}"))
    return checks


def cluster(config: Config, broker: bool = True) -> list[Check]:
    """With a ``cluster:`` section: the database answers, the shared spool takes a file,
    and (``broker``) the broker answers. No message repeats a password."""
    settings = config.cluster
    if settings is None:
        return []
    checks = [cluster_database(settings.database, settings.connect_timeout_seconds),
              storage(settings.spool, "cluster.spool")]
    if broker and settings.broker is not None:
        checks.append(cluster_broker(settings.broker, settings.connect_timeout_seconds))
    return checks


def cluster_database(url: str, timeout_s: float) -> Check:
    """The PostgreSQL server at ``url`` accepts our login, and the node can use its schema
    there: tables this node's version made (or older ones it migrates), or none yet and
    the right to create them. Nothing is changed."""
    import psycopg

    from dicom_node.storage.postgres import describe_error
    from dicom_node.storage.schema import postgres_migrations

    subject = f"cluster.database {redact_url(url)}"
    newest = len(postgres_migrations())
    try:
        with psycopg.connect(url, connect_timeout=max(1, round(timeout_s)), autocommit=True) as conn:
            server = str(conn.execute("SHOW server_version").fetchone()[0])  # type: ignore[index]
            made = conn.execute("SELECT to_regclass('schema_migrations') IS NOT NULL").fetchone()[0]  # type: ignore[index]
            version = int(conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
                          .fetchone()[0]) if made else 0  # type: ignore[index]
            may_create = bool(conn.execute("SELECT has_schema_privilege(current_schema(), 'CREATE')")
                              .fetchone()[0])  # type: ignore[index]
    except psycopg.Error as exc:
        return Check(subject, False, f"cannot connect: {describe_error(exc, url)}")
    if version > newest:
        return Check(subject, False, f"schema version {version} is newer than this node's {newest}: upgrade the node")
    if version < newest and not may_create:
        return Check(subject, False, f"schema version {version} of {newest}, and this user may not create tables "
                                     "to bring it up to date")
    state = "up to date" if version == newest else "migrated at the first start" if version else \
        "empty: the first node to start creates the tables"
    return Check(subject, True, f"PostgreSQL {server}, schema version {version} of {newest}, {state}")


def cluster_broker(url: str, timeout_s: float) -> Check:
    """The broker answers: Redis replies PONG to PING (after AUTH when the URL has a
    password), RabbitMQ answers the AMQP protocol header."""
    import ssl
    from urllib.parse import unquote, urlsplit

    parts = urlsplit(url)
    subject = f"cluster.broker {redact_url(url)}"
    redis = parts.scheme in ("redis", "rediss")
    port = parts.port or (6379 if redis else 5672)
    try:
        with socket.create_connection((parts.hostname or "", port), timeout=timeout_s) as raw:
            sock: socket.socket = raw
            if parts.scheme in ("rediss", "amqps"):
                sock = ssl.create_default_context().wrap_socket(raw, server_hostname=parts.hostname)
            if not redis:
                sock.sendall(b"AMQP\x00\x00\x09\x01")
                answer = sock.recv(8)
                ok = answer[:1] == b"\x01"  # a Connection.Start method frame
                return Check(subject, ok, "AMQP 0-9-1 answers" if ok else "not an AMQP 0-9-1 server")
            if parts.password is not None:
                words = [b"AUTH"] + ([unquote(parts.username).encode()] if parts.username else []) + \
                    [unquote(parts.password).encode()]
                sock.sendall(_resp(words))
                if not sock.recv(256).startswith(b"+OK"):
                    return Check(subject, False, "Redis refused the URL's credentials")
            sock.sendall(_resp([b"PING"]))
            answer = sock.recv(256)
    except OSError as exc:
        return Check(subject, False, f"cannot connect: {_reason(exc)}")
    if answer.startswith(b"+PONG"):
        return Check(subject, True, "Redis answers PING")
    if answer.startswith(b"-NOAUTH"):
        return Check(subject, False, "Redis wants a password: put it in the URL (redis://:PASSWORD@host:port/0)")
    return Check(subject, False, "no PONG to PING: not a Redis server, or it refused us")


def _resp(words: list[bytes]) -> bytes:
    """A Redis command in RESP."""
    return b"*%d\r\n" % len(words) + b"".join(b"$%d\r\n%s\r\n" % (len(w), w) for w in words)


def before_serve(config: Config) -> list[Check]:
    """What ``serve`` checks before it loads a model: plugin names, storage, ports, and in a
    cluster the database and the shared spool."""
    return [*plugin_names(config), storage(config.node.storage_dir), *ports(config), *cluster(config, broker=False)]
