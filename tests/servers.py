"""Real PostgreSQL, Redis, RabbitMQ and HAProxy servers for the scale-out tests, started in
a temporary folder on a free loopback port and stopped afterwards (no mocks).

PostgreSQL refuses to run as root: as root the server runs as the ``postgres`` user
that Debian's ``postgresql`` package creates (``scripts/setup.sh`` installs it and
``redis-server``). A missing server fails the test that needs it (CI installs it), it
never skips.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from tests.support import free_port, tcp_listening, wait_for

USER = "dicomnode"
PASSWORD = "pg-test-secret-4711"  # checked never to appear in messages


def _tool(name: str) -> str:
    found = shutil.which(name) or next(iter(sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    assert found, f"PostgreSQL's {name} is not installed: run scripts/setup.sh (it installs Debian's postgresql)"
    return found


@dataclass
class PostgresServer:
    """``initdb`` + ``pg_ctl start`` in a temporary folder; :meth:`stop` removes it all."""

    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dicom-node-pg-")))

    def _as_owner(self, *args: str) -> subprocess.CompletedProcess[str]:
        cmd = list(args)
        if os.geteuid() == 0:  # the server refuses root: run it as postgres
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)

    def start(self) -> "PostgresServer":
        if os.geteuid() == 0:
            try:
                owner = pwd.getpwnam("postgres")
            except KeyError:
                raise AssertionError("no postgres user: install Debian's postgresql (scripts/setup.sh)") from None
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        pwfile = self.root / "pw"
        pwfile.write_text(PASSWORD + "\n")
        if os.geteuid() == 0:
            os.chown(pwfile, pwd.getpwnam("postgres").pw_uid, -1)
        out = self._as_owner(_tool("initdb"), "-D", str(self.root / "data"), "-U", USER, "--pwfile", str(pwfile),
                             "--auth-local=trust", "--auth-host=scram-sha-256", "-E", "UTF8", "--no-sync")
        assert out.returncode == 0, f"initdb failed: {out.stderr}"
        opts = (f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200")
        out = self._as_owner(_tool("pg_ctl"), "-D", str(self.root / "data"), "-l", str(self.root / "log"),
                             "-o", opts, "-w", "-t", "60", "start")
        assert out.returncode == 0, f"PostgreSQL did not start: {out.stderr}\n{self.log()}"
        return self

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def url(self, database: str = "postgres", password: str = PASSWORD) -> str:
        return f"postgresql://{USER}:{password}@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        if (self.root / "data" / "postmaster.pid").exists():
            self._as_owner(_tool("pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class RedisServer:
    """``redis-server`` on a free loopback port, with a password, nothing saved to disk."""

    port: int = field(default_factory=free_port)
    password: str = "redis-test-secret-0815"
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> "RedisServer":
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed: run scripts/setup.sh (it installs Debian's redis-server)"
        self.proc = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--requirepass", self.password, "--daemonize", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(lambda: tcp_listening(self.port), 20, "redis-server to listen")
        return self

    def url(self, password: str | None = None) -> str:
        return f"redis://:{self.password if password is None else password}@127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's, without the wrapper that switches user


@dataclass
class RabbitMQServer:
    """Debian's ``rabbitmq-server`` (``scripts/setup.sh`` installs it) in a temporary folder:
    its AMQP port, Erlang distribution port and its own ``epmd`` on free loopback ports, a
    user with a password, no plugins; :meth:`stop` ends the broker and its epmd."""

    port: int = field(default_factory=free_port)
    password: str = "rabbitmq-test-secret-2718"
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dicom-node-rabbitmq-")))
    proc: subprocess.Popen[bytes] | None = None
    epmd_port: int = field(default_factory=free_port)
    dist_port: int = field(default_factory=free_port)  # Erlang distribution: the same in every _env()

    def _env(self) -> dict[str, str]:
        return {**os.environ, "HOME": str(self.root), "RABBITMQ_NODENAME": f"rabbit-{self.port}@localhost",
                "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(self.port),
                "RABBITMQ_DIST_PORT": str(self.dist_port), "ERL_EPMD_PORT": str(self.epmd_port),
                "ERL_EPMD_ADDRESS": "127.0.0.1", "RABBITMQ_MNESIA_BASE": str(self.root / "mnesia"),
                "RABBITMQ_LOG_BASE": str(self.root / "log"), "RABBITMQ_CONFIG_FILE": str(self.root / "rabbitmq"),
                "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.root / "enabled_plugins")}

    def start(self, timeout: float = 60.0) -> "RabbitMQServer":
        assert Path(RABBITMQ_SERVER).exists(), \
            "rabbitmq-server is not installed: run scripts/setup.sh (it installs Debian's rabbitmq-server)"
        (self.root / "rabbitmq.conf").write_text(f"default_user = dicomnode\ndefault_pass = {self.password}\n"
                                                 "loopback_users = none\n")
        (self.root / "enabled_plugins").write_text("[].\n")
        with open(self.root / "out.log", "ab") as log:
            self.proc = subprocess.Popen([RABBITMQ_SERVER], stdout=log, stderr=subprocess.STDOUT, env=self._env(),
                                         start_new_session=True)
        wait_for(lambda: tcp_listening(self.port) or self.proc is None or self.proc.poll() is not None,
                 timeout, "rabbitmq-server to listen")
        assert self.proc.poll() is None, f"rabbitmq-server exited:\n{self.log()}"
        return self

    def url(self, password: str | None = None) -> str:
        return f"amqp://dicomnode:{self.password if password is None else password}@127.0.0.1:{self.port}//"

    def log(self) -> str:
        path = self.root / "out.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the script and the Erlang VM it started
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        epmd = shutil.which("epmd")  # erl started its own epmd (it daemonizes): end it too
        if epmd:
            subprocess.run([epmd, "-kill"], env=self._env(), capture_output=True, timeout=10, check=False)
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class HAProxyServer:
    """Debian's ``haproxy`` in the foreground, with the shipped example
    (``config/haproxy/haproxy.cfg``) as its configuration: its listening address and its
    servers replaced by loopback ones, a stats socket added to see the health checks."""

    servers: dict[str, tuple[int, int]]  # name -> (DICOM port, HTTP port)
    port: int = field(default_factory=free_port)
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="dicom-node-haproxy-")))
    proc: subprocess.Popen[bytes] | None = None

    def config(self) -> str:
        example = (Path(__file__).resolve().parent.parent / "config" / "haproxy" / "haproxy.cfg").read_text()
        lines = [line for line in example.splitlines() if not line.strip().startswith("server ")]
        text = "\n".join(lines).replace("bind :11112", f"bind 127.0.0.1:{self.port}")
        text = text.replace("global\n", f"global\n    stats socket {self.root}/stats.sock mode 600 level admin\n", 1)
        assert f"bind 127.0.0.1:{self.port}" in text and "stats socket" in text
        servers = "".join(f"    server {name} 127.0.0.1:{dicom} check port {http}\n"
                          for name, (dicom, http) in self.servers.items())
        return text + "\n" + servers

    def start(self) -> "HAProxyServer":
        binary = shutil.which("haproxy") or ("/usr/sbin/haproxy" if Path("/usr/sbin/haproxy").exists() else None)
        assert binary, "haproxy is not installed: run scripts/setup.sh (it installs Debian's haproxy)"
        path = self.root / "haproxy.cfg"
        path.write_text(self.config())
        with open(self.root / "log", "ab") as log:
            self.proc = subprocess.Popen([binary, "-db", "-f", str(path)], stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: tcp_listening(self.port), 20, "haproxy to listen")
        return self

    def server_states(self) -> dict[str, str]:
        """Each server's state as haproxy sees it (UP, DOWN, ...)."""
        import socket

        with socket.socket(socket.AF_UNIX) as sock:
            sock.connect(str(self.root / "stats.sock"))
            sock.sendall(b"show stat\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        rows = [line.split(",") for line in data.decode().splitlines() if line and not line.startswith("#")]
        return {row[1]: row[17] for row in rows if row[1] in self.servers}

    def log(self) -> str:
        path = self.root / "log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        shutil.rmtree(self.root, ignore_errors=True)
