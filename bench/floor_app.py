"""The floor: the smallest Flask app that does what the tasks API does per request.

It verifies the same HS256 token with PyJWT, runs the one equivalent SQL statement through raw
psycopg2 (autocommit, one connection per thread) and returns the same JSON. No validation beyond
what the benchmark's requests need, no ORM, no pool, no CORS. Run it under the service's own
gunicorn settings:  gunicorn -c gunicorn.conf.py --pythonpath bench floor_app:app
"""

import os
import threading
from datetime import UTC, datetime
from typing import Any

import jwt
import psycopg2
from flask import Flask, Response, jsonify, request
from flask.typing import ResponseReturnValue

SECRET = os.environ["BETTER_AUTH_SECRET"]
DSN = os.environ["DATABASE_URL"]
COLUMNS = "id, user_id, title, description, completed, created_at, updated_at, version"
ORDER = {"created": "created_at", "updated": "updated_at", "title": "title"}

app = Flask(__name__)
app.json.sort_keys = False  # type: ignore[attr-defined]
app.json.ensure_ascii = False  # type: ignore[attr-defined]
_local = threading.local()


def _cursor() -> Any:
    """A cursor on this thread's own autocommit connection, opened at first use."""
    connection = getattr(_local, "connection", None)
    if connection is None or connection.closed:
        connection = _local.connection = psycopg2.connect(DSN)
        connection.autocommit = True
    return connection.cursor()


def _one(sql: str, params: Any) -> Any:
    """The first row of a statement, or None."""
    with _cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchone()


def _all(sql: str, params: Any) -> list[Any]:
    """Every row of a statement."""
    with _cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.fetchall()


def _iso(value: datetime) -> str:
    """A timestamp as the API writes it: ISO 8601 in UTC with a Z."""
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _task(row: Any) -> dict[str, Any]:
    """A task row as the API's JSON object."""
    return {
        "id": row[0],
        "user_id": row[1],
        "title": row[2],
        "description": row[3],
        "completed": row[4],
        "created_at": _iso(row[5]),
        "updated_at": _iso(row[6]),
        "version": row[7],
    }


def _error(status: int, detail: str) -> Response:
    """An error answer: {"detail": ...} with the status."""
    response = jsonify(detail=detail)
    response.status_code = status
    return response


def _owner(user_id: str) -> Response | None:
    """None when the token is valid and its sub is user_id, else the error response."""
    header = request.headers.get("Authorization", "")
    if not header.startswith("Bearer "):
        return _error(401, "Sign in to continue.")
    try:
        claims = jwt.decode(
            header[7:].strip(), SECRET, algorithms=["HS256"], leeway=30, options={"require": ["exp", "sub"]}
        )
    except jwt.PyJWTError:
        return _error(401, "The token is invalid; sign in again.")
    return None if claims["sub"] == user_id else _error(403, "You do not have access to these tasks.")


@app.get("/health")
def health() -> ResponseReturnValue:
    """Liveness."""
    return jsonify(status="ok")


@app.get("/health/ready")
def ready() -> ResponseReturnValue:
    """Readiness: the database answers."""
    _one("SELECT 1", ())
    return jsonify(status="ok")


@app.get("/api/<user_id>/tasks")
def list_tasks(user_id: str) -> ResponseReturnValue:
    """A user's tasks, filtered, sorted, and paged when limit is given (with X-Total-Count)."""
    denied = _owner(user_id)
    if denied:
        return denied
    args = request.args
    sort = args.get("sort", "created")
    order = "DESC" if args.get("order", "asc" if sort == "title" else "desc") == "desc" else "ASC"
    where = "user_id = %s"
    params: list[Any] = [user_id]
    if args.get("status", "all") != "all":
        where += " AND completed = %s"
        params.append(args["status"] == "completed")
    order_by = f"ORDER BY {ORDER[sort]} {order}, id {order}"
    if "limit" not in args:
        rows = _all(
            f"SELECT {COLUMNS} FROM tasks WHERE {where} {order_by} OFFSET %s", params + [int(args.get("offset", 0))]
        )
        return jsonify([_task(row) for row in rows])
    rows = _all(
        f"SELECT {COLUMNS}, count(*) OVER () FROM tasks WHERE {where} {order_by} LIMIT %s OFFSET %s",
        params + [int(args["limit"]), int(args.get("offset", 0))],
    )
    response = jsonify([_task(row) for row in rows])
    response.headers["X-Total-Count"] = str(rows[0][8] if rows else 0)
    return response


@app.post("/api/<user_id>/tasks")
def create_task(user_id: str) -> ResponseReturnValue:
    """A new task of the user's."""
    denied = _owner(user_id)
    if denied:
        return denied
    body = request.get_json()
    description = body.get("description")
    row = _one(
        f"INSERT INTO tasks (user_id, title, description, completed, created_at, updated_at) "
        f"VALUES (%s, %s, %s, false, now(), now()) RETURNING {COLUMNS}",
        (user_id, body["title"].strip(), description.strip() if description else description),
    )
    return jsonify(_task(row)), 201, {"Location": f"/api/{user_id}/tasks/{row[0]}", "ETag": f'"{row[7]}"'}


@app.get("/api/<user_id>/tasks/<int:task_id>")
def get_task(user_id: str, task_id: int) -> ResponseReturnValue:
    """One task of the user's."""
    denied = _owner(user_id)
    if denied:
        return denied
    row = _one(f"SELECT {COLUMNS} FROM tasks WHERE id = %s AND user_id = %s", (task_id, user_id))
    return (jsonify(_task(row)), 200, {"ETag": f'"{row[7]}"'}) if row else _error(404, "Task not found.")


def _update(user_id: str, task_id: int, assignments: str, params: Any) -> ResponseReturnValue:
    """One UPDATE of a task of the user's; the task as it is now, or 404."""
    row = _one(
        f"UPDATE tasks SET {assignments}, version = version + 1, updated_at = clock_timestamp() "
        f"WHERE id = %s AND user_id = %s RETURNING {COLUMNS}",
        (*params, task_id, user_id),
    )
    return (jsonify(_task(row)), 200, {"ETag": f'"{row[7]}"'}) if row else _error(404, "Task not found.")


@app.route("/api/<user_id>/tasks/<int:task_id>", methods=["PUT", "PATCH"])
def update_task(user_id: str, task_id: int) -> ResponseReturnValue:
    """Change the fields given of a task."""
    denied = _owner(user_id)
    if denied:
        return denied
    body = request.get_json()
    fields = [name for name in ("title", "description", "completed") if name in body]
    values = [body[name].strip() if isinstance(body[name], str) else body[name] for name in fields]
    return _update(user_id, task_id, ", ".join(f"{name} = %s" for name in fields), values)


@app.patch("/api/<user_id>/tasks/<int:task_id>/complete")
def toggle_task(user_id: str, task_id: int) -> ResponseReturnValue:
    """Set completed as given, or flip it without a body."""
    denied = _owner(user_id)
    if denied:
        return denied
    body = request.get_json(silent=True)
    if body is None:
        return _update(user_id, task_id, "completed = NOT completed", ())
    return _update(user_id, task_id, "completed = %s", (bool(body["completed"]),))


@app.delete("/api/<user_id>/tasks/<int:task_id>")
def delete_task(user_id: str, task_id: int) -> ResponseReturnValue:
    """Delete a task of the user's."""
    denied = _owner(user_id)
    if denied:
        return denied
    row = _one("DELETE FROM tasks WHERE id = %s AND user_id = %s RETURNING id", (task_id, user_id))
    return ("", 204) if row else _error(404, "Task not found.")
