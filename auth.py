"""JWT verification and the require_owner decorator."""

from __future__ import annotations

import functools
import re
import time
from typing import Any, Callable, TypeVar

import jwt
from flask import current_app, g, request

from errors import ApiError

ALGORITHMS = ["HS256"]  # pinned: the algorithm named in a token's header is never trusted
LEEWAY_SECONDS = 30
MIN_SECRET_BYTES = 32
DEV_SECRET = "dev-only-insecure-secret-do-not-use-in-production"
# RFC 6750 b64token; a token is three of these joined by dots, so anything else is refused early.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)

F = TypeVar("F", bound=Callable[..., Any])


def _unauthorized(detail: str, *, token_sent: bool) -> ApiError:
    challenge = 'Bearer error="invalid_token"' if token_sent else "Bearer"
    return ApiError(401, detail, headers={"WWW-Authenticate": challenge})


def bearer_token() -> str:
    """The token from `Authorization: Bearer <token>`, or a 401."""
    header = request.headers.get("Authorization")
    if header is None:
        raise _unauthorized("Sign in to continue: the request has no Authorization header.", token_sent=False)
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        raise _unauthorized("The Authorization header must be 'Bearer <token>'.", token_sent=False)
    return match.group(1)


def verify_token(token: str) -> dict[str, Any]:
    """Decode and verify a token's signature and claims; any failure is a 401."""
    config = current_app.config
    try:
        claims = jwt.decode(
            token,
            config["BETTER_AUTH_SECRET"],
            algorithms=ALGORITHMS,
            leeway=LEEWAY_SECONDS,
            audience=config.get("JWT_AUDIENCE"),
            issuer=config.get("JWT_ISSUER"),
            options={
                "require": ["exp", "sub"],
                # An aud claim is checked only when the service is told which audience it is.
                "verify_aud": bool(config.get("JWT_AUDIENCE")),
            },
        )
    except jwt.ExpiredSignatureError:
        raise _unauthorized("Your session has expired; sign in again.", token_sent=True) from None
    except jwt.PyJWTError:
        raise _unauthorized("The token is invalid; sign in again.", token_sent=True) from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject:
        raise _unauthorized("The token is invalid; sign in again.", token_sent=True)
    return claims


def require_owner(view: F) -> F:
    """Let the request through only when its token is valid and its `sub` is the URL's user_id.

    401 comes before 403, and both before any database work or body parsing.
    """

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        claims = verify_token(bearer_token())
        if claims["sub"] != kwargs.get("user_id"):
            raise ApiError(403, "You do not have access to these tasks.")
        g.claims = claims
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def issue_token(secret: str, user_id: str, *, email: str | None = None, name: str | None = None,
                lifetime_seconds: int = 3600) -> str:
    """Sign an HS256 token for user_id, as the frontend would (for the CLI and the dev server)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + lifetime_seconds}
    if email:
        claims["email"] = email
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm="HS256")
