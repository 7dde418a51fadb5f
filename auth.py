"""JWT verification and the require_owner decorator."""

from __future__ import annotations

import functools
import http.client
import json
import logging
import re
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

import jwt
from flask import current_app, g, request

from errors import ApiError
from validation import is_storable_text

log = logging.getLogger(__name__)

ALGORITHMS = ["HS256"]  # pinned: the algorithm named in a token's header is never trusted
# What Better Auth's jwt plugin can sign with; verified only with keys from its JWKS, never
# with the shared secret, and an HS256 token is never verified with JWKS key material.
JWKS_ALGORITHMS = frozenset({"EdDSA", "ES256", "ES512", "RS256", "PS256"})
LEEWAY_SECONDS = 30
MIN_SECRET_BYTES = 32
DEV_SECRET = "dev-only-insecure-secret-do-not-use-in-production"
# The longest user id (a token's sub) the service accepts: Better Auth's ids are 32 characters and
# UUIDs 36, and every index that leads with user_id must be able to hold it (PostgreSQL's btree entries
# stop at about 2.7 kB; 255 characters are at most 1,020 bytes).
MAX_USER_ID_LENGTH = 255
INVALID_TOKEN = "The token is invalid; sign in again."
# RFC 6750 b64token; a token is three of these joined by dots, so anything else is refused early.
_BEARER = re.compile(r"Bearer +([A-Za-z0-9\-._~+/]+=*)", re.IGNORECASE)

F = TypeVar("F", bound=Callable[..., Any])


def _unauthorized(detail: str, *, token_sent: bool) -> ApiError:
    challenge = 'Bearer error="invalid_token"' if token_sent else "Bearer"
    return ApiError(401, detail, headers={"WWW-Authenticate": challenge})


def _invalid_token() -> ApiError:
    """The 401 for a token that was sent and cannot be accepted; the log line, if any, says why."""
    return _unauthorized(INVALID_TOKEN, token_sent=True)


def bearer_token() -> str:
    """The token from `Authorization: Bearer <token>`, or a 401."""
    header = request.headers.get("Authorization")
    if header is None:
        raise _unauthorized("Sign in to continue: the request has no Authorization header.", token_sent=False)
    match = _BEARER.fullmatch(header.strip())
    if match is None:
        _explain_a_session_token(header.strip().partition(" ")[2])
        raise _unauthorized("The Authorization header must be 'Bearer <token>'.", token_sent=False)
    return match.group(1)


def _explain_a_session_token(token: str) -> None:
    """Say in the log (never in the answer) when the token is a Better Auth session token, not a JWT.

    The most common integration mistake: the bearer plugin's session token (an id and its signature, two
    dot-separated parts, sometimes percent-encoded) where the service needs the jwt plugin's JWT.
    """
    if token.count(".") == 1:
        log.info(
            "token rejected: it has two parts, as a Better Auth session token has, where a JWT has three: "
            "send the JWT of Better Auth's jwt plugin (authClient.token(), or the set-auth-jwt header of "
            "getSession), or one that your own route signs with BETTER_AUTH_SECRET"
        )


class VerifiedTokens:
    """Tokens that passed verification, so that a client's next requests skip the signature check.

    An entry is dropped the moment a fresh check would refuse the token: when it expires (PyJWT's
    own rule: int(exp) + leeway <= now) or when the key that verified it is no longer the one the
    JWKS client holds for its kid (removed by a refetch, or past its max age). Refusals are never
    remembered. Bounded in size: the oldest entry goes first.
    """

    def __init__(self, max_entries: int = 1024) -> None:
        self._max_entries = max_entries
        self._entries: dict[str, tuple[Mapping[str, Any], int, Callable[[], bool] | None]] = {}
        self._lock = threading.Lock()

    def get(self, token: str) -> Mapping[str, Any] | None:
        """The claims of a token verified before and still valid, else None."""
        entry = self._entries.get(token)
        if entry is None:
            return None
        claims, expires_at, key_still_trusted = entry
        if time.time() >= expires_at or (key_still_trusted is not None and not key_still_trusted()):
            with self._lock:  # every change under the lock, so that add() can walk the entries
                self._entries.pop(token, None)
            return None
        return claims

    def add(self, token: str, claims: Mapping[str, Any], key_still_trusted: Callable[[], bool] | None) -> None:
        """Remember a verified token; key_still_trusted (None: the process's own secret) is asked on each use."""
        expires_at = int(claims["exp"]) + LEEWAY_SECONDS
        with self._lock:
            while self._entries and len(self._entries) >= self._max_entries:
                del self._entries[next(iter(self._entries))]
            self._entries[token] = (claims, expires_at, key_still_trusted)


