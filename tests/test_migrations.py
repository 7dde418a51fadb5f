"""Schema migrations (Alembic, migrations/): a database of the release before them is stamped and
upgraded with its tasks; up and down on an empty database; the models and the migrations agree; a
revision applied under a running service; a release whose migrations did not run serves no task."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import create_engine, inspect

import db
import migrations
from tests.common import ALICE, BOB, ON_POSTGRES, auth_headers, in_threads, make_app, run_sql

FIXTURES = Path(__file__).resolve().parent / "fixtures"
ADD_A_COLUMN = '''"""Tasks get a priority.

Revision ID: 0099_priority
Revises: {head}
"""
import sqlalchemy as sa
from alembic import op

revision = "0099_priority"
down_revision = "{head}"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("tasks", sa.Column("priority", sa.SmallInteger(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("priority")
'''


def execute_script(database_url: str, script: str) -> None:
    """Run a schema dump as the release before migrations left it."""
    engine = create_engine(db.normalise_database_url(database_url), isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        for statement in script.split(";\n"):
            lines = [line for line in statement.splitlines() if not line.startswith("--")]
            if "".join(lines).strip():
                connection.exec_driver_sql("\n".join(lines))
    engine.dispose()


def revision_of(application: Any) -> str | None:
    with application.extensions["db"].engine.connect() as connection:
        return migrations.current_revision(connection)


def test_a_database_of_the_release_before_migrations_is_stamped_and_upgraded_with_its_tasks(
    database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    dialect = "postgresql" if ON_POSTGRES else "sqlite"
    execute_script(database_url, (FIXTURES / f"release-before-migrations-{dialect}.sql").read_text())
    execute_script(
        database_url,
        "INSERT INTO users (id, created_at) VALUES ('alice', CURRENT_TIMESTAMP), ('bob', CURRENT_TIMESTAMP);\n"
        "INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at) VALUES "
        "('alice', 'one', NULL, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP), "
        "('alice', 'two', 'd', true, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP), "
        "('bob', 'three', NULL, false, CURRENT_TIMESTAMP, CURRENT_TIMESTAMP)",
    )
    with caplog.at_level(logging.INFO, logger="migrations"):
        application = make_app(database_url)
    assert any("stamping it at 0001_baseline" in record.getMessage() for record in caplog.records)
    assert revision_of(application) == migrations.head()
    client = application.test_client()
    listed = client.get(f"/api/{ALICE}/tasks?sort=title", headers=auth_headers()).get_json()
    assert [(task["id"], task["title"], task["completed"]) for task in listed] == [(1, "one", False), (2, "two", True)]
    assert client.delete(f"/api/{BOB}/tasks/3", headers=auth_headers(BOB)).status_code == 204
    created = client.post(f"/api/{BOB}/tasks", json={"title": "four"}, headers=auth_headers(BOB)).get_json()
    assert created["id"] == 4  # never 3 again, SQLite included (revision 0002)
    assert {row[0] for row in run_sql(application, "SELECT id FROM tasks_api_users")} == {"alice", "bob"}
    application.extensions["db"].engine.dispose()


def test_up_to_the_head_and_down_to_nothing_on_an_empty_database(database_url: str) -> None:
    application = make_app(database_url, MIGRATE_ON_START=False)
    assert revision_of(application) is None and not inspect(application.extensions["db"].engine).has_table("tasks")
    settings = application.config
    db.upgrade_schema(settings)
    engine = application.extensions["db"].engine
    assert revision_of(application) == migrations.head()
    assert {"tasks", "tasks_api_users", migrations.VERSION_TABLE} <= set(inspect(engine).get_table_names())
    assert migrations.differences(engine, None) == []  # the models and the migrations agree
    down = db.migration_engine(settings)
    newest_first = [script.revision for script in migrations._scripts().walk_revisions()]
    for revision in newest_first[1:]:  # one step at a time, each checked
        migrations.downgrade(down, None, revision)
        assert revision_of(application) == revision
        if not ON_POSTGRES and revision >= "0002":  # task ids are never reused, after any downgrade too
            assert "AUTOINCREMENT" in run_sql(application, "SELECT sql FROM sqlite_master WHERE name = 'tasks'")[0][0]
    migrations.downgrade(down, None, "base")
    down.dispose()
    assert set(inspect(engine).get_table_names()) <= {migrations.VERSION_TABLE}
    db.upgrade_schema(settings)  # and up again
    assert revision_of(application) == migrations.head()
    engine.dispose()


def test_the_differences_check_sees_a_model_change_no_migration_makes(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import models

    real = models.schema_metadata

    def with_a_new_column(users: Any) -> Any:
        from sqlalchemy import Column, Integer

        metadata = real(users)
        metadata.tables["tasks"].append_column(Column("priority", Integer, nullable=True))
        return metadata

    monkeypatch.setattr(models, "schema_metadata", with_a_new_column)
    found = migrations.differences(app.extensions["db"].engine, None)
    assert [difference[0] for difference in found] == ["add_column"]


def test_a_revision_that_adds_a_column_under_a_running_service(app: Any, new_task: Any, tmp_path: Path) -> None:
    before = new_task("made before the revision")
    scripts = tmp_path / "migrations"
    shutil.copytree(migrations.HERE, scripts, ignore=shutil.ignore_patterns("__pycache__"))
    (scripts / "versions" / "0099_priority.py").write_text(ADD_A_COLUMN.format(head=migrations.head()))
    engine = db.migration_engine(app.config)
    with migrations.locked(engine) as connection:
        config = migrations.config(connection, migrations.choose_users_table(connection, None))
        config.set_main_option("script_location", str(scripts))
        command.upgrade(config, "heads")
    engine.dispose()
    # The running service (its statements name their columns) keeps working on the wider table.
    client = app.test_client()
    assert client.get(f"/api/{ALICE}/tasks/{before['id']}", headers=auth_headers()).get_json() == before
    created = client.post(f"/api/{ALICE}/tasks", json={"title": "after"}, headers=auth_headers()).get_json()
    assert client.patch(f"/api/{ALICE}/tasks/{created['id']}/complete", headers=auth_headers()).status_code == 200
    assert len(client.get(f"/api/{ALICE}/tasks", headers=auth_headers()).get_json()) == 2
    # What the new code would read: the column, its default filled in for old and new rows.
    assert run_sql(app, "SELECT priority FROM tasks ORDER BY id") == [(0,), (0,)]
    # A process of the old release starting now serves the newer schema too, and says so.
    old = make_app(app.config["DATABASE_URL"])
    assert revision_of(old) == "0099_priority"
    assert old.test_client().get("/health/ready").status_code == 200
    assert old.test_client().get(f"/api/{ALICE}/tasks", headers=auth_headers()).status_code == 200
    old.extensions["db"].engine.dispose()


def test_a_release_whose_migrations_did_not_run_serves_no_task_and_is_not_ready(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(db, "SCHEMA_RECHECK_SECONDS", 0)
    application = make_app(database_url, MIGRATE_ON_START=False)
    client = application.test_client()
    ready = client.get("/health/ready")
    assert ready.status_code == 503 and ready.headers["Retry-After"]
    assert ready.get_json()["detail"].startswith("The database schema is at revision none and this release needs")
    for response in (
        client.get(f"/api/{ALICE}/tasks", headers=auth_headers()),
        client.post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers()),
    ):
        assert response.status_code == 503 and response.headers["Retry-After"]
        assert response.get_json() == {"detail": "The service is being upgraded; please try again shortly."}
    assert client.get(f"/api/{ALICE}/tasks").status_code == 401  # still 401 first
    # The release step runs: the same process serves, without a restart.
    result = application.test_cli_runner().invoke(args=["db", "upgrade"])
    assert result.exit_code == 0 and f"The database schema is at {migrations.head()}." in result.output
    assert client.get("/health/ready").status_code == 200
    assert client.post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers()).status_code == 201
    application.extensions["db"].engine.dispose()


def test_instances_starting_together_migrate_once(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="alembic"):
        apps = in_threads(4, lambda _: make_app(database_url))
    baselines = [record for record in caplog.records if "-> 0001_baseline" in record.getMessage()]
    assert len(baselines) == 1
    assert run_sql(apps[0], f"SELECT version_num FROM {migrations.VERSION_TABLE}") == [(migrations.head(),)]
    for application in apps:
        application.extensions["db"].engine.dispose()


def test_the_db_commands(app: Any) -> None:
    runner = app.test_cli_runner()
    current = runner.invoke(args=["db", "current"])
    assert (
        current.exit_code == 0
        and current.output.strip() == f"database: {migrations.head()}; this release: {migrations.head()}"
    )
    check = runner.invoke(args=["db", "check"])
    assert check.exit_code == 0 and "agree" in check.output


def test_migrations_use_database_url_unpooled_and_wait_long_enough_for_a_waking_database(
    app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    built: list[tuple[str, Any]] = []
    real = db.make_engine

    def recorded(url: str, settings: Any, **kw: Any) -> Any:
        built.append((url, settings))
        return real(url, settings, **kw)

    monkeypatch.setattr(db, "make_engine", recorded)
    direct = "postgres://owner:secret@ep-example-123.eu-central-1.aws.neon.tech/neondb?sslmode=require"
    db.migration_engine({**app.config, "DATABASE_URL_UNPOOLED": direct}).dispose()
    url, settings = built[-1]
    assert url == "postgresql+psycopg2://owner:secret@ep-example-123.eu-central-1.aws.neon.tech/neondb?sslmode=require"
    assert (settings["DB_CONNECT_TIMEOUT"], settings["DB_QUERY_TIMEOUT"]) == (
        db.MIGRATION_CONNECT_TIMEOUT,
        db.MIGRATION_WAIT_TIMEOUT,
    )
    db.migration_engine(app.config).dispose()  # unset: DATABASE_URL
    assert built[-1][0] == db.normalise_database_url(app.config["DATABASE_URL"])
