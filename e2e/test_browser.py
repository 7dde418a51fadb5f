"""A real browser against the real server: headless Debian Chromium (driven by selenium through the
system chromedriver) loads a page from http://localhost:3000 whose script calls the service, run by
gunicorn on another port, with fetch and a Bearer token.

Checked: every call works across origins (so the CORS preflight passed), the script can read the
real 401 status and its `detail` (not an opaque CORS failure), exposed headers are readable, and a
page from an origin that is not in CORS_ORIGINS is blocked by the browser (fetch rejects with a
TypeError) without its write reaching the database.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg2
import pytest
from helpers import (
    E2E,
    REPO,
    SECRET,
    Gunicorn,
    PrivateDatabase,
    free_port,
    http_get,
    http_post_json,
    port_is_free,
    start_service,
    static_server,
)

import auth

selenium = pytest.importorskip("selenium", reason="run e2e/setup.sh first")
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.wait import WebDriverWait  # noqa: E402

CLIENT = REPO / "clients" / "typescript"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FRONTEND_PORT = 3000
USER = "alice"
PAGE_TIMEOUT = 30

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def frontend_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The frontend's files: e2e/static's pages, and the TypeScript client built into tasks-api/."""
    built = subprocess.run(["npm", "run", "build"], cwd=CLIENT, capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, f"the client did not build (run e2e/setup.sh):\n{built.stdout}{built.stderr}"
    root = tmp_path_factory.mktemp("frontend")
    shutil.copytree(E2E / "static", root, dirs_exist_ok=True)
    shutil.copytree(CLIENT / "dist", root / "tasks-api")
    return root


@pytest.fixture(scope="module")
def frontend_origin(frontend_files: Path) -> Iterator[str]:
    """The allowed origin, http://localhost:3000 as the brief says (another free port if 3000 is taken)."""
    port = FRONTEND_PORT if port_is_free(FRONTEND_PORT) else free_port()
    with static_server(frontend_files, port):
        yield f"http://localhost:{port}"


@pytest.fixture(scope="module")
def foreign_origin() -> Iterator[str]:
    """An origin that is not in CORS_ORIGINS: the same page on 127.0.0.1, another port."""
    port = free_port()
    with static_server(E2E / "static", port):
        yield f"http://127.0.0.1:{port}"


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request: pytest.FixtureRequest, frontend_origin: str, tmp_path: Path) -> Iterator[Gunicorn]:
    """The service under gunicorn on a fresh database, CORS open to the frontend origin only."""
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            database_url = f"sqlite:///{tmp_path / 'tasks.db'}"
        else:
            try:
                database_url = stack.enter_context(PrivateDatabase("tasks_e2e")).url()
            except psycopg2.OperationalError as error:
                pytest.skip(f"PostgreSQL is not reachable: {error}")
        server = start_service(
            {"DATABASE_URL": database_url, "CORS_ORIGINS": frontend_origin}, tmp_path / "gunicorn.log"
        )
        try:
            server.wait_healthy()
            yield server
        finally:
            # Stopped before the database is dropped (ExitStack unwinds after this).
            server.stop()


