"""Scenario 2, idle drop (Neon closes idle connections): warm the service's connection pools, then
pg_terminate_backend every idle server connection of the service, then send requests, sequential and
concurrent. Required: zero errors surfaced to clients. Five rounds, the last after a pause longer
than DB_IDLE_CHECK_SECONDS so the checkout ping path runs too.
"""

from __future__ import annotations

import sys
import time
from collections import Counter

from harness import Client, Scenario, Service, TempDatabase, log_errors, run_scenario, run_threads, token

ROUNDS = 5
CLIENTS = 12
PER_CLIENT = 15
IDLE_CHECK = 2


def terminate_idle(database: TempDatabase) -> int:
    rows = database.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'tasks-api' AND state = 'idle'"
    )
    # Wait until the backends are gone, so that every request below meets a closed connection.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        left = database.query(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND application_name = 'tasks-api'"
        )[0][0]
        if not left:
            break
        time.sleep(0.05)
    return sum(1 for (ok,) in rows if ok)


def burst(port: int, round_number: int) -> list[tuple[str, int, bool]]:
    """CLIENTS concurrent clients, each PER_CLIENT requests: create, toggle, get, list."""

    def work(index: int) -> list[tuple[str, int, bool]]:
        user = f"idle-user-{index}"
        bearer = token(user)
        client = Client(port, timeout=20)
        results = []
        task_id = None
        for step in range(PER_CLIENT):
            if task_id is None or step % 4 == 0:
                reply = client.request(
                    "POST", f"/api/{user}/tasks", token=bearer, json_body={"title": f"r{round_number}-{step}"}
                )
                if reply.status == 201:
                    task_id = reply.json()["id"]
                results.append(("create", reply.status, reply.is_json()))
            elif step % 4 == 1:
                reply = client.request("PATCH", f"/api/{user}/tasks/{task_id}/complete", token=bearer)
                results.append(("toggle", reply.status, reply.is_json()))
            elif step % 4 == 2:
                reply = client.request("GET", f"/api/{user}/tasks/{task_id}", token=bearer)
                results.append(("get", reply.status, reply.is_json()))
            else:
                reply = client.request("GET", f"/api/{user}/tasks?limit=5", token=bearer)
                results.append(("list", reply.status, reply.is_json()))
        client.close()
        return results

    return [item for items in run_threads(CLIENTS, work, timeout=60) for item in items]


def body(scenario: Scenario) -> None:
    database = TempDatabase(scenario)
    service = Service(
        scenario,
        database.url(),
        workers=2,
        threads=4,
        env={"DB_POOL_SIZE": "5", "DB_IDLE_CHECK_SECONDS": str(IDLE_CHECK)},
    )
    burst(service.port, 0)  # warm: every worker's pool holds several connections
    terminated_total = 0
    statuses: Counter[int] = Counter()
    errors: list[str] = []
    requests = 0
    for round_number in range(1, ROUNDS + 1):
        time.sleep(IDLE_CHECK + 1 if round_number == ROUNDS else 0.5)
        terminated = terminate_idle(database)
        terminated_total += terminated
        scenario.check(terminated > 0, f"round {round_number}: no idle connection of the service to terminate")
        # First one request at a time (each worker's first checkout meets a dead connection) ...
        client = Client(service.port, timeout=20)
        for _step in range(8):
            reply = client.request("GET", "/api/idle-user-0/tasks", token=token("idle-user-0"))
            statuses[reply.status] += 1
            requests += 1
            if reply.status != 200 or not reply.is_json():
                errors.append(f"round {round_number} sequential: {reply.status} {reply.body[:100]!r}")
        client.close()
        # ... then a concurrent burst (every pooled connection of every worker was dead).
        terminate_idle(database)
        for op, status, is_json in burst(service.port, round_number):
            statuses[status] += 1
            requests += 1
            if not (200 <= status < 300 and is_json):
                errors.append(f"round {round_number} burst {op}: {status}")
    scenario.check(not errors, f"{len(errors)} errors surfaced to clients, first: {errors[:3]}")
    log_lines = log_errors(service.text())
    scenario.check(
        not log_lines,
        f"{len(log_lines)} error lines in the service log, first: {log_lines[0][:200] if log_lines else ''}",
    )
    warnings = service.text().count("database unavailable")
    scenario.numbers.update(
        {
            "rounds": ROUNDS,
            "terminated": terminated_total,
            "requests": requests,
            "errors": len(errors),
            "status": dict(sorted(statuses.items())),
            "logged_503s": warnings,
        }
    )


if __name__ == "__main__":
    sys.exit(run_scenario(2, "idle-drop", 120, body))
