"""The users table tasks reference, in every shape Better Auth is deployed in: the service's own, Better
Auth's (user, users, User, neon_auth.user), text, uuid and integer ids; before and after the service's
first start. Each: account deletion cascades, a deleted account is a 401, a new account can write."""

from __future__ import annotations

import logging
from typing import Any

import pytest
from sqlalchemy import create_engine, inspect, text

from db import normalise_database_url
from errors import ConfigError
from tests.common import ALICE, BOB, ON_POSTGRES, auth_headers, make_app, postgres_only, run_sql


def test_first_write_registers_user_from_claims(app: Any, client: Any) -> None:
    headers = auth_headers("erin", email="erin@example.com", name="Erin")
    assert client.post("/api/erin/tasks", json={"title": "a"}, headers=headers).status_code == 201
    assert client.post("/api/erin/tasks", json={"title": "b"}, headers=headers).status_code == 201
    assert run_sql(app, "SELECT id, email, name FROM tasks_api_users") == [("erin", "erin@example.com", "Erin")]


def test_reads_do_not_register_users(app: Any, as_user: Any) -> None:
    as_user("get", user="reader")
    assert run_sql(app, "SELECT count(*) FROM tasks_api_users")[0][0] == 0


def test_deleting_a_user_cascades_to_tasks(app: Any, new_task: Any, as_user: Any) -> None:
    new_task("a"), new_task("b"), new_task("keep", user=BOB)
    run_sql(app, "DELETE FROM tasks_api_users WHERE id = :id", id=ALICE)
    assert run_sql(app, "SELECT user_id FROM tasks") == [(BOB,)]
    # This service owns the users table, so a valid token registers the user again.
    assert as_user("post", json={"title": "again"}).status_code == 201


def test_restart_recognises_its_own_users_table(database_url: str) -> None:
    first = make_app(database_url)
    assert first.extensions["db"].schema.users.owned
    first.extensions["db"].engine.dispose()
    second = make_app(database_url)
    assert second.extensions["db"].schema.users.owned
    client = second.test_client()
    assert client.post("/api/fay/tasks", json={"title": "x"}, headers=auth_headers("fay")).status_code == 201
    second.extensions["db"].engine.dispose()


def _create_auth_owned_table(database_url: str, name: str) -> Any:
    engine = create_engine(normalise_database_url(database_url), isolation_level="AUTOCOMMIT")
    quoted = engine.dialect.identifier_preparer.quote(name)
    with engine.connect() as connection:
        connection.execute(
            text(
                f"CREATE TABLE {quoted} (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
                f'email TEXT NOT NULL, "emailVerified" BOOLEAN NOT NULL DEFAULT false)'
            )
        )
        connection.execute(text(f"INSERT INTO {quoted} (id, name, email) VALUES ('alice', 'Alice', 'a@x')"))
    return engine


@pytest.mark.parametrize("table,configured", [("user", None), ("users", None), ("accounts", "accounts")])
def test_auth_owned_users_table_is_used_and_never_written(
    database_url: str, table: str, configured: str | None
) -> None:
    engine = _create_auth_owned_table(database_url, table)
    application = make_app(database_url, USERS_TABLE=configured)
    users = application.extensions["db"].schema.users
    assert (users.name, users.owned) == (table, False)
    client = application.test_client()
    created = client.post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers(ALICE))
    assert created.status_code == 201
    # A user the auth provider does not know (a deleted account): 401, not 500, and nothing written.
    ghost = client.post("/api/ghost/tasks", json={"title": "x"}, headers=auth_headers("ghost"))
    assert ghost.status_code == 401 and ghost.headers["WWW-Authenticate"].startswith("Bearer")
    quoted = engine.dialect.identifier_preparer.quote(table)
    assert run_sql(application, f"SELECT id FROM {quoted}") == [(ALICE,)]
    assert run_sql(application, "SELECT user_id FROM tasks") == [(ALICE,)]
    # The auth provider deleting the account takes its tasks with it (the app's engine: SQLite
    # enforces foreign keys only on connections that ask for it).
    run_sql(application, f"DELETE FROM {quoted} WHERE id = 'alice'")
    assert run_sql(application, "SELECT count(*) FROM tasks")[0][0] == 0
    assert not inspect(engine).has_table("users") or table == "users"
    application.extensions["db"].engine.dispose()
    engine.dispose()


def test_users_table_setting_naming_a_missing_table_is_an_error(database_url: str) -> None:
    with pytest.raises(RuntimeError, match="USERS_TABLE names the table 'members', which does not exist"):
        make_app(database_url, USERS_TABLE="members")


def test_unstorable_profile_claims_are_not_stored(app: Any, client: Any) -> None:
    headers = auth_headers("gina", name="Gi\u0000na", email="\ud800@example.com")
    assert client.post("/api/gina/tasks", json={"title": "x"}, headers=headers).status_code == 201
    assert run_sql(app, "SELECT id, email, name FROM tasks_api_users") == [("gina", None, None)]


