"""One JSON error shape for every failure: {"detail": "<sentence>"} (plus "errors" on 422)."""

from __future__ import annotations

import logging
import re
from typing import Any

from flask import Flask, Response, jsonify
from sqlalchemy import exc as sa_exc
from werkzeug.exceptions import HTTPException

log = logging.getLogger(__name__)

# Sentences a person can read, for the statuses that werkzeug raises on its own.
HTTP_DETAILS: dict[int, str] = {
    400: "The request could not be understood.",
    404: "The requested resource was not found.",
    405: "This method is not allowed on this URL.",
    413: "The request body is too large; the limit is 64 KiB.",
    415: "The request body must be JSON, sent with Content-Type: application/json.",
    431: "The request headers are too large.",
}


class ConfigError(RuntimeError):
    """A setting that cannot work: the service refuses to start, with one sentence that names it and the fix."""


class SchemaNotReady(Exception):
    """The database's schema is behind this release's: its migrations have not run yet (a 503: they will)."""

    def __init__(self, current: str | None, head: str) -> None:
        super().__init__(
            f"The database schema is at revision {current or 'none'} and this release needs {head}: "
            f"run the migrations (flask --app app db upgrade), or start with MIGRATE_ON_START on."
        )
        self.current = current
        self.head = head


MISCONFIGURED = "The service is misconfigured and cannot use its database; its operators can see why in its log."

# libpq's words for connection failures that only a change of configuration can fix (a failed connection
# carries no SQLSTATE), each with the sentence the operator reads.
_CONFIGURATION_FAILURES = tuple(
    (re.compile(pattern), sentence)
    for pattern, sentence in (
        (
            "password authentication failed",
            "The database refused the password: set the right one in DATABASE_URL (percent-encoded).",
        ),
        (
            'role "[^"]*" does not exist|no such user',
            "The database server has no such user: fix the user name in DATABASE_URL.",
        ),
        (
            'database "[^"]*" does not exist|no such database',
            "The database named in DATABASE_URL does not exist: create it, or fix its name in DATABASE_URL.",
        ),
        # Other refusals of a login (PgBouncer's "trust" or SASL ones, an unknown user behind a pooler).
        (
            "authentication failed",
            "The database refused the user or password in DATABASE_URL: fix them (percent-encoded).",
        ),
        (
            "no pg_hba.conf entry",
            "The database server refuses this host or user (pg_hba.conf): allow it, or fix DATABASE_URL.",
        ),
        (
            "server does not support SSL",
            "DATABASE_URL asks for TLS (sslmode) but the database server does not offer "
            "it: change sslmode in DATABASE_URL, or enable TLS on the server.",
        ),
        (
            "channel binding required",
            "DATABASE_URL asks for channel_binding=require but the server does not use it: "
            "remove channel_binding from DATABASE_URL.",
        ),
        ("Name or service not known", "The database host in DATABASE_URL does not exist: fix the host name."),
        ("invalid dsn|invalid connection option", "DATABASE_URL has an option that libpq does not know: remove it."),
        (
            "certificate",
            "The database server's TLS certificate cannot be verified with the settings in DATABASE_URL "
            "(sslmode, sslrootcert): fix them.",
        ),
        (
            "Endpoint ID",
            "Neon cannot tell which database is meant: use the connection string exactly as Neon shows it "
            "in DATABASE_URL.",
        ),
    )
)
# SQLSTATEs of configuration mistakes: authorization (28), no such database (3D000), no such schema
# (3F000), a permission the service's user lacks (42501).
_CONFIGURATION_SQLSTATES = ("28", "3D000", "3F000", "42501")
# SQLSTATEs that a retry can outlive: the connection (08), the server's resources (53), its state or an
# operator (57, except a dropped database), a conflict between transactions (40), a lock (55P03), its I/O (58).
_TRANSIENT_SQLSTATES = ("08", "53", "57", "40", "55P03", "58")

_SQLITE_TRANSIENT = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_NOMEM", "SQLITE_INTERRUPT")
_SQLITE_CONFIGURATION = ("SQLITE_CANTOPEN", "SQLITE_READONLY", "SQLITE_PERM", "SQLITE_AUTH", "SQLITE_NOTADB")


