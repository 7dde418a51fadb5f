"""What the tests share that is not a fixture: the test users and secrets, tokens, apps, raw SQL."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jwt
import pytest
from sqlalchemy import text

from app import create_app

SECRET = "test-secret-long-enough-for-hs256-and-hs512-0123456789abcdefghijk"


OTHER_SECRET = "another-secret-that-is-long-enough-for-hs256-98765"


ALICE, BOB = "alice", "bob"


TEST_DB_URL = os.environ.get("TEST_DATABASE_URL")


ON_POSTGRES = bool(TEST_DB_URL)


postgres_only = pytest.mark.skipif(not ON_POSTGRES, reason="needs TEST_DATABASE_URL (PostgreSQL)")


def make_app(database_url: str, **overrides: Any) -> Any:
    config = {"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": database_url, "TESTING": True, **overrides}
    return create_app(config)


def run_sql(app: Any, sql: str, **params: Any) -> list[Any]:
    """Read the database directly, behind the API's back."""
    with app.extensions["db"].engine.connect() as connection:
        result = connection.execute(text(sql), params)
        return result.fetchall() if result.returns_rows else []


def make_token(
    sub: Any = ALICE, *, secret: str = SECRET, algorithm: str = "HS256", drop: tuple[str, ...] = (), **claims: Any
) -> str:
    now = int(time.time())
    payload: dict[str, Any] = {"sub": sub, "iat": now, "exp": now + 600, **claims}
    for name in drop:
        payload.pop(name, None)
    return jwt.encode(payload, secret, algorithm=algorithm)


def auth_headers(sub: Any = ALICE, **claims: Any) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_token(sub, **claims)}"}


def parse_time(value: str) -> datetime:
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    offset = parsed.utcoffset()
    assert offset is not None and offset.total_seconds() == 0
    return parsed


def epoch_seconds() -> int:
    return int(time.time())


def in_threads(count: int, work: Callable[[int], Any]) -> list[Any]:
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
            with client, contextlib.suppress(OSError):
                self._refuse(client)

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
        fields = (
            b"".join(
                kind + value.encode() + b"\0"
                for kind, value in ((b"S", "FATAL"), (b"V", "FATAL"), (b"C", sqlstate), (b"M", message))
            )
            + b"\0"
        )
        client.sendall(b"E" + (len(fields) + 4).to_bytes(4, "big") + fields)

    def close(self) -> None:
        self.listener.close()
