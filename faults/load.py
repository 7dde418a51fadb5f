"""A bounded mixed load of API clients that records every request, and the checks made on it."""

from __future__ import annotations

import random
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from harness import Client, Reply, TempDatabase, token

# The statuses the API documents; anything else (or 0: no response) is an error.
DOCUMENTED = {200, 201, 204, 400, 401, 403, 404, 405, 413, 415, 422, 431, 503}

# What each operation of a healthy run must answer (own tasks only; foreign probes are refused).
EXPECTED_STATUS = {
    "create": 201,
    "toggle": 200,
    "toggle_set": 200,
    "list": 200,
    "list_paged": 200,
    "get": 200,
    "update": 200,
    "delete": 204,
    "foreign_get": 404,
    "foreign_user": 403,
}

# Answers a keyed create is sent again after (none at all, or the gateway's or service's "try again").
RETRYABLE = {0, 502, 503, 504}
CREATE_RETRIES = 5

DEFAULT_MIX = {
    "create": 30,
    "toggle": 15,
    "toggle_set": 5,
    "list": 20,
    "list_paged": 5,
    "get": 10,
    "update": 5,
    "delete": 5,
    "foreign_get": 3,
    "foreign_user": 2,
}


@dataclass
class Record:
    op: str
    user: str
    method: str
    path: str
    status: int
    started: float
    elapsed: float
    json_ok: bool
    error: str | None = None
    title: str | None = None
    task_id: int | None = None
    leak: str | None = None  # set when the body carried another user's task
    body: bytes = b""


@dataclass
class LoadResult:
    records: list[Record] = field(default_factory=list)
    created: dict[str, dict[int, str]] = field(default_factory=lambda: defaultdict(dict))  # user -> id -> title
    deleted: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))
    failed_titles: dict[str, set[str]] = field(default_factory=lambda: defaultdict(set))  # creates without a 201
    uncertain: dict[str, set[int]] = field(default_factory=lambda: defaultdict(set))  # deletes without an answer
    create_retries: int = 0  # keyed creates sent again after an error (idempotent_creates)
    replayed: int = 0  # of those, the ones answered with the task an earlier attempt had stored

    def statuses(self) -> Counter[int]:
        return Counter(record.status for record in self.records)