def verify_token(token: str) -> Mapping[str, Any]:
    """The token's claims, verified with the secret (HS256) or the JWKS (asymmetric); any failure is a 401."""
    verified: VerifiedTokens = current_app.extensions["verified_tokens"]
    claims = verified.get(token)
    if claims is None:
        claims, key_still_trusted = _verify_signed_token(token)
        verified.add(token, claims, key_still_trusted)
    return claims


def _verify_signed_token(token: str) -> tuple[Mapping[str, Any], Callable[[], bool] | None]:
    """Check the token's signature and claims; also return how to ask whether its key is still trusted."""
    config = current_app.config
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        _explain_a_session_token(token)
        raise _invalid_token() from None
    algorithm = header.get("alg")
    if not isinstance(algorithm, str):
        raise _invalid_token()
    jwks: JWKSClient | None = current_app.extensions.get("jwks")
    if algorithm == "HS256" and config.get("BETTER_AUTH_SECRET"):
        key: Any = config["BETTER_AUTH_SECRET"]
        algorithms = ALGORITHMS
        issuer, audience = one_or_many(config.get("JWT_ISSUER")), one_or_many(config.get("JWT_AUDIENCE"))
        key_still_trusted = None  # the secret is the process's for its whole life
    elif algorithm in JWKS_ALGORITHMS and jwks is not None:
        kid = header.get("kid")
        signing_key = jwks.key_for(kid, algorithm)
        key, algorithms = signing_key.key, [algorithm]
        issuer, audience = jwks.issuer, jwks.audience
        key_still_trusted = functools.partial(jwks.still_trusts, kid, signing_key)
    else:
        raise _invalid_token()
    return MappingProxyType(_decode(token, key, algorithms, issuer=issuer, audience=audience)), key_still_trusted


def one_or_many(names: str | None) -> str | list[str] | None:
    """A JWT_ISSUER or JWT_AUDIENCE: one value, or a comma-separated list of them (preview deployments)."""
    values = [name.strip() for name in (names or "").split(",") if name.strip()]
    return values if len(values) > 1 else (values[0] if values else None)


def _decode(
    token: str, key: Any, algorithms: list[str], *, issuer: str | list[str] | None, audience: str | list[str] | None
) -> dict[str, Any]:
    """Check signature and claims with pinned algorithms; exp and sub are required."""
    try:
        claims = jwt.decode(
            token,
            key,
            algorithms=algorithms,
            leeway=LEEWAY_SECONDS,
            audience=audience,
            issuer=issuer,
            options={
                "require": ["exp", "sub"],
                # An aud claim is checked only when the service is told which audience it is.
                "verify_aud": bool(audience),
            },
        )
    except jwt.ExpiredSignatureError:
        raise _unauthorized("Your session has expired; sign in again.", token_sent=True) from None
    except jwt.PyJWTError as error:
        # The reason, for whoever debugs a frontend/backend mismatch (wrong secret, no exp, ...);
        # PyJWT's messages name claims and algorithms, never the token or the key.
        log.info("token rejected: %s: %s", type(error).__name__, error)
        raise _invalid_token() from None
    subject = claims.get("sub")
    if not isinstance(subject, str) or not subject or not is_storable_text(subject):
        log.info("token rejected: sub is not a non-empty string")
        raise _invalid_token()
    if len(subject) > MAX_USER_ID_LENGTH:
        log.info("token rejected: sub is %d characters long, over %d", len(subject), MAX_USER_ID_LENGTH)
        raise _invalid_token()
    return claims


