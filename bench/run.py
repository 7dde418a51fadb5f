#!/usr/bin/env python3
"""The tasks API benchmark (GitHub issue 4): the service against a raw-psycopg2 "floor" app.

    .venv/bin/python bench/run.py            # the full run, about 12 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # a smoke run of every phase, about 2 minutes
    .venv/bin/python bench/run.py --sweep    # compare gunicorn settings (worker class, workers, threads)

It creates a fresh PostgreSQL database (dropped at the end), starts the service (gunicorn app:app)
and bench/floor_app.py under the same gunicorn.conf.py on loopback ports, seeds users and tasks
through the API, and loads both with wrk (-t1, bench/wrk.lua with a file of requests per scenario
carrying valid tokens and existing task ids). Phases:

  counts  statements per request at the server (log_statement = 'all' on the bench database only,
          counted in the PostgreSQL log for a short separate pass)
  load    every scenario at 32 connections (the table), and at 8 and 128 (p99, errors, stalls)
  proxy   both apps behind bench/delay_proxy.py (1 ms each way to PostgreSQL): p50 per scenario
  memory  worker RSS of a fresh service after 50,000 and 100,000 requests
  scale   1,000,000 tasks of 10,000 other users (generate_series): list p50 vs a near-empty table,
          EXPLAIN of the service's own statements, a 5,000-task list vs a 20-task list
  limit   the worst case a user can make: MAX_TASKS_PER_USER tasks, every field at its longest (4-byte
          characters): the whole list's time and size, one worker's RSS before, at its peak and after;
          a 20-task page and a create at the limit, and the refused create past it

The results go to stdout (the tables of bench/report.py, for the README) and bench/results/latest.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import http.client
import json
import math
import os
import platform
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT))  # the shared harness (tests/harness.py)

from report import APPS, SCENARIOS, ratio, report, sweep_report  # noqa: E402 (bench/, the script's folder)

from tests.harness import (  # noqa: E402
    SERVICE_VARIABLES,
    Gunicorn,
    PrivateDatabase,
    Process,
    admin_connection,
    drop_stale_databases,
    free_port,
    token,
)

RESULTS = BENCH / "results"
WRK_SCRIPT = BENCH / "wrk.lua"
PYTHON = sys.executable
DATABASE_PREFIX = "tasks_bench"

LIST_VARIANTS = [
    (status, sort) for status in ("all", "pending", "completed") for sort in ("created", "updated", "title")
]
SERVICE_TASK_LIMIT = 10_000  # the service's MAX_TASKS_PER_USER default: the worst case is a user at it
PROGRESS_EVERY = 500  # responses between wrk's progress lines, when a run is to stop after a number of requests
TOKEN_LIFETIME = 6 * 3600  # longer than any run


def log(message: str) -> None:
    """A timestamped progress line on stderr (stdout carries the report)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- processes ----------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time of these processes (a gunicorn master and its workers)."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / _TICKS
        except (OSError, IndexError, ValueError):
            pass
    return total


def memory_of(pid: int) -> dict[str, float]:
    """RSS (the target), its peak, and PSS/USS for context, in MB."""
    result: dict[str, float] = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                result["rss_mb"] = int(line.split()[1]) / 1024
        rollup = {
            line.split(":")[0]: int(line.split()[1])
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
            if line.split()[1:2]
        }
        result["pss_mb"] = rollup.get("Pss", 0) / 1024
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                result["peak_rss_mb"] = int(line.split()[1]) / 1024
        result["uss_mb"] = (rollup.get("Private_Clean", 0) + rollup.get("Private_Dirty", 0)) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return result


# --- the database -------------------------------------------------------------------------------


class BenchDatabase(PrivateDatabase):
    """The harness's private database, plus what only the benchmark needs: statement logging, the address."""

    def set_statement_logging(self, on: bool) -> None:
        """log_statement = 'all' for new sessions of this database only, or back to the server's setting."""
        with contextlib.closing(admin_connection(self.server_url)) as connection, connection.cursor() as cursor:
            if on:
                cursor.execute(f"ALTER DATABASE \"{self.name}\" SET log_statement = 'all'")
            else:
                cursor.execute(f'ALTER DATABASE "{self.name}" RESET log_statement')

    def address(self) -> tuple[str, int]:
        """The server's host and port (where the delay proxy forwards to)."""
        parts = urlsplit(self.server_url)
        return parts.hostname or "127.0.0.1", parts.port or 5432


def find_server_log(db: PrivateDatabase) -> Path | None:
    """The file PostgreSQL writes its log to: pg_current_logfile(), else a marker looked for."""
    connection = admin_connection(db.server_url)
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_logfile(), current_setting('data_directory')")
            current, data_directory = cursor.fetchone()
            if current:
                path = Path(current if current.startswith("/") else f"{data_directory}/{current}")
                if path.exists():
                    return path
            marker = f"tasks-bench-marker-{secrets.token_hex(8)}"
            cursor.execute(f"DO $$ BEGIN RAISE LOG '{marker}'; END $$")
    finally:
        connection.close()
    time.sleep(0.2)
    for candidate in sorted(Path("/var/log/postgresql").glob("*.log")):
        try:
            with open(candidate, "rb") as handle:
                handle.seek(max(0, candidate.stat().st_size - 1_000_000))
                if marker.encode() in handle.read():
                    return candidate
        except OSError:
            continue
    return None


_RECORD_START = re.compile(r"^\d{4}-\d\d-\d\d[ T]\d\d:\d\d:\d\d")


def statements_in(log_path: Path, start: int, end: int, database: str) -> list[str]:
    """The statements logged (log_statement = 'all') for one database between two file offsets."""
    with open(log_path, "rb") as handle:
        handle.seek(start)
        chunk = handle.read(max(0, end - start)).decode("utf-8", errors="replace")
    statements: list[str] = []
    current: list[str] | None = None
    tag = re.compile(rf"(^|[\s@=\[]){re.escape(database)}([\s,\]]|$)")
    for line in chunk.split("\n"):
        if _RECORD_START.match(line):
            current = None
            head, found, statement = line.partition(" LOG:  statement: ")
            if found and tag.search(head):
                current = [statement]
                statements.append(statement)
        elif current is not None and line.startswith("\t"):
            current.append(line[1:])
            statements[-1] = "\n".join(current)
    return statements


def classify(statement: str) -> str:
    """A statement's kind: its first word, and the table for an INSERT."""
    words = statement.strip().split()
    if not words:
        return "empty"
    first = words[0].upper()
    if first == "INSERT" and len(words) > 2:
        return f"INSERT {words[2].strip(chr(34)).split('(')[0]}"
    return first


