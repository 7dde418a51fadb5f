"""gunicorn, made safe from slow clients (a gthread worker that buffers each request on its poller), JSON
for gunicorn's own error answers, and the number of workers this machine can carry."""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import math
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial
from http import HTTPStatus
from pathlib import Path
from selectors import EVENT_READ
from typing import Any

from gunicorn import http, util
from gunicorn.config import Config
from gunicorn.http.unreader import SocketUnreader
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

# The app's body limit (validation.BODY_LIMIT, which a test ties this to): gunicorn.conf.py imports this
# module in every master, the benchmark's raw floor app's too, which must not load the service for it.
BODY_LIMIT = 64 * 1024
# A request (head and body) must arrive whole within this many seconds of its connection's opening, or
# of its first byte on a kept-alive connection; the connection is closed at that deadline.
REQUEST_DEADLINE = 10.0
# A client must take a whole response within this many seconds of its first byte being written.
SEND_TIMEOUT = 10.0
# The longest request head buffered; a longer one is answered 431 without waiting for its end.
HEAD_LIMIT = 64 * 1024
# gunicorn's own bound on a chunk-size line.
CHUNK_LINE_LIMIT = 8192
# The app reads a chunked body up to the limit and a little more (werkzeug one byte past
# MAX_CONTENT_LENGTH, gunicorn's reader up to 1 KiB ahead); with this much more here it needs no more.
CHUNKED_SLACK = 8 * 1024
# A closed connection's unread bytes are drained for this long (and at most LINGER_BYTES) so that the
# kernel does not answer them with a reset that could destroy the response (as gunicorn's close_graceful).
LINGER_SECONDS = 2.0
LINGER_BYTES = 64 * 1024
RECV_SIZE = 64 * 1024
# 8 workers x (DB_POOL_SIZE 5 + DB_MAX_OVERFLOW 5) = 80 connections, under Neon's ~97 direct ones.
MAX_DEFAULT_WORKERS = 8
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# --- how many workers ------------------------------------------------------------------------------


def usable_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process may use: its CPU affinity, lowered by a cgroup CPU quota (rounded up)."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    quota = cgroup_cpu_quota(cgroup_root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def default_workers(cpus: int | None = None) -> int:
    """gunicorn's 2 x CPUs, for the CPUs this process may use, at most MAX_DEFAULT_WORKERS."""
    return max(1, min(MAX_DEFAULT_WORKERS, 2 * (usable_cpus() if cpus is None else cpus)))


def cgroup_cpu_quota(cgroup_root: Path, proc_cgroup: Path) -> float | None:
    """The tightest CPU quota, in CPUs, of this process's cgroup and its ancestors (v2 or v1); None: none."""
    quotas = [
        quota
        for directory in _cgroup_directories(cgroup_root, proc_cgroup)
        if (quota := _quota_in(directory)) is not None
    ]
    return min(quotas, default=None)


def _cgroup_directories(cgroup_root: Path, proc_cgroup: Path) -> list[Path]:
    """The cgroup folders that may limit this process's CPU: its own and its ancestors, v2 and v1."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    # Inside a container the mounted hierarchy usually starts at the container's own cgroup, while
    # /proc/self/cgroup may still name the host's path: the mount root itself is always a candidate.
    found: list[Path] = []
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":
            bases = [cgroup_root]  # v2: the unified hierarchy
        elif "cpu" in controllers.split(","):
            bases = [cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"]
        else:
            continue
        parts = [part for part in path.strip("/").split("/") if part and part != ".."]
        for base in bases:
            found += [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]
    found += [cgroup_root, cgroup_root / "cpu", cgroup_root / "cpu,cpuacct"]
    unique = list(dict.fromkeys(found))
    return [directory for directory in unique if directory.is_dir()]


def _quota_in(directory: Path) -> float | None:
    """The CPU quota set in one cgroup folder, in CPUs; None when it sets none."""
    try:
        quota, period = (directory / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "150000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())  # v1: -1 when unlimited
        period_us = int((directory / "cpu.cfs_period_us").read_text())
        return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        return None


# --- where a request ends ---------------------------------------------------------------------------


class Verdict(enum.Enum):
    """What to do with a connection's bytes so far."""

    WAIT = "wait"  # more bytes are needed before gunicorn can parse the request without waiting
    READY = "ready"  # the whole request (head and body) is here
    # Enough is here for gunicorn or the app to answer (bad framing, a body over the limit): the rest is
    # never waited for, and the connection is closed after the answer.
    HAND_OVER_NOW = "hand over now"
    HEAD_TOO_LARGE = "head too large"  # no end of the head within HEAD_LIMIT: 431


