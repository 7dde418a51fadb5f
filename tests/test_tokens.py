"""HS256 tokens: clock leeway, the remembered-token cache, iss/aud, the sub's length, issued tokens."""

from __future__ import annotations

import logging
import time
from typing import Any

import pytest

import auth
from auth import issue_token
from tests.common import (
    ALICE,
    BOB,
    SECRET,
    auth_headers,
    epoch_seconds,
    make_app,
    make_token,
    run_sql,
)


def test_token_within_leeway_is_accepted(as_user: Any, client: Any) -> None:
    # 30 s of clock skew between the frontend and us is tolerated, both ways.
    token = make_token(iat=epoch_seconds() + 20, nbf=epoch_seconds() + 20)
    assert client.get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    late = make_token(exp=epoch_seconds() - 10, iat=epoch_seconds() - 700)
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
    token = make_token(exp=epoch_seconds() - 120, iat=epoch_seconds() - 700)
    response = client.get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 401 and "expired" in response.get_json()["detail"]


def test_a_verified_token_is_checked_once_then_remembered(client: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    checks: list[str] = []
    real_decode = auth._decode

    def counted_decode(token: str, *args: Any, **kwargs: Any) -> Any:
        checks.append(token)
        return real_decode(token, *args, **kwargs)

    monkeypatch.setattr(auth, "_decode", counted_decode)
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
    token = make_token(exp=epoch_seconds() - auth.LEEWAY_SECONDS + 2, iat=epoch_seconds() - 600)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get(f"/api/{ALICE}/tasks", headers=headers).status_code == 200
    time.sleep(2.1)
    response = client.get(f"/api/{ALICE}/tasks", headers=headers)
    assert response.status_code == 401 and "expired" in response.get_json()["detail"]


def test_remembered_tokens_are_bounded_oldest_first() -> None:
    verified = auth.VerifiedTokens(max_entries=2)
    claims = {"sub": ALICE, "exp": epoch_seconds() + 600}
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


def test_issuer_and_audience_may_be_lists(database_url: str) -> None:
    # Preview deployments: several origins sign tokens for the same service.
    application = make_app(
        database_url,
        JWT_AUDIENCE="https://app.example, https://preview.app.example",
        JWT_ISSUER="https://a.example,https://b.example",
    )
    client = application.test_client()

    def status(**claims: Any) -> int:
        headers = {"Authorization": f"Bearer {make_token(**claims)}"}
        return client.get(f"/api/{ALICE}/tasks", headers=headers).status_code

    assert status(aud="https://preview.app.example", iss="https://b.example") == 200
    assert status(aud="https://app.example", iss="https://a.example") == 200
    assert status(aud="https://evil.example", iss="https://a.example") == 401
    assert status(aud="https://app.example", iss="https://c.example") == 401
    application.extensions["db"].engine.dispose()


@pytest.mark.parametrize(
    "session_token",
    [
        "N1cbB4mzJvx2Vd0kBqX1dLtYc4c8yGH9.Gq8s5Yc2o0T7Ar1oYb3x1bXUqR6nXjE0+8xYz3kYw5Q=",  # as set-auth-token has it
        "N1cbB4mzJvx2Vd0kBqX1dLtYc4c8yGH9.Gq8s5Yc2o0T7Ar1oYb3x1bXUqR6nXjE0%2B8xYz3kYw5Q%3D",  # as the cookie has it
    ],
)
def test_a_better_auth_session_token_sent_as_the_bearer_is_a_generic_401_and_a_log_line_that_says_what_to_send(
    app: Any, caplog: pytest.LogCaptureFixture, session_token: str
) -> None:
    with caplog.at_level(logging.INFO):
        response = app.test_client().get(f"/api/{ALICE}/tasks", headers={"Authorization": f"Bearer {session_token}"})
    assert response.status_code == 401 and response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.get_json()["detail"] in (
        "The token is invalid; sign in again.",
        "The Authorization header must be 'Bearer <token>'.",
    )
    lines = [record.getMessage() for record in caplog.records if "session token" in record.getMessage()]
    assert len(lines) == 1 and "authClient.token()" in lines[0] and "set-auth-jwt" in lines[0]
    assert session_token not in "".join(record.getMessage() for record in caplog.records)


def test_a_sub_longer_than_an_index_can_hold_is_a_401_not_a_503(app: Any, as_user: Any) -> None:
    longest = "u" * auth.MAX_USER_ID_LENGTH
    assert as_user("post", json={"title": "fits"}, user=longest).status_code == 201
    for sub in ("u" * (auth.MAX_USER_ID_LENGTH + 1), "u" * 2800, "😀" * 700):
        response = as_user("post", json={"title": "too long a sub"}, user=sub)
        assert response.status_code == 401 and response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    assert run_sql(app, "SELECT user_id FROM tasks") == [(longest,)]


def test_issued_token_works_against_the_api(client: Any) -> None:
    token = issue_token(SECRET, "dave")
    response = client.get("/api/dave/tasks", headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