def classify_database_error(error: BaseException) -> tuple[str, str]:
    """Whether a database failure is "transient", "configuration" or "deterministic", and why, in one line.

    A failed connection has no SQLSTATE, only libpq's message: a refused or timed-out connection is an
    outage; a wrong password, database or TLS setting is a mistake that no retry will fix. A statement's
    error has a SQLSTATE: an outage, a missing permission, or a rule the statement broke (a bug to fix).
    """
    if isinstance(error, sa_exc.TimeoutError):
        return "transient", "no free connection in the pool"
    original = getattr(error, "orig", None) or error
    lines = str(original).strip().splitlines()
    message = lines[0] if lines else type(original).__name__
    sqlstate = getattr(original, "pgcode", None)
    if sqlstate:
        if sqlstate.startswith(_CONFIGURATION_SQLSTATES) or sqlstate == "57P04":
            return "configuration", (
                f"The database or user in DATABASE_URL cannot be used as configured (SQLSTATE {sqlstate}: {message})."
            )
        if sqlstate.startswith(_TRANSIENT_SQLSTATES):
            return "transient", f"SQLSTATE {sqlstate}: {message}"
        return "deterministic", f"SQLSTATE {sqlstate}: {message}"
    sqlite_error = getattr(original, "sqlite_errorname", None)
    if sqlite_error:
        if sqlite_error in _SQLITE_TRANSIENT:
            return "transient", f"{sqlite_error}: {message}"
        if sqlite_error in _SQLITE_CONFIGURATION:
            return "configuration", f"The SQLite file in DATABASE_URL cannot be used ({sqlite_error}: {message})."
        return "deterministic", f"{sqlite_error}: {message}"
    for pattern, sentence in _CONFIGURATION_FAILURES:
        if pattern.search(message):
            return "configuration", sentence
    if isinstance(error, (sa_exc.OperationalError, sa_exc.InterfaceError)) or getattr(
        error, "connection_invalidated", False
    ):
        return "transient", f"{type(original).__name__}: {message}"
    return "deterministic", f"{type(original).__name__}: {message}"


class ApiError(Exception):
    """An error the client should see, with its status, sentence and optional headers."""

    def __init__(
        self,
        status: int,
        detail: str,
        *,
        errors: list[dict[str, str]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.errors = errors
        self.headers = headers or {}


class ValidationError(ApiError):
    """A 422: the body or the query breaks a rule; `errors` says which field and why."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        super().__init__(422, " ".join(error["message"] for error in errors), errors=errors)


def field_error(field: str, message: str, kind: str) -> dict[str, str]:
    """One entry of a 422's `errors` list."""
    return {"field": field, "message": message, "type": kind}


def error_response(
    status: int, detail: str, *, errors: list[dict[str, str]] | None = None, headers: dict[str, str] | None = None
) -> Response:
    """Build the JSON error response."""
    body: dict[str, Any] = {"detail": detail}
    if errors is not None:
        body["errors"] = errors
    response = jsonify(body)
    response.status_code = status
    for name, value in (headers or {}).items():
        response.headers[name] = value
    return response


def register_error_handlers(app: Flask) -> None:
    """Make every error JSON, on the whole app, so unknown URLs and 405s are JSON too."""

    @app.errorhandler(ApiError)
    def handle_api_error(error: ApiError) -> Response:
        """Render an error raised on purpose."""
        return error_response(error.status, error.detail, errors=error.errors, headers=error.headers)

    @app.errorhandler(HTTPException)
    def handle_http_exception(error: HTTPException) -> Response:
        """Render werkzeug's errors (404, 405, 413, ...) as JSON, keeping headers such as Allow."""
        status = error.code or 500
        headers = {
            name: value
            for name, value in error.get_response().headers.items()
            if name.lower() not in ("content-type", "content-length")
        }
        return error_response(status, HTTP_DETAILS.get(status, error.name + "."), headers=headers)

    @app.errorhandler(ConfigError)
    def handle_configuration_error(error: ConfigError) -> Response:
        """A setting that cannot work, found while serving: the operator is told; retrying cannot help."""
        log.error("configuration error: %s", error)
        return error_response(500, MISCONFIGURED)

    @app.errorhandler(SchemaNotReady)
    def handle_schema_not_ready(error: SchemaNotReady) -> Response:
        """A release whose migrations have not run yet: no task request is served on a schema it does not know."""
        log.warning("schema not ready: %s", error)
        return error_response(
            503, "The service is being upgraded; please try again shortly.", headers={"Retry-After": "5"}
        )

    @app.errorhandler(sa_exc.DBAPIError)
    @app.errorhandler(sa_exc.TimeoutError)
    def handle_database_error(error: Exception) -> Response:
        """An outage is a 503 the client may retry; a configuration mistake or a bug is a 500 it may not."""
        kind, reason = classify_database_error(error)
        if kind == "configuration":
            return handle_configuration_error(ConfigError(reason))
        if kind == "deterministic":
            log.error("database error that a retry would repeat: %s", reason)
            return error_response(500, "Internal server error")
        log.warning("database unavailable: %s", reason)
        return error_response(
            503, "The database is unavailable right now; please try again shortly.", headers={"Retry-After": "5"}
        )

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> Response:
        """Anything else is our bug: log it in full, tell the client nothing about it."""
        log.exception("unhandled error")
        return error_response(500, "Internal server error")