# Tests ask for `service` before `browser`, so the browser (and its keep-alive connections) goes first.
@pytest.fixture
def browser() -> Iterator[webdriver.Chrome]:
    """Headless Chromium with a fresh profile, closed at the end."""
    if not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()):
        pytest.fail("chromium and chromedriver are missing: run `bash e2e/setup.sh`")
    profile = tempfile.mkdtemp(prefix="e2e-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--no-proxy-server",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        driver.set_page_load_timeout(PAGE_TIMEOUT)
        driver.set_script_timeout(PAGE_TIMEOUT)
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def run_page(
    driver: webdriver.Chrome, origin: str, service: Gunicorn, mode: str, page: str = "index.html"
) -> dict[str, Any]:
    """Load the page from `origin`, wait (bounded) for its script to finish, return its results."""
    token = auth.issue_token(SECRET, USER, email="alice@example.com", name="Alice")
    query = urllib.parse.urlencode({"api": service.base_url, "user": USER, "token": token, "mode": mode})
    driver.get(f"{origin}/{page}?{query}")
    WebDriverWait(driver, PAGE_TIMEOUT, poll_frequency=0.1).until(
        lambda d: d.execute_script("return window.__done === true")
    )
    results = driver.execute_script("return window.__results")
    assert "script_error" not in results, results
    return results


def replace_text(field: Any, text: str) -> None:
    """Replace what a form field holds, with the keystrokes a person would use."""
    field.send_keys(Keys.CONTROL, "a")
    field.send_keys(Keys.DELETE)
    field.send_keys(text)


def wait_for(condition: Callable[[], bool], timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return condition()


def list_tasks(service: Gunicorn) -> list[dict[str, Any]]:
    token = auth.issue_token(SECRET, USER)
    status, body = http_get(service.port, f"/api/{USER}/tasks", headers={"Authorization": f"Bearer {token}"})
    assert status == 200, body
    return json.loads(body)


def test_cross_origin_calls_from_the_allowed_origin(
    service: Gunicorn, frontend_origin: str, browser: webdriver.Chrome
) -> None:
    results = run_page(browser, frontend_origin, service, "full")
    failed = {name: r for name, r in results.items() if not r.get("fetched")}
    assert not failed, f"fetch rejected (CORS failure?): {failed}"

    created = results["create"]
    assert created["status"] == 201, created
    task_id = created["body"]["id"]
    assert created["body"]["title"] == "Buy milk" and created["body"]["completed"] is False
    # An exposed header (expose_headers) is readable by the script.
    assert created["location"] == f"/api/{USER}/tasks/{task_id}"
    assert results["create2"]["status"] == 201

    assert results["list"]["status"] == 200
    assert sorted(t["title"] for t in results["list"]["body"]) == ["Buy milk", "Walk the dog"]
    assert results["page"]["status"] == 200 and len(results["page"]["body"]) == 1
    assert results["page"]["total"] == "2"
    assert results["get"]["status"] == 200 and results["get"]["body"]["id"] == task_id

    assert results["toggle"]["status"] == 200 and results["toggle"]["body"]["completed"] is True
    assert [t["title"] for t in results["pending"]["body"]] == ["Walk the dog"]
    assert results["set"]["status"] == 200 and results["set"]["body"]["completed"] is False
    assert results["update"]["status"] == 200 and results["update"]["body"]["title"] == "Buy oat milk"

    assert results["delete"]["status"] == 204 and results["delete"]["body"] is None
    assert results["after_delete"]["status"] == 404
    assert results["after_delete"]["body"]["detail"] == "Task not found."

    # The real 401 and its sentence reach the script: not an opaque CORS error.
    for name in ("bad_token", "bad_token_write"):
        assert results[name]["status"] == 401, results[name]
        assert results[name]["body"] == {"detail": "The token is invalid; sign in again."}
        # Exposed, so a frontend can show it next to the error for support.
        assert results[name]["requestId"], results[name]
    assert results["no_token"]["status"] == 401
    assert results["no_token"]["body"]["detail"].startswith("Sign in to continue")
    assert results["other_user"]["status"] == 403
    assert results["other_user"]["body"] == {"detail": "You do not have access to these tasks."}

    # The browser sent preflights (Authorization and JSON make these non-simple requests) and they passed.
    def preflights_logged() -> bool:
        log = service.text()
        # The app's request log line: "OPTIONS /api/... 200 0.4ms user_id=-".
        return all(
            re.search(rf'OPTIONS {re.escape(path)}"? (HTTP/1\.1" )?200 ', log)
            for path in (f"/api/{USER}/tasks", f"/api/{USER}/tasks/{task_id}/complete")
        )

    assert wait_for(preflights_logged), service.text()

    assert [t["title"] for t in list_tasks(service)] == ["Walk the dog"]


def test_a_foreign_origin_is_blocked(service: Gunicorn, foreign_origin: str, browser: webdriver.Chrome) -> None:
    results = run_page(browser, foreign_origin, service, "blocked")
    for name in ("create", "list", "no_token"):
        assert results[name]["fetched"] is False, results[name]
        assert results[name]["error"] == "TypeError", results[name]
    # The browser says why: the CORS policy.
    messages = [entry["message"] for entry in browser.get_log("browser")]
    assert any("blocked by CORS policy" in message for message in messages), messages
    # The preflight failed, so the POST itself was never sent: nothing was written.
    assert list_tasks(service) == []


def test_the_typescript_client_from_the_frontends_origin(
    service: Gunicorn, frontend_origin: str, browser: webdriver.Chrome
) -> None:
    results = run_page(browser, frontend_origin, service, "client", page="client.html")
    failed = {name: r for name, r in results.items() if isinstance(r, dict) and not r.get("ok")}
    assert set(failed) == {"stale_update", "unauthorized"}, failed  # every other call went through

    created, second = results["create"]["value"], results["create2"]["value"]
    assert (created["title"], created["version"], created["user_id"]) == ("Buy milk", 1, USER)
    assert sorted(task["title"] for task in results["list"]["value"]) == ["Buy milk", "Walk the dog"]
    assert [task["title"] for task in results["page"]["value"]["tasks"]] == ["Buy milk"]
    assert results["page"]["value"]["total"] == 2  # X-Total-Count, an exposed header
    assert results["toggle"]["value"]["completed"] is True
    assert results["update"]["value"]["title"] == "Buy oat milk" and results["update"]["value"]["version"] == 3

    stale = failed["stale_update"]
    assert stale["precondition"] and stale["status"] == 412 and stale["name"] == "PreconditionFailedError"
    assert stale["currentEtag"] == '"3"'  # ETag, an exposed header
    assert stale["detail"] == "This task was changed elsewhere; reload it and try again."
    assert results["delete"] == {"ok": True, "value": None}  # a 204, no body read

    unauthorized = failed["unauthorized"]
    assert unauthorized["unauthorized"] and unauthorized["status"] == 401 and unauthorized["requestId"]
    assert results["told"] == 1

    # What the service holds: the update applied, the stale one not, the deleted task gone.
    stored = list_tasks(service)
    assert [(task["id"], task["title"]) for task in stored] == [(created["id"], "Buy oat milk")]
    assert second["id"] not in {task["id"] for task in stored}


def test_the_docs_render_every_operation_and_try_it_out_sends_a_request(
    service: Gunicorn, browser: webdriver.Chrome
) -> None:
    token = auth.issue_token(SECRET, USER)
    status, _ = http_post_json(service.port, f"/api/{USER}/tasks", {"title": "Seen in the docs"}, token)
    assert status == 201
    browser.get(f"{service.base_url}/docs")
    wait = WebDriverWait(browser, PAGE_TIMEOUT, poll_frequency=0.1)
    spec = json.loads(http_get(service.port, "/openapi.json")[1])
    operations = {op["operationId"] for item in spec["paths"].values() for op in item.values() if "operationId" in op}
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".opblock")) == len(operations))
    shown = {element.get_attribute("id") for element in browser.find_elements(By.CSS_SELECTOR, ".opblock")}
    assert {f"operations-{tag}-{name}" for name in operations for tag in ("tasks", "health", "docs")} >= shown

    # Authorize with the token, then list the tasks from the page.
    browser.find_element(By.CSS_SELECTOR, ".btn.authorize").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".auth-container input"))
    browser.find_element(By.CSS_SELECTOR, ".auth-container input").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, ".auth-btn-wrapper .authorize").click()
    browser.find_element(By.CSS_SELECTOR, ".btn-done").click()
    operation = browser.find_element(By.ID, "operations-tasks-listTasks")
    operation.find_element(By.CSS_SELECTOR, ".opblock-summary").click()
    wait.until(lambda d: operation.find_elements(By.CSS_SELECTOR, ".try-out__btn"))
    operation.find_element(By.CSS_SELECTOR, ".try-out__btn").click()
    # The fields hold the document's examples; select-and-type, as a person does (React sees the change).
    replace_text(operation.find_element(By.CSS_SELECTOR, "input[placeholder='user_id']"), USER)
    replace_text(operation.find_element(By.CSS_SELECTOR, "input[placeholder='offset']"), "0")
    operation.find_element(By.CSS_SELECTOR, ".execute").click()
    wait.until(
        lambda d: operation.find_elements(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status")
    )
    status_cell = operation.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_status")
    assert status_cell.text.strip() == "200"
    body = operation.find_element(By.CSS_SELECTOR, ".live-responses-table tr.response .response-col_description").text
    sent = operation.find_element(By.CSS_SELECTOR, ".request-url").text
    assert "Seen in the docs" in body and "x-total-count: 1" in body, sent

    # Nothing was refused by the page's Content-Security-Policy, and nothing was fetched from elsewhere.
    messages = [entry["message"] for entry in browser.get_log("browser")]
    assert not [m for m in messages if "Content Security Policy" in m or "Refused" in m], messages
