"""Scenario 9, token attacks, each its own pytest test against the service under gunicorn: alg none;
HS256 signed with an empty secret; an HS256 header over another key's signature; another user's sub
with a valid signature for a different secret; the token in the query string or a cookie (ignored:
401); a very long token (64 KiB header: 4xx, not 5xx); CR/LF injection in header values and in the
URL; a valid token after its exp plus the leeway. Every one: the documented status (401 with a JSON
detail and a WWW-Authenticate challenge, unless the HTTP layer refuses the request first with a 4xx),
and nothing else changes (the whole tasks table is compared before and after each attack, which is
made with a write: POST, PUT, PATCH, DELETE).

`python faults/s09_token_attacks.py` runs the tests with pytest and prints the scenario's one line.
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
import jwt  # noqa: E402
from harness import SECRET, Client, Reply, Scenario, Service, TempDatabase, log_errors, raw_request, run_scenario, token  # noqa: E402

ALICE, BOB = "attack-alice", "attack-bob"
OTHER_SECRET = "an-attacker-secret-that-is-long-enough-for-hs256-0123456789"
LEEWAY = 30


def b64(data: Any) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data, separators=(",", ":")).encode()
    return jwt.utils.base64url_encode(raw).decode()


def claims(sub: str = ALICE, **extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": sub, "iat": now, "exp": now + 600, **extra}


class Target:
    """The running service, its database, and the two users' tasks."""

    def __init__(self, scenario: Scenario) -> None:
        self.database = TempDatabase(scenario)
        self.service = Service(scenario, self.database.url(), workers=2, threads=4)
        self.port = self.service.port
        client = Client(self.port)
        self.alice_task = client.request(
            "POST", f"/api/{ALICE}/tasks", token=token(ALICE), json_body={"title": "alice's"}
        ).json()["id"]
        self.bob_task = client.request(
            "POST", f"/api/{BOB}/tasks", token=token(BOB), json_body={"title": "bob's"}
        ).json()["id"]

    def snapshot(self) -> list[tuple[Any, ...]]:
        return self.database.query("SELECT * FROM tasks ORDER BY id") + self.database.query(
            "SELECT id FROM tasks_api_users ORDER BY id"
        )

    def attack(
        self, bearer: str | None, *, user: str = ALICE, headers: dict[str, str] | None = None, query: str = ""
    ) -> list[Reply]:
        """Every write (and a read) on the user's URLs with this Authorization; the database must not move."""
        before = self.snapshot()
        task = self.alice_task if user == ALICE else self.bob_task
        base = f"/api/{user}/tasks"
        all_headers = dict(headers or {})
        if bearer is not None:
            all_headers["Authorization"] = bearer
        client = Client(self.port)
        replies = [
            client.request("GET", base + query, headers=all_headers),
            client.request("POST", base + query, headers=all_headers, json_body={"title": "intruder"}),
            client.request("PUT", f"{base}/{task}{query}", headers=all_headers, json_body={"title": "defaced"}),
            client.request("PATCH", f"{base}/{task}/complete{query}", headers=all_headers),
            client.request("DELETE", f"{base}/{task}{query}", headers=all_headers),
        ]
        client.close()
        assert self.snapshot() == before, "the attack changed the database"
        return replies


def assert_401(replies: list[Reply]) -> None:
    for reply in replies:
        assert reply.status == 401, (reply.status, reply.body)
        assert reply.content_type.startswith("application/json")
        body = json.loads(reply.body)
        assert set(body) == {"detail"} and isinstance(body["detail"], str)
        assert reply.headers.get("www-authenticate", "").startswith("Bearer")
        for word in ("Traceback", "jwt.", "Signature", SECRET):
            assert word not in reply.body.decode(), f"{word!r} in a 401 body"


@pytest.fixture(scope="module")
def target() -> Iterator[Target]:
    scenario = getattr(harness, "CURRENT_SCENARIO", None)
    assert scenario is not None, "run through `python faults/s09_token_attacks.py`"
    yield Target(scenario)


# --- the attacks -------------------------------------------------------------------------------


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "c2lnbmF0dXJl"])
def test_alg_none(target: Target, alg: str, signature: str) -> None:
    forged = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims())}.{signature}"
    assert_401(target.attack(f"Bearer {forged}"))


def test_hs256_signed_with_an_empty_secret(target: Target) -> None:
    header, payload = b64({"alg": "HS256", "typ": "JWT"}), b64(claims())
    import hashlib
    import hmac

    signature = hmac.new(b"", f"{header}.{payload}".encode(), hashlib.sha256).digest()
    assert_401(target.attack(f"Bearer {header}.{payload}.{b64(signature)}"))


def test_hs256_header_over_another_keys_signature(target: Target) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        foreign = jwt.encode(claims(), OTHER_SECRET, algorithm="HS256")
        rs_like = jwt.encode(claims(), "k" * 64, algorithm="HS512")
    assert_401(target.attack(f"Bearer {foreign}"))
    # The signature of one token under the header and payload of another.
    genuine_header, _, _ = token(ALICE).split(".")
    _, payload, signature = rs_like.split(".")
    assert_401(target.attack(f"Bearer {genuine_header}.{payload}.{signature}"))