def ping_ms(url: str, count: int = 300) -> float:
    """The median round trip of SELECT 1 on one connection, in ms."""
    connection = admin_connection(url)
    timings = []
    with connection.cursor() as cursor:
        for _ in range(count):
            start = time.perf_counter()
            cursor.execute("SELECT 1")
            cursor.fetchone()
            timings.append(time.perf_counter() - start)
    connection.close()
    return round(statistics.median(timings) * 1000, 3)


# --- HTTP ---------------------------------------------------------------------------------------


class Client:
    """A keep-alive HTTP client for seeding and single requests."""

    def __init__(self, port: int) -> None:
        """A connection to 127.0.0.1:port, opened at the first request."""
        self.port = port
        self.connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(
        self, method: str, path: str, token: str | None = None, body: Any = None, raw_body: str | None = None
    ) -> tuple[int, Any]:
        """One request (a JSON body, or a raw one); the status and the decoded JSON answer. Retried once."""
        headers = {}
        data = raw_body if raw_body is not None else (json.dumps(body) if body is not None else None)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        if data is not None:
            headers["Content-Type"] = "application/json"
        for attempt in (1, 2):
            try:
                self.connection.request(method, path, body=data, headers=headers)
                response = self.connection.getresponse()
                raw = response.read()
                return response.status, (json.loads(raw) if raw else None)
            except (http.client.HTTPException, ConnectionError):
                self.connection.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the connection."""
        self.connection.close()


def http_load(port: int, lines: list[str], total: int, concurrency: int) -> dict[str, int]:
    """Exactly `total` requests (cycling through lines) from `concurrency` keep-alive clients."""
    counter = iter(range(total))
    lock = threading.Lock()
    codes: dict[str, int] = {}

    def worker() -> None:
        """Take the next request until none is left."""
        client = Client(port)
        try:
            while True:
                with lock:
                    index = next(counter, None)
                if index is None:
                    return
                method, path, bearer, body = lines[index % len(lines)].split("\t", 3)
                status, _ = client.call(method, path, bearer, raw_body=body or None)
                with lock:
                    codes[str(status)] = codes.get(str(status), 0) + 1
        finally:
            client.close()

    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return codes


# --- wrk ----------------------------------------------------------------------------------------


def ensure_wrk() -> str:
    """The path of wrk, installed from Debian's packages if missing."""
    found = shutil.which("wrk")
    if found:
        return found
    log("wrk is missing: installing it with apt-get (Debian's package)")
    subprocess.run(["apt-get", "update", "-qq"], check=False)
    subprocess.run(
        ["apt-get", "install", "-y", "-qq", "wrk"], check=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    )
    found = shutil.which("wrk")
    if not found:
        raise SystemExit("could not install wrk (apt-get install wrk)")
    return found


class Runner:
    """wrk with one thread and bench/wrk.lua, which also tracks the longest gap between responses (a stall)."""

    def __init__(self, workdir: Path) -> None:
        """Request files go to workdir."""
        self.workdir = workdir
        self.counter = 0
        self.wrk = ensure_wrk()

    def requests(self, lines: list[str]) -> Path:
        """A new file of requests for wrk.lua, one line each: METHOD <tab> PATH <tab> TOKEN <tab> BODY."""
        self.counter += 1
        data = self.workdir / f"requests-{self.counter}.txt"
        data.write_text("\n".join(lines) + "\n")
        return data

    def run(
        self, port: int, requests: Path, connections: int, duration: float, stop_after: int | None = None
    ) -> dict[str, Any]:
        """One wrk run on a file of requests; with stop_after, interrupted after about that many responses."""
        argv = [self.wrk, "-t1", f"-c{connections}", f"-d{max(1, math.ceil(duration))}s", "--timeout", "5s"]
        argv += ["-s", str(WRK_SCRIPT), f"http://127.0.0.1:{port}", "--"]
        argv += [str(requests), str(PROGRESS_EVERY if stop_after else 0)]
        popen = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
        )
        output: list[str] = []
        try:
            assert popen.stdout is not None
            for line in popen.stdout:
                output.append(line)
                if stop_after and line.startswith("PROGRESS ") and int(line.split()[1]) >= stop_after:
                    popen.send_signal(signal.SIGINT)  # wrk stops and reports
                    stop_after = None
            popen.wait(timeout=30)
        finally:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
        text = "".join(output)
        match = re.search(r"^BENCHJSON (.*)$", text, re.MULTILINE)
        if not match:
            raise RuntimeError(f"wrk failed:\n{text}")
        raw = json.loads(match.group(1))
        seconds = raw["duration_us"] / 1e6
        errors = raw["connect"] + raw["read"] + raw["write"] + raw["status"] + raw["timeout"]
        return {
            "connections": connections,
            "seconds": round(seconds, 2),
            "requests": raw["requests"],
            "rps": round(raw["requests"] / seconds, 1) if seconds else 0.0,
            "p50_ms": raw["p50_us"] / 1000,
            "p90_ms": raw["p90_us"] / 1000,
            "p99_ms": raw["p99_us"] / 1000,
            "max_ms": raw["max_us"] / 1000,
            "errors": errors,
            "error_detail": {k: raw[k] for k in ("connect", "read", "write", "status", "timeout") if raw[k]},
            "max_gap_s": round(raw["max_gap_ms"] / 1000, 2),
        }


