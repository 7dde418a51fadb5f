"""Scenario 5, load and isolation under load: 60 s of mixed load (creates, toggles, sets, lists with
filters and pages, reads, updates, deletes, and probes of other users' tasks and URLs) from 50 users
over 64 keep-alive connections. Required: zero 5xx, zero non-JSON responses; afterwards, for every
user, the tasks in the database are exactly the ones that user created and did not delete, and no
response ever carried another user's task (every task object in every body is checked against the
requesting user).
"""

from __future__ import annotations

import sys
from collections import Counter

from harness import Scenario, Service, TempDatabase, log_errors, percentile, run_scenario
from load import EXPECTED_STATUS, MixedLoad, database_matches

DURATION = 60
USERS = [f"load-user-{i:02d}" for i in range(50)]
CONNECTIONS = 64


def body(scenario: Scenario) -> None:
    database = TempDatabase(scenario)
    # The production defaults for this machine: 2 x cores workers, 4 threads each.
    service = Service(scenario, database.url(), workers=4, threads=4, env={"DB_POOL_SIZE": "4"})
    load = MixedLoad(service.port, USERS, CONNECTIONS, duration=DURATION, timeout=30).start()
    scenario.check(load.join(extra=40), "load clients did not finish")
    records = load.result.records
    statuses = Counter(r.status for r in records)
    server_errors = [r for r in records if r.status >= 500]
    scenario.check(not server_errors, f"{len(server_errors)} 5xx: {Counter(r.status for r in server_errors)}")
    no_answer = [r for r in records if r.status == 0]
    scenario.check(
        not no_answer,
        f"{len(no_answer)} requests without an HTTP answer, e.g. {no_answer[0].error if no_answer else ''}",
    )
    not_json = [r for r in records if r.status and not r.json_ok]
    scenario.check(not not_json, f"{len(not_json)} non-JSON responses, e.g. {not_json[0].path if not_json else ''}")
    wrong = [r for r in records if r.status and r.status != EXPECTED_STATUS[r.op]]
    scenario.check(
        not wrong,
        f"{len(wrong)} answers other than expected: {Counter((r.op, r.status) for r in wrong).most_common(5)}",
    )
    leaks = [r for r in records if r.leak]
    scenario.check(
        not leaks,
        f"{len(leaks)} responses carried or exposed another user's tasks, e.g. {leaks[0].leak if leaks else ''}",
    )
    problems = database_matches(database, load.result, USERS)
    for problem in problems[:10]:
        scenario.check(False, f"database: {problem}")
    lines = log_errors(service.text())
    scenario.check(not lines, f"{len(lines)} error lines in the service log, first: {lines[0][:200] if lines else ''}")
    latencies = [r.elapsed for r in records if r.status]
    elapsed = max(r.started + r.elapsed for r in records) - min(r.started for r in records)
    scenario.numbers.update(
        {
            "users": len(USERS),
            "connections": CONNECTIONS,
            "requests": len(records),
            "rps": f"{len(records) / elapsed:.0f}",
            "p50": f"{percentile(latencies, 0.5) * 1000:.0f}ms",
            "p99": f"{percentile(latencies, 0.99) * 1000:.0f}ms",
            "5xx": len(server_errors),
            "non_json": len(not_json),
            "leaks": len(leaks),
            "db_mismatches": len(problems),
            "status": dict(sorted(statuses.items())),
        }
    )


if __name__ == "__main__":
    sys.exit(run_scenario(5, "load-isolation", 180, body))
