"""Settings: defaults, environment and mapping; every mistake refused in one sentence at every entry
point; secrets never printed; the token command."""

from __future__ import annotations

import http.client
import logging
import os
import socket
import sqlite3
import subprocess
import sys
import time
from typing import Any

import jwt
import pytest

import app as app_module
from app import create_app
from auth import DEV_SECRET
from db import normalise_database_url
from errors import ConfigError
from tests.common import (
    SECRET,
    make_app,
)
from tests.harness import Process, wait_port

ORIGIN = "http://localhost:3000"


def test_the_per_user_task_limit_defaults_to_10000(app: Any) -> None:
    assert app.config["MAX_TASKS_PER_USER"] == 10_000


@pytest.mark.parametrize(
    "entry",
    [
        "*",
        "https://*.example.com",
        "https://app.example.com/",
        "https://app.example.com/app",
        "app.example.com",
        "ftp://app.example.com",
        "https://app.example.com:port",
        "https://user@app.example.com",
        "null",
        "https://app.example.com?x=1",
    ],
)
def test_cors_origins_must_be_exact_origins(database_url: str, entry: str) -> None:
    with pytest.raises(ConfigError, match="^CORS_ORIGINS entries must be exact origins"):
        make_app(database_url, CORS_ORIGINS=f"http://localhost:3000, {entry}")


def test_cors_origins_from_configuration(database_url: str) -> None:
    application = make_app(database_url, CORS_ORIGINS="https://app.example, https://www.app.example")
    client = application.test_client()
    for origin in ("https://app.example", "https://www.app.example"):
        response = client.get("/health", headers={"Origin": origin})
        assert response.headers["Access-Control-Allow-Origin"] == origin
    assert "Access-Control-Allow-Origin" not in client.get("/health", headers={"Origin": ORIGIN}).headers
    application.extensions["db"].engine.dispose()


def test_missing_secret_refuses_to_start(database_url: str) -> None:
    with pytest.raises(RuntimeError, match="BETTER_AUTH_SECRET is not set"):
        create_app({"DATABASE_URL": database_url})


def test_the_published_development_secret_is_refused_outside_python_app_py(database_url: str) -> None:
    # Anyone can read it in this repository, so anyone could forge tokens with it.
    with pytest.raises(ConfigError, match="^BETTER_AUTH_SECRET is the development secret published"):
        make_app(database_url, BETTER_AUTH_SECRET=DEV_SECRET)


@pytest.mark.parametrize(
    "setting,value,sentence",
    [
        ("LOG_LEVEL", "TRACE", "^LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not 'TRACE'.$"),
        ("DATABASE_URL", "localhost/tasks", "^DATABASE_URL must look like postgresql://"),
        ("DATABASE_URL", "postgresql://user@host:abc/db", "^DATABASE_URL cannot be parsed"),
        ("DATABASE_URL", "postgresql://user:p@ss@127.0.0.1/db", "^DATABASE_URL has a raw @ in its password"),
        ("MAX_TASKS_PER_USER", "lots", "^MAX_TASKS_PER_USER must be a whole number"),
    ],
)
def test_configuration_mistakes_are_one_sentence(database_url: str, setting: str, value: str, sentence: str) -> None:
    with pytest.raises(ConfigError, match=sentence) as raised:
        make_app(database_url, **{setting: value})
    assert "\n" not in str(raised.value) and "ss@" not in str(raised.value)


