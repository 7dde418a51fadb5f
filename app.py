"""The tasks API: an app factory, its one blueprint, and the local development entry point."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import shlex
import sys
import time
import uuid
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence
from urllib.parse import quote

import click
from flask import Blueprint, Flask, Response, current_app, g, jsonify, request, url_for
from flask_cors import CORS
from sqlalchemy import (Engine, Executable, Insert, Row, Select, Update, bindparam, delete, exc as sa_exc, func, insert,
                        select, text, update)
from sqlalchemy.sql.elements import ColumnElement

import auth
from auth import require_owner
from errors import ApiError, ConfigError, classify_database_error, error_response, register_error_handlers
from models import (TASK_COLUMNS, TASKS, Session, SchemaState, UsersTable, display_url, make_engine,
                    normalise_database_url, now_expression, task_json)
from validation import (BODY_LIMIT, completed_field, is_storable_text, list_query, parse_task_id,
                        read_json_object, task_fields)

log = logging.getLogger("tasks_api")
request_log = logging.getLogger("tasks_api.request")
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s: %(message)s"
# A client's X-Request-ID is echoed and logged only when it is this harmless (no CR/LF, no spaces).
REQUEST_ID_PATTERN = re.compile(r"[A-Za-z0-9._:-]{1,128}")
OPENAPI_PATH = Path(__file__).with_name("openapi.json")

DEFAULTS: dict[str, Any] = {
    "BETTER_AUTH_SECRET": None,
    "BETTER_AUTH_URL": None,
    "JWKS_URL": None,
    # An unknown kid refetches the JWKS at most this often (seconds); keys are trusted for at most
    # JWKS_MAX_AGE_SECONDS, so a key removed from the JWKS stops verifying tokens.
    "JWKS_REFETCH_SECONDS": 30,
    "JWKS_MAX_AGE_SECONDS": 300,
    # While the JWKS cannot be fetched, keys already held stay trusted this much longer, and no longer.
    "JWKS_STALE_IF_ERROR_SECONDS": 3600,
    "DATABASE_URL": "sqlite:///tasks.db",
    "CORS_ORIGINS": "http://localhost:3000",
    "USERS_TABLE": None,
    "JWT_AUDIENCE": None,
    "JWT_ISSUER": None,
    "DB_POOL_SIZE": 5,
    "DB_MAX_OVERFLOW": 5,
    "DB_POOL_TIMEOUT": 10,
    "DB_CONNECT_TIMEOUT": 5,
    # The longest any one wait on PostgreSQL may last (connect, statement), whatever sits in between.
    "DB_QUERY_TIMEOUT": 8,
    "DB_IDLE_CHECK_SECONDS": 30,
    "LOG_LEVEL": "INFO",
    # A create past this many tasks of one user is refused: the bound on a user's list, in time and memory.
    "MAX_TASKS_PER_USER": 10_000,
    # Only `python app.py` sets this: it lets a missing secret fall back to auth.DEV_SECRET.
    "ALLOW_DEV_SECRET": False,
    # One byte over the limit, so that a chunked body that werkzeug cuts short is still seen as too large.
    "MAX_CONTENT_LENGTH": BODY_LIMIT + 1,
}
INT_SETTINGS = ("DB_POOL_SIZE", "DB_MAX_OVERFLOW", "DB_POOL_TIMEOUT", "DB_CONNECT_TIMEOUT", "DB_IDLE_CHECK_SECONDS",
                "DB_QUERY_TIMEOUT", "MAX_TASKS_PER_USER", "JWKS_STALE_IF_ERROR_SECONDS")
ENV_SETTINGS = ("BETTER_AUTH_SECRET", "BETTER_AUTH_URL", "JWKS_URL", "DATABASE_URL", "CORS_ORIGINS",
                "USERS_TABLE", "JWT_AUDIENCE", "JWT_ISSUER", "LOG_LEVEL", *INT_SETTINGS)
API_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# A list longer than this is encoded and sent in pieces of about LIST_PIECE_CHARS (a whole list at the
# per-user limit, every field at its longest, is 50 MB).
STREAMED_LIST_FROM = 100
LIST_PIECE_CHARS = 256 * 1024
# scheme://host[:port] and nothing else: what a browser sends as Origin (a DNS name, IPv4 or [IPv6]).
ORIGIN_PATTERN = re.compile(r"https?://(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*"
                            r"[A-Za-z0-9])?)*|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?")
KNOWN_USERS_MAX = 100_000
try:
    _LIBC: ctypes.CDLL | None = ctypes.CDLL(None)  # the C library the process runs on; its malloc_trim, if glibc
except OSError:
    _LIBC = None


class JSONResponse(Response):
    """Responses are JSON unless a view says otherwise (the /docs page)."""

    default_mimetype = "application/json"


@dataclass
class AppState:
    """What one app instance owns: its engine, its schema and the users it has registered."""

    engine: Engine
    schema: SchemaState
    known_users: set[str] = field(default_factory=set)


def load_config(overrides: Mapping[str, Any] | None) -> dict[str, Any]:
    """Defaults, then the environment, then the caller's mapping (tests)."""
    config = dict(DEFAULTS)
    for name in ENV_SETTINGS:
        value = os.environ.get(name)
        if value not in (None, ""):
            config[name] = value
    config.update(overrides or {})
    for name in INT_SETTINGS:
        try:
            config[name] = int(config[name])
        except (TypeError, ValueError):
            raise ConfigError(f"{name} must be a whole number, not {config[name]!r}.") from None
    if not isinstance(logging.getLevelName(str(config["LOG_LEVEL"]).upper()), int):
        raise ConfigError(f"LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL, not {config['LOG_LEVEL']!r}.")
    config["CORS_ORIGINS"] = ",".join(exact_origins(config["CORS_ORIGINS"]))
    if config["BETTER_AUTH_URL"] and not config["JWKS_URL"]:
        config["JWKS_URL"] = config["BETTER_AUTH_URL"].rstrip("/") + "/api/auth/jwks"
    if config["BETTER_AUTH_SECRET"] == auth.DEV_SECRET and not config["ALLOW_DEV_SECRET"]:
        raise ConfigError("BETTER_AUTH_SECRET is the development secret published in this repository, so anyone "
                          "can forge tokens with it: set a secret of your own (openssl rand -base64 32).")
    if not config["BETTER_AUTH_SECRET"] and not config["JWKS_URL"]:
        if not config["ALLOW_DEV_SECRET"]:
            raise ConfigError("BETTER_AUTH_SECRET is not set (nor BETTER_AUTH_URL): set the secret your "
                              "Better Auth frontend signs tokens with, or its URL for JWKS (see README).")
        config["BETTER_AUTH_SECRET"] = auth.DEV_SECRET
        config["USING_DEV_SECRET"] = True
    return config