class MixedLoad:
    """clients threads, each one user (users[i % len(users)]), each with its own keep-alive connection.

    Bounded: stops at duration seconds, or max_requests per client, or when stop() is called. With
    idempotent_creates, each create carries an Idempotency-Key and is retried with it after an answer
    that retrying can fix (none, 502, 503, 504), as a careful frontend does: each attempt is a record.
    """

    def __init__(
        self,
        port: int,
        users: list[str],
        clients: int,
        *,
        duration: float,
        mix: dict[str, int] | None = None,
        max_requests_per_client: int = 100_000,
        timeout: float = 20,
        think: float = 0.0,
        keep_bodies: bool = False,
        seed: int = 1,
        idempotent_creates: bool = False,
    ) -> None:
        self.idempotent_creates = idempotent_creates
        self.port = port
        self.users = users
        self.clients = clients
        self.duration = duration
        self.mix = mix or DEFAULT_MIX
        self.max_requests = max_requests_per_client
        self.timeout = timeout
        self.think = think
        self.keep_bodies = keep_bodies
        self.seed = seed
        self.result = LoadResult()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        # Tasks that belong to someone: used for cross-user probes (a read of another's task id).
        self._all_tasks: dict[int, str] = {}

    def start(self) -> MixedLoad:
        self.started = time.monotonic()
        for index in range(self.clients):
            thread = threading.Thread(target=self._run, args=(index,), daemon=True, name=f"load-{index}")
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        self._stop.set()

    def join(self, extra: float = 30) -> bool:
        deadline = self.started + self.duration + extra
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._stop.set()
        return not any(thread.is_alive() for thread in self._threads)

    def _run(self, index: int) -> None:
        rng = random.Random(self.seed * 100_003 + index)
        user = self.users[index % len(self.users)]
        bearer = token(user, lifetime=3600 * 4)
        client = Client(self.port, timeout=self.timeout)
        own: list[int] = []
        ops = list(self.mix)
        weights = [self.mix[op] for op in ops]
        end = self.started + self.duration
        sequence = 0
        try:
            while not self._stop.is_set() and time.monotonic() < end and sequence < self.max_requests:
                sequence += 1
                op = rng.choices(ops, weights)[0]
                if op in ("toggle", "toggle_set", "get", "update", "delete") and not own:
                    op = "create"
                if op == "foreign_get" and not self._all_tasks:
                    op = "list"
                self._one(client, rng, index, user, bearer, own, op, sequence)
                if self.think:
                    time.sleep(self.think)
        finally:
            client.close()

    def _one(
        self,
        client: Client,
        rng: random.Random,
        index: int,
        user: str,
        bearer: str,
        own: list[int],
        op: str,
        sequence: int,
    ) -> None:
        base = f"/api/{user}/tasks"
        title = None
        task_id = None
        if op == "create":
            title = f"t-{user}-{index}-{sequence}-{uuid.uuid4().hex[:8]}"
            body: dict[str, Any] = {"title": title}
            if rng.random() < 0.3:
                body["description"] = "d" * rng.randint(0, 300)
            method, path, payload = "POST", base, body
        elif op == "toggle":
            task_id = rng.choice(own)
            method, path, payload = "PATCH", f"{base}/{task_id}/complete", None
        elif op == "toggle_set":
            task_id = rng.choice(own)
            method, path, payload = "PATCH", f"{base}/{task_id}/complete", {"completed": rng.random() < 0.5}
        elif op == "list":
            query = rng.choice(["", "?status=pending", "?status=completed", "?sort=title", "?sort=updated&order=asc"])
            method, path, payload = "GET", base + query, None
        elif op == "list_paged":
            method, path, payload = "GET", f"{base}?limit={rng.randint(1, 20)}&offset={rng.randint(0, 30)}", None
        elif op == "get":
            task_id = rng.choice(own)
            method, path, payload = "GET", f"{base}/{task_id}", None
        elif op == "update":
            task_id = rng.choice(own)
            method = rng.choice(["PUT", "PATCH"])
            path, payload = f"{base}/{task_id}", {"title": f"u-{user}-{uuid.uuid4().hex[:8]}"}
        elif op == "delete":
            task_id = own.pop(rng.randrange(len(own)))
            method, path, payload = "DELETE", f"{base}/{task_id}", None
        elif op == "foreign_get":
            with self._lock:
                others = [item for item in list(self._all_tasks.items())[-500:] if item[1] != user]
            if others:
                task_id, _owner = rng.choice(others)
                method = rng.choice(["GET", "GET", "PATCH", "DELETE"])
                # Another user's task through this user's own URL: must answer 404 and change nothing.
                path, payload = f"{base}/{task_id}" + ("/complete" if method == "PATCH" else ""), None
            else:
                op, method, path, payload = "list", "GET", base, None
        else:  # foreign_user: another user's URL with this user's token
            other = rng.choice([u for u in self.users if u != user] or ["nobody"])
            if rng.random() < 0.5:
                method, path, payload = "GET", f"/api/{other}/tasks", None
            else:  # a write into another user's list: 403, and the database check finds no such task
                method, path, payload = "POST", f"/api/{other}/tasks", {"title": f"intruder-{user}"}
        headers = {"Idempotency-Key": str(uuid.uuid4())} if op == "create" and self.idempotent_creates else {}
        reply = client.request(method, path, token=bearer, json_body=payload, headers=headers)
        for attempt in range(1, CREATE_RETRIES + 1 if headers else 1):
            if reply.status not in RETRYABLE:
                break
            self._record(op, user, method, path, reply, title, task_id)
            time.sleep(0.2 * attempt)
            reply = client.request(method, path, token=bearer, json_body=payload, headers=headers)
            with self._lock:
                self.result.create_retries += 1
                self.result.replayed += reply.headers.get("idempotent-replayed") == "true"
        self._record(op, user, method, path, reply, title, task_id, own)

    def _record(
        self,
        op: str,
        user: str,
        method: str,
        path: str,
        reply: Reply,
        title: str | None,
        task_id: int | None,
        own: list[int] | None = None,
    ) -> None:
        """Keep one request's record; own (the client's tasks) is None for an attempt that will be retried."""
        record = Record(
            op,
            user,
            method,
            path,
            reply.status,
            reply.started,
            reply.elapsed,
            reply.is_json(),
            reply.error,
            title,
            task_id,
            body=reply.body if self.keep_bodies else b"",
        )
        record.leak = _foreign_tasks(reply, user)
        if op == "foreign_get" and reply.status != 404 and reply.status != 503 and reply.status != 0:
            record.leak = (record.leak or "") + f" foreign task read answered {reply.status}"
        if op == "foreign_user" and reply.status not in (403, 0):
            record.leak = (record.leak or "") + f" other user's list answered {reply.status}"
        if op == "create" and own is not None:  # own is None for an attempt sent again: the last one counts
            if reply.status == 201:
                created = reply.json()
                record.task_id = created["id"]
                own.append(created["id"])
                with self._lock:
                    self.result.created[user][created["id"]] = title  # type: ignore[assignment]
                    self._all_tasks[created["id"]] = user
            else:
                with self._lock:
                    self.result.failed_titles[user].add(title)  # type: ignore[arg-type]
        elif op == "delete":
            if reply.status == 204:
                with self._lock:
                    self.result.deleted[user].add(task_id)  # type: ignore[arg-type]
            else:
                with self._lock:  # no answer (or a retried delete's 404): it may or may not have happened
                    self.result.uncertain[user].add(task_id)  # type: ignore[arg-type]
        with self._lock:
            self.result.records.append(record)


