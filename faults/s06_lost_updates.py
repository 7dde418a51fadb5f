"""Scenario 6, lost updates: 100 concurrent toggles without a body on one task must leave `completed`
equal to the parity of the count (each toggle answered with a distinct state: 50 true, 50 false), and
99 more must flip it once more; 100 concurrent PUTs of distinct titles must leave one of them, whose
updated_at is at least the newest response's (the last writer wins, and says so).
"""

from __future__ import annotations

import sys
from collections import Counter
from datetime import datetime

from harness import Client, Scenario, Service, TempDatabase, log_errors, run_scenario, run_threads, token

USER = "race-user"


def parse(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def body(scenario: Scenario) -> None:
    database = TempDatabase(scenario)
    service = Service(scenario, database.url(), workers=2, threads=8, env={"DB_POOL_SIZE": "8"})
    bearer = token(USER)
    base = f"/api/{USER}/tasks"
    created = Client(service.port).request("POST", base, token=bearer, json_body={"title": "race"})
    scenario.check(created.status == 201, f"create answered {created.status}")
    task_id = created.json()["id"]
    path = f"{base}/{task_id}"

    def toggle(_index: int) -> tuple[int, bool | None]:
        reply = Client(service.port, timeout=30).request("PATCH", f"{path}/complete", token=bearer)
        return reply.status, reply.json().get("completed") if reply.status == 200 else None

    expected = False
    toggles = 0
    for count in (100, 99):
        results = run_threads(count, toggle, timeout=60)
        toggles += count
        statuses = Counter(status for status, _ in results)
        scenario.check(statuses == Counter({200: count}), f"{count} toggles answered {dict(statuses)}")
        states = Counter(state for _, state in results)
        expected = expected ^ (count % 2 == 1)
        stored = database.query("SELECT completed FROM tasks WHERE id = %s", (task_id,))[0][0]
        scenario.check(
            stored == expected, f"after {count} concurrent toggles completed is {stored}, parity says {expected}"
        )
        # Each toggle saw its own state: the answers alternate, so they split evenly (odd: one more of the last).
        scenario.check(
            abs(states[True] - states[False]) <= 1,
            f"{count} toggle answers: {dict(states)} (two toggles answered the same step)",
        )

    titles = [f"title-{index:03d}" for index in range(100)]

    def put(index: int) -> tuple[int, str | None, str | None]:
        reply = Client(service.port, timeout=30).request("PUT", path, token=bearer, json_body={"title": titles[index]})
        if reply.status != 200:
            return reply.status, None, None
        data = reply.json()
        return reply.status, data["title"], data["updated_at"]

    results = run_threads(100, put, timeout=60)
    statuses = Counter(status for status, _, _ in results)
    scenario.check(statuses == Counter({200: 100}), f"100 PUTs answered {dict(statuses)}")
    answered = [(parse(stamp), title) for status, title, stamp in results if status == 200]
    stored_title, stored_at = database.query("SELECT title, updated_at FROM tasks WHERE id = %s", (task_id,))[0]
    newest_at, newest_title = max(answered)
    scenario.check(stored_title in titles, f"stored title {stored_title!r} was never sent")
    scenario.check(stored_at >= newest_at, f"stored updated_at {stored_at} is older than a response's {newest_at}")
    winners = {title for stamp, title in answered if stamp == newest_at}
    scenario.check(
        stored_title in winners,
        f"stored title {stored_title!r} is not the newest response's "
        f"{sorted(winners)} (an older write landed last but answered an earlier time)",
    )
    distinct_stamps = len({stamp for stamp, _ in answered})
    scenario.check(
        distinct_stamps == len(answered),
        f"{len(answered) - distinct_stamps} PUT answers share an updated_at with another",
    )
    lines = log_errors(service.text())
    scenario.check(not lines, f"{len(lines)} error lines in the service log")
    scenario.numbers.update(
        {
            "toggles": toggles,
            "completed": stored,
            "puts": 100,
            "final_title": stored_title,
            "distinct_updated_at": distinct_stamps,
            "errors": sum(1 for s, _, _ in results if s != 200),
        }
    )


if __name__ == "__main__":
    sys.exit(run_scenario(6, "lost-updates", 120, body))
