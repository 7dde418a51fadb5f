"""Scenario 7, scale-out: two service instances behind nginx (Debian's, round robin, its own config on a
loopback port; nginx's default retry policy: an idempotent request may be passed to the other instance,
a POST or PATCH that was already sent never is) on one database. Mid-load, one instance (master and
workers) is killed with SIGKILL. Every create carries an Idempotency-Key and is retried with it after
an error, as a careful frontend does. Required: the surviving instance keeps serving; no created task is
lost or duplicated; no phantom create (a create whose every attempt answered an error, though one of
them was committed by the killed instance: its retry must have answered the stored task instead).
Reported: the client errors during the kill, the retried creates, and those answered as replays.

First, deterministically: a create whose client connection is cut at once (the answer has nowhere to go,
as when a phone loses its network), retried with its key once the row is stored, answers that task.
"""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
import uuid
from collections import Counter

from harness import Client, Nginx, Scenario, Service, TempDatabase, log_errors, run_scenario, token
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
    cut_create_retried(scenario, database, first.port)
    balancer = Nginx(scenario, [first.port, second.port])
    load = MixedLoad(
        balancer.port, USERS, CLIENTS, duration=DURATION, mix=MIX, timeout=25, idempotent_creates=True
    ).start()
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
    problems = database_matches(database, load.result, USERS)
    for problem in problems:
        scenario.check(False, f"database: {problem}")
    titles = {title for (title,) in database.query("SELECT title FROM tasks")}
    failed_titles = set().union(*load.result.failed_titles.values()) if load.result.failed_titles else set()
    phantoms = len(failed_titles & titles)
    scenario.check(phantoms == 0, f"{phantoms} phantom creates, though every create was retried with its key")
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
            "retried_creates": load.result.create_retries,
            "replayed_creates": load.result.replayed,
            "balancer_retries": dict(retried),
            "after_kill_requests": len(later),
            "after_kill_errors": len(later_bad),
            "lost_or_duplicated": len(problems),
            "status": dict(sorted(statuses.items())),
        }
    )


def cut_create_retried(scenario: Scenario, database: TempDatabase, port: int) -> None:
    """A create sent whole on a connection closed at once, then retried with its key: the stored task."""
    user, key, title = "cut-user", str(uuid.uuid4()), f"cut-{uuid.uuid4().hex[:8]}"
    body = json.dumps({"title": title}).encode()
    request = (
        f"POST /api/{user}/tasks HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {token(user)}\r\n"
        f"Idempotency-Key: {key}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    with socket.create_connection(("127.0.0.1", port), timeout=5) as connection:
        connection.sendall(request)  # and closed before any answer is read
    stored: list[tuple[int]] = []
    for _ in range(50):
        stored = database.query("SELECT id FROM tasks WHERE title = %s", (title,))
        if stored:
            break
        time.sleep(0.1)
    scenario.check(len(stored) == 1, f"the cut create left {len(stored)} rows (expected 1: the server finished it)")
    reply = Client(port).request(
        "POST", f"/api/{user}/tasks", token=token(user), json_body={"title": title}, headers={"Idempotency-Key": key}
    )
    answered = reply.json().get("id") if reply.status == 201 else None
    scenario.check(
        reply.status == 201 and reply.headers.get("idempotent-replayed") == "true" and [(answered,)] == stored,
        f"the retry of the cut create answered {reply.status} {reply.body[:200]!r}, not the stored task {stored}",
    )
    count = database.query("SELECT count(*) FROM tasks WHERE title = %s", (title,))[0][0]
    scenario.check(count == 1, f"the retry of the cut create left {count} rows")
    scenario.numbers["cut_create_retry"] = "replayed" if reply.headers.get("idempotent-replayed") else reply.status


if __name__ == "__main__":
    sys.exit(run_scenario(7, "scale-out", 120, body))