# --- every shape of Better Auth's users table ----------------------------------------------------------

# label: (schema, table, id type on SQLite, id type on PostgreSQL, alice's id, a new account's id)
SHAPES = {
    "user": (None, "user", "TEXT", "TEXT", "alice", "carol"),
    "plural users (Drizzle usePlural)": (None, "users", "TEXT", "TEXT", "alice", "carol"),
    "User (Prisma)": (None, "User", None, "TEXT", "alice", "carol"),
    "neon_auth.user (Neon Auth)": ("neon_auth", "user", None, "TEXT", "alice", "carol"),
    "uuid ids": (
        None,
        "user",
        None,
        "uuid",
        "3f2504e0-4f89-41d3-9a0c-0305e82c3301",
        "9b2c1f7e-8d3a-4e6b-a1c2-d3e4f5a6b7c8",
    ),
    "integer ids (serial)": (None, "user", "INTEGER", "INTEGER", "1", "2"),
}


def shape(label: str) -> tuple[str | None, str, str, str, str]:
    """The shape on the database under test (skipped where that database cannot have it)."""
    schema, name, sqlite_type, postgres_type, alice, carol = SHAPES[label]
    id_type = postgres_type if ON_POSTGRES else sqlite_type
    if id_type is None:
        pytest.skip(f"{label}: PostgreSQL only")
    return schema, name, id_type, alice, carol


def better_auth_table(database_url: str, schema: str | None, name: str, id_type: str, *ids: str) -> Any:
    """Better Auth's users table as its migration makes it (the columns the service reads are id only)."""
    engine = create_engine(normalise_database_url(database_url), isolation_level="AUTOCOMMIT")
    quoted = engine.dialect.identifier_preparer.quote(name)
    place = f"{schema}.{quoted}" if schema else quoted
    with engine.connect() as connection:
        if schema:
            connection.execute(text(f"CREATE SCHEMA IF NOT EXISTS {schema}"))
        connection.execute(
            text(
                f"CREATE TABLE {place} (id {id_type} PRIMARY KEY, name TEXT NOT NULL, email TEXT NOT NULL, "
                f'"emailVerified" BOOLEAN NOT NULL DEFAULT false)'
            )
        )
        for user_id in ids:
            add_account(engine, place, user_id)
    return engine, place


def add_account(engine: Any, place: str, user_id: str) -> None:
    """What Better Auth does when someone signs up."""
    with engine.connect() as connection:
        connection.execute(
            text(f"INSERT INTO {place} (id, name, email) VALUES (:id, :id, :email)"),
            {"id": int(user_id) if user_id.isdigit() else user_id, "email": f"{user_id}@example.com"},
        )


def create(client: Any, user_id: str, title: str = "t") -> Any:
    return client.post(f"/api/{user_id}/tasks", json={"title": title}, headers=auth_headers(user_id))


def referenced_table(application: Any) -> tuple[str | None, str]:
    """Which table tasks.user_id references, as the database says."""
    foreign_keys = inspect(application.extensions["db"].engine).get_foreign_keys("tasks")
    (foreign_key,) = [fk for fk in foreign_keys if fk["constrained_columns"] == ["user_id"]]
    return foreign_key.get("referred_schema"), foreign_key["referred_table"]


def assert_behaves_as_better_auths(application: Any, engine: Any, place: str, alice: str, carol: str) -> None:
    """A deleted account is a 401 and takes its tasks with it; a new account can write at once."""
    client = application.test_client()
    assert create(client, alice, "alice's").status_code == 201
    ghost = "d4c3b2a1-0000-4000-8000-000000000000" if "-" in alice else ("999" if alice.isdigit() else "ghost")
    refused = create(client, ghost)
    assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    add_account(engine, place, carol)  # signs up now: no sign-out loop, the first write works
    assert create(client, carol, "carol's").status_code == 201
    listed = client.get(f"/api/{carol}/tasks", headers=auth_headers(carol)).get_json()
    assert [task["user_id"] for task in listed] == [carol]
    with application.extensions["db"].engine.connect() as connection:  # the app's engine: SQLite's foreign keys
        connection.execute(
            text(f"DELETE FROM {place} WHERE id = :id"), {"id": int(alice) if alice.isdigit() else alice}
        )
    owners = {row[0] for row in run_sql(application, "SELECT user_id FROM tasks")}
    assert {str(owner) for owner in owners} == {carol}


