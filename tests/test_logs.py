"""Request ids, one log line per request (never a token), as text or as JSON (read from a real gunicorn run),
and the headers every response carries."""

from __future__ import annotations

import http.client
import json
import logging
import re
import socket
from typing import Any

import pytest

import logs
from tests.common import (
    ALICE,
    BOB,
    OTHER_SECRET,
    SECRET,
    auth_headers,
    make_token,
)
from tests.harness import Gunicorn


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
    first = logs.formatter("text").format(lines[0])
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


# --- LOG_FORMAT=json ------------------------------------------------------------------------------

FORGED = "%0D%0A2026-01-01%20INFO%20forged:%20DELETE%20/api/bob/tasks/1%20204"


def test_json_logs_of_a_real_gunicorn_run_are_one_object_per_line(tmp_path: Any) -> None:
    token = make_token()
    server = Gunicorn(
        {"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}", "LOG_FORMAT": "json"},
        tmp_path / "gunicorn.log",
        workers=1,
    )
    try:
        server.wait_healthy()
        created = _request(server.port, "POST", f"/api/{ALICE}/tasks", token, b'{"title": "x"}', "req-7")
        refused = _request(server.port, "GET", f"/api/{ALICE}/tasks?access_token={token}&secret=hunter2", "bad")
        forged = _request(server.port, "GET", f"/api/{ALICE}{FORGED}/tasks", token)
    finally:
        server.stop()
    output = server.text()  # stdout, and stderr with it: every line of both
    entries = [json.loads(line) for line in output.splitlines() if line.strip()]  # each line is JSON
    for entry in entries:
        assert {"time", "level", "logger", "message", "request_id"} <= set(entry), entry
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", entry["time"]), entry
    requests = {entry["request_id"]: entry for entry in entries if entry["logger"] == "tasks_api.request"}
    assert created == (201, "req-7")
    line = requests["req-7"]
    assert {key: line[key] for key in ("method", "path", "status", "user_id")} == {
        "method": "POST",
        "path": f"/api/{ALICE}/tasks",
        "status": 201,
        "user_id": ALICE,
    }
    assert isinstance(line["duration_ms"], float) and line["level"] == "INFO"
    assert requests[refused[1]]["status"] == 401 and requests[refused[1]]["user_id"] is None
    assert requests[refused[1]]["path"] == f"/api/{ALICE}/tasks"  # never the query string
    assert requests[forged[1]]["path"].startswith(f"/api/{ALICE}\r\n2026-01-01")  # a field, not a new line
    assert not [entry for entry in entries if entry["message"].startswith("2026-01-01")]
    # gunicorn's own records are JSON too; its access log (which would carry the query) stays off.
    assert any(entry["logger"] == "gunicorn.error" and "Booting worker" in entry["message"] for entry in entries)
    assert not [entry for entry in entries if entry["logger"] == "gunicorn.access"]
    assert token not in output and token.split(".")[2] not in output and "hunter2" not in output
    assert SECRET not in output


def _request(port: int, method: str, path: str, token: str, body: bytes | None = None, request_id: str = "") -> Any:
    """One request to the server; its status and X-Request-ID."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if request_id:
        headers["X-Request-ID"] = request_id
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        response.read()
        return response.status, response.headers["X-Request-ID"]
    finally:
        connection.close()


def test_a_json_record_with_an_exception_is_one_line(app: Any, caplog: pytest.LogCaptureFixture) -> None:
    @app.get("/boom")
    def boom() -> None:
        raise RuntimeError("kaboom\nsecond line")

    with caplog.at_level(logging.ERROR):
        app.test_client().get("/boom", headers={"X-Request-ID": "req-boom"})
    (record,) = [record for record in caplog.records if record.exc_info]
    text = logs.formatter("json").format(record)
    assert "\n" not in text
    entry = json.loads(text)
    assert entry["level"] == "ERROR" and entry["request_id"] == "req-boom"
    assert "RuntimeError: kaboom\nsecond line" in entry["exception"]


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_gunicorns_own_lines_about_a_malformed_request_quote_no_token_or_query(tmp_path: Any, log_format: str) -> None:
    token = make_token()
    server = Gunicorn(
        {"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}", "LOG_FORMAT": log_format},
        tmp_path / "gunicorn.log",
        workers=1,
    )
    malformed = [
        b"GET /api/alice/tasks?access_token=" + token.encode() + b"&secret=hunter2\t HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nAuthorization Bearer " + token.encode() + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\nHost: x\r\nCookie session=hunter2\r\n\r\n",
    ]
    try:
        server.wait_healthy()
        for request in malformed:
            with socket.create_connection(("127.0.0.1", server.port), timeout=10) as connection:
                connection.sendall(request)
                assert connection.recv(4096).startswith(b"HTTP/1.1 400")
    finally:
        server.stop()
    output = server.text()
    assert "Invalid" in output  # gunicorn did log each refusal...
    assert token not in output and token.split(".")[2] not in output and "hunter2" not in output  # ...not its bytes
    if log_format == "json":
        assert all(json.loads(line) for line in output.splitlines() if line.strip())
