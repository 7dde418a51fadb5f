"""The one harness for what the tests, e2e/, faults/, bench/ and the TypeScript client's tests start: free
ports, processes in their own groups, private PostgreSQL databases, the service under gunicorn, a proxy
that can cut a connection, and tokens.

Everything binds to 127.0.0.1 only, and everything started here is stopped by its own process group,
so that workers left by a killed gunicorn master go too.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from types import TracebackType
from typing import IO, Any, ClassVar

import jwt
import psycopg2
from sqlalchemy.engine import make_url

import app as service_app

REPO = Path(__file__).resolve().parent.parent
# What the service reads from the environment: none of it leaks from the developer's shell into a
# service under test.
SERVICE_VARIABLES = (
    *service_app.SETTINGS,
    "PORT",
    "WEB_CONCURRENCY",
    "GUNICORN_THREADS",
    "GUNICORN_REUSE_PORT",
    "GUNICORN_CMD_ARGS",
)
POSTGRES = os.environ.get("HARNESS_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


# --- ports and processes ----------------------------------------------------------------------------


def free_port() -> int:
    """A TCP port that is free on the loopback interface right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def wait_port(port: int, timeout: float) -> bool:
    """Whether something accepts connections on the loopback port within timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.05)
    return False


class Process:
    """A child process in its own process group, its output in a log file."""

    running: ClassVar[list[Process]] = []

    def __init__(
        self, name: str, argv: list[str], log_path: Path, *, env: dict[str, str] | None = None, cwd: Path | None = None
    ) -> None:
        """Start argv now."""
        self.name = name
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - closed by stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=cwd,
            start_new_session=True,
        )
        self.pid = self.popen.pid
        Process.running.append(self)

    def alive(self) -> bool:
        """Whether the process has not exited."""
        return self.popen.poll() is None

    def signal_group(self, signum: int) -> None:
        """Send a signal to the process and every process of its group."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signum)

    def stop(self, timeout: float = 10) -> int | None:
        """SIGTERM to the group, then SIGKILL to whatever is left of it; the exit status."""
        if self.alive():
            self.signal_group(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout)
        self.signal_group(signal.SIGKILL)  # orphaned workers too
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(5)
        if not self._log.closed:
            self._log.close()
        if self in Process.running:
            Process.running.remove(self)
        return self.popen.returncode

    def text(self) -> str:
        """Everything the process has written so far."""
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def tail(self, lines: int = 30) -> str:
        """The last lines the process wrote."""
        return "\n".join(self.text().splitlines()[-lines:])

    @classmethod
    def stop_all(cls) -> None:
        """Stop every process still running (a last cleanup)."""
        for process in list(cls.running):
            process.stop()


# --- PostgreSQL -------------------------------------------------------------------------------------


def admin_connection(url: str = POSTGRES, **options: Any) -> Any:
    """An autocommit psycopg2 connection to the database a postgres:// or postgresql:// URL names."""
    parsed = make_url(url.replace("postgres://", "postgresql://", 1))
    query = {key: value for key, value in parsed.query.items() if isinstance(value, str)}
    connection = psycopg2.connect(
        host=parsed.host or "127.0.0.1",
        port=parsed.port or 5432,
        user=parsed.username,
        password=parsed.password,
        dbname=parsed.database or "postgres",
        connect_timeout=5,
        **{**query, **options},
    )
    connection.autocommit = True
    return connection


