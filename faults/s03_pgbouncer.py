"""Scenario 3, transaction pooling (Neon's pooled endpoint is PgBouncer in transaction mode): Debian's
pgbouncer, started here with its own config on a loopback port (wildcard database line, trust auth,
pool_mode = transaction), then (a) the whole unit-test suite with TEST_DATABASE_URL pointing at it and
(b) a mixed load run of the service through it. Required: all tests pass, zero errors.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter

from harness import PYTHON, ROOT, PgBouncer, Scenario, Service, TempDatabase, log_errors, run_scenario
from load import MixedLoad, database_matches

LOAD_SECONDS = 20
CLIENTS = 16
USERS = [f"pool-user-{i}" for i in range(8)]
SUITE_TIMEOUT = 300


def run_suite(scenario: Scenario, port: int) -> tuple[str, bool]:
    env = dict(os.environ)
    for name in ("DATABASE_URL", "BETTER_AUTH_SECRET"):
        env.pop(name, None)
    env["TEST_DATABASE_URL"] = f"postgresql://postgres@127.0.0.1:{port}/postgres"
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    log_path = scenario.log_dir / "unit-tests.log"
    with open(log_path, "wb") as log:
        try:
            completed = subprocess.run(
                [PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider"],  # the whole suite (pyproject's testpaths)
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                timeout=SUITE_TIMEOUT,
            )
            code = completed.returncode
        except subprocess.TimeoutExpired:
            code = -1
    text = log_path.read_text(errors="replace")
    summary = next(
        (line.strip("= ") for line in reversed(text.splitlines()) if re.search(r"\d+ (passed|failed|error)", line)),
        f"no summary (exit {code})",
    )
    ok = code == 0
    scenario.check(ok, f"unit tests through PgBouncer: {summary} (exit {code}; see {log_path})")
    return summary, ok


def body(scenario: Scenario) -> None:
    bouncer = PgBouncer(scenario, pool_size=10)
    summary, _ = run_suite(scenario, bouncer.port)
    scenario.numbers["unit_tests"] = summary.replace(" ", "_")

    database = TempDatabase(scenario)
    service = Service(scenario, database.url(port=bouncer.port), workers=2, threads=4)
    service.wait_workers_ready(bouncer.port)
    load = MixedLoad(service.port, USERS, CLIENTS, duration=LOAD_SECONDS, timeout=20).start()
    scenario.check(load.join(extra=30), "load clients did not finish")
    records = load.result.records
    statuses = Counter(r.status for r in records)
    errors = [r for r in records if r.status == 0 or r.status >= 500 or not r.json_ok]
    scenario.check(not errors, f"{len(errors)} errors in the load run: {Counter(r.status for r in errors)}")
    leaks = [r for r in records if r.leak]
    scenario.check(not leaks, f"{len(leaks)} isolation failures, e.g. {leaks[0].leak if leaks else ''}")
    problems = database_matches(database, load.result, USERS)
    for problem in problems:
        scenario.check(False, f"database after the load: {problem}")
    lines = log_errors(service.text())
    scenario.check(not lines, f"{len(lines)} error lines in the service log, first: {lines[0][:200] if lines else ''}")
    scenario.numbers.update(
        {
            "load_requests": len(records),
            "load_errors": len(errors),
            "status": dict(sorted(statuses.items())),
            "db_mismatches": len(problems),
        }
    )


if __name__ == "__main__":
    sys.exit(run_scenario(3, "pgbouncer-transaction-pool", 420, body))
