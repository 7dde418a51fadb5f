"""The database machinery: outages and configuration mistakes told apart, timeouts, the pool and its
hooks, fork safety, schema creation, the users table, concurrency and one statement per request."""

from __future__ import annotations

import logging
import os
import resource
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import event, inspect, text
from sqlalchemy.engine import make_url

from app import STREAMED_LIST_FROM
from errors import MISCONFIGURED, ConfigError
from tests.common import (
    ALICE,
    ON_POSTGRES,
    FakePostgres,
    auth_headers,
    in_threads,
    make_app,
    parse_time,
    postgres_only,
    run_sql,
)
from tests.harness import admin_connection


def test_ready_when_database_answers(client: Any) -> None:
    response = client.get("/health/ready")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


@postgres_only
def test_concurrent_creates_overshoot_the_limit_by_at_most_their_number(database_url: str) -> None:
    application = make_app(database_url, MAX_TASKS_PER_USER=5)
    url = f"/api/{ALICE}/tasks"
    statuses = in_threads(
        8,
        lambda _: [
            application.test_client().post(url, json={"title": "t"}, headers=auth_headers()).status_code
            for _ in range(3)
        ],
    )
    assert {status for batch in statuses for status in batch} <= {201, 409}
    stored = run_sql(application, "SELECT count(*) FROM tasks")[0][0]
    assert 5 <= stored <= 5 + 8 and stored == sum(batch.count(201) for batch in statuses)
    application.extensions["db"].engine.dispose()


def test_database_down_is_503_json(tmp_path: Any) -> None:
    # Nothing listens on port 1: connections are refused at once.
    application = make_app("postgresql://postgres@127.0.0.1:1/none", DB_CONNECT_TIMEOUT=2)
    client = application.test_client()
    started = time.monotonic()
    response = client.get(f"/api/{ALICE}/tasks", headers=auth_headers())
    assert response.status_code == 503 and response.headers["Retry-After"]
    # A sentence for people, and nothing of the driver's (host, port, "connection refused").
    assert response.get_json() == {"detail": "The database is unavailable right now; please try again shortly."}
    assert client.post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers()).status_code == 503
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.get_json()["detail"]
    assert client.get("/health").status_code == 200
    # Still 401 first, even with the database down.
    assert client.get(f"/api/{ALICE}/tasks").status_code == 401
    assert time.monotonic() - started < 10


def test_database_that_does_not_answer_times_out_as_503() -> None:
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(1)  # accepts TCP, never speaks: the connect timeout must end the wait
    port = silent.getsockname()[1]
    try:
        application = make_app(f"postgresql://postgres@127.0.0.1:{port}/none", DB_CONNECT_TIMEOUT=2, DB_QUERY_TIMEOUT=8)
        started = time.monotonic()
        response = application.test_client().get(f"/api/{ALICE}/tasks", headers=auth_headers())
        assert response.status_code == 503
        # DB_CONNECT_TIMEOUT bounds the connection's setup (libpq leaves it to the wait callback).
        assert 1.5 < time.monotonic() - started < 5
    finally:
        silent.close()


WRONG_PASSWORD = ("28P01", 'password authentication failed for user "postgres"')


def test_a_wrong_database_password_refuses_to_start_in_one_sentence(fake_postgres: Callable[..., FakePostgres]) -> None:
    server = fake_postgres(WRONG_PASSWORD)
    with pytest.raises(ConfigError) as raised:
        make_app(server.url(password="hunter2-secret"))
    assert str(raised.value) == (
        "The database refused the password: set the right one in DATABASE_URL (percent-encoded)."
    )


@postgres_only
@pytest.mark.parametrize(
    "change,sentence",
    [
        ({"database": "no_such_database_here"}, "^The database named in DATABASE_URL does not exist"),
        # Behind PgBouncer an unknown user is a failed login, not a missing role: either sentence names the fix.
        ({"username": "no_such_role_here"}, "^The database (server has no such user|refused the user or password)"),
        ({"query": {"sslmode": "require"}}, "^DATABASE_URL asks for TLS"),
    ],
)
def test_database_settings_that_cannot_work_refuse_to_start(
    postgres_url: str, change: dict[str, Any], sentence: str
) -> None:
    url = make_url(postgres_url).set(**change).render_as_string(hide_password=False)
    with pytest.raises(ConfigError, match=sentence):
        make_app(url)


