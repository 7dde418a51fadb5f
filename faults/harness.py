"""Shared machinery of the fault scenarios: a private database, the service under gunicorn, a TCP
proxy that can cut PostgreSQL off, PgBouncer and nginx with their own configs, a small HTTP client,
and the one-line PASS/FAIL report.

Everything binds to 127.0.0.1 only; every process started here is in its own process group and is
killed (by its own pid) when the scenario ends, whether it passed, failed or was interrupted.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FAULTS = Path(__file__).resolve().parent
# The service under test: this checkout, or another tree (FAULTS_SERVICE_ROOT) to try a patch on.
ROOT = Path(os.environ.get("FAULTS_SERVICE_ROOT") or FAULTS.parent).resolve()
VENV = FAULTS.parent / ".venv"
sys.path.insert(0, str(FAULTS.parent))  # the shared harness (tests/harness.py), and the service itself
if FAULTS.parent != ROOT:
    sys.path.insert(0, str(ROOT))

from tests import harness as shared  # noqa: E402
from tests.harness import Process, free_port, wait_port  # noqa: E402,F401 (the scenarios' own names)

PYTHON = str(VENV / "bin" / "python") if (VENV / "bin" / "python").exists() else sys.executable
PG_HOST = os.environ.get("FAULTS_PG_HOST", "127.0.0.1")
PG_PORT = int(os.environ.get("FAULTS_PG_PORT", "5432"))
PG_USER = os.environ.get("FAULTS_PG_USER", "postgres")
PG_SERVER = f"postgresql://{PG_USER}@{PG_HOST}:{PG_PORT}/postgres"
LOG_ROOT = Path(os.environ.get("FAULTS_LOG_DIR") or FAULTS / "logs")
SECRET = "faults-secret-" + secrets.token_hex(24)  # long enough for HS256, unique per run


# --- reporting ---------------------------------------------------------------------------------


class ScenarioFailure(AssertionError):
    """A requirement of the scenario was not met."""


class Interrupted(BaseException):
    """SIGTERM or the scenario's own time bound: unwind so that every cleanup runs."""


@dataclass
class Scenario:
    """One scenario run: its numbers, its checks, its cleanups, its log folder, its time bound."""

    number: int
    name: str
    time_limit: float
    numbers: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.log_dir = LOG_ROOT / f"{self.number:02d}-{self.name}"
        if self.log_dir.exists():
            shutil.rmtree(self.log_dir, ignore_errors=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        # The pid first: the shared harness drops the databases of runs whose process is gone by it.
        self.tag = f"{os.getpid()}_s{self.number:02d}_{uuid.uuid4().hex[:6]}"

    def check(self, condition: bool, message: str) -> bool:
        """Record a failed requirement (the scenario goes on, to report every finding)."""
        if not condition:
            self.failures.append(message)
            self.log(f"CHECK FAILED: {message}")
        return condition

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:7.2f}s] {message}"
        with open(self.log_dir / "scenario.log", "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        if os.environ.get("FAULTS_VERBOSE"):
            print(line, file=sys.stderr, flush=True)

    def remaining(self) -> float:
        return self.time_limit - (time.monotonic() - self.started)


def run_scenario(number: int, name: str, time_limit: float, body: Callable[[Scenario], None]) -> int:
    """Run body under a time bound, clean up, print the one line; the exit code says PASS (0) or FAIL (1)."""
    scenario = Scenario(number, name, time_limit)

    def interrupt(signum: int, _frame: Any) -> None:
        raise Interrupted(
            f"signal {signal.Signals(signum).name}"
            + (f" (time limit {time_limit:.0f}s)" if signum == signal.SIGALRM else "")
        )

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGALRM, interrupt)
    signal.alarm(int(time_limit))
    crashed = None
    try:
        with scenario.stack:
            body(scenario)
    except ScenarioFailure as error:
        scenario.failures.append(str(error))
    except (Exception, Interrupted) as error:  # a crash of the scenario is a FAIL, with its trace
        crashed = f"{type(error).__name__}: {error}"
        scenario.failures.append(crashed)
        with open(scenario.log_dir / "scenario.log", "a", encoding="utf-8") as handle:
            traceback.print_exc(file=handle)
    finally:
        signal.alarm(0)
    elapsed = time.monotonic() - scenario.started
    scenario.numbers["time"] = f"{elapsed:.1f}s"
    verdict = "FAIL" if scenario.failures else "PASS"
    numbers = " ".join(f"{key}={value}" for key, value in scenario.numbers.items())
    line = f"scenario {number:02d} {name}: {numbers} {verdict}"
    result = {
        "number": number,
        "name": name,
        "verdict": verdict,
        "numbers": scenario.numbers,
        "failures": scenario.failures,
        "notes": scenario.notes,
        "line": line,
    }
    (scenario.log_dir / "result.json").write_text(json.dumps(result, indent=2, default=str))
    for failure in scenario.failures:
        print(f"  FAIL {number:02d}: {failure}", flush=True)
    print(line, flush=True)
    return 0 if verdict == "PASS" else 1


