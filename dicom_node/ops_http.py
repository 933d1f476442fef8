"""The operations endpoint: health and Prometheus metrics over HTTP.

``GET /health/live``   200 while the process serves requests.
``GET /health/ready``  200 when the database answers, the disk is above the reserve,
                       the plugins are loaded and the DICOM listener is up; else 503.
``GET /health``        both, as JSON with every check.
``GET /metrics``       Prometheus text format.
Bound to loopback by default (``http.host``); it carries counts and states, no PHI.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

log = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    server: "OpsServer"

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/metrics":
            self._send(200, generate_latest(self.server.registry_fn()), CONTENT_TYPE_LATEST)
            return
        if path in ("/health", "/health/live", "/health/ready"):
            report = self.server.health_fn()
            if path == "/health/live":
                code = 200
            else:
                code = 200 if report["ready"] else 503
            self._send(code, json.dumps(report, indent=1).encode(), "application/json")
            return
        self._send(404, b'{"error": "not found"}', "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # quiet: no access log lines
        return


class OpsServer(ThreadingHTTPServer):
    """A small threaded HTTP server for health and metrics."""

    daemon_threads = True

    def __init__(self, host: str, port: int, health_fn: Callable[[], dict[str, Any]],
                 registry_fn: Callable[[], Any]) -> None:
        super().__init__((host, port), _Handler)
        self.health_fn = health_fn
        self.registry_fn = registry_fn
        self._thread: threading.Thread | None = None

    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that hangs up before the answer is written (HAProxy's health check resets
        the connection once it has read a 503's status line) is normal: one DEBUG line, not
        a traceback on stderr at every check. Anything else is logged with its traceback."""
        exc = sys.exc_info()[1]
        if isinstance(exc, ConnectionError):
            log.debug("ops endpoint: client %s hung up: %s", client_address[0], exc)
            return
        log.error("ops endpoint: request from %s failed", client_address[0], exc_info=True)

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.server_address[1])

    def start(self) -> None:
        """Serve in a background thread."""
        self._thread = threading.Thread(target=self.serve_forever, name="ops-http", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self.shutdown()
        self.server_close()
