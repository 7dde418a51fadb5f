"""Tests of the tasks API: on SQLite by default, on PostgreSQL when TEST_DATABASE_URL is set.

With TEST_DATABASE_URL, the tests create a private database next to the one named (as Django's
test runner does), use only that, and drop it at the end. DATABASE_URL is never read.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import os
import re
import resource
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Iterator

import jwt
import psycopg2
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flask import Flask
from flask.testing import FlaskClient
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm
from sqlalchemy import create_engine, event, inspect, text
from sqlalchemy.engine import make_url
from werkzeug.test import EnvironBuilder, run_wsgi_app

import app as app_module
import auth
from app import STREAMED_LIST_FROM, create_app
from auth import DEV_SECRET, issue_token
from errors import MISCONFIGURED, ConfigError
from db import normalise_database_url
from models import iso_utc
from openapi_check import validate_flask_response

SECRET = "test-secret-long-enough-for-hs256-and-hs512-0123456789abcdefghijk"
OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256-98765"
ALICE, BOB = "alice", "bob"
TEST_DB_URL = os.environ.get("TEST_DATABASE_URL")
ON_POSTGRES = bool(TEST_DB_URL)
postgres_only = pytest.mark.skipif(not ON_POSTGRES, reason="needs TEST_DATABASE_URL (PostgreSQL)")


# --- databases ---------------------------------------------------------------------------------

def _admin_connection(url: str) -> Any:
    """A psycopg2 autocommit connection to the database TEST_DATABASE_URL names."""
    parsed = make_url(normalise_database_url(url))
    connection = psycopg2.connect(
        host=parsed.host, port=parsed.port or 5432, user=parsed.username, password=parsed.password,
        dbname=parsed.database, **{k: v for k, v in parsed.query.items() if isinstance(v, str)})
    connection.autocommit = True
    return connection


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str | None]:
    """A private PostgreSQL database for this run, created beside TEST_DATABASE_URL's and dropped after."""
    if not TEST_DB_URL:
        yield None
        return
    name = f"tasks_pytest_{uuid.uuid4().hex[:12]}"
    admin = _admin_connection(TEST_DB_URL)
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(normalise_database_url(TEST_DB_URL)).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def database_url(postgres_url: str | None, tmp_path: Any) -> str:
    """An empty database for one test: a new SQLite file, or the private PostgreSQL database emptied."""
    if postgres_url is None:
        return f"sqlite:///{tmp_path / 'tasks.db'}"
    engine = create_engine(postgres_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text("DROP SCHEMA public CASCADE"))
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


def make_app(database_url: str, **overrides: Any) -> Any:
    config = {"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": database_url, "TESTING": True, **overrides}
    return create_app(config)


@pytest.fixture
def app(database_url: str) -> Iterator[Any]:
    application = make_app(database_url)
    yield application
    application.extensions["db"].engine.dispose()


@pytest.fixture
def client(app: Any) -> Any:
    return app.test_client()


def run_sql(app: Any, sql: str, **params: Any) -> list[Any]:
    """Read the database directly, behind the API's back."""
    with app.extensions["db"].engine.connect() as connection:
        result = connection.execute(text(sql), params)
        return result.fetchall() if result.returns_rows else []


# --- tokens ------------------------------------------------------------------------------------

def make_token(sub: Any = ALICE, *, secret: str = SECRET, algorithm: str = "HS256",
               drop: tuple[str, ...] = (), **claims: Any) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + 600, **claims}
    for name in drop:
        payload.pop(name, None)
    return jwt.encode(payload, secret, algorithm=algorithm)


def auth_headers(sub: Any = ALICE, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub, **claims)}"}


@pytest.fixture
def as_user(client: Any) -> Callable[..., Any]:
    """Send a request as a user: as_user("post", "/tasks", json=...) for the user's own URL."""

    def send(method: str, path: str = "/tasks", *, user: str = ALICE, url_user: str | None = None,
             **kwargs: Any) -> Any:
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


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    assert parsed.utcoffset() is not None and parsed.utcoffset().total_seconds() == 0
    return parsed


# --- success paths -----------------------------------------------------------------------------

def test_create_returns_task_with_location(as_user: Any) -> None:
    response = as_user("post", json={"title": "  Buy milk  ", "description": " 2 litres "})
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"id", "user_id", "title", "description", "completed", "created_at", "updated_at"}
    assert body["title"] == "Buy milk" and body["description"] == "2 litres"
    assert body["user_id"] == ALICE and body["completed"] is False and isinstance(body["id"], int)
    assert body["created_at"].endswith("Z") and body["created_at"] == body["updated_at"]
    assert response.headers["Location"] == f"/api/{ALICE}/tasks/{body['id']}"
    assert response.headers["Content-Type"].startswith("application/json")
    fetched = as_user("get", response.headers["Location"].removeprefix(f"/api/{ALICE}"))
    assert fetched.status_code == 200 and fetched.get_json() == body


def test_create_ignores_fields_a_client_may_not_set(app: Any, as_user: Any) -> None:
    response = as_user("post", json={"title": "t", "id": 999, "user_id": BOB, "completed": True,
                                     "created_at": "2000-01-01T00:00:00Z", "owner": "x"})
    body = response.get_json()
    assert response.status_code == 201
    assert body["id"] != 999 and body["user_id"] == ALICE
    assert body["created_at"] != "2000-01-01T00:00:00Z"
    # completed is a writable field, and create honours it.
    assert body["completed"] is True
    assert run_sql(app, "SELECT user_id FROM tasks") == [(ALICE,)]


def test_create_with_null_and_missing_description(as_user: Any) -> None:
    assert as_user("post", json={"title": "a", "description": None}).get_json()["description"] is None
    assert as_user("post", json={"title": "b"}).get_json()["description"] is None


def test_list_returns_only_own_tasks_newest_first(as_user: Any, new_task: Any) -> None:
    first, second = new_task("one"), new_task("two")
    new_task("bob's", user=BOB)
    response = as_user("get")
    assert response.status_code == 200
    assert [task["id"] for task in response.get_json()] == [second["id"], first["id"]]
    assert "X-Total-Count" not in response.headers


def test_list_of_new_user_is_empty_array(as_user: Any) -> None:
    response = as_user("get", user="nobody-yet")
    assert response.status_code == 200 and response.get_json() == []


def test_get_task(as_user: Any, new_task: Any) -> None:
    task = new_task("read me", description="details")
    response = as_user("get", f"/tasks/{task['id']}")
    assert response.status_code == 200 and response.get_json() == task


@pytest.mark.parametrize("method", ["put", "patch"])
def test_update_is_partial(as_user: Any, new_task: Any, method: str) -> None:
    task = new_task("old", description="keep me")
    response = as_user(method, f"/tasks/{task['id']}", json={"title": " new "})
    body = response.get_json()
    assert response.status_code == 200
    assert body["title"] == "new" and body["description"] == "keep me" and body["completed"] is False
    assert body["created_at"] == task["created_at"]
    assert parse_time(body["updated_at"]) > parse_time(task["updated_at"])
    assert as_user("get", f"/tasks/{task['id']}").get_json() == body


def test_update_all_fields_and_clear_description(as_user: Any, new_task: Any) -> None:
    task = new_task("t", description="d")
    body = as_user("put", f"/tasks/{task['id']}",
                   json={"title": "T", "description": None, "completed": True}).get_json()
    assert (body["title"], body["description"], body["completed"]) == ("T", None, True)


def test_task_ids_are_never_reused(app: Any, as_user: Any, new_task: Any) -> None:
    # A retried DELETE of an old id must never reach a newer task, of this user or another.
    first, newest = new_task("first"), new_task("newest")
    assert as_user("delete", f"/tasks/{newest['id']}").status_code == 204
    after = new_task("after", user=BOB)
    assert after["id"] > newest["id"]
    assert as_user("delete", f"/tasks/{newest['id']}").status_code == 404
    assert {row[0] for row in run_sql(app, "SELECT id FROM tasks")} == {first["id"], after["id"]}


def test_delete_task(app: Any, as_user: Any, new_task: Any) -> None:
    task = new_task()
    response = as_user("delete", f"/tasks/{task['id']}")
    assert response.status_code == 204 and response.data == b""
    assert as_user("get", f"/tasks/{task['id']}").status_code == 404
    assert as_user("delete", f"/tasks/{task['id']}").status_code == 404
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_toggle_without_body_flips(as_user: Any, new_task: Any) -> None:
    task = new_task()
    first = as_user("patch", f"/tasks/{task['id']}/complete")
    assert first.status_code == 200 and first.get_json()["completed"] is True
    assert parse_time(first.get_json()["updated_at"]) > parse_time(task["updated_at"])
    second = as_user("patch", f"/tasks/{task['id']}/complete")
    assert second.get_json()["completed"] is False
    assert second.get_json()["created_at"] == task["created_at"]


def test_toggle_with_empty_json_content_type_flips(as_user: Any, new_task: Any) -> None:
    task = new_task()
    response = as_user("patch", f"/tasks/{task['id']}/complete", headers={"Content-Type": "application/json"})
    assert response.status_code == 200 and response.get_json()["completed"] is True


@pytest.mark.parametrize("wanted", [True, False])
def test_toggle_with_body_sets_and_is_idempotent(as_user: Any, new_task: Any, wanted: bool) -> None:
    task = new_task()
    for _ in range(2):
        response = as_user("patch", f"/tasks/{task['id']}/complete", json={"completed": wanted})
        assert response.status_code == 200 and response.get_json()["completed"] is wanted


def test_unicode_round_trip(as_user: Any) -> None:
    title = "Ünïcödé ✓ 日本語 🎉 e\u0301"
    created = as_user("post", json={"title": title, "description": "Ω≈ç√ 👩‍👩‍👧"})
    assert created.status_code == 201
    fetched = as_user("get", f"/tasks/{created.get_json()['id']}").get_json()
    assert fetched["title"] == title and fetched["description"] == "Ω≈ç√ 👩‍👩‍👧"


def test_title_of_200_emoji_fits(as_user: Any) -> None:
    # 200 characters, 800 bytes: the limit counts characters, on PostgreSQL's varchar(200) too.
    response = as_user("post", json={"title": "😀" * 200})
    assert response.status_code == 201 and response.get_json()["title"] == "😀" * 200


def test_updated_at_moves_created_at_never(as_user: Any, new_task: Any) -> None:
    task = new_task()
    stamps = [parse_time(task["updated_at"])]
    for body in ({"title": "a"}, {"completed": True}, {"description": "x"}):
        updated = as_user("patch", f"/tasks/{task['id']}", json=body).get_json()
        assert updated["created_at"] == task["created_at"]
        stamps.append(parse_time(updated["updated_at"]))
    assert stamps == sorted(stamps) and len(set(stamps)) == len(stamps)


# --- health ------------------------------------------------------------------------------------

def test_health_needs_no_auth_and_no_database(client: Any) -> None:
    response = client.get("/health")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


