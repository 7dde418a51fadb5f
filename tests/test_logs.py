"""Request ids, one log line per request (never a token), and the headers every response carries."""

from __future__ import annotations

import logging
from typing import Any

import pytest

import app as app_module
from tests.common import (
    ALICE,
    BOB,
    OTHER_SECRET,
    SECRET,
    auth_headers,
    make_token,
)


def test_every_response_has_a_request_id(client: Any) -> None:
    ids = set()
    for url, headers in (
        ("/health", {}),
        ("/nope", {}),
        (f"/api/{ALICE}/tasks", {}),
        (f"/api/{ALICE}/tasks", auth_headers()),
    ):
        response = client.get(url, headers=headers)
        request_id = response.headers["X-Request-ID"]
        assert len(request_id) == 32 and int(request_id, 16) >= 0
        ids.add(request_id)
    assert len(ids) == 4


@pytest.mark.parametrize(
    "sent,echoed",
    [
        ("abc-123.DEF_456:7", True),
        ("x" * 128, True),
        ("x" * 129, False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
        ("ünicode", False),
    ],
)
def test_request_id_is_taken_from_the_request_when_sane(client: Any, sent: str, echoed: bool) -> None:
    response = client.get("/health", headers={"X-Request-ID": sent})
    assert (response.headers["X-Request-ID"] == sent) == echoed


def test_one_log_line_per_request_without_the_token(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    token = make_token()
    with caplog.at_level(logging.INFO, logger="tasks_api.request"):
        response = app.test_client().post(
            f"/api/{ALICE}/tasks",
            json={"title": "x"},
            headers={"Authorization": f"Bearer {token}", "X-Request-ID": "req-42"},
        )
        app.test_client().get(f"/api/{ALICE}/tasks/999", headers={"Authorization": f"Bearer {token}"})
    lines = [record for record in caplog.records if record.name == "tasks_api.request"]
    assert len(lines) == 2
    first = logging.Formatter(app_module.LOG_FORMAT).format(lines[0])
    assert f"POST /api/{ALICE}/tasks 201 " in first and "ms user_id=alice" in first
    assert "request_id=req-42" in first and response.headers["X-Request-ID"] == "req-42"
    assert " 404 " in lines[1].getMessage()
    assert all(
        token not in record.getMessage() and token.split(".")[2] not in record.getMessage() for record in caplog.records
    )


def test_error_log_lines_carry_the_request_id(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("x")

    with caplog.at_level(logging.ERROR):
        response = app.test_client().get("/boom", headers={"X-Request-ID": "trace-me"})
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors and all(record.__dict__["request_id"] == "trace-me" for record in errors)
    assert response.headers["X-Request-ID"] == "trace-me"


def test_anonymous_request_logs_no_user(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tasks_api.request"):
        app.test_client().get(f"/api/{ALICE}/tasks")
    assert any("401" in record.getMessage() and "user_id=-" in record.getMessage() for record in caplog.records)


@pytest.mark.parametrize(
    "url,authenticated",
    [
        (f"/api/{ALICE}/tasks", True),
        (f"/api/{ALICE}/tasks", False),
        (f"/api/{ALICE}/tasks/5", True),
    ],
)
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
    assert any(" 403 " in record.getMessage() and "user_id=bob" in record.getMessage() for record in caplog.records)


def test_rejected_token_reason_is_logged_without_the_token(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    token = make_token(secret=OTHER_SECRET)
    with caplog.at_level(logging.INFO):
        app.test_client().get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {token}"})
    reasons = [record.getMessage() for record in caplog.records if "token rejected" in record.getMessage()]
    assert reasons and "InvalidSignatureError" in reasons[0]
    assert all(token.split(".")[2] not in record.getMessage() for record in caplog.records)
    assert all(
        OTHER_SECRET not in record.getMessage() and SECRET not in record.getMessage() for record in caplog.records
    )


def test_log_lines_cannot_be_forged_through_the_path(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="tasks_api.request"):
        app.test_client().get(f"/api/{ALICE}%0A2026-01-01 INFO forged: DELETE /api/bob/tasks/1 204/tasks")
    messages = [record.getMessage() for record in caplog.records if record.name == "tasks_api.request"]
    assert messages and all("\n" not in message and "\r" not in message for message in messages)
