"""gunicorn's own layer, run as production runs it: its answers to requests it cannot parse are JSON
(README: Errors), and a slow client holds no worker thread (README: Production)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator

import jwt
import pytest
from helpers import SECRET, Gunicorn, http_get, start_service

import server

pytestmark = pytest.mark.timeout(120)

ORIGIN = "http://localhost:3000"  # allowed by the service's default CORS_ORIGINS


def bearer(user: str) -> bytes:
    claims = {"sub": user, "iat": int(time.time()), "exp": int(time.time()) + 600}
    return b"Authorization: Bearer " + jwt.encode(claims, SECRET, algorithm="HS256").encode()


@pytest.fixture(scope="module")
def gunicorn(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gunicorn]:
    folder = tmp_path_factory.mktemp("http-layer")
    # One worker with one thread: any request or client that held the thread would show at once.
    process = start_service(
        {"DATABASE_URL": f"sqlite:///{folder / 'tasks.db'}", "GUNICORN_THREADS": "1"}, folder / "gunicorn.log"
    )
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


def exchange(port: int, data: bytes, timeout: float = 10) -> tuple[int, dict[str, str], bytes]:
    """Send raw bytes, read until the server closes; (status, lower-cased headers, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


def request(line: bytes, *headers: bytes) -> bytes:
    return (
        line + b"\r\nHost: x\r\nOrigin: " + ORIGIN.encode() + b"\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n"
    )


CASES = {
    "URL over 4,094 bytes": (request(b"GET /" + b"a" * 5000 + b" HTTP/1.1"), 414),
    "header over 8,190 bytes": (request(b"GET /health HTTP/1.1", b"X-Big: " + b"b" * 9000), 431),
    "more than 100 headers": (request(b"GET /health HTTP/1.1", *(b"X-%d: c" % i for i in range(101))), 431),
    "head over 64 KiB": (request(b"GET /health HTTP/1.1", *(b"X-%d: " % i + b"d" * 8000 for i in range(9))), 431),
    "raw UTF-8 in the path": (request("GET /api/é/tasks HTTP/1.1".encode()), 400),
    "lower-case method": (request(b"get /health HTTP/1.1"), 400),
    "bare LF line ends": (b"GET /health HTTP/1.1\nHost: x\n\n", 400),
}


@pytest.mark.parametrize("case", CASES)
def test_gunicorns_own_answers_are_json_with_a_detail(gunicorn: Gunicorn, case: str) -> None:
    data, expected = CASES[case]
    status, headers, body = exchange(gunicorn.port, data)
    assert status == expected, (status, body)
    assert headers["content-type"] == "application/json"
    assert int(headers["content-length"]) == len(body)
    assert headers["connection"] == "close"
    document = json.loads(body)
    assert list(document) == ["detail"] and document["detail"].endswith(".")
    # No CORS headers (the request was not parsed, so its Origin is unknown), and no echo of the client's bytes.
    assert not any(name.startswith("access-control-") for name in headers)
    for echo in (b"aaaa", b"bbbb", b"X-1", b"\xc3\xa9", b"get "):
        assert echo not in body
    assert "Invalid request from ip=127.0.0.1" in gunicorn.text()


def test_a_half_sent_request_holds_no_thread_and_is_closed_at_the_deadline(gunicorn: Gunicorn) -> None:
    slow = []
    for _ in range(5):  # five times the worker's only thread
        sock = socket.create_connection(("127.0.0.1", gunicorn.port), timeout=server.REQUEST_DEADLINE + 5)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-a: ")
        slow.append((sock, time.monotonic()))
    try:
        started = time.monotonic()
        status, _ = http_get(gunicorn.port, "/health", timeout=5)
        assert status == 200 and time.monotonic() - started < 1
        for sock, opened in slow:
            assert sock.recv(1) == b""  # closed by the server, without an answer
            assert server.REQUEST_DEADLINE - 0.5 < time.monotonic() - opened < server.REQUEST_DEADLINE + 2
    finally:
        for sock, _ in slow:
            sock.close()


def test_a_body_shorter_than_its_content_length_holds_no_thread(gunicorn: Gunicorn) -> None:
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=5) as sock:
        sock.sendall(b"POST /api/a/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        time.sleep(0.2)
        started = time.monotonic()
        assert http_get(gunicorn.port, "/health", timeout=5)[0] == 200
        assert time.monotonic() - started < 1


def test_requests_sent_in_pieces_and_pipelined_are_all_answered(gunicorn: Gunicorn) -> None:
    first = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"GET /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=5) as sock:
        for piece in (first[:10], first[10:] + second[:7], second[7:]):
            sock.sendall(piece)
            time.sleep(0.1)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 200 ") and b"\nHTTP/1.1 404 " in received


def test_an_announced_body_over_the_limit_is_refused_at_once_and_the_connection_closed(gunicorn: Gunicorn) -> None:
    status, headers, body = exchange(
        gunicorn.port,
        b"POST /api/a/tasks HTTP/1.1\r\nHost: x\r\n"
        + bearer("a")
        + b"\r\nContent-Type: application/json\r\nContent-Length: 10000000\r\n\r\n"
        + b"x" * 1000,
    )
    # The app's own 413, answered from Content-Length alone; the connection is not kept for the rest.
    assert status == 413 and headers["connection"] == "close", (status, body)
    assert json.loads(body)["detail"] == "The request body is too large; the limit is 64 KiB."


def test_expect_100_continue_is_answered_before_the_body_is_sent(gunicorn: Gunicorn) -> None:
    task = b'{"title": "sent after the interim answer"}'
    with socket.create_connection(("127.0.0.1", gunicorn.port), timeout=5) as sock:
        sock.sendall(
            b"POST /api/a/tasks HTTP/1.1\r\nHost: x\r\n" + bearer("a") + b"\r\nContent-Type: "
            b"application/json\r\nExpect: 100-continue\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(task)
        )
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(task)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    assert received.startswith(b"HTTP/1.1 201 ") and b"100 Continue" not in received


def test_a_chunked_body_over_the_limit_gets_the_apps_413_without_waiting_for_the_rest(gunicorn: Gunicorn) -> None:
    # 80 KiB announced in one chunk, 76 KiB of it sent: enough for the app to refuse it, never finished.
    status, headers, body = exchange(
        gunicorn.port,
        b"POST /api/a/tasks HTTP/1.1\r\nHost: x\r\n"
        + bearer("a")
        + b"\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"%x\r\n" % (80 * 1024)
        + b"x" * (76 * 1024),
        timeout=5,
    )
    assert status == 413 and headers["connection"] == "close", (status, body)
    assert headers["x-request-id"]  # the app's answer, not the HTTP layer's