def test_a_configuration_error_while_serving_is_a_500_the_log_explains(
    fake_postgres: Callable[..., FakePostgres], caplog: pytest.LogCaptureFixture
) -> None:
    server = fake_postgres(None)  # down at startup: the service starts and answers 503s
    with caplog.at_level(logging.WARNING):
        application = make_app(server.url(), DB_CONNECT_TIMEOUT=2)
    client = application.test_client()
    down = client.get(f"/api/{ALICE}/tasks", headers=auth_headers())
    assert down.status_code == 503 and down.headers["Retry-After"]
    server.fatal = WRONG_PASSWORD  # then it answers, and refuses the password: no retry will fix that
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for response in (
            client.get(f"/api/{ALICE}/tasks", headers=auth_headers()),
            client.post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers()),
            client.get("/health/ready"),
        ):
            assert response.status_code == 500 and "Retry-After" not in response.headers
            assert response.get_json() == {"detail": MISCONFIGURED}
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert errors and all(
        message == "configuration error: The database refused the password: set the right one in "
        "DATABASE_URL (percent-encoded)."
        for message in errors
    )
    assert not [record for record in caplog.records if "unavailable" in record.getMessage()]
    assert client.get("/health").status_code == 200  # the process itself is alive


@pytest.mark.parametrize(
    "postgresql,sqlite",
    [
        # PostgreSQL files SQLSTATE 54000 (program_limit_exceeded) under OperationalError, as it does an outage.
        ("SELECT '{{{{{{{{1}}}}}}}}'::int[]", "SELECT json('not json')"),
    ],
)
def test_a_database_error_that_a_retry_would_repeat_is_a_500_not_a_503(
    app: Any, postgresql: str, sqlite: str, caplog: pytest.LogCaptureFixture
) -> None:
    import db

    @app.get("/deterministic")
    def deterministic() -> None:
        db.run(text(postgresql if ON_POSTGRES else sqlite), {})

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/deterministic")
    assert response.status_code == 500 and "Retry-After" not in response.headers
    assert response.get_json() == {"detail": "Internal server error"}
    assert any("a retry would repeat" in record.getMessage() for record in caplog.records)


@postgres_only
@pytest.mark.parametrize("encoding", ["SQL_ASCII", "LATIN1"])
def test_a_database_that_cannot_store_unicode_refuses_to_start(postgres_url: str, encoding: str) -> None:
    name = f"{make_url(postgres_url).database}_{encoding.lower()}"
    admin = admin_connection(postgres_url)
    with admin.cursor() as cursor:
        cursor.execute(
            f"CREATE DATABASE \"{name}\" ENCODING '{encoding}' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0"
        )
    try:
        with pytest.raises(ConfigError, match=f"^The database in DATABASE_URL uses the {encoding} encoding"):
            make_app(make_url(postgres_url).set(database=name).render_as_string(hide_password=False))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


@postgres_only
def test_concurrent_toggles_with_body_end_in_requested_state(app: Any, new_task: Any) -> None:
    task = new_task()
    path = f"/api/{ALICE}/tasks/{task['id']}/complete"

    def toggle(index: int) -> list[int]:
        client = app.test_client()
        statuses = []
        for round_number in range(5):
            wanted = (index + round_number) % 2 == 0
            statuses.append(client.patch(path, json={"completed": wanted}, headers=auth_headers()).status_code)
        # Everyone's last word is the same: the task must end completed.
        statuses.append(client.patch(path, json={"completed": True}, headers=auth_headers()).status_code)
        return statuses

    results = in_threads(8, toggle)
    assert all(status == 200 for statuses in results for status in statuses)
    assert run_sql(app, "SELECT completed FROM tasks WHERE id = :id", id=task["id"]) == [(True,)]


