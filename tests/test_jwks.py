"""Better Auth's JWKS (asymmetric tokens), against a JWKS server in a thread: algorithms, caching,
rotation, refetch limits, outages and their bound, algorithm confusion."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from auth import DEV_SECRET
from tests.common import (
    ALICE,
    BOB,
    SECRET,
    epoch_seconds,
    make_app,
    make_token,
    run_sql,
)

AUTH_URL = "http://auth.test"


class SigningKey:
    """A generated key pair with its public JWK, as Better Auth's jwt plugin would publish it."""

    def __init__(self, algorithm: str, kid: str) -> None:
        self.algorithm, self.kid = algorithm, kid
        self.private: Any
        jwk: dict[str, Any]
        if algorithm == "EdDSA":
            self.private = ed25519.Ed25519PrivateKey.generate()
            jwk = OKPAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        elif algorithm == "ES256":
            self.private = ec.generate_private_key(ec.SECP256R1())
            jwk = ECAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        else:
            self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            jwk = RSAAlgorithm.to_jwk(self.private.public_key(), as_dict=True)
        self.jwk = {**jwk, "kid": kid, "alg": algorithm}

    def public_pem(self) -> bytes:
        return self.private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def token(self, sub: str = ALICE, *, kid: str | None = None, **claims: Any) -> str:
        now = epoch_seconds()
        payload = {"sub": sub, "iat": now, "exp": now + 900, "iss": AUTH_URL, "aud": AUTH_URL, **claims}
        return jwt.encode(payload, self.private, algorithm=self.algorithm, headers={"kid": kid or self.kid})