def test_ready_when_database_answers(client: Any) -> None:
    response = client.get("/health/ready")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


# --- authentication: 401 on every endpoint -----------------------------------------------------

ENDPOINTS = [
    ("get", "/tasks", None),
    ("post", "/tasks", {"title": "x"}),
    ("get", "/tasks/{id}", None),
    ("put", "/tasks/{id}", {"title": "changed"}),
    ("patch", "/tasks/{id}", {"title": "changed"}),
    ("delete", "/tasks/{id}", None),
    ("patch", "/tasks/{id}/complete", None),
]
ENDPOINT_IDS = [f"{method} {path}" for method, path, _ in ENDPOINTS]


def _now() -> int:
    return int(time.time())


BAD_AUTHORIZATION: dict[str, Callable[[], str | None]] = {
    "no header": lambda: None,
    "empty header": lambda: "",
    "basic scheme": lambda: "Basic YWxpY2U6cGFzc3dvcmQ=",
    "bearer without token": lambda: "Bearer",
    "token without scheme": lambda: make_token(),
    "not a jwt": lambda: "Bearer not-a-jwt",
    "garbage segments": lambda: "Bearer aaa.bbb.ccc",
    "bad signature": lambda: f"Bearer {make_token(secret=OTHER_SECRET)}",
    "tampered payload": lambda: "Bearer " + _tamper(make_token()),
    "alg none": lambda: "Bearer " + jwt.encode({"sub": ALICE, "exp": _now() + 600}, None, algorithm="none"),
    "alg HS512 with the right secret": lambda: f"Bearer {make_token(algorithm='HS512')}",
    "alg HS384 with the right secret": lambda: f"Bearer {make_token(algorithm='HS384')}",
    "expired": lambda: f"Bearer {make_token(exp=_now() - 120, iat=_now() - 700)}",
    "no exp": lambda: f"Bearer {make_token(drop=('exp',))}",
    "no sub": lambda: f"Bearer {make_token(drop=('sub',))}",
    "empty sub": lambda: f"Bearer {make_token('')}",
    "numeric sub": lambda: f"Bearer {make_token(12345)}",
    "null sub": lambda: f"Bearer {make_token(None)}",
    "nbf in the future": lambda: f"Bearer {make_token(nbf=_now() + 120)}",
    "iat in the future": lambda: f"Bearer {make_token(iat=_now() + 120)}",
    "non-numeric exp": lambda: f"Bearer {make_token(exp='tomorrow')}",
    "alg is a list": lambda: "Bearer " + _with_header(make_token(), {"alg": ["HS256"], "typ": "JWT"}),
    "alg is an object": lambda: "Bearer " + _with_header(make_token(), {"alg": {"x": 1}, "typ": "JWT"}),
    "sub with a NUL": lambda: "Bearer " + make_token("ali\u0000ce"),
}


def _with_header(token: str, header: dict[str, Any]) -> str:
    _, payload, signature = token.split(".")
    return f"{jwt.utils.base64url_encode(json.dumps(header).encode()).decode()}.{payload}.{signature}"


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = json.loads(jwt.utils.base64url_decode(payload))
    claims["sub"] = BOB
    forged = jwt.utils.base64url_encode(json.dumps(claims).encode()).decode()
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize("case", list(BAD_AUTHORIZATION))
@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=ENDPOINT_IDS)
def test_401_for_every_bad_token_on_every_endpoint(app: Any, client: Any, new_task: Any, case: str,
                                                   method: str, path: str, body: Any) -> None:
    task = new_task("untouched")
    value = BAD_AUTHORIZATION[case]()
    headers = {} if value is None else {"Authorization": value}
    response = client.open(f"/api/{ALICE}" + path.format(id=task["id"]), method=method.upper(),
                           headers=headers, json=body)
    assert response.status_code == 401
    assert isinstance(response.get_json()["detail"], str) and response.get_json()["detail"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer")
    token_sent = value is not None and value.lower().startswith("bearer ") and len(value.split()) == 2
    assert ('error="invalid_token"' in challenge) == token_sent
    assert run_sql(app, "SELECT title, completed FROM tasks") == [("untouched", False)]


def test_token_within_leeway_is_accepted(as_user: Any, client: Any) -> None:
    # 30 s of clock skew between the frontend and us is tolerated, both ways.
    token = make_token(iat=_now() + 20, nbf=_now() + 20)
    assert client.get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    late = make_token(exp=_now() - 10, iat=_now() - 700)
    assert client.get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {late}"}).status_code == 200


def test_bearer_scheme_is_case_insensitive(client: Any) -> None:
    response = client.get(f"/api/{ALICE}/tasks", headers={"Authorization": f"bearer {make_token()}"})
    assert response.status_code == 200


def test_token_in_query_string_or_cookie_is_ignored(client: Any) -> None:
    token = make_token()
    client.set_cookie("token", token)
    response = client.get(f"/api/{ALICE}/tasks?token={token}&access_token={token}")
    assert response.status_code == 401


def test_expired_token_message_says_so(client: Any) -> None:
    token = make_token(exp=_now() - 120, iat=_now() - 700)
    response = client.get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401 and "expired" in response.get_json()["detail"]


def test_a_verified_token_is_checked_once_then_remembered(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[str] = []
    real_decode = auth._decode
    monkeypatch.setattr(auth, "_decode", lambda token, *args, **kwargs: checks.append(token) or
                        real_decode(token, *args, **kwargs))
    headers = auth_headers(ALICE)
    for _ in range(3):
        assert client.get(f"/api/{ALICE}/tasks", headers=headers).status_code == 200
    assert len(checks) == 1
    # Remembered for its own user only: the same token on another user's URL is still a 403.
    assert client.get(f"/api/{BOB}/tasks", headers=headers).status_code == 403
    # A refused token is never remembered: each attempt is checked again, and refused again.
    forged = make_token() + "x"
    for _ in range(2):
        assert client.get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {forged}"}).status_code == 401
    assert checks.count(forged) == 2


def test_a_remembered_token_still_expires(client: Any) -> None:
    # Valid for one to two more seconds, leeway included.
    token = make_token(exp=_now() - auth.LEEWAY_SECONDS + 2, iat=_now() - 600)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get(f"/api/{ALICE}/tasks", headers=headers).status_code == 200
    time.sleep(2.1)
    response = client.get(f"/api/{ALICE}/tasks", headers=headers)
    assert response.status_code == 401 and "expired" in response.get_json()["detail"]


def test_remembered_tokens_are_bounded_oldest_first() -> None:
    verified = auth.VerifiedTokens(max_entries=2)
    claims = {"sub": ALICE, "exp": _now() + 600}
    for token in ("first", "second", "third"):
        verified.add(token, claims, key_still_trusted=None)
    assert verified.get("first") is None
    assert verified.get("second") == claims and verified.get("third") == claims
    verified.add("fourth", claims, key_still_trusted=lambda: False)  # its key is no longer trusted
    assert verified.get("fourth") is None


def test_audience_and_issuer_checked_when_configured(database_url: str) -> None:
    application = make_app(database_url, JWT_AUDIENCE="tasks-api", JWT_ISSUER="https://auth.example")
    client = application.test_client()

    def status(**claims: Any) -> int:
        headers = {"Authorization": f"Bearer {make_token(**claims)}"}
        return client.get(f"/api/{ALICE}/tasks", headers=headers).status_code

    assert status(aud="tasks-api", iss="https://auth.example") == 200
    assert status(aud="other", iss="https://auth.example") == 401
    assert status(aud="tasks-api", iss="https://evil.example") == 401
    assert status(iss="https://auth.example") == 401
    application.extensions["db"].engine.dispose()


# --- authorisation: 403 and cross-user 404 -----------------------------------------------------

@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=ENDPOINT_IDS)
def test_403_when_sub_is_not_the_url_user(app: Any, as_user: Any, new_task: Any, method: str, path: str,
                                          body: Any) -> None:
    task = new_task("alice's", user=ALICE)
    response = as_user(method, path.format(id=task["id"]), user=BOB, url_user=ALICE, json=body)
    assert response.status_code == 403
    assert response.get_json() == {"detail": "You do not have access to these tasks."}
    assert ALICE not in response.get_data(as_text=True) and BOB not in response.get_data(as_text=True)
    assert run_sql(app, "SELECT user_id, title, completed FROM tasks") == [(ALICE, "alice's", False)]


@pytest.mark.parametrize("method,path,body", ENDPOINTS[2:], ids=ENDPOINT_IDS[2:])
def test_other_users_task_is_404_and_unchanged(app: Any, as_user: Any, new_task: Any, method: str, path: str,
                                               body: Any) -> None:
    task = new_task("alice's", user=ALICE)
    before = run_sql(app, "SELECT * FROM tasks")
    response = as_user(method, path.format(id=task["id"]), user=BOB, json=body)
    missing = as_user(method, path.format(id=task["id"] + 1000), user=BOB, json=body)
    assert response.status_code == 404 and missing.status_code == 404
    # Never reveal whether the id exists: the two answers are the same.
    assert response.get_json() == missing.get_json() == {"detail": "Task not found."}
    assert run_sql(app, "SELECT * FROM tasks") == before


@pytest.mark.parametrize("owner,other", [("alice", "Alice"), ("Alice", "alice"), ("alice", "ALICE"), ("alice", "ali"),
                                         ("ali", "alice"), ("alice", "alice2"), ("alice2", "alice")])
@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=ENDPOINT_IDS)
def test_user_ids_that_differ_only_by_case_or_a_suffix_are_different_users(
        app: Any, as_user: Any, new_task: Any, owner: str, other: str, method: str, path: str, body: Any) -> None:
    task = new_task("owner's", user=owner)
    response = as_user(method, path.format(id=task["id"]), user=other, url_user=owner, json=body)
    assert response.status_code == 403
    assert run_sql(app, "SELECT user_id, title, completed FROM tasks") == [(owner, "owner's", False)]


@pytest.mark.parametrize("path", ["/tasks", "/tasks?limit=1", "/tasks?limit=1&status=pending", "/tasks/{id}",
                                  "/tasks/999999"])
def test_head_with_another_users_token_is_a_403_that_reveals_nothing(client: Any, new_task: Any, path: str) -> None:
    # Flask answers HEAD with the GET view: the same two locks must hold.
    task = new_task()
    url = f"/api/{ALICE}" + path.format(id=task["id"])
    foreign = client.head(url, headers=auth_headers(BOB))
    assert foreign.status_code == 403 and foreign.data == b""
    assert "X-Total-Count" not in foreign.headers and "Content-Length" in foreign.headers
    own = client.head(url, headers=auth_headers(ALICE))
    assert own.status_code == (404 if path.endswith("999999") else 200) and own.data == b""
    if "limit" in path:
        assert own.headers["X-Total-Count"] == "1"


