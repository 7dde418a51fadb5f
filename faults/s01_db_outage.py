"""Scenario 1, database outage: a steady mixed load (creates, toggles, lists) from 16 clients while
a TCP proxy between the service and PostgreSQL is cut for 10 s (every connection reset, new ones
refused: what a stopped or crashed server looks like), then restored; then a 10 s network partition
(the proxy moves no bytes either way but closes nothing; TCP delivers them afterwards); then the same
10 s cut behind PgBouncer in transaction mode (Neon's pooled endpoint), which keeps accepting the
service's connections and queues its queries while it cannot reach the server.

Required for the cut: during the outage every request ends within 12 s with a JSON 503 (never a
hang, a 500 or HTML); /health/ready says 503; within 5 s of the database coming back requests
succeed again, without restarting the service; afterwards every create that returned 201 is in the
database and nothing that returned an error is. For the partition: the same bounds (12 s, no 500,
JSON, recovery within 5 s, no lost or phantom create). Behind the pooler: the same, except that
/health/ready is not required to say 503 within the window (it waits in the pooler's queue too).
"""

from __future__ import annotations

import sys
import threading
import time
from collections import Counter

from harness import Client, PgBouncer, Scenario, Service, TcpProxy, TempDatabase, log_errors, run_scenario
from load import MixedLoad, Record, database_matches

CLIENTS = 16
USERS = [f"outage-user-{i}" for i in range(8)]
POOLED_USERS = [f"pooled-user-{i}" for i in range(8)]
OUTAGE = 10.0
# Behind the pooler the cut lasts longer than the 12 s bound: a service that only waits for the pooler
# (which queues statements for up to its query_wait_timeout, 120 s by default) hangs past it.
POOLED_OUTAGE = 15.0
MAX_LATENCY = 12.0
RECOVERY = 5.0
MIX = {"create": 40, "toggle": 20, "toggle_set": 10, "list": 25, "list_paged": 5}


class ReadinessProbe(threading.Thread):
    """GET /health/ready every 0.25 s (a new connection each time, as a platform's probe does)."""

    def __init__(self, port: int, duration: float, path: str = "/health/ready") -> None:
        super().__init__(daemon=True)
        self.port = port
        self.path = path
        self.end = time.monotonic() + duration
        self.samples: list[tuple[float, float, int, bool]] = []  # started, ended, status, json
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set() and time.monotonic() < self.end:
            client = Client(self.port, timeout=20)
            reply = client.request("GET", self.path)
            client.close()
            self.samples.append((reply.started, reply.started + reply.elapsed, reply.status, reply.is_json()))
            time.sleep(0.25)


def judge_window(
    scenario: Scenario,
    label: str,
    records: list[Record],
    probe: ReadinessProbe,
    down: float,
    up: float,
    *,
    require_ready_503: bool,
    until: float | None = None,
) -> dict[str, object]:
    """The checks for one outage window [down, up)."""
    during = [r for r in records if r.started >= down + 0.05 and r.started + r.elapsed < up]
    bad_during = [r for r in during if r.status != 503 or not r.json_ok]
    scenario.check(
        not bad_during,
        f"{label}: {len(bad_during)} of {len(during)} requests made and answered during "
        f"the outage were not a JSON 503: {Counter(r.status for r in bad_during)}",
    )
    # Recovery: from `up`, how long until every request started later succeeds.
    until = min(until or up + 15, up + 15)  # the next outage, if any, is not this one's recovery
    window = [r for r in records if up <= r.started < until and r.started + r.elapsed < until]
    failing = [r for r in window if not 200 <= r.status < 300]
    recovery = max((r.started - up for r in failing), default=0.0)
    scenario.check(
        recovery <= RECOVERY,
        f"{label}: requests still failed {recovery:.1f}s after the database came back (limit {RECOVERY:.0f}s)",
    )
    ready_down = [s for s in probe.samples if s[0] >= down + 0.05 and s[1] < up]
    ready_503 = sum(1 for s in ready_down if s[2] == 503 and s[3])
    if require_ready_503:
        scenario.check(
            bool(ready_down) and ready_503 == len(ready_down),
            f"{label}: /health/ready during the outage answered {Counter(s[2] for s in ready_down)}",
        )
    ready_back = [s for s in probe.samples if up + RECOVERY <= s[0] and s[1] < until]
    scenario.check(
        all(s[2] == 200 for s in ready_back),
        f"{label}: /health/ready after recovery answered {Counter(s[2] for s in ready_back)}",
    )
    started_down = [r for r in records if down <= r.started < up]
    return {
        "max": f"{max((r.elapsed for r in started_down), default=0):.2f}s",
        "during": len(during),
        "503": sum(1 for r in during if r.status == 503),
        "recover": f"{recovery:.2f}s",
        "ready503": f"{ready_503}/{len(ready_down)}",
    }