# --- the database ------------------------------------------------------------------------------


class TempDatabase(shared.PrivateDatabase):
    """A fresh database on the local PostgreSQL for one scenario, dropped (WITH FORCE) when it ends."""

    def __init__(self, scenario: Scenario, suffix: str = "") -> None:
        super().__init__("faults", PG_SERVER, name=f"faults_{scenario.tag}{suffix}")
        scenario.stack.callback(self.drop)
        scenario.log(f"database {self.name} created")

    def url(self, *, port: int | None = None, password: str | None = None, scheme: str = "postgres") -> str:
        """The URL as a platform gives it (postgres://), through `port` when a proxy sits in between."""
        return super().url(port=port, password=password, scheme=scheme)


def drop_stale_databases() -> list[str]:
    """Drop faults_ databases left by runs whose process is gone (a SIGKILLed run cannot clean up)."""
    return shared.drop_stale_databases("faults", PG_SERVER)


# --- the service -------------------------------------------------------------------------------


class Service(shared.Gunicorn):
    """The tasks API under gunicorn (the service tree's gunicorn.conf.py) on a free loopback port, stopped
    when the scenario ends."""

    def __init__(
        self,
        scenario: Scenario,
        database_url: str,
        *,
        name: str = "service",
        workers: int = 2,
        threads: int = 4,
        port: int | None = None,
        env: dict[str, str] | None = None,
        wait: bool = True,
        secret: str = SECRET,
    ) -> None:
        settings = {
            "BETTER_AUTH_SECRET": secret,
            "DATABASE_URL": database_url,
            "DB_CONNECT_TIMEOUT": "5",
            **(env or {}),
        }
        super().__init__(
            settings,
            scenario.log_dir / f"{name}.log",
            root=ROOT,
            workers=workers,
            threads=threads,
            port=port,
            python=PYTHON,
            name=name,
        )
        self.scenario = scenario
        self.name = name
        self.base = self.base_url
        self.workers = workers
        scenario.stack.callback(self.process.stop)
        scenario.log(f"{name}: gunicorn pid {self.process.pid} on port {self.port}, {workers}x{threads}")
        if wait:
            self.wait_healthy()

    def wait_healthy(self, timeout: float = 30, path: str = "/health") -> float:
        """As the shared harness's, failing the scenario (not crashing it) when the service does not come up."""
        try:
            return super().wait_healthy(timeout, path)
        except RuntimeError:
            raise ScenarioFailure(
                f"{self.name} not healthy ({path}) after {timeout:.0f}s (see {self.process.log_path})"
            ) from None

    def wait_workers_ready(self, db_port: int, timeout: float = 30) -> None:
        """Wait until every worker holds a pooled connection to db_port.

        The master builds the app (preload_app) and keeps no connection across the fork, so a worker
        connects on its first request: readiness checks go out, each on a new connection (the kernel
        spreads those over the workers' sockets), until every worker has one.
        """
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if not self.process.alive():
                raise ScenarioFailure(f"{self.name} exited during start-up (see {self.process.log_path})")
            workers = set(self.worker_pids())
            if len(workers) >= self.workers and workers <= pids_connected_to(db_port):
                return
            with contextlib.suppress(OSError, http.client.HTTPException):
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/health/ready")
                connection.getresponse().read()
                connection.close()
            time.sleep(0.05)
        connected = set(self.worker_pids()) & pids_connected_to(db_port)
        raise ScenarioFailure(
            f"{self.name}: {len(connected)}/{self.workers} workers connected to the database after {timeout:.0f}s"
        )


def pids_connected_to(port: int) -> set[int]:
    """The pids that have an established TCP connection to 127.0.0.1:port."""
    out = subprocess.run(
        ["ss", "-tnpH", "state", "established", f"( dport = :{port} )"], capture_output=True, text=True
    ).stdout
    pids: set[int] = set()
    for chunk in out.split("pid=")[1:]:
        digits = chunk.split(",", 1)[0]
        if digits.isdigit():
            pids.add(int(digits))
    return pids


# --- tokens ------------------------------------------------------------------------------------


def token(user_id: str, *, secret: str = SECRET, lifetime: int = 3600, **claims: Any) -> str:
    """An HS256 token for user_id, signed with this run's secret."""
    return shared.token(user_id, secret, lifetime=lifetime, **claims)


