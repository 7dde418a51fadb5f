"""Tests of server.py without a server: the CPU count and worker default, and where a request ends."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import server
from server import RequestScanner, Verdict

ROOT = Path(__file__).resolve().parent.parent


# --- usable CPUs and the default worker count ------------------------------------------------------


@pytest.fixture
def eight_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(8)), raising=False)


def cgroup(tmp_path: Path, own_path: str, files: dict[str, str], *, v1: bool = False) -> tuple[Path, Path]:
    """A fake cgroup mount (files relative to it) and a /proc/self/cgroup naming own_path."""
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc = tmp_path / "proc-self-cgroup"
    proc.write_text(f"4:cpu,cpuacct:{own_path}\n2:memory:{own_path}\n" if v1 else f"0::{own_path}\n")
    return root, proc


@pytest.mark.usefixtures("eight_cpus")
@pytest.mark.parametrize(
    ("cpu_max", "expected"),
    [
        ("max 100000\n", 8),  # no quota: the affinity
        ("100000 100000\n", 1),
        ("150000 100000\n", 2),  # a fractional quota is rounded up
        ("50000 100000\n", 1),  # and never below one CPU
        ("400000 100000\n", 4),
        ("1600000 100000\n", 8),  # a quota above the affinity does not add CPUs
    ],
)
def test_a_cgroup_v2_quota_lowers_the_cpu_count(tmp_path: Path, cpu_max: str, expected: int) -> None:
    root, proc = cgroup(tmp_path, "/", {"cpu.max": cpu_max})
    assert server.usable_cpus(root, proc) == expected


@pytest.mark.usefixtures("eight_cpus")
def test_the_tightest_quota_of_the_cgroup_and_its_ancestors_counts(tmp_path: Path) -> None:
    # systemd's slices: the service's own cgroup sets nothing, its slice sets 2 CPUs.
    root, proc = cgroup(
        tmp_path,
        "/system.slice/tasks.service",
        {
            "cpu.max": "max 100000",
            "system.slice/cpu.max": "200000 100000",
            "system.slice/tasks.service/cpu.max": "max 100000",
        },
    )
    assert server.usable_cpus(root, proc) == 2


@pytest.mark.usefixtures("eight_cpus")
def test_a_container_sees_its_own_cgroup_at_the_mount_root(tmp_path: Path) -> None:
    # Without a cgroup namespace /proc/self/cgroup names the host's path, which the container's mount lacks.
    root, proc = cgroup(tmp_path, "/docker/0123abcd", {"cpu.max": "100000 100000"})
    assert server.usable_cpus(root, proc) == 1


@pytest.mark.usefixtures("eight_cpus")
@pytest.mark.parametrize(
    ("quota", "period", "expected"), [("-1", "100000", 8), ("250000", "100000", 3), ("100000", "100000", 1)]
)
def test_a_cgroup_v1_quota_lowers_the_cpu_count(tmp_path: Path, quota: str, period: str, expected: int) -> None:
    root, proc = cgroup(tmp_path, "/", {"cpu/cpu.cfs_quota_us": quota, "cpu/cpu.cfs_period_us": period}, v1=True)
    assert server.usable_cpus(root, proc) == expected


@pytest.mark.usefixtures("eight_cpus")
def test_no_cgroup_files_means_the_affinity(tmp_path: Path) -> None:
    assert server.usable_cpus(tmp_path / "missing", tmp_path / "missing-too") == 8
    root, proc = cgroup(tmp_path, "/", {"cpu.max": "garbage"})
    assert server.usable_cpus(root, proc) == 8


def test_the_affinity_counts_not_the_hosts_cpus(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert server.usable_cpus(tmp_path / "none", tmp_path / "none") == 1


@pytest.mark.parametrize(("cpus", "workers"), [(1, 2), (2, 4), (4, 8), (5, 8), (64, 8)])
def test_default_workers_is_two_per_cpu_at_most_eight(cpus: int, workers: int) -> None:
    assert server.default_workers(cpus) == workers


def conf_workers(env: dict[str, str], prefix: list[str] | None = None) -> int:
    """The `workers` gunicorn.conf.py computes in a fresh process with env (and a command prefix)."""
    full_env = {key: value for key, value in os.environ.items() if key != "WEB_CONCURRENCY"}
    full_env.update({"BETTER_AUTH_SECRET": "test-" + "x" * 40, **env})
    code = "import runpy, sys; print(runpy.run_path(sys.argv[1])['workers'])"
    result = subprocess.run(
        [*(prefix or []), sys.executable, "-c", code, str(ROOT / "gunicorn.conf.py")],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[-1])


def test_gunicorn_conf_uses_the_default_and_web_concurrency_overrides_it() -> None:
    assert conf_workers({}) == server.default_workers()
    assert conf_workers({"WEB_CONCURRENCY": "3"}) == 3


@pytest.mark.skipif(not shutil.which("taskset"), reason="taskset is not installed")
def test_pinned_to_one_cpu_gunicorn_starts_two_workers() -> None:
    assert conf_workers({}, prefix=["taskset", "-c", "0"]) == 2


# --- where a request ends ----------------------------------------------------------------------


def feed(*chunks: bytes, body_limit: int = 1000) -> tuple[RequestScanner, list[Verdict]]:
    scanner = RequestScanner(body_limit=body_limit, head_limit=4096)
    return scanner, [scanner.feed(chunk) for chunk in chunks]


def test_a_head_is_whole_at_its_empty_line_whatever_the_pieces() -> None:
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    _, verdicts = feed(*(request[i : i + 1] for i in range(len(request))))
    assert verdicts[:-1] == [Verdict.WAIT] * (len(request) - 1)
    assert verdicts[-1] is Verdict.READY


def test_half_a_header_line_waits() -> None:
    _, verdicts = feed(b"GET /health HTTP/1.1\r\nHost: x\r\nX-a: ")
    assert verdicts == [Verdict.WAIT]


def test_a_body_is_waited_for_up_to_its_content_length() -> None:
    head = b"POST /api/a/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: 20\r\n\r\n"
    _, verdicts = feed(head, b"x" * 10, b"x" * 9, b"x")
    assert verdicts == [Verdict.WAIT, Verdict.WAIT, Verdict.WAIT, Verdict.READY]


def test_a_body_one_byte_over_the_limit_is_waited_for_as_the_app_reads_it_to_refuse_it() -> None:
    head = b"POST /api/a/tasks HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
    assert RequestScanner().feed(head % (server.BODY_LIMIT + 1)) is Verdict.WAIT  # MAX_CONTENT_LENGTH
    assert RequestScanner().feed(head % (server.BODY_LIMIT + 2)) is Verdict.HAND_OVER_NOW  # refused unread


def test_a_pipelined_request_stays_in_the_buffer_for_later() -> None:
    first = b"POST /a HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"
    scanner, verdicts = feed(first + b"GET /b HTTP/1.1\r\n")
    assert verdicts == [Verdict.READY] and bytes(scanner.data).endswith(b"GET /b HTTP/1.1\r\n")


def test_one_empty_line_before_the_request_line_is_allowed() -> None:
    assert feed(b"\r\nGET / HTTP/1.1\r\nHost: x\r\n\r\n")[1] == [Verdict.READY]


@pytest.mark.parametrize(
    "head",
    [
        b"POST / HTTP/1.1\r\nContent-Length: 5000\r\n\r\n",  # over the body limit: the app answers 413 from it
        b"POST / HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",  # gunicorn: 400
        b"POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n",
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",  # not ending in chunked: gunicorn 400
        b"POST / HTTP/1.1\r\nContent-Length: 5\r\nExpect: something-else\r\n\r\n",  # gunicorn: 417
        b"GET / HTTP/1.1\nHost: x\n\n",  # bare LF: gunicorn refuses it at once
        b"GET / HTTP/1.1\r\nHost: x\n",
    ],
)
def test_what_gunicorn_or_the_app_refuses_unread_is_handed_over_at_once(head: bytes) -> None:
    assert feed(head)[1] == [Verdict.HAND_OVER_NOW]


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
    _, verdicts = feed(*(request[i : i + 3] for i in range(0, len(request), 3)))
    assert set(verdicts[:-1]) == {Verdict.WAIT} and verdicts[-1] is Verdict.READY


def test_a_chunked_body_over_the_limit_is_handed_over_once_the_app_can_refuse_it() -> None:
    head = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    slack = server.CHUNKED_SLACK
    # A big chunk announced is not enough: the app reads up to the limit before its 413 ...
    assert feed(head + b"%x\r\n" % (10 * slack) + b"x" * 1000)[1] == [Verdict.WAIT]
    # ... and once that much (and gunicorn's read-ahead) is here, it needs nothing more.
    assert feed(head + b"%x\r\n" % (10 * slack) + b"x" * (1001 + slack))[1] == [Verdict.HAND_OVER_NOW]
    assert feed(head + (b"%x\r\n" % (slack + 1001)) + b"x" * (slack + 1001) + b"\r\n")[1] == [Verdict.HAND_OVER_NOW]
    assert feed(head + b"1\r\nx\r\n" * 300)[1] == [Verdict.HAND_OVER_NOW]  # framing over the limit too
    assert feed(head + b"3e8\r\n" + b"x" * 1000 + b"\r\n0\r\n\r\n")[1] == [Verdict.READY]  # 1000: the limit


@pytest.mark.parametrize("chunks", [b"zz\r\n", b"5\r\nhelloXX", b"\r\n"])
def test_bad_chunk_framing_is_handed_over_for_gunicorns_400(chunks: bytes) -> None:
    assert feed(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks)[1] == [Verdict.HAND_OVER_NOW]


def test_expect_100_continue_is_noted_while_the_body_is_missing() -> None:
    scanner, verdicts = feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert verdicts == [Verdict.WAIT] and scanner.expects_continue
    scanner, verdicts = feed(b"POST / HTTP/1.0\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n")
    assert verdicts == [Verdict.WAIT] and not scanner.expects_continue  # HTTP/1.0 clients do not wait for it
    scanner, verdicts = feed(b"POST / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\nabc")
    assert verdicts == [Verdict.READY]


def test_gunicorns_answers_are_json_with_a_sentence_and_never_the_clients_bytes() -> None:
    from gunicorn.config import Config

    for status in (400, 414, 417, 431, 500, 501, 418):
        response = server.json_error(status, server.error_detail(status, Config()))
        head, _, body = response.partition(b"\r\n\r\n")
        assert head.startswith(f"HTTP/1.1 {status} ".encode())
        assert b"Content-Type: application/json" in head and b"Connection: close" in head
        assert f"Content-Length: {len(body)}".encode() in head
        detail = json.loads(body)["detail"]
        assert detail and detail[0].isupper()


def test_the_worker_buffers_bodies_up_to_the_apps_own_limit() -> None:
    import validation

    assert server.BODY_LIMIT == validation.BODY_LIMIT
    assert "validation" not in server.__dict__  # gunicorn.conf.py loads this module without the service