def test_403_comes_before_404_and_422(as_user: Any) -> None:
    assert as_user("get", "/tasks/999999", user=BOB, url_user=ALICE).status_code == 403
    assert as_user("post", json={"title": ""}, user=BOB, url_user=ALICE).status_code == 403
    assert as_user("post", data="x", headers={"Content-Type": "text/plain"}, user=BOB,
                   url_user=ALICE).status_code == 403


def test_401_comes_before_404_415_and_422(client: Any) -> None:
    assert client.get(f"/api/{ALICE}/tasks/abc").status_code == 401
    assert client.get(f"/api/{ALICE}/tasks/99999999999999").status_code == 401
    assert client.post(f"/api/{ALICE}/tasks", data="x", content_type="text/plain").status_code == 401
    assert client.post(f"/api/{ALICE}/tasks", json={"title": ""}).status_code == 401
    assert client.get(f"/api/{ALICE}/tasks?limit=0").status_code == 401


# --- validation --------------------------------------------------------------------------------

def _assert_422(response: Any, field: str) -> dict[str, Any]:
    assert response.status_code == 422, response.get_json()
    body = response.get_json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert any(error["field"] == field for error in body["errors"]), body
    for error in body["errors"]:
        assert set(error) == {"field", "message", "type"}
    return body


@pytest.mark.parametrize("title,ok", [
    ("x" * 200, True), ("x" * 201, False), ("  " + "x" * 200 + "  ", True), ("", False), ("   ", False),
    ("\t\n", False), ("a", True),
])
def test_title_length_boundaries(app: Any, as_user: Any, title: str, ok: bool) -> None:
    response = as_user("post", json={"title": title})
    if ok:
        assert response.status_code == 201 and response.get_json()["title"] == title.strip()
    else:
        _assert_422(response, "title")
        assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


@pytest.mark.parametrize("description,ok", [
    ("d" * 1000, True), ("d" * 1001, False), (" " + "d" * 1000 + " ", True), ("", True),
])
def test_description_length_boundaries(as_user: Any, description: str, ok: bool) -> None:
    response = as_user("post", json={"title": "t", "description": description})
    if ok:
        assert response.status_code == 201 and response.get_json()["description"] == description.strip()
    else:
        _assert_422(response, "description")


@pytest.mark.parametrize("body,field", [
    ({}, "title"),
    ({"description": "no title"}, "title"),
    ({"title": None}, "title"),
    ({"title": 5}, "title"),
    ({"title": ["a"]}, "title"),
    ({"title": {"text": "a"}}, "title"),
    ({"title": True}, "title"),
    ({"title": "ok", "description": 5}, "description"),
    ({"title": "ok", "description": ["x"]}, "description"),
    ({"title": "ok", "completed": "true"}, "completed"),
    ({"title": "ok", "completed": 1}, "completed"),
    ({"title": "ok", "completed": 0}, "completed"),
    ({"title": "ok", "completed": None}, "completed"),
    ({"title": "nul \u0000 inside"}, "title"),
    ({"title": "ok", "description": "nul \u0000"}, "description"),
])
def test_create_rejects_bad_fields(app: Any, as_user: Any, body: dict[str, Any], field: str) -> None:
    _assert_422(as_user("post", json=body), field)
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_lone_surrogate_is_422_not_500(app: Any, as_user: Any) -> None:
    response = as_user("post", data=b'{"title": "bad \\ud800 surrogate"}',
                       headers={"Content-Type": "application/json"})
    _assert_422(response, "title")
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_several_errors_are_all_reported(as_user: Any) -> None:
    body = _assert_422(as_user("post", json={"title": "", "description": 3, "completed": "no"}), "title")
    assert {error["field"] for error in body["errors"]} == {"title", "description", "completed"}


@pytest.mark.parametrize("raw", [b"not json", b"{", b'{"title": "a",}', b"[1, 2]", b'"a string"', b"null",
                                 b"42", b"\xff\xfe\x00", b"[" * 5000 + b"]" * 5000,
                                 b'{"title": ' + b"[" * 100000 + b"]" * 100000 + b"}"[:60000]])
def test_body_that_is_not_a_json_object_is_422(app: Any, as_user: Any, raw: bytes) -> None:
    response = as_user("post", data=raw, headers={"Content-Type": "application/json"})
    assert response.status_code in (413, 422), response.status_code
    if len(raw) <= 64 * 1024:
        _assert_422(response, "body")
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_deeply_nested_json_within_size_limit_is_422(as_user: Any) -> None:
    depth = 30000  # 60 KB: under the 64 KiB limit, deep enough to overflow a recursive parser
    raw = b'{"title": ' + b"[" * depth + b"]" * depth + b"}"
    assert len(raw) < 64 * 1024
    _assert_422(as_user("post", data=raw, headers={"Content-Type": "application/json"}), "body")


def test_missing_body_on_create_is_422(as_user: Any) -> None:
    _assert_422(as_user("post"), "body")


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", "application/xml"])
def test_non_json_content_type_is_415(app: Any, as_user: Any, content_type: str) -> None:
    response = as_user("post", data='{"title": "x"}', headers={"Content-Type": content_type})
    assert response.status_code == 415
    assert "application/json" in response.get_json()["detail"]
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_json_with_charset_is_accepted(as_user: Any) -> None:
    response = as_user("post", data=json.dumps({"title": "x"}),
                       headers={"Content-Type": "application/json; charset=utf-8"})
    assert response.status_code == 201


def test_body_over_64_kib_is_413(app: Any, as_user: Any) -> None:
    response = as_user("post", json={"title": "x", "description": "d" * (64 * 1024)})
    assert response.status_code == 413 and "64 KiB" in response.get_json()["detail"]
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


@pytest.mark.parametrize("method", ["put", "patch"])
@pytest.mark.parametrize("body,field", [
    ({}, "body"), ({"id": 5, "user_id": "x"}, "body"), ({"title": ""}, "title"), ({"title": None}, "title"),
    ({"title": "x" * 201}, "title"), ({"description": "d" * 1001}, "description"),
    ({"completed": "true"}, "completed"), ({"completed": 1}, "completed"),
    ({"title": "good", "completed": "bad"}, "completed"),
])
def test_update_rejects_bad_bodies_and_changes_nothing(app: Any, as_user: Any, new_task: Any, method: str,
                                                       body: dict[str, Any], field: str) -> None:
    task = new_task("keep", description="same")
    _assert_422(as_user(method, f"/tasks/{task['id']}", json=body), field)
    assert as_user("get", f"/tasks/{task['id']}").get_json() == task


def test_update_ignores_unknown_fields(as_user: Any, new_task: Any) -> None:
    task = new_task()
    response = as_user("put", f"/tasks/{task['id']}", json={"title": "new", "id": 1, "user_id": BOB})
    assert response.status_code == 200
    assert response.get_json()["id"] == task["id"] and response.get_json()["user_id"] == ALICE


@pytest.mark.parametrize("body", [{"completed": "true"}, {"completed": 1}, {"completed": None}, [True], "done"])
def test_toggle_rejects_bad_bodies(as_user: Any, new_task: Any, body: Any) -> None:
    task = new_task()
    response = as_user("patch", f"/tasks/{task['id']}/complete", json=body)
    assert response.status_code == 422
    assert as_user("get", f"/tasks/{task['id']}").get_json()["completed"] is False


@pytest.mark.parametrize("body", [{}, {"done": True}, {"isCompleted": True}, {"isCompleted": False, "title": "x"}])
def test_toggle_with_a_body_without_completed_flips(as_user: Any, new_task: Any, body: Any) -> None:
    # What real frontends send: every backend of this spec ignores the toggle's body.
    task = new_task("keep")
    first = as_user("patch", f"/tasks/{task['id']}/complete", json=body)
    assert first.status_code == 200 and first.get_json()["completed"] is True
    second = as_user("patch", f"/tasks/{task['id']}/complete", json=body)
    assert second.status_code == 200 and second.get_json()["completed"] is False
    assert second.get_json()["title"] == "keep"


@pytest.mark.parametrize("raw_id", ["abc", "0", "01", "-1", "1.5", "2147483648", "99999999999999999999", "1e3",
                                    "%20", "١٢"])
def test_bad_task_ids_are_404(as_user: Any, raw_id: str) -> None:
    for method, suffix in (("get", ""), ("put", ""), ("delete", ""), ("patch", "/complete")):
        response = as_user(method, f"/tasks/{raw_id}{suffix}", json={"title": "x"} if method == "put" else None)
        assert response.status_code == 404, (method, raw_id, response.status_code)
        assert response.get_json() == {"detail": "Task not found."}


# --- list query parameters ---------------------------------------------------------------------

@pytest.fixture
def three_tasks(as_user: Any, new_task: Any) -> list[dict[str, Any]]:
    tasks = [new_task("banana"), new_task("apple"), new_task("cherry")]
    as_user("patch", f"/tasks/{tasks[1]['id']}/complete", json={"completed": True})
    return tasks


def _ids(response: Any) -> list[int]:
    assert response.status_code == 200, response.get_json()
    return [task["id"] for task in response.get_json()]


def test_status_filter(as_user: Any, three_tasks: list[dict[str, Any]]) -> None:
    banana, apple, cherry = (task["id"] for task in three_tasks)
    assert _ids(as_user("get", "/tasks?status=completed")) == [apple]
    assert _ids(as_user("get", "/tasks?status=pending")) == [cherry, banana]
    assert _ids(as_user("get", "/tasks?status=all")) == [cherry, apple, banana]


def test_sort_and_order(as_user: Any, three_tasks: list[dict[str, Any]]) -> None:
    banana, apple, cherry = (task["id"] for task in three_tasks)
    assert _ids(as_user("get", "/tasks?sort=title")) == [apple, banana, cherry]
    assert _ids(as_user("get", "/tasks?sort=title&order=desc")) == [cherry, banana, apple]
    assert _ids(as_user("get", "/tasks?sort=created&order=asc")) == [banana, apple, cherry]
    # apple was updated last (it was completed after all three were created).
    assert _ids(as_user("get", "/tasks?sort=updated")) == [apple, cherry, banana]
    assert _ids(as_user("get", "/tasks?sort=updated&order=asc")) == [banana, cherry, apple]


def test_filters_and_totals_never_count_other_users_tasks(as_user: Any, new_task: Any) -> None:
    # Bob has tasks of both states, so a filter or a total that lost its owner condition shows.
    mine = new_task("mine, pending")
    done = new_task("mine, done", completed=True)
    for title, completed in (("bob pending", False), ("bob done", True), ("bob done 2", True)):
        new_task(title, user=BOB, completed=completed)
    assert _ids(as_user("get", "/tasks?status=pending")) == [mine["id"]]
    assert _ids(as_user("get", "/tasks?status=completed")) == [done["id"]]
    for query, total in (("limit=1", "2"), ("limit=1&status=completed", "1"), ("limit=5&offset=1", "2"),
                         ("limit=5&offset=50", "2"), ("limit=5&offset=50&status=completed", "1"),
                         ("limit=5&offset=50&status=pending", "1")):
        page = as_user("get", f"/tasks?{query}")
        assert page.headers["X-Total-Count"] == total, query
        assert all(task["user_id"] == ALICE for task in page.get_json())