@postgres_only
def test_concurrent_flips_lose_no_update(app: Any, new_task: Any) -> None:
    task = new_task()
    path = f"/api/{ALICE}/tasks/{task['id']}/complete"
    flips = in_threads(
        8, lambda _: [app.test_client().patch(path, headers=auth_headers()).status_code for _ in range(5)]
    )
    assert sum(len(statuses) for statuses in flips) == 40
    assert run_sql(app, "SELECT completed FROM tasks WHERE id = :id", id=task["id"]) == [(False,)]


@postgres_only
def test_concurrent_updates_leave_newest_updated_at(app: Any, new_task: Any) -> None:
    task = new_task()
    path = f"/api/{ALICE}/tasks/{task['id']}"
    responses = in_threads(
        8,
        lambda index: app.test_client().put(path, json={"title": f"title {index}"}, headers=auth_headers()).get_json(),
    )
    final = app.test_client().get(path, headers=auth_headers()).get_json()
    assert final["title"] in {f"title {index}" for index in range(8)}
    assert parse_time(final["updated_at"]) >= max(parse_time(body["updated_at"]) for body in responses)


def test_app_instances_create_tables_at_once_on_empty_database(database_url: str) -> None:
    apps = in_threads(4, lambda _: make_app(database_url))
    engine = apps[0].extensions["db"].engine
    assert {"tasks", "tasks_api_users"} <= set(inspect(engine).get_table_names())
    clients = [application.test_client() for application in apps]
    for index, client in enumerate(clients):
        assert (
            client.post(f"/api/{ALICE}/tasks", json={"title": f"t{index}"}, headers=auth_headers()).status_code == 201
        )
    assert run_sql(apps[0], "SELECT count(*) FROM tasks")[0][0] == 4
    for application in apps:
        application.extensions["db"].engine.dispose()


def test_schema_created_on_first_use_when_database_was_down(
    database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import db

    real_upgrade = db.upgrade_schema
    calls = {"count": 0}

    def flaky_upgrade(settings: Any, to: str = "heads") -> Any:
        calls["count"] += 1
        if calls["count"] == 1:
            raise db.exc.OperationalError("SELECT 1", {}, Exception("database is waking up"))
        return real_upgrade(settings, to)

    monkeypatch.setattr(db, "upgrade_schema", flaky_upgrade)
    with caplog.at_level(logging.WARNING):
        application = make_app(database_url)
    assert any("unreachable at startup" in record.getMessage() for record in caplog.records)
    response = application.test_client().post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers())
    assert response.status_code == 201 and calls["count"] == 2
    application.extensions["db"].engine.dispose()


