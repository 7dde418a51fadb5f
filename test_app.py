"""The API's contract as a client sees it: CRUD, the auth matrix, isolation between users, validation,
listing, errors and CORS. On SQLite by default, on PostgreSQL when TEST_DATABASE_URL is set (conftest.py).
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import jwt
import pytest
from werkzeug.datastructures import Headers
from werkzeug.test import EnvironBuilder, run_wsgi_app

from app import STREAMED_LIST_FROM
from models import iso_utc
from tests.common import (
    ALICE,
    BOB,
    OTHER_SECRET,
    auth_headers,
    epoch_seconds,
    make_app,
    make_token,
    parse_time,
    run_sql,
)


def test_create_returns_task_with_location(as_user: Any) -> None:
    response = as_user("post", json={"title": "  Buy milk  ", "description": " 2 litres "})
    assert response.status_code == 201
    body = response.get_json()
    assert set(body) == {"id", "user_id", "title", "description", "completed", "created_at", "updated_at", "version"}
    assert body["title"] == "Buy milk" and body["description"] == "2 litres"
    assert body["user_id"] == ALICE and body["completed"] is False and isinstance(body["id"], int)
    assert body["created_at"].endswith("Z") and body["created_at"] == body["updated_at"]
    assert response.headers["Location"] == f"/api/{ALICE}/tasks/{body['id']}"
    assert response.headers["Content-Type"].startswith("application/json")
    fetched = as_user("get", response.headers["Location"].removeprefix(f"/api/{ALICE}"))
    assert fetched.status_code == 200 and fetched.get_json() == body


def test_create_ignores_fields_a_client_may_not_set(app: Any, as_user: Any) -> None:
    response = as_user(
        "post",
        json={
            "title": "t",
            "id": 999,
            "user_id": BOB,
            "completed": True,
            "created_at": "2000-01-01T00:00:00Z",
            "owner": "x",
        },
    )
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
    body = as_user(
        "put", f"/tasks/{task['id']}", json={"title": "T", "description": None, "completed": True}
    ).get_json()
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


def test_health_needs_no_auth_and_no_database(client: Any) -> None:
    response = client.get("/health")
    assert response.status_code == 200 and response.get_json() == {"status": "ok"}


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
    "alg none": lambda: "Bearer " + jwt.encode({"sub": ALICE, "exp": epoch_seconds() + 600}, "", algorithm="none"),
    "alg HS512 with the right secret": lambda: f"Bearer {make_token(algorithm='HS512')}",
    "alg HS384 with the right secret": lambda: f"Bearer {make_token(algorithm='HS384')}",
    "expired": lambda: f"Bearer {make_token(exp=epoch_seconds() - 120, iat=epoch_seconds() - 700)}",
    "no exp": lambda: f"Bearer {make_token(drop=('exp',))}",
    "no sub": lambda: f"Bearer {make_token(drop=('sub',))}",
    "empty sub": lambda: f"Bearer {make_token('')}",
    "numeric sub": lambda: f"Bearer {make_token(12345)}",
    "null sub": lambda: f"Bearer {make_token(None)}",
    "nbf in the future": lambda: f"Bearer {make_token(nbf=epoch_seconds() + 120)}",
    "iat in the future": lambda: f"Bearer {make_token(iat=epoch_seconds() + 120)}",
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
def test_401_for_every_bad_token_on_every_endpoint(
    app: Any, client: Any, new_task: Any, case: str, method: str, path: str, body: Any
) -> None:
    task = new_task("untouched")
    value = BAD_AUTHORIZATION[case]()
    headers = {} if value is None else {"Authorization": value}
    response = client.open(
        f"/api/{ALICE}" + path.format(id=task["id"]), method=method.upper(), headers=headers, json=body
    )
    assert response.status_code == 401
    assert isinstance(response.get_json()["detail"], str) and response.get_json()["detail"]
    challenge = response.headers["WWW-Authenticate"]
    assert challenge.startswith("Bearer")
    token_sent = value is not None and value.lower().startswith("bearer ") and len(value.split()) == 2
    assert ('error="invalid_token"' in challenge) == token_sent
    assert run_sql(app, "SELECT title, completed FROM tasks") == [("untouched", False)]


@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=ENDPOINT_IDS)
def test_403_when_sub_is_not_the_url_user(
    app: Any, as_user: Any, new_task: Any, method: str, path: str, body: Any
) -> None:
    task = new_task("alice's", user=ALICE)
    response = as_user(method, path.format(id=task["id"]), user=BOB, url_user=ALICE, json=body)
    assert response.status_code == 403
    assert response.get_json() == {"detail": "You do not have access to these tasks."}
    assert ALICE not in response.get_data(as_text=True) and BOB not in response.get_data(as_text=True)
    assert run_sql(app, "SELECT user_id, title, completed FROM tasks") == [(ALICE, "alice's", False)]


@pytest.mark.parametrize("method,path,body", ENDPOINTS[2:], ids=ENDPOINT_IDS[2:])
def test_other_users_task_is_404_and_unchanged(
    app: Any, as_user: Any, new_task: Any, method: str, path: str, body: Any
) -> None:
    task = new_task("alice's", user=ALICE)
    before = run_sql(app, "SELECT * FROM tasks")
    response = as_user(method, path.format(id=task["id"]), user=BOB, json=body)
    missing = as_user(method, path.format(id=task["id"] + 1000), user=BOB, json=body)
    assert response.status_code == 404 and missing.status_code == 404
    # Never reveal whether the id exists: the two answers are the same.
    assert response.get_json() == missing.get_json() == {"detail": "Task not found."}
    assert run_sql(app, "SELECT * FROM tasks") == before


@pytest.mark.parametrize(
    "owner,other",
    [
        ("alice", "Alice"),
        ("Alice", "alice"),
        ("alice", "ALICE"),
        ("alice", "ali"),
        ("ali", "alice"),
        ("alice", "alice2"),
        ("alice2", "alice"),
    ],
)
@pytest.mark.parametrize("method,path,body", ENDPOINTS, ids=ENDPOINT_IDS)
def test_user_ids_that_differ_only_by_case_or_a_suffix_are_different_users(
    app: Any, as_user: Any, new_task: Any, owner: str, other: str, method: str, path: str, body: Any
) -> None:
    task = new_task("owner's", user=owner)
    response = as_user(method, path.format(id=task["id"]), user=other, url_user=owner, json=body)
    assert response.status_code == 403
    assert run_sql(app, "SELECT user_id, title, completed FROM tasks") == [(owner, "owner's", False)]


@pytest.mark.parametrize(
    "path", ["/tasks", "/tasks?limit=1", "/tasks?limit=1&status=pending", "/tasks/{id}", "/tasks/999999"]
)
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
    assert (
        as_user("post", data="x", headers={"Content-Type": "text/plain"}, user=BOB, url_user=ALICE).status_code == 403
    )


def test_401_comes_before_404_415_and_422(client: Any) -> None:
    assert client.get(f"/api/{ALICE}/tasks/abc").status_code == 401
    assert client.get(f"/api/{ALICE}/tasks/99999999999999").status_code == 401
    assert client.post(f"/api/{ALICE}/tasks", data="x", content_type="text/plain").status_code == 401
    assert client.post(f"/api/{ALICE}/tasks", json={"title": ""}).status_code == 401
    assert client.get(f"/api/{ALICE}/tasks?limit=0").status_code == 401


def _assert_422(response: Any, field: str) -> dict[str, Any]:
    assert response.status_code == 422, response.get_json()
    body = response.get_json()
    assert isinstance(body["detail"], str) and body["detail"]
    assert any(error["field"] == field for error in body["errors"]), body
    for error in body["errors"]:
        assert set(error) == {"field", "message", "type"}
    return body


@pytest.mark.parametrize(
    "title,ok",
    [
        ("x" * 200, True),
        ("x" * 201, False),
        ("  " + "x" * 200 + "  ", True),
        ("", False),
        ("   ", False),
        ("\t\n", False),
        ("a", True),
    ],
)
def test_title_length_boundaries(app: Any, as_user: Any, title: str, ok: bool) -> None:
    response = as_user("post", json={"title": title})
    if ok:
        assert response.status_code == 201 and response.get_json()["title"] == title.strip()
    else:
        _assert_422(response, "title")
        assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


@pytest.mark.parametrize(
    "description,ok",
    [
        ("d" * 1000, True),
        ("d" * 1001, False),
        (" " + "d" * 1000 + " ", True),
        ("", True),
    ],
)
def test_description_length_boundaries(as_user: Any, description: str, ok: bool) -> None:
    response = as_user("post", json={"title": "t", "description": description})
    if ok:
        assert response.status_code == 201 and response.get_json()["description"] == description.strip()
    else:
        _assert_422(response, "description")


@pytest.mark.parametrize(
    "body,field",
    [
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
    ],
)
def test_create_rejects_bad_fields(app: Any, as_user: Any, body: dict[str, Any], field: str) -> None:
    _assert_422(as_user("post", json=body), field)
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_lone_surrogate_is_422_not_500(app: Any, as_user: Any) -> None:
    response = as_user("post", data=b'{"title": "bad \\ud800 surrogate"}', headers={"Content-Type": "application/json"})
    _assert_422(response, "title")
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_several_errors_are_all_reported(as_user: Any) -> None:
    body = _assert_422(as_user("post", json={"title": "", "description": 3, "completed": "no"}), "title")
    assert {error["field"] for error in body["errors"]} == {"title", "description", "completed"}


@pytest.mark.parametrize(
    "raw",
    [
        b"not json",
        b"{",
        b'{"title": "a",}',
        b"[1, 2]",
        b'"a string"',
        b"null",
        b"42",
        b"\xff\xfe\x00",
        b"[" * 5000 + b"]" * 5000,
        b'{"title": ' + b"[" * 100000 + b"]" * 100000 + b"}"[:60000],
    ],
)
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


@pytest.mark.parametrize(
    "content_type",
    ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "application/xml"],
)
def test_non_json_content_type_is_415(app: Any, as_user: Any, content_type: str) -> None:
    response = as_user("post", data='{"title": "x"}', headers={"Content-Type": content_type})
    assert response.status_code == 415
    assert "application/json" in response.get_json()["detail"]
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


def test_json_with_charset_is_accepted(as_user: Any) -> None:
    response = as_user(
        "post", data=json.dumps({"title": "x"}), headers={"Content-Type": "application/json; charset=utf-8"}
    )
    assert response.status_code == 201


def test_body_over_64_kib_is_413(app: Any, as_user: Any) -> None:
    response = as_user("post", json={"title": "x", "description": "d" * (64 * 1024)})
    assert response.status_code == 413 and "64 KiB" in response.get_json()["detail"]
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


@pytest.mark.parametrize("method", ["put", "patch"])
@pytest.mark.parametrize(
    "body,field",
    [
        ({}, "body"),
        ({"id": 5, "user_id": "x"}, "body"),
        ({"title": ""}, "title"),
        ({"title": None}, "title"),
        ({"title": "x" * 201}, "title"),
        ({"description": "d" * 1001}, "description"),
        ({"completed": "true"}, "completed"),
        ({"completed": 1}, "completed"),
        ({"title": "good", "completed": "bad"}, "completed"),
    ],
)
def test_update_rejects_bad_bodies_and_changes_nothing(
    app: Any, as_user: Any, new_task: Any, method: str, body: dict[str, Any], field: str
) -> None:
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


@pytest.mark.parametrize(
    "raw_id", ["abc", "0", "01", "-1", "1.5", "2147483648", "99999999999999999999", "1e3", "%20", "١٢"]
)
def test_bad_task_ids_are_404(as_user: Any, raw_id: str) -> None:
    for method, suffix in (("get", ""), ("put", ""), ("delete", ""), ("patch", "/complete")):
        response = as_user(method, f"/tasks/{raw_id}{suffix}", json={"title": "x"} if method == "put" else None)
        assert response.status_code == 404, (method, raw_id, response.status_code)
        assert response.get_json() == {"detail": "Task not found."}


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
    for query, total in (
        ("limit=1", "2"),
        ("limit=1&status=completed", "1"),
        ("limit=5&offset=1", "2"),
        ("limit=5&offset=50", "2"),
        ("limit=5&offset=50&status=completed", "1"),
        ("limit=5&offset=50&status=pending", "1"),
    ):
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
    run_sql(
        app,
        "UPDATE tasks SET created_at = (SELECT min(created_at) FROM tasks), "
        "updated_at = (SELECT min(created_at) FROM tasks)",
    )
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


def test_unknown_query_parameters_are_ignored(as_user: Any, three_tasks: Any) -> None:
    assert len(_ids(as_user("get", "/tasks?_=12345&foo=bar"))) == 3


@pytest.mark.parametrize(
    "query,field",
    [
        ("status=done", "status"),
        ("status=", "status"),
        ("sort=priority", "sort"),
        ("order=up", "order"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=-1", "limit"),
        ("limit=abc", "limit"),
        ("limit=1.5", "limit"),
        ("limit=", "limit"),
        ("offset=-1", "offset"),
        ("offset=x", "offset"),
        ("offset=99999999999999999999", "offset"),
        ("limit=%EF%BC%91", "limit"),
    ],
)
def test_invalid_query_parameters_are_422(as_user: Any, query: str, field: str) -> None:
    _assert_422(as_user("get", f"/tasks?{query}"), field)


@pytest.mark.parametrize("limit", ["1", "1000"])
def test_limit_boundaries_accepted(as_user: Any, limit: str) -> None:
    response = as_user("get", f"/tasks?limit={limit}")
    assert response.status_code == 200 and response.headers["X-Total-Count"] == "0"


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


ORIGIN = "http://localhost:3000"


def preflight(client: Any, path: str, method: str, headers: str) -> Any:
    """The browser's OPTIONS before a cross-origin request from ORIGIN (no token: preflights carry none)."""
    return client.options(
        f"/api/{ALICE}{path}",
        headers={"Origin": ORIGIN, "Access-Control-Request-Method": method, "Access-Control-Request-Headers": headers},
    )


