"""Shared helpers for the end-to-end tests: free ports, a gunicorn process, a static file server.

Everything here is bounded in time, and everything started is stopped by the caller's `finally`
(or the fixtures in conftest.py).
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

import app as service_app  # the service's own list of settings (conftest.py puts the repo on sys.path)

REPO = Path(__file__).resolve().parent.parent
E2E = Path(__file__).resolve().parent
SECRET = "e2e-secret-" + "x" * 40  # >= 32 bytes, so the service does not warn
# Variables that must not leak from the developer's shell into the service under test.
SERVICE_VARIABLES = (*service_app.SETTINGS, "PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS", "GUNICORN_REUSE_PORT",
                     "GUNICORN_CMD_ARGS")


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def http_get(port: int, path: str, *, headers: dict[str, str] | None = None,
             timeout: float = 5) -> tuple[int, bytes]:
    """GET http://127.0.0.1:port/path; returns (status, body)."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        connection.request("GET", path, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


class Gunicorn:
    """gunicorn run as production runs it (from the repo root, so it reads ./gunicorn.conf.py),
    bound to 127.0.0.1:<port>, its output in a log file."""

    def __init__(self, app_spec: str, env: dict[str, str], log_path: Path, *,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.port = free_port()
        self.log_path = log_path
        full_env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
        full_env.update({"BETTER_AUTH_SECRET": SECRET, "PORT": str(self.port), "WEB_CONCURRENCY": "1",
                         "PYTHONUNBUFFERED": "1"})
        full_env.update(env)
        self._log = open(log_path, "wb")
        # The command-line bind overrides the config file's 0.0.0.0: the tests listen on loopback only.
        command = [sys.executable, "-m", "gunicorn", "--bind", f"127.0.0.1:{self.port}", *extra_args, app_spec]
        self.process = subprocess.Popen(command, cwd=REPO, env=full_env, stdout=self._log,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        """Until /health answers 200; fails early, with the log, if gunicorn exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(OSError):
                if http_get(self.port, "/health", timeout=2)[0] == 200:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer /health within {timeout} s:\n{self.log()}")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM the master (a graceful stop), then SIGKILL its process group if it lingers."""
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
        # Workers left behind by a killed master share its process group (start_new_session).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self._log.close()
        return self.process.returncode


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


def postgres_admin_url() -> str:
    return os.environ.get("E2E_POSTGRES_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """A uniquely named, empty PostgreSQL database, dropped at the end; yields its URL.

    Raises ConnectionError when the server cannot be reached (the caller skips).
    """
    import psycopg2
    from sqlalchemy.engine import make_url

    admin = make_url(postgres_admin_url())
    name = f"tasks_e2e_{uuid.uuid4().hex[:12]}"
    try:
        connection = psycopg2.connect(host=admin.host, port=admin.port or 5432, user=admin.username,
                                      password=admin.password, dbname=admin.database, connect_timeout=5)
    except psycopg2.OperationalError as error:
        raise ConnectionError(str(error)) from None
    connection.autocommit = True
    try:
        with connection.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        try:
            yield admin.set(database=name).render_as_string(hide_password=False)
        finally:
            with connection.cursor() as cursor:
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        connection.close()