@pytest.mark.parametrize("label", list(SHAPES))
def test_better_auths_table_made_before_the_service_starts_is_used(
    database_url: str, caplog: pytest.LogCaptureFixture, label: str
) -> None:
    schema, name, id_type, alice, carol = shape(label)
    engine, place = better_auth_table(database_url, schema, name, id_type, alice)
    with caplog.at_level(logging.INFO, logger="migrations"):
        application = make_app(database_url)
    users = application.extensions["db"].schema.users.ref
    assert (users.schema, users.name, users.owned) == (schema, name, False)
    assert any(
        record.getMessage().startswith(f"users table: {users.qualified} (owned by the auth provider")
        for record in caplog.records
    )
    assert referenced_table(application)[1] == name
    assert_behaves_as_better_auths(application, engine, place, alice, carol)
    assert not inspect(engine).has_table("tasks_api_users")  # the service made no users table of its own
    application.extensions["db"].engine.dispose()
    engine.dispose()


@pytest.mark.parametrize("label", list(SHAPES))
def test_better_auths_table_made_after_the_service_started_takes_over(database_url: str, label: str) -> None:
    schema, name, id_type, alice, carol = shape(label)
    first = make_app(database_url)  # no Better Auth yet: the service keeps its own users table
    assert first.extensions["db"].schema.users.ref.owned and referenced_table(first)[1] == "tasks_api_users"
    kept = create(first.test_client(), alice, "made before Better Auth's migration").get_json()
    first.extensions["db"].engine.dispose()
    engine, place = better_auth_table(database_url, schema, name, id_type, alice)
    second = make_app(database_url)  # restarted after Better Auth's migration: its table, and its id type
    assert referenced_table(second) == (schema, name)
    client = second.test_client()
    survived = client.get(f"/api/{alice}/tasks/{kept['id']}", headers=auth_headers(alice)).get_json()
    assert survived["title"] == kept["title"] and survived["user_id"] == alice
    assert_behaves_as_better_auths(second, engine, place, alice, carol)
    second.extensions["db"].engine.dispose()
    engine.dispose()


def test_moving_to_a_users_table_that_lacks_owners_of_existing_tasks_is_refused_in_one_sentence(
    database_url: str,
) -> None:
    first = make_app(database_url)
    assert create(first.test_client(), ALICE).status_code == 201 and create(first.test_client(), BOB).status_code == 201
    first.extensions["db"].engine.dispose()
    engine, _ = better_auth_table(database_url, None, "user", "TEXT", ALICE)  # no bob
    with pytest.raises(ConfigError, match="^The users table 'user' lacks the user ids of 1 existing tasks") as raised:
        make_app(database_url)
    assert "\n" not in str(raised.value)
    assert run_sql(make_app(database_url, USERS_TABLE="tasks_api_users"), "SELECT count(*) FROM tasks")[0][0] == 2
    engine.dispose()


@postgres_only
def test_users_table_may_name_a_schema(database_url: str) -> None:
    engine, place = better_auth_table(database_url, "accounts_db", "people", "TEXT", ALICE)
    application = make_app(database_url, USERS_TABLE="accounts_db.people")
    assert referenced_table(application) == ("accounts_db", "people")
    assert_behaves_as_better_auths(application, engine, place, ALICE, "carol")
    with engine.connect() as connection:
        connection.execute(text("DROP SCHEMA accounts_db CASCADE"))
    application.extensions["db"].engine.dispose()
    engine.dispose()


@pytest.mark.parametrize(
    "label,refused",
    [
        ("uuid ids", ["alice", "3F2504E0-4F89-41D3-9A0C-0305E82C3301"]),
        ("integer ids (serial)", ["alice", "01", "-1", "99999999999"]),
    ],
)
def test_a_sub_that_cannot_be_an_id_of_the_users_table_is_a_401(
    database_url: str, label: str, refused: list[str]
) -> None:
    schema, name, id_type, alice, _ = shape(label)
    engine, _ = better_auth_table(database_url, schema, name, id_type, alice)
    application = make_app(database_url)
    client = application.test_client()
    for sub in refused:
        response = client.get(f"/api/{sub}/tasks", headers=auth_headers(sub))
        assert response.status_code == 401, sub
    assert client.get(f"/api/{alice}/tasks", headers=auth_headers(alice)).status_code == 200
    application.extensions["db"].engine.dispose()
    engine.dispose()


def test_jwks_mode_without_better_auths_table_warns_to_run_its_migration_first(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING):
        application = make_app(database_url, BETTER_AUTH_URL="https://app.example.com")
    assert any(
        "run Better Auth's migration (npx @better-auth/cli migrate) before" in r.getMessage() for r in caplog.records
    )
    application.extensions["db"].engine.dispose()


def test_a_users_table_whose_ids_are_of_another_type_is_refused_in_one_sentence(database_url: str) -> None:
    better_auth_table(database_url, None, "user", "REAL" if not ON_POSTGRES else "numeric", "1")
    with pytest.raises(ConfigError, match="^The users table 'user' has ids of type") as raised:
        make_app(database_url)
    assert "\n" not in str(raised.value)
