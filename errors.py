"""One JSON error shape for every failure: {"detail": "<sentence>"} (plus "errors" on 422)."""

from __future__ import annotations

import logging
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


class ApiError(Exception):
    """An error the client should see, with its status, sentence and optional headers."""

    def __init__(self, status: int, detail: str, *, errors: list[dict[str, str]] | None = None,
                 headers: dict[str, str] | None = None) -> None:
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


def error_response(status: int, detail: str, *, errors: list[dict[str, str]] | None = None,
                   headers: dict[str, str] | None = None) -> Response:
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
        headers = {name: value for name, value in error.get_response().headers.items()
                   if name.lower() not in ("content-type", "content-length")}
        return error_response(status, HTTP_DETAILS.get(status, error.name + "."), headers=headers)

    @app.errorhandler(sa_exc.DBAPIError)
    @app.errorhandler(sa_exc.TimeoutError)
    def handle_database_error(error: Exception) -> Response:
        """A database that cannot be reached, or has no free connection, is a 503 the client may retry."""
        unavailable = isinstance(error, (sa_exc.OperationalError, sa_exc.TimeoutError)) or getattr(
            error, "connection_invalidated", False)
        if not unavailable:
            return handle_unexpected(error)
        reason = str(getattr(error, "orig", None) or error).strip().splitlines()
        log.warning("database unavailable: %s: %s", type(error).__name__, reason[0] if reason else "")
        return error_response(503, "The database is unavailable right now; please try again shortly.",
                              headers={"Retry-After": "5"})

    @app.errorhandler(Exception)
    def handle_unexpected(error: Exception) -> Response:
        """Anything else is our bug: log it in full, tell the client nothing about it."""
        log.exception("unhandled error")
        return error_response(500, "Internal server error")
