"""Test support: keep openapi.json true to the app (test-only; needs jsonschema).

- load_spec(): the parsed document.
- route_coverage(app): the app's routes missing from the document, and the document's missing from the app.
- validate_response(...): one real response against the document; AssertionError on any mismatch.

Requests that no operation describes are read from the document's root `x-unmatched-requests`, whose
maps are read like an operation's `responses`:
- a URL that no path template matches: `unknownPath` (404 Error; 500 Error for a route outside the API,
  such as one a test adds, that fails);
- a documented path with a method it does not document: `methodNotAllowed` (405 Error + Allow);
- OPTIONS on a documented path: `options` (200, empty body, Allow).
For the last two, Allow (less HEAD and OPTIONS) must list exactly the methods the path documents.
HEAD is checked against the GET operation, with an empty body.

Two header extensions make conditional headers exact: `x-present-if-query-parameter: limit`
(X-Total-Count) and `x-present-if-path-prefix: /api/` (Cache-Control): such a header must be
present if and only if the condition holds. Other headers: `required` ones must be present; any
documented header that is present must match its schema (integer schemas parse the value first).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

SPEC_FILE = Path(__file__).resolve().parent.parent / "openapi.json"
BASE_URI = "urn:tasks-api:openapi.json"
HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
IMPLICIT_METHODS = {"HEAD", "OPTIONS"}  # Flask adds them to every rule; route coverage ignores them
_CONVERTER = re.compile(r"<(?:[^<>:]+:)?([^<>]+)>")  # <user_id>, <int:task_id> -> {user_id}, {task_id}
_TEMPLATE_PARAMETER = re.compile(r"\{([^{}/]+)\}")


def load_spec() -> dict[str, Any]:
    """The parsed document (a fresh copy: the caller may change it)."""
    return json.loads(SPEC_FILE.read_text(encoding="utf-8"))


@functools.lru_cache(maxsize=1)
def _spec() -> dict[str, Any]:
    """The document, parsed once, never changed."""
    return load_spec()


# --- route coverage ------------------------------------------------------------------------------


def _documented_operations(spec: Mapping[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in spec.get("paths", {}).items()
        for method in item
        if method in HTTP_METHODS and method.upper() not in IMPLICIT_METHODS
    }


def route_coverage(app: Any) -> tuple[list[str], list[str]]:
    """(undocumented, unimplemented): "METHOD /path" entries the app has and the document lacks, and back.

    Paths are written the OpenAPI way ({user_id}); the static route, HEAD and OPTIONS are ignored.
    """
    implemented: set[tuple[str, str]] = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        path = _CONVERTER.sub(r"{\1}", rule.rule)
        for method in (rule.methods or {"<any method>"}) - IMPLICIT_METHODS:
            implemented.add((method, path))
    documented = _documented_operations(_spec())

    def listed(pairs: Iterable[tuple[str, str]]) -> list[str]:
        return [f"{method} {path}" for method, path in sorted(pairs, key=lambda pair: (pair[1], pair[0]))]

    return listed(implemented - documented), listed(documented - implemented)


# --- references and validators -------------------------------------------------------------------


def _escape(token: str) -> str:
    return token.replace("~", "~0").replace("/", "~1")


def _pointer(*tokens: str) -> str:
    return "".join("/" + _escape(token) for token in tokens)


def _at(pointer: str) -> Any:
    node: Any = _spec()
    for token in pointer.split("/")[1:]:
        token = token.replace("~1", "/").replace("~0", "~")
        node = node[int(token)] if isinstance(node, list) else node[token]
    return node


def _deref(node: Any, pointer: str) -> tuple[Any, str]:
    """Follow local $refs (#/components/...): the object and its JSON pointer in the document."""
    seen = set()
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"]
        if not ref.startswith("#/") or ref in seen:
            raise AssertionError(f"openapi.json: unsupported or circular $ref {ref!r} at {pointer}")
        seen.add(ref)
        pointer = ref[1:]
        node = _at(pointer)
    return node, pointer


@functools.lru_cache(maxsize=1)
def _registry() -> Registry:
    # The whole document is one resource, so "#/components/schemas/Task" inside any schema resolves.
    return Registry().with_resource(BASE_URI, DRAFT202012.create_resource(_spec()))


@functools.cache
def _validator(pointer: str) -> Draft202012Validator:
    """A compiled Draft 2020-12 validator for the schema at this pointer (formats checked)."""
    return Draft202012Validator(
        {"$ref": f"{BASE_URI}#{pointer}"}, registry=_registry(), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def schema_errors(pointer: str, instance: Any) -> list[str]:
    """Readable problems of instance against the schema at pointer ([] when it is valid)."""
    errors = sorted(
        _validator(pointer).iter_errors(instance), key=lambda error: [str(part) for part in error.absolute_path]
    )
    return [f"{error.json_path}: {error.message}" for error in errors[:5]] + (
        [f"... and {len(errors) - 5} more"] if len(errors) > 5 else []
    )


# --- path matching -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _templates() -> list[tuple[re.Pattern[str], str]]:
    """Path templates as regexes, concrete ones first (as OpenAPI says they win)."""
    compiled = []
    for template in _spec()["paths"]:
        parts = _TEMPLATE_PARAMETER.split(template)
        # split() alternates literal text and parameter names; a parameter is one path segment.
        regex = "".join(re.escape(part) if index % 2 == 0 else "[^/]+" for index, part in enumerate(parts))
        compiled.append((len(parts) // 2, re.compile(regex), template))
    compiled.sort(key=lambda entry: entry[0])
    return [(regex, template) for _, regex, template in compiled]


@functools.lru_cache(maxsize=4096)
def match_path(path: str) -> str | None:
    """The documented path template that a concrete path (no query) matches, or None."""
    for regex, template in _templates():
        if regex.fullmatch(path):
            return template
    return None


# --- responses -----------------------------------------------------------------------------------


def _media_type(content_type: str | None) -> str:
    return (content_type or "").split(";", 1)[0].strip().lower()


def _is_json(media_type: str) -> bool:
    return media_type == "application/json" or media_type.endswith("+json")


def _header_map(headers: Any) -> dict[str, str]:
    pairs = headers.items() if hasattr(headers, "items") else headers or ()
    return {name.lower(): value for name, value in pairs}


def _allowed_methods(path_item: Mapping[str, Any]) -> set[str]:
    return {method.upper() for method in path_item if method in HTTP_METHODS} - IMPLICIT_METHODS


def _select(method: str, path: str) -> tuple[dict[str, Any], str, str, set[str] | None]:
    """(responses map, its pointer, what it is, the methods Allow must list or None) for a request."""
    spec = _spec()
    template = match_path(path)
    unmatched = _pointer("x-unmatched-requests")
    if template is None:
        pointer = unmatched + _pointer("unknownPath")
        return _at(pointer), pointer, f"an unknown path (no template matches {path!r})", None
    item_pointer = _pointer("paths", template)
    item = spec["paths"][template]
    allowed = _allowed_methods(item)
    operation = method.lower()
    if method == "HEAD" and "head" not in item:
        operation = "get"
    if operation in HTTP_METHODS and operation in item:
        pointer = item_pointer + _pointer(operation, "responses")
        return _at(pointer), pointer, f"{operation.upper()} {template}", None
    if method == "OPTIONS":
        pointer = unmatched + _pointer("options")
        return _at(pointer), pointer, f"OPTIONS on {template}", allowed
    pointer = unmatched + _pointer("methodNotAllowed")
    return _at(pointer), pointer, f"{method} on {template} (not documented: 405 expected)", allowed


def validate_response(
    method: str,
    path: str,
    status: int,
    content_type: str | None,
    body_bytes: bytes,
    headers: Any,
    *,
    query: str | None = None,
) -> None:
    """Check one response against openapi.json; AssertionError saying what is wrong.

    path is the request path, percent-decoded as Flask's request.path, optionally followed by
    "?<query string>" ("/api/alice/tasks?limit=2"); or pass the query string as query= (then a "?"
    in path is part of the path). Without either the query is taken as empty: it matters for
    X-Total-Count, which must be sent if and only if the query has limit. headers: any mapping or
    list of (name, value) pairs (werkzeug Headers included).
    """
    method = method.upper()
    if query is None:
        path, _, query = path.partition("?")
    parameters = parse_qs(query, keep_blank_values=True)
    responses, responses_pointer, what, allow_must_list = _select(method, path)
    where = f"{method} {path}{'?' + query if query else ''} -> {status}"

    def fail(problem: str) -> AssertionError:
        shown = body_bytes[:300].decode("utf-8", "replace") + ("..." if len(body_bytes) > 300 else "")
        return AssertionError(f"{where}: {problem} [documented as {what}; body: {shown!r}]")

    key = str(status)
    if key not in responses:
        key = f"{key[0]}XX" if f"{key[0]}XX" in responses else "default"
    if key not in responses:
        raise fail(f"status {status} is not documented (documented: {', '.join(sorted(responses))})")
    response, response_pointer = _deref(responses[key], responses_pointer + _pointer(key))

    # Headers: the required ones present, every documented one that is present valid.
    received = _header_map(headers)
    for name, header in response.get("headers", {}).items():
        if name.lower() == "content-type":
            continue  # OpenAPI: ignored in a response's headers map
        header, header_pointer = _deref(header, response_pointer + _pointer("headers", name))
        value = received.get(name.lower())
        if "x-present-if-query-parameter" in header:
            condition = header["x-present-if-query-parameter"]
            if (value is not None) != (condition in parameters):
                raise fail(
                    f"header {name} must be sent if and only if the query has {condition!r} "
                    f"(query: {query!r}; {name}: {value!r})"
                )
        elif "x-present-if-path-prefix" in header:
            prefix = header["x-present-if-path-prefix"]
            if (value is not None) != path.startswith(prefix):
                raise fail(
                    f"header {name} must be sent if and only if the path starts with {prefix!r} ({name}: {value!r})"
                )
        elif value is None and header.get("required"):
            raise fail(f"required header {name} is missing")
        if value is not None and "schema" in header:
            instance: Any = value
            if header["schema"].get("type") == "integer":
                if not re.fullmatch(r"-?(0|[1-9][0-9]*)", value):
                    raise fail(f"header {name}: {value!r} is not an integer")
                instance = int(value)
            problems = schema_errors(header_pointer + "/schema", instance)
            if problems:
                raise fail(f"header {name}: {value!r}: {'; '.join(problems)}")

    if allow_must_list is not None:
        allow = received.get("allow")
        listed = {method.strip().upper() for method in (allow or "").split(",") if method.strip()}
        if allow is None or listed - IMPLICIT_METHODS != allow_must_list:
            raise fail(
                f"Allow is {allow!r}; less HEAD and OPTIONS it must list exactly the documented "
                f"methods {sorted(allow_must_list)}"
            )

    # Body.
    content = response.get("content") or {}
    if not content:
        if body_bytes:
            raise fail("the body must be empty")
        return
    media_type = _media_type(content_type)
    if media_type not in content:
        raise fail(f"Content-Type {content_type!r} is not documented (documented: {', '.join(content)})")
    if method == "HEAD":
        if body_bytes:
            raise fail("a HEAD response must have no body")
        return
    media = content[media_type]
    if "schema" not in media:
        return
    try:
        text = body_bytes.decode("utf-8")
        document = json.loads(text) if _is_json(media_type) else text
    except ValueError as error:
        raise fail(f"the body is not {'JSON' if _is_json(media_type) else 'UTF-8 text'}: {error}") from None
    problems = schema_errors(response_pointer + _pointer("content", media_type, "schema"), document)
    if problems:
        schema = media["schema"]
        name = schema.get("$ref", "the inline schema") if isinstance(schema, dict) else "the schema"
        raise fail(f"the body does not match {name}: " + "; ".join(problems))


def validate_flask_response(response: Any) -> None:
    """validate_response for a Flask/werkzeug test-client response (it carries its request)."""
    request = response.request
    validate_response(
        request.method,
        request.path,
        response.status_code,
        response.content_type,
        response.get_data(),
        response.headers,
        query=request.query_string.decode("latin-1"),
    )