def exact_origins(raw: str) -> list[str]:
    """CORS_ORIGINS as a list of exact origins; a wildcard, a path or anything else is a configuration error."""
    origins = [origin.strip() for origin in raw.split(",") if origin.strip()]
    for origin in origins:
        if not ORIGIN_PATTERN.fullmatch(origin):
            raise ConfigError(f"CORS_ORIGINS entries must be exact origins such as https://app.example.com or "
                              f"http://localhost:3000 (a scheme, a host, an optional port; no path, no trailing "
                              f"slash, no wildcard), and {origin!r} is not.")
    return origins


def create_app(config: Mapping[str, Any] | None = None) -> Flask:
    """Build the app: configuration, database, CORS, error handlers, routes."""
    app = Flask(__name__)
    app.response_class = JSONResponse
    app.url_map.merge_slashes = False  # its 308 redirect is HTML and bypasses the JSON error handlers
    app.config.update(load_config(config))
    _configure_logging(app.config["LOG_LEVEL"])
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.json.ensure_ascii = False  # type: ignore[attr-defined]

    secret = app.config["BETTER_AUTH_SECRET"]
    if app.config.get("USING_DEV_SECRET"):
        log.warning("Using the DEVELOPMENT secret: tokens are forgeable. Set BETTER_AUTH_SECRET for real use.")
    elif secret and len(secret.encode()) < auth.MIN_SECRET_BYTES:
        log.warning("BETTER_AUTH_SECRET is shorter than %d bytes; use a longer random secret.",
                    auth.MIN_SECRET_BYTES)
        # Said once here; PyJWT would otherwise repeat it on every request.
        warnings.filterwarnings("ignore", category=auth.jwt.InsecureKeyLengthWarning)

    if app.config["JWKS_URL"]:
        app.extensions["jwks"] = _jwks_client(app.config)
    app.extensions["verified_tokens"] = auth.VerifiedTokens()

    engine = make_engine(
        normalise_database_url(app.config["DATABASE_URL"]),
        pool_size=app.config["DB_POOL_SIZE"],
        max_overflow=app.config["DB_MAX_OVERFLOW"],
        pool_timeout=app.config["DB_POOL_TIMEOUT"],
        connect_timeout=app.config["DB_CONNECT_TIMEOUT"],
        idle_check_seconds=app.config["DB_IDLE_CHECK_SECONDS"],
        query_timeout=app.config["DB_QUERY_TIMEOUT"],
    )
    Session.configure(bind=engine)
    state = AppState(engine=engine, schema=SchemaState(engine, app.config["USERS_TABLE"]))
    app.extensions["tasks_api"] = state
    try:
        state.schema.ensure()
    except (sa_exc.DBAPIError, sa_exc.TimeoutError) as error:
        kind, reason = classify_database_error(error)
        if kind != "transient":  # no retry will fix it: refuse to start, in one sentence
            raise ConfigError(reason if kind == "configuration" else
                              f"The database refused to set up the schema: {reason}") from None
        # Neon may still be waking up: serve anyway (503s) and create the schema on first use.
        log.warning("database unreachable at startup (%s); the schema will be created on first use", reason)

    CORS(app, origins=app.config["CORS_ORIGINS"].split(","), methods=API_METHODS,
         allow_headers=["Authorization", "Content-Type", "X-Request-ID"],
         expose_headers=["Location", "X-Total-Count", "X-Request-ID", "Retry-After", "WWW-Authenticate"],
         # For frontends whose fetch sends credentials: 'include'. The API reads no cookie (only the
         # Bearer token), and the origins are an exact list, so this lets nothing new in.
         supports_credentials=True,
         # A request without an Origin header did not ask for CORS (a browser's cross-origin fetch
         # always sends one): it gets no CORS headers, and costs flask-cors no work.
         max_age=600, always_send=False)
    register_error_handlers(app)
    app.register_blueprint(api)
    app.add_url_rule("/health", view_func=health)
    app.add_url_rule("/health/ready", view_func=health_ready)
    app.add_url_rule("/openapi.json", view_func=openapi_document)
    app.add_url_rule("/docs", view_func=api_docs)
    app.before_request(_start_request)
    app.after_request(_finish_request)
    app.teardown_request(_end_request)

    @app.teardown_appcontext
    def remove_session(_error: BaseException | None) -> None:
        """Return the request's connection to the pool."""
        Session.remove()

    @app.cli.command("token")
    @click.argument("user_id")
    @click.option("--email", default=None, help="email claim to include")
    @click.option("--name", default=None, help="name claim to include")
    @click.option("--hours", default=24, show_default=True, help="lifetime of the token")
    def token_command(user_id: str, email: str | None, name: str | None, hours: int) -> None:
        """Print a token for USER_ID signed with the configured secret."""
        secret = current_app.config["BETTER_AUTH_SECRET"]
        if not secret:
            raise click.ClickException(NO_SECRET_FOR_TOKENS)
        click.echo(auth.issue_token(secret, user_id, email=email, name=name, lifetime_seconds=hours * 3600))

    return app


