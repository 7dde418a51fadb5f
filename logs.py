"""Logging: one line per record on stdout, as text (the default) or, with LOG_FORMAT=json, as one JSON
object, which the log search of the platforms this runs on parses. Every record carries the id of the
request it was made in. gunicorn's own records use the same formatter (gunicorn.conf.py), so this
module imports nothing of the service.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s request_id=%(request_id)s: %(message)s"
# The request line's own fields (app.py passes them as `extra`), kept as fields in JSON.
REQUEST_FIELDS = ("method", "path", "status", "duration_ms", "user_id")
# The id of the request this thread is serving: a context variable, so that stamping it on every
# record costs no request-context lookup.
request_id: ContextVar[str] = ContextVar("request_id", default="-")
_factory_installed = False


class JsonFormatter(logging.Formatter):
    """A record as one line of JSON: time (ISO 8601, UTC), level, logger, message, request_id, the
    request line's fields, and an exception's traceback as one string. Every control character is
    escaped, so nothing a client sends can start a line of its own."""

    def format(self, record: logging.LogRecord) -> str:
        """The record's JSON object, on one line."""
        stamp = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        identifier = getattr(record, "request_id", "-")
        entry: dict[str, Any] = {
            "time": stamp.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": None if identifier == "-" else identifier,
        }
        for name in REQUEST_FIELDS:
            if hasattr(record, name):
                entry[name] = getattr(record, name)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str)


# What gunicorn's own records may quote of a request: the client's bytes (a malformed request line or
# header, between quotes), a query string, a bearer token.
_QUOTED_BYTES = re.compile(r"'.*'")
_QUERY = re.compile(r"\?[^\s'\"]*")
_BEARER = re.compile(r"(?i)(bearer\s+)\S+")
_JWT = re.compile(r"eyJ[\w-]*\.[\w-]*\.[\w-]*")


class ClientBytesRedacted(logging.Filter):
    """For gunicorn's logger: a record about a request it could not parse or serve quotes what the
    client sent, which may carry a token, a query string or a cookie; those parts are cut before any
    handler (text or JSON) sees the record."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Keep the record, its message cleaned."""
        message = record.getMessage()
        cleaned = _JWT.sub("[redacted]", _BEARER.sub(r"\1[redacted]", _QUERY.sub("?[redacted]", message)))
        cleaned = _QUOTED_BYTES.sub("'[the request, not logged]'", cleaned)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def formatter(log_format: str) -> logging.Formatter:
    """The formatter of LOG_FORMAT ("text" or "json")."""
    return JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)


def configure(level: str, log_format: str) -> None:
    """Stamp the request id on every record; log to stdout in log_format, unless a handler is already in
    place (gunicorn's, configured with the same format; a test runner's)."""
    global _factory_installed
    if not _factory_installed:
        base_factory = logging.getLogRecordFactory()

        def record_with_request_id(*args: Any, **kwargs: Any) -> logging.LogRecord:
            record = base_factory(*args, **kwargs)
            record.request_id = request_id.get()
            return record

        logging.setLogRecordFactory(record_with_request_id)
        _factory_installed = True
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(formatter(log_format))
        root.addHandler(handler)
    root.setLevel(level.upper())


def gunicorn_logconfig(log_format: str, level: str) -> dict[str, Any] | None:
    """gunicorn's logconfig_dict for log_format: with json, its records go, through the root logger, to
    stdout as JSON (the root's one handler, which the app then keeps). None for text: gunicorn's own
    format, on stderr, as before."""
    if log_format != "json":
        return None
    # A level logging does not know would stop gunicorn with dictConfig's error; the app says it in one
    # sentence instead (LOG_LEVEL must be one of ...).
    level = level.upper() if isinstance(logging.getLevelName(level.upper()), int) else "INFO"
    stdout = {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stdout"}
    # gunicorn merges this over its defaults key by key: every key it names is replaced whole.
    return {
        "root": {"level": level, "handlers": ["console"]},
        "loggers": {
            "gunicorn.error": {"level": level, "handlers": [], "propagate": True, "qualname": "gunicorn.error"},
            # The access log stays off (gunicorn.conf.py): the app's request line says more, and never
            # the query string, which gunicorn's line would.
            "gunicorn.access": {"level": "CRITICAL", "handlers": [], "propagate": False},
            # What Alembic says while it is imported (before the app sets the level), unheard in text mode.
            "alembic.runtime.plugins": {"level": "WARNING"},
        },
        "handlers": {"console": stdout},
        "formatters": {"json": {"()": JsonFormatter}},
    }