def test_short_secret_warns(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        application = make_app(database_url, BETTER_AUTH_SECRET="short")
    assert any("shorter than 32 bytes" in record.getMessage() for record in caplog.records)
    assert all(record.getMessage() != "short" for record in caplog.records)
    application.extensions["db"].engine.dispose()


def test_dev_secret_only_when_allowed(database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        application = create_app({"DATABASE_URL": database_url, "ALLOW_DEV_SECRET": True})
    assert application.config["BETTER_AUTH_SECRET"] == DEV_SECRET
    assert any("DEVELOPMENT secret" in record.getMessage() for record in caplog.records)
    application.extensions["db"].engine.dispose()


def test_environment_is_read_and_mapping_wins(monkeypatch: pytest.MonkeyPatch, database_url: str) -> None:
    monkeypatch.setenv("BETTER_AUTH_SECRET", "from-the-environment-0123456789abcdef")
    monkeypatch.setenv("DB_POOL_SIZE", "7")
    monkeypatch.setenv("CORS_ORIGINS", "https://env.example")
    application = create_app({"DATABASE_URL": database_url, "CORS_ORIGINS": "https://mapping.example"})
    assert application.config["BETTER_AUTH_SECRET"] == "from-the-environment-0123456789abcdef"
    assert application.config["DB_POOL_SIZE"] == 7
    assert application.config["CORS_ORIGINS"] == "https://mapping.example"
    application.extensions["db"].engine.dispose()


def test_bad_integer_setting_is_a_clear_error(database_url: str) -> None:
    with pytest.raises(RuntimeError, match="DB_POOL_SIZE must be a whole number"):
        make_app(database_url, DB_POOL_SIZE="many")


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("postgres://u:p@host/db", "postgresql+psycopg2://u:p@host/db"),
        (
            "postgresql://u:p@ep-x-pooler.neon.tech/neondb?sslmode=require&channel_binding=require",
            "postgresql+psycopg2://u:p@ep-x-pooler.neon.tech/neondb?sslmode=require&channel_binding=require",
        ),
        ("postgresql+psycopg2://u@h:5433/d", "postgresql+psycopg2://u@h:5433/d"),
        ("sqlite:///tasks.db", "sqlite:///tasks.db"),
        ("postgres://u:p%40ss@h/d", "postgresql+psycopg2://u:p%40ss@h/d"),
    ],
)
def test_database_url_normalisation(raw: str, expected: str) -> None:
    assert normalise_database_url(raw) == expected