class PrivateDatabase:
    """A new, uniquely named database on the server `server_url` names, dropped (WITH FORCE) by drop().

    The name is prefix + this process's pid + a random tag, so that drop_stale_databases() can tell the
    databases of a run that was killed (and could not clean up) from those of a run still going.
    """

    def __init__(self, prefix: str, server_url: str = POSTGRES, *, name: str | None = None) -> None:
        """Create the database now."""
        self.server_url = server_url
        self.name = name or f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        with contextlib.closing(admin_connection(server_url)) as admin, admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{self.name}"')
        self.dropped = False

    def url(self, *, port: int | None = None, password: str | None = None, scheme: str = "postgresql") -> str:
        """This database's URL; with `port`, the same server reached through another port (a proxy)."""
        server = make_url(self.server_url.replace("postgres://", "postgresql://", 1))
        user = server.username or ""
        secret = password if password is not None else server.password
        userinfo = user + (f":{secret}" if secret else "") + ("@" if user else "")
        host = server.host or "127.0.0.1"
        query = "&".join(f"{key}={value}" for key, value in server.query.items() if isinstance(value, str))
        return f"{scheme}://{userinfo}{host}:{port or server.port or 5432}/{self.name}" + (f"?{query}" if query else "")

    def address(self) -> tuple[str, int]:
        """The server's host and port (what a proxy in front of it forwards to)."""
        server = make_url(self.server_url.replace("postgres://", "postgresql://", 1))
        return server.host or "127.0.0.1", server.port or 5432

    def connect(self) -> Any:
        """An autocommit connection to this database."""
        return admin_connection(self.url())

    def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """Run one statement in its own connection; its rows, if it returns any."""
        with contextlib.closing(self.connect()) as connection, connection.cursor() as cursor:
            cursor.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def drop(self) -> None:
        """Drop the database, whoever is still connected to it."""
        if self.dropped:
            return
        with contextlib.closing(admin_connection(self.server_url)) as admin, admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')
        self.dropped = True

    def __enter__(self) -> PrivateDatabase:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.drop()


def drop_stale_databases(prefix: str, server_url: str = POSTGRES) -> list[str]:
    """Drop the databases named prefix_<pid>_... whose process is gone (a SIGKILLed run cannot clean up)."""
    dropped = []
    with contextlib.closing(admin_connection(server_url)) as admin, admin.cursor() as cursor:
        cursor.execute("SELECT datname FROM pg_database WHERE datname LIKE %s", (prefix.replace("_", "\\_") + "\\_%",))
        for (name,) in cursor.fetchall():
            pid = name[len(prefix) + 1 :].split("_", 1)[0]
            if pid.isdigit() and not Path(f"/proc/{pid}").exists():
                cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
                dropped.append(name)
    return dropped


# --- the service under gunicorn ---------------------------------------------------------------------


