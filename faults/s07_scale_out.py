"""Scenario 7, scale-out: two service instances behind nginx (Debian's, round robin, its own config on a
loopback port; nginx's default retry policy: an idempotent request may be passed to the other instance,
a POST or PATCH that was already sent never is) on one database. Mid-load, one instance (master and
workers) is killed with SIGKILL. Required: the surviving instance keeps serving; no created task is lost
or duplicated. Reported: the client errors during the kill, and the creates that answered an error but
had been committed by the killed instance before it died (phantoms: allowed, counted).
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter

from harness import Nginx, Scenario, Service, TempDatabase, log_errors, run_scenario
from load import EXPECTED_STATUS, MixedLoad, database_matches

DURATION = 22
KILL_AT = 8
CLIENTS = 16
USERS = [f"lb-user-{i}" for i in range(16)]
MIX = {"create": 40, "toggle_set": 10, "list": 20, "get": 10, "update": 8, "delete": 7, "foreign_user": 5}


def body(scenario: Scenario) -> None:
    database = TempDatabase(scenario)
    first = Service(scenario, database.url(), name="instance-a", workers=2, threads=4)
    second = Service(scenario, database.url(), name="instance-b", workers=2, threads=4)
    balancer = Nginx(scenario, [first.port, second.port])
    load = MixedLoad(balancer.port, USERS, CLIENTS, duration=DURATION, mix=MIX, timeout=25).start()
    time.sleep(KILL_AT)
    killed_at = time.monotonic()
    second.process.signal_group(signal.SIGKILL)
    scenario.log("instance-b killed")
    scenario.check(load.join(extra=30), "load clients did not finish")
    records = load.result.records
    statuses = Counter(r.status for r in records)
    bad = [r for r in records if r.status != EXPECTED_STATUS[r.op]]
    around = [r for r in bad if killed_at - 1 <= r.started + r.elapsed <= killed_at + 3]
    later = [r for r in records if r.started > killed_at + 3]
    later_bad = [r for r in later if r.status != EXPECTED_STATUS[r.op]]
    scenario.check(
        bool(later) and not later_bad,
        f"after the kill the survivor did not serve cleanly: "
        f"{len(later_bad)} of {len(later)} requests failed: {Counter((r.op, r.status) for r in later_bad)}",
    )
    scenario.check(
        len(bad) == len(around),
        f"{len(bad) - len(around)} client errors away from the kill: "
        f"{Counter((r.op, r.status) for r in bad if r not in around)}",
    )
    scenario.check(first.process.alive(), "the surviving instance died")
    problems = database_matches(database, load.result, USERS, allow_phantoms=True)
    for problem in problems:
        scenario.check(False, f"database: {problem}")
    titles = {title for (title,) in database.query("SELECT title FROM tasks")}
    failed_titles = set().union(*load.result.failed_titles.values()) if load.result.failed_titles else set()
    phantoms = len(failed_titles & titles)
    lines = log_errors(first.text())
    scenario.check(
        not lines, f"{len(lines)} error lines in the survivor's log, first: {lines[0][:200] if lines else ''}"
    )
    created = sum(len(ids) for ids in load.result.created.values())
    retried = Counter(line.split(" ", 1)[0] for line in balancer.retried())
    by_method = Counter(r.method for r in around)
    scenario.numbers.update(
        {
            "requests": len(records),
            "created": created,
            "kill_client_errors": len(around),
            "kill_errors_by_method": dict(by_method),
            "kill_error_statuses": dict(Counter(r.status for r in around)),
            "phantom_creates": phantoms,
            "balancer_retries": dict(retried),
            "after_kill_requests": len(later),
            "after_kill_errors": len(later_bad),
            "lost_or_duplicated": len(problems),
            "status": dict(sorted(statuses.items())),
        }
    )


if __name__ == "__main__":
    sys.exit(run_scenario(7, "scale-out", 120, body))
