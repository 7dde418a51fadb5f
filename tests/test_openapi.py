"""openapi.json is valid OpenAPI 3.1, matches the app's routes both ways, and real responses validate.

Also shows that the checker in openapi_check.py fails when a response breaks the document: a checker
that cannot fail would prove nothing.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from openapi_spec_validator import validate as validate_openapi
from openapi_spec_validator.validation.exceptions import OpenAPIValidationError

import auth
import models
import validation
from tests.common import ALICE, auth_headers
from tests.openapi_check import (
    HTTP_METHODS,
    load_spec,
    match_path,
    route_coverage,
    schema_errors,
    validate_flask_response,
    validate_response,
)


def checked(response: Any) -> Any:
    """The response, after validate_flask_response found it true to the document."""
    validate_flask_response(response)
    return response


def rejects(response: Any, match: str, **changes: Any) -> None:
    """The checker refuses this response with some part replaced (status, content_type, body, headers)."""
    request = response.request
    values = {
        "status": response.status_code,
        "content_type": response.content_type,
        "body_bytes": response.get_data(),
        "headers": dict(response.headers),
        "query": request.query_string.decode(),
    }
    values.update(changes)
    with pytest.raises(AssertionError, match=match):
        validate_response(
            request.method,
            request.path,
            values.pop("status"),
            values.pop("content_type"),
            values.pop("body_bytes"),
            values.pop("headers"),
            query=values.pop("query"),
        )


# --- the document --------------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    spec = load_spec()
    assert spec["openapi"] == "3.1.0"
    validate_openapi(spec)


def test_the_spec_validator_can_fail() -> None:
    broken = load_spec()
    broken["paths"]["/health"]["get"]["responses"]["200"] = {"content": {}}  # a response needs a description
    with pytest.raises(OpenAPIValidationError, match="'description' is a required property"):
        validate_openapi(broken)


def _walk(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    yield pointer, node
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _walk(value, f"{pointer}/{key.replace('~', '~0').replace('/', '~1')}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{pointer}/{index}")


def test_every_example_matches_its_schema() -> None:
    """Examples of media types, parameters, headers and schemas: documentation that cannot drift."""
    checked_count = 0
    for pointer, node in _walk(load_spec()):
        if not isinstance(node, dict) or pointer.startswith("/x-"):
            continue
        if "schema" in node and ("example" in node or "examples" in node):
            values = (
                [node["example"]] if "example" in node else [example["value"] for example in node["examples"].values()]
            )
            for value in values:
                assert schema_errors(pointer + "/schema", value) == [], (pointer, value)
                checked_count += 1
        elif pointer.startswith("/components/schemas/") and pointer.count("/") == 3 and "examples" in node:
            for value in node["examples"]:
                assert schema_errors(pointer, value) == [], (pointer, value)
                checked_count += 1
    assert checked_count >= 40


def test_example_checking_can_fail() -> None:
    assert schema_errors("/components/schemas/Task", {"id": 1}) != []
    assert (
        schema_errors(
            "/components/schemas/Task",
            {
                "id": 1,
                "user_id": "a",
                "title": "t",
                "description": None,
                "completed": False,
                "created_at": "yesterday",
                "updated_at": "2026-11-25T17:01:59Z",
            },
        )
        != []
    )


def test_every_api_operation_is_secured_and_documents_auth_and_database_errors() -> None:
    spec = load_spec()
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            if method not in HTTP_METHODS:
                continue
            statuses = set(operation["responses"])
            assert "500" in statuses, (method, path)
            if path.startswith("/api/"):
                assert operation["security"] == [{"bearerAuth": []}], (method, path)
                assert {"401", "403", "503"} <= statuses, (method, path)
                if "{task_id}" in path:
                    assert "404" in statuses, (method, path)
                if "requestBody" in operation:
                    assert {"413", "415", "422"} <= statuses, (method, path)
            else:
                assert operation["security"] == [], (method, path)


def test_path_matching() -> None:
    assert match_path("/api/alice/tasks") == "/api/{user_id}/tasks"
    assert match_path("/api/alice/tasks/3") == "/api/{user_id}/tasks/{task_id}"
    assert match_path("/api/alice/tasks/3/complete") == "/api/{user_id}/tasks/{task_id}/complete"
    assert match_path("/api/alice/tasks/abc") == "/api/{user_id}/tasks/{task_id}"  # routed; the view says 404
    assert match_path("/health/ready") == "/health/ready"
    for unknown in ("/api/alice/tasks/", "/api/alice", "/api//tasks", "/api/alice/tasks/1/2", "/nope", "/health/"):
        assert match_path(unknown) is None, unknown


# --- routes, both ways ---------------------------------------------------------------------------


def test_every_route_is_documented_and_every_documented_route_exists(app: Any) -> None:
    undocumented, unimplemented = route_coverage(app)
    assert not undocumented, f"routes of the app missing from openapi.json: {undocumented}"
    assert not unimplemented, f"operations in openapi.json that the app does not have: {unimplemented}"


def test_route_coverage_reports_both_directions(app: Any) -> None:
    _, before = route_coverage(app)

    @app.route("/extra/<int:number>", methods=["GET", "POST"])
    def extra(number: int) -> str:
        return ""

    undocumented, unimplemented = route_coverage(app)
    assert undocumented == ["GET /extra/{number}", "POST /extra/{number}"]
    assert unimplemented == before
    # The app's tasks routes are seen as implemented, per method.
    assert "PATCH /api/{user_id}/tasks/{task_id}/complete" not in unimplemented
    assert "PUT /api/{user_id}/tasks/{task_id}" not in unimplemented


# --- real responses ------------------------------------------------------------------------------


def test_create_get_update_complete_delete_validate(client: Any) -> None:
    created = checked(
        client.post(f"/api/{ALICE}/tasks", json={"title": "Buy milk", "description": "2 l"}, headers=auth_headers())
    )
    assert created.status_code == 201 and created.headers["Location"].endswith(f"/{created.get_json()['id']}")
    task_url = created.headers["Location"]
    assert checked(client.get(task_url, headers=auth_headers())).status_code == 200
    assert checked(client.put(task_url, json={"title": "new"}, headers=auth_headers())).status_code == 200
    assert checked(client.patch(task_url, json={"description": None}, headers=auth_headers())).status_code == 200
    assert checked(client.patch(task_url + "/complete", headers=auth_headers())).status_code == 200
    assert (
        checked(client.patch(task_url + "/complete", json={"completed": False}, headers=auth_headers())).status_code
        == 200
    )
    assert checked(client.delete(task_url, headers=auth_headers())).status_code == 204
    assert checked(client.get(task_url, headers=auth_headers())).status_code == 404


def test_task_body_that_breaks_the_schema_is_rejected(client: Any) -> None:
    created = checked(client.post(f"/api/{ALICE}/tasks", json={"title": "Buy milk"}, headers=auth_headers()))
    task = created.get_json()
    for name in task:
        without = {key: value for key, value in task.items() if key != name}
        rejects(created, f"'{name}' is a required property", body_bytes=json.dumps(without).encode())
    rejects(created, "Additional properties", body_bytes=json.dumps({**task, "owner": "x"}).encode())
    rejects(created, "completed", body_bytes=json.dumps({**task, "completed": "false"}).encode())
    rejects(created, "created_at", body_bytes=json.dumps({**task, "created_at": "2026-11-25 17:01"}).encode())
    rejects(created, "id", body_bytes=json.dumps({**task, "id": "1"}).encode())
    rejects(created, "not JSON", body_bytes=b"<html>")
    rejects(
        created,
        "required header Location is missing",
        headers={k: v for k, v in created.headers.items() if k != "Location"},
    )
    rejects(created, "Content-Type 'text/html'", content_type="text/html")
    rejects(created, "status 200 is not documented", status=200)


def test_list_with_and_without_limit(client: Any) -> None:
    for title in ("a", "b", "c"):
        checked(client.post(f"/api/{ALICE}/tasks", json={"title": title}, headers=auth_headers()))
    page = checked(client.get(f"/api/{ALICE}/tasks?limit=2&status=all&sort=title", headers=auth_headers()))
    assert page.headers["X-Total-Count"] == "3" and len(page.get_json()) == 2
    whole = checked(client.get(f"/api/{ALICE}/tasks", headers=auth_headers()))
    assert "X-Total-Count" not in whole.headers
    rejects(
        page,
        "X-Total-Count must be sent if and only if",
        headers={k: v for k, v in page.headers.items() if k != "X-Total-Count"},
    )
    rejects(whole, "X-Total-Count must be sent if and only if", headers={**whole.headers, "X-Total-Count": "3"})
    rejects(page, "X-Total-Count", headers={**page.headers, "X-Total-Count": "three"})
    rejects(page, r"\$\[1\]", body_bytes=json.dumps([page.get_json()[0], {"id": 2}]).encode())
    rejects(page, "is not of type 'array'", body_bytes=b'{"tasks": []}')


def test_401_and_403(client: Any) -> None:
    missing = checked(client.get(f"/api/{ALICE}/tasks"))
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"] == "Bearer"
    refused = checked(client.get(f"/api/{ALICE}/tasks", headers={"Authorization": "Bearer a.b.c"}))
    assert refused.status_code == 401
    assert checked(client.get(f"/api/{ALICE}/tasks", headers=auth_headers("bob"))).status_code == 403
    rejects(missing, "required header WWW-Authenticate is missing", headers={"Content-Type": "application/json"})
    rejects(missing, "WWW-Authenticate", headers={**missing.headers, "WWW-Authenticate": "Basic"})
    rejects(missing, "'detail' is a required property", body_bytes=b'{"error": "no"}')
    rejects(missing, "should be non-empty", body_bytes=b'{"detail": ""}')


def test_422_body_and_query(client: Any) -> None:
    bad_body = checked(client.post(f"/api/{ALICE}/tasks", json={"title": "", "completed": 1}, headers=auth_headers()))
    assert bad_body.status_code == 422 and len(bad_body.get_json()["errors"]) == 2
    bad_query = checked(client.get(f"/api/{ALICE}/tasks?limit=0", headers=auth_headers()))
    assert bad_query.status_code == 422
    rejects(bad_body, "'errors' is a required property", body_bytes=b'{"detail": "Title must not be empty."}')
    rejects(
        bad_body,
        "is not one of",
        body_bytes=json.dumps(
            {"detail": "x", "errors": [{"field": "title", "message": "x", "type": "too_bad"}]}
        ).encode(),
    )
    rejects(
        bad_body,
        "Additional properties",
        body_bytes=json.dumps(
            {"detail": "x", "errors": [{"field": "title", "message": "x", "type": "missing", "hint": "?"}]}
        ).encode(),
    )


def test_other_errors_validate(client: Any) -> None:
    task_url = checked(client.post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers=auth_headers())).headers[
        "Location"
    ]
    assert (
        checked(
            client.post(f"/api/{ALICE}/tasks", data="x", content_type="text/plain", headers=auth_headers())
        ).status_code
        == 415
    )
    assert (
        checked(
            client.post(
                f"/api/{ALICE}/tasks", data="x" * (65 * 1024), content_type="application/json", headers=auth_headers()
            )
        ).status_code
        == 413
    )
    assert checked(client.get(f"/api/{ALICE}/tasks/abc", headers=auth_headers())).status_code == 404
    assert (
        checked(client.patch(task_url + "/complete", json={"completed": "yes"}, headers=auth_headers())).status_code
        == 422
    )
    assert checked(client.get("/health")).status_code == 200
    assert checked(client.get("/health/ready")).status_code == 200
    deleted = checked(client.delete(task_url, headers=auth_headers()))
    rejects(deleted, "the body must be empty", body_bytes=b"{}")
    health = checked(client.get("/health"))
    rejects(health, "status", body_bytes=b'{"status": "degraded"}')


def test_unknown_urls_wrong_methods_options_and_head(client: Any) -> None:
    for url in ("/nope", f"/api/{ALICE}", f"/api/{ALICE}/tasks/", f"/api/{ALICE}/tasks/1/2"):
        assert checked(client.get(url, headers=auth_headers())).status_code == 404
    wrong = checked(client.delete(f"/api/{ALICE}/tasks", headers=auth_headers()))
    assert wrong.status_code == 405
    assert checked(client.post(f"/api/{ALICE}/tasks/1/complete", headers=auth_headers())).status_code == 405
    options = checked(
        client.options(
            f"/api/{ALICE}/tasks/1",
            headers={"Origin": "http://localhost:3000", "Access-Control-Request-Method": "DELETE"},
        )
    )
    assert options.status_code == 200
    assert checked(client.head(f"/api/{ALICE}/tasks", headers=auth_headers())).status_code == 200
    assert checked(client.head("/health")).status_code == 200
    unknown = client.get("/nope")
    rejects(unknown, "status 200 is not documented", status=200)
    rejects(unknown, "'detail' is a required property", body_bytes=b"{}")
    rejects(wrong, "Allow is", headers={**wrong.headers, "Allow": "GET, HEAD, OPTIONS"})
    rejects(wrong, "required header Allow is missing", headers={k: v for k, v in wrong.headers.items() if k != "Allow"})
    rejects(options, "Allow is", headers={**options.headers, "Allow": "GET, POST, OPTIONS"})
    rejects(options, "the body must be empty", body_bytes=b"{}")


def test_a_documented_route_the_app_lacks_fails_clearly() -> None:
    """A documented route that the app does not have answers 404: reported, not waved through."""
    with pytest.raises(AssertionError, match=r"GET /docs -> 404: status 404 is not documented"):
        validate_response(
            "GET",
            "/docs",
            404,
            "application/json",
            b'{"detail": "The requested resource was not found."}',
            {"X-Request-ID": "x", "X-Content-Type-Options": "nosniff"},
        )


def test_headers_on_every_response(client: Any) -> None:
    api = checked(client.get(f"/api/{ALICE}/tasks", headers={**auth_headers(), "X-Request-ID": "req-1"}))
    health = checked(client.get("/health"))
    rejects(
        api,
        "required header X-Request-ID is missing",
        headers={k: v for k, v in api.headers.items() if k != "X-Request-ID"},
    )
    rejects(api, "X-Request-ID", headers={**api.headers, "X-Request-ID": "has spaces"})
    rejects(health, "X-Content-Type-Options", headers={**health.headers, "X-Content-Type-Options": "sniff"})
    rejects(
        api,
        "Cache-Control must be sent if and only if the path starts with '/api/'",
        headers={k: v for k, v in api.headers.items() if k != "Cache-Control"},
    )
    rejects(
        health, "Cache-Control must be sent if and only if", headers={**health.headers, "Cache-Control": "no-store"}
    )
    unknown_api = checked(client.get(f"/api/{ALICE}"))
    assert unknown_api.status_code == 404 and unknown_api.headers["Cache-Control"] == "no-store"


def test_the_served_document_is_this_file(client: Any) -> None:
    served = checked(client.get("/openapi.json"))
    assert served.status_code == 200 and served.get_json() == load_spec()
    assert checked(client.get("/docs")).status_code == 200


def test_validation_is_cached_and_quick(client: Any) -> None:
    response = client.get(f"/api/{ALICE}/tasks?limit=5", headers=auth_headers())
    validate_flask_response(response)
    started = time.perf_counter()
    for _ in range(500):
        validate_flask_response(response)
    assert time.perf_counter() - started < 2.0


def test_load_spec_returns_a_copy_the_checker_does_not_use() -> None:
    spec = load_spec()
    spec["paths"].clear()
    assert match_path("/health") == "/health" and load_spec()["paths"]


# --- the document and the code say the same ---------------------------------------------------------


def _limit_locations(node: Any, pointer: str = "") -> Iterator[tuple[str, Any]]:
    """Every maxLength and maximum in the document, as (JSON pointer, value)."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("maxLength", "maximum"):
                yield f"{pointer}/{key}", value
            else:
                yield from _limit_locations(value, f"{pointer}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _limit_locations(value, f"{pointer}/{index}")


def test_the_documents_limits_are_the_codes_constants() -> None:
    constants = {
        "/components/schemas/Task/properties/id/maximum": validation.MAX_TASK_ID,
        "/components/parameters/task_id/schema/maximum": validation.MAX_TASK_ID,
        "/components/schemas/Task/properties/title/maxLength": models.TITLE_MAX,
        "/components/schemas/Task/properties/description/maxLength": models.DESCRIPTION_MAX,
        "/components/schemas/Task/properties/user_id/maxLength": auth.MAX_USER_ID_LENGTH,
        "/components/parameters/user_id/schema/maxLength": auth.MAX_USER_ID_LENGTH,
        "/components/parameters/limit/schema/maximum": validation.MAX_LIMIT,
        "/components/parameters/offset/schema/maximum": validation.MAX_OFFSET,
        "/components/parameters/Idempotency-Key/schema/maxLength": models.IDEMPOTENCY_KEY_MAX,
    }
    # Every limit the document states is one of these: a new one must be tied to its constant here.
    assert dict(_limit_locations(load_spec())) == constants


def _documented_422s() -> list[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    """(method, path, example name, the request it answers, the answer) for every 422 example."""
    spec = load_spec()
    found = []
    for path, item in spec["paths"].items():
        for method, operation in item.items():
            answer = operation.get("responses", {}).get("422") if isinstance(operation, dict) else None
            for name, example in (
                (answer or {}).get("content", {}).get("application/json", {}).get("examples", {}).items()
            ):
                found.append((method, path, name, example.get("x-request"), example["value"]))
    return found


@pytest.mark.parametrize(
    "method,path,name,sent,documented", _documented_422s(), ids=[f"{m} {p} {n}" for m, p, n, _, _ in _documented_422s()]
)
def test_each_documented_422_is_the_live_answer_to_its_request(
    client: Any,
    new_task: Any,
    method: str,
    path: str,
    name: str,
    sent: dict[str, Any] | None,
    documented: dict[str, Any],
) -> None:
    assert sent is not None, f"the example {name!r} does not say which request it answers (x-request)"
    url = path.format(user_id=ALICE, task_id=new_task()["id"])
    if "before" in sent:  # the request that makes this one wrong (an Idempotency-Key's first use)
        assert _send(client, method, url, sent["before"]).status_code < 300
    response = _send(client, method, url, sent)
    assert response.status_code == 422
    assert response.get_json() == documented


def _send(client: Any, method: str, url: str, sent: dict[str, Any]) -> Any:
    """Send an example's request: its query, headers and body, as Alice."""
    if "query" in sent:
        url += "?" + sent["query"]
    headers = {**auth_headers(), **sent.get("headers", {})}
    if "body" in sent:
        headers["Content-Type"] = "application/json"
    return client.open(url, method=method.upper(), data=sent.get("body"), headers=headers)
