"""/docs: Swagger UI on /openapi.json, every file served by the service itself (nothing from the
internet), Swagger UI's files being those of the pinned flask-swagger-ui package."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
from pathlib import Path
from typing import Any

import pytest

import app as app_module

REPO = Path(__file__).resolve().parent.parent


def swagger_ui_file(name: str) -> bytes:
    spec = importlib.util.find_spec("flask_swagger_ui")
    assert spec is not None and spec.submodule_search_locations
    return (Path(next(iter(spec.submodule_search_locations))) / "dist" / name).read_bytes()


def test_the_page_loads_only_files_the_service_serves(client: Any) -> None:
    page = client.get("/docs")
    assert page.status_code == 200 and page.mimetype == "text/html"
    html = page.get_data(as_text=True)
    referenced = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert referenced and all(url.startswith("/docs/") for url in referenced), referenced
    types = {".js": "text/javascript", ".css": "text/css", ".png": "image/png"}
    for url in referenced:
        response = client.get(url)
        assert response.status_code == 200, url
        assert response.mimetype == types[Path(url).suffix]
        assert response.headers["Content-Security-Policy"] == page.headers["Content-Security-Policy"]
    script = client.get("/docs/docs.js").get_data(as_text=True)
    assert "/openapi.json" in script and "validatorUrl: null" in script  # no call to validator.swagger.io
    assert not re.search(r"https?://", html + script)


def test_the_page_may_run_scripts_and_send_requests_to_this_origin_only(client: Any) -> None:
    policy = dict(
        directive.strip().split(" ", 1)
        for directive in client.get("/docs").headers["Content-Security-Policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("name", sorted(app_module.SWAGGER_UI_FILES))
def test_swagger_uis_files_are_the_pinned_packages(client: Any, name: str) -> None:
    assert client.get(f"/docs/{name}").data == swagger_ui_file(name)


def test_the_package_is_the_version_requirements_pin() -> None:
    pinned = re.search(r"^flask-swagger-ui==(\S+)", (REPO / "requirements.txt").read_text(), re.MULTILINE)
    assert pinned is not None
    assert importlib.metadata.version("flask-swagger-ui") == pinned[1]


@pytest.mark.parametrize(
    "name", ["index.html", "nope.js", "..%2Fapp.py", "..%2F..%2Fetc%2Fpasswd", "LICENSE", "VERSION"]
)
def test_no_other_file_is_served(client: Any, name: str) -> None:
    response = client.get(f"/docs/{name}")
    assert response.status_code == 404 and response.get_json() == {"detail": "The requested resource was not found."}


@pytest.mark.parametrize(
    "headers",
    [
        {"Range": "bytes=0-10"},
        {"If-None-Match": "*"},
        {"If-Match": '"x"'},
        {"If-Modified-Since": "Sun, 1 Jan 2090 00:00:00 GMT"},
    ],
)
def test_the_docs_are_always_sent_whole(client: Any, headers: dict[str, str]) -> None:
    # No 206, 304 or 412 from werkzeug's file serving: the fuzz scenario found those undocumented.
    for path in ("/docs", "/docs/docs.js"):
        response = client.get(path, headers=headers)
        assert response.status_code == 200 and response.data == client.get(path).data