def _jwks_client(config: Mapping[str, Any]) -> auth.JWKSClient:
    """Better Auth's JWKS, with iss and aud defaulting to its base URL as its jwt plugin sets them."""
    base_url = (config["BETTER_AUTH_URL"] or "").rstrip("/") or None
    issuer = config["JWT_ISSUER"] or base_url
    audience = config["JWT_AUDIENCE"] or base_url
    if not (issuer and audience):
        log.warning("JWKS tokens are accepted without an iss or aud check: set BETTER_AUTH_URL, or "
                    "JWT_ISSUER and JWT_AUDIENCE.")
    return auth.JWKSClient(config["JWKS_URL"], issuer=issuer, audience=audience,
                           refetch_seconds=float(config["JWKS_REFETCH_SECONDS"]),
                           max_age_seconds=float(config["JWKS_MAX_AGE_SECONDS"]),
                           stale_if_error_seconds=float(config["JWKS_STALE_IF_ERROR_SECONDS"]))


def _configure_logging(level: str) -> None:
    """Log to stdout, every record carrying the request id of the request it was made in."""
    global _record_factory_installed
    if not _record_factory_installed:
        base_factory = logging.getLogRecordFactory()

        def record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = base_factory(*args, **kwargs)
            record.request_id = _request_id.get()
            return record

        logging.setLogRecordFactory(record_with_request_id)
        _record_factory_installed = True
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)


