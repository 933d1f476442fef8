"""DICOM TLS with real peers: dcmtk echoscu/storescu as TLS clients of the node, and
dcmtk storescp as a TLS destination. Certificates are made at test time with openssl."""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from dicom_node.config import Destination, parse_config
from dicom_node.delivery import peer_for
from dicom_node.errors import DeliveryError
from dicom_node.net.scu import describe_file, store_files
from dicom_node.node import Node
from phantoms.ct_writer import simple_ct_volume, write_ct_series
from tests.support import DCMTK_ENV, free_port, node_config, require_tool, tcp_listening, wait_for

EXT = ("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
       "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\n")


def _openssl(*args: str, cwd: Path) -> None:
    require_tool("openssl")
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.crt", "-days", "2", "-subj", f"/CN={name}", cwd=folder)


def _leaf(folder: Path, name: str, ca: str) -> None:
    (folder / "ext.cnf").write_text(EXT)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "2", "-extfile", "ext.cnf", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _leaf(folder, "localhost", "ca")  # server certificate
    _leaf(folder, "client", "ca")  # a client the CA vouches for
    _ca(folder, "rogue")
    _leaf(folder, "intruder", "rogue")  # a client nobody trusts
    return folder


def _node(tmp_path: Path, pki: Path, mutual: bool) -> Node:
    tls = {"enabled": True, "certificate": str(pki / "localhost.crt"), "private_key": str(pki / "localhost.key")}
    if mutual:
        tls["ca_certificates"] = str(pki / "ca.crt")
    node = Node(parse_config(node_config(tmp_path / "var", free_port(), node={"tls": tls})))
    node.start()
    return node


def _echo(port: int, *tls: str) -> subprocess.CompletedProcess[str]:
    require_tool("echoscu")
    return subprocess.run(["echoscu", *tls, "-aec", "DICOMNODE", "127.0.0.1", str(port)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)


def _client(pki: Path, name: str) -> list[str]:
    return ["+tls", str(pki / f"{name}.key"), str(pki / f"{name}.crt"), "+cf", str(pki / "ca.crt")]


@pytest.fixture
def tls_node(tmp_path: Path, pki: Path) -> Iterator[Node]:
    node = _node(tmp_path, pki, mutual=False)
    yield node
    node.stop()


def test_tls_listener_serves_dcmtk_and_refuses_plain_tcp(tls_node: Node, pki: Path, tmp_path: Path) -> None:
    assert _echo(tls_node.port, *_client(pki, "client")).returncode == 0
    files = write_ct_series(simple_ct_volume(3, 32, 32), tmp_path / "ct")
    sent = subprocess.run(["storescu", "-v", *_client(pki, "client"), "-aec", "DICOMNODE", "127.0.0.1",
                           str(tls_node.port), *map(str, files)],
                          capture_output=True, text=True, env=DCMTK_ENV, timeout=60)
    assert sent.returncode == 0, sent.stderr
    assert sent.stderr.count("Received Store Response (Success)") == 3
    assert len(list(tls_node.spool.root.rglob("*.dcm"))) == 3
    plain = _echo(tls_node.port)
    assert plain.returncode != 0


def test_mutual_tls_refuses_untrusted_clients(tmp_path: Path, pki: Path) -> None:
    node = _node(tmp_path, pki, mutual=True)
    try:
        assert _echo(node.port, *_client(pki, "client")).returncode == 0
        assert _echo(node.port, *_client(pki, "intruder")).returncode != 0
        assert _echo(node.port, "+tla", "+cf", str(pki / "ca.crt")).returncode != 0
        assert _echo(node.port).returncode != 0
    finally:
        node.stop()


def _storescp_tls(pki: Path, out: Path) -> tuple[subprocess.Popen[bytes], int]:
    require_tool("storescp")
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(["storescp", "+tls", str(pki / "localhost.key"), str(pki / "localhost.crt"),
                             "-ic", "-aet", "DEST", "-od", str(out), str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(lambda: tcp_listening(port), 10, "storescp (TLS) to listen")
    return proc, port


def test_tls_destination_is_verified(tmp_path: Path, pki: Path) -> None:
    files = [describe_file(p) for p in write_ct_series(simple_ct_volume(2, 16, 16), tmp_path / "ct")]
    proc, port = _storescp_tls(pki, tmp_path / "got")
    try:
        trusted = Destination.model_validate({"ae_title": "DEST", "host": "127.0.0.1", "port": port,
                                              "tls": {"enabled": True, "ca_certificates": str(pki / "ca.crt")}})
        result = store_files(peer_for(trusted), files, "DICOMNODE")
        assert set(result.values()) == {0}
        assert len(list((tmp_path / "got").iterdir())) == 2
        wrong_ca = trusted.model_copy(update={"tls": trusted.tls.model_copy(
            update={"ca_certificates": pki / "rogue.crt"})})
        with pytest.raises(DeliveryError, match="TLS handshake failed: CERTIFICATE_VERIFY_FAILED"):
            store_files(peer_for(wrong_ca), files, "DICOMNODE")
    finally:
        proc.terminate()
        proc.wait(10)


def test_tls_config_is_checked() -> None:
    from dicom_node.errors import ConfigError

    with pytest.raises(ConfigError, match="tls.enabled needs tls.certificate"):
        parse_config({"node": {"tls": {"enabled": True}}})
    with pytest.raises(ConfigError, match="not a readable file"):
        parse_config({"node": {"tls": {"enabled": True, "certificate": "/nope.crt", "private_key": "/nope.key"}}})
    with pytest.raises(ConfigError, match="min_version"):
        parse_config({"node": {"tls": {"min_version": "TLSv1.0"}}})


def test_silent_tcp_peers_do_not_stall_tls_callers_and_failed_handshakes_are_audited(
        tmp_path: Path, pki: Path) -> None:
    """The handshake runs in the connection's thread with the ACSE timeout as deadline: five
    connections that never start TLS block nobody, and each failure is logged and audited."""
    import json
    import socket

    tls = {"enabled": True, "certificate": str(pki / "localhost.crt"), "private_key": str(pki / "localhost.key")}
    node = Node(parse_config(node_config(tmp_path / "var", free_port(),
                                         node={"tls": tls, "acse_timeout_seconds": 2, "listener_processes": 1})))
    node.start()
    silent = [socket.create_connection(("127.0.0.1", node.port)) for _ in range(5)]
    try:
        # the node has taken each in: one connection thread each, waiting in its handshake
        wait_for(lambda: sum("process_request_thread" in t.name for t in threading.enumerate()) >= 5, 10,
                 "the five silent connections accepted")
        started = time.monotonic()
        assert _echo(node.port, *_client(pki, "client")).returncode == 0
        assert time.monotonic() - started < 2  # served while the silent peers sit there
        for sock in silent:  # dropped at the handshake deadline
            sock.settimeout(4)
            assert sock.recv(10) == b""
        assert _echo(node.port).returncode != 0  # plain DICOM on the TLS port

        def failed_handshakes() -> list[dict[str, Any]]:
            audit = [json.loads(line) for line in node.config.audit_path.read_text().splitlines()]
            return [r for r in audit if str(r.get("reason", "")).startswith("TLS handshake failed")]

        failed = wait_for(lambda: len(failed_handshakes()) >= 6 and failed_handshakes(), 10,
                          "six failed handshakes in the audit trail")
        assert len(failed) == 6, failed
        assert sum("no handshake within 2 s" in r["reason"] for r in failed) == 5
        assert all(r["peer"].startswith("127.0.0.1:") for r in failed)
    finally:
        for sock in silent:
            sock.close()
        node.stop()
