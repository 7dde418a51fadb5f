"""Explicit, small input validation: the JSON body, the fields a client may set, the list query."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, overload

from flask import Request

from errors import ApiError, ValidationError, field_error
from models import DESCRIPTION_MAX, IDEMPOTENCY_KEY_MAX, TITLE_MAX, WRITABLE_DEFAULTS

MAX_TASK_ID = 2**31 - 1  # the tasks.id column is a 32-bit integer
MAX_LIMIT = 1000
MAX_OFFSET = 2**31 - 1
BODY_LIMIT = 64 * 1024


@overload
def read_json_object(request: Request, *, required: Literal[True]) -> dict[str, Any]: ...


@overload
def read_json_object(request: Request, *, required: Literal[False]) -> dict[str, Any] | None: ...


def read_json_object(request: Request, *, required: bool) -> dict[str, Any] | None:
    """Return the body as a JSON object, None when there is no body and none is required.

    An empty body counts as no body, whatever its Content-Type (fetch often sends the header alone).
    """
    data = request.get_data(cache=True)  # over MAX_CONTENT_LENGTH this raises the 413
    if len(data) > BODY_LIMIT:  # a chunked body: werkzeug stops reading at MAX_CONTENT_LENGTH, silently
        raise ApiError(413, "The request body is too large; the limit is 64 KiB.")
    if not data:
        if required:
            raise _body_error("The request body must be a JSON object.", "missing")
        return None
    if not request.is_json:
        raise ApiError(415, "The request body must be JSON, sent with Content-Type: application/json.")
    try:
        payload = json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError too
        raise _body_error("The request body is not valid JSON.", "json_invalid") from None
    if not isinstance(payload, dict):
        raise _body_error("The request body must be a JSON object.", "object_type")
    return payload


def _body_error(message: str, kind: str) -> ValidationError:
    return ValidationError([field_error("body", message, kind)])


def _text_problem(value: str) -> str | None:
    """Why a string cannot be stored as text, or None when it can."""
    if "\x00" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (it contains an unpaired surrogate)"
    return None


def is_storable_text(value: str) -> bool:
    """Whether the database can hold this text (no NUL, no unpaired surrogate)."""
    return _text_problem(value) is None


def _text_checker(field: str, longest: int, *, required: bool) -> Callable[[Any, list[dict[str, str]]], str | None]:
    """The check of a text field: a string, trimmed, storable, at most `longest` characters; when not
    required, null too, and it may be empty."""
    label = field.capitalize()

    def check(value: Any, errors: list[dict[str, str]]) -> str | None:
        if value is None and not required:
            return None
        if not isinstance(value, str):
            expected = "a string" if required else "a string or null"
            errors.append(field_error(field, f"{label} must be {expected}.", "string_type"))
            return None
        text = value.strip()
        problem = _text_problem(text)
        if problem:
            errors.append(field_error(field, f"{label} {problem}.", "string_invalid"))
        elif required and not text:
            errors.append(field_error(field, f"{label} must not be empty.", "string_too_short"))
        elif len(text) > longest:
            errors.append(field_error(field, f"{label} must be at most {longest} characters long.", "string_too_long"))
        else:
            return text
        return None

    return check


def _check_completed(value: Any, errors: list[dict[str, str]]) -> bool | None:
    # bool only: "true", 1 and null are refused rather than guessed at.
    if not isinstance(value, bool):
        errors.append(
            field_error(
                "completed", "Completed must be a JSON boolean, true or false (not a string or a number).", "bool_type"
            )
        )
        return None
    return value


# One check per writable field (models.WRITABLE_DEFAULTS): the only fields a client may ever set;
# anything else in a body (id, user_id, ...) is ignored.
_CHECKS = {
    "title": _text_checker("title", TITLE_MAX, required=True),
    "description": _text_checker("description", DESCRIPTION_MAX, required=False),
    "completed": _check_completed,
}
REQUIRED_ON_CREATE = ("title",)


def task_fields(payload: Mapping[str, Any], *, partial: bool) -> dict[str, Any]:
    """Validate the writable fields of a body: for PUT/PATCH (partial) those present, at least one; for a
    create, every one, the defaults standing in for those left out."""
    errors: list[dict[str, str]] = []
    present = [name for name in WRITABLE_DEFAULTS if name in payload]
    if partial and not present:
        raise ValidationError(
            [field_error("body", f"Send at least one of the fields {', '.join(WRITABLE_DEFAULTS)}.", "missing")]
        )
    if not partial:
        errors += [
            field_error(name, f"{name.capitalize()} is required.", "missing")
            for name in REQUIRED_ON_CREATE
            if name not in payload
        ]
    fields = {name: _CHECKS[name](payload[name], errors) for name in present}
    if errors:
        raise ValidationError(errors)
    return fields if partial else {**WRITABLE_DEFAULTS, **fields}


def completed_field(payload: Mapping[str, Any] | None) -> bool | None:
    """The toggle's optional body: {"completed": true|false} sets it; no body, or no such field, flips it.

    Unknown fields are ignored here as everywhere ({"isCompleted": true} from some frontends flips).
    """
    if payload is None or "completed" not in payload:
        return None
    errors: list[dict[str, str]] = []
    value = _check_completed(payload["completed"], errors)
    if errors:
        raise ValidationError(errors)
    return value


def parse_task_id(raw: str) -> int | None:
    """The task id from the URL, or None when it cannot name a task (the view answers 404).

    Canonical digits only (no sign, no leading zero), so that a task has exactly one URL.
    """
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 10 or raw.startswith("0"):
        return None
    task_id = int(raw)
    return task_id if 1 <= task_id <= MAX_TASK_ID else None


@dataclass(frozen=True)
class ListQuery:
    """The list endpoint's validated query parameters."""

    status: str = "all"
    sort: str = "created"
    descending: bool = True
    limit: int | None = None
    offset: int = 0


