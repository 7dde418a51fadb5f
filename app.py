"""The tasks API: its settings, the app factory, request hooks, the one blueprint and its views, and
the entry points (gunicorn's app:app, `flask --app app`, `python app.py`)."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shlex
import sys
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import click
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, send_file, url_for
from flask.cli import AppGroup, ScriptInfo, with_appcontext
from flask.helpers import get_debug_flag
from flask_cors import CORS
from sqlalchemy import Row, text
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import NotFound

import auth
import db
import logs
import migrations
import models
from auth import require_owner
from errors import (
    ApiError,
    ConfigError,
    SchemaNotReady,
    ValidationError,
    classify_database_error,
    error_response,
    field_error,
    register_error_handlers,
)
from models import task_json
from validation import (
    BODY_LIMIT,
    completed_field,
    idempotency_key,
    if_match,
    if_none_match,
    is_storable_text,
    list_query,
    parse_task_id,
    read_json_object,
    task_fields,
)

log = logging.getLogger("tasks_api")
request_log = logging.getLogger("tasks_api.request")

# Every setting the environment can give, declared once: its default, whose type is how the
# environment's text is read (None: text). Defaults, then the environment, then create_app's mapping.
SETTINGS: dict[str, Any] = {
    # Tokens: the secret Better Auth's frontend signs HS256 tokens with, and/or Better Auth's URL for
    # the JWKS of its jwt plugin (iss and aud default to it).
    "BETTER_AUTH_SECRET": None,
    "BETTER_AUTH_URL": None,
    "JWKS_URL": None,
    "JWT_AUDIENCE": None,
    "JWT_ISSUER": None,
    # An unknown kid refetches the JWKS at most this often; keys are trusted for at most their max age,
    # so a key removed from the JWKS stops verifying tokens; while the JWKS cannot be fetched, keys
    # already held stay trusted the stale-if-error time longer, and no longer.
    "JWKS_REFETCH_SECONDS": 30.0,
    "JWKS_MAX_AGE_SECONDS": 300.0,
    "JWKS_STALE_IF_ERROR_SECONDS": 3600.0,
    "DATABASE_URL": "sqlite:///tasks.db",
    # Neon's direct (not pooled) URL, for the migrations; unset: they use DATABASE_URL.
    "DATABASE_URL_UNPOOLED": None,
    # Migrate the schema to this release's head at startup (under a lock: instances starting together
    # migrate one at a time). Off when a release phase runs `flask --app app db upgrade` instead.
    "MIGRATE_ON_START": True,
    "USERS_TABLE": None,
    "DB_POOL_SIZE": 5,
    "DB_MAX_OVERFLOW": 5,
    "DB_POOL_TIMEOUT": 10,
    "DB_CONNECT_TIMEOUT": 5,
    # The longest any one wait on PostgreSQL may last (statement, result), whatever sits in between.
    "DB_QUERY_TIMEOUT": 8,
    "DB_IDLE_CHECK_SECONDS": 30,
    # A create past this many tasks of one user is refused: the bound on a user's list, in time and memory.
    "MAX_TASKS_PER_USER": 10_000,
    "CORS_ORIGINS": "http://localhost:3000",
    "LOG_LEVEL": "INFO",
    # text: one readable line per record; json: one JSON object per line (logs.py).
    "LOG_FORMAT": "text",
}
# A client's X-Request-ID is echoed and logged only when it is this harmless (no CR/LF, no spaces).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# scheme://host[:port] and nothing else: what a browser sends as Origin (a DNS name, IPv4 or [IPv6]).
ORIGIN_PATTERN = re.compile(
    r"https?://(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*"
    r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?"
)
API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
OPENAPI_PATH = Path(__file__).with_name("openapi.json")
# The /docs page and its script; Swagger UI's own files come from the flask-swagger-ui package.
DOCS_DIR = Path(__file__).with_name("docs")
SWAGGER_UI_FILES = frozenset({"swagger-ui.css", "swagger-ui-bundle.js", "favicon-32x32.png", "favicon-16x16.png"})
# The docs run scripts from this origin only and send requests to it only; Swagger UI styles inline.
DOCS_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
    "font-src 'self' data:; connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
# A list longer than this is encoded and sent in pieces of about LIST_PIECE_CHARS (a whole list at the
# per-user limit, every field at its longest, is 50 MB).
STREAMED_LIST_FROM = 100
LIST_PIECE_CHARS = 256 * 1024
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None)  # the C library the process runs on; its malloc_trim, if glibc
except OSError:
    _LIBC = None


class JSONResponse(Response):
    """Responses are JSON unless a view says otherwise (the /docs page)."""

    default_mimetype = "application/json"


def load_config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults, then the environment, then the caller's mapping (tests, `python app.py`); checked."""
    config = dict(SETTINGS)
    config.update({name: os.environ[name] for name in SETTINGS if os.environ.get(name)})
    config.update(overrides or {})
    for name, default in SETTINGS.items():
        config[name] = _typed(name, config[name], default)
    if not isinstance(logging.getLevelName(str(config["LOG_LEVEL"]).upper()), int):
        raise ConfigError(
            f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not {config['LOG_LEVEL']!r}."
        )
    config["LOG_FORMAT"] = str(config["LOG_FORMAT"]).strip().lower()
    if config["LOG_FORMAT"] not in logs.LOG_FORMATS:
        raise ConfigError(f"LOG_FORMAT must be text or json, not {config['LOG_FORMAT']!r}.")
    config["CORS_ORIGINS"] = ",".join(exact_origins(config["CORS_ORIGINS"]))
    if config["BETTER_AUTH_URL"] and not config["JWKS_URL"]:
        config["JWKS_URL"] = better_auth_urls(config["BETTER_AUTH_URL"])[0]
    allow_dev_secret = config.get("ALLOW_DEV_SECRET", False)
    if config["BETTER_AUTH_SECRET"] == auth.DEV_SECRET and not allow_dev_secret:
        raise ConfigError(
            "BETTER_AUTH_SECRET is the development secret published in this repository, so anyone "
            "can forge tokens with it: set a secret of your own (openssl rand -base64 32)."
        )
    if not config["BETTER_AUTH_SECRET"] and not config["JWKS_URL"]:
        if not allow_dev_secret:
            raise ConfigError(
                "BETTER_AUTH_SECRET is not set (nor BETTER_AUTH_URL): set the secret your "
                "Better Auth frontend signs tokens with, or its URL for JWKS (see README); for local "
                "development, `python app.py` and `flask --app app run --debug` (on 127.0.0.1) use a development secret."
            )
        config["BETTER_AUTH_SECRET"] = auth.DEV_SECRET
        config["USING_DEV_SECRET"] = True
    return config