def test_each_request_is_one_statement(app: Any, as_user: Any, new_task: Any) -> None:
    engine = app.extensions["db"].engine
    statements: list[str] = []
    new_task("warm up")  # registers alice and opens the pool's connection

    @event.listens_for(engine, "before_cursor_execute")
    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    def cost(method: str, path: str = "/tasks", expected: int | None = None, **kwargs: Any) -> int:
        statements.clear()
        response = as_user(method, path, **kwargs)
        if expected is None:
            assert response.status_code < 300, response.get_json()
        else:
            assert response.status_code == expected, response.get_json()
        return len(statements)

    task_id = new_task("measured")["id"]
    assert cost("post", json={"title": "x"}) == 1
    assert cost("get") == 1
    assert cost("get", "/tasks?limit=2&sort=title") == 1
    assert cost("get", f"/tasks/{task_id}") == 1
    assert cost("put", f"/tasks/{task_id}", json={"title": "y"}) == 1
    assert cost("patch", f"/tasks/{task_id}/complete") == 1
    assert cost("patch", f"/tasks/{task_id}/complete", json={"completed": True}) == 1
    assert cost("delete", f"/tasks/{task_id}") == 1
    assert cost("get", "/tasks?status=pending&limit=5&offset=1") == 1
    # Idempotency-Key and If-Match / If-None-Match keep success at one statement.
    keyed: dict[str, Any] = {"json": {"title": "keyed"}, "headers": {"Idempotency-Key": "create-1"}}
    assert cost("post", **keyed) == 1
    assert cost("post", **keyed) == 1  # the replay
    assert cost("post", json={"title": "other"}, headers={"Idempotency-Key": "create-1"}, expected=422) == 1
    task = new_task("conditional")
    path, current = f"/tasks/{task['id']}", {"If-Match": '"1"'}
    assert cost("get", path, headers={"If-None-Match": '"1"'}, expected=304) == 1
    assert cost("put", path, json={"title": "z"}, headers=current) == 1
    assert cost("patch", f"{path}/complete", headers={"If-Match": '"2"'}) == 1
    assert cost("patch", path, json={"title": "z"}, headers={"If-Match": "*"}) == 1
    assert cost("patch", path, json={"title": "w"}, headers={"If-Match": '"4"', "If-None-Match": '"1"'}) == 1
    assert cost("get", path, headers={"If-Match": '"5"'}) == 1
    assert cost("delete", path, headers={"If-Match": '"5"'}) == 1
    # Telling a 412 from a 404 costs a second statement, only when the conditional change matched nothing.
    stale = new_task("stale")["id"]
    as_user("put", f"/tasks/{stale}", json={"title": "newer"})
    assert cost("put", f"/tasks/{stale}", json={"title": "older"}, headers=current, expected=412) == 2
    assert cost("delete", f"/tasks/{task['id']}", headers=current, expected=404) == 2
    for _ in range(STREAMED_LIST_FROM + 1):
        new_task("many")
    assert cost("get") == 1  # a list long enough to be sent in pieces
    # No BEGIN/COMMIT are sent around these: the connections are in autocommit.
    with engine.connect() as connection:
        dbapi_connection = connection.connection.dbapi_connection
        if ON_POSTGRES:
            assert dbapi_connection.autocommit is True
        else:
            assert dbapi_connection.isolation_level is None  # pysqlite's autocommit
    assert not any(s.strip().upper().startswith(("BEGIN", "COMMIT", "ROLLBACK", "SELECT 1")) for s in statements)


def test_every_statement_a_view_runs_is_compiled_once(app: Any, as_user: Any, new_task: Any) -> None:
    # A statement without a cache key is compiled by SQLAlchemy at every execution (the dialects' own
    # insert() with ON CONFLICT is one: sqlalchemy#10445); the second run of each request must hit the cache.
    engine = app.extensions["db"].engine
    outcomes: list[tuple[str, Any]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def record(_conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: Any) -> None:
        outcomes.append((statement.split()[0], context.cache_hit))

    def requests(run: int) -> None:
        user = f"cache-user-{run}"  # a new user each run: the users upsert runs too
        task = as_user("post", json={"title": "t"}, headers={"Idempotency-Key": f"k{run}"}, user=user).get_json()
        path = f"/tasks/{task['id']}"
        as_user("post", json={"title": "t"}, headers={"Idempotency-Key": f"k{run}"}, user=user)
        as_user("post", json={"title": "plain"}, user=user)
        as_user("get", user=user)
        as_user("get", "/tasks?limit=5&status=pending&sort=title", user=user)
        as_user("get", path, user=user)
        as_user("put", path, json={"title": "u"}, headers={"If-Match": '"1"'}, user=user)
        as_user("patch", f"{path}/complete", user=user)
        as_user("put", path, json={"title": "v"}, headers={"If-Match": '"1"'}, user=user)  # a 412: two statements
        as_user("delete", path, user=user)

    requests(1)
    outcomes.clear()
    requests(2)
    assert outcomes and all(hit == engine.dialect.CACHE_HIT for _, hit in outcomes), outcomes


@postgres_only
def test_terminated_idle_connection_is_replaced_without_error(app: Any, as_user: Any, new_task: Any) -> None:
    new_task("before")
    database = app.extensions["db"].engine.url.database
    admin = admin_connection(app.extensions["db"].engine.url.render_as_string(hide_password=False))
    with admin.cursor() as cursor:
        cursor.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND state = 'idle' AND pid <> pg_backend_pid()",
            (database,),
        )
        assert cursor.rowcount >= 1
    admin.close()
    time.sleep(0.2)  # let the FATAL message reach the pooled socket
    for _ in range(3):
        assert as_user("get").status_code == 200
    assert as_user("post", json={"title": "after"}).status_code == 201


