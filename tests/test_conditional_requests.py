"""ETag, If-Match and If-None-Match on a task: a stale edit never silently overwrites a newer one."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from tests.common import ALICE, BOB, auth_headers, in_threads, postgres_only, run_sql

CHANGED_ELSEWHERE = "This task was changed elsewhere; reload it and try again."

# Each conditional change: (method, path under the task, body).
CHANGES = [
    ("put", "", {"title": "from the laptop"}),
    ("patch", "", {"description": "from the laptop"}),
    ("patch", "/complete", None),
    ("patch", "/complete", {"completed": True}),
    ("delete", "", None),
]
CHANGE_IDS = ["put", "patch", "toggle", "toggle to a value", "delete"]


def change(as_user: Any, task_id: int, method: str, suffix: str, body: Any, **headers: str) -> Any:
    """Send one change of a task, with the given headers."""
    kwargs = {"json": body} if body is not None else {}
    return as_user(method, f"/tasks/{task_id}{suffix}", headers=headers, **kwargs)


@pytest.mark.parametrize(
    "method,suffix,body",
    [("get", "", None), ("post", "", {"title": "x"}), *[change for change in CHANGES if change[0] != "delete"]],
    ids=["get", "create", *CHANGE_IDS[:-1]],
)
def test_every_answer_with_one_task_has_its_strong_etag(
    as_user: Any, new_task: Any, method: str, suffix: str, body: Any
) -> None:
    task = new_task()
    path = "/tasks" if method == "post" else f"/tasks/{task['id']}{suffix}"
    response = as_user(method, path, **({"json": body} if body is not None else {}))
    assert response.status_code in (200, 201)
    version = response.get_json()["version"]
    assert response.headers["ETag"] == f'"{version}"'  # strong: no W/
    assert version == (1 if method in ("get", "post") else 2)


def test_every_change_gives_a_new_etag(as_user: Any, new_task: Any) -> None:
    task_id = new_task()["id"]
    tags = [as_user("get", f"/tasks/{task_id}").headers["ETag"]]
    for method, suffix, body in CHANGES[:-1]:
        tags.append(change(as_user, task_id, method, suffix, body).headers["ETag"])
    tags.append(change(as_user, task_id, "put", "", {"title": "from the laptop"}).headers["ETag"])  # same title
    assert len(set(tags)) == len(tags) == 6


def test_a_list_carries_each_tasks_version(as_user: Any, new_task: Any) -> None:
    task = new_task()
    as_user("patch", f"/tasks/{task['id']}/complete")
    (listed,) = as_user("get").get_json()
    assert listed["version"] == 2 and "ETag" not in as_user("get").headers


@pytest.mark.parametrize("method,suffix,body", CHANGES, ids=CHANGE_IDS)
def test_a_stale_if_match_is_a_412_and_changes_nothing(
    as_user: Any, new_task: Any, method: str, suffix: str, body: Any
) -> None:
    task_id = new_task()["id"]
    seen = as_user("get", f"/tasks/{task_id}").headers["ETag"]
    newer = as_user("put", f"/tasks/{task_id}", json={"title": "from the phone"})  # the other device's change
    response = change(as_user, task_id, method, suffix, body, **{"If-Match": seen})
    assert response.status_code == 412
    assert response.get_json() == {"detail": CHANGED_ELSEWHERE}
    assert response.headers["ETag"] == newer.headers["ETag"] == '"2"'
    assert as_user("get", f"/tasks/{task_id}").get_json() == newer.get_json()


@pytest.mark.parametrize("method,suffix,body", CHANGES, ids=CHANGE_IDS)
@pytest.mark.parametrize("if_match", ['"1"', '"7", "1"', "*"], ids=["its etag", "a list with its etag", "any"])
def test_a_current_if_match_applies(
    as_user: Any, new_task: Any, method: str, suffix: str, body: Any, if_match: str
) -> None:
    task_id = new_task()["id"]
    response = change(as_user, task_id, method, suffix, body, **{"If-Match": if_match})
    if method == "delete":
        assert response.status_code == 204
        assert as_user("get", f"/tasks/{task_id}").status_code == 404
    else:
        assert response.status_code == 200 and response.headers["ETag"] == '"2"'


@pytest.mark.parametrize(
    "if_match",
    [
        'W/"1"',
        'w/"1"',
        'W/ "1"',
        "1",
        '"01"',
        '"1 "',
        '"x"',
        '""',
        '"99999999999999999999"',
        ",",
        "**",
        '"*"',
        "\u00e9",
        'junk"1"junk',
        '"1" junk',
        '"1", junk',
        '"1""1"',
    ],
)
def test_only_a_strong_etag_this_service_sent_matches(as_user: Any, new_task: Any, if_match: str) -> None:
    # RFC 9110: If-Match uses the strong comparison (a weak tag never matches), of the quoted tag as sent;
    # a list with anything malformed in it names nothing.
    task = new_task()
    response = change(as_user, task["id"], "put", "", {"title": "x"}, **{"If-Match": if_match})
    assert response.status_code == 412 and response.headers["ETag"] == '"1"'
    assert as_user("get", f"/tasks/{task['id']}").get_json() == task


@pytest.mark.parametrize("if_none_match", ['"2"', '"01"', "1", '""', ","])
def test_if_none_match_naming_another_version_sends_the_task(as_user: Any, new_task: Any, if_none_match: str) -> None:
    task = new_task()
    response = as_user("get", f"/tasks/{task['id']}", headers={"If-None-Match": if_none_match})
    assert response.status_code == 200 and response.get_json() == task


@pytest.mark.parametrize("method,suffix,body", CHANGES, ids=CHANGE_IDS)
@pytest.mark.parametrize("if_match", ['"1"', '"2"', "*"])
def test_if_match_on_another_users_task_is_a_404(
    as_user: Any, new_task: Any, method: str, suffix: str, body: Any, if_match: str
) -> None:
    # Never a 412: the answer must not reveal that the task exists, nor its version.
    bobs = new_task("Bob's", user=BOB)
    response = change(as_user, bobs["id"], method, suffix, body, **{"If-Match": if_match})
    assert response.status_code == 404 and "ETag" not in response.headers
    assert response.get_json() == as_user("get", "/tasks/999999").get_json()
    assert as_user("get", f"/tasks/{bobs['id']}", user=BOB).get_json() == bobs


@pytest.mark.parametrize("method,suffix,body", CHANGES, ids=CHANGE_IDS)
def test_if_match_on_a_missing_task_is_a_404(as_user: Any, method: str, suffix: str, body: Any) -> None:
    response = change(as_user, 999999, method, suffix, body, **{"If-Match": "*"})
    assert response.status_code == 404


def test_without_if_match_the_last_write_wins(as_user: Any, new_task: Any) -> None:
    task_id = new_task()["id"]
    as_user("put", f"/tasks/{task_id}", json={"title": "from the phone"})
    response = as_user("put", f"/tasks/{task_id}", json={"title": "from the laptop"})
    assert response.status_code == 200 and response.get_json()["title"] == "from the laptop"


def test_a_412_is_checked_after_the_body(as_user: Any, new_task: Any) -> None:
    # A bad body is the client's mistake whatever the version: 422 first, and nothing changes.
    task = new_task()
    response = as_user("put", f"/tasks/{task['id']}", json={"title": ""}, headers={"If-Match": '"5"'})
    assert response.status_code == 422
    assert as_user("get", f"/tasks/{task['id']}").get_json() == task


@pytest.mark.parametrize("if_none_match", ['"1"', 'W/"1"', '"3", "1"', "*"])
def test_if_none_match_with_its_etag_is_a_304_without_a_body(as_user: Any, new_task: Any, if_none_match: str) -> None:
    task_id = new_task()["id"]
    response = as_user("get", f"/tasks/{task_id}", headers={"If-None-Match": if_none_match})
    assert response.status_code == 304
    assert response.data == b"" and "Content-Type" not in response.headers
    assert response.headers["ETag"] == '"1"' and response.headers["Cache-Control"] == "no-store"


def test_if_none_match_with_an_old_etag_sends_the_task(as_user: Any, new_task: Any) -> None:
    task_id = new_task()["id"]
    changed = as_user("patch", f"/tasks/{task_id}/complete").get_json()
    response = as_user("get", f"/tasks/{task_id}", headers={"If-None-Match": '"1"'})
    assert response.status_code == 200 and response.get_json() == changed
    assert response.headers["ETag"] == '"2"'


@pytest.mark.parametrize("if_none_match", ['"1"', "*"])
def test_if_none_match_on_another_users_task_is_a_404(as_user: Any, new_task: Any, if_none_match: str) -> None:
    bobs = new_task("Bob's", user=BOB)
    response = as_user("get", f"/tasks/{bobs['id']}", headers={"If-None-Match": if_none_match})
    assert response.status_code == 404 and "ETag" not in response.headers


def test_the_browser_may_send_the_headers_and_read_the_answers(client: Any, as_user: Any, new_task: Any) -> None:
    origin = "http://localhost:3000"
    preflight = client.options(
        f"/api/{ALICE}/tasks/1",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type, if-match, if-none-match, idempotency-key",
        },
    )
    allowed = {name.strip().lower() for name in preflight.headers["Access-Control-Allow-Headers"].split(",")}
    assert {"if-match", "if-none-match", "idempotency-key"} <= allowed
    response = client.post(
        f"/api/{ALICE}/tasks", json={"title": "x"}, headers={"Origin": origin, "Idempotency-Key": "k", **auth_headers()}
    )
    exposed = {name.strip().lower() for name in response.headers["Access-Control-Expose-Headers"].split(",")}
    assert {"etag", "idempotent-replayed", "location"} <= exposed


@pytest.mark.parametrize("if_match", ['"1"', ' "7" ,, "1" ', "*", " * "])
def test_a_well_formed_if_match_list_matches(as_user: Any, new_task: Any, if_match: str) -> None:
    task_id = new_task()["id"]
    response = change(as_user, task_id, "put", "", {"title": "x"}, **{"If-Match": if_match})
    assert response.status_code == 200 and response.get_json()["title"] == "x"


@pytest.mark.parametrize("method,suffix,body", CHANGES, ids=CHANGE_IDS)
@pytest.mark.parametrize("if_none_match", ['"1"', 'W/"1"', '"3", "1"', "*"])
def test_a_change_with_if_none_match_naming_the_task_is_a_412(
    as_user: Any, new_task: Any, method: str, suffix: str, body: Any, if_none_match: str
) -> None:
    # RFC 9110 13.1.2: If-None-Match on a change means "only if the task is not at these versions".
    task = new_task()
    response = change(as_user, task["id"], method, suffix, body, **{"If-None-Match": if_none_match})
    assert response.status_code == 412 and response.headers["ETag"] == '"1"'
    assert as_user("get", f"/tasks/{task['id']}").get_json() == task


@pytest.mark.parametrize("method,suffix,body", CHANGES, ids=CHANGE_IDS)
def test_a_change_with_if_none_match_naming_other_versions_applies(
    as_user: Any, new_task: Any, method: str, suffix: str, body: Any
) -> None:
    task_id = new_task()["id"]
    response = change(as_user, task_id, method, suffix, body, **{"If-None-Match": '"2", "3"', "If-Match": '"1"'})
    assert response.status_code == (204 if method == "delete" else 200)


@pytest.mark.parametrize("if_none_match", ['"1"', "*"])
def test_if_none_match_on_a_change_of_another_users_or_a_missing_task_is_a_404(
    as_user: Any, new_task: Any, if_none_match: str
) -> None:
    bobs = new_task("Bob's", user=BOB)
    for task_id in (bobs["id"], 999999):
        response = as_user("put", f"/tasks/{task_id}", json={"title": "x"}, headers={"If-None-Match": if_none_match})
        assert response.status_code == 404 and "ETag" not in response.headers


@pytest.mark.parametrize("if_match,expected", [('"1"', 200), ("*", 200), ('"2"', 412), ('W/"1"', 412)])
def test_if_match_on_a_get(as_user: Any, new_task: Any, if_match: str, expected: int) -> None:
    task = new_task()
    response = as_user("get", f"/tasks/{task['id']}", headers={"If-Match": if_match})
    assert response.status_code == expected and response.headers["ETag"] == '"1"'
    if expected == 200:
        assert response.get_json() == task
    else:
        assert response.get_json() == {"detail": CHANGED_ELSEWHERE}


def test_if_match_is_evaluated_before_if_none_match_on_a_get(as_user: Any, new_task: Any) -> None:
    task_id = new_task()["id"]
    both = {"If-Match": '"2"', "If-None-Match": '"1"'}
    assert as_user("get", f"/tasks/{task_id}", headers=both).status_code == 412


@pytest.mark.parametrize("method,suffix,body", CHANGES, ids=CHANGE_IDS)
def test_of_concurrent_changes_with_one_etag_one_applies(
    app: Any, new_task: Any, method: str, suffix: str, body: Any
) -> None:
    task_id = new_task()["id"]

    def send(index: int) -> Any:
        headers = {**auth_headers(), "If-Match": '"1"'}
        kwargs = {"json": body} if body is not None else {}
        return app.test_client().open(
            f"/api/{ALICE}/tasks/{task_id}{suffix}", method=method.upper(), headers=headers, **kwargs
        )

    statuses = Counter(response.status_code for response in in_threads(10, send))
    # The losers find the task at version 2 (a 412), or, after the delete, gone (a 404).
    assert statuses == ({204: 1, 404: 9} if method == "delete" else {200: 1, 412: 9})


@postgres_only
def test_a_change_by_the_release_before_still_makes_the_etag_stale(app: Any, as_user: Any, new_task: Any) -> None:
    # During a rolling deploy the old release, which knows no version, still serves: its UPDATE moves
    # updated_at only, and the trigger of migration 0004 counts the version for it.
    task_id = new_task()["id"]
    run_sql(app, "UPDATE tasks SET title = 'old release', updated_at = clock_timestamp() WHERE id = :id", id=task_id)
    response = as_user("put", f"/tasks/{task_id}", json={"title": "stale"}, headers={"If-Match": '"1"'})
    assert response.status_code == 412 and response.headers["ETag"] == '"2"'
    assert as_user("get", f"/tasks/{task_id}").get_json()["title"] == "old release"
    # This release counts its own changes once, and a replay (ON CONFLICT ... DO UPDATE) counts none.
    assert as_user("put", f"/tasks/{task_id}", json={"title": "new"}).get_json()["version"] == 3
    keyed = as_user("post", json={"title": "k"}, headers={"Idempotency-Key": "k"}).get_json()
    assert as_user("post", json={"title": "k"}, headers={"Idempotency-Key": "k"}).get_json()["version"] == 1
    assert keyed["version"] == 1