def test_preflight_needs_no_token(client: Any) -> None:
    response = preflight(client, "/tasks/1", "DELETE", "authorization, content-type")
    assert response.status_code == 200
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "DELETE" in response.headers["Access-Control-Allow-Methods"]
    allowed = response.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed and "content-type" in allowed


@pytest.mark.parametrize(
    "status,request_kwargs",
    [
        (401, {}),
        (403, {"headers": auth_headers(BOB)}),
        (404, {"headers": auth_headers(), "path": "/tasks/12345"}),
        (422, {"headers": auth_headers(), "path": "/tasks?limit=0"}),
    ],
)
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
    assert not [name for name, _ in response.headers if name.startswith("Access-Control-")]


@pytest.mark.parametrize("path", ["/health", "/openapi.json", "/docs"])
def test_cacheable_answers_vary_by_origin(client: Any, path: str) -> None:
    # Their CORS headers depend on Origin, and nothing forbids caching them.
    plain, cross = client.get(path), client.get(path, headers={"Origin": ORIGIN})
    assert "Access-Control-Allow-Origin" not in plain.headers
    assert cross.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Origin" in plain.headers.get("Vary", "") and "Origin" in cross.headers.get("Vary", "")


def test_preflight_allows_credentials_and_the_request_id_header(client: Any) -> None:
    # fetch(..., {credentials: "include", headers: {"X-Request-ID": ...}}) from the frontend's origin.
    response = preflight(client, "/tasks", "POST", "authorization, content-type, x-request-id")
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


