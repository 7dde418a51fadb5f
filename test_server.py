"""Tests of server.py without a server: where a request ends."""

from __future__ import annotations

import pytest

from server import RequestScanner, Verdict


# --- where a request ends ----------------------------------------------------------------------

def feed(*chunks: bytes, body_limit: int = 1000) -> tuple[RequestScanner, list[Verdict]]:
    scanner = RequestScanner(body_limit=body_limit, head_limit=4096)
    return scanner, [scanner.feed(chunk) for chunk in chunks]


def test_a_head_is_whole_at_its_empty_line_whatever_the_pieces() -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    _, verdicts = feed(*(request[i:i + 1] for i in range(len(request))))
    assert verdicts[:-1] == [Verdict.WAIT] * (len(request) - 1)
    assert verdicts[-1] is Verdict.READY


def test_half_a_header_line_waits() -> None:
    _, verdicts = feed(b"GET /health HTTP/1.1\r\nHost: x\r\nX-a: ")
    assert verdicts == [Verdict.WAIT]


def test_a_body_is_waited_for_up_to_its_content_length() -> None:
    head = b"POST /api/a/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n"
    _, verdicts = feed(head, b"x" * 10, b"x" * 9, b"x")
    assert verdicts == [Verdict.WAIT, Verdict.WAIT, Verdict.WAIT, Verdict.READY]


def test_a_pipelined_request_stays_in_the_buffer_for_later() -> None:
    first = b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
    scanner, verdicts = feed(first + b"GET /b HTTP/1.1\r\n")
    assert verdicts == [Verdict.READY] and bytes(scanner.data).endswith(b"GET /b HTTP/1.1\r\n")


def test_one_empty_line_before_the_request_line_is_allowed() -> None:
    assert feed(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")[1] == [Verdict.READY]


@pytest.mark.parametrize("head", [
    b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n",  # over the body limit: the app answers 413 from it
    b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",  # gunicorn: 400
    b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",  # not ending in chunked: gunicorn 400
    b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: something-else\r\n\r\n",  # gunicorn: 417
    b"GET / HTTP/1.1\nHost: x\n\n",  # bare LF: gunicorn refuses it at once
    b"GET / HTTP/1.1\r\nHost: x\n",
])
def test_what_gunicorn_or_the_app_refuses_unread_is_handed_over_at_once(head: bytes) -> None:
    assert feed(head)[1] == [Verdict.REFUSED_AT_ONCE]


def test_a_head_longer_than_the_limit_is_refused_without_waiting_for_its_end() -> None:
    _, verdicts = feed(b"GET / HTTP/1.1\r\n", b"X-a: " + b"a" * 5000)
    assert verdicts == [Verdict.WAIT, Verdict.HEAD_TOO_LARGE]


def test_a_chunked_body_is_whole_after_its_last_chunk_and_trailers() -> None:
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    _, verdicts = feed(head, b"5\r\nhello\r\n", b"3;ext=1\r\nabc\r\n", b"0\r\n", b"\r\n")
    assert verdicts == [Verdict.WAIT, Verdict.WAIT, Verdict.WAIT, Verdict.WAIT, Verdict.READY]
    _, verdicts = feed(head + b"2\r\nhi\r\n0\r\nX-Trailer: 1\r\n", b"\r\n")
    assert verdicts == [Verdict.WAIT, Verdict.READY]


def test_a_chunk_split_anywhere_waits() -> None:
    request = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n0\r\n\r\n"
    _, verdicts = feed(*(request[i:i + 3] for i in range(0, len(request), 3)))
    assert set(verdicts[:-1]) == {Verdict.WAIT} and verdicts[-1] is Verdict.READY


def test_a_chunked_body_over_the_limit_is_refused_as_soon_as_it_says_so() -> None:
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert feed(head + b"3e8\r\n")[1] == [Verdict.WAIT]  # 1000 bytes: the limit
    assert feed(head + b"3e9\r\n")[1] == [Verdict.BODY_TOO_LARGE]  # 1001 bytes
    assert feed(head + b"1\r\nx\r\n" * 300)[1] == [Verdict.BODY_TOO_LARGE]  # framing over the limit too


@pytest.mark.parametrize("chunks", [b"zz\r\n", b"5\r\nhelloXX", b"\r\n"])
def test_bad_chunk_framing_is_handed_over_for_gunicorns_400(chunks: bytes) -> None:
    assert feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)[1] == [Verdict.REFUSED_AT_ONCE]


def test_expect_100_continue_is_noted_while_the_body_is_missing() -> None:
    scanner, verdicts = feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert verdicts == [Verdict.WAIT] and scanner.expects_continue
    scanner, verdicts = feed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert verdicts == [Verdict.WAIT] and not scanner.expects_continue  # HTTP/1.0 clients do not wait for it
    scanner, verdicts = feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
    assert verdicts == [Verdict.READY]