def _typed(name: str, value: Any, default: Any) -> Any:
    """A setting's value as the type of its default (the environment gives text)."""
    if value is None or default is None or type(value) is type(default):
        return value
    if isinstance(default, bool):
        words = str(value).strip().lower()
        if words not in ("1", "0", "true", "false", "yes", "no", "on", "off"):
            raise ConfigError(f"{name} must be 1 or 0 (true or false), not {value!r}.")
        return words in ("1", "true", "yes", "on")
    kind, words = (float, "a number") if isinstance(default, float) else (int, "a whole number")
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(value)
        return kind(value)
    except ValueError:
        raise ConfigError(f"{name} must be {words}, not {value!r}.") from None


def better_auth_urls(base_url: str) -> tuple[str, str]:
    """Better Auth's JWKS URL and its tokens' iss and aud, from BETTER_AUTH_URL, as Better Auth derives them.

    A base URL without a path gets Better Auth's base path, /api/auth; one with a path (as Better Auth
    also accepts, https://app.example.com/api/auth) is the base path itself. iss and aud are the origin.
    """
    parts = urlsplit(base_url.strip())
    origin = f"{parts.scheme}://{parts.netloc}"
    auth_base = base_url.strip().rstrip("/") if parts.path.strip("/") else origin + "/api/auth"
    return auth_base + "/jwks", origin