@pytest.mark.parametrize(
    "origin",
    [
        "https://xexample.com.evil.net",
        "https://app.example.com.evil.net",
        "https://evilapp.example.com",
        "http://app.example.com",
        "https://app.example.co",
        "https://APP.example.com.evil.net",
        "null",
    ],
)
def test_lookalike_origins_get_no_cors_headers(database_url: str, origin: str) -> None:
    application = make_app(database_url, CORS_ORIGINS="https://app.example.com")
    response = application.test_client().get("/health", headers={"Origin": origin})
    assert "Access-Control-Allow-Origin" not in response.headers
    assert (
        application.test_client()
        .get("/health", headers={"Origin": "https://app.example.com"})
        .headers["Access-Control-Allow-Origin"]
        == "https://app.example.com"
    )
    application.extensions["db"].engine.dispose()


def test_chunked_body_over_64_kib_is_413(app: Any, client: Any) -> None:
    # As gunicorn passes a chunked body: no Content-Length, the stream ends where the body does.
    body = json.dumps({"title": "x", "description": "d" * (70 * 1024)}).encode()
    headers = Headers({**auth_headers(), "Content-Type": "application/json", "Transfer-Encoding": "chunked"})
    builder = EnvironBuilder(path=f"/api/{ALICE}/tasks", method="POST", input_stream=io.BytesIO(body), headers=headers)
    environ = builder.get_environ()
    del environ["CONTENT_LENGTH"]
    environ["wsgi.input_terminated"] = True
    body_chunks, status, _ = run_wsgi_app(app, environ)  # the test client would add a length
    assert status.startswith("413") and json.loads(b"".join(body_chunks))["detail"]
    assert run_sql(app, "SELECT count(*) FROM tasks")[0][0] == 0


@pytest.mark.parametrize(
    "url", [f"/api/{ALICE}//tasks", f"/api//{ALICE}/tasks", "/health//ready", f"/api/{ALICE}/tasks//1"]
)
def test_doubled_slashes_are_json_404_not_html_redirects(client: Any, url: str) -> None:
    response = client.get(url, headers=auth_headers())
    assert response.status_code == 404 and response.get_json()["detail"]


def test_timestamps_always_have_microseconds(new_task: Any) -> None:
    task = new_task()
    for value in (task["created_at"], task["updated_at"]):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", value), value
    # A whole second keeps its six zeros, so the field always has one shape.
    assert iso_utc(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)) == "2026-01-02T03:04:05.000000Z"