class JWKSClient:
    """Better Auth's public keys, fetched from its JWKS URL and cached in the process.

    Keys are trusted for max_age_seconds after the fetch that brought them, so a key removed from the
    JWKS stops verifying tokens. An unknown kid (a rotated key) triggers a refetch, at most once per
    refetch_seconds, and so does a failed fetch: an outage of the auth server is not hammered. While the
    JWKS cannot be fetched, the keys held stay trusted for stale_if_error_seconds past their max age
    (signed-in users keep working through a short outage) and not a second longer: then 503s.
    """

    def __init__(
        self,
        url: str,
        *,
        issuer: str | list[str] | None,
        audience: str | list[str] | None,
        refetch_seconds: float = 30,
        timeout_seconds: float = 5,
        max_age_seconds: float = 300,
        stale_if_error_seconds: float = 3600,
    ) -> None:
        self.url = url
        self.issuer = issuer
        self.audience = audience
        self._refetch_seconds = refetch_seconds
        self._timeout = timeout_seconds
        self._max_age = max_age_seconds
        self._stale_if_error = stale_if_error_seconds
        self._lock = threading.Lock()
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._attempted_at: float | None = None  # the last fetch, successful or not
        self._fetched_at: float | None = None  # the last successful fetch: the keys' age
        self._last_fetch_failed = False

    def key_for(self, kid: Any, algorithm: str) -> jwt.PyJWK:
        """The key for a token's kid and alg; 401 if unknown, 503 if the JWKS is unreachable."""
        if not isinstance(kid, (str, type(None))):
            raise _invalid_token()
        key = self._keys.get(kid)
        if key is None or not self._fresh():
            with self._lock:
                key = self._keys.get(kid)
                if (key is None or not self._fresh()) and self._may_refetch():
                    self._refresh()
                    key = self._keys.get(kid)
        # Keys too old to trust (the JWKS down past the stale bound) and a kid unknown while the JWKS is
        # down are the auth server's trouble, not the token's: 503, so that the frontend does not sign out.
        if (key is None and self._last_fetch_failed) or (key is not None and not self._trusted()):
            raise _jwks_unavailable()
        if key is None or key.algorithm_name != algorithm:
            raise _invalid_token()
        return key

    def still_trusts(self, kid: str | None, key: jwt.PyJWK) -> bool:
        """Whether key is still the one held for kid and still trusted (a remembered token asks)."""
        return self._keys.get(kid) is key and self._trusted()

    def _age(self) -> float:
        return float("inf") if self._fetched_at is None else time.monotonic() - self._fetched_at

    def _fresh(self) -> bool:
        """Keys younger than their max age: no refetch needed."""
        return self._age() < self._max_age

    def _trusted(self) -> bool:
        """Keys that may verify a token: fresh, or stale while the JWKS cannot be fetched, up to the bound."""
        age = self._age()
        return age < self._max_age or (self._last_fetch_failed and age < self._max_age + self._stale_if_error)

    def _may_refetch(self) -> bool:
        return self._attempted_at is None or time.monotonic() - self._attempted_at >= self._refetch_seconds

    def _refresh(self) -> None:
        """Fetch the key set; on failure keep the keys we had (the caller decides whether they are still trusted)."""
        self._attempted_at = time.monotonic()
        try:
            with urllib.request.urlopen(self.url, timeout=self._timeout) as response:
                document = json.load(response)
            keys: dict[str | None, jwt.PyJWK] = {}
            for entry in document.get("keys", []):
                if not isinstance(entry, dict):
                    continue
                try:
                    key = jwt.PyJWK(entry)  # the algorithm: the entry's alg, else inferred from kty and crv
                except jwt.PyJWTError:
                    continue  # a key type or algorithm we do not use
                if key.algorithm_name in JWKS_ALGORITHMS:
                    keys[entry.get("kid")] = key
        except (OSError, ValueError, AttributeError, http.client.HTTPException) as error:
            self._last_fetch_failed = True
            log.warning("could not fetch the JWKS from %s: %s", self.url, type(error).__name__)
            return
        self._keys = keys
        self._fetched_at = self._attempted_at
        self._last_fetch_failed = False
        log.info("fetched %d signing key(s) from the JWKS", len(keys))


def _jwks_unavailable() -> ApiError:
    return ApiError(
        503, "The sign-in service's keys could not be fetched; try again shortly.", headers={"Retry-After": "5"}
    )


def require_owner(view: F) -> F:
    """Let the request through only when its token is valid and its `sub` is the URL's user_id.

    401 comes before 403, and both before any database work or body parsing. A sub that cannot be an
    id of the users table (not a uuid, where its ids are uuids) is a 401 too: the token names no user.
    """

    @functools.wraps(view)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        claims = verify_token(bearer_token())
        g.claims = claims  # the request log names the authenticated user, on a 403 too
        if not current_app.extensions["user_id_acceptable"](claims["sub"]):
            log.info("token rejected: its sub cannot be an id of the users table (their type differs)")
            raise _invalid_token()
        if claims["sub"] != kwargs.get("user_id"):
            raise ApiError(403, "You do not have access to these tasks.")
        return view(*args, **kwargs)

    return wrapped  # type: ignore[return-value]


def issue_token(
    secret: str, user_id: str, *, email: str | None = None, name: str | None = None, lifetime_seconds: int = 3600
) -> str:
    """Sign an HS256 token for user_id, as the frontend would (for the CLI and the dev server)."""
    now = int(time.time())
    claims: dict[str, Any] = {"sub": user_id, "iat": now, "exp": now + lifetime_seconds}
    if email:
        claims["email"] = email
    if name:
        claims["name"] = name
    return jwt.encode(claims, secret, algorithm="HS256")