class Gunicorn:
    """An app (the service by default) under gunicorn with a checkout's gunicorn.conf.py, run as production
    runs it, bound to a free loopback port (the command-line bind overrides the conf file's 0.0.0.0)."""

    def __init__(
        self,
        env: dict[str, str],
        log_path: Path,
        *,
        app_spec: str = "app:app",
        root: Path = REPO,
        workers: int | None = None,
        threads: int | None = None,
        port: int | None = None,
        extra_args: tuple[str, ...] = (),
        python: str = sys.executable,
        name: str = "gunicorn",
    ) -> None:
        """Start gunicorn now; env holds the service's settings (nothing else of the service's leaks in)."""
        self.port = port or free_port()
        self.root = root
        full_env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES}
        full_env.update({"PORT": str(self.port), "PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"})
        if workers is not None:
            full_env["WEB_CONCURRENCY"] = str(workers)
        if threads is not None:
            full_env["GUNICORN_THREADS"] = str(threads)
        full_env.update(env)
        argv = [
            python,
            "-m",
            "gunicorn",
            "-c",
            str(root / "gunicorn.conf.py"),
            "--chdir",
            str(root),
            "--bind",
            f"127.0.0.1:{self.port}",
            *extra_args,
            app_spec,
        ]
        self.process = Process(name, argv, log_path, env=full_env, cwd=root)

    @property
    def base_url(self) -> str:
        """http://127.0.0.1:<port>"""
        return f"http://127.0.0.1:{self.port}"

    def wait_healthy(self, timeout: float = 30, path: str = "/health") -> float:
        """Wait until path answers 200; the seconds it took. Fails at once, with the log, if gunicorn exits."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.process.alive():
                raise RuntimeError(f"gunicorn exited with {self.process.popen.returncode}:\n{self.process.tail()}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                try:
                    connection.request("GET", path)
                    if connection.getresponse().status == 200:
                        return time.monotonic() - started
                finally:
                    connection.close()
            time.sleep(0.1)
        raise RuntimeError(f"gunicorn did not answer {path} with 200 within {timeout:.0f} s:\n{self.process.tail()}")

    def worker_pids(self) -> list[int]:
        """The pids of the master's children (its workers)."""
        out = subprocess.run(
            ["ps", "-o", "pid=", "--ppid", str(self.process.pid)], capture_output=True, text=True
        ).stdout
        return [int(pid) for pid in out.split()]

    def text(self) -> str:
        """gunicorn's output so far (the app's logs included)."""
        return self.process.text()

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM the master (a graceful stop), then SIGKILL its group if it lingers; the exit status."""
        return self.process.stop(timeout)


# --- a proxy that can cut a connection ---------------------------------------------------------------


class TcpProxy:
    """A TCP proxy on a loopback port (in front of PostgreSQL), run by an asyncio loop in a thread.

    cut(): every proxied connection is reset (RST) and new connections are refused, as when the
    server is stopped or its host is gone. restore(): the port listens and forwards again.
    partition(): nothing moves any more, either way, but nothing is lost or closed: bytes wait (in
    the kernel's buffers) until restore(), as TCP retransmission would deliver them after a network
    blip; new connections are accepted and wait too.
    """

    def __init__(self, target_port: int, *, target_host: str = "127.0.0.1", port: int | None = None) -> None:
        """Listen now, forwarding to target_host:target_port; close() stops it."""
        self.target_host = target_host
        self.target_port = target_port
        self.port = port or free_port()
        self.loop = asyncio.new_event_loop()
        self.server: Any = None
        self.pairs: set[tuple[asyncio.StreamWriter, ...]] = set()
        self.connections_total = 0
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="tcp-proxy")
        self.thread.start()
        self.flowing: asyncio.Event = self._call(self._make_event())
        self._call(self._listen())

    def _call(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(10)

    async def _make_event(self) -> asyncio.Event:
        event = asyncio.Event()
        event.set()
        return event

    async def _listen(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, reuse_address=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections_total += 1
        pair: tuple[asyncio.StreamWriter, ...] = (writer,)
        self.pairs.add(pair)
        try:
            await self.flowing.wait()
            up_reader, up_writer = await asyncio.open_connection(self.target_host, self.target_port)
        except (OSError, asyncio.CancelledError):
            self.pairs.discard(pair)
            _reset(writer)
            return
        self.pairs.discard(pair)
        pair = (writer, up_writer)
        self.pairs.add(pair)
        await asyncio.gather(
            self._pump(reader, up_writer, pair), self._pump(up_reader, writer, pair), return_exceptions=True
        )
        self.pairs.discard(pair)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: Any) -> None:
        try:
            while True:
                await self.flowing.wait()
                data = await reader.read(65536)
                if not data:
                    break
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            for side in pair:
                with contextlib.suppress(Exception):
                    side.close()

    async def _cut(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None
        for pair in list(self.pairs):
            for side in pair:
                _reset(side)
        self.pairs.clear()
        self.flowing.set()

    async def _restore(self) -> None:
        if self.server is None:
            await self._listen()
        self.flowing.set()

    async def _partition(self) -> None:
        self.flowing.clear()

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._restore())

    def partition(self) -> None:
        self._call(self._partition())

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        with contextlib.suppress(Exception):
            self.loop.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST rather than FIN, like a host that is gone."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(Exception):
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(Exception):
        writer.transport.abort()


# --- tokens -----------------------------------------------------------------------------------------


def token(user_id: str, secret: str, *, lifetime: int = 3600, **claims: Any) -> str:
    """An HS256 token for user_id, as the frontend's bridge route would sign it."""
    now = int(time.time())
    return jwt.encode({"sub": user_id, "iat": now, "exp": now + lifetime, **claims}, secret, algorithm="HS256")