_record_factory_installed = False
# The id of the request this thread is serving: a context variable, so that stamping it on every
# log record costs no request-context lookup.
_request_id: ContextVar[str] = ContextVar("request_id", default="-")


def _start_request() -> None:
    """Give the request an id (the client's, when it sent a sane one) and start its clock."""
    incoming = request.headers.get("X-Request-ID", "")
    g.request_id_token = _request_id.set(incoming if REQUEST_ID_PATTERN.fullmatch(incoming) else uuid.uuid4().hex)
    g.started = time.perf_counter()
    Session(bind=_state().engine)  # this app's engine, not whichever create_app() ran last


def _finish_request(response: Response) -> Response:
    """Security headers, the request id, and one log line per request (never the token)."""
    headers = response.headers
    if response.status_code == 204:
        del headers["Content-Type"]  # no body, so no type
    headers["X-Request-ID"] = _request_id.get()
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
    request_log.info("%s %s %s %.1fms user_id=%s", request.method, quote(path, safe="/@:+,;=~!$&'()*"),
                     response.status_code, duration_ms, quote(claims["sub"], safe="@.:+-_|") if claims else "-")
    return response


def _end_request(_error: BaseException | None) -> None:
    """Records made after the request (in this thread) no longer carry its id."""
    token = g.pop("request_id_token", None)
    if token is not None:
        _request_id.reset(token)


def _state() -> AppState:
    return current_app.extensions["tasks_api"]


def _users_table() -> UsersTable:
    """The users table, creating the schema first if the database was down at startup."""
    return _state().schema.ensure()


# --- health ------------------------------------------------------------------------------------

def health() -> Response:
    """Liveness: the process answers; no database, no auth."""
    return jsonify(status="ok")


def health_ready() -> Response:
    """Readiness: the database answers and the schema exists; a configuration mistake says so (500)."""
    state = _state()
    try:
        state.schema.ensure()
        with state.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except (sa_exc.DBAPIError, sa_exc.TimeoutError) as error:
        kind, reason = classify_database_error(error)
        if kind != "transient":
            raise  # the error handlers log it and answer 500: waiting will not make the service ready
        log.warning("readiness check failed: the database did not answer (%s)", reason)
        return error_response(503, "The database is unavailable right now.", headers={"Retry-After": "5"})
    return jsonify(status="ok")


# --- the API's description ----------------------------------------------------------------------

def openapi_document() -> Response:
    """The OpenAPI 3.1 document of this API; no auth."""
    return current_app.response_class(OPENAPI_PATH.read_bytes(), mimetype="application/json")