def check_records(
    scenario: Scenario,
    label: str,
    load: MixedLoad,
    database: TempDatabase,
    service: Service,
    users: list[str],
    cuts: list[float],
    partitions: list[tuple[float, float]] = (),
) -> int:
    """The checks on every request and on the database; returns the count of ambiguous creates."""
    records = load.result.records
    slow = [r for r in records if r.elapsed > MAX_LATENCY]
    scenario.check(
        not slow,
        f"{label}: {len(slow)} requests took longer than {MAX_LATENCY:.0f}s "
        f"(longest {max((r.elapsed for r in slow), default=0):.1f}s, {slow[0].method if slow else ''} "
        f"{slow[0].path if slow else ''} status {slow[0].status if slow else ''})",
    )
    no_answer = [r for r in records if r.status == 0]
    scenario.check(
        not no_answer,
        f"{label}: {len(no_answer)} requests got no HTTP answer, e.g. {no_answer[0].error if no_answer else ''}",
    )
    server_errors = [r for r in records if r.status >= 500 and r.status != 503]
    scenario.check(
        not server_errors, f"{label}: {len(server_errors)} requests answered {Counter(r.status for r in server_errors)}"
    )
    not_json = [r for r in records if r.status and not r.json_ok]
    scenario.check(not not_json, f"{label}: {len(not_json)} responses were not JSON")
    unexpected = set(r.status for r in records) - {200, 201, 503, 0}
    scenario.check(not unexpected, f"{label}: unexpected statuses {sorted(unexpected)}")
    for problem in database_matches(database, load.result, users, allow_phantoms=True):
        scenario.check(False, f"{label}: database after the outage: {problem}")
    # A create whose connection was cut after PostgreSQL committed it and before its answer came back
    # cannot be told from one that failed: no server can answer that create but with an error (see
    # README). Only such a create may have left a row: one in flight at the instant of a cut, or one
    # whose bytes a partition held (TCP delivers them when it heals, even after the service gave up).
    # A create that began after a cut and answered an error must have left none.
    stored = {title for (title,) in database.query("SELECT title FROM tasks WHERE user_id = ANY(%s)", (users,))}
    ambiguous = 0
    for record in records:
        if record.op == "create" and record.status != 201 and record.title in stored:
            ended = record.started + record.elapsed
            if any(record.started <= cut <= ended for cut in cuts) or any(
                record.started < healed and ended > down for down, healed in partitions
            ):
                ambiguous += 1
                scenario.notes.append(
                    f"{label}: create in flight at the cut answered {record.status} but was committed: {record.title}"
                )
            else:
                scenario.check(
                    False,
                    f"{label}: a create that answered {record.status} left a row, though it "
                    f"was not in flight at a cut: {record.title}",
                )
    return ambiguous
    errors = log_errors(service.text())
    scenario.check(
        not errors, f"{label}: {len(errors)} error lines in the service log, first: {errors[0][:200] if errors else ''}"
    )