def test_payload_swapped_under_a_genuine_signature(target: Target) -> None:
    header, _, signature = token(ALICE).split(".")
    assert_401(target.attack(f"Bearer {header}.{b64(claims(BOB))}.{signature}", user=BOB))


def test_another_users_sub_signed_with_a_different_secret(target: Target) -> None:
    forged = jwt.encode(claims(BOB), OTHER_SECRET, algorithm="HS256")
    assert_401(target.attack(f"Bearer {forged}", user=BOB))


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_the_right_secret_under_another_hmac_algorithm(target: Target, algorithm: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        forged = jwt.encode(claims(), SECRET, algorithm=algorithm)
    assert_401(target.attack(f"Bearer {forged}"))


@pytest.mark.parametrize(
    "header",
    [
        {"alg": "RS256", "kid": "x"},
        {"alg": "EdDSA"},
        {"alg": "ES256"},
        {"alg": "HS256", "jku": "http://127.0.0.1:9/jwks"},
        {"alg": "HS256", "crit": ["exp"]},
    ],
)
def test_asymmetric_or_foreign_headers_without_a_jwks(target: Target, header: dict[str, Any]) -> None:
    forged = f"{b64(header)}.{b64(claims())}.{b64(b'x' * 32)}"
    assert_401(target.attack(f"Bearer {forged}"))


@pytest.mark.parametrize("name", ["token", "access_token", "jwt", "auth", "authorization", "bearer"])
def test_token_in_the_query_string_is_ignored(target: Target, name: str) -> None:
    query = f"?{name}={token(ALICE)}"
    assert_401(target.attack(None, query=query))


@pytest.mark.parametrize(
    "cookie",
    [
        "token={t}",
        "access_token={t}",
        "jwt={t}",
        "better-auth.session_token={t}",
        "session={t}",
        "Authorization=Bearer%20{t}",
    ],
)
def test_token_in_a_cookie_is_ignored(target: Target, cookie: str) -> None:
    assert_401(target.attack(None, headers={"Cookie": cookie.format(t=token(ALICE))}))


def test_token_in_other_headers_is_ignored(target: Target) -> None:
    valid = token(ALICE)
    assert_401(
        target.attack(
            None, headers={"X-Access-Token": valid, "X-Auth-Token": valid, "Proxy-Authorization": f"Bearer {valid}"}
        )
    )


@pytest.mark.parametrize("size", [8 * 1024 - 200, 64 * 1024])
def test_very_long_token(target: Target, size: int) -> None:
    """Under gunicorn's header limit: the app's 401. Over it (64 KiB): the HTTP layer's 4xx. Never 5xx."""
    before = target.snapshot()
    long_token = token(ALICE) + "A" * size
    for method in ("GET", "POST", "DELETE"):
        data = (
            (
                f"{method} /api/{ALICE}/tasks/{target.alice_task if method == 'DELETE' else ''} HTTP/1.1\r\n"
                f"Host: x\r\nAuthorization: Bearer {long_token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: 2\r\n\r\n{{}}"
            )
            .replace("/tasks/ HTTP", "/tasks HTTP")
            .encode()
        )
        reply = raw_request(target.port, data)
        assert 400 <= reply.status < 500, (reply.status, reply.error)
        if reply.status == 401:
            assert reply.content_type.startswith("application/json")
    assert target.snapshot() == before


@pytest.mark.parametrize(
    "value",
    [
        b"Bearer abc\r\nX-Injected: 1",  # two header lines: the first is a bad token
        b"Bearer abc\rX-Injected: 1",  # bare CR
        b"Bearer abc\nX-Injected: 1",  # bare LF
        b"Bearer abc\r\n X-Injected: 1",  # obsolete line folding
        b"Bearer abc\x00def",  # NUL
        b"Bearer \xff\xfe",  # not ASCII
    ],
)
def test_cr_lf_and_control_characters_in_header_values(target: Target, value: bytes) -> None:
    before = target.snapshot()
    for method, path in (("POST", f"/api/{ALICE}/tasks"), ("DELETE", f"/api/{ALICE}/tasks/{target.alice_task}")):
        data = (
            f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode()
            + b"Authorization: "
            + value
            + b'\r\nContent-Type: application/json\r\nContent-Length: 16\r\n\r\n{"title": "inj"}'
        )
        reply = raw_request(target.port, data)
        assert 400 <= reply.status < 500, (reply.status, reply.error, reply.body[:200])
        assert "x-injected" not in reply.headers
    assert target.snapshot() == before


def test_cr_lf_in_the_url_and_request_id_do_not_split_responses_or_logs(target: Target) -> None:
    """Response splitting and log forging through percent-encoded CR/LF, and the echoed X-Request-ID."""
    injected = "x%0d%0aSet-Cookie:%20pwned=1%0d%0aX-Injected:%201"
    forged_line = "2026-01-01 00:00:00,000 ERROR forged-by-client"
    for path in (
        f"/api/{injected}/tasks",
        f"/api/{ALICE}/tasks/{injected}",
        f"/api/x%0A{forged_line.replace(' ', '%20')}/tasks",
    ):
        reply = Client(target.port).request("POST", path, token=token(ALICE), json_body={"title": "x"})
        assert 400 <= reply.status < 500, reply.status
        assert "set-cookie" not in reply.headers and "x-injected" not in reply.headers
    reply = raw_request(
        target.port,
        (
            f"GET /api/{ALICE}/tasks HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            f"{token(ALICE)}\r\nX-Request-ID: abc%0d%0aX-Injected: 1\r\n\r\n"
        ).encode(),
    )
    assert reply.status == 200 and "x-injected" not in reply.headers
    assert "%0d" not in reply.headers.get("x-request-id", "").lower()
    time.sleep(0.3)
    log = target.service.text()
    assert not any(line.startswith(forged_line) for line in log.splitlines()), "a client forged a log line"


def test_a_token_whose_sub_carries_cr_lf(target: Target) -> None:
    """A genuinely signed token whose sub is hostile: the URL must match it, and nothing leaks into headers."""
    hostile = "evil\r\nX-Injected: 1"
    reply = Client(target.port).request(
        "POST", "/api/evil%0D%0AX-Injected:%201/tasks", token=token(hostile), json_body={"title": "x"}
    )
    assert reply.status < 500, reply.status
    assert "x-injected" not in reply.headers
    assert "\r" not in reply.headers.get("location", "") and "\n" not in reply.headers.get("location", "")


def test_expired_token_beyond_the_leeway(target: Target) -> None:
    now = int(time.time())
    expired = jwt.encode({"sub": ALICE, "iat": now - 3600, "exp": now - LEEWAY - 5}, SECRET, algorithm="HS256")
    replies = target.attack(f"Bearer {expired}")
    assert_401(replies)
    assert all("expired" in json.loads(reply.body)["detail"] for reply in replies)


def test_expired_token_inside_the_leeway_still_works(target: Target) -> None:
    now = int(time.time())
    recent = jwt.encode({"sub": ALICE, "iat": now - 3600, "exp": now - LEEWAY + 10}, SECRET, algorithm="HS256")
    reply = Client(target.port).request("GET", f"/api/{ALICE}/tasks", token=recent)
    assert reply.status == 200


@pytest.mark.parametrize(
    "bad",
    [
        {"sub": None},
        {"sub": ""},
        {"sub": 7},
        {"sub": [ALICE]},
        {"exp": "soon"},
        {"exp": None},
        {"nbf": 4102444800},
        {"iat": "yesterday"},
    ],
)
def test_malformed_claims_with_a_valid_signature(target: Target, bad: dict[str, Any]) -> None:
    payload = {**claims(), **bad}
    payload = {key: value for key, value in payload.items() if value is not None or key == "sub"}
    forged = jwt.encode(payload, SECRET, algorithm="HS256")
    assert_401(target.attack(f"Bearer {forged}"))


def test_valid_token_for_another_user_is_403_and_changes_nothing(target: Target) -> None:
    replies = target.attack(f"Bearer {token(BOB)}")  # Bob's genuine token on Alice's URLs
    for reply in replies:
        assert reply.status == 403, reply.status
        assert set(json.loads(reply.body)) == {"detail"}


def test_service_healthy_and_quiet_after_the_attacks(target: Target) -> None:
    reply = Client(target.port).request("GET", "/health/ready")
    assert reply.status == 200
    errors = log_errors(target.service.text())
    assert not errors, errors[:3]


# --- the scenario's one line -------------------------------------------------------------------


class Tally:
    def __init__(self) -> None:
        self.passed: list[str] = []
        self.failed: list[str] = []

    def pytest_runtest_logreport(self, report: Any) -> None:
        if report.when == "call" or report.outcome == "failed":
            (self.passed if report.outcome == "passed" else self.failed).append(report.nodeid)


def body(scenario: Scenario) -> None:
    harness.CURRENT_SCENARIO = scenario  # type: ignore[attr-defined]  (pytest imports this file anew)
    tally = Tally()
    code = pytest.main(
        [
            __file__,
            "-q",
            "-p",
            "no:cacheprovider",
            "-p",
            "no:randomly",
            "--tb=short",
            "-o",
            "console_output_style=classic",
            "-W",
            "ignore::DeprecationWarning",
            f"--junitxml={scenario.log_dir / 'junit.xml'}",
        ],
        plugins=[tally],
    )
    scenario.numbers.update(
        {"tests": len(tally.passed) + len(tally.failed), "passed": len(tally.passed), "failed": len(tally.failed)}
    )
    for nodeid in tally.failed:
        scenario.check(False, f"failed: {nodeid.split('::', 1)[-1]}")
    scenario.check(code == 0 or tally.failed, f"pytest exit {code}")


if __name__ == "__main__":
    sys.exit(run_scenario(9, "token-attacks", 240, body))