class RequestScanner:
    """Follows one request's bytes as they arrive and says when all of it is here, framed as gunicorn frames it."""

    # The app reads a body up to one byte past BODY_LIMIT (its MAX_CONTENT_LENGTH) to see that it is too large.
    def __init__(self, body_limit: int = BODY_LIMIT + 1, head_limit: int = HEAD_LIMIT) -> None:
        """An empty buffer, waiting for a request head."""
        self.data = bytearray()
        self.body_limit = body_limit
        self.head_limit = head_limit
        self.expects_continue = False  # the client waits for "100 Continue" before it sends the body
        self._searched = 0  # bytes already searched for the end of the head and for bare LFs
        self._body_start = -1
        self._body_end = -1  # Content-Length framing
        self._chunk_at = -1  # chunked framing: where the next chunk-size line starts
        self._chunked_bytes = 0

    def feed(self, chunk: bytes) -> Verdict:
        """Add bytes; say whether the request is whole, still incomplete, or to be answered at once."""
        self.data += chunk
        if self._body_start < 0:
            verdict = self._scan_head()
            if verdict is not None:
                return verdict
        if self._chunk_at >= 0:
            return self._scan_chunks()
        return Verdict.READY if len(self.data) >= self._body_end else Verdict.WAIT

    def _scan_head(self) -> Verdict | None:
        """Find the end of the head (CRLFCRLF) and read its framing headers; None once the body is next."""
        data = self.data
        end = data.find(b"\r\n\r\n", max(0, self._searched - 3))
        limit = end if end >= 0 else len(data)
        lf = data.find(b"\n", self._searched, limit)
        while lf >= 0:
            if lf == 0 or data[lf - 1] != 0x0D:
                return Verdict.HAND_OVER_NOW  # a bare LF: gunicorn refuses it without reading more
            lf = data.find(b"\n", lf + 1, limit)
        self._searched = len(data)
        if end < 0:
            return Verdict.HEAD_TOO_LARGE if len(data) > self.head_limit else Verdict.WAIT
        if end + 4 > self.head_limit:
            return Verdict.HEAD_TOO_LARGE
        self._body_start = end + 4
        return self._read_framing(bytes(data[:end]))

    def _read_framing(self, head: bytes) -> Verdict | None:
        """Set where the body ends from Content-Length or Transfer-Encoding, as gunicorn's parser reads them."""
        lines = head.split(b"\r\n")
        request_line = lines[1] if lines[0] == b"" and len(lines) > 1 else lines[0]
        fields: dict[bytes, list[bytes]] = {}
        for line in lines[1:]:
            name, colon, value = line.partition(b":")
            if colon:
                fields.setdefault(name.lower(), []).append(value.strip(b" \t"))
        lengths = fields.get(b"content-length", [])
        codings = fields.get(b"transfer-encoding", [])
        if codings:
            last = b",".join(codings).split(b",")[-1].strip(b" \t").lower()
            if lengths or last != b"chunked":
                return Verdict.HAND_OVER_NOW  # gunicorn answers 400 or 501 without reading a body
            self._chunk_at = self._body_start
        elif lengths:
            if len(lengths) > 1 or not lengths[0].isdigit():
                return Verdict.HAND_OVER_NOW  # gunicorn answers 400
            if len(lengths[0]) > 18 or int(lengths[0]) > self.body_limit:
                return Verdict.HAND_OVER_NOW  # the app answers 413 from Content-Length alone
            self._body_end = self._body_start + int(lengths[0])
        else:
            self._body_end = self._body_start
        expect = [value.lower() for value in fields.get(b"expect", [])]
        if expect and (self._chunk_at >= 0 or self._body_end > len(self.data)):
            if expect != [b"100-continue"]:
                return Verdict.HAND_OVER_NOW  # gunicorn answers 417
            self.expects_continue = request_line.endswith(b" HTTP/1.1")
        return None

    def _scan_chunks(self) -> Verdict:
        """Walk the chunks received so far; READY after the last chunk and the trailer section."""
        data = self.data
        while True:
            at = self._chunk_at
            line_end = data.find(b"\r\n", at)
            if line_end < 0:
                return Verdict.HAND_OVER_NOW if len(data) - at > CHUNK_LINE_LIMIT else Verdict.WAIT
            size_text = data[at:line_end].split(b";", 1)[0].rstrip(b" \t")
            if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                return Verdict.HAND_OVER_NOW  # gunicorn answers 400 when it reads the body
            size = int(size_text, 16) if len(size_text) <= 16 else self.body_limit + 1
            if size == 0:
                trailers = line_end + 2
                if data[trailers : trailers + 2] == b"\r\n":
                    return Verdict.READY
                if data.find(b"\r\n\r\n", trailers) >= 0:
                    return Verdict.READY
                return Verdict.HAND_OVER_NOW if len(data) - trailers > self.head_limit else Verdict.WAIT
            here = min(size, len(data) - line_end - 2)  # this chunk's data received so far
            framing = line_end + 2 - self._body_start - self._chunked_bytes
            if self._chunked_bytes + here > self.body_limit + CHUNKED_SLACK or framing > self.body_limit:
                return Verdict.HAND_OVER_NOW  # the app reads no further than this before its 413
            chunk_end = line_end + 2 + size + 2
            if len(data) < chunk_end:
                return Verdict.WAIT
            if data[chunk_end - 2 : chunk_end] != b"\r\n":
                return Verdict.HAND_OVER_NOW  # gunicorn answers 400 when it reads the body
            self._chunked_bytes += size
            self._chunk_at = chunk_end


