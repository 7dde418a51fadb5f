"""The fixtures of every test: a private database (SQLite, or PostgreSQL with TEST_DATABASE_URL), an app
and its OpenAPI-checked client, requests as a user, a fake PostgreSQL that refuses logins.

With TEST_DATABASE_URL, the tests create a private database next to the one named (as Django's
test runner does), use only that, and drop it at the end. DATABASE_URL is never read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from sqlalchemy import create_engine, text

import app as app_module
from tests.common import (
    ALICE,
    TEST_DB_URL,
    FakePostgres,
    auth_headers,
    make_app,
)
from tests.harness import PrivateDatabase, drop_stale_databases
from tests.openapi_check import validate_flask_response


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str | None]:
    """A private PostgreSQL database for this run, created beside TEST_DATABASE_URL's and dropped after."""
    if not TEST_DB_URL:
        yield None
        return
    drop_stale_databases("tasks_pytest", TEST_DB_URL)  # what earlier runs, killed before their cleanup, left
    with PrivateDatabase("tasks_pytest", TEST_DB_URL) as database:
        yield database.url()


@pytest.fixture
def database_url(postgres_url: str | None, tmp_path: Any) -> str:
    """An empty database for one test: a new SQLite file, or the private PostgreSQL database emptied."""
    if postgres_url is None:
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
        connection.execute(text("DROP SCHEMA IF EXISTS neon_auth CASCADE"))  # Neon Auth's, made by some tests
        connection.execute(text("CREATE SCHEMA public"))
    engine.dispose()
    return postgres_url


class OpenAPICheckedClient(FlaskClient):
    """A test client that validates every response against openapi.json: the document stays true."""

    def open(self, *args: Any, **kwargs: Any) -> Any:
        response = super().open(*args, **kwargs)
        validate_flask_response(response)
        return response


@pytest.fixture(autouse=True)
def openapi_checked_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every app's test client, including those of apps a test builds itself."""
    monkeypatch.setattr(Flask, "test_client_class", OpenAPICheckedClient)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing from the developer's environment (DATABASE_URL above all) reaches a test's app."""
    for name in app_module.SETTINGS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def app(database_url: str) -> Iterator[Any]:
    application = make_app(database_url)
    yield application
    application.extensions["db"].engine.dispose()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


@pytest.fixture
def as_user(client: Any) -> Callable[..., Any]:
    """Send a request as a user: as_user("post", "/tasks", json=...) for the user's own URL."""

    def send(
        method: str, path: str = "/tasks", *, user: str = ALICE, url_user: str | None = None, **kwargs: Any
    ) -> Any:
        headers = {**auth_headers(user), **kwargs.pop("headers", {})}
        url = f"/api/{url_user or user}{path}"
        return client.open(url, method=method.upper(), headers=headers, **kwargs)

    return send


@pytest.fixture
def new_task(as_user: Callable[..., Any]) -> Callable[..., dict[str, Any]]:
    def create(title: str = "Buy milk", user: str = ALICE, **fields: Any) -> dict[str, Any]:
        response = as_user("post", json={"title": title, **fields}, user=user)
        assert response.status_code == 201, response.get_json()
        return response.get_json()

    return create


@pytest.fixture
def fake_postgres() -> Iterator[Callable[..., FakePostgres]]:
    servers: list[FakePostgres] = []

    def start(fatal: tuple[str, str] | None) -> FakePostgres:
        servers.append(FakePostgres(fatal))
        return servers[-1]

    yield start
    for server in servers:
        server.close()