class JWKSServer:
    """A JWKS endpoint in a thread of the test process; counts fetches; can be taken down."""

    def __init__(self, keys: list[SigningKey]) -> None:
        self.keys = list(keys)
        self.fetches = 0
        self.failing = False
        self.garbage = False  # answer with a broken HTTP status line
        self.extra_entries: list[Any] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
                server.fetches += 1
                if server.garbage:
                    self.wfile.write(b"NOT-HTTP\r\n\r\n")
                    return
                if server.failing:
                    self.send_response(500)
                    self.end_headers()
                    return
                body = json.dumps({"keys": server.extra_entries + [key.jwk for key in server.keys]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/api/auth/jwks"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def signing_keys() -> dict[str, SigningKey]:
    return {algorithm: SigningKey(algorithm, f"kid-{algorithm}") for algorithm in ("EdDSA", "ES256", "RS256")}


@pytest.fixture
def jwks_server(signing_keys: dict[str, SigningKey]) -> Iterator[JWKSServer]:
    server = JWKSServer(list(signing_keys.values()))
    yield server
    server.close()


@pytest.fixture
def jwks_app_with(database_url: str, jwks_server: JWKSServer) -> Iterator[Callable[..., Any]]:
    """Build apps in JWKS mode (the test server's keys) with more settings; disposed after the test."""
    built: list[Any] = []

    def build(**settings: Any) -> Any:
        application = make_app(database_url, **{"BETTER_AUTH_URL": AUTH_URL, "JWKS_URL": jwks_server.url, **settings})
        built.append(application)
        return application

    yield build
    for application in built:
        application.extensions["db"].engine.dispose()


@pytest.fixture
def jwks_app(jwks_app_with: Callable[..., Any]) -> Any:
    return jwks_app_with(JWKS_REFETCH_SECONDS=60)


def _get_tasks(application: Any, token: str, user: str = ALICE) -> Any:
    return application.test_client().get(f"/api/{user}/tasks", headers={"Authorization": f"Bearer {token}"})


@pytest.mark.parametrize("algorithm", ["EdDSA", "ES256", "RS256"])
def test_jwks_tokens_of_each_algorithm_are_accepted(
    jwks_app: Any, signing_keys: dict[str, SigningKey], algorithm: str
) -> None:
    token = signing_keys[algorithm].token()
    assert _get_tasks(jwks_app, token).status_code == 200
    created = jwks_app.test_client().post(
        f"/api/{ALICE}/tasks", json={"title": "via JWKS"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert created.status_code == 201 and created.get_json()["user_id"] == ALICE
    assert _get_tasks(jwks_app, token, user=BOB).status_code == 403


def test_hs256_keeps_working_beside_jwks(jwks_app: Any) -> None:
    assert _get_tasks(jwks_app, make_token()).status_code == 200


def test_jwks_is_fetched_once_and_cached(
    jwks_app: Any, jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    for _ in range(5):
        assert _get_tasks(jwks_app, signing_keys["EdDSA"].token()).status_code == 200
    assert jwks_server.fetches == 1


def test_jwks_key_rotation_is_picked_up(
    jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0)
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200
    rotated = SigningKey("EdDSA", "kid-rotated")
    jwks_server.keys.append(rotated)
    assert _get_tasks(application, rotated.token()).status_code == 200
    assert jwks_server.fetches == 2


def test_unknown_kid_is_401_and_refetches_at_most_once_per_interval(
    jwks_app: Any, jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    assert _get_tasks(jwks_app, signing_keys["EdDSA"].token()).status_code == 200
    for attempt in range(5):
        response = _get_tasks(jwks_app, signing_keys["EdDSA"].token(kid=f"made-up-{attempt}"))
        assert response.status_code == 401
        assert response.headers["WWW-Authenticate"] == 'Bearer error="invalid_token"'
    # The first fetch was seconds ago, within the 60 s interval: no refetch at all.
    assert jwks_server.fetches == 1


@pytest.mark.parametrize(
    "claims",
    [
        {"iss": "https://evil.example"},
        {"aud": "https://other.example"},
        {"iss": None},
        {"aud": None},
        {"exp": 1_000_000_000},
        {"sub": ""},
    ],
    ids=["wrong iss", "wrong aud", "no iss", "no aud", "expired", "empty sub"],
)
def test_jwks_token_claims_are_checked(
    jwks_app: Any, signing_keys: dict[str, SigningKey], claims: dict[str, Any]
) -> None:
    key = signing_keys["ES256"]
    now = epoch_seconds()
    payload = {"sub": ALICE, "iat": now, "exp": now + 900, "iss": AUTH_URL, "aud": AUTH_URL, **claims}
    payload = {name: value for name, value in payload.items() if value is not None}
    token = jwt.encode(payload, key.private, algorithm="ES256", headers={"kid": key.kid})
    assert _get_tasks(jwks_app, token).status_code == 401


def test_jwks_token_signed_by_another_key_with_known_kid_is_401(
    jwks_app: Any, signing_keys: dict[str, SigningKey]
) -> None:
    impostor = SigningKey("EdDSA", signing_keys["EdDSA"].kid)
    assert _get_tasks(jwks_app, impostor.token()).status_code == 401


def test_jwks_token_whose_alg_differs_from_its_key_is_401(jwks_app: Any, signing_keys: dict[str, SigningKey]) -> None:
    # Signed with the ES256 key but claiming the RS256 key's kid.
    assert _get_tasks(jwks_app, signing_keys["ES256"].token(kid="kid-RS256")).status_code == 401


@pytest.mark.parametrize("with_secret", [True, False])
def test_hs256_token_is_never_verified_with_jwks_key_material(
    jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey], with_secret: bool
) -> None:
    """Algorithm confusion: an HS256 token 'signed' with a public key the JWKS publishes."""
    application = jwks_app_with(BETTER_AUTH_SECRET=SECRET if with_secret else None)
    rsa_key, ed_key = signing_keys["RS256"], signing_keys["EdDSA"]
    now = epoch_seconds()
    claims = {"sub": ALICE, "iat": now, "exp": now + 900, "iss": AUTH_URL, "aud": AUTH_URL}
    forged = [
        # PyJWT itself refuses a PEM public key as an HMAC secret, so sign these by hand.
        _hs256_by_hand(claims, rsa_key.public_pem(), kid=rsa_key.kid),
        _hs256_by_hand(claims, json.dumps(rsa_key.jwk).encode(), kid=rsa_key.kid),
        _hs256_by_hand(claims, jwt.utils.base64url_decode(ed_key.jwk["x"]), kid=ed_key.kid),
    ]
    for token in forged:
        assert _get_tasks(application, token).status_code == 401
    assert run_sql(application, "SELECT count(*) FROM tasks")[0][0] == 0


def _hs256_by_hand(claims: dict[str, Any], key: bytes, *, kid: str) -> str:
    header = jwt.utils.base64url_encode(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    payload = jwt.utils.base64url_encode(json.dumps(claims).encode())
    signing_input = header + b"." + payload
    signature = jwt.utils.base64url_encode(hmac.new(key, signing_input, hashlib.sha256).digest())
    return (signing_input + b"." + signature).decode()


def test_jwks_down_is_503_not_401(
    jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    jwks_server.failing = True
    application = jwks_app_with(JWKS_REFETCH_SECONDS=60)
    for _ in range(3):
        response = _get_tasks(application, signing_keys["EdDSA"].token())
        assert response.status_code == 503
        assert response.get_json()["detail"] and response.headers["Retry-After"]
    assert jwks_server.fetches == 1  # an outage is not hammered
    # HS256 tokens do not depend on the JWKS.
    assert _get_tasks(application, make_token()).status_code == 200


def test_jwks_unreachable_host_is_503(jwks_app_with: Callable[..., Any], signing_keys: dict[str, SigningKey]) -> None:
    application = jwks_app_with(JWKS_URL="http://127.0.0.1:1/jwks")
    assert _get_tasks(application, signing_keys["RS256"].token()).status_code == 503


def test_jwks_keys_stay_trusted_through_an_outage_up_to_the_bound_and_no_longer(
    jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0, JWKS_MAX_AGE_SECONDS=0.3, JWKS_STALE_IF_ERROR_SECONDS=1)
    remembered = signing_keys["EdDSA"].token()
    assert _get_tasks(application, remembered).status_code == 200
    jwks_server.failing = True
    time.sleep(0.4)  # past the keys' max age: every use tries a refetch, which fails
    assert _get_tasks(application, remembered).status_code == 200  # stale-if-error: still trusted
    assert _get_tasks(application, signing_keys["ES256"].token()).status_code == 200  # a fresh check too
    assert _get_tasks(application, signing_keys["EdDSA"].token(kid="unknown")).status_code == 503
    time.sleep(1.0)  # max age + the stale bound since the last successful fetch
    for token in (remembered, signing_keys["ES256"].token()):
        response = _get_tasks(application, token)
        assert response.status_code == 503 and response.headers["Retry-After"]
    jwks_server.failing = False
    assert _get_tasks(application, remembered).status_code == 200


def test_jwks_comes_back_after_an_outage(
    jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    jwks_server.failing = True
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0)
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 503
    jwks_server.failing = False
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200


def test_better_auth_url_sets_jwks_url_and_claims(database_url: str) -> None:
    application = make_app(database_url, BETTER_AUTH_URL="https://app.example/", BETTER_AUTH_SECRET=None)
    client = application.extensions["jwks"]
    assert client.url == "https://app.example/api/auth/jwks"
    assert (client.issuer, client.audience) == ("https://app.example", "https://app.example")
    # JWKS only: an HS256 token, even with a well-known secret, is refused.
    assert _get_tasks(application, make_token(secret=DEV_SECRET)).status_code == 401
    application.extensions["db"].engine.dispose()


@pytest.mark.parametrize(
    "base_url,jwks_url",
    [
        ("https://app.example.com", "https://app.example.com/api/auth/jwks"),
        ("https://app.example.com/", "https://app.example.com/api/auth/jwks"),
        ("https://app.example.com/api/auth", "https://app.example.com/api/auth/jwks"),
        ("https://app.example.com/api/auth/", "https://app.example.com/api/auth/jwks"),
        ("https://app.example.com:8443/auth", "https://app.example.com:8443/auth/jwks"),
    ],
)
def test_better_auth_url_with_or_without_a_path_is_read_as_better_auth_reads_it(
    database_url: str, base_url: str, jwks_url: str
) -> None:
    # Better Auth takes a base URL with a path as its base path, and signs iss and aud with the origin.
    application = make_app(database_url, BETTER_AUTH_URL=base_url, BETTER_AUTH_SECRET=None)
    client = application.extensions["jwks"]
    origin = jwks_url.split("/", 3)[0] + "//" + jwks_url.split("/", 3)[2]
    assert (client.url, client.issuer, client.audience) == (jwks_url, origin, origin)
    application.extensions["db"].engine.dispose()


def test_a_jwks_token_from_a_base_url_with_a_path_is_accepted(
    jwks_app_with: Callable[..., Any], signing_keys: dict[str, SigningKey]
) -> None:
    application = jwks_app_with(BETTER_AUTH_URL=AUTH_URL + "/api/auth")  # iss and aud stay the origin
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200


def test_jwks_key_removed_from_the_set_stops_verifying(
    jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0, JWKS_MAX_AGE_SECONDS=0.2)
    revoked = signing_keys["RS256"]
    token = revoked.token()  # the very same token before and after: verified once, then remembered
    assert _get_tasks(application, token).status_code == 200
    assert _get_tasks(application, token).status_code == 200
    jwks_server.keys.remove(revoked)
    time.sleep(0.3)
    assert _get_tasks(application, token).status_code == 401
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200


def test_remembered_jwks_token_is_refused_once_a_refetch_drops_its_key(
    jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    # Well inside the keys' 5-minute max age: an unknown kid makes the service refetch early.
    application = jwks_app_with(JWKS_REFETCH_SECONDS=0)
    revoked = signing_keys["ES256"]
    token = revoked.token()
    assert _get_tasks(application, token).status_code == 200  # verified, and now remembered
    jwks_server.keys.remove(revoked)
    fetches = jwks_server.fetches
    assert _get_tasks(application, signing_keys["EdDSA"].token(kid="rotated-in")).status_code == 401
    assert jwks_server.fetches == fetches + 1  # the refetch that dropped the ES256 key
    assert _get_tasks(application, token).status_code == 401  # as a fresh check of it would answer
    assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 200


def test_jwks_broken_http_answer_is_503_and_rate_limited(
    jwks_app_with: Callable[..., Any], jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    jwks_server.garbage = True
    application = jwks_app_with(JWKS_REFETCH_SECONDS=60)
    for _ in range(3):
        assert _get_tasks(application, signing_keys["EdDSA"].token()).status_code == 503
    assert jwks_server.fetches == 1


def test_jwks_entries_that_are_not_keys_are_skipped(
    jwks_app: Any, jwks_server: JWKSServer, signing_keys: dict[str, SigningKey]
) -> None:
    jwks_server.extra_entries = ["not a key", 42, {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]
    assert _get_tasks(jwks_app, signing_keys["ES256"].token()).status_code == 200