# --- HTTP --------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int  # 0: no HTTP response at all (connection refused, reset, timeout)
    headers: dict[str, str]
    body: bytes
    elapsed: float
    started: float
    error: str | None = None

    @classmethod
    def read(cls, response: http.client.HTTPResponse, started: float) -> Reply:
        """The whole response (its body read), timed from started."""
        body = response.read()
        return cls(
            response.status, {k.lower(): v for k, v in response.getheaders()}, body, time.monotonic() - started, started
        )

    @classmethod
    def failed(cls, error: BaseException, started: float) -> Reply:
        """No HTTP response at all: the connection was refused, reset or timed out."""
        return cls(0, {}, b"", time.monotonic() - started, started, f"{type(error).__name__}: {error}")

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "")

    def json(self) -> Any:
        return json.loads(self.body)

    def is_json(self) -> bool:
        """A JSON response: the JSON content type and a parseable body; or a 204 with no body at all."""
        if self.status == 204:
            return not self.body  # No Content: no body, so no content type is needed
        if not self.content_type.startswith("application/json"):
            return False
        try:
            json.loads(self.body)
        except ValueError:
            return False
        return True


class Client:
    """One keep-alive HTTP/1.1 connection, reopened after any failure."""

    def __init__(self, port: int, timeout: float = 20) -> None:
        self.port = port
        self.timeout = timeout
        self.connection: http.client.HTTPConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        *,
        token: str | None = None,
        json_body: Any = None,
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> Reply:
        all_headers = dict(headers or {})
        if token is not None:
            all_headers["Authorization"] = f"Bearer {token}"
        if json_body is not None:
            body = json.dumps(json_body).encode()
            all_headers.setdefault("Content-Type", "application/json")
        started = time.monotonic()
        try:
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=self.timeout)
            self.connection.request(method, path, body=body, headers=all_headers)
            response = self.connection.getresponse()
            reply = Reply.read(response, started)
            if response.will_close:
                self.close()
            return reply
        except (OSError, http.client.HTTPException) as error:
            self.close()
            return Reply.failed(error, started)

    def close(self) -> None:
        if self.connection is not None:
            with contextlib.suppress(Exception):
                self.connection.close()
        self.connection = None


def raw_request(port: int, data: bytes, timeout: float = 10) -> Reply:
    """Send bytes as they are (for requests http.client refuses to build) and read one response."""
    started = time.monotonic()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(data)
            response = http.client.HTTPResponse(sock, method=data.split(b" ", 1)[0].decode("latin1"))
            response.begin()
            return Reply.read(response, started)
    except (OSError, http.client.HTTPException) as error:
        return Reply.failed(error, started)


def run_threads(count: int, work: Callable[[int], Any], *, timeout: float) -> list[Any]:
    """Run work(i) in count threads, all released together; re-raise the first exception."""
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def target(index: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[index] = work(index)
        except BaseException as error:  # noqa: BLE001 - handed to the caller
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,), daemon=True) for i in range(count)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + timeout
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    if any(thread.is_alive() for thread in threads):
        raise ScenarioFailure(f"{sum(t.is_alive() for t in threads)} client threads still running after {timeout}s")
    if errors:
        raise errors[0]
    return results


# --- the TCP proxy -----------------------------------------------------------------------------


class TcpProxy(shared.TcpProxy):
    """The shared proxy (tests/harness.py) in front of the scenario's PostgreSQL, closed when it ends."""

    def __init__(self, scenario: Scenario, target_port: int = PG_PORT, port: int | None = None) -> None:
        super().__init__(target_port, target_host=PG_HOST, port=port)
        scenario.stack.callback(self.close)
        scenario.log(f"proxy 127.0.0.1:{self.port} -> {PG_HOST}:{target_port}")


# --- PgBouncer and nginx -----------------------------------------------------------------------


def require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if not path:
        raise ScenarioFailure(f"{name} is not installed: run faults/setup.sh")
    return path