DOCS_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tasks API</title>
<style>body{font:15px/1.5 system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem}
code{background:#f3f3f3;padding:0 .25rem}.op{margin:.75rem 0;padding:.5rem .75rem;border-left:4px solid #888}
.m{font-weight:bold;display:inline-block;min-width:4.5rem}</style></head>
<body><h1>Tasks API</h1><p>The machine-readable document: <a href="/openapi.json">/openapi.json</a>.</p>
<div id="ops">Loading&hellip;</div>
<script>
fetch("/openapi.json").then(r => r.json()).then(spec => {
  const ops = document.getElementById("ops"); ops.textContent = "";
  for (const [path, item] of Object.entries(spec.paths)) {
    for (const [method, op] of Object.entries(item)) {
      if (!op.responses) continue;
      const div = document.createElement("div"); div.className = "op";
      const head = document.createElement("div");
      const m = document.createElement("span"); m.className = "m"; m.textContent = method.toUpperCase();
      const p = document.createElement("code"); p.textContent = path;
      head.append(m, p); div.append(head);
      const summary = document.createElement("div"); summary.textContent = op.summary || "";
      const codes = document.createElement("div");
      codes.textContent = "Responses: " + Object.keys(op.responses).join(", ");
      div.append(summary, codes); ops.append(div);
    }
  }
});
</script></body></html>
"""


def api_docs() -> Response:
    """A page listing the API's operations, rendered from /openapi.json with no outside assets."""
    return current_app.response_class(DOCS_PAGE, mimetype="text/html")


# --- the tasks API -----------------------------------------------------------------------------

api = Blueprint("api", __name__, url_prefix="/api/<user_id>")


# Each statement shape is built once, with bound parameters: a request neither rebuilds the
# expression nor loads ORM objects it has no use for, and stays one statement, one round trip.
# The WHERE clause for one task of one user: the second lock behind require_owner.
_OWNED = (TASKS.c.id == bindparam("task_id")) & (TASKS.c.user_id == bindparam("owner"))
_GET_TASK = select(*TASK_COLUMNS).where(_OWNED)
_DELETE_TASK = delete(TASKS).where(_OWNED).returning(TASKS.c.id)
_SORT_COLUMNS = {"created": TASKS.c.created_at, "updated": TASKS.c.updated_at, "title": TASKS.c.title}


def _task_id_or_404(raw: str) -> int:
    task_id = parse_task_id(raw)
    if task_id is None:
        raise _task_not_found()
    return task_id


def _task_not_found() -> ApiError:
    # The same answer whether the task never existed or belongs to someone else.
    return ApiError(404, "Task not found.")


def _dialect() -> str:
    return _state().engine.dialect.name


def _rows(statement: Executable, params: dict[str, Any]) -> Sequence[Row[Any]]:
    """Run one statement in the request's session and return all its rows."""
    return Session.connection().execute(statement, params).all()


def _now(dialect: str, *, for_update: bool) -> Any:
    """'now' inside a statement: the database's clock on PostgreSQL, a bound value (ours) on SQLite."""
    if dialect == "postgresql":
        return now_expression(dialect, for_update=for_update)
    return bindparam("now", type_=TASKS.c.created_at.type)


def _now_params(dialect: str) -> dict[str, Any]:
    return {} if dialect == "postgresql" else {"now": now_expression(dialect, for_update=False)}


def _listed(filtered: bool) -> ColumnElement[bool]:
    """Which tasks a list shows: the user's, and only those of one status when filtered."""
    condition = TASKS.c.user_id == bindparam("owner")
    return condition & (TASKS.c.completed == bindparam("completed")) if filtered else condition


@functools.cache
def _count_statement(filtered: bool) -> Select[Any]:
    return select(func.count()).select_from(TASKS).where(_listed(filtered))


@functools.cache
def _list_statement(filtered: bool, sort: str, descending: bool, paged: bool, offset: bool) -> Select[Any]:
    """SELECT of one user's tasks in one order; paged, each row carries the total.

    The total is a scalar subquery, counted once over the index: a window count(*) OVER () would read
    every one of the user's rows to return twenty of them.
    """
    condition = _listed(filtered)
    total = _count_statement(filtered).scalar_subquery().label("total")
    columns = (*TASK_COLUMNS, total) if paged else TASK_COLUMNS
    column = _SORT_COLUMNS[sort]
    order = (column.desc(), TASKS.c.id.desc()) if descending else (column.asc(), TASKS.c.id.asc())
    statement = select(*columns).where(condition).order_by(*order)
    if paged:
        statement = statement.limit(bindparam("limit"))
    return statement.offset(bindparam("offset")) if offset else statement


@functools.cache
def _insert_statement(dialect: str) -> Insert:
    """INSERT ... RETURNING of a new task, unless the user already has max_tasks: then no row comes back.

    The count is a subquery of the same statement (one round trip); creates running at the same time
    may each see room for one more, so a user can overshoot by at most that many.
    """
    now = _now(dialect, for_update=False)
    tasks_of_owner = select(func.count()).select_from(TASKS).where(TASKS.c.user_id == bindparam("owner"))
    new_row = select(bindparam("owner", type_=TASKS.c.user_id.type), bindparam("v_title", type_=TASKS.c.title.type),
                     bindparam("v_description", type_=TASKS.c.description.type),
                     bindparam("v_completed", type_=TASKS.c.completed.type), now, now)
    return (insert(TASKS)
            .from_select(["user_id", "title", "description", "completed", "created_at", "updated_at"],
                         new_row.where(tasks_of_owner.scalar_subquery() < bindparam("max_tasks")))
            .returning(*TASK_COLUMNS))


@functools.cache
def _update_statement(fields: tuple[str, ...] | None, dialect: str) -> Update:
    """UPDATE ... RETURNING of the user's task: the given fields, or a flip of completed (None)."""
    values: dict[str, Any] = ({"completed": ~TASKS.c.completed} if fields is None
                              else {name: bindparam(f"v_{name}") for name in fields})
    return (update(TASKS).where(_OWNED).values(**values, updated_at=_now(dialect, for_update=True))
            .returning(*TASK_COLUMNS))


@api.get("/tasks")
@require_owner
def list_tasks(user_id: str) -> Response:
    """List the user's tasks, filtered, sorted and optionally paged."""
    query = list_query(request.args)
    _users_table()
    filtered, paged = query.status != "all", query.limit is not None
    statement = _list_statement(filtered, query.sort, query.descending, paged, bool(query.offset))
    params: dict[str, Any] = {"owner": user_id, "offset": query.offset, "limit": query.limit,
                              "completed": query.status == "completed"}
    rows = _rows(statement, params)
    if not paged:
        Session.commit()
        return _task_array(rows)
    if rows:
        total = rows[0].total
    elif query.offset:  # past the end, where no row carries the total: count apart
        total = _rows(_count_statement(filtered), params)[0][0]
    else:
        total = 0
    Session.commit()
    response = jsonify([task_json(row) for row in rows])
    response.headers["X-Total-Count"] = str(total)
    return response


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


@api.post("/tasks")
@require_owner
def create_task(user_id: str) -> tuple[Response, int, dict[str, str]]:
    """Create a task for the user."""
    fields = task_fields(read_json_object(request, required=True), partial=False)
    users = _users_table()
    task = _insert_task(user_id, fields, users)
    Session.commit()
    location = url_for("api.get_task", user_id=user_id, task_id=task[0])
    return jsonify(task_json(task)), 201, {"Location": location}


def _insert_task(user_id: str, fields: dict[str, Any], users: UsersTable) -> Row[Any]:
    """Insert the task; register the user first when this service owns the users table."""
    state = _state()
    dialect = _dialect()
    max_tasks = current_app.config["MAX_TASKS_PER_USER"]
    params = {"owner": user_id, "v_title": fields["title"], "v_description": fields.get("description"),
              "v_completed": fields.get("completed", False), "max_tasks": max_tasks, **_now_params(dialect)}
    for attempt in (1, 2):
        if users.owned and user_id not in state.known_users:
            _register_user(users, user_id)
        try:
            rows = _rows(_insert_statement(dialect), params)
            if not rows:
                raise ApiError(409, f"You have reached the limit of {max_tasks:,} tasks; delete some to add more.")
            return rows[0]
        except sa_exc.IntegrityError as error:
            Session.rollback()
            if not _is_foreign_key_violation(error):
                raise
            if not users.owned:
                raise ApiError(401, "Your account no longer exists; sign in again.",
                               headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}) from None
            # Our own user row was deleted behind our back: register again, once.
            state.known_users.discard(user_id)
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def _register_user(users: UsersTable, user_id: str) -> None:
    """Add the user to our own users table (no-op when present), from the token's claims."""
    claims = g.claims
    values = {
        "id": user_id,
        "email": _claim_text(claims.get("email")),
        "name": _claim_text(claims.get("name")),
        "created_at": now_expression(_dialect(), for_update=False),
    }
    # Imported here, for the dialect in use only: each dialect's package is memory in every worker.
    if _dialect() == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as dialect_insert
    else:
        from sqlalchemy.dialects.sqlite import insert as dialect_insert
    Session.execute(dialect_insert(users.table).values(**values).on_conflict_do_nothing(index_elements=["id"]))
    known = _state().known_users
    if len(known) >= KNOWN_USERS_MAX:
        known.clear()  # a bound on memory; forgetting only costs one idempotent insert per user
    known.add(user_id)