def combine(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Rounds of one scenario: req/s over the summed time, mean of the rounds' percentiles."""
    if len(runs) == 1:
        return runs[0]
    seconds = sum(r["seconds"] for r in runs)
    requests = sum(r["requests"] for r in runs)
    out = {
        "connections": runs[0]["connections"],
        "seconds": round(seconds, 2),
        "requests": requests,
        "rps": round(requests / seconds, 1) if seconds else 0.0,
        "rounds": len(runs),
        "errors": sum(r["errors"] for r in runs),
        "max_gap_s": max(r["max_gap_s"] for r in runs),
        "max_ms": max(r["max_ms"] for r in runs),
        "error_detail": {
            k: sum(r["error_detail"].get(k, 0) for r in runs) for k in {k for r in runs for k in r["error_detail"]}
        },
    }
    for key in ("p50_ms", "p90_ms", "p99_ms"):
        out[key] = round(statistics.mean(r[key] for r in runs), 3)
    if all("cpu_s" in r for r in runs):
        out["cpu_s"] = round(sum(r["cpu_s"] for r in runs), 2)
        out["cpu_ms_per_request"] = round(out["cpu_s"] * 1000 / requests, 3) if requests else None
    out["round_rps"] = [r["rps"] for r in runs]
    return out


# --- the benchmark ------------------------------------------------------------------------------


class Bench:
    """One benchmark run or sweep: its database, apps, seeded users and results; cleanup() undoes it all."""

    def __init__(self, args: argparse.Namespace) -> None:
        """A work folder, wrk, and a fresh database (created last: cleanup() is what drops it)."""
        self.args = args
        self.secret = secrets.token_hex(32)
        self.workdir = Path(tempfile.mkdtemp(prefix="tasks-bench-"))
        self.runner = Runner(self.workdir)
        self.apps: dict[str, Gunicorn] = {}
        self.proxy: Process | None = None
        self.tokens: dict[str, str] = {}
        self.list_users = [f"bench-u{i:03d}" for i in range(args.users)]
        self.create_users = [f"bench-c{i:03d}" for i in range(args.users)]
        self.scale_user, self.big_user = "bench-scale", "bench-big"
        self.task_ids: dict[str, list[int]] = {}
        self.app_env: dict[str, str] = {}
        self.results: dict[str, Any] = {}
        self.server_log: Path | None = None
        self.twin: BenchDatabase | None = None  # the scale phase's near-empty table
        for name in drop_stale_databases(DATABASE_PREFIX, args.pg):
            log(f"dropped {name}, left by a benchmark run that was killed")
        self.db = BenchDatabase(DATABASE_PREFIX, args.pg)

    # ---- apps

    def token(self, user: str) -> str:
        """A valid token for user (one per user and run)."""
        if user not in self.tokens:
            self.tokens[user] = token(user, self.secret, lifetime=TOKEN_LIFETIME)
        return self.tokens[user]

    def port(self, name: str) -> int:
        """The port of a running app."""
        return self.apps[name].port

    def start_app(
        self,
        name: str,
        *,
        db_url: str | None = None,
        extra: dict[str, str] | None = None,
        gunicorn_args: tuple[str, ...] = (),
    ) -> None:
        """Start `service` or `floor` (a name may carry a suffix: service-empty) under gunicorn.conf.py."""
        floor = name.split("-")[0] == "floor"
        env = {
            **self.app_env,
            **(extra or {}),
            "BETTER_AUTH_SECRET": self.secret,
            "DATABASE_URL": db_url or self.db.url(),
        }
        app = Gunicorn(
            env,
            self.workdir / f"{name}.log",
            root=self.args.service_dir,
            app_spec="floor_app:app" if floor else "app:app",
            extra_args=(*gunicorn_args, *(("--pythonpath", str(BENCH)) if floor else ())),
            python=PYTHON,
            name=name,
        )
        self.apps[name] = app
        app.wait_healthy(60, "/health/ready")
        time.sleep(1.5)  # the other workers finish booting

    def stop_app(self, name: str) -> None:
        """Stop an app if it runs."""
        app = self.apps.pop(name, None)
        if app:
            app.stop()

    def restart_apps(self, db_url: str | None = None, names: list[str] | None = None) -> None:
        """Restart apps (both by default) with fresh workers and connections, on db_url if given."""
        for name in names or APPS:
            self.stop_app(name)
            self.start_app(name, db_url=db_url)

    def workers(self, name: str) -> list[int]:
        """The worker pids of a running app."""
        return self.apps[name].worker_pids()

    def start_proxy(self) -> str:
        """bench/delay_proxy.py in front of PostgreSQL; the bench database's URL through it."""
        port = free_port()
        pg_host, pg_port = self.db.address()
        argv = [PYTHON, str(BENCH / "delay_proxy.py"), "--listen", f"127.0.0.1:{port}"]
        argv += ["--target", f"{pg_host}:{pg_port}", "--delay-ms", str(self.args.delay_ms)]
        self.proxy = Process("proxy", argv, self.workdir / "proxy.log", cwd=ROOT)
        time.sleep(1)
        return self.db.url(port=port)

    # ---- seeding (through the API)

    def create_through_api(self, port: int, jobs: list[tuple[str, int]]) -> list[tuple[str, int]]:
        """A task for each (user, number), from 8 clients; the (user, task id) pairs."""
        local = threading.local()

        def create(job: tuple[str, int]) -> tuple[str, int]:
            """Create one task."""
            if not hasattr(local, "client"):
                local.client = Client(port)
            user, k = job
            body = {"title": f"Seed task {k} of {user}", "description": "seeded by bench/run.py"}
            status, answer = local.client.call("POST", f"/api/{user}/tasks", self.token(user), body)
            if status != 201:
                raise RuntimeError(f"seeding failed: {status} {answer}")
            return user, answer["id"]

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(create, jobs))

    def seed_scale_user(self, port: int) -> None:
        """The scale phase's user: 40 tasks, 20 of them completed, so every status lists 20 with limit=20."""
        ids = [task_id for _, task_id in self.create_through_api(port, [(self.scale_user, k) for k in range(40)])]
        client = Client(port)
        for task_id in sorted(ids)[::2]:
            status, _ = client.call(
                "PATCH",
                f"/api/{self.scale_user}/tasks/{task_id}/complete",
                self.token(self.scale_user),
                {"completed": True},
            )
            assert status == 200, status
        client.close()

    def seed(self) -> None:
        """The users and tasks of every scenario, through the service's API."""
        started = time.monotonic()
        jobs = [(user, k) for user in self.list_users for k in range(self.args.tasks)]
        jobs += [(user, 0) for user in [*self.create_users, self.big_user]]
        for user, task_id in self.create_through_api(self.port("service"), jobs):
            self.task_ids.setdefault(user, []).append(task_id)
        self.seed_scale_user(self.port("service"))
        seconds = round(time.monotonic() - started, 1)
        log(f"seeded {len(jobs) + 40} tasks of {len(self.task_ids) + 1} users through the API in {seconds} s")
        self.results["seed"] = {"users": len(self.task_ids) + 1, "tasks": len(jobs) + 40, "seconds": seconds}

    # ---- request lists per scenario: "METHOD <tab> PATH <tab> TOKEN <tab> BODY"

    def line(self, method: str, path: str, user: str, body: Any = None) -> str:
        """One request line of user's."""
        return "\t".join([method, path, self.token(user), json.dumps(body) if body is not None else ""])

    def lines(self, scenario: str, delete_ids: list[tuple[str, int]] | None = None) -> list[str]:
        """The request lines of a scenario (delete: of the given tasks)."""
        # (user, task) pairs of the list users, interleaved so that neighbours (in flight together) differ
        pairs = [(user, self.task_ids[user][k]) for k in range(self.args.tasks) for user in self.list_users]
        if scenario == "list":
            return [self.line("GET", f"/api/{u}/tasks", u) for u in self.list_users]
        if scenario == "get":
            return [self.line("GET", f"/api/{u}/tasks/{t}", u) for u, t in pairs]
        if scenario == "create":
            body = {"description": "created under load"}
            return [
                self.line("POST", f"/api/{u}/tasks", u, {"title": f"Bench task {k}", **body})
                for k in range(7)
                for u in self.create_users
            ]
        if scenario == "update":
            return [
                self.line("PATCH", f"/api/{u}/tasks/{t}", u, {"title": f"Renamed {k % 7}"})
                for k, (u, t) in enumerate(pairs)
            ]
        if scenario == "toggle":
            return [self.line("PATCH", f"/api/{u}/tasks/{t}/complete", u) for u, t in pairs]
        if scenario == "delete":
            assert delete_ids
            return [self.line("DELETE", f"/api/{u}/tasks/{t}", u) for u, t in delete_ids]
        if scenario == "mix":  # 60% list, 20% get, 10% create, 10% toggle, shuffled in blocks of 10
            rng = random.Random(4)
            slots = ["list"] * 6 + ["get"] * 2 + ["create", "toggle"]
            sources = {name: self.lines(name) for name in ("list", "get", "create", "toggle")}
            position = dict.fromkeys(sources, 0)
            out = []
            for _ in range(200):
                rng.shuffle(slots)
                for name in slots:
                    source = sources[name]
                    out.append(source[position[name] % len(source)])
                    position[name] += 1
            return out
        raise ValueError(scenario)

    def delete_pool(self, count: int) -> list[tuple[str, int]]:
        """`count` fresh tasks of the create users (inserted by SQL) for a delete run to consume."""
        rows = self.db.query(
            "INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at) "
            "SELECT (%s::text[])[1 + g %% %s], 'To delete ' || g, 'created for a delete run', false, now(), now() "
            "FROM generate_series(1, %s) g RETURNING user_id, id",
            (self.create_users, len(self.create_users), count),
        )
        random.Random(count).shuffle(rows)
        return [(user, task_id) for user, task_id in rows]

    # ---- load

    def scenario_pass(
        self, connections: int, duration: float, label: str, rounds: int = 1, scenarios: list[str] | None = None
    ) -> dict[str, dict[str, dict[str, Any]]]:
        """Every scenario for both apps, alternating which goes first; returns [scenario][app]."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        files = {name: self.runner.requests(self.lines(name)) for name in SCENARIOS if name != "delete"}
        fastest = dict.fromkeys(APPS, 1000.0)
        per_round = duration / rounds
        for index, scenario in enumerate(SCENARIOS):
            if scenarios and scenario not in scenarios:
                continue
            runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in APPS}
            for round_number in range(rounds):
                for kind in APPS if (index + round_number) % 2 == 0 else APPS[::-1]:
                    if scenario == "delete":  # enough tasks for the fastest rate seen, with a margin
                        count = int(fastest[kind] * math.ceil(per_round) * 1.5) + 500
                        requests = self.runner.requests(self.lines("delete", self.delete_pool(count)))
                    else:
                        requests = files[scenario]
                    runs[kind].append(self.measured_run(kind, requests, connections, per_round))
            out[scenario] = {}
            for kind in APPS:
                result = out[scenario][kind] = combine(runs[kind])
                fastest[kind] = max(fastest[kind], result["rps"])
                log(
                    f"{label} c={connections} {scenario:<6} {kind:<7} {result['rps']:8.1f} req/s  "
                    f"p50 {result['p50_ms']:6.2f}  p99 {result['p99_ms']:7.2f} ms  errors {result['errors']}  "
                    f"max gap {result['max_gap_s']} s"
                )
        return out

    def measured_run(self, name: str, requests: Path, connections: int, seconds: float) -> dict[str, Any]:
        """A wrk run plus the CPU time the app's processes (master and workers) used per request."""
        pids = [self.apps[name].process.pid, *self.workers(name)]
        before = cpu_seconds(pids)
        result = self.runner.run(self.port(name), requests, connections, seconds)
        result["cpu_s"] = round(cpu_seconds(pids) - before, 2)
        result["cpu_ms_per_request"] = (
            round(result["cpu_s"] * 1000 / result["requests"], 3) if result["requests"] else None
        )
        return result

    def warm_up(self, names: list[str] | None = None, seconds: float = 2) -> None:
        """Creates, then the mix, at 32 connections on each app (both by default)."""
        files = [self.runner.requests(self.lines("create")), self.runner.requests(self.lines("mix"))]
        for name in names or APPS:
            for requests in files:
                self.runner.run(self.port(name), requests, 32, seconds)

    # ---- phases

    def phase_counts(self) -> None:
        """Statements per request at the server, counted in the PostgreSQL log for an exact number of requests."""
        self.server_log = find_server_log(self.db)
        if self.server_log is None:
            log("counts: cannot find the PostgreSQL log file; skipping the statement count")
            self.results["counts"] = {"error": "PostgreSQL log file not found"}
            return
        log(f"counts: log_statement = 'all' on {self.db.name} only; reading {self.server_log}")
        total, concurrency = self.args.count_requests, self.args.count_concurrency
        counts: dict[str, Any] = {}
        self.db.set_statement_logging(True)
        try:
            self.restart_apps()  # only sessions opened after the ALTER DATABASE log their statements
            for kind in APPS:  # open every pooled connection, register the create users in the workers
                http_load(self.port(kind), self.lines("create"), 4 * len(self.create_users), concurrency)
                http_load(self.port(kind), self.lines("mix"), 500, concurrency)
            for scenario in SCENARIOS:
                counts[scenario] = {}
                for kind in APPS:
                    lines = self.lines(scenario, self.delete_pool(total) if scenario == "delete" else None)
                    start = self.server_log.stat().st_size
                    codes = http_load(self.port(kind), lines, total, concurrency)
                    time.sleep(0.3)
                    end = self.server_log.stat().st_size
                    statements = statements_in(self.server_log, start, end, self.db.name)
                    kinds: dict[str, int] = {}
                    for statement in statements:
                        kinds[classify(statement)] = kinds.get(classify(statement), 0) + 1
                    exempt = kinds.get("INSERT tasks_api_users", 0)  # a user's first write in a worker registers them
                    counts[scenario][kind] = {
                        "requests": total,
                        "status_codes": codes,
                        "statements": len(statements),
                        "statements_per_request": round(len(statements) / total, 3),
                        "registrations": exempt,
                        "steady_statements_per_request": round((len(statements) - exempt) / total, 3),
                        "statement_kinds": kinds,
                    }
                    log(
                        f"counts {scenario:<6} {kind:<7} {total} requests {codes}: {len(statements)} statements {kinds}"
                    )
        finally:
            self.db.set_statement_logging(False)
        self.restart_apps()
        counts["log_file"] = str(self.server_log)
        counts["concurrency"] = concurrency
        self.results["counts"] = counts

    def phase_load(self) -> None:
        """Every scenario at the main concurrency in alternating rounds, then at the check levels."""
        self.warm_up()
        load: dict[str, Any] = {}
        main = self.args.connections
        for connections in [main] + [c for c in self.args.check_connections if c != main]:
            if connections == main:
                load[str(connections)] = self.scenario_pass(main, self.args.duration, "load", self.args.rounds)
            else:
                load[str(connections)] = self.scenario_pass(
                    connections, self.args.check_duration, "check", scenarios=self.args.check_scenarios
                )
        self.results["load"] = load

    def phase_proxy(self) -> None:
        """Both apps behind the delay proxy: every scenario at the proxy levels."""
        proxied_url = self.start_proxy()
        try:
            rtt = {"direct_ms": ping_ms(self.db.url()), "proxied_ms": ping_ms(proxied_url)}
            log(
                f"proxy: SELECT 1 round trip p50 {rtt['direct_ms']:.3f} ms direct, "
                f"{rtt['proxied_ms']:.3f} ms through the proxy"
            )
            self.restart_apps(db_url=proxied_url)
            self.warm_up()
            runs = {
                str(c): self.scenario_pass(c, self.args.proxy_duration, "proxy", self.args.proxy_rounds)
                for c in self.args.proxy_connections
            }
            self.results["proxy"] = {
                "delay_ms_each_way": self.args.delay_ms,
                "select1_round_trip": rtt,
                "runs": runs,
            }
        finally:
            for name in APPS:
                self.stop_app(name)
            if self.proxy:
                self.proxy.stop()
                self.proxy = None
        self.restart_apps()

    def phase_memory(self) -> None:
        """A fresh service, the mix at 32 connections, RSS of each worker at 0, N/2 and N requests."""
        self.restart_apps(names=["service"])
        total = self.args.memory_requests
        requests = self.runner.requests(self.lines("mix"))
        snapshots: list[dict[str, Any]] = [
            {"requests": 0, "workers": {pid: memory_of(pid) for pid in self.workers("service")}}
        ]
        done = 0
        for goal in (total // 2, total):
            run = self.runner.run(self.port("service"), requests, 32, 3600, stop_after=goal - done)
            done += run["requests"]
            time.sleep(0.5)
            snapshots.append(
                {
                    "requests": done,
                    "errors": run["errors"],
                    "rps": run["rps"],
                    "workers": {pid: memory_of(pid) for pid in self.workers("service")},
                }
            )
            rss = ", ".join(f"{m.get('rss_mb', 0):.1f}" for m in snapshots[-1]["workers"].values())
            log(f"memory: after {done} requests: worker RSS {rss} MB")
        half, last = snapshots[1]["workers"], snapshots[2]["workers"]
        common = [pid for pid in last if pid in half]
        floor = {pid: memory_of(pid) for pid in self.workers("floor")}
        self.results["memory"] = {
            "snapshots": [{**s, "workers": {str(k): v for k, v in s["workers"].items()}} for s in snapshots],
            "max_rss_mb": round(max(m.get("rss_mb", 0) for m in last.values()), 1),
            "max_growth_mb": round(max(last[p].get("rss_mb", 0) - half[p].get("rss_mb", 0) for p in common), 2),
            "same_workers": len(common) == len(last) == len(half),
            "floor_workers_now": {str(k): v for k, v in floor.items()},
        }
        self.restart_apps(names=["service"])

    def capture_service_sql(self, twin: BenchDatabase, paths: dict[str, tuple[str, str]]) -> dict[str, str]:
        """The service's own SQL for some requests, from the server log (log_statement on the twin)."""
        self.server_log = self.server_log or find_server_log(twin)
        if self.server_log is None:
            return {}
        captured: dict[str, str] = {}
        twin.set_statement_logging(True)
        try:
            self.restart_apps(db_url=twin.url(), names=["service-empty"])
            client = Client(self.port("service-empty"))
            for name, (path, user) in paths.items():
                start = self.server_log.stat().st_size
                status, _ = client.call("GET", path, self.token(user))
                time.sleep(0.05)
                logged = statements_in(self.server_log, start, self.server_log.stat().st_size, twin.name)
                found = [s for s in logged if s.lstrip().upper().startswith("SELECT")]
                if status == 200 and len(found) == 1:
                    captured[name] = found[0]
            client.close()
        finally:
            twin.set_statement_logging(False)
        self.restart_apps(db_url=twin.url(), names=["service-empty"])
        return captured

    def measure_lists(self, pairs: dict[str, str], path: str, user: str) -> dict[str, dict[str, Any]]:
        """One GET at 1 connection, in alternating rounds on each app of pairs (label -> app name)."""
        args = self.args
        requests = self.runner.requests([self.line("GET", path, user)])
        runs: dict[str, list[dict[str, Any]]] = {label: [] for label in pairs}
        for round_number in range(args.scale_rounds):
            order = list(pairs) if round_number % 2 == 0 else list(pairs)[::-1]
            for label in order:
                port = self.port(pairs[label])
                runs[label].append(self.runner.run(port, requests, 1, args.scale_duration / args.scale_rounds))
        return {label: combine(r) for label, r in runs.items()}

    def phase_scale(self) -> None:
        """A near-empty twin database and this one with 1,000,000 more tasks: list p50, plans, a big list."""
        args = self.args
        twin = self.twin = BenchDatabase(DATABASE_PREFIX, args.pg, name=self.db.name + "_empty")
        self.start_app("service-empty", db_url=twin.url())
        self.seed_scale_user(self.port("service-empty"))
        self.create_through_api(self.port("service-empty"), [(self.big_user, 0)])
        paths = {
            f"{status}/{sort}": (f"/api/{self.scale_user}/tasks?status={status}&sort={sort}&limit=20", self.scale_user)
            for status, sort in LIST_VARIANTS
        }
        sql = self.capture_service_sql(twin, {**paths, "big/full": (f"/api/{self.big_user}/tasks", self.big_user)})
        near_empty = twin.query("SELECT count(*) FROM tasks")[0][0]

        started = time.monotonic()
        users, rows = args.scale_users, args.scale_rows
        self.db.query(
            "INSERT INTO tasks_api_users (id, email, name, created_at) "
            "SELECT 'bulk-' || g, 'bulk-' || g || '@example.com', NULL, now() "
            "FROM generate_series(1, %s) g",
            (users,),
        )
        self.db.query(
            "INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at) "
            "SELECT 'bulk-' || (1 + g %% %s), 'Bulk task ' || g, 'generated', g %% 3 = 0, "
            "now() - g * interval '1 second', now() - g * interval '1 second' "
            "FROM generate_series(1, %s) g",
            (users, rows),
        )
        self.db.query("VACUUM ANALYZE tasks")
        twin.query("VACUUM ANALYZE tasks")
        insert_seconds = time.monotonic() - started
        total = self.db.query("SELECT count(*) FROM tasks")[0][0]
        log(
            f"scale: inserted {rows} tasks of {users} users in {insert_seconds:.1f} s "
            f"({total} tasks here, {near_empty} in the near-empty twin)"
        )

        lists = {}
        for name, (path, user) in paths.items():
            result = self.measure_lists({"near_empty": "service-empty", "loaded": "service"}, path, user)
            lists[name] = {**result, "ratio": ratio(result["loaded"]["p50_ms"], result["near_empty"]["p50_ms"])}
            log(
                f"scale: {name:<18} p50 near-empty {result['near_empty']['p50_ms']:.2f} ms, "
                f"{total} tasks {result['loaded']['p50_ms']:.2f} ms ({lists[name]['ratio']}x)"
            )
        self.stop_app("service-empty")

        plans: dict[str, Any] = {}
        self.db.query(
            "INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at) "
            "SELECT %s, 'Big list task ' || g, 'one of many', g %% 2 = 0, "
            "now() - g * interval '1 second', now() - g * interval '1 second' "
            "FROM generate_series(1, %s) g",
            (self.big_user, args.big_tasks - 1),
        )
        self.db.query("ANALYZE tasks")
        connection = self.db.connect()
        try:
            with connection.cursor() as cursor:
                for name, statement in sql.items():
                    cursor.execute("EXPLAIN (ANALYZE, BUFFERS) " + statement)
                    plan = [row[0] for row in cursor.fetchall()]
                    text = "\n".join(plan)
                    index_scan = bool(re.search(r"Index (Only )?Scan|Bitmap Index Scan", text))
                    plans[name] = {
                        "index_scan": index_scan and "Seq Scan on tasks" not in text,
                        "sql": statement,
                        "plan": plan,
                    }
        finally:
            connection.close()

        small_user = self.list_users[0]
        big = {}
        for kind in APPS:
            small = self.measure_lists({kind: kind}, f"/api/{small_user}/tasks", small_user)[kind]
            large = self.measure_lists({kind: kind}, f"/api/{self.big_user}/tasks", self.big_user)[kind]
            big[kind] = {"list_small": small, "list_big": large, "ratio": ratio(large["p50_ms"], small["p50_ms"])}
            log(
                f"scale: {kind} full list of {args.big_tasks} tasks p50 {large['p50_ms']:.2f} ms, "
                f"of {args.tasks} tasks {small['p50_ms']:.2f} ms ({big[kind]['ratio']}x)"
            )
        self.results["scale"] = {
            "near_empty_tasks": near_empty,
            "tasks": total,
            "other_users": users,
            "insert_seconds": round(insert_seconds, 1),
            "lists": lists,
            "plans": plans,
            "big_list": {"tasks": args.big_tasks, "small_tasks": args.tasks, **big},
        }

    def phase_limit(self) -> None:
        """One user at the per-user limit, every field at its longest: the longest list a user can ask for."""
        user, limit = "bench-limit", SERVICE_TASK_LIMIT
        self.start_app("service-limit", extra={"WEB_CONCURRENCY": "1"})  # one worker gets every request
        bearer = self.token(user)
        client = Client(self.port("service-limit"))
        longest = {"title": "\U0001f600" * 200, "description": "\U0001f600" * 1000}
        status, first = client.call("POST", f"/api/{user}/tasks", bearer, longest)
        if status != 201:
            raise RuntimeError(f"limit: the longest task was refused: {status} {first}")
        started = time.monotonic()
        self.db.query(
            "INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at) "
            "SELECT user_id, title, description, g %% 2 = 0, created_at + g * interval '1 ms', "
            "updated_at + g * interval '1 ms' FROM tasks, generate_series(1, %s) g WHERE id = %s",
            (limit - 1, first["id"]),
        )
        self.db.query("VACUUM ANALYZE tasks")
        insert_seconds = time.monotonic() - started

        def timed(method: str, path: str, body: Any = None) -> tuple[int, float, int]:
            """One request: its status, milliseconds and answer size in bytes."""
            headers = {"Authorization": f"Bearer {bearer}"}
            if body is not None:
                headers["Content-Type"] = "application/json"
            began = time.perf_counter()
            data = json.dumps(body) if body is not None else None
            client.connection.request(method, path, body=data, headers=headers)
            response = client.connection.getresponse()
            size = len(response.read())
            return response.status, (time.perf_counter() - began) * 1000, size

        refused = [timed("POST", f"/api/{user}/tasks", {"title": "one too many"}) for _ in range(20)]
        pages = [timed("GET", f"/api/{user}/tasks?limit=20") for _ in range(50)]
        (worker,) = self.workers("service-limit")
        before = memory_of(worker)
        lists = []
        for _ in range(self.args.limit_lists):
            status, elapsed, size = timed("GET", f"/api/{user}/tasks")
            lists.append(
                {
                    "status": status,
                    "ms": round(elapsed, 1),
                    "mb": round(size / 1e6, 1),
                    **{key: round(value, 1) for key, value in memory_of(worker).items()},
                }
            )
            log(
                f"limit: whole list of {limit} tasks: {status}, {size / 1e6:.1f} MB in {elapsed:.0f} ms; worker RSS "
                f"{lists[-1].get('rss_mb')} MB (peak so far {lists[-1].get('peak_rss_mb')})"
            )
        time.sleep(0.5)
        after = memory_of(worker)
        creates = []
        for _ in range(20):  # a create at the limit: the count it costs is the user's whole index range
            task_id = self.db.query("SELECT max(id) FROM tasks WHERE user_id = %s", (user,))[0][0]
            timed("DELETE", f"/api/{user}/tasks/{task_id}")
            creates.append(timed("POST", f"/api/{user}/tasks", {"title": "at the limit"}))
        client.close()
        self.stop_app("service-limit")
        self.results["limit"] = {
            "tasks": limit,
            "insert_seconds": round(insert_seconds, 1),
            "lists": lists,
            "rss_before_mb": round(before.get("rss_mb", 0), 1),
            "rss_after_mb": round(after.get("rss_mb", 0), 1),
            "peak_rss_mb": round(after.get("peak_rss_mb", 0), 1),
            "page_p50_ms": round(statistics.median(ms for _, ms, _ in pages), 2),
            "create_at_limit_p50_ms": round(statistics.median(ms for _, ms, _ in creates), 2),
            "refused_p50_ms": round(statistics.median(ms for _, ms, _ in refused), 2),
            "statuses": sorted(
                {status for status, _, _ in refused + pages + creates} | {entry["status"] for entry in lists}
            ),
            "refused_statuses": sorted({status for status, _, _ in refused}),
        }

    # ---- the whole run

    def run(self) -> dict[str, Any]:
        """Both apps started and seeded, then each phase of --phases; the results."""
        args = self.args
        started = time.time()
        self.results["meta"] = machine_info(args.pg)
        self.results["meta"].update(
            {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "command": " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]]),
                "git": git_describe(),
                "database": self.db.name,
                "gunicorn": gunicorn_settings(self.app_env, args.service_dir),
                "settings": {k: v for k, v in vars(args).items() if k not in ("pg",)},
            }
        )
        log(f"database {self.db.name} created; starting the service and the floor")
        self.start_app("service")  # creates the schema
        self.start_app("floor")
        self.seed()
        phases: dict[str, Callable[[], None]] = {
            "counts": self.phase_counts,
            "load": self.phase_load,
            "proxy": self.phase_proxy,
            "memory": self.phase_memory,
            "scale": self.phase_scale,
            "limit": self.phase_limit,
        }
        for name in args.phases:
            phase_start = time.monotonic()
            log(f"phase {name}")
            phases[name]()
            self.results.setdefault("phase_seconds", {})[name] = round(time.monotonic() - phase_start, 1)
        self.results["meta"]["seconds"] = round(time.time() - started, 1)
        return self.results

    def sweep(self) -> dict[str, Any]:
        """Service only: each gunicorn configuration on the same scenarios, in interleaved rounds."""
        args = self.args
        self.start_app("service")
        self.seed()
        db_url = self.start_proxy() if args.sweep_proxy else None
        files = {
            scenario: self.runner.requests(self.lines(scenario.partition("@")[0])) for scenario in args.sweep_scenarios
        }
        raw: dict[str, dict[str, list[dict[str, Any]]]] = {spec: {s: [] for s in files} for spec in args.sweep_configs}
        rss: dict[str, float] = {}
        uss: dict[str, float] = {}
        for round_number in range(args.sweep_rounds):
            order = args.sweep_configs if round_number % 2 == 0 else args.sweep_configs[::-1]
            for spec in order:
                config = parse_config(spec)
                extra = {
                    "WEB_CONCURRENCY": str(config["workers"]),
                    "GUNICORN_THREADS": str(config["threads"]),
                    "DB_POOL_SIZE": str(config["pool"]),
                }
                self.stop_app("service")
                flags = ("-k", config["worker_class"], *(("--preload",) if config["preload"] else ()))
                self.start_app("service", db_url=db_url, extra=extra, gunicorn_args=flags)
                self.warm_up(["service"], 1)
                for scenario, requests in files.items():
                    connections = int(scenario.partition("@")[2] or 32)
                    raw[spec][scenario].append(self.measured_run("service", requests, connections, args.sweep_duration))
                memory = [memory_of(p) for p in self.workers("service")]
                rss[spec] = max(rss.get(spec, 0), max(m.get("rss_mb", 0) for m in memory))
                uss[spec] = max(uss.get(spec, 0), max(m.get("uss_mb", 0) for m in memory))
                log(
                    f"sweep round {round_number + 1} {spec:<16} "
                    + "  ".join(
                        f"{s} {r[-1]['rps']:.0f}/s p99 {r[-1]['p99_ms']:.0f} cpu {r[-1]['cpu_ms_per_request']}"
                        for s, r in raw[spec].items()
                    )
                )
        rows = []
        for spec in args.sweep_configs:
            summary = {}
            for scenario, runs in raw[spec].items():
                summary[scenario] = {
                    "rps_median": round(statistics.median(r["rps"] for r in runs), 1),
                    "p99_ms_median": round(statistics.median(r["p99_ms"] for r in runs), 1),
                    "cpu_ms_per_request_median": round(
                        statistics.median(r["cpu_ms_per_request"] or 0 for r in runs), 3
                    ),
                    "errors": sum(r["errors"] for r in runs),
                    "runs": runs,
                }
            rows.append(
                {
                    "config": spec,
                    **parse_config(spec),
                    "rss_mb": round(rss.get(spec, 0), 1),
                    "uss_mb": round(uss.get(spec, 0), 1),
                    "scenarios": summary,
                }
            )
        self.results = {"meta": machine_info(args.pg), "sweep": rows}
        self.results["meta"].update(
            {
                "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
                "git": git_describe(),
                "rounds": args.sweep_rounds,
                "behind_proxy_ms_each_way": args.delay_ms if args.sweep_proxy else None,
                "seconds_per_run": args.sweep_duration,
            }
        )
        return self.results

    def cleanup(self) -> None:
        """Stop every process started, drop the databases, remove the work folder; whatever fails, go on."""
        try:
            Process.stop_all()
        except Exception as error:  # keep cleaning up
            log(f"could not stop every process: {error}")
        for database in (self.db, self.twin):
            if database is None or database.dropped:
                continue
            try:
                database.drop()
                log(f"database {database.name} dropped")
            except Exception as error:
                log(f"could not drop database {database.name}: {error}")
        shutil.rmtree(self.workdir, ignore_errors=True)


# --- what was measured --------------------------------------------------------------------------


def git_describe() -> str:
    """The commit measured, and whether the tracked files had changes."""
    out = subprocess.run(["git", "-C", str(ROOT), "log", "-1", "--format=%h %s"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    return out.stdout.strip()[:80] + (" (+ uncommitted changes)" if dirty else "")


def parse_config(spec: str) -> dict[str, Any]:
    """'gthread:3x4:pool4:preload' -> worker class, workers, threads, pool (default max(threads, 5)), preload."""
    match = re.fullmatch(r"(\w+):(\d+)x(\d+)((?::\w+)*)", spec)
    flags = match.group(4).split(":")[1:] if match else []
    pools = [int(flag[4:]) for flag in flags if re.fullmatch(r"pool\d+", flag)]
    if not match or any(flag != "preload" and not re.fullmatch(r"pool\d+", flag) for flag in flags):
        raise argparse.ArgumentTypeError(
            f"bad config {spec!r}; use e.g. gthread:3x4, sync:4x1, gthread:3x2:pool4:preload"
        )
    threads = int(match.group(3))
    return {
        "worker_class": match.group(1),
        "workers": int(match.group(2)),
        "threads": threads,
        "pool": pools[0] if pools else max(threads, 5),
        "preload": "preload" in flags,
    }


def machine_info(pg: str) -> dict[str, Any]:
    """CPUs, CPU model, Python, PostgreSQL, wrk and kernel versions."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    try:
        connection = admin_connection(pg)
        with connection.cursor() as cursor:
            cursor.execute("SHOW server_version")
            pg_version = cursor.fetchone()[0]
        connection.close()
    except Exception:
        pg_version = "?"
    wrk_version = subprocess.run([shutil.which("wrk") or "wrk", "-v"], capture_output=True, text=True).stdout
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "postgresql": pg_version,
        "wrk": (wrk_version.split("\n")[0].split(" [")[0] if wrk_version else "?"),
        "kernel": platform.release(),
    }


def gunicorn_settings(env: dict[str, str], service_dir: Path) -> dict[str, Any]:
    """What gunicorn.conf.py resolves to in the environment the apps get (the harness's, plus env)."""
    code = (
        "import os, runpy; os.environ.setdefault('BETTER_AUTH_SECRET', 'x'); "
        "c = runpy.run_path('gunicorn.conf.py'); "
        "import json; print(json.dumps({k: c.get(k) for k in ('worker_class', 'workers', 'threads', "
        "'keepalive', 'timeout')} | {'DB_POOL_SIZE': os.environ.get('DB_POOL_SIZE', '5 (app default)'), "
        "'DB_MAX_OVERFLOW': os.environ.get('DB_MAX_OVERFLOW', '5 (app default)')}))"
    )
    app_env = {key: value for key, value in os.environ.items() if key not in SERVICE_VARIABLES} | env
    out = subprocess.run([PYTHON, "-c", code], cwd=service_dir, capture_output=True, text=True, env=app_env)
    try:
        settings: dict[str, Any] = json.loads(out.stdout.strip().splitlines()[-1])
        return settings
    except (IndexError, ValueError):
        return {"error": out.stderr[-500:]}


# --- entry point --------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line, with the defaults of --quick or of the full run filled in."""
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="a short smoke run of every phase")
    parser.add_argument("--sweep", action="store_true", help="compare gunicorn settings instead")
    parser.add_argument(
        "--pg",
        default=os.environ.get("BENCH_PG", "postgresql://postgres@127.0.0.1:5432"),
        help="PostgreSQL server URL without a database (a superuser, for log_statement)",
    )
    parser.add_argument(
        "--phases",
        default="counts,load,proxy,memory,scale,limit",
        help="comma-separated subset of counts,load,proxy,memory,scale,limit",
    )
    parser.add_argument("--connections", type=int, default=32, help="the table's concurrency")
    parser.add_argument("--duration", type=float, help="seconds per scenario and app at --connections")
    parser.add_argument("--rounds", type=int, help="--duration is split into this many alternating rounds")
    parser.add_argument("--check-connections", default="8,32,128", help="levels for p99, errors and stalls")
    parser.add_argument("--check-duration", type=float, help="seconds per scenario and app at the other levels")
    parser.add_argument("--check-scenarios", help="scenarios run at the other levels (default all; --quick: mix)")
    parser.add_argument("--count-requests", type=int, help="requests per scenario and app in the count pass")
    parser.add_argument("--count-concurrency", type=int, default=16)
    parser.add_argument("--proxy-connections", default="1,8", help="levels behind the delay proxy")
    parser.add_argument("--proxy-duration", type=float)
    parser.add_argument("--proxy-rounds", type=int)
    parser.add_argument("--delay-ms", type=float, default=1.0, help="proxy delay each way")
    parser.add_argument("--memory-requests", type=int)
    parser.add_argument("--scale-rows", type=int)
    parser.add_argument("--scale-users", type=int)
    parser.add_argument("--scale-duration", type=float, help="seconds per list variant and table")
    parser.add_argument("--scale-rounds", type=int)
    parser.add_argument("--big-tasks", type=int, default=5000)
    parser.add_argument("--limit-lists", type=int, help="whole lists at the per-user limit, one after another")
    parser.add_argument("--users", type=int, default=64, help="users per scenario (each with --tasks tasks)")
    parser.add_argument("--tasks", type=int, default=20)
    parser.add_argument("--workers", type=int, help="WEB_CONCURRENCY for both apps (default: gunicorn.conf.py)")
    parser.add_argument("--threads", type=int, help="GUNICORN_THREADS for both apps")
    parser.add_argument("--pool-size", type=int, help="DB_POOL_SIZE for the service")
    parser.add_argument(
        "--sweep-configs",
        default="sync:2x1,sync:3x1,sync:4x1,gthread:2x2,gthread:2x4,"
        "gthread:2x8,gthread:3x2,gthread:3x4,gthread:3x8,gthread:4x4,gthread:5x4",
    )
    parser.add_argument("--sweep-scenarios", default="mix@32,mix@128")
    parser.add_argument("--sweep-duration", type=float, default=4)
    parser.add_argument("--sweep-rounds", type=int, default=3)
    parser.add_argument("--sweep-proxy", action="store_true", help="sweep with the service behind the delay proxy")
    parser.add_argument(
        "--service-dir",
        type=Path,
        default=ROOT,
        help="where app.py and gunicorn.conf.py are (to measure a patched copy)",
    )
    parser.add_argument("--json", type=Path, help="results file (default bench/results/latest.json or sweep.json)")
    args = parser.parse_args(argv)
    defaults = {  # (quick, full)
        "duration": (2, 10),
        "rounds": (1, 2),
        "check_duration": (1, 5),
        "count_requests": (200, 1000),
        "proxy_duration": (1, 6),
        "proxy_rounds": (1, 2),
        "memory_requests": (10_000, 100_000),
        "scale_rows": (100_000, 1_000_000),
        "scale_users": (1_000, 10_000),
        "scale_duration": (1, 4),
        "scale_rounds": (1, 2),
        "limit_lists": (3, 5),
    }
    for name, (short, full) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, short if args.quick else full)
    if args.quick and args.sweep:
        args.sweep_duration, args.sweep_rounds = 2, 1
    args.phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    check_scenarios = args.check_scenarios or ("mix" if args.quick else ",".join(SCENARIOS))
    args.check_scenarios = [c.strip() for c in check_scenarios.split(",")]
    if args.quick and args.proxy_connections == "1,8":
        args.proxy_connections = "8"
    args.check_connections = [int(c) for c in str(args.check_connections).split(",") if c.strip()]
    args.proxy_connections = [int(c) for c in str(args.proxy_connections).split(",") if c.strip()]
    args.sweep_configs = [c.strip() for c in args.sweep_configs.split(",") if c.strip()]
    for spec in args.sweep_configs:
        parse_config(spec)
    args.sweep_scenarios = [s.strip() for s in args.sweep_scenarios.split(",") if s.strip()]
    return args


def main(argv: list[str]) -> int:
    """Run the benchmark or the sweep, print the report, write the results file; the exit status."""
    args = parse_args(argv)
    bench = Bench(args)
    if args.workers:
        bench.app_env["WEB_CONCURRENCY"] = str(args.workers)
    if args.threads:
        bench.app_env["GUNICORN_THREADS"] = str(args.threads)
    if args.pool_size:
        bench.app_env["DB_POOL_SIZE"] = str(args.pool_size)

    def terminate(signum: int, _frame: FrameType | None) -> None:
        """SIGTERM and SIGHUP stop the run as Ctrl-C does: through the cleanup."""
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGHUP, terminate)
    RESULTS.mkdir(exist_ok=True)
    try:
        results = bench.sweep() if args.sweep else bench.run()
    except KeyboardInterrupt:
        log("interrupted: cleaning up")
        return 130
    finally:
        bench.cleanup()
    path = args.json or RESULTS / ("sweep.json" if args.sweep else "latest.json")
    if args.sweep:
        text = sweep_report(results)
    else:
        text, targets = report(results)
        results["targets"] = targets
    results["report"] = text
    path.write_text(json.dumps(results, indent=2, default=str))
    print(text)
    log(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