class PgBouncer:
    """Debian's pgbouncer, transaction pooling, trust auth, every database (wildcard) on the local server."""

    def __init__(
        self, scenario: Scenario, *, pool_size: int = 10, target_port: int = PG_PORT, name: str = "pgbouncer"
    ) -> None:
        binary = require_binary("pgbouncer")
        self.port = free_port()
        folder = Path(tempfile.mkdtemp(prefix="faults-pgbouncer-"))
        scenario.stack.callback(shutil.rmtree, folder, True)
        (folder / "userlist.txt").write_text(f'"{PG_USER}" ""\n')
        config = folder / "pgbouncer.ini"
        config.write_text(f"""[databases]
* = host={PG_HOST} port={target_port}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {self.port}
unix_socket_dir =
auth_type = trust
auth_file = {folder / "userlist.txt"}
pool_mode = transaction
default_pool_size = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = 500
max_db_connections = {pool_size}
server_reset_query =
; Retry a failed server login after 1 s (PgBouncer's default, 5 s, would alone use up the 5 s that
; scenario 1 allows for recovery after an outage behind the pooler).
server_login_retry = 1
ignore_startup_parameters = extra_float_digits,options
application_name_add_host = 0
logfile = {folder / "pgbouncer.log"}
pidfile = {folder / "pgbouncer.pid"}
admin_users = {PG_USER}
""")
        argv = [binary, str(config)]
        if os.geteuid() == 0:
            argv[1:1] = ["-u", "postgres"] if _user_exists("postgres") else []
            if len(argv) == 2:
                raise ScenarioFailure("pgbouncer refuses to run as root and there is no postgres user")
            # Its own folder in the system temp dir: the checkout (CI clones into a private
            # mktemp folder) may not be reachable for the postgres user.
            os.chmod(folder, 0o755)
            shutil.chown(folder, "postgres")
            for entry in folder.iterdir():
                shutil.chown(entry, "postgres")
        # Runs before the folder is removed (callbacks unwind last-in, first-out): keep the log.
        scenario.stack.callback(_copy_if_present, folder / "pgbouncer.log", scenario.log_dir / f"{name}.log")
        self.process = Process(name, argv, scenario.log_dir / f"{name}.stdout", cwd=folder)
        scenario.stack.callback(self.process.stop)
        if not wait_port(self.port, 10):
            raise ScenarioFailure(f"pgbouncer did not listen on {self.port}: {self.process.text()[-500:]}")
        scenario.log(f"pgbouncer pid {self.process.pid} on port {self.port}, transaction pooling")


def _copy_if_present(source: Path, target: Path) -> None:
    if source.exists():
        shutil.copyfile(source, target)


def _user_exists(name: str) -> bool:
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


class Nginx:
    """Debian's nginx as a round-robin load balancer on a loopback port, its own prefix and config."""

    def __init__(self, scenario: Scenario, upstream_ports: list[int]) -> None:
        binary = require_binary("nginx")
        self.port = free_port()
        folder = Path(tempfile.mkdtemp(prefix="faults-nginx-"))
        scenario.stack.callback(shutil.rmtree, folder, True)
        (folder / "logs").mkdir()
        servers = "\n".join(f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=10s;" for port in upstream_ports)
        config = folder / "nginx.conf"
        config.write_text(f"""daemon off;
master_process on;
worker_processes 1;
pid {folder / "nginx.pid"};
error_log {scenario.log_dir / "nginx-error.log"} warn;
events {{ worker_connections 512; }}
http {{
  log_format upstreams '$request_method $uri $status upstream=[$upstream_addr] upstream_status=[$upstream_status]';
  access_log {scenario.log_dir / "nginx-access.log"} upstreams;
  client_body_temp_path {folder / "body"};
  proxy_temp_path {folder / "proxy"};
  fastcgi_temp_path {folder / "fastcgi"};
  uwsgi_temp_path {folder / "uwsgi"};
  scgi_temp_path {folder / "scgi"};
  upstream tasks_api {{
{servers}
    keepalive 32;
  }}
  server {{
    listen 127.0.0.1:{self.port};
    location / {{
      proxy_pass http://tasks_api;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Host $host;
      # nginx's default: retry on another instance only when the request is idempotent (GET, PUT,
      # DELETE, ...), never a POST or a PATCH.
      proxy_next_upstream error timeout;
      proxy_connect_timeout 2s;
      proxy_read_timeout 20s;
    }}
  }}
}}
""")
        argv = [binary, "-p", str(folder), "-c", str(config)]
        self.process = Process("nginx", argv, scenario.log_dir / "nginx.stdout", cwd=folder)
        scenario.stack.callback(self.process.stop)
        if not wait_port(self.port, 10):
            raise ScenarioFailure(f"nginx did not listen on {self.port}: {self.process.text()[-500:]}")
        self.access_log = scenario.log_dir / "nginx-access.log"
        scenario.log(f"nginx pid {self.process.pid} on port {self.port} -> {upstream_ports}")

    def retried(self) -> list[str]:
        """Access log lines of requests that nginx passed to more than one instance."""
        if not self.access_log.exists():
            return []
        return [line for line in self.access_log.read_text(errors="replace").splitlines() if ", " in line]


# --- checks on logs ----------------------------------------------------------------------------

# An error in a log: gunicorn's own error lines, the application's ERROR/CRITICAL records, tracebacks.
# Matched at the start of a line only: request lines echo paths that a client chose.
ERROR_PATTERNS = [
    re.compile(pattern)
    for pattern in (
        r"^\[[^\]]+\] \[\d+\] \[(ERROR|CRITICAL)\]",
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (ERROR|CRITICAL) ",
        r"^Traceback \(most recent call last\)",
    )
]


def log_errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(pattern.search(line) for pattern in ERROR_PATTERNS)]


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[Callable[[], bool]]:
    """A bounded loop helper: `with deadline(10) as running: while running(): ...`."""
    end = time.monotonic() + seconds
    yield lambda: time.monotonic() < end