_CHOICES = {
    "status": ("all", "pending", "completed"),
    "sort": ("created", "updated", "title"),
    "order": ("asc", "desc"),
}


def _bounded_int(args: Mapping[str, str], name: str, low: int, high: int, errors: list[dict[str, str]]) -> int | None:
    raw = args.get(name)
    if raw is None:
        return None
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12 or not low <= int(raw) <= high:
        errors.append(
            field_error(name, f"{name.capitalize()} must be a whole number from {low} to {high}.", "int_range")
        )
        return None
    return int(raw)


def list_query(args: Mapping[str, str]) -> ListQuery:
    """Validate status, sort, order, limit and offset; unknown parameters are ignored."""
    errors: list[dict[str, str]] = []
    chosen: dict[str, str] = {}
    for name, choices in _CHOICES.items():
        value = args.get(name)
        if value is None:
            continue
        if value not in choices:
            errors.append(field_error(name, f"{name.capitalize()} must be one of: {', '.join(choices)}.", "enum"))
        else:
            chosen[name] = value
    limit = _bounded_int(args, "limit", 1, MAX_LIMIT, errors)
    offset = _bounded_int(args, "offset", 0, MAX_OFFSET, errors)
    if errors:
        raise ValidationError(errors)
    sort = chosen.get("sort", "created")
    default_order = "asc" if sort == "title" else "desc"
    return ListQuery(
        status=chosen.get("status", "all"),
        sort=sort,
        descending=chosen.get("order", default_order) == "desc",
        limit=limit,
        offset=offset or 0,
    )


# Printable ASCII (the IETF draft's Idempotency-Key is an sf-string), 1 to IDEMPOTENCY_KEY_MAX of it.
_IDEMPOTENCY_KEY = re.compile(rf"[\x20-\x7e]{{1,{IDEMPOTENCY_KEY_MAX}}}")


def idempotency_key(raw: str | None) -> str | None:
    """A create's Idempotency-Key header: None without one; 1 to 255 printable ASCII characters, else a 422."""
    if raw is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(raw):
        raise ValidationError(
            [
                field_error(
                    "Idempotency-Key",
                    f"The Idempotency-Key header must be 1 to {IDEMPOTENCY_KEY_MAX} printable ASCII characters.",
                    "string_pattern_mismatch",
                )
            ]
        )
    return raw


# One element of an entity-tag list (RFC 9110 8.8.3 and 5.6.1): optional whitespace, an optional W/ and
# a quoted tag, or nothing (lists may have empty elements), then a comma or the end.
_LIST_ELEMENT = re.compile(r'[ \t]*(?:(W/)?"([\x21\x23-\x7e\x80-\xff]*)")?[ \t]*(?:,|$)')
# This service's tags are task versions: 1 to 2147483647, written without leading zeros.
_VERSION = re.compile(r"[1-9][0-9]{0,9}")


@dataclass(frozen=True)
class Condition:
    """An If-Match or If-None-Match header: any version (*), or the versions its tags name."""

    any_version: bool
    versions: frozenset[int]

    def holds_for(self, version: int) -> bool:
        """Whether the header names this version (or is *)."""
        return self.any_version or version in self.versions


def if_match(raw: str | None) -> Condition | None:
    """The If-Match header: None without one. Strong comparison: a weak tag names no version."""
    return _condition(raw, weak=False)


def if_none_match(raw: str | None) -> Condition | None:
    """The If-None-Match header: None without one. Weak comparison: W/"3" names version 3 too."""
    return _condition(raw, weak=True)


def _condition(raw: str | None, *, weak: bool) -> Condition | None:
    """Read a list of entity-tags; a malformed one (an unquoted tag, text around a tag) names nothing."""
    if raw is None:
        return None
    if raw.strip(" \t") == "*":
        return Condition(any_version=True, versions=frozenset())
    versions: set[int] = set()
    position = 0
    while position < len(raw):
        element = _LIST_ELEMENT.match(raw, position)
        if element is None or element.end() == position:
            return Condition(any_version=False, versions=frozenset())
        is_weak, tag = element.group(1, 2)
        if tag is not None and (weak or not is_weak) and _VERSION.fullmatch(tag):
            versions.add(int(tag))
        position = element.end()
    return Condition(any_version=False, versions=frozenset(versions))
