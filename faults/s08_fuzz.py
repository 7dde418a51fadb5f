"""Scenario 8, hostile input as a fuzz run: a hypothesis-driven grammar of HTTP requests (methods, paths
with valid and junk user ids and task ids, query strings, Authorization headers with valid, forged,
expired and garbage tokens, content types, JSON and non-JSON bodies, oversize and deeply nested
bodies, chunked bodies, X-Request-ID, Origin, cookies) sent over real sockets to the service under
gunicorn: at least 10,000 requests.

Every response is checked: no 5xx; JSON (content type and body; empty only for HEAD, OPTIONS, 204;
/docs is the one documented HTML page); a status documented for that operation in openapi.json
(plus the generic 404/405/OPTIONS); the status an independent oracle of the API's rules predicts,
where the request is exact enough to predict it; bodies of the documented shape; no task of any user
but the token's; X-Request-ID echoed only when harmless; no CORS grant to a foreign origin. After the
run: the service is healthy, another user's tasks are byte-for-byte unchanged, and its log has no error.

Requests that gunicorn's HTTP parser itself refuses (its JSON 400/414/431 answers, before the
application) are not generated here: scenarios 9 and 10 cover those (4xx required there).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import socket
import sys
import time
import urllib.parse
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import jwt
from harness import ROOT, SECRET, Client, Reply, Scenario, Service, TempDatabase, log_errors, run_scenario, token
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

EXAMPLES = int(os.environ.get("FAULTS_FUZZ_EXAMPLES", "10000"))
ALICE, BOB = "fuzz-alice", "fuzz-bob"
TITLE_MAX, DESCRIPTION_MAX, BODY_MAX = 200, 1000, 64 * 1024
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
TASK_KEYS = {"id", "user_id", "title", "description", "completed", "created_at", "updated_at", "version"}
ALLOWED = {
    "collection": {"GET", "HEAD", "POST", "OPTIONS"},
    "item": {"GET", "HEAD", "PUT", "PATCH", "DELETE", "OPTIONS"},
    "complete": {"PATCH", "OPTIONS"},
    "health": {"GET", "HEAD", "OPTIONS"},
    "ready": {"GET", "HEAD", "OPTIONS"},
    "openapi": {"GET", "HEAD", "OPTIONS"},
    "docs": {"GET", "HEAD", "OPTIONS"},
}
OPENAPI_PATHS = {
    "collection": "/api/{user_id}/tasks",
    "item": "/api/{user_id}/tasks/{task_id}",
    "complete": "/api/{user_id}/tasks/{task_id}/complete",
    "health": "/health",
    "ready": "/health/ready",
    "openapi": "/openapi.json",
    "docs": "/docs",
}
FIXED_PATHS = {"health": "/health", "ready": "/health/ready", "openapi": "/openapi.json", "docs": "/docs"}
JUNK_PATHS = [
    "/",
    "/api",
    "/api/",
    "/api/{uid}",
    "/api/{uid}/",
    "/api/{uid}/tasks/",
    "/api/{uid}/tasks/{tid}/",
    "/api/{uid}/tasks/{tid}/complete/",
    "/api/{uid}/tasks/{tid}/complete/x",
    "/api/{uid}/task",
    "/API/{uid}/tasks",
    "/api/{uid}/tasks/{tid}/done",
    "/health/",
    "/healthz",
    "/favicon.ico",
    "/api/{uid}/tasks/{tid}/x/y",
    "/openapi.yaml",
    "/docs/",
    "/.env",
    "/admin",
    "/api//{uid}/tasks",
    "/api/{uid}//tasks",
    "/api/{uid}/tasks//{tid}",
    "/health//ready",
    "/api/{uid}/tasks/{tid}//complete",
]


# --- the generated request ---------------------------------------------------------------------


@dataclass
class Fuzzed:
    method: str
    route: str  # collection | item | complete | health | ready | openapi | docs | junk
    path: str
    uid: str | None = None  # the decoded user id of the path (None: not predictable)
    tid: str | None = None  # the decoded task id segment
    query: list[tuple[str, str]] | None = None  # decoded query pairs (None: wild query)
    auth: str = "none"  # none | own | other | invalid | malformed
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str | None = None
    body: bytes | None = None
    chunked: bool = False
    origin: str | None = None
    request_id: str | None = None

    def wire(self) -> bytes:
        target = self.path
        lines = [f"{self.method} {target} HTTP/1.1", "Host: 127.0.0.1"]
        lines += [f"{name}: {value}" for name, value in self.headers]
        if self.content_type is not None:
            lines.append(f"Content-Type: {self.content_type}")
        payload = b""
        if self.body is not None:
            if self.chunked:
                lines.append("Transfer-Encoding: chunked")
                payload = _chunked(self.body)
            else:
                lines.append(f"Content-Length: {len(self.body)}")
                payload = self.body
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload

    def describe(self) -> str:
        body = self.body if self.body is None or len(self.body) < 120 else self.body[:120] + b"..."
        return (
            f"{self.method} {self.path[:200]} auth={self.auth} ct={self.content_type!r} chunked={self.chunked} "
            f"headers={[(n, v[:60]) for n, v in self.headers]} body={body!r}"
        )


def _chunked(body: bytes) -> bytes:
    out = b""
    for start in range(0, len(body), 4000):
        piece = body[start : start + 4000]
        out += b"%x\r\n" % len(piece) + piece + b"\r\n"
    return out + b"0\r\n\r\n"


# --- the oracle --------------------------------------------------------------------------------


def _text_ok(value: str) -> bool:
    if "\x00" in value:
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _fields_status(payload: Any, *, partial: bool) -> int:
    """422 or 0 (valid) for a task body, by the README's rules."""
    if not isinstance(payload, dict):
        return 422
    present = [name for name in ("title", "description", "completed") if name in payload]
    if partial and not present:
        return 422
    if not partial and "title" not in payload:
        return 422
    if "title" in payload:
        title = payload["title"]
        if (
            not isinstance(title, str)
            or not _text_ok(title.strip())
            or not title.strip()
            or len(title.strip()) > TITLE_MAX
        ):
            return 422
    if "description" in payload and payload["description"] is not None:
        description = payload["description"]
        if (
            not isinstance(description, str)
            or not _text_ok(description.strip())
            or len(description.strip()) > DESCRIPTION_MAX
        ):
            return 422
    if "completed" in payload and not isinstance(payload["completed"], bool):
        return 422
    return 0


