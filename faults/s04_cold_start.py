"""Scenario 4, cold start: two service instances of several gunicorn workers each start at the same
moment on an empty database, directly and through PgBouncer in transaction mode (Neon's pooled
endpoint). Required: all healthy, tables created exactly once, no error in any log.

An event trigger in the fresh database records every DDL command, so "exactly once" is counted by
PostgreSQL itself.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter

import psycopg2
from harness import (
    PG_PORT,
    PG_USER,
    Client,
    PgBouncer,
    Scenario,
    ScenarioFailure,
    Service,
    TempDatabase,
    log_errors,
    run_scenario,
    token,
)

WORKERS = 3
DDL_AUDIT = """
CREATE TABLE faults_ddl (id serial PRIMARY KEY, tag text, object text, pid int DEFAULT pg_backend_pid());
CREATE FUNCTION faults_log_ddl() RETURNS event_trigger LANGUAGE plpgsql AS $$
DECLARE r record;
BEGIN
  FOR r IN SELECT * FROM pg_event_trigger_ddl_commands() LOOP
    INSERT INTO faults_ddl(tag, object) VALUES (r.command_tag, r.object_identity);
  END LOOP;
END $$;
CREATE EVENT TRIGGER faults_ddl_end ON ddl_command_end EXECUTE FUNCTION faults_log_ddl();
"""
EXPECTED_DDL = {
    ("CREATE TABLE", "public.tasks_api_alembic_version"): 1,
    ("CREATE TABLE", "public.users"): 1,
    ("ALTER TABLE", "public.tasks_api_users"): 1,  # revision 0003 renames the service's own users table
    ("CREATE TABLE", "public.tasks"): 1,
    ("CREATE INDEX", "public.ix_tasks_user_created"): 1,
    ("CREATE INDEX", "public.ix_tasks_user_updated"): 1,
    ("CREATE INDEX", "public.ix_tasks_user_title"): 1,
}


class Noise:
    """Other clients of the same pooled endpoint (Neon's pooler is shared): short queries through
    PgBouncer while the instances start, so that consecutive statements of one client may be given
    different server connections, as they are in production. Bounded: stops after 120 s at most."""

    def __init__(self, port: int, dbname: str, clients: int = 4) -> None:
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(port, dbname), daemon=True) for _ in range(clients)]
        for thread in self.threads:
            thread.start()

    def _run(self, port: int, dbname: str) -> None:
        connection = psycopg2.connect(host="127.0.0.1", port=port, user=PG_USER, dbname=dbname, connect_timeout=5)
        connection.autocommit = True
        end = time.monotonic() + 120
        with connection, connection.cursor() as cursor:
            while not self.stopping.is_set() and time.monotonic() < end:
                cursor.execute("SELECT pg_sleep(0.002)")
        connection.close()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(5)


def start_instances(
    scenario: Scenario, label: str, url: str, db_port: int, database: TempDatabase, problems: list[str]
) -> tuple[list[Service], float]:
    """Start two instances at the same moment; wait until every worker holds a database connection."""
    started = time.monotonic()
    instances = [
        Service(scenario, url, name=f"{label}-{name}", workers=WORKERS, threads=2, wait=False) for name in ("a", "b")
    ]
    for instance in instances:
        try:
            instance.wait_healthy(timeout=40)
            instance.wait_workers_ready(db_port, timeout=max(5.0, 45 - (time.monotonic() - started)))
        except ScenarioFailure as error:
            problems.append(str(error))
    ready_after = time.monotonic() - started
    time.sleep(1.0)
    blocked = database.query(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND wait_event_type = 'Lock'"
    )[0][0]
    if blocked:
        problems.append(
            f"{blocked} database session(s) of the service blocked on a lock after start-up "
            f"(a worker hung at boot waiting for the schema lock)"
        )
    # Every worker that accepts answers: readiness many times over, and a write through each instance.
    ready_statuses: Counter[int] = Counter()
    for instance in instances:
        if not instance.process.alive():
            continue
        for _ in range(30):
            client = Client(instance.port, timeout=15)
            ready_statuses[client.request("GET", "/health/ready").status] += 1
            client.close()
        reply = Client(instance.port, timeout=15).request(
            "POST", "/api/cold/tasks", token=token("cold"), json_body={"title": f"via {instance.name}"}
        )
        if reply.status != 201:
            problems.append(f"{instance.name}: create answered {reply.status} {reply.body[:120]!r}")
    if set(ready_statuses) - {200}:
        problems.append(f"readiness answers {dict(ready_statuses)}")
    return instances, ready_after


def stop_instances(instances: list[Service], problems: list[str]) -> list[str]:
    """Stop both; return their error lines. A graceful stop that needs SIGKILL means a stuck worker."""
    error_lines = []
    for instance in instances:
        began = time.monotonic()
        instance.process.stop(timeout=8)
        took = time.monotonic() - began
        if took > 7:
            problems.append(f"{instance.name}: graceful stop took {took:.0f}s (a worker was stuck)")
        text = instance.text()
        boots = text.count("Booting worker")
        if boots != WORKERS:
            problems.append(f"{instance.name}: {boots} worker boots for {WORKERS} workers (workers died or restarted)")
        error_lines += [f"{instance.name}: {line}" for line in log_errors(text)]
    return error_lines


def cold_start(scenario: Scenario, label: str, via_pgbouncer: bool) -> dict[str, object]:
    database = TempDatabase(scenario, suffix=f"_{label}")
    with database.connect() as connection, connection.cursor() as cursor:
        cursor.execute(DDL_AUDIT)
    url, db_port = database.url(), PG_PORT
    if via_pgbouncer:
        bouncer = PgBouncer(scenario, pool_size=8, name=f"pgbouncer-{label}")
        url, db_port = database.url(port=bouncer.port), bouncer.port
    problems: list[str] = []
    noise = Noise(db_port, database.name) if via_pgbouncer else None
    # Round 1: the empty database. Round 2: the same two instances started again (a redeploy).
    instances, ready_cold = start_instances(scenario, f"{label}-cold", url, db_port, database, problems)
    error_lines = stop_instances(instances, problems)
    locks = database.query(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
        "(SELECT oid FROM pg_database WHERE datname = current_database())"
    )[0][0]
    if locks:
        problems.append(f"{locks} advisory lock(s) still held after the instances stopped (leaked schema lock)")
    instances, ready_warm = start_instances(scenario, f"{label}-redeploy", url, db_port, database, problems)
    error_lines += stop_instances(instances, problems)
    if noise:
        noise.stop()
    ddl = Counter((tag, obj) for tag, obj in database.query("SELECT tag, object FROM faults_ddl"))
    for key, count in EXPECTED_DDL.items():
        if ddl.get(key, 0) != count:
            problems.append(f"{key[0]} {key[1]} ran {ddl.get(key, 0)} times")
    tables = {
        name
        for (name,) in database.query(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' AND tablename <> 'faults_ddl'"
        )
    }
    if tables != {"tasks_api_users", "tasks", "tasks_api_alembic_version"}:
        problems.append(f"tables {sorted(tables)}")
    if error_lines:
        problems.append(f"{len(error_lines)} error lines in the logs, first: {error_lines[0][:300]}")
    for problem in problems:
        scenario.check(False, f"{label}: {problem}")
    return {
        "ready": f"{ready_cold:.1f}s/{ready_warm:.1f}s",
        "ddl": sum(ddl.values()),
        "errors": len(error_lines),
        "problems": len(problems),
    }


def body(scenario: Scenario) -> None:
    direct = cold_start(scenario, "direct", via_pgbouncer=False)
    pooled = cold_start(scenario, "pgbouncer", via_pgbouncer=True)
    scenario.numbers.update(
        {
            "instances": 2,
            "workers_each": WORKERS,
            "direct_ready": direct["ready"],
            "direct_log_errors": direct["errors"],
            "direct_problems": direct["problems"],
            "pgbouncer_ready": pooled["ready"],
            "pgbouncer_log_errors": pooled["errors"],
            "pgbouncer_problems": pooled["problems"],
        }
    )


if __name__ == "__main__":
    sys.exit(run_scenario(4, "cold-start", 150, body))