def _claim_text(value: Any) -> str | None:
    """A profile claim worth storing: text the database can hold, else nothing."""
    return value if isinstance(value, str) and is_storable_text(value) else None


def _is_foreign_key_violation(error: sa_exc.IntegrityError) -> bool:
    pgcode = getattr(error.orig, "pgcode", None)
    return pgcode == "23503" or "FOREIGN KEY constraint failed" in str(error.orig)


@api.get("/tasks/<task_id>")
@require_owner
def get_task(user_id: str, task_id: str) -> Response:
    """Return one of the user's tasks."""
    task_number = _task_id_or_404(task_id)
    _users_table()
    rows = _rows(_GET_TASK, {"task_id": task_number, "owner": user_id})
    Session.commit()
    if not rows:
        raise _task_not_found()
    return jsonify(task_json(rows[0]))


@api.route("/tasks/<task_id>", methods=["PUT", "PATCH"])
@require_owner
def update_task(user_id: str, task_id: str) -> Response:
    """Change any non-empty subset of title, description and completed."""
    task_number = _task_id_or_404(task_id)
    fields = task_fields(read_json_object(request, required=True), partial=True)
    return _update_and_respond(user_id, task_number, fields)


@api.patch("/tasks/<task_id>/complete")
@require_owner
def toggle_task(user_id: str, task_id: str) -> Response:
    """Flip completed, or set it to the body's {"completed": bool} so a retry is harmless."""
    task_number = _task_id_or_404(task_id)
    completed = completed_field(read_json_object(request, required=False))
    return _update_and_respond(user_id, task_number, None if completed is None else {"completed": completed})