# --- gunicorn's own answers, as JSON ----------------------------------------------------------------


def error_detail(status: int, cfg: Config) -> str:
    """The sentence for an answer gunicorn (or this worker) gives before the app sees the request."""
    details = {
        400: "The request is not valid HTTP/1.1.",
        403: "The request is not allowed.",
        414: f"The URL is too long: the request line may be at most {cfg.limit_request_line:,} bytes.",
        417: "The Expect header is not supported, except for 100-continue.",
        431: (
            f"The request headers are too large: at most {cfg.limit_request_fields} headers of at most "
            f"{cfg.limit_request_field_size:,} bytes each, {HEAD_LIMIT // 1024} KiB in all."
        ),
        500: "Internal server error",
        501: "The Transfer-Encoding is not supported; send the body with Content-Length or chunked.",
    }
    return details.get(status, "The request could not be served.")


def json_error(status: int, detail: str) -> bytes:
    """A whole HTTP/1.1 response with the JSON error shape of errors.py; the connection closes after it."""
    body = json.dumps({"detail": detail}, separators=(",", ":")).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        "X-Content-Type-Options: nosniff\r\nCache-Control: no-store\r\n\r\n"
    )
    return head.encode("latin-1") + body


class _CapturedWrites:
    """The client's socket as gunicorn's handle_error sees it: what it writes is kept, not sent."""

    def __init__(self, sock: socket.socket) -> None:
        """Wrap sock; every other attribute is the socket's own."""
        self.sock = sock
        self.written = bytearray()

    def sendall(self, data: bytes, flags: int = 0) -> None:
        """Keep the bytes (gunicorn's HTML page) instead of sending them."""
        self.written += data

    def status(self) -> int:
        """The status of the response gunicorn wrote; 500 if it wrote none."""
        parts = bytes(self.written[:64]).split(b" ", 2)
        return int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else 500

    def __getattr__(self, name: str) -> Any:
        """Everything else is the socket's own."""
        return getattr(self.sock, name)


# --- reads and writes of a thread, bounded ----------------------------------------------------------


class DeadlineUnreader(SocketUnreader):
    """gunicorn's socket reader, except that a read that would wait past the request's deadline finds EOF.

    The worker hands a thread only whole requests, so the parser normally reads from the buffer alone;
    this is what bounds a thread if a request's framing ever fooled the RequestScanner. For a body the
    worker did not wait for, the deadline has passed already: its reads find EOF at once.
    """

    deadline = math.inf

    def chunk(self, size_hint: int | None = None) -> bytes:
        """One read from the socket, waiting at most until the deadline."""
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            return b""
        previous = self.sock.gettimeout()
        self.sock.settimeout(remaining if previous is None else min(previous, remaining))
        try:
            return super().chunk(size_hint)
        except (TimeoutError, BlockingIOError):
            return b""
        finally:
            self.sock.settimeout(previous)