def _is_json_type(content_type: str | None) -> bool:
    if not content_type:
        return False
    mimetype = content_type.split(";", 1)[0].strip().lower()
    return mimetype == "application/json" or (mimetype.startswith("application/") and mimetype.endswith("+json"))


def _body_status(request: Fuzzed, *, required: bool) -> tuple[int, Any]:
    """(status, payload): 413/415/422, or 0 with the parsed payload (None: no body)."""
    body = request.body or b""
    if len(body) > BODY_MAX:
        return 413, None
    if not body:
        return (422, None) if required else (0, None)
    if not _is_json_type(request.content_type):
        return 415, None
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return 422, None
    if not isinstance(payload, dict):
        return 422, None
    return 0, payload


def _query_status(pairs: list[tuple[str, str]]) -> int:
    args: dict[str, str] = {}
    for key, value in pairs:
        args.setdefault(key, value)
    choices = {
        "status": ("all", "pending", "completed"),
        "sort": ("created", "updated", "title"),
        "order": ("asc", "desc"),
    }
    for name, allowed in choices.items():
        if name in args and args[name] not in allowed:
            return 422
    for name, low, high in (("limit", 1, 1000), ("offset", 0, 2**31 - 1)):
        if name in args:
            raw = args[name]
            if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or not low <= int(raw) <= high:
                return 422
    return 0


def _task_number(raw: str | None) -> int | None:
    # Canonical digits only: no sign, no leading zero (one URL per task).
    if raw is None or not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or raw.startswith("0"):
        return None
    number = int(raw)
    return number if 1 <= number <= 2**31 - 1 else None


def expected_status(request: Fuzzed, live: set[int]) -> int | None:
    """The one status the API's rules give this request, or None when the request is too wild to say."""
    if request.route == "junk":
        return 404 if request.uid is not None else None
    if request.uid is None and request.route not in FIXED_PATHS:
        return None  # a wild path may route anywhere
    if request.method not in ALLOWED[request.route]:
        return 405
    if request.method == "OPTIONS":
        return 200
    if request.route in FIXED_PATHS:
        return 200
    if request.auth == "none" or request.auth in ("invalid", "malformed"):
        return 401
    if request.auth == "unknown":
        return None
    subject = ALICE if request.auth == "own" else BOB
    if subject != request.uid:
        return 403
    # Only Alice's own URL with Alice's token gets here.
    if request.route == "collection":
        if request.method in ("GET", "HEAD"):
            if request.query is None:
                return None
            return _query_status(request.query) or 200
        status, payload = _body_status(request, required=True)
        status = status or _fields_status(payload, partial=False)
        key = _header(request, "Idempotency-Key")
        if status or key is None:
            return status or 201
        if not re.fullmatch(r"[\x20-\x7e]{1,255}", key):
            return 422
        return None  # a key used before: a replay (201) or another task's key (422)
    number = _task_number(request.tid)
    if number is None:
        return 404
    if request.route == "item" and request.method in ("PUT", "PATCH"):
        status, payload = _body_status(request, required=True)
        status = status or _fields_status(payload, partial=True)
    elif request.route == "complete":
        status, payload = _body_status(request, required=False)
        if not status and payload is not None and "completed" in payload:
            status = 0 if isinstance(payload["completed"], bool) else 422  # without it, a flip
    else:
        status = 0
    if status:
        return status
    if number not in live:
        return 404
    conditional = _conditional_status(request)
    if conditional == 0:
        return None
    return conditional or (204 if request.method == "DELETE" else 200)