def test_limit_offset_and_total(as_user: Any, three_tasks: list[dict[str, Any]]) -> None:
    banana, apple, cherry = (task["id"] for task in three_tasks)
    page = as_user("get", "/tasks?limit=2")
    assert _ids(page) == [cherry, apple] and page.headers["X-Total-Count"] == "3"
    page = as_user("get", "/tasks?limit=2&offset=2")
    assert _ids(page) == [banana] and page.headers["X-Total-Count"] == "3"
    page = as_user("get", "/tasks?limit=2&offset=10")
    assert _ids(page) == [] and page.headers["X-Total-Count"] == "3"
    page = as_user("get", "/tasks?limit=5&status=completed")
    assert _ids(page) == [apple] and page.headers["X-Total-Count"] == "1"
    page = as_user("get", "/tasks?offset=1")
    assert _ids(page) == [apple, banana] and "X-Total-Count" not in page.headers
    empty = as_user("get", "/tasks?limit=5", user="nobody")
    assert _ids(empty) == [] and empty.headers["X-Total-Count"] == "0"


@pytest.mark.parametrize("sort", ["created", "updated", "title"])
@pytest.mark.parametrize("order", ["asc", "desc"])
def test_pages_never_skip_or_repeat_with_ties(app: Any, as_user: Any, new_task: Any, sort: str, order: str) -> None:
    ids = [new_task("same title")["id"] for _ in range(7)]
    # Identical timestamps too, so only the id can break the tie.
    run_sql(app, "UPDATE tasks SET created_at = (SELECT min(created_at) FROM tasks), "
                 "updated_at = (SELECT min(created_at) FROM tasks)")
    seen: list[int] = []
    for offset in range(0, 7, 3):
        seen += _ids(as_user("get", f"/tasks?sort={sort}&order={order}&limit=3&offset={offset}"))
    assert sorted(seen) == sorted(ids) and len(seen) == 7
    assert seen == sorted(ids, reverse=(order == "desc"))


def test_a_long_list_is_the_same_json_array_sent_in_pieces(as_user: Any, new_task: Any) -> None:
    created = [new_task(f"tâche {index} 🎉", description="d" * 50) for index in range(STREAMED_LIST_FROM + 5)]
    response = as_user("get")
    assert response.status_code == 200 and "Content-Length" not in response.headers  # sent in pieces
    assert response.headers["Content-Type"] == "application/json"
    listed = json.loads(response.get_data())
    assert listed == list(reversed(created))
    assert response.get_data() == json.dumps(listed, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"
    pages = [as_user("get", f"/tasks?limit=50&offset={offset}").get_json() for offset in range(0, len(created), 50)]
    assert [task for page in pages for task in page] == listed
    short = as_user("get", "/tasks?status=completed")  # short lists are answered in one piece
    assert short.status_code == 200 and short.headers["Content-Length"] == "3" and short.get_data() == b"[]\n"


def test_the_per_user_task_limit_defaults_to_10000(app: Any) -> None:
    assert app.config["MAX_TASKS_PER_USER"] == 10_000


def test_a_create_past_the_per_user_limit_is_a_409_and_creates_nothing(database_url: str) -> None:
    application = make_app(database_url, MAX_TASKS_PER_USER=3)
    client = application.test_client()

    def create(user: str = ALICE) -> Any:
        return client.post(f"/api/{user}/tasks", json={"title": "t"}, headers=auth_headers(user))

    ids = [create().get_json()["id"] for _ in range(3)]
    refused = create()
    assert refused.status_code == 409
    assert refused.get_json() == {"detail": "You have reached the limit of 3 tasks; delete some to add more."}
    assert run_sql(application, "SELECT count(*) FROM tasks WHERE user_id = :u", u=ALICE)[0][0] == 3
    assert create(BOB).status_code == 201  # the limit is each user's own
    assert client.delete(f"/api/{ALICE}/tasks/{ids[0]}", headers=auth_headers()).status_code == 204
    assert create().status_code == 201
    application.extensions["db"].engine.dispose()


@postgres_only
def test_concurrent_creates_overshoot_the_limit_by_at_most_their_number(database_url: str) -> None:
    application = make_app(database_url, MAX_TASKS_PER_USER=5)
    url = f"/api/{ALICE}/tasks"
    statuses = _in_threads(8, lambda _: [application.test_client().post(url, json={"title": "t"},
                                                                         headers=auth_headers()).status_code
                                         for _ in range(3)])
    assert {status for batch in statuses for status in batch} <= {201, 409}
    stored = run_sql(application, "SELECT count(*) FROM tasks")[0][0]
    assert 5 <= stored <= 5 + 8 and stored == sum(batch.count(201) for batch in statuses)
    application.extensions["db"].engine.dispose()


def test_unknown_query_parameters_are_ignored(as_user: Any, three_tasks: Any) -> None:
    assert len(_ids(as_user("get", "/tasks?_=12345&foo=bar"))) == 3


@pytest.mark.parametrize("query,field", [
    ("status=done", "status"), ("status=", "status"), ("sort=priority", "sort"), ("order=up", "order"),
    ("limit=0", "limit"), ("limit=1001", "limit"), ("limit=-1", "limit"), ("limit=abc", "limit"),
    ("limit=1.5", "limit"), ("limit=", "limit"), ("offset=-1", "offset"), ("offset=x", "offset"),
    ("offset=99999999999999999999", "offset"), ("limit=%EF%BC%91", "limit"),
])
def test_invalid_query_parameters_are_422(as_user: Any, query: str, field: str) -> None:
    _assert_422(as_user("get", f"/tasks?{query}"), field)


@pytest.mark.parametrize("limit", ["1", "1000"])
def test_limit_boundaries_accepted(as_user: Any, limit: str) -> None:
    response = as_user("get", f"/tasks?limit={limit}")
    assert response.status_code == 200 and response.headers["X-Total-Count"] == "0"


# --- errors are JSON ---------------------------------------------------------------------------

def test_unknown_route_is_json_404(client: Any) -> None:
    for url in ("/nope", "/api", f"/api/{ALICE}", f"/api/{ALICE}/tasks/1/2", f"/api/{ALICE}/tasks/"):
        response = client.get(url, headers=auth_headers())
        assert response.status_code == 404, url
        assert response.headers["Content-Type"].startswith("application/json")
        assert response.get_json() == {"detail": "The requested resource was not found."}


def test_wrong_method_is_json_405_with_allow(client: Any) -> None:
    response = client.delete(f"/api/{ALICE}/tasks", headers=auth_headers())
    assert response.status_code == 405
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}
    assert response.get_json() == {"detail": "This method is not allowed on this URL."}
    response = client.post(f"/api/{ALICE}/tasks/1/complete", headers=auth_headers())
    assert response.status_code == 405 and "PATCH" in response.headers["Allow"]


def test_unexpected_error_is_json_500_and_logged(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/boom")
    assert response.status_code == 500
    assert response.get_json() == {"detail": "Internal server error"}
    assert "hunter2" not in response.get_data(as_text=True)
    assert any("hunter2" in (record.exc_text or "") or record.exc_info for record in caplog.records)


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
        application = make_app(f"postgresql://postgres@127.0.0.1:{port}/none", DB_CONNECT_TIMEOUT=2,
                               DB_QUERY_TIMEOUT=8)
        started = time.monotonic()
        response = application.test_client().get(f"/api/{ALICE}/tasks", headers=auth_headers())
        assert response.status_code == 503
        # DB_CONNECT_TIMEOUT bounds the connection's setup (libpq leaves it to the wait callback).
        assert 1.5 < time.monotonic() - started < 5
    finally:
        silent.close()


class FakePostgres:
    """A server on a loopback port that speaks just enough of PostgreSQL's protocol to refuse a login.

    `fatal` is the (SQLSTATE, message) of the FATAL error it answers every startup with, as a real server
    does for a wrong password; None closes each connection instead (an outage, as libpq sees it).
    """

    def __init__(self, fatal: tuple[str, str] | None) -> None:
        self.fatal = fatal
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def url(self, password: str = "wrong-password") -> str:
        return f"postgresql://postgres:{password}@127.0.0.1:{self.port}/tasks"

    def _serve(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with client:
                try:
                    self._refuse(client)
                except OSError:
                    pass

    def _refuse(self, client: socket.socket) -> None:
        while True:
            length = int.from_bytes(client.recv(4), "big")
            code = int.from_bytes(client.recv(4), "big")
            client.recv(max(length - 8, 0))
            if code != 80877103:  # not an SSLRequest: the startup message itself
                break
            client.sendall(b"N")  # no TLS here; libpq goes on in plain text (sslmode=prefer)
        if self.fatal is None:
            return
        sqlstate, message = self.fatal
        fields = b"".join(kind + value.encode() + b"\0" for kind, value in
                          ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))) + b"\0"
        client.sendall(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture
def fake_postgres() -> Iterator[Callable[..., FakePostgres]]:
    servers: list[FakePostgres] = []

    def start(fatal: tuple[str, str] | None) -> FakePostgres:
        servers.append(FakePostgres(fatal))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


WRONG_PASSWORD = ("28P01", 'password authentication failed for user "postgres"')


def test_a_wrong_database_password_refuses_to_start_in_one_sentence(fake_postgres: Callable[..., FakePostgres]) -> None:
    server = fake_postgres(WRONG_PASSWORD)
    with pytest.raises(ConfigError) as raised:
        make_app(server.url(password="hunter2-secret"))
    assert str(raised.value) == ("The database refused the password: set the right one in DATABASE_URL "
                                 "(percent-encoded).")


@postgres_only
@pytest.mark.parametrize("change,sentence", [
    ({"database": "no_such_database_here"}, "^The database named in DATABASE_URL does not exist"),
    ({"username": "no_such_role_here"}, "^The database server has no such user"),
    ({"query": {"sslmode": "require"}}, "^DATABASE_URL asks for TLS"),
])
def test_database_settings_that_cannot_work_refuse_to_start(postgres_url: str, change: dict[str, Any],
                                                           sentence: str) -> None:
    url = make_url(postgres_url).set(**change).render_as_string(hide_password=False)
    with pytest.raises(ConfigError, match=sentence):
        make_app(url)


def test_a_configuration_error_while_serving_is_a_500_the_log_explains(fake_postgres: Callable[..., FakePostgres],
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    server = fake_postgres(None)  # down at startup: the service starts and answers 503s
    with caplog.at_level(logging.WARNING):
        application = make_app(server.url(), DB_CONNECT_TIMEOUT=2)
    client = application.test_client()
    down = client.get(f"/api/{ALICE}/tasks", headers=auth_headers())
    assert down.status_code == 503 and down.headers["Retry-After"]
    server.fatal = WRONG_PASSWORD  # then it answers, and refuses the password: no retry will fix that
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        for response in (client.get(f"/api/{ALICE}/tasks", headers=auth_headers()),
                         client.post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers()),
                         client.get("/health/ready")):
            assert response.status_code == 500 and "Retry-After" not in response.headers
            assert response.get_json() == {"detail": MISCONFIGURED}
    errors = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert errors and all(message == "configuration error: The database refused the password: set the right one in "
                          "DATABASE_URL (percent-encoded)." for message in errors)
    assert not [record for record in caplog.records if "unavailable" in record.getMessage()]
    assert client.get("/health").status_code == 200  # the process itself is alive


@pytest.mark.parametrize("postgresql,sqlite", [
    # PostgreSQL files SQLSTATE 54000 (program_limit_exceeded) under OperationalError, as it does an outage.
    ("SELECT '{{{{{{{{1}}}}}}}}'::int[]", "SELECT json('not json')"),
])
def test_a_database_error_that_a_retry_would_repeat_is_a_500_not_a_503(app: Any, postgresql: str, sqlite: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    import db

    @app.get("/deterministic")
    def deterministic() -> None:
        db.run(text(postgresql if ON_POSTGRES else sqlite), {})

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/deterministic")
    assert response.status_code == 500 and "Retry-After" not in response.headers
    assert response.get_json() == {"detail": "Internal server error"}
    assert any("a retry would repeat" in record.getMessage() for record in caplog.records)


def test_a_sub_longer_than_an_index_can_hold_is_a_401_not_a_503(app: Any, as_user: Any) -> None:
    longest = "u" * auth.MAX_USER_ID_LENGTH
    assert as_user("post", json={"title": "fits"}, user=longest).status_code == 201
    for sub in ("u" * (auth.MAX_USER_ID_LENGTH + 1), "u" * 2800, "😀" * 700):
        response = as_user("post", json={"title": "too long a sub"}, user=sub)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert run_sql(app, "SELECT user_id FROM tasks") == [(longest,)]


@postgres_only
@pytest.mark.parametrize("encoding", ["SQL_ASCII", "LATIN1"])
def test_a_database_that_cannot_store_unicode_refuses_to_start(postgres_url: str, encoding: str) -> None:
    name = f"{make_url(postgres_url).database}_{encoding.lower()}"
    admin = _admin_connection(postgres_url)
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}" ENCODING \'{encoding}\' LC_COLLATE \'C\' LC_CTYPE \'C\' '
                       f'TEMPLATE template0')
    try:
        with pytest.raises(ConfigError, match=f"^The database in DATABASE_URL uses the {encoding} encoding"):
            make_app(make_url(postgres_url).set(database=name).render_as_string(hide_password=False))
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()