def direct(scenario: Scenario, database: TempDatabase) -> None:
    """The service -> proxy -> PostgreSQL: a cut, then a partition."""
    proxy = TcpProxy(scenario)
    service = Service(scenario, database.url(port=proxy.port), workers=2, threads=4)
    service.wait_workers_ready(proxy.port)
    total = 5 + OUTAGE + 10 + OUTAGE + 10
    load = MixedLoad(service.port, USERS, CLIENTS, duration=total, mix=MIX, timeout=30, think=0.01).start()
    probe = ReadinessProbe(service.port, total)
    probe.start()
    time.sleep(5)
    cut_at = time.monotonic()
    proxy.cut()
    scenario.log("proxy cut")
    time.sleep(OUTAGE)
    proxy.restore()
    back_at = time.monotonic()
    scenario.log("proxy restored")
    time.sleep(10)
    part_at = time.monotonic()
    proxy.partition()
    scenario.log("proxy partitioned")
    time.sleep(OUTAGE)
    proxy.restore()
    healed_at = time.monotonic()
    scenario.log("partition healed")
    finished = load.join(extra=40)
    probe.stopping.set()
    probe.join(25)
    scenario.check(finished, "load clients did not finish")
    records = load.result.records
    cut = judge_window(scenario, "cut", records, probe, cut_at, back_at, require_ready_503=True, until=part_at)
    part = judge_window(scenario, "partition", records, probe, part_at, healed_at, require_ready_503=False)
    ambiguous = check_records(scenario, "direct", load, database, service, USERS, [cut_at], [(part_at, healed_at)])
    service.process.stop()
    scenario.numbers.update(
        {
            "requests": len(records),
            "created": sum(len(ids) for ids in load.result.created.values()),
            "status": dict(sorted(Counter(r.status for r in records).items())),
            "max_latency": f"{max((r.elapsed for r in records), default=0):.2f}s",
            "cut_503": f"{cut['503']}/{cut['during']}",
            "cut_ready503": cut["ready503"],
            "cut_recover": cut["recover"],
            "partition_max_latency": part["max"],
            "partition_recover": part["recover"],
            "ambiguous_creates": ambiguous,
        }
    )


def pooled(scenario: Scenario, database: TempDatabase) -> None:
    """The service -> PgBouncer (transaction pooling, Neon's pooled endpoint) -> proxy -> PostgreSQL: a cut
    behind the pooler, which keeps accepting the service's connections and queues its queries."""
    proxy = TcpProxy(scenario)
    bouncer = PgBouncer(scenario, pool_size=8, target_port=proxy.port)
    service = Service(scenario, database.url(port=bouncer.port), name="service-pooled", workers=2, threads=4)
    service.wait_workers_ready(bouncer.port)
    total = 5 + POOLED_OUTAGE + 10
    load = MixedLoad(
        service.port, POOLED_USERS, CLIENTS, duration=total, mix=MIX, timeout=40, think=0.01, seed=2
    ).start()
    probe = ReadinessProbe(service.port, total)
    probe.start()
    liveness = ReadinessProbe(service.port, total, path="/health")
    liveness.start()
    time.sleep(5)
    cut_at = time.monotonic()
    proxy.cut()
    scenario.log("proxy behind pgbouncer cut")
    time.sleep(POOLED_OUTAGE)
    proxy.restore()
    back_at = time.monotonic()
    scenario.log("proxy behind pgbouncer restored")
    finished = load.join(extra=50)
    probe.stopping.set()
    liveness.stopping.set()
    probe.join(45)
    liveness.join(45)
    scenario.check(finished, "pooled: load clients did not finish")
    # Liveness needs no database, and a platform restarts a service whose liveness probe times out:
    # like every request, it must end within the bound, however many workers wait on the database.
    slow_live = [sample for sample in liveness.samples if sample[2] != 200 or sample[1] - sample[0] > MAX_LATENCY]
    scenario.check(
        not slow_live,
        f"pooled: /health (no database) was slow or failing during the outage: "
        f"{len(slow_live)} of {len(liveness.samples)} probes, slowest "
        f"{max((s[1] - s[0] for s in liveness.samples), default=0):.1f}s",
    )
    records = load.result.records
    cut = judge_window(scenario, "pooled cut", records, probe, cut_at, back_at, require_ready_503=False)
    ambiguous = check_records(scenario, "pooled", load, database, service, POOLED_USERS, [cut_at])
    started_down = [r for r in records if cut_at <= r.started < back_at]
    scenario.numbers.update(
        {
            "pooled_requests": len(records),
            "pooled_max_latency": f"{max((r.elapsed for r in records), default=0):.2f}s",
            "pooled_503": f"{sum(1 for r in started_down if r.status == 503)}/{len(started_down)}",
            "pooled_recover": cut["recover"],
            "pooled_health_max": f"{max((s[1] - s[0] for s in liveness.samples), default=0):.2f}s",
            "pooled_ambiguous_creates": ambiguous,
        }
    )


def body(scenario: Scenario) -> None:
    database = TempDatabase(scenario)
    direct(scenario, database)
    pooled(scenario, database)


if __name__ == "__main__":
    sys.exit(run_scenario(1, "db-outage", 170, body))