class _TimedWrites:
    """The client's socket as a response writes to it: all the writes together end within SEND_TIMEOUT."""

    def __init__(self, sock: socket.socket) -> None:
        """Wrap sock; the clock starts at the first write."""
        self.sock = sock
        self.deadline: float | None = None

    def _arm(self) -> None:
        """Give the next write what is left of the response's time."""
        # settimeout bounds each call; the deadline bounds them all (a head, then a body, ...).
        if self.deadline is None:
            self.deadline = time.monotonic() + SEND_TIMEOUT
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("the client did not take the response in time")
        self.sock.settimeout(remaining)

    def sendall(self, data: bytes, flags: int = 0) -> None:
        """socket.sendall, ending at the response's deadline."""
        self._arm()
        self.sock.sendall(data, flags)

    def send(self, data: bytes, flags: int = 0) -> int:
        """socket.send, ending at the response's deadline."""
        self._arm()
        return self.sock.send(data, flags)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        """socket.sendfile, each of its waits ending at the response's deadline."""
        self._arm()
        return self.sock.sendfile(file, offset, count)

    def __getattr__(self, name: str) -> Any:
        """Everything else is the socket's own."""
        return getattr(self.sock, name)


# --- the worker -------------------------------------------------------------------------------------


class _State(enum.Enum):
    """Where a connection is."""

    READING = "reading"  # on the poller, its request arriving
    BUSY = "busy"  # a thread serves it
    IDLE = "idle"  # kept alive between requests (gunicorn's keepalived_conns)
    LINGERING = "lingering"  # our side shut down, the client's last bytes drained
    CLOSED = "closed"


class ClientConnection(TConn):
    """gunicorn's connection, with the request buffered so far and the deadlines that bound it."""

    def __init__(self, cfg: Config, sock: socket.socket, client: Any, server: Any) -> None:
        """A new connection, non-blocking (TConn), on no poller yet."""
        super().__init__(cfg, sock, client, server)
        self.state = _State.READING
        self.scanner: RequestScanner | None = None
        self.deadline = math.inf
        self.watched = False  # registered with the worker's poller
        self.sent_continue = False
        self.body_complete = True
        self.reset = False  # close with RST: a response the client did not take
        self.drained = 0


def _receive(conn: TConn) -> bytes | None:
    """What the client sent since the last read (b"" at its end, or when the socket failed); None: nothing yet."""
    try:
        data: bytes = conn.sock.recv(RECV_SIZE)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""
    return data


def _ip(conn: TConn) -> str:
    """The client's address for a log line ('' on a Unix socket)."""
    return conn.client[0] if isinstance(conn.client, tuple) else ""