# --- CORS --------------------------------------------------------------------------------------

ORIGIN = "http://localhost:3000"


def test_preflight_needs_no_token(client: Any) -> None:
    response = client.options(f"/api/{ALICE}/tasks/1", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "DELETE",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "DELETE" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


@pytest.mark.parametrize("status,request_kwargs", [
    (401, {}),
    (403, {"headers": auth_headers(BOB)}),
    (404, {"headers": auth_headers(), "path": "/tasks/12345"}),
    (422, {"headers": auth_headers(), "path": "/tasks?limit=0"}),
])
def test_cors_headers_on_errors(client: Any, status: int, request_kwargs: dict[str, Any]) -> None:
    path = request_kwargs.get("path", "/tasks")
    headers = {"Origin": ORIGIN, **request_kwargs.get("headers", {})}
    response = client.get(f"/api/{ALICE}{path}", headers=headers)
    assert response.status_code == status
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Total-Count" in response.headers["Access-Control-Expose-Headers"]


def test_cors_on_500(app: Any) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("x")

    response = app.test_client().get("/boom", headers={"Origin": ORIGIN})
    assert response.status_code == 500 and response.headers["Access-Control-Allow-Origin"] == ORIGIN


def test_cors_exposes_location_on_create(as_user: Any) -> None:
    response = as_user("post", json={"title": "x"}, headers={"Origin": ORIGIN})
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Location" in response.headers["Access-Control-Expose-Headers"]


def test_unlisted_origin_gets_no_cors_headers(client: Any) -> None:
    response = client.get(f"/api/{ALICE}/tasks", headers={"Origin": "https://evil.example", **auth_headers()})
    assert "Access-Control-Allow-Origin" not in response.headers


def test_request_without_origin_gets_no_cors_headers(as_user: Any) -> None:
    # Not a CORS request (curl, server to server): nothing to allow, and nothing computed.
    response = as_user("get")
    assert response.status_code == 200
    assert not [name for name in response.headers.keys() if name.startswith("Access-Control-")]


@pytest.mark.parametrize("path", ["/health", "/openapi.json", "/docs"])
def test_cacheable_answers_vary_by_origin(client: Any, path: str) -> None:
    # Their CORS headers depend on Origin, and nothing forbids caching them.
    plain, cross = client.get(path), client.get(path, headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in plain.headers
    assert cross.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in plain.headers.get("Vary", "") and "Origin" in cross.headers.get("Vary", "")


def test_preflight_allows_credentials_and_the_request_id_header(client: Any) -> None:
    # fetch(..., {credentials: "include", headers: {"X-Request-ID": ...}}) from the frontend's origin.
    response = client.options(f"/api/{ALICE}/tasks", headers={
        "Origin": ORIGIN, "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type, x-request-id"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN  # never "*" with credentials
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    allowed = {name.strip().lower() for name in response.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"authorization", "content-type", "x-request-id"} <= allowed


def test_credentialed_responses_name_the_origin_and_allow_credentials(as_user: Any) -> None:
    response = as_user("get", headers={"Origin": ORIGIN, "X-Request-ID": "from-the-browser"})
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert response.headers["Access-Control-Allow-Credentials"] == "true"
    assert response.headers["X-Request-ID"] == "from-the-browser"
    # Credentials are allowed, but the API still reads no cookie: only the Bearer token counts.
    assert as_user("get", headers={"Origin": ORIGIN, "Authorization": "", "Cookie": "session=x"}).status_code == 401


@pytest.mark.parametrize("entry", ["*", "https://*.example.com", "https://app.example.com/", "https://app.example.com/app",
                                   "app.example.com", "ftp://app.example.com", "https://app.example.com:port",
                                   "https://user@app.example.com", "null", "https://app.example.com?x=1"])
def test_cors_origins_must_be_exact_origins(database_url: str, entry: str) -> None:
    with pytest.raises(ConfigError, match="^CORS_ORIGINS entries must be exact origins"):
        make_app(database_url, CORS_ORIGINS=f"http://localhost:3000, {entry}")


@pytest.mark.parametrize("origin", ["https://xexample.com.evil.net", "https://app.example.com.evil.net",
                                    "https://evilapp.example.com", "http://app.example.com", "https://app.example.co",
                                    "https://APP.example.com.evil.net", "null"])
def test_lookalike_origins_get_no_cors_headers(database_url: str, origin: str) -> None:
    application = make_app(database_url, CORS_ORIGINS="https://app.example.com")
    response = application.test_client().get("/health", headers={"Origin": origin})
    assert "Access-Control-Allow-Origin" not in response.headers
    assert application.test_client().get("/health", headers={"Origin": "https://app.example.com"}).headers[
        "Access-Control-Allow-Origin"] == "https://app.example.com"
    application.extensions["db"].engine.dispose()


def test_cors_origins_from_configuration(database_url: str) -> None:
    application = make_app(database_url, CORS_ORIGINS="https://app.example, https://www.app.example")
    client = application.test_client()
    for origin in ("https://app.example", "https://www.app.example"):
        response = client.get("/health", headers={"Origin": origin})
        assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": ORIGIN}).headers
    application.extensions["db"].engine.dispose()


# --- configuration -----------------------------------------------------------------------------

def test_missing_secret_refuses_to_start(database_url: str) -> None:
    with pytest.raises(RuntimeError, match="BETTER_AUTH_SECRET is not set"):
        create_app({"DATABASE_URL": database_url})


def test_the_published_development_secret_is_refused_outside_python_app_py(database_url: str) -> None:
    # Anyone can read it in this repository, so anyone could forge tokens with it.
    with pytest.raises(ConfigError, match="^BETTER_AUTH_SECRET is the development secret published"):
        make_app(database_url, BETTER_AUTH_SECRET=DEV_SECRET)


@pytest.mark.parametrize("setting,value,sentence", [
    ("LOG_LEVEL", "TRACE", "^LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'TRACE'.$"),
    ("DATABASE_URL", "localhost/tasks", "^DATABASE_URL must look like postgresql://"),
    ("DATABASE_URL", "postgresql://user@host:abc/db", "^DATABASE_URL cannot be parsed"),
    ("DATABASE_URL", "postgresql://user:p@ss@127.0.0.1/db", "^DATABASE_URL has a raw @ in its password"),
    ("MAX_TASKS_PER_USER", "lots", "^MAX_TASKS_PER_USER must be a whole number"),
])
def test_configuration_mistakes_are_one_sentence(database_url: str, setting: str, value: str, sentence: str) -> None:
    with pytest.raises(ConfigError, match=sentence) as raised:
        make_app(database_url, **{setting: value})
    assert "\n" not in str(raised.value) and "ss@" not in str(raised.value)


def test_short_secret_warns(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        application = make_app(database_url, BETTER_AUTH_SECRET="short")
    assert any("shorter than 32 bytes" in record.getMessage() for record in caplog.records)
    assert all("short" != record.getMessage() for record in caplog.records)
    application.extensions["db"].engine.dispose()


def test_dev_secret_only_when_allowed(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        application = create_app({"DATABASE_URL": database_url, "ALLOW_DEV_SECRET": True})
    assert application.config["BETTER_AUTH_SECRET"] == DEV_SECRET
    assert any("DEVELOPMENT secret" in record.getMessage() for record in caplog.records)
    application.extensions["db"].engine.dispose()


def test_environment_is_read_and_mapping_wins(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    monkeypatch.setenv("BETTER_AUTH_SECRET", "from-the-environment-0123456789abcdef")
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    monkeypatch.setenv("CORS_ORIGINS", "https://env.example")
    application = create_app({"DATABASE_URL": database_url, "CORS_ORIGINS": "https://mapping.example"})
    assert application.config["BETTER_AUTH_SECRET"] == "from-the-environment-0123456789abcdef"
    assert application.config["DB_POOL_SIZE"] == 7
    assert application.config["CORS_ORIGINS"] == "https://mapping.example"
    application.extensions["db"].engine.dispose()


def test_bad_integer_setting_is_a_clear_error(database_url: str) -> None:
    with pytest.raises(RuntimeError, match="DB_POOL_SIZE must be a whole number"):
        make_app(database_url, DB_POOL_SIZE="many")


@pytest.mark.parametrize("raw,expected", [
    ("postgres://u:p@host/db", "postgresql+psycopg2://u:p@host/db"),
    ("postgresql://u:p@ep-x-pooler.neon.tech/neondb?sslmode=require&channel_binding=require",
     "postgresql+psycopg2://u:p@ep-x-pooler.neon.tech/neondb?sslmode=require&channel_binding=require"),
    ("postgresql+psycopg2://u@h:5433/d", "postgresql+psycopg2://u@h:5433/d"),
    ("sqlite:///tasks.db", "sqlite:///tasks.db"),
    ("postgres://u:p%40ss@h/d", "postgresql+psycopg2://u:p%40ss@h/d"),
])
def test_database_url_normalisation(raw: str, expected: str) -> None:
    assert normalise_database_url(raw) == expected


def test_database_url_default_is_sqlite_file_in_working_directory(monkeypatch: pytest.MonkeyPatch,
                                                                  tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    application = create_app({"BETTER_AUTH_SECRET": SECRET})
    assert application.config["DATABASE_URL"] == "sqlite:///tasks.db"
    assert (tmp_path / "tasks.db").exists()
    application.extensions["db"].engine.dispose()


def test_token_cli_prints_a_valid_token(app: Any) -> None:
    result = app.test_cli_runner().invoke(args=["token", "carol", "--email", "c@example.com"])
    assert result.exit_code == 0
    claims = jwt.decode(result.output.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "carol" and claims["email"] == "c@example.com" and claims["exp"] > time.time()


def test_issued_token_works_against_the_api(client: Any) -> None:
    token = issue_token(SECRET, "dave")
    response = client.get("/api/dave/tasks", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200


# --- users table -------------------------------------------------------------------------------

def test_first_write_registers_user_from_claims(app: Any, client: Any) -> None:
    headers = auth_headers("erin", email="erin@example.com", name="Erin")
    assert client.post("/api/erin/tasks", json={"title": "a"}, headers=headers).status_code == 201
    assert client.post("/api/erin/tasks", json={"title": "b"}, headers=headers).status_code == 201
    assert run_sql(app, "SELECT id, email, name FROM users") == [("erin", "erin@example.com", "Erin")]


def test_reads_do_not_register_users(app: Any, as_user: Any) -> None:
    as_user("get", user="reader")
    assert run_sql(app, "SELECT count(*) FROM users")[0][0] == 0


def test_deleting_a_user_cascades_to_tasks(app: Any, new_task: Any, as_user: Any) -> None:
    new_task("a"), new_task("b"), new_task("keep", user=BOB)
    run_sql(app, "DELETE FROM users WHERE id = :id", id=ALICE)
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
        connection.execute(text(f"CREATE TABLE {quoted} (id TEXT PRIMARY KEY, name TEXT NOT NULL, "
                                f"email TEXT NOT NULL, \"emailVerified\" BOOLEAN NOT NULL DEFAULT false)"))
        connection.execute(text(f"INSERT INTO {quoted} (id, name, email) VALUES ('alice', 'Alice', 'a@x')"))
    return engine


@pytest.mark.parametrize("table,configured", [("user", None), ("users", None), ("accounts", "accounts")])
def test_auth_owned_users_table_is_used_and_never_written(database_url: str, table: str,
                                                          configured: str | None) -> None:
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


@pytest.mark.parametrize("id_type", ["INTEGER", "uuid"])
def test_a_users_table_whose_ids_are_not_text_is_refused_in_one_sentence(database_url: str, id_type: str) -> None:
    if id_type == "uuid" and not ON_POSTGRES:
        pytest.skip("SQLite has no uuid type")
    engine = create_engine(normalise_database_url(database_url))
    with engine.begin() as connection:
        connection.execute(text(f'CREATE TABLE "user" (id {id_type} PRIMARY KEY, name TEXT)'))
    engine.dispose()
    with pytest.raises(ConfigError, match="^The users table 'user' has ids of type") as raised:
        make_app(database_url)
    assert "\n" not in str(raised.value)


def test_users_table_setting_naming_a_missing_table_is_an_error(database_url: str) -> None:
    with pytest.raises(RuntimeError, match="USERS_TABLE names the table 'members', which does not exist"):
        make_app(database_url, USERS_TABLE="members")


# --- concurrency -------------------------------------------------------------------------------

def _in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
    results: list[Any] = [None] * count
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = work(index)
        except BaseException as error:  # collected and re-raised in the main thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    if errors:
        raise errors[0]
    return results


@postgres_only
def test_concurrent_toggles_with_body_end_in_requested_state(app: Any, new_task: Any) -> None:
    task = new_task()
    path = f"/api/{ALICE}/tasks/{task['id']}/complete"

    def toggle(index: int) -> int:
        client = app.test_client()
        statuses = []
        for round_number in range(5):
            wanted = (index + round_number) % 2 == 0
            statuses.append(client.patch(path, json={"completed": wanted}, headers=auth_headers()).status_code)
        # Everyone's last word is the same: the task must end completed.
        statuses.append(client.patch(path, json={"completed": True}, headers=auth_headers()).status_code)
        return statuses

    results = _in_threads(8, toggle)
    assert all(status == 200 for statuses in results for status in statuses)
    assert run_sql(app, "SELECT completed FROM tasks WHERE id = :id", id=task["id"]) == [(True,)]


@postgres_only
def test_concurrent_flips_lose_no_update(app: Any, new_task: Any) -> None:
    task = new_task()
    path = f"/api/{ALICE}/tasks/{task['id']}/complete"
    flips = _in_threads(8, lambda _: [app.test_client().patch(path, headers=auth_headers()).status_code
                                      for _ in range(5)])
    assert sum(len(statuses) for statuses in flips) == 40
    assert run_sql(app, "SELECT completed FROM tasks WHERE id = :id", id=task["id"]) == [(False,)]


@postgres_only
def test_concurrent_updates_leave_newest_updated_at(app: Any, new_task: Any) -> None:
    task = new_task()
    path = f"/api/{ALICE}/tasks/{task['id']}"
    responses = _in_threads(8, lambda index: app.test_client().put(
        path, json={"title": f"title {index}"}, headers=auth_headers()).get_json())
    final = app.test_client().get(path, headers=auth_headers()).get_json()
    assert final["title"] in {f"title {index}" for index in range(8)}
    assert parse_time(final["updated_at"]) >= max(parse_time(body["updated_at"]) for body in responses)


def test_app_instances_create_tables_at_once_on_empty_database(database_url: str) -> None:
    apps = _in_threads(4, lambda _: make_app(database_url))
    engine = apps[0].extensions["db"].engine
    assert {"tasks", "users"} <= set(inspect(engine).get_table_names())
    clients = [application.test_client() for application in apps]
    for index, client in enumerate(clients):
        assert client.post(f"/api/{ALICE}/tasks", json={"title": f"t{index}"},
                           headers=auth_headers()).status_code == 201
    assert run_sql(apps[0], "SELECT count(*) FROM tasks")[0][0] == 4
    for application in apps:
        application.extensions["db"].engine.dispose()


def test_schema_created_on_first_use_when_database_was_down(database_url: str, monkeypatch: pytest.MonkeyPatch,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    import db

    real_create = db.create_schema
    calls = {"count": 0}

    def flaky_create(engine: Any, users_table: Any = None) -> Any:
        calls["count"] += 1
        if calls["count"] == 1:
            raise db.exc.OperationalError("SELECT 1", {}, Exception("database is waking up"))
        return real_create(engine, users_table)

    monkeypatch.setattr(db, "create_schema", flaky_create)
    with caplog.at_level(logging.WARNING):
        application = make_app(database_url)
    assert any("unreachable at startup" in record.getMessage() for record in caplog.records)
    response = application.test_client().post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers())
    assert response.status_code == 201 and calls["count"] == 2
    application.extensions["db"].engine.dispose()


# --- round trips: one statement per request, on both databases ---------------------------------

def test_each_request_is_one_statement(app: Any, as_user: Any, new_task: Any) -> None:
    engine = app.extensions["db"].engine
    statements: list[str] = []
    new_task("warm up")  # registers alice and opens the pool's connection

    @event.listens_for(engine, "before_cursor_execute")
    def count(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        statements.append(statement)

    def cost(method: str, path: str = "/tasks", **kwargs: Any) -> int:
        statements.clear()
        response = as_user(method, path, **kwargs)
        assert response.status_code < 300, response.get_json()
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


@postgres_only
def test_terminated_idle_connection_is_replaced_without_error(app: Any, as_user: Any, new_task: Any) -> None:
    new_task("before")
    database = app.extensions["db"].engine.url.database
    admin = _admin_connection(TEST_DB_URL)
    with admin.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = %s AND state = 'idle' AND pid <> pg_backend_pid()", (database,))
        assert cursor.rowcount >= 1
    admin.close()
    time.sleep(0.2)  # let the FATAL message reach the pooled socket
    for _ in range(3):
        assert as_user("get").status_code == 200
    assert as_user("post", json={"title": "after"}).status_code == 201


# --- Better Auth's JWKS (asymmetric tokens) ----------------------------------------------------

AUTH_URL = "http://auth.test"


class SigningKey:
    """A generated key pair with its public JWK, as Better Auth's jwt plugin would publish it."""

    def __init__(self, algorithm: str, kid: str) -> None:
        self.algorithm, self.kid = algorithm, kid
        if algorithm == "EdDSA":
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif algorithm == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": kid, "alg": algorithm}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo)

    def token(self, sub: str = ALICE, *, kid: str | None = None, **claims: Any) -> str:
        now = _now()
        payload = {"sub": sub, "iat": now, "exp": now + 900, "iss": AUTH_URL, "aud": AUTH_URL, **claims}
        return jwt.encode(payload, self.private, algorithm=self.algorithm, headers={"kid": kid or self.kid})


class JWKSServer:
    """A JWKS endpoint in a thread of the test process; counts fetches; can be taken down."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self.failing = False
        self.garbage = False  # answer with a broken HTTP status line
        self.extra_entries: list[Any] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.fetches += 1
                if server.garbage:
                    self.wfile.write(b"NOT-HTTP\r\n\r\n")
                    return
                if server.failing:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps({"keys": server.extra_entries + [key.jwk for key in server.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/auth/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def signing_keys() -> dict[str, SigningKey]:
    return {algorithm: SigningKey(algorithm, f"kid-{algorithm}") for algorithm in ("EdDSA", "ES256", "RS256")}


@pytest.fixture
def jwks_server(signing_keys: dict[str, SigningKey]) -> Iterator[JWKSServer]:
    server = JWKSServer(list(signing_keys.values()))
    yield server
    server.close()


@pytest.fixture
def jwks_app_with(database_url: str, jwks_server: JWKSServer) -> Iterator[Callable[..., Any]]:
    """Build apps in JWKS mode (the test server's keys) with more settings; disposed after the test."""
    built: list[Any] = []

    def build(**settings: Any) -> Any:
        application = make_app(database_url, **{"BETTER_AUTH_URL": AUTH_URL, "JWKS_URL": jwks_server.url,
                                                 **settings})
        built.append(application)
        return application

    yield build
    for application in built:
        application.extensions["db"].engine.dispose()


@pytest.fixture
def jwks_app(jwks_app_with: Callable[..., Any]) -> Any:
    return jwks_app_with(JWKS_REFETCH_SECONDS=60)


def _get_tasks(application: Any, token: str, user: str = ALICE) -> Any:
    return application.test_client().get(f"/api/{user}/tasks", headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
def test_jwks_tokens_of_each_algorithm_are_accepted(jwks_app: Any, signing_keys: dict[str, SigningKey],
                                                    algorithm: str) -> None:
    token = signing_keys[algorithm].token()
    assert _get_tasks(jwks_app, token).status_code == 200
    created = jwks_app.test_client().post(f"/api/{ALICE}/tasks", json={"title": "via JWKS"},
                                          headers={"Authorization": f"Bearer {token}"})
    assert created.status_code == 201 and created.get_json()["user_id"] == ALICE
    assert _get_tasks(jwks_app, token, user=BOB).status_code == 403


def test_hs256_keeps_working_beside_jwks(jwks_app: Any) -> None:
    assert _get_tasks(jwks_app, make_token()).status_code == 200


def test_jwks_is_fetched_once_and_cached(jwks_app: Any, jwks_server: JWKSServer,
                                         signing_keys: dict[str, SigningKey]) -> None:
    for _ in range(5):
        assert _get_tasks(jwks_app, signing_keys["EdDSA"].token()).status_code == 200
    assert jwks_server.fetches == 1


def test_jwks_key_rotation_is_picked_up(jwks_app_with: Callable[..., Any], jwks_server: JWKSServer,
                                        signing_keys: dict[str, SigningKey]) -> None:
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0)
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200
    rotated = SigningKey("EdDSA", "kid-rotated")
    jwks_server.keys.append(rotated)
    assert _get_tasks(application, rotated.token()).status_code == 200
    assert jwks_server.fetches == 2


def test_unknown_kid_is_401_and_refetches_at_most_once_per_interval(jwks_app: Any, jwks_server: JWKSServer,
                                                                     signing_keys: dict[str, SigningKey]) -> None:
    assert _get_tasks(jwks_app, signing_keys["EdDSA"].token()).status_code == 200
    for attempt in range(5):
        response = _get_tasks(jwks_app, signing_keys["EdDSA"].token(kid=f"made-up-{attempt}"))
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    # The first fetch was seconds ago, within the 60 s interval: no refetch at all.
    assert jwks_server.fetches == 1


@pytest.mark.parametrize("claims", [
    {"iss": "https://evil.example"}, {"aud": "https://other.example"}, {"iss": None}, {"aud": None},
    {"exp": 1_000_000_000}, {"sub": ""},
], ids=["wrong iss", "wrong aud", "no iss", "no aud", "expired", "empty sub"])
def test_jwks_token_claims_are_checked(jwks_app: Any, signing_keys: dict[str, SigningKey],
                                       claims: dict[str, Any]) -> None:
    key = signing_keys["ES256"]
    now = _now()
    payload = {"sub": ALICE, "iat": now, "exp": now + 900, "iss": AUTH_URL, "aud": AUTH_URL, **claims}
    payload = {name: value for name, value in payload.items() if value is not None}
    token = jwt.encode(payload, key.private, algorithm="ES256", headers={"kid": key.kid})
    assert _get_tasks(jwks_app, token).status_code == 401


def test_jwks_token_signed_by_another_key_with_known_kid_is_401(jwks_app: Any,
                                                                signing_keys: dict[str, SigningKey]) -> None:
    impostor = SigningKey("EdDSA", signing_keys["EdDSA"].kid)
    assert _get_tasks(jwks_app, impostor.token()).status_code == 401


def test_jwks_token_whose_alg_differs_from_its_key_is_401(jwks_app: Any,
                                                          signing_keys: dict[str, SigningKey]) -> None:
    # Signed with the ES256 key but claiming the RS256 key's kid.
    assert _get_tasks(jwks_app, signing_keys["ES256"].token(kid="kid-RS256")).status_code == 401


@pytest.mark.parametrize("with_secret", [True, False])
def test_hs256_token_is_never_verified_with_jwks_key_material(jwks_app_with: Callable[..., Any],
                                                              jwks_server: JWKSServer,
                                                              signing_keys: dict[str, SigningKey],
                                                              with_secret: bool) -> None:
    """Algorithm confusion: an HS256 token 'signed' with a public key the JWKS publishes."""
    application = jwks_app_with(BETTER_AUTH_SECRET=SECRET if with_secret else None)
    rsa_key, ed_key = signing_keys["RS256"], signing_keys["EdDSA"]
    now = _now()
    claims = {"sub": ALICE, "iat": now, "exp": now + 900, "iss": AUTH_URL, "aud": AUTH_URL}
    forged = [
        # PyJWT itself refuses a PEM public key as an HMAC secret, so sign these by hand.
        _hs256_by_hand(claims, rsa_key.public_pem(), kid=rsa_key.kid),
        _hs256_by_hand(claims, json.dumps(rsa_key.jwk).encode(), kid=rsa_key.kid),
        _hs256_by_hand(claims, jwt.utils.base64url_decode(ed_key.jwk["x"]), kid=ed_key.kid),
    ]
    for token in forged:
        assert _get_tasks(application, token).status_code == 401
    assert run_sql(application, "SELECT count(*) FROM tasks")[0][0] == 0


def _hs256_by_hand(claims: dict[str, Any], key: bytes, *, kid: str) -> str:
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(claims).encode())
    signing_input = header + b"." + payload
    signature = jwt.utils.base64url_encode(hmac.new(key, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


def test_jwks_down_is_503_not_401(jwks_app_with: Callable[..., Any], jwks_server: JWKSServer,
                                  signing_keys: dict[str, SigningKey]) -> None:
    jwks_server.failing = True
    application = jwks_app_with(JWKS_REFETCH_SECONDS=60)
    for _ in range(3):
        response = _get_tasks(application, signing_keys["EdDSA"].token())
        assert response.status_code == 503
        assert response.get_json()["detail"] and response.headers["Retry-After"]
    assert jwks_server.fetches == 1  # an outage is not hammered
    # HS256 tokens do not depend on the JWKS.
    assert _get_tasks(application, make_token()).status_code == 200


def test_jwks_unreachable_host_is_503(jwks_app_with: Callable[..., Any], signing_keys: dict[str, SigningKey]) -> None:
    application = jwks_app_with(JWKS_URL="http://127.0.0.1:1/jwks")
    assert _get_tasks(application, signing_keys["RS256"].token()).status_code == 503


def test_jwks_keys_stay_trusted_through_an_outage_up_to_the_bound_and_no_longer(
        jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]) -> None:
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0, JWKS_MAX_AGE_SECONDS=0.3, JWKS_STALE_IF_ERROR_SECONDS=1)
    remembered = signing_keys["EdDSA"].token()
    assert _get_tasks(application, remembered).status_code == 200
    jwks_server.failing = True
    time.sleep(0.4)  # past the keys' max age: every use tries a refetch, which fails
    assert _get_tasks(application, remembered).status_code == 200  # stale-if-error: still trusted
    assert _get_tasks(application, signing_keys["ES256"].token()).status_code == 200  # a fresh check too
    assert _get_tasks(application, signing_keys["EdDSA"].token(kid="unknown")).status_code == 503
    time.sleep(1.0)  # max age + the stale bound since the last successful fetch
    for token in (remembered, signing_keys["ES256"].token()):
        response = _get_tasks(application, token)
        assert response.status_code == 503 and response.headers["Retry-After"]
    jwks_server.failing = False
    assert _get_tasks(application, remembered).status_code == 200


def test_jwks_comes_back_after_an_outage(jwks_app_with: Callable[..., Any], jwks_server: JWKSServer,
                                         signing_keys: dict[str, SigningKey]) -> None:
    jwks_server.failing = True
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0)
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 503
    jwks_server.failing = False
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200


def test_better_auth_url_sets_jwks_url_and_claims(database_url: str) -> None:
    application = make_app(database_url, BETTER_AUTH_URL="https://app.example/", BETTER_AUTH_SECRET=None)
    client = application.extensions["jwks"]
    assert client.url == "https://app.example/api/auth/jwks"
    assert (client.issuer, client.audience) == ("https://app.example", "https://app.example")
    # JWKS only: an HS256 token, even with a well-known secret, is refused.
    assert _get_tasks(application, make_token(secret=DEV_SECRET)).status_code == 401
    application.extensions["db"].engine.dispose()


# --- request logs and security headers ---------------------------------------------------------

def test_every_response_has_a_request_id(client: Any) -> None:
    ids = set()
    for url, headers in (("/health", {}), ("/nope", {}), (f"/api/{ALICE}/tasks", {}),
                         (f"/api/{ALICE}/tasks", auth_headers())):
        response = client.get(url, headers=headers)
        request_id = response.headers["X-Request-ID"]
        assert len(request_id) == 32 and int(request_id, 16) >= 0
        ids.add(request_id)
    assert len(ids) == 4


@pytest.mark.parametrize("sent,echoed", [
    ("abc-123.DEF_456:7", True), ("x" * 128, True), ("x" * 129, False), ("has space", False),
    ("semi;colon", False), ("", False), ("ünicode", False),
])
def test_request_id_is_taken_from_the_request_when_sane(client: Any, sent: str, echoed: bool) -> None:
    response = client.get("/health", headers={"X-Request-ID": sent})
    assert (response.headers["X-Request-ID"] == sent) == echoed


def test_one_log_line_per_request_without_the_token(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    token = make_token()
    with caplog.at_level(logging.INFO, logger="tasks_api.request"):
        response = app.test_client().post(f"/api/{ALICE}/tasks", json={"title": "x"},
                                          headers={"Authorization": f"Bearer {token}", "X-Request-ID": "req-42"})
        app.test_client().get(f"/api/{ALICE}/tasks/999", headers={"Authorization": f"Bearer {token}"})
    lines = [record for record in caplog.records if record.name == "tasks_api.request"]
    assert len(lines) == 2
    first = logging.Formatter(app_module.LOG_FORMAT).format(lines[0])
    assert f"POST /api/{ALICE}/tasks 201 " in first and "ms user_id=alice" in first
    assert "request_id=req-42" in first and response.headers["X-Request-ID"] == "req-42"
    assert " 404 " in lines[1].getMessage()
    assert all(token not in record.getMessage() and token.split(".")[2] not in record.getMessage()
               for record in caplog.records)


def test_error_log_lines_carry_the_request_id(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("x")

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/boom", headers={"X-Request-ID": "trace-me"})
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors and all(record.request_id == "trace-me" for record in errors)
    assert response.headers["X-Request-ID"] == "trace-me"


def test_anonymous_request_logs_no_user(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tasks_api.request"):
        app.test_client().get(f"/api/{ALICE}/tasks")
    assert any("401" in record.getMessage() and "user_id=-" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize("url,authenticated", [
    (f"/api/{ALICE}/tasks", True), (f"/api/{ALICE}/tasks", False), (f"/api/{ALICE}/tasks/5", True),
])
def test_api_responses_are_not_cached_and_not_sniffed(client: Any, url: str, authenticated: bool) -> None:
    response = client.get(url, headers=auth_headers() if authenticated else {})
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["X-Content-Type-Options"] == "nosniff"


def test_every_response_is_nosniff(client: Any) -> None:
    for url in ("/health", "/nope", "/health/ready"):
        assert client.get(url).headers["X-Content-Type-Options"] == "nosniff"


def test_204_has_no_content_type(as_user: Any, new_task: Any) -> None:
    response = as_user("delete", f"/tasks/{new_task()['id']}")
    assert response.status_code == 204 and "Content-Type" not in response.headers


def test_403_log_line_names_the_authenticated_user(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tasks_api.request"):
        app.test_client().get(f"/api/{ALICE}/tasks", headers=auth_headers(BOB))
    assert any(" 403 " in record.getMessage() and "user_id=bob" in record.getMessage()
               for record in caplog.records)


def test_rejected_token_reason_is_logged_without_the_token(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    token = make_token(secret=OTHER_SECRET)
    with caplog.at_level(logging.INFO):
        app.test_client().get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {token}"})
    reasons = [record.getMessage() for record in caplog.records if "token rejected" in record.getMessage()]
    assert reasons and "InvalidSignatureError" in reasons[0]
    assert all(token.split(".")[2] not in record.getMessage() for record in caplog.records)
    assert all(OTHER_SECRET not in record.getMessage() and SECRET not in record.getMessage()
               for record in caplog.records)


def test_lazy_app_attribute_reports_configuration_errors_in_one_sentence(monkeypatch: pytest.MonkeyPatch,
                                                                         tmp_path: Any) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(app_module.__dict__, "app", raising=False)
    with pytest.raises(SystemExit, match="^BETTER_AUTH_SECRET is not set"):
        app_module.app  # noqa: B018 (the attribute access is the test)


REPO = os.path.dirname(os.path.abspath(__file__))
ENTRY_POINTS = {
    "app:app (gunicorn, flask --app app)": ["-c", "import app; app.app"],
    "python app.py": ["app.py"],
    "python app.py token": ["app.py", "token", "alice"],
}


def run_entry_point(argv: list[str], environment: dict[str, str], cwd: Any, timeout: float = 30) -> Any:
    """Run the service's entry point in a fresh interpreter, with only the given settings."""
    env = {name: value for name, value in os.environ.items() if name not in app_module.SETTINGS}
    env.update({"PYTHONPATH": REPO, "PORT": str(_free_port()), **environment})
    command = [sys.executable, *(["-c", argv[1]] if argv[0] == "-c" else [os.path.join(REPO, argv[0]), *argv[1:]])]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("setting,value,named", [
    ("DATABASE_URL", "localhost/tasks", "DATABASE_URL"),
    ("DATABASE_URL", "postgresql://tasks@db.example:abc/tasks", "DATABASE_URL"),
    ("DATABASE_URL", "postgresql://tasks:p@ss@127.0.0.1/tasks", "DATABASE_URL"),
    ("LOG_LEVEL", "TRACE", "LOG_LEVEL"),
    ("CORS_ORIGINS", "https://*.example.com", "CORS_ORIGINS"),
    ("DB_POOL_SIZE", "five", "DB_POOL_SIZE"),
    ("USERS_TABLE", "user", "users table 'user'"),
])
def test_startup_mistakes_are_one_sentence_and_a_failed_exit(tmp_path: Any, entry: str, setting: str, value: str,
                                                             named: str) -> None:
    if setting == "LOG_LEVEL" and entry == "python app.py token":
        pytest.skip("the token command logs nothing: it sets its own LOG_LEVEL")
    database = tmp_path / "tasks.db"
    if setting == "USERS_TABLE":
        with sqlite3.connect(database) as connection:  # a users table the service cannot reference
            connection.execute('CREATE TABLE "user" (id INTEGER PRIMARY KEY, name TEXT)')
    environment = {"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": f"sqlite:///{database}", setting: value}
    result = run_entry_point(ENTRY_POINTS[entry], environment, tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].endswith("."), result.stderr
    assert "ss@" not in result.stderr and "Traceback" not in result.stderr


def test_the_database_password_is_never_printed_or_logged(tmp_path: Any) -> None:
    password = "s3cret-Pa55word"
    # Nothing listens on port 1: the development server starts anyway (503s), and says where its database is.
    environment = {"DATABASE_URL": f"postgresql://tasks:{password}@127.0.0.1:1/tasks", "DB_CONNECT_TIMEOUT": "1"}
    env = {name: value for name, value in os.environ.items() if name not in app_module.SETTINGS}
    env.update({"PYTHONPATH": REPO, "PORT": str(_free_port()), "PYTHONUNBUFFERED": "1", **environment})
    server = subprocess.Popen([sys.executable, os.path.join(REPO, "app.py")], env=env, cwd=tmp_path, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("curl" in line for line in output):
            line = server.stdout.readline() if server.stdout else ""
            if not line:
                break
            output.append(line)
    finally:
        server.terminate()
        output += (server.communicate(timeout=10)[0] or "").splitlines()
    text_out = "".join(output)
    assert "database: postgresql+psycopg2://tasks:***@127.0.0.1:1/tasks" in text_out, text_out
    assert "unreachable at startup" in text_out and password not in text_out


# --- pinned findings of the security review ----------------------------------------------------

def test_jwks_key_removed_from_the_set_stops_verifying(jwks_app_with: Callable[..., Any], jwks_server: JWKSServer,
                                                       signing_keys: dict[str, SigningKey]) -> None:
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0, JWKS_MAX_AGE_SECONDS=0.2)
    revoked = signing_keys["RS256"]
    token = revoked.token()  # the very same token before and after: verified once, then remembered
    assert _get_tasks(application, token).status_code == 200
    assert _get_tasks(application, token).status_code == 200
    jwks_server.keys.remove(revoked)
    time.sleep(0.3)
    assert _get_tasks(application, token).status_code == 401
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200


def test_remembered_jwks_token_is_refused_once_a_refetch_drops_its_key(
        jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]) -> None:
    # Well inside the keys' 5-minute max age: an unknown kid makes the service refetch early.
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0)
    revoked = signing_keys["ES256"]
    token = revoked.token()
    assert _get_tasks(application, token).status_code == 200  # verified, and now remembered
    jwks_server.keys.remove(revoked)
    fetches = jwks_server.fetches
    assert _get_tasks(application, signing_keys["EdDSA"].token(kid="rotated-in")).status_code == 401
    assert jwks_server.fetches == fetches + 1  # the refetch that dropped the ES256 key
    assert _get_tasks(application, token).status_code == 401  # as a fresh check of it would answer
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200


def test_jwks_broken_http_answer_is_503_and_rate_limited(jwks_app_with: Callable[..., Any], jwks_server: JWKSServer,
                                                         signing_keys: dict[str, SigningKey]) -> None:
    jwks_server.garbage = True
    application = jwks_app_with(JWKS_REFETCH_SECONDS=60)
    for _ in range(3):
        assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 503
    assert jwks_server.fetches == 1


def test_jwks_entries_that_are_not_keys_are_skipped(jwks_app: Any, jwks_server: JWKSServer,
                                                    signing_keys: dict[str, SigningKey]) -> None:
    jwks_server.extra_entries = ["not a key", 42, {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]
    assert _get_tasks(jwks_app, signing_keys["ES256"].token()).status_code == 200


def test_chunked_body_over_64_kib_is_413(app: Any, client: Any) -> None:
    # As gunicorn passes a chunked body: no Content-Length, the stream ends where the body does.
    body = json.dumps({"title": "x", "description": "d" * (70 * 1024)}).encode()
    builder = EnvironBuilder(path=f"/api/{ALICE}/tasks", method="POST", input_stream=io.BytesIO(body),
                             headers={**auth_headers(), "Content-Type": "application/json",
                                      "Transfer-Encoding": "chunked"})
    environ = builder.get_environ()
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input_terminated"] = True
    body_chunks, status, headers = run_wsgi_app(app, environ)  # the test client would add a length
    assert status.startswith("413") and json.loads(b"".join(body_chunks))["detail"]
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_each_app_uses_its_own_database(tmp_path: Any, database_url: str) -> None:
    first = make_app(f"sqlite:///{tmp_path / 'first.db'}")
    second = make_app(database_url)  # created last: the Session registry's default bind
    response = first.test_client().post(f"/api/{ALICE}/tasks", json={"title": "into first"},
                                        headers=auth_headers())
    assert response.status_code == 201
    assert run_sql(first, "SELECT title FROM tasks") == [("into first",)]
    assert run_sql(second, "SELECT count(*) FROM tasks")[0][0] == 0
    for application in (first, second):
        application.extensions["db"].engine.dispose()


def test_log_lines_cannot_be_forged_through_the_path(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tasks_api.request"):
        app.test_client().get(f"/api/{ALICE}%0A2026-01-01 INFO forged: DELETE /api/bob/tasks/1 204/tasks")
    messages = [record.getMessage() for record in caplog.records if record.name == "tasks_api.request"]
    assert messages and all("\n" not in message and "\r" not in message for message in messages)


@pytest.mark.parametrize("url", [f"/api/{ALICE}//tasks", f"/api//{ALICE}/tasks", "/health//ready",
                                 f"/api/{ALICE}/tasks//1"])
def test_doubled_slashes_are_json_404_not_html_redirects(client: Any, url: str) -> None:
    response = client.get(url, headers=auth_headers())
    assert response.status_code == 404 and response.get_json()["detail"]


def test_unstorable_profile_claims_are_not_stored(app: Any, client: Any) -> None:
    headers = auth_headers("gina", name="Gi\u0000na", email="\ud800@example.com")
    assert client.post("/api/gina/tasks", json={"title": "x"}, headers=headers).status_code == 201
    assert run_sql(app, "SELECT id, email, name FROM users") == [("gina", None, None)]


def test_timestamps_always_have_microseconds(new_task: Any) -> None:
    task = new_task()
    for value in (task["created_at"], task["updated_at"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", value), value
    # A whole second keeps its six zeros, so the field always has one shape.
    assert iso_utc(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)) == "2026-01-02T03:04:05.000000Z"


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
    filler = []
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
def test_a_database_that_stops_answering_is_a_503_within_the_query_timeout(postgres_url: str,
                                                                           database_url: str) -> None:
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
def test_no_gssapi_probe_unless_asked(database_url: str, monkeypatch: pytest.MonkeyPatch,
                                      environment: dict[str, str], expected: str) -> None:
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
