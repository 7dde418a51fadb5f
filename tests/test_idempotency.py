"""Idempotency-Key on create: a retried create answers the task it made and never makes a second."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, cast

import pytest

from tests.common import ALICE, BOB, auth_headers, in_threads, make_app, run_sql

REUSED = "This Idempotency-Key was already used for a different task: send a new key with a new task."


def create(as_user: Any, key: str, body: dict[str, Any] | None = None, **kwargs: Any) -> Any:
    """POST a task with an Idempotency-Key."""
    return as_user("post", json=body or {"title": "Buy milk"}, headers={"Idempotency-Key": key}, **kwargs)


def count_tasks(app: Any) -> int:
    return int(run_sql(app, "SELECT count(*) FROM tasks")[0][0])


def test_a_replay_answers_the_first_task_and_creates_nothing(app: Any, as_user: Any) -> None:
    first = create(as_user, "create-1", {"title": "Buy milk", "description": "2 litres"})
    assert first.status_code == 201 and "Idempotent-Replayed" not in first.headers
    replay = create(as_user, "create-1", {"title": "Buy milk", "description": "2 litres"})
    assert replay.status_code == 201
    assert replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == first.get_json()
    for header in ("Location", "ETag"):
        assert replay.headers[header] == first.headers[header]
    assert count_tasks(app) == 1


@pytest.mark.parametrize(
    "retried",
    [
        {"title": "  Buy milk "},
        {"title": "Buy milk", "description": None, "completed": False},
        {"title": "Buy milk", "id": 5, "version": 9},
    ],
    ids=["spaces trimmed", "defaults spelled out", "ignored fields"],
)
def test_a_replay_compares_the_validated_fields(app: Any, as_user: Any, retried: dict[str, Any]) -> None:
    first = create(as_user, "same-task", {"title": "Buy milk"}).get_json()
    replay = create(as_user, "same-task", retried)
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json() == first and count_tasks(app) == 1


@pytest.mark.parametrize(
    "other",
    [{"title": "Buy bread"}, {"title": "Buy milk", "completed": True}, {"title": "Buy milk", "description": "x"}],
)
def test_a_key_reused_for_another_task_is_a_422_and_changes_nothing(
    app: Any, as_user: Any, other: dict[str, Any]
) -> None:
    first = create(as_user, "create-7").get_json()
    response = create(as_user, "create-7", other)
    assert response.status_code == 422
    assert response.get_json() == {
        "detail": REUSED,
        "errors": [{"field": "Idempotency-Key", "message": REUSED, "type": "idempotency_key_reused"}],
    }
    assert "Idempotent-Replayed" not in response.headers and "Location" not in response.headers
    assert count_tasks(app) == 1
    assert as_user("get", f"/tasks/{first['id']}").get_json() == first


def test_creates_without_a_key_are_never_replays(app: Any, as_user: Any) -> None:
    answers = [as_user("post", json={"title": "Buy milk"}) for _ in range(3)]
    assert [answer.status_code for answer in answers] == [201] * 3
    assert not any("Idempotent-Replayed" in answer.headers for answer in answers)
    assert len({answer.get_json()["id"] for answer in answers}) == 3 == count_tasks(app)


def test_the_same_key_of_two_users_makes_two_tasks(app: Any, as_user: Any) -> None:
    alice = create(as_user, "shared-key", {"title": "Alice's"})
    bob = create(as_user, "shared-key", {"title": "Bob's"}, user=BOB)
    assert alice.status_code == bob.status_code == 201
    assert "Idempotent-Replayed" not in alice.headers and "Idempotent-Replayed" not in bob.headers
    assert (alice.get_json()["user_id"], bob.get_json()["user_id"]) == (ALICE, BOB)
    assert alice.get_json()["id"] != bob.get_json()["id"]
    # Each user's replay finds their own task, never the other's.
    assert create(as_user, "shared-key", {"title": "Bob's"}, user=BOB).get_json() == bob.get_json()
    assert create(as_user, "shared-key", {"title": "Bob's"}).status_code == 422


def test_twenty_concurrent_creates_with_one_key_leave_one_task(app: Any) -> None:
    def send(_: int) -> Any:
        headers = {**auth_headers(), "Idempotency-Key": "double-click"}
        return app.test_client().post(f"/api/{ALICE}/tasks", json={"title": "Buy milk"}, headers=headers)

    answers = in_threads(20, send)
    assert [answer.status_code for answer in answers] == [201] * 20
    assert len({answer.get_json()["id"] for answer in answers}) == 1
    assert len({answer.headers["Location"] for answer in answers}) == 1
    assert sum("Idempotent-Replayed" not in answer.headers for answer in answers) == 1
    assert count_tasks(app) == 1


def test_concurrent_creates_with_one_key_and_different_tasks_make_one_and_refuse_the_rest(app: Any) -> None:
    def send(index: int) -> Any:
        headers = {**auth_headers(), "Idempotency-Key": "one-key"}
        return app.test_client().post(f"/api/{ALICE}/tasks", json={"title": f"task {index}"}, headers=headers)

    answers = in_threads(10, send)
    assert sorted(answer.status_code for answer in answers) == [201] + [422] * 9
    assert count_tasks(app) == 1


def test_a_clock_that_stands_still_never_turns_a_reused_key_into_a_replay(
    as_user: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # SQLite tells a new row by its created_at being this statement's time: a coarse clock (or a frozen
    # one) makes a conflict look new. The fingerprint is compared anyway.
    import models

    instant = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)

    class Frozen(datetime):
        @classmethod
        def now(cls, tz: Any = None) -> Frozen:
            return cast(Frozen, instant)

    monkeypatch.setattr(models, "datetime", Frozen)
    assert create(as_user, "frozen", {"title": "first"}).status_code == 201
    response = create(as_user, "frozen", {"title": "second"})
    assert response.status_code == 422
    assert response.get_json()["errors"][0]["type"] == "idempotency_key_reused"


def test_a_replay_answers_the_task_as_it_is_now(as_user: Any) -> None:
    first = create(as_user, "then-edited").get_json()
    as_user("patch", f"/tasks/{first['id']}", json={"title": "Buy oat milk"})
    replay = create(as_user, "then-edited")
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert replay.get_json()["id"] == first["id"]
    assert (replay.get_json()["title"], replay.get_json()["version"]) == ("Buy oat milk", 2)
    assert replay.headers["ETag"] == '"2"'


def test_a_key_is_remembered_while_its_task_exists(app: Any, as_user: Any) -> None:
    first = create(as_user, "deleted-later").get_json()
    assert as_user("delete", f"/tasks/{first['id']}").status_code == 204
    again = create(as_user, "deleted-later")
    assert again.status_code == 201 and "Idempotent-Replayed" not in again.headers
    assert again.get_json()["id"] != first["id"] and count_tasks(app) == 1


def test_a_replay_is_answered_when_the_user_is_at_the_task_limit(database_url: str) -> None:
    application = make_app(database_url, MAX_TASKS_PER_USER=1)
    client = application.test_client()

    def send(key: str, title: str) -> Any:
        headers = {**auth_headers(), "Idempotency-Key": key}
        return client.post(f"/api/{ALICE}/tasks", json={"title": title}, headers=headers)

    assert send("at-limit", "only one").status_code == 201
    replay = send("at-limit", "only one")
    assert replay.status_code == 201 and replay.headers["Idempotent-Replayed"] == "true"
    assert send("a-new-key", "a second").status_code == 409
    assert count_tasks(application) == 1
    application.extensions["db"].engine.dispose()


@pytest.mark.parametrize(
    "key",
    ["", "k" * 256, "tab\there", "new\x7fline", "ключ".encode().decode("latin-1")],
    ids=["empty", "256 characters", "control character", "DEL", "not ASCII"],
)
def test_a_malformed_key_is_a_422_and_creates_nothing(app: Any, as_user: Any, key: str) -> None:
    response = create(as_user, key)
    assert response.status_code == 422
    (error,) = response.get_json()["errors"]
    assert error["field"] == "Idempotency-Key" and "1 to 255 printable ASCII characters" in error["message"]
    assert count_tasks(app) == 0


@pytest.mark.parametrize("key", ["k", "k" * 255, " !~ printable ASCII, spaces too ~! ", "8c3f7a34-ae7e-4a9b"])
def test_every_well_formed_key_is_accepted(as_user: Any, key: str) -> None:
    first = create(as_user, key)
    assert first.status_code == 201
    assert create(as_user, key).get_json() == first.get_json()


def test_the_body_can_never_set_the_key_or_the_version(app: Any, as_user: Any) -> None:
    body = {"title": "t", "idempotency_key": "sneaky", "idempotency_fingerprint": "0" * 64, "version": 42}
    created = as_user("post", json=body)
    assert created.status_code == 201 and created.get_json()["version"] == 1
    task_id = created.get_json()["id"]
    updated = as_user("put", f"/tasks/{task_id}", json=body)
    assert updated.status_code == 200 and updated.get_json()["version"] == 2
    assert run_sql(app, "SELECT idempotency_key, idempotency_fingerprint FROM tasks") == [(None, None)]
    # "sneaky" names no task: it creates a new one rather than replaying this one.
    assert create(as_user, "sneaky", {"title": "t"}).get_json()["id"] != task_id


def test_the_key_is_checked_after_the_token(client: Any) -> None:
    # No token: a 401, whatever the key (an attacker learns nothing about keys in use).
    response = client.post(f"/api/{ALICE}/tasks", json={"title": "x"}, headers={"Idempotency-Key": ""})
    assert response.status_code == 401