class RequestBufferingWorker(ThreadWorker):
    """gunicorn's gthread worker that hands a thread only whole requests.

    New and kept-alive connections stay on the worker's poller (non-blocking) until their request head
    and body have arrived, or their deadline (REQUEST_DEADLINE) closes them; only then does a thread
    take the request, its bytes already in the parser's buffer. So a client that sends slowly, or half
    a request, or nothing, holds no thread; one that reads its response slowly holds one for at most
    SEND_TIMEOUT. Keep-alive, graceful shutdown, max_requests and reuse_port are gthread's own.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        """gthread's state, and the two deadline queues of this worker (both in deadline order)."""
        super().__init__(*args, **kwargs)
        self.reading: deque[tuple[float, ClientConnection]] = deque()
        self.lingering: deque[tuple[float, ClientConnection]] = deque()

    @classmethod
    def check_config(cls, cfg: Config, log: Any) -> None:
        """Refuse what this worker cannot buffer: TLS, HTTP/2 and uwsgi are read by gthread's threads only."""
        super().check_config(cfg, log)
        if cfg.is_ssl or cfg.http2_cleartext != "off" or cfg.protocol != "http":
            sys.exit(
                "Refusing to start: server.RequestBufferingWorker speaks plain HTTP/1.1 only (no TLS, HTTP/2 "
                "or uwsgi); terminate TLS and HTTP/2 in a proxy in front of it."
            )

    # -- accepting and reading, on the main thread --

    def accept(self, listener: socket.socket) -> None:
        """Accept one connection and wait, on the poller, for its first request."""
        try:
            sock, client = listener.accept()
        except OSError as error:
            if error.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        self._read_request(ClientConnection(self.cfg, sock, client, listener.getsockname()), b"")

    def on_client_socket_readable(self, conn: ClientConnection, client: socket.socket) -> None:
        """A kept-alive connection's next request begins: buffer it like a new connection's."""
        self.keepalived_conns.remove(conn)
        self._read_request(conn, b"")
        self._on_readable(conn, client)

    def _read_request(self, conn: ClientConnection, data: bytes) -> None:
        """Start buffering conn's next request (data: bytes of it already read), under a fresh deadline."""
        conn.state = _State.READING
        conn.scanner = RequestScanner()
        conn.sent_continue = False
        conn.deadline = time.monotonic() + REQUEST_DEADLINE
        self.reading.append((conn.deadline, conn))
        self._watch(conn, self._on_readable)
        if data:
            self._take(conn, data)

    def _on_readable(self, conn: ClientConnection, _sock: socket.socket) -> None:
        """Read what the client has sent; hand the request over once it is whole."""
        data = _receive(conn)
        if data is None:
            return
        if not data:
            self._close(conn)  # the client gave up, or closed a kept-alive connection
            return
        self._take(conn, data)

    def _take(self, conn: ClientConnection, data: bytes) -> None:
        """Add bytes to conn's request and act on the scanner's verdict."""
        assert conn.scanner is not None
        verdict = conn.scanner.feed(data)
        if verdict is Verdict.WAIT:
            if conn.scanner.expects_continue and not conn.sent_continue:
                conn.sent_continue = True
                try:
                    conn.sock.send(CONTINUE)
                except OSError:
                    self._close(conn)
        elif verdict in (Verdict.READY, Verdict.HAND_OVER_NOW):
            self._hand_over(conn, complete=verdict is Verdict.READY)
        else:
            self.log.warning("Invalid request from ip=%s: %s", _ip(conn), verdict.value)
            self._answer_and_close(conn, 431)

    def _hand_over(self, conn: ClientConnection, *, complete: bool) -> None:
        """Give the buffered request to a thread: its bytes go into the parser's buffer first."""
        assert conn.scanner is not None
        self._unwatch(conn)
        conn.state = _State.BUSY
        conn.body_complete = complete
        if conn.parser is None:
            conn.parser = http.get_parser(self.cfg, conn.sock, conn.client)
            conn.parser.unreader = DeadlineUnreader(conn.sock)
        # The rest of a body not waited for is not waited for in the thread either: its reads find EOF.
        conn.parser.unreader.deadline = conn.deadline if complete else -math.inf
        conn.parser.unreader.unread(bytes(conn.scanner.data))
        conn.scanner = None
        conn.data_ready = True  # gthread's handle() must not wait for data: it is all here
        self.enqueue_req(conn)

    # -- serving, in a thread --

    def handle_request(self, req: Any, conn: ClientConnection) -> bool:
        """gthread's handle_request, its writes bounded by SEND_TIMEOUT; a client too slow to read is cut off."""
        # The body is here already, or will not be waited for: gunicorn must not invite it (again).
        req._expected_100_continue = False
        if not conn.body_complete:
            req.force_close()  # the answer says "Connection: close", as the connection will
        sock = conn.sock
        conn.sock = _TimedWrites(sock)
        try:
            return super().handle_request(req, conn)
        except TimeoutError:
            self.log.info(
                "Closing the connection of ip=%s: it did not take its response within %.0f s", _ip(conn), SEND_TIMEOUT
            )
            conn.reset = True
            return False
        finally:
            conn.sock = sock

    def _keepalive_after(self, conn: ClientConnection, keepalive: bool) -> bool:
        """Close, rather than drain, a connection whose body was not waited for (one over the limit, say)."""
        if not conn.body_complete:
            return False
        return super()._keepalive_after(conn, keepalive)

    def handle_error(self, req: Any, client: socket.socket, addr: Any, exc: BaseException) -> None:
        """gunicorn's answer to a request it cannot parse or serve (status, log line), with a JSON body."""
        captured = _CapturedWrites(client)
        super().handle_error(req, captured, addr, exc)
        status = captured.status()
        try:
            util.write_nonblock(client, json_error(status, error_detail(status, self.cfg)))
        except Exception:  # noqa: BLE001 - as gunicorn: the client may be gone
            self.log.debug("Failed to send error message.")

    # -- after a request, on the main thread --

    def finish_request(self, conn: ClientConnection, fs: Future[Any]) -> None:
        """After a thread: wait for the next request on the poller, or close (lingering, off the main loop's time)."""
        try:
            keepalive = bool(fs.result()) if not fs.cancelled() else False
        except Exception:  # noqa: BLE001 - handle() logs its own errors
            keepalive = False
        if conn.reset:
            self._close(conn, reset=True)
        elif not keepalive:
            self._linger(conn)
        else:
            conn.sock.setblocking(False)
            pipelined = conn.parser.unreader.take_buffered()
            if pipelined:
                self._read_request(conn, pipelined)
            else:
                conn.state = _State.IDLE
                conn.set_timeout()
                if not self.alive:
                    conn.timeout = min(conn.timeout, time.monotonic() + STOP_KEEPALIVE_LINGER)
                self.keepalived_conns.append(conn)
                self._watch(conn, self.on_client_socket_readable)

    def _answer_and_close(self, conn: ClientConnection, status: int) -> None:
        """Answer a request this worker refuses itself (431) without a thread, then close."""
        with contextlib.suppress(OSError):
            conn.sock.send(json_error(status, error_detail(status, self.cfg)))
        self._linger(conn)

    def _linger(self, conn: ClientConnection) -> None:
        """Close as gunicorn's close_graceful does (FIN, drain, close), but on the poller, not blocking it."""
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.state = _State.LINGERING
        conn.drained = 0
        self.lingering.append((time.monotonic() + LINGER_SECONDS, conn))
        self._watch(conn, self._on_linger_readable)

    def _on_linger_readable(self, conn: ClientConnection, _sock: socket.socket) -> None:
        """Drop what a closing client still sends; close at its EOF or after LINGER_BYTES."""
        data = _receive(conn)
        if data is None:
            return
        conn.drained += len(data)
        if not data or conn.drained >= LINGER_BYTES:
            self._close(conn)

    def _close(self, conn: ClientConnection, *, reset: bool = False) -> None:
        """Close conn once: off the poller, out of the worker's count."""
        if conn.state is _State.CLOSED:
            return
        self._unwatch(conn)
        conn.state = _State.CLOSED
        conn.scanner = None  # the deadline queues may hold conn a while longer; its bytes need not wait
        self.nr_conns -= 1
        if reset:
            with contextlib.suppress(OSError):
                conn.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        util.close(conn.sock)

    def _watch(self, conn: ClientConnection, callback: Callable[[ClientConnection, socket.socket], None]) -> None:
        """Have the poller call callback(conn, sock) when conn's socket is readable."""
        if conn.watched:
            self.poller.modify(conn.sock, EVENT_READ, partial(callback, conn))
        else:
            self.poller.register(conn.sock, EVENT_READ, partial(callback, conn))
            conn.watched = True

    def _unwatch(self, conn: ClientConnection) -> None:
        """Take conn's socket off the poller."""
        if conn.watched:
            with contextlib.suppress(KeyError, ValueError, OSError):
                self.poller.unregister(conn.sock)
            conn.watched = False

    # -- deadlines, on the main thread --

    def murder_pending(self) -> None:
        """Close connections whose request did not arrive whole in time, or that lingered long enough."""
        super().murder_pending()
        now = time.monotonic()
        for queue, state in ((self.reading, _State.READING), (self.lingering, _State.LINGERING)):
            while queue and queue[0][0] <= now:
                deadline, conn = queue.popleft()
                # A connection queued again since (a kept-alive one's next request) has a later entry too.
                if conn.state is state and (state is _State.LINGERING or conn.deadline == deadline):
                    self._close(conn)

    def wait_for_and_dispatch_events(self, timeout: float) -> None:
        """gthread's poll, woken in time for the next deadline rather than up to a second late."""
        heads = [queue[0][0] for queue in (self.reading, self.lingering) if queue]
        if heads:
            timeout = max(0.0, min(timeout, min(heads) - time.monotonic()))
        super().wait_for_and_dispatch_events(timeout)