def _update_and_respond(user_id: str, task_id: int, values: dict[str, Any] | None) -> Response:
    """One UPDATE ... RETURNING of the user's task (values None flips completed); 404 if it matched nothing."""
    _users_table()
    dialect = _dialect()
    statement = _update_statement(None if values is None else tuple(sorted(values)), dialect)
    params = {"task_id": task_id, "owner": user_id, **_now_params(dialect)}
    params.update({f"v_{name}": value for name, value in (values or {}).items()})
    rows = _rows(statement, params)
    Session.commit()
    if not rows:
        raise _task_not_found()
    return jsonify(task_json(rows[0]))


@api.delete("/tasks/<task_id>")
@require_owner
def delete_task(user_id: str, task_id: str) -> tuple[str, int]:
    """Delete one of the user's tasks."""
    task_number = _task_id_or_404(task_id)
    _users_table()
    deleted = _rows(_DELETE_TASK, {"task_id": task_number, "owner": user_id})
    Session.commit()
    if not deleted:
        raise _task_not_found()
    return "", 204


# --- entry points ------------------------------------------------------------------------------

def __getattr__(name: str) -> Flask:
    """`app:app` for gunicorn and `flask --app app`, built on first access.

    Lazily, so that importing create_app (tests, `python app.py`) never needs production settings.
    """
    if name != "app":
        raise AttributeError(name)
    try:
        application = create_app()
    except ConfigError as error:  # a configuration mistake: one sentence, not a traceback
        raise SystemExit(str(error)) from None
    globals()["app"] = application
    return application


NO_SECRET_FOR_TOKENS = ("Tokens are signed with BETTER_AUTH_SECRET (HS256); with Better Auth's JWKS only, "
                        "get them from Better Auth.")


def main(argv: list[str]) -> None:
    """`python app.py` and its token command; a configuration mistake is one sentence and exit status 1."""
    try:
        _serve_or_print_token(argv)
    except ConfigError as error:
        sys.exit(str(error))


def _serve_or_print_token(argv: list[str]) -> None:
    """`python app.py`: the local server on 127.0.0.1:8000; `python app.py token USER`: a token."""
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: python app.py            serve on http://127.0.0.1:$PORT (8000) for development\n"
              "       python app.py token USER print a token for USER signed with BETTER_AUTH_SECRET\n"
              "                                (the development secret when it is not set)")
        return
    if argv[:1] == ["token"]:
        if len(argv) != 2:
            sys.exit("usage: python app.py token USER_ID")
        # Quiet, so that the token alone goes to stdout: T=$(python app.py token alice).
        secret = create_app({"ALLOW_DEV_SECRET": True, "LOG_LEVEL": "ERROR"}).config["BETTER_AUTH_SECRET"]
        if not secret:
            sys.exit(NO_SECRET_FOR_TOKENS)
        print(auth.issue_token(secret, argv[1], lifetime_seconds=24 * 3600))
        return
    application = create_app({"ALLOW_DEV_SECRET": True})
    secret = application.config["BETTER_AUTH_SECRET"]
    port = int(os.environ.get("PORT", "8000"))
    database = display_url(normalise_database_url(application.config["DATABASE_URL"]))
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
    print(f"  curl -s -H {header} -H 'Content-Type: application/json' \\\n"
          f"       -d '{{\"title\": \"Buy milk\"}}' {base}\n")
    print(f"  curl -s -H {header} {base}\n", flush=True)
    application.run(host="127.0.0.1", port=port)


if __name__ == "__main__":
    main(sys.argv[1:])