def test_each_app_uses_its_own_database(tmp_path: Any, database_url: str) -> None:
    first = make_app(f"sqlite:///{tmp_path / 'first.db'}")
    second = make_app(database_url)  # created last: the Session registry's default bind
    response = first.test_client().post(f"/api/{ALICE}/tasks", json={"title": "into first"}, headers=auth_headers())
    assert response.status_code == 201
    assert run_sql(first, "SELECT title FROM tasks") == [("into first",)]
    assert run_sql(second, "SELECT count(*) FROM tasks")[0][0] == 0
    for application in (first, second):
        application.extensions["db"].engine.dispose()


@postgres_only
def test_schema_creation_leaves_no_advisory_lock_behind(app: Any) -> None:
    # A session-level lock would stay with a pooled server connection behind PgBouncer.
    assert run_sql(app, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")[0][0] == 0


@postgres_only
def test_checkout_check_works_past_file_descriptor_1024(app: Any, as_user: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 1200:
        pytest.skip("the hard file descriptor limit is below 1200")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2048), hard))
    filler: list[int] = []
    try:
        while not filler or filler[-1] < 1100:
            filler.append(os.open(os.devnull, os.O_RDONLY))
        app.extensions["db"].engine.dispose()  # the next connection gets a descriptor past 1024
        assert as_user("get").status_code == 200
        assert as_user("get").status_code == 200  # a checkout of the pooled, high-numbered connection
    finally:
        for descriptor in filler:
            os.close(descriptor)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class FreezableProxy:
    """A TCP proxy to PostgreSQL that can stop forwarding while keeping every socket open.

    What a pooler that accepts connections but cannot reach its server looks like to the service.
    """

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.frozen = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    def _pump(self, source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.frozen.is_set():
                    time.sleep(0.05)
                target.sendall(data)
        except OSError:
            pass

    def close(self) -> None:
        for sock in self.sockets:
            sock.close()


@postgres_only
def test_a_database_that_stops_answering_is_a_503_within_the_query_timeout(
    postgres_url: str, database_url: str
) -> None:
    parsed = make_url(postgres_url)
    proxy = FreezableProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    try:
        url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
        application = make_app(url, DB_QUERY_TIMEOUT=1)
        client = application.test_client()
        assert client.get(f"/api/{ALICE}/tasks", headers=auth_headers()).status_code == 200
        proxy.frozen.set()
        started = time.monotonic()
        response = client.get(f"/api/{ALICE}/tasks", headers=auth_headers())
        assert response.status_code == 503 and response.get_json()["detail"]
        assert time.monotonic() - started < 4
        proxy.frozen.clear()
        # The stalled connection was thrown away; a fresh one serves the next request.
        assert client.get(f"/api/{ALICE}/tasks", headers=auth_headers()).status_code == 200
        application.extensions["db"].engine.dispose()
    finally:
        proxy.close()


@postgres_only
@pytest.mark.parametrize("environment, expected", [({}, "disable"), ({"PGGSSENCMODE": "prefer"}, "prefer")])
def test_no_gssapi_probe_unless_asked(
    database_url: str, monkeypatch: pytest.MonkeyPatch, environment: dict[str, str], expected: str
) -> None:
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    application = make_app(database_url)
    engine = application.extensions["db"].engine
    with engine.connect() as connection:
        assert connection.connection.dbapi_connection.get_dsn_parameters()["gssencmode"] == expected
    engine.dispose()


def test_a_forked_worker_never_reuses_the_parents_connections(app: Any, as_user: Any) -> None:
    """gunicorn forks workers: a connection opened before the fork must not be shared after it."""
    assert as_user("get").status_code == 200
    engine = app.extensions["db"].engine
    assert engine.pool.checkedin() == 1  # the parent's pooled connection
    parent_pool = engine.pool
    child = os.fork()
    if child == 0:  # the child reports through its exit code only
        os._exit(0 if engine.pool is not parent_pool and engine.pool.checkedin() == 0 else 1)
    _, status = os.waitpid(child, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent gave up its idle connection before the fork (a gunicorn master has no use for it).
    assert engine.pool.checkedin() == 0 and as_user("get").status_code == 200