def exact_origins(raw: str) -> list[str]:
    """CORS_ORIGINS as a list of exact origins; a wildcard, a path or anything else is a configuration error."""
    origins = [origin.strip() for origin in raw.split(",") if origin.strip()]
    for origin in origins:
        if not ORIGIN_PATTERN.fullmatch(origin):
            raise ConfigError(
                f"CORS_ORIGINS entries must be exact origins such as https://app.example.com or "
                f"http://localhost:3000 (a scheme, a host, an optional port; no path, no trailing "
                f"slash, no wildcard), and {origin!r} is not."
            )
    return origins


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: configuration, database, CORS, error handlers, routes, the token command."""
    app = Flask(__name__)
    app.response_class = JSONResponse
    app.url_map.merge_slashes = False  # its 308 redirect is HTML and bypasses the JSON error handlers
    # One byte over the limit, so that a chunked body that werkzeug cuts short is still seen as too large.
    app.config.from_mapping(MAX_CONTENT_LENGTH=BODY_LIMIT + 1)
    app.config.update(load_config(config))
    logs.configure(app.config["LOG_LEVEL"], app.config["LOG_FORMAT"])
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]
    _warn_about_the_secret(app.config)
    if app.config["JWKS_URL"]:
        app.extensions["jwks"] = _jwks_client(app.config)
    app.extensions["verified_tokens"] = auth.VerifiedTokens()
    db.init_app(app)
    CORS(
        app,
        origins=app.config["CORS_ORIGINS"].split(","),
        methods=API_METHODS,
        allow_headers=["Authorization", "Content-Type", "X-Request-ID", "Idempotency-Key", "If-Match", "If-None-Match"],
        expose_headers=[
            "Location",
            "X-Total-Count",
            "X-Request-ID",
            "Retry-After",
            "WWW-Authenticate",
            "ETag",
            "Idempotent-Replayed",
        ],
        # For frontends whose fetch sends credentials: 'include'. The API reads no cookie (only the
        # Bearer token), and the origins are an exact list, so this lets nothing new in.
        supports_credentials=True,
        # A request without an Origin header did not ask for CORS (a browser's cross-origin fetch
        # always sends one): it gets no CORS headers, and costs flask-cors no work.
        max_age=600,
        always_send=False,
    )
    register_error_handlers(app)
    app.register_blueprint(api)
    app.add_url_rule("/health", view_func=health)
    app.add_url_rule("/health/ready", view_func=health_ready)
    app.add_url_rule("/openapi.json", view_func=openapi_document)
    app.add_url_rule("/docs", view_func=api_docs)
    app.add_url_rule("/docs/<name>", view_func=api_docs_file)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_end_request)
    app.cli.add_command(token_command)
    app.cli.add_command(db_commands)
    return app


def _warn_about_the_secret(config: Mapping[str, Any]) -> None:
    """Say so when tokens are signed with the development secret, or a short one."""
    secret = config["BETTER_AUTH_SECRET"]
    if config.get("USING_DEV_SECRET"):
        log.warning("Using the DEVELOPMENT secret: tokens are forgeable. Set BETTER_AUTH_SECRET for real use.")
    elif secret and len(secret.encode()) < auth.MIN_SECRET_BYTES:
        log.warning("BETTER_AUTH_SECRET is shorter than %d bytes; use a longer random secret.", auth.MIN_SECRET_BYTES)
        # Said once here; PyJWT would otherwise repeat it on every request.
        warnings.filterwarnings("ignore", category=auth.jwt.InsecureKeyLengthWarning)


def _jwks_client(config: Mapping[str, Any]) -> auth.JWKSClient:
    """Better Auth's JWKS, with iss and aud defaulting to its base URL's origin, as its jwt plugin sets them."""
    origin = better_auth_urls(config["BETTER_AUTH_URL"])[1] if config["BETTER_AUTH_URL"] else None
    issuer = auth.one_or_many(config["JWT_ISSUER"]) or origin
    audience = auth.one_or_many(config["JWT_AUDIENCE"]) or origin
    if not (issuer and audience):
        log.warning(
            "JWKS tokens are accepted without an iss or aud check: set BETTER_AUTH_URL, or JWT_ISSUER and JWT_AUDIENCE."
        )
    return auth.JWKSClient(
        config["JWKS_URL"],
        issuer=issuer,
        audience=audience,
        refetch_seconds=config["JWKS_REFETCH_SECONDS"],
        max_age_seconds=config["JWKS_MAX_AGE_SECONDS"],
        stale_if_error_seconds=config["JWKS_STALE_IF_ERROR_SECONDS"],
    )


# --- request ids, logs and headers ------------------------------------------------------------------


def _start_request() -> None:
    """Give the request an id (the client's, when it sent a sane one) and start its clock."""
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id_token = logs.request_id.set(incoming if REQUEST_ID_PATTERN.fullmatch(incoming) else uuid.uuid4().hex)
    g.started = time.perf_counter()


def _finish_request(response: Response) -> Response:
    """Security headers, the request id, and one log line per request (never the token)."""
    headers = response.headers
    if response.status_code in (204, 304):
        del headers["Content-Type"]  # no body, so no type
    headers["X-Request-ID"] = logs.request_id.get()
    headers["X-Content-Type-Options"] = "nosniff"
    path = request.path
    if path.startswith("/api/"):
        headers["Cache-Control"] = "no-store"
    else:
        # CORS headers depend on the request's Origin: a cache must not hand one answer to the other.
        response.vary.add("Origin")
    claims = g.get("claims")
    duration_ms = (time.perf_counter() - g.get("started", time.perf_counter())) * 1000
    # Quoted, so that a %0A in a URL cannot start a forged log line.
    request_log.info(
        "%s %s %s %.1fms user_id=%s",
        request.method,
        quote(path, safe="/@:+,;=~!$&'()*"),
        response.status_code,
        duration_ms,
        quote(claims["sub"], safe="@.:+-_|") if claims else "-",
        extra={
            "method": request.method,
            "path": path,
            "status": response.status_code,
            "duration_ms": round(duration_ms, 1),
            "user_id": claims["sub"] if claims else None,
        },
    )
    return response


def _end_request(_error: BaseException | None) -> None:
    """Records made after the request (in this thread) no longer carry its id."""
    token = g.pop("request_id_token", None)
    if token is not None:
        logs.request_id.reset(token)


# --- health and the API's description ---------------------------------------------------------------


def health() -> Response:
    """Liveness: the process answers; no database, no auth."""
    return jsonify(status="ok")


def health_ready() -> Response:
    """Readiness: the database answers and the schema exists; a configuration mistake says so (500)."""
    database = db.current()
    try:
        database.schema.ensure()
        with database.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SchemaNotReady as error:  # a release whose migrations did not run never gets traffic
        return error_response(503, str(error), headers={"Retry-After": "5"})
    except (sa_exc.DBAPIError, sa_exc.TimeoutError) as error:
        kind, reason = classify_database_error(error)
        if kind != "transient":
            raise  # the error handlers log it and answer 500: waiting will not make the service ready
        log.warning("readiness check failed: the database did not answer (%s)", reason)
        return error_response(503, "The database is unavailable right now.", headers={"Retry-After": "5"})
    return jsonify(status="ok")


def openapi_document() -> Response:
    """The OpenAPI 3.1 document of this API; no auth."""
    return current_app.response_class(OPENAPI_PATH.read_bytes(), mimetype="application/json")


def api_docs() -> Response:
    """Interactive API docs (Swagger UI on /openapi.json, try-it-out included), with no outside assets."""
    return _docs_file(DOCS_DIR / "index.html")


def api_docs_file(name: str) -> Response:
    """A file of the docs page: its script, or one of Swagger UI's files."""
    if name == "docs.js":
        return _docs_file(DOCS_DIR / name)
    if name in SWAGGER_UI_FILES:
        return _docs_file(_swagger_ui_dir() / name)
    raise NotFound()


def _docs_file(path: Path) -> Response:
    """A file of the docs, kept for an hour, under the docs' content security policy.

    Always whole (no 304, 206 or 412: conditional=False): the docs are a page to read, not a cache
    protocol, and werkzeug's mix of Range and preconditions is not RFC 9110's order.
    """
    response = send_file(path, max_age=3600, conditional=False, etag=False)
    response.headers["Content-Security-Policy"] = DOCS_POLICY
    return response


@functools.cache
def _swagger_ui_dir() -> Path:
    """Where the flask-swagger-ui package (pinned in requirements.txt) keeps Swagger UI's files.

    Found, not imported: the package's Flask blueprint is not used, only its copy of swagger-ui-dist.
    """
    spec = importlib.util.find_spec("flask_swagger_ui")
    if spec is None or not spec.submodule_search_locations:
        raise NotFound()
    return Path(next(iter(spec.submodule_search_locations))) / "dist"


# --- the tasks API ----------------------------------------------------------------------------------

api = Blueprint("api", __name__, url_prefix="/api/<user_id>")


@api.get("/tasks")
@require_owner
def list_tasks(user_id: str) -> Response:
    """List the user's tasks, filtered, sorted and optionally paged."""
    query = list_query(request.args)
    filtered, paged = query.status != "all", query.limit is not None
    params = {"owner": user_id, "offset": query.offset, "limit": query.limit, "completed": query.status == "completed"}
    rows = db.run(models.list_tasks(filtered, query.sort, query.descending, paged, bool(query.offset)), params)
    if not paged:
        return _task_array(rows)
    if rows:
        total = rows[0].total
    elif query.offset:  # past the end, where no row carries the total: count apart
        total = db.run(models.count_tasks(filtered), params)[0][0]
    else:
        total = 0
    response = jsonify([task_json(row) for row in rows])
    response.headers["X-Total-Count"] = str(total)
    return response


@api.post("/tasks")
@require_owner
def create_task(user_id: str) -> tuple[Response, int, dict[str, str]]:
    """Create a task for the user; with an Idempotency-Key, a retry answers the task it created."""
    fields = task_fields(read_json_object(request, required=True), partial=False)
    key = idempotency_key(request.headers.get("Idempotency-Key"))
    fingerprint = _fingerprint(fields) if key is not None else None
    task = _insert_task(user_id, fields, key, fingerprint)
    headers = {"Location": url_for("api.get_task", user_id=user_id, task_id=task.id), "ETag": _etag(task)}
    # Compared whenever a key was sent, whatever `inserted` says: a replay must never answer a different task.
    if key is not None and task.idempotency_fingerprint != fingerprint:
        raise ValidationError(
            [
                field_error(
                    "Idempotency-Key",
                    "This Idempotency-Key was already used for a different task: send a new key with a new task.",
                    "idempotency_key_reused",
                )
            ]
        )
    if not task.inserted:
        headers["Idempotent-Replayed"] = "true"
    return jsonify(task_json(task)), 201, headers


@api.get("/tasks/<task_id>")
@require_owner
def get_task(user_id: str, task_id: str) -> Response:
    """Return one of the user's tasks: 412 when If-Match names another version, 304 when If-None-Match names its own."""
    task = _found(db.run(models.GET_TASK, {"task_id": _task_number(task_id), "owner": user_id}))
    match = if_match(request.headers.get("If-Match"))
    if match is not None and not match.holds_for(task.version):
        raise _changed_elsewhere(task)
    none_match = if_none_match(request.headers.get("If-None-Match"))
    if none_match is not None and none_match.holds_for(task.version):
        return current_app.response_class(status=304, headers={"ETag": _etag(task)})
    return _with_etag(jsonify(task_json(task)), task)


@api.route("/tasks/<task_id>", methods=["PUT", "PATCH"])
@require_owner
def update_task(user_id: str, task_id: str) -> Response:
    """Change any non-empty subset of the writable fields (only at the If-Match version, if one is sent)."""
    task_number = _task_number(task_id)
    fields = task_fields(read_json_object(request, required=True), partial=True)
    values = {f"v_{name}": value for name, value in fields.items()}
    task = _change(functools.partial(models.update_task, tuple(sorted(fields))), task_number, user_id, values)
    return _with_etag(jsonify(task_json(task)), task)


@api.patch("/tasks/<task_id>/complete")
@require_owner
def toggle_task(user_id: str, task_id: str) -> Response:
    """Flip completed, or set it to the body's {"completed": bool} so a retry is harmless."""
    task_number = _task_number(task_id)
    completed = completed_field(read_json_object(request, required=False))
    fields = None if completed is None else ("completed",)
    task = _change(functools.partial(models.update_task, fields), task_number, user_id, {"v_completed": completed})
    return _with_etag(jsonify(task_json(task)), task)


@api.delete("/tasks/<task_id>")
@require_owner
def delete_task(user_id: str, task_id: str) -> tuple[str, int]:
    """Delete one of the user's tasks (only at the If-Match version, if one is sent)."""
    _change(models.delete_task, _task_number(task_id), user_id, {})
    return "", 204


def _change(statement: Callable[[bool, bool], Any], task_id: int, user_id: str, values: Mapping[str, Any]) -> Row[Any]:
    """Run a change of one task, on the conditions of the request's If-Match and If-None-Match: one statement.

    Only when it changed nothing does a second statement tell a 412 (the task is there, at a version
    the conditions exclude; its ETag goes with the answer) from a 404. The task is looked for among the
    user's own only, so a condition never reveals that another user's task exists.
    """
    match = if_match(request.headers.get("If-Match"))
    none_match = if_none_match(request.headers.get("If-None-Match"))
    by_version = match is not None and not match.any_version
    excluding = none_match is not None and not none_match.any_version
    params = {
        "task_id": task_id,
        "owner": user_id,
        "versions": sorted(match.versions) if match is not None else [],
        "excluded": sorted(none_match.versions) if none_match is not None else [],
        **values,
    }
    if none_match is None or not none_match.any_version:  # If-None-Match: * fails for any task that exists
        rows = db.run(statement(by_version, excluding), params)
        if rows:
            return rows[0]
    if by_version or none_match is not None:
        current = db.run(models.GET_TASK, params)
        if current:
            raise _changed_elsewhere(current[0])
    raise _task_not_found()


def _changed_elsewhere(task: Row[Any]) -> ApiError:
    """The 412 of a request whose If-Match or If-None-Match the task's version fails, with its ETag."""
    return ApiError(412, "This task was changed elsewhere; reload it and try again.", headers={"ETag": _etag(task)})


def _etag(task: Row[Any]) -> str:
    """The task's strong ETag: its version, which every change increments."""
    return f'"{task.version}"'


def _with_etag(response: Response, task: Row[Any]) -> Response:
    """A response that carries one task, with its ETag."""
    response.headers["ETag"] = _etag(task)
    return response


def _fingerprint(fields: Mapping[str, Any]) -> str:
    """What identifies a create's body: the SHA-256 of its validated fields (a replay must match it)."""
    canonical = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _task_number(raw: str) -> int:
    """The task id from the URL, or a 404 when it cannot name a task."""
    task_id = parse_task_id(raw)
    if task_id is None:
        raise _task_not_found()
    return task_id


def _found(rows: Sequence[Row[Any]]) -> Row[Any]:
    """The one row a statement on one task returned, or a 404."""
    if not rows:
        raise _task_not_found()
    return rows[0]


def _task_not_found() -> ApiError:
    """The same answer whether the task never existed or belongs to someone else."""
    return ApiError(404, "Task not found.")


def _insert_task(user_id: str, fields: Mapping[str, Any], key: str | None, fingerprint: str | None) -> Row[Any]:
    """Insert the task (or find the one its key created); register the user first when this service owns
    the users table."""
    max_tasks = current_app.config["MAX_TASKS_PER_USER"]
    params = {
        "owner": user_id,
        "max_tasks": max_tasks,
        "idempotency_key": key,
        "idempotency_fingerprint": fingerprint,
        **{f"v_{name}": value for name, value in fields.items()},
    }
    users = db.users()
    for attempt in (1, 2):
        if users.owned:
            db.register(user_id, _claim_text(g.claims.get("email")), _claim_text(g.claims.get("name")))
        try:
            rows = db.run(db.current().insert_task, params)
        except sa_exc.IntegrityError as error:
            if not db.is_foreign_key_violation(error):
                raise
            if not users.owned:
                raise ApiError(
                    401,
                    "Your account no longer exists; sign in again.",
                    headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
                ) from None
            # Our own user row was deleted behind our back: register again, once.
            db.forget(user_id)
            if attempt == 2:
                raise
            continue
        if not rows:
            raise ApiError(409, f"You have reached the limit of {max_tasks:,} tasks; delete some to add more.")
        return rows[0]
    raise AssertionError("unreachable")


def _claim_text(value: Any) -> str | None:
    """A profile claim worth storing: text the database can hold, else nothing."""
    return value if isinstance(value, str) and is_storable_text(value) else None


def _task_array(rows: Sequence[Row[Any]]) -> Response:
    """The tasks as one JSON array; a long one is encoded and sent in pieces, never held as one string."""
    if len(rows) <= STREAMED_LIST_FROM:
        return jsonify([task_json(row) for row in rows])
    pending = list(rows)
    pending.reverse()  # popped from the end, so that each row is freed as soon as it is encoded
    # The same bytes jsonify would send (compact, and a newline at the end), only in pieces.
    dumps = functools.partial(current_app.json.dumps, separators=(",", ":"))
    return current_app.response_class(_json_array_pieces(pending, dumps))


def _json_array_pieces(pending: list[Row[Any]], dumps: Callable[[Any], str]) -> Iterator[bytes]:
    """Yield the JSON array of the tasks in pieces of about LIST_PIECE_CHARS; then return freed memory."""
    try:
        pieces, size = ["["], 0
        while pending:
            task = dumps(task_json(pending.pop()))
            pieces += (task, ",")
            size += len(task)
            if size >= LIST_PIECE_CHARS and pending:
                yield "".join(pieces).encode()
                pieces, size = [], 0
        pieces[-1:] = ["]\n"] if pieces[-1] == "," else [pieces[-1], "]\n"]
        yield "".join(pieces).encode()
    finally:
        _return_freed_memory()


def _return_freed_memory() -> None:
    """Hand the heap pages a long list freed back to the system, so the worker returns to its usual size.

    glibc keeps freed memory in its heaps for reuse; after a list of thousands of long tasks that is
    hundreds of MB per worker. malloc_trim releases it (a few ms); elsewhere there is nothing to do.
    """
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


# --- entry points -----------------------------------------------------------------------------------

NO_SECRET_FOR_TOKENS = (
    "Tokens are signed with BETTER_AUTH_SECRET (HS256); with Better Auth's JWKS only, get them from Better Auth."
)


@click.command("token")
@click.argument("user_id")
@click.option("--email", default=None, help="email claim to include")
@click.option("--name", default=None, help="name claim to include")
@click.option("--hours", default=24, show_default=True, help="lifetime of the token")
@with_appcontext
def token_command(user_id: str, email: str | None, name: str | None, hours: int) -> None:
    """Print a token for USER_ID signed with the configured secret."""
    secret = current_app.config["BETTER_AUTH_SECRET"]
    if not secret:
        raise click.ClickException(NO_SECRET_FOR_TOKENS)
    click.echo(auth.issue_token(secret, user_id, email=email, name=name, lifetime_seconds=hours * 3600))


db_commands = AppGroup("db", help="The database schema and its migrations (Alembic, in migrations/).")


@db_commands.command("upgrade")
@click.argument("revision", default="heads")
@with_appcontext
def db_upgrade(revision: str) -> None:
    """Migrate the database to REVISION (this release's head): the release step of a deploy."""
    db.upgrade_schema(current_app.config, to=revision)
    click.echo(f"The database schema is at {_current_revision()}.")


@db_commands.command("downgrade")
@click.argument("revision")
@with_appcontext
def db_downgrade(revision: str) -> None:
    """Migrate the database down to REVISION ("base": none of this service's tables left)."""
    engine = db.migration_engine(current_app.config)
    try:
        migrations.downgrade(engine, current_app.config["USERS_TABLE"], revision)
    finally:
        engine.dispose()
    click.echo(f"The database schema is at {_current_revision()}.")


@db_commands.command("current")
@with_appcontext
def db_current() -> None:
    """Print the database's revision and this release's."""
    click.echo(f"database: {_current_revision()}; this release: {migrations.head()}")


@db_commands.command("check")
@with_appcontext
def db_check() -> None:
    """Fail when the models have changes that no migration makes (after upgrading to the head)."""
    found = migrations.differences(db.current().engine, current_app.config["USERS_TABLE"])
    if found:
        raise click.ClickException(f"the models differ from the migrations: {found}")
    click.echo("The models and the migrations agree.")


@db_commands.command("revision")
@click.option("-m", "--message", required=True, help="what the revision does, in a sentence")
@with_appcontext
def db_revision(message: str) -> None:
    """Write a new revision in migrations/versions, with what autogenerate finds missing in the database."""
    engine = db.migration_engine(current_app.config)
    try:
        migrations.revision(engine, current_app.config["USERS_TABLE"], message)
    finally:
        engine.dispose()


def _current_revision() -> str | None:
    """The revision the app's database is at."""
    with db.current().engine.connect() as connection:
        return migrations.current_revision(connection)


def __getattr__(name: str) -> Flask:
    """`app:app` for gunicorn and `flask --app app`, built on first access.

    Lazily, so that importing create_app (tests, `python app.py`) never needs production settings.
    """
    if name != "app":
        raise AttributeError(name)
    try:
        application = create_app({"ALLOW_DEV_SECRET": True} if _flask_run_in_debug() else None)
    except ConfigError as error:  # a configuration mistake: one sentence, not a traceback
        raise SystemExit(str(error)) from None
    globals()["app"] = application
    return application


def _flask_run_in_debug() -> bool:
    """Whether `flask --app app run --debug` is loading the app: Flask's development server, the one
    place besides `python app.py` where the development secret may be used (never gunicorn's)."""
    context = click.get_current_context(silent=True)
    if context is None or context.info_name != "run" or not get_debug_flag():
        return False
    # On this machine only: with --host 0.0.0.0, anyone on the network could sign tokens with the
    # secret this repository publishes.
    return str(context.params.get("host") or "127.0.0.1") in ("127.0.0.1", "localhost", "::1")


def main(argv: list[str]) -> None:
    """`python app.py` and its token command; a configuration mistake is one sentence and exit status 1."""
    try:
        _serve_or_print_token(argv)
    except ConfigError as error:
        sys.exit(str(error))


def _serve_or_print_token(argv: list[str]) -> None:
    """`python app.py`: the local server on 127.0.0.1:8000; `python app.py token USER`: a token."""
    if argv[:1] in (["-h"], ["--help"]):
        print(
            "usage: python app.py            serve on http://127.0.0.1:$PORT (8000) for development\n"
            "       python app.py token USER print a token for USER signed with BETTER_AUTH_SECRET\n"
            "                                (the development secret when it is not set)"
        )
        return
    if argv[:1] == ["token"]:
        # Quiet, so that the token alone goes to stdout: T=$(python app.py token alice).
        application = create_app({"ALLOW_DEV_SECRET": True, "LOG_LEVEL": "ERROR"})
        application.cli.main(argv, prog_name="python app.py", obj=ScriptInfo(create_app=lambda: application))
        return
    application = create_app({"ALLOW_DEV_SECRET": True})
    secret = application.config["BETTER_AUTH_SECRET"]
    port = int(os.environ.get("PORT", "8000"))
    database = db.display_url(db.normalise_database_url(application.config["DATABASE_URL"]))
    print(f"\nTasks API on http://127.0.0.1:{port} (database: {database})")
    if not secret:
        print("Tokens are verified with Better Auth's JWKS at", application.config["JWKS_URL"], flush=True)
        application.run(host="127.0.0.1", port=port)
        return
    token = auth.issue_token(secret, "demo-user", name="Demo User", lifetime_seconds=24 * 3600)
    base = f"http://127.0.0.1:{port}/api/demo-user/tasks"
    header = shlex.quote(f"Authorization: Bearer {token}")
    label = "DEVELOPMENT secret" if application.config.get("USING_DEV_SECRET") else "BETTER_AUTH_SECRET"
    print(f"A token for user 'demo-user', signed with the {label}, valid 24 h. Try:\n")
    print(
        f"  curl -s -H {header} -H 'Content-Type: application/json' \\\n"
        f'       -d \'{{"title": "Buy milk"}}\' {base}\n'
    )
    print(f"  curl -s -H {header} {base}\n", flush=True)
    application.run(host="127.0.0.1", port=port)


if __name__ == "__main__":
    main(sys.argv[1:])