def _foreign_tasks(reply: Reply, user: str) -> str | None:
    """Which task objects in the body belong to someone else (the isolation check)."""
    if not reply.body or not reply.content_type.startswith("application/json"):
        return None
    try:
        data = reply.json()
    except ValueError:
        return None
    items = data if isinstance(data, list) else [data]
    foreign = [item for item in items if isinstance(item, dict) and "user_id" in item and item["user_id"] != user]
    if foreign:
        return f"response to {user} carried tasks of {sorted({item['user_id'] for item in foreign})}"
    return None


def database_matches(
    database: TempDatabase, result: LoadResult, users: list[str], *, allow_phantoms: bool = False
) -> list[str]:
    """Every user's tasks in the database are exactly those created (201) and not deleted (204);
    no create that did not answer 201 left a row."""
    problems: list[str] = []
    rows = database.query("SELECT id, user_id, title FROM tasks WHERE user_id = ANY(%s)", (list(users),))
    by_user: dict[str, dict[int, str]] = defaultdict(dict)
    titles = Counter(title for _, _, title in rows)
    for task_id, user_id, title in rows:
        by_user[user_id][task_id] = title
    for user in set(users) | set(by_user):
        expected = {
            task_id for task_id in result.created.get(user, {}) if task_id not in result.deleted.get(user, set())
        }
        actual = set(by_user.get(user, {}))
        missing = expected - actual - result.uncertain.get(user, set())
        extra = actual - expected
        if missing:
            problems.append(f"{user}: {len(missing)} acknowledged tasks missing, e.g. {sorted(missing)[:5]}")
        if allow_phantoms:
            failed_here = result.failed_titles.get(user, set())
            extra = {task_id for task_id in extra if by_user[user][task_id] not in failed_here}
        if extra:
            sample = sorted(extra)[:5]
            problems.append(
                f"{user}: {len(extra)} tasks never acknowledged, e.g. {[(i, by_user[user][i]) for i in sample]}"
            )
    failed = set().union(*result.failed_titles.values()) if result.failed_titles else set()
    leftover = failed & set(titles)
    if leftover and not allow_phantoms:
        problems.append(f"{len(leftover)} creates that answered an error left a row, e.g. {sorted(leftover)[:3]}")
    duplicated = [title for title, count in titles.items() if count > 1 and title.startswith("t-")]
    if duplicated:
        problems.append(f"{len(duplicated)} titles stored more than once, e.g. {duplicated[:3]}")
    return problems