def _header(request: Fuzzed, name: str) -> str | None:
    """A header as the service reads it: its lines joined into one list (", "), or None."""
    values = [value.strip(" \t") for header, value in request.headers if header.lower() == name.lower()]
    return ", ".join(values) if values else None


def _conditional_status(request: Fuzzed) -> int | None:
    """412 or 304 for an existing task when If-Match / If-None-Match decide it without its version (*, a
    weak tag for If-Match); 0 when they name a version, which only the service knows; None when neither
    applies (the request's own status stands)."""
    if_match, if_none_match = _header(request, "If-Match"), _header(request, "If-None-Match")
    reading = request.method in ("GET", "HEAD") and request.route == "item"
    if if_match is not None and if_match.strip() != "*":
        weak_only = all(tag.strip().startswith("W/") for tag in if_match.split(","))
        return 412 if weak_only else 0  # a weak tag never matches; a strong one may
    if if_none_match is not None:
        if if_none_match.strip() == "*":
            return 304 if reading else 412
        return 0
    return None


# --- the grammar -------------------------------------------------------------------------------

SAFE_ID = st.text(
    alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.~", min_size=1, max_size=40
).filter(lambda s: s not in (".", ".."))
HEADER_TEXT = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, blacklist_characters="\x7f"), max_size=300
)
JSON_LEAF = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=30)
)
JSON_VALUE = st.recursive(
    JSON_LEAF,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
TEXT_FIELD = st.one_of(
    st.text(max_size=40),
    st.text(min_size=195, max_size=205),
    st.text(min_size=995, max_size=1005),
    st.sampled_from(
        [
            "",
            " ",
            "   a   ",
            "\t\n",
            "\x00",
            "a\x00b",
            "\u200b",
            "\ufeff",
            "é",
            "\U0001f600" * 201,
            "<script>alert(1)</script>",
            "' OR 1=1 --",
            "%s%s%n",
            "{{7*7}}",
            "\\ud800",
        ]
    ),
)
FIELD_VALUE = TEXT_FIELD | JSON_VALUE | st.sampled_from([True, False, None, 0, 1, "true", "false", [], {}])
TASK_BODY = st.dictionaries(
    st.sampled_from(["title", "description", "completed", "id", "user_id", "created_at", "owner", "__proto__"]),
    FIELD_VALUE,
    max_size=5,
)
SPECIAL_BODIES = [
    b"",
    b"null",
    b"[]",
    b"{}",
    b'"x"',
    b"0",
    b"{",
    b'{"title": }',
    b'{"title": "a"',
    b"\xff\xfe\x00",
    b'{"title": "\\ud800"}',
    b'{"title": "\\u0000"}',
    b'{"title": NaN}',
    b'{"title": Infinity}',
    b'{"title": 1e999999}',
    b'{"completed": 1e999999}',
    b'{"title": ' + b"1" * 5000 + b"}",
    b"[" * 50_000 + b"]" * 50_000,
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b'{"title": "' + b"a" * 70_000 + b'"}',
    b" " * 65_537,
    b'\xef\xbb\xbf{"title": "bom"}',
    '{"title": "é"}'.encode("utf-16"),
    b'{"title": "\xe9"}',
    b'{"title": "a", "title": 5}',
    b'{"completed": true, "completed": "x"}',
    b"\x00" * 10,
    b"title=a&completed=true",
]
CONTENT_TYPES = [
    None,
    "application/json",
    "application/json; charset=utf-8",
    "APPLICATION/JSON",
    "application/merge-patch+json",
    "application/json-seq",
    "text/plain",
    "text/json",
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "",
    "application/jsonx",
    "application/json; charset=latin-1",
    "*/*",
]
QUERY_KEYS = ["status", "sort", "order", "limit", "offset", "token", "access_token", "user_id", "page", "q"]
QUERY_VALUES = [
    "all",
    "pending",
    "completed",
    "created",
    "updated",
    "title",
    "asc",
    "desc",
    "0",
    "1",
    "20",
    "1000",
    "1001",
    "-1",
    "2147483647",
    "2147483648",
    "999999999999",
    "9999999999999",
    "1.5",
    "1e3",
    " 1",
    "٣",
    "",
    "ALL",
    "Pending",
    "%",
    "null",
]


@dataclass
class Tokens:
    own: list[str]
    other: str
    invalid: list[str]
    malformed: list[str]


def make_tokens() -> Tokens:
    warnings.filterwarnings("ignore", category=jwt.InsecureKeyLengthWarning)
    now = int(time.time())
    valid = token(ALICE, lifetime=4 * 3600)
    header, payload, signature = valid.split(".")

    def b64(data: dict[str, Any]) -> str:
        return jwt.utils.base64url_encode(json.dumps(data).encode()).decode()

    claims = {"sub": ALICE, "iat": now, "exp": now + 4 * 3600}
    return Tokens(
        own=[
            valid,
            token(ALICE, lifetime=4 * 3600, email="a@example.com", aud="whatever", iss="x"),
            leeway_token(),
            jwt.encode(claims, SECRET, algorithm="HS256", headers={"kid": "k1", "typ": "JWT"}),
        ],
        other=token(BOB, lifetime=4 * 3600),
        invalid=[
            jwt.encode({**claims, "exp": now - 3600}, SECRET, algorithm="HS256"),
            jwt.encode(claims, "another-secret-of-sufficient-length-0123456789", algorithm="HS256"),
            jwt.encode(claims, SECRET, algorithm="HS512"),
            jwt.encode(claims, SECRET, algorithm="HS384"),
            b64({"alg": "none", "typ": "JWT"}) + "." + b64(claims) + ".",
            b64({"alg": "HS256", "typ": "JWT"}) + "." + b64({**claims, "sub": BOB}) + "." + signature,
            header + "." + b64({**claims, "exp": now + 10**6}) + "." + signature,
            jwt.encode({k: v for k, v in claims.items() if k != "sub"}, SECRET, algorithm="HS256"),
            jwt.encode({k: v for k, v in claims.items() if k != "exp"}, SECRET, algorithm="HS256"),
            jwt.encode({**claims, "sub": 123}, SECRET, algorithm="HS256"),
            jwt.encode({**claims, "sub": ""}, SECRET, algorithm="HS256"),
            jwt.encode({**claims, "sub": None}, SECRET, algorithm="HS256"),
            jwt.encode({**claims, "nbf": now + 3600}, SECRET, algorithm="HS256"),
            jwt.encode({**claims, "exp": "tomorrow"}, SECRET, algorithm="HS256"),
            valid[:-3],
            valid + "x",
            header + "." + payload,
            "a.b.c",
            "e30.e30.",
            "x" * 300,
            b64({"alg": "RS256"}) + "." + b64(claims) + ".c2ln",
            b64({"alg": "EdDSA", "kid": "x"}) + "." + b64(claims) + ".c2ln",
            b64({"alg": "HS256", "crit": ["exp"]}) + "." + b64(claims) + ".c2ln",
        ],
        malformed=[
            "",
            "Bearer",
            "Bearer ",
            "Basic YWxpY2U6cHc=",
            f"Token {valid}",
            f"Bearer {valid}, Bearer x",
            f"Bearer\t{valid}",
            f"Bearer {valid} extra",
            f"{valid}",
            "Bearer ===",
            "Bearer .",
            f"Bearer {valid}%00",
            "Bearer ä",
        ],
    )


def leeway_token() -> str:
    """Alice's token that expired 5 s ago: inside the documented 30 s leeway, so still valid."""
    now = int(time.time())
    return jwt.encode({"sub": ALICE, "iat": now - 60, "exp": now - 5}, SECRET, algorithm="HS256")


@st.composite
def requests(draw: Any, tokens: Tokens, live: list[int], foreign: list[int]) -> Fuzzed:
    route = draw(
        st.sampled_from(
            ["collection"] * 6
            + ["item"] * 6
            + ["complete"] * 4
            + ["health", "ready", "openapi", "docs", "junk", "junk"]
        )
    )
    any_method = draw(
        st.sampled_from(
            ["GET"] * 5
            + ["POST"] * 4
            + ["PUT"] * 2
            + ["PATCH"] * 4
            + ["DELETE"] * 2
            + ["HEAD", "OPTIONS", "TRACE", "PROPFIND", "CONNECT", "FOO"]
        )
    )
    route_method = draw(st.sampled_from(sorted(ALLOWED.get(route, {"GET"}) - {"OPTIONS", "HEAD"})))
    method = route_method if draw(st.integers(0, 4)) else any_method
    # The user id of the path: Alice, Bob, a safe random one, or a wild (percent-encoded) one.
    uid_kind = draw(st.sampled_from(["own"] * 6 + ["other"] * 2 + ["safe", "wild"]))
    if uid_kind == "own":
        uid: str | None = ALICE
        uid_wire = ALICE
    elif uid_kind == "other":
        uid, uid_wire = BOB, BOB
    elif uid_kind == "safe":
        uid = draw(SAFE_ID)
        uid_wire = uid
    else:
        raw = draw(st.text(min_size=0, max_size=60))
        uid, uid_wire = None, urllib.parse.quote(raw, safe="") or "%20"
        if draw(st.booleans()):
            uid_wire = draw(
                st.sampled_from(
                    [
                        "%",
                        "%zz",
                        "%ff%fe",
                        "%00",
                        "a%2Fb",
                        "..",
                        "%2e%2e",
                        "%252e",
                        "al%69ce",
                        "FUZZ-ALICE",
                        "x" * 500,
                        "%C3%A9",
                    ]
                )
            )
    # The task id segment.
    tid_kind = draw(st.sampled_from(["live"] * 5 + ["foreign", "missing", "junk", "wild"]))
    # Every branch draws the same things: what is drawn must not depend on the run's state.
    pick = draw(st.integers(min_value=0, max_value=10**6))
    missing = draw(st.sampled_from(["0", "1000000", "2147483647", "2147483648", "99999999999", "4294967297"]))
    junk = draw(
        st.sampled_from(
            [
                "abc",
                "1.5",
                "1e3",
                "+1",
                "-1",
                "0x10",
                "01",
                "٣",
                "１",
                "1 ",
                "null",
                "undefined",
                "NaN",
                "'1'",
                "1;DROP TABLE tasks",
                "00000000001",
            ]
        )
    )
    wild_tid = draw(st.text(max_size=20))
    recent = live[-200:]
    if tid_kind == "live" and recent:
        tid: str | None = str(recent[pick % len(recent)])
        tid_wire = tid
    elif tid_kind == "foreign" and foreign:
        tid = str(foreign[pick % len(foreign)])
        tid_wire = tid
    elif tid_kind in ("missing", "live", "foreign"):
        tid, tid_wire = missing, missing
    elif tid_kind == "junk":
        tid, tid_wire = junk, urllib.parse.quote(junk, safe="")
    else:
        tid, tid_wire = None, urllib.parse.quote(wild_tid, safe="") or "%20"
    if route == "collection":
        path = f"/api/{uid_wire}/tasks"
    elif route == "item":
        path = f"/api/{uid_wire}/tasks/{tid_wire}"
    elif route == "complete":
        path = f"/api/{uid_wire}/tasks/{tid_wire}/complete"
    elif route == "junk":
        path = draw(st.sampled_from(JUNK_PATHS)).replace("{uid}", uid_wire).replace("{tid}", tid_wire)
        if uid is None and "{uid}" not in path:
            pass
    else:
        path = FIXED_PATHS[route]
    # Werkzeug merges repeated slashes; an empty user id would merge into another route: leave it to the wild.
    if (
        "//" in path
        or "/./" in path
        or "/../" in path
        or path.endswith(("/.", "/.."))
        or tid is None
        and route in ("item", "complete")
    ):
        uid = None
    if route == "junk" and ("%2F" in path.upper() or "%2E" in path.upper()):
        uid = None
    # The query string.
    query: list[tuple[str, str]] | None = []
    query_kind = draw(st.sampled_from(["none"] * 3 + ["valid", "pairs", "wild"]))
    if query_kind == "valid":
        query = draw(
            st.lists(st.tuples(st.sampled_from(QUERY_KEYS[:5]), st.sampled_from(QUERY_VALUES[:12])), max_size=4)
        )
    elif query_kind == "pairs":
        query = draw(
            st.lists(
                st.tuples(
                    st.sampled_from(QUERY_KEYS) | st.text(max_size=8),
                    st.sampled_from(QUERY_VALUES) | st.text(max_size=20),
                ),
                max_size=5,
            )
        )
        if draw(st.booleans()):
            query.append((draw(st.sampled_from(["token", "access_token", "jwt"])), tokens.own[0]))
    if query_kind == "wild":
        query = None
        path += "?" + draw(
            st.sampled_from(
                [
                    "%",
                    "%ff=1",
                    "status=%ff",
                    "a=b=c",
                    "&&&",
                    "status",
                    "limit=",
                    "status=pending&status=bogus",
                    "limit=%31%30",
                    ";status=x",
                    "sort=title#frag",
                    "limit=1&limit=x",
                    "x=%00",
                ]
            )
        )
    elif query:
        path += "?" + "&".join(f"{urllib.parse.quote(k, safe='')}={urllib.parse.quote(v, safe='')}" for k, v in query)
    # Authorization.
    auth_kind = draw(
        st.sampled_from(["own"] * 8 + ["other"] * 2 + ["none", "invalid", "invalid", "malformed", "random"])
    )
    headers: list[tuple[str, str]] = []
    auth = auth_kind
    if auth_kind == "own":
        scheme = draw(st.sampled_from(["Bearer", "Bearer", "bearer", "BEARER", "Bearer  "]))
        headers.append(("Authorization", f"{scheme} {draw(st.sampled_from(tokens.own))}"))
    elif auth_kind == "other":
        headers.append(("Authorization", f"Bearer {tokens.other}"))
    elif auth_kind == "invalid":
        headers.append(("Authorization", f"Bearer {draw(st.sampled_from(tokens.invalid))}"))
    elif auth_kind == "malformed":
        headers.append(("Authorization", draw(st.sampled_from(tokens.malformed))))
    elif auth_kind == "random":
        headers.append(("Authorization", draw(HEADER_TEXT)))
        auth = "unknown"
    # Bob's token on Bob's own URL could legitimately change Bob's tasks: point it at Alice's instead.
    if auth_kind == "other" and uid == BOB:
        path = path.replace(f"/api/{BOB}/", f"/api/{ALICE}/", 1)
        uid = ALICE
    # Other headers.
    origin = draw(st.sampled_from([None, None, None, "http://localhost:3000", "https://evil.example", "null"]))
    if origin is not None:
        headers.append(("Origin", origin))
    request_id = draw(st.sampled_from([None, None, "req-123", "a b", "x" * 129, "ok:1.2_3-4"]) | HEADER_TEXT)
    if request_id is not None:
        headers.append(("X-Request-ID", request_id))
    extra = draw(
        st.lists(
            st.sampled_from(
                [
                    ("Cookie", f"token={tokens.own[0]}; session=abc"),
                    ("X-HTTP-Method-Override", "DELETE"),
                    ("X-Forwarded-For", "1.2.3.4"),
                    ("X-Forwarded-Host", "evil.example"),
                    ("Accept", "text/html"),
                    ("Accept-Encoding", "gzip"),
                    ("Content-Encoding", "gzip"),
                    ("X-User-Id", BOB),
                    ("X-Original-URL", "/admin"),
                    ("Expect", "100-continue"),
                    ("Connection", "keep-alive"),
                    ("Range", "bytes=0-10"),
                    ("If-None-Match", "*"),
                    ("If-None-Match", '"1"'),
                    ("If-Match", "*"),
                    ("If-Match", '"1"'),
                    ("If-Match", 'W/"1"'),
                    ("Idempotency-Key", "fuzz-key"),
                    ("Idempotency-Key", "k" * 256),
                    ("Accept-Language", "ä" * 50),
                ]
            ),
            max_size=3,
            unique=True,
        )
    )
    headers += extra
    # Body.
    body_kind = draw(
        st.sampled_from(["none"] * 3 + ["valid"] * 3 + ["task"] * 5 + ["json"] * 2 + ["special"] * 2 + ["binary"])
    )
    body: bytes | None = None
    if body_kind == "valid":
        payload = {"title": draw(st.text(min_size=1, max_size=60).filter(lambda t: t.strip()))}
        payload.update(
            draw(
                st.fixed_dictionaries(
                    {}, optional={"description": st.none() | st.text(max_size=80), "completed": st.booleans()}
                )
            )
        )
        body = json.dumps(payload, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    elif body_kind == "task":
        payload = draw(TASK_BODY)
        body = json.dumps(payload, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
    elif body_kind == "json":
        body = json.dumps(draw(JSON_VALUE)).encode()
    elif body_kind == "special":
        body = draw(st.sampled_from(SPECIAL_BODIES))
    elif body_kind == "binary":
        body = draw(st.binary(max_size=200))
    content_type = (
        draw(st.sampled_from(CONTENT_TYPES[:3] * 4 + CONTENT_TYPES))
        if body is not None
        else draw(st.sampled_from([None] * 6 + CONTENT_TYPES))
    )
    chunked = body is not None and draw(st.integers(0, 9)) == 0
    if body is None and draw(st.integers(0, 9)) == 0:
        body = b""
    return Fuzzed(
        method=method,
        route=route,
        path=path,
        uid=uid,
        tid=tid,
        query=query,
        auth=auth,
        headers=headers,
        content_type=content_type,
        body=body,
        chunked=chunked,
        origin=origin,
        request_id=request_id,
    )


# --- the client --------------------------------------------------------------------------------


class RawClient:
    """Keep-alive HTTP/1.1 over a plain socket: the bytes go out exactly as built."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.sock: socket.socket | None = None

    def send(self, request: Fuzzed) -> Reply:
        import http.client

        data = request.wire()
        for attempt in (1, 2):
            fresh = self.sock is None
            if self.sock is None:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=20)
            started = time.monotonic()
            try:
                self.sock.sendall(data)
                response = http.client.HTTPResponse(self.sock, method=request.method)
                response.begin()
                reply = Reply.read(response, started)
                if response.will_close:
                    self.close()
                return reply
            except (OSError, http.client.HTTPException) as error:
                self.close()
                if fresh or attempt == 2:  # a reused connection the server had closed: try once more
                    return Reply.failed(error, started)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
        self.sock = None


# --- checks ------------------------------------------------------------------------------------


def documented_statuses(route: str, method: str, spec: dict[str, Any]) -> set[int]:
    generic = {404, 405}
    if route == "junk" or method not in ALLOWED.get(route, set()):
        return generic
    if method == "OPTIONS":
        return {200, 404}  # 404: a wild path that routes nowhere
    operation = spec.get("paths", {}).get(OPENAPI_PATHS[route], {}).get("get" if method == "HEAD" else method.lower())
    if not operation:
        return generic
    return {int(code) for code in operation["responses"] if code.isdigit()} | {404}


def check_response(request: Fuzzed, reply: Reply, expected: int | None, spec: dict[str, Any]) -> list[str]:
    problems = []
    if reply.status == 0:
        return [f"no response ({reply.error})"]
    if reply.status >= 500:
        problems.append(f"{reply.status}")
    if reply.status not in documented_statuses(request.route, request.method, spec):
        problems.append(f"undocumented status {reply.status}")
    if expected is not None and reply.status != expected:
        problems.append(f"status {reply.status}, the API's rules say {expected}")
    content_type = reply.content_type
    html_page = request.route == "docs" and request.method in ("GET", "HEAD") and reply.status in (200, 206)
    empty_ok = request.method in ("HEAD", "OPTIONS") or reply.status in (204, 304)
    if html_page:
        if not content_type.startswith("text/html"):
            problems.append(f"/docs answered {content_type!r}")
    elif reply.status in (204, 304) and not reply.body and content_type in ("", "application/json"):
        pass  # No Content, Not Modified: no body, and so no content type needed
    elif not content_type.startswith("application/json"):
        problems.append(f"content type {content_type!r}")
    elif reply.body or not empty_ok:
        try:
            data = json.loads(reply.body)
        except ValueError:
            problems.append(f"body is not JSON: {reply.body[:80]!r}")
        else:
            problems += _shape(request, reply.status, data)
    sent_id = request.request_id
    got_id = reply.headers.get("x-request-id", "")
    if sent_id is not None and REQUEST_ID.fullmatch(sent_id.strip(" \t")):
        if got_id != sent_id.strip(" \t"):
            problems.append(f"X-Request-ID {sent_id!r} answered as {got_id!r}")
    elif not re.fullmatch(r"[0-9a-f]{32}", got_id):
        problems.append(f"X-Request-ID answered {got_id[:80]!r} for {str(sent_id)[:40]!r}")
    allow_origin = reply.headers.get("access-control-allow-origin")
    if allow_origin and allow_origin not in ("http://localhost:3000",):
        problems.append(f"CORS granted to {allow_origin!r}")
    return problems


def _shape(request: Fuzzed, status: int, data: Any) -> list[str]:
    """The documented body shapes, and the isolation rule: no task but Alice's ever."""
    problems = []
    items = data if isinstance(data, list) else [data]
    for item in items:
        if isinstance(item, dict) and "user_id" in item and item.get("user_id") != ALICE:
            problems.append(f"LEAK: a task of {item.get('user_id')!r} in the body")
    if status >= 400:
        if not (isinstance(data, dict) and isinstance(data.get("detail"), str) and data["detail"]):
            problems.append(f"error body without a detail sentence: {str(data)[:80]}")
        elif status == 422 and not isinstance(data.get("errors"), list):
            problems.append("422 without an errors list")
    elif request.route in ("collection", "item", "complete") and status in (200, 201):
        for item in items:
            if not isinstance(item, dict) or set(item) != TASK_KEYS:
                problems.append(f"task of the wrong shape: {str(item)[:80]}")
                break
    return problems


# --- the run -----------------------------------------------------------------------------------


def body(scenario: Scenario) -> None:
    database = TempDatabase(scenario)
    service = Service(scenario, database.url(), workers=2, threads=4)
    spec_path = ROOT / "openapi.json"
    spec = json.loads(spec_path.read_text()) if spec_path.exists() else {}
    scenario.check(bool(spec), "no openapi.json: statuses checked against the generic rules only")
    tokens = make_tokens()
    setup = Client(service.port)
    live: list[int] = []
    foreign: list[int] = []
    for index in range(20):
        reply = setup.request("POST", f"/api/{ALICE}/tasks", token=tokens.own[0], json_body={"title": f"a{index}"})
        live.append(reply.json()["id"])
        reply = setup.request(
            "POST", f"/api/{BOB}/tasks", token=tokens.other, json_body={"title": f"b{index}", "description": "bob's"}
        )
        foreign.append(reply.json()["id"])
    bob_before = database.query("SELECT * FROM tasks WHERE user_id = %s ORDER BY id", (BOB,))

    client = RawClient(service.port)
    counters: Counter[str] = Counter()
    statuses: Counter[int] = Counter()
    violations: list[str] = []
    kinds: Counter[str] = Counter()
    live_set = set(live)
    refreshed = [time.monotonic()]
    started = time.monotonic()
    time_budget = float(os.environ.get("FAULTS_FUZZ_SECONDS", "300"))

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
        derandomize=False,
        print_blob=False,
    )
    @given(st.data())
    def fuzz(data: Any) -> None:
        if time.monotonic() - refreshed[0] > 5:  # the token 5 s past its exp stays inside the leeway
            tokens.own[2] = leeway_token()
            refreshed[0] = time.monotonic()
        request = data.draw(requests(tokens, live, foreign))
        if time.monotonic() - started > time_budget:
            return
        expected = expected_status(request, live_set)
        reply = client.send(request)
        counters["requests"] += 1
        statuses[reply.status] += 1
        problems = check_response(request, reply, expected, spec)
        if problems:
            counters["violations"] += 1
            kinds[problems[0][:60]] += 1
            if len(violations) < 200:
                violations.append(f"{'; '.join(problems)} <- {request.describe()} -> {reply.body[:150]!r}")
        # Follow Alice's tasks, for the oracle.
        if request.uid == ALICE and request.auth == "own" and reply.status == 201:
            with_id = json.loads(reply.body)["id"]
            live.append(with_id)
            live_set.add(with_id)
        if request.route == "item" and request.method == "DELETE" and reply.status == 204 and request.tid:
            live_set.discard(int(request.tid))
            if int(request.tid) in live:
                live.remove(int(request.tid))

    rounds = 0
    while counters["requests"] < EXAMPLES and time.monotonic() - started < time_budget and rounds < 5:
        rounds += 1
        fuzz()
    client.close()
    elapsed = time.monotonic() - started
    scenario.check(
        counters["requests"] >= EXAMPLES, f"only {counters['requests']} requests in {elapsed:.0f}s (want {EXAMPLES})"
    )
    server_errors = sum(count for status, count in statuses.items() if status >= 500)
    (scenario.log_dir / "violations.txt").write_text("\n".join(violations))
    scenario.check(
        not violations,
        f"{counters['violations']} responses broke the contract; kinds: "
        f"{kinds.most_common(6)}; first: {violations[0][:600] if violations else ''} "
        f"(all in {scenario.log_dir / 'violations.txt'})",
    )
    health = Client(service.port)
    for path in ("/health", "/health/ready"):
        reply = health.request("GET", path)
        scenario.check(reply.status == 200, f"{path} answered {reply.status} after the fuzz run")
    bob_after = database.query("SELECT * FROM tasks WHERE user_id = %s ORDER BY id", (BOB,))
    scenario.check(bob_before == bob_after, "another user's tasks changed during the fuzz run")
    lines = log_errors(service.text())
    scenario.check(not lines, f"{len(lines)} error lines in the service log, first: {lines[0][:300] if lines else ''}")
    scenario.numbers.update(
        {
            "requests": counters["requests"],
            "5xx": server_errors,
            "violations": counters["violations"],
            "rps": f"{counters['requests'] / elapsed:.0f}",
            "status": dict(sorted(statuses.items())),
        }
    )


if __name__ == "__main__":
    random.seed()
    sys.exit(run_scenario(8, "fuzz", 420, body))
