"""What only the end-to-end tests need on top of the shared harness (tests/harness.py): the service as
they start it, a static file server for the browser's pages, a plain GET.

Everything here is bounded in time, and everything started is stopped by the caller's `finally`
(or the fixtures in conftest.py).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import socket
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.harness import REPO, SERVICE_VARIABLES, Gunicorn, PrivateDatabase, free_port  # noqa: F401 (for the tests)

E2E = Path(__file__).resolve().parent
SECRET = "e2e-secret-" + "x" * 40  # >= 32 bytes, so the service does not warn


def start_service(
    env: dict[str, str], log_path: Path, *, app_spec: str = "app:app", extra_args: tuple[str, ...] = ()
) -> Gunicorn:
    """The service (or another app) under gunicorn as the e2e tests run it: one worker, the e2e secret."""
    return Gunicorn(
        {"BETTER_AUTH_SECRET": SECRET, **env}, log_path, app_spec=app_spec, workers=1, extra_args=extra_args
    )


def port_is_free(port: int) -> bool:
    """Whether nothing listens on the loopback port (the brief's frontend port, 3000, say)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def http_get(port: int, path: str, *, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path; returns (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def http_post_json(port: int, path: str, body: Any, token: str, *, timeout: float = 5) -> tuple[int, bytes]:
    """POST a JSON body to http://127.0.0.1:port/path with a Bearer token; returns (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        connection.request("POST", path, body=json.dumps(body), headers=headers)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - the base class's name
        pass

    def end_headers(self) -> None:
        self.send_header("Cache-Control", "no-store")
        super().end_headers()


@contextlib.contextmanager
def static_server(directory: Path, port: int, host: str = "127.0.0.1") -> Iterator[ThreadingHTTPServer]:
    """Serve `directory` on host:port from a daemon thread; shut down on exit."""
    handler = functools.partial(_QuietHandler, directory=str(directory))
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