def test_database_url_default_is_sqlite_file_in_working_directory(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    application = create_app({"BETTER_AUTH_SECRET": SECRET})
    assert application.config["DATABASE_URL"] == "sqlite:///tasks.db"
    assert (tmp_path / "tasks.db").exists()
    application.extensions["db"].engine.dispose()


def test_token_cli_prints_a_valid_token(app: Any) -> None:
    result = app.test_cli_runner().invoke(args=["token", "carol", "--email", "c@example.com"])
    assert result.exit_code == 0
    claims = jwt.decode(result.output.strip(), SECRET, algorithms=["HS256"])
    assert claims["sub"] == "carol" and claims["email"] == "c@example.com" and claims["exp"] > time.time()


def test_lazy_app_attribute_reports_configuration_errors_in_one_sentence(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(vars(app_module), "app", raising=False)
    with pytest.raises(SystemExit, match="^BETTER_AUTH_SECRET is not set"):
        app_module.app  # noqa: B018 (the attribute access is the test)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


ENTRY_POINTS = {
    "app:app (gunicorn, flask --app app)": ["-c", "import app; app.app"],
    "python app.py": ["app.py"],
    "python app.py token": ["app.py", "token", "alice"],
}


def run_entry_point(argv: list[str], environment: dict[str, str], cwd: Any, timeout: float = 30) -> Any:
    """Run the service's entry point in a fresh interpreter, with only the given settings."""
    env = {name: value for name, value in os.environ.items() if name not in app_module.SETTINGS}
    env.update({"PYTHONPATH": REPO, "PORT": str(_free_port()), **environment})
    command = [sys.executable, *(["-c", argv[1]] if argv[0] == "-c" else [os.path.join(REPO, argv[0]), *argv[1:]])]
    return subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize(
    "setting,value,named",
    [
        ("DATABASE_URL", "localhost/tasks", "DATABASE_URL"),
        ("DATABASE_URL", "postgresql://tasks@db.example:abc/tasks", "DATABASE_URL"),
        ("DATABASE_URL", "postgresql://tasks:p@ss@127.0.0.1/tasks", "DATABASE_URL"),
        ("LOG_LEVEL", "TRACE", "LOG_LEVEL"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT"),
        ("CORS_ORIGINS", "https://*.example.com", "CORS_ORIGINS"),
        ("DB_POOL_SIZE", "five", "DB_POOL_SIZE"),
        ("USERS_TABLE", "user", "users table 'user'"),
    ],
)
def test_startup_mistakes_are_one_sentence_and_a_failed_exit(
    tmp_path: Any, entry: str, setting: str, value: str, named: str
) -> None:
    if setting in ("LOG_LEVEL", "LOG_FORMAT") and entry == "python app.py token":
        pytest.skip("the token command logs nothing: it sets its own LOG_LEVEL")
    database = tmp_path / "tasks.db"
    if setting == "USERS_TABLE":
        with sqlite3.connect(database) as connection:  # a users table the service cannot reference
            connection.execute('CREATE TABLE "user" (id BLOB PRIMARY KEY, name TEXT)')
    environment = {"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": f"sqlite:///{database}", setting: value}
    result = run_entry_point(ENTRY_POINTS[entry], environment, tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and lines[0].endswith("."), result.stderr
    assert "ss@" not in result.stderr and "Traceback" not in result.stderr


def test_the_database_password_is_never_printed_or_logged(tmp_path: Any) -> None:
    password = "s3cret-Pa55word"
    # Nothing listens on port 1: the development server starts anyway (503s), and says where its database is.
    environment = {"DATABASE_URL": f"postgresql://tasks:{password}@127.0.0.1:1/tasks", "DB_CONNECT_TIMEOUT": "1"}
    env = {name: value for name, value in os.environ.items() if name not in app_module.SETTINGS}
    env.update({"PYTHONPATH": REPO, "PORT": str(_free_port()), "PYTHONUNBUFFERED": "1", **environment})
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "app.py")],
        env=env,
        cwd=tmp_path,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("curl" in line for line in output):
            line = server.stdout.readline() if server.stdout else ""
            if not line:
                break
            output.append(line)
    finally:
        server.terminate()
        output += (server.communicate(timeout=10)[0] or "").splitlines()
    text_out = "".join(output)
    assert "database: postgresql+psycopg2://tasks:***@127.0.0.1:1/tasks" in text_out, text_out
    assert "unreachable at startup" in text_out and password not in text_out


def flask_command(*argv: str) -> list[str]:
    """`flask --app app ...` in a fresh interpreter."""
    return [sys.executable, "-m", "flask", "--app", "app", *argv]


def test_flask_run_debug_serves_with_the_labelled_development_secret(tmp_path: Any) -> None:
    port = _free_port()
    env = {name: value for name, value in os.environ.items() if name not in app_module.SETTINGS}
    env.update({"PYTHONPATH": REPO, "DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}", "PYTHONUNBUFFERED": "1"})
    env.pop("FLASK_DEBUG", None)
    server = Process(
        "flask-run", flask_command("run", "--debug", "--no-reload", "--port", str(port)), tmp_path / "log", env=env
    )
    try:
        assert wait_port(port, 30), server.tail()
        token = jwt.encode({"sub": "alice", "exp": int(time.time()) + 60}, DEV_SECRET, algorithm="HS256")
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request("GET", "/api/alice/tasks", headers={"Authorization": f"Bearer {token}"})
        assert connection.getresponse().status == 200
        connection.close()
        assert "Using the DEVELOPMENT secret: tokens are forgeable" in server.text()
    finally:
        server.stop()


@pytest.mark.parametrize(
    "argv,debug",
    [
        (["run"], None),  # Flask's server, not in debug mode
        (["run"], "0"),
        (["db", "current"], "1"),  # debug, but not the development server
        (["-c", "import app; app.app"], "1"),  # gunicorn's app:app with FLASK_DEBUG=1 in the environment
        (["run", "--debug", "--host", "0.0.0.0"], None),  # the whole network could sign tokens
    ],
    ids=["flask run", "FLASK_DEBUG=0 flask run", "FLASK_DEBUG=1 flask db", "FLASK_DEBUG=1 app:app", "--host 0.0.0.0"],
)
def test_the_development_secret_is_for_python_app_py_and_flask_run_debug_only(
    tmp_path: Any, argv: list[str], debug: str | None
) -> None:
    env = {name: value for name, value in os.environ.items() if name not in app_module.SETTINGS}
    env.update({"PYTHONPATH": REPO, "DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}", "PORT": str(_free_port())})
    env.pop("FLASK_DEBUG", None)
    if debug is not None:
        env["FLASK_DEBUG"] = debug
    command = [sys.executable, *argv] if argv[0] == "-c" else flask_command(*argv)
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("BETTER_AUTH_SECRET is not set"), result.stderr
