"""A local stand-in for Google's OAuth2 token endpoint and the GCE metadata server.

tokencache refreshes tokens through real google-auth; tests (ours and our users') need those
refreshes to happen offline, fast, countable and able to fail on demand. One threaded stdlib
HTTP server answers:

    POST /token                    jwt-bearer (service-account keys) and refresh_token grants
    GET  /                         metadata root (google-auth pings it to detect GCE)
    GET  /computeMetadata/v1/...   default service account token, info, email; project id
    GET  /tokeninfo?access_token=  Google-style tokeninfo for tokens this emulator issued
    GET  /stats, POST /stats/reset request counters
    GET  /config, POST /config     read or change EmulatorConfig at runtime

Issued tokens are opaque (``ya29.emu-...``) and kept in memory until they expire.
Access tokens and private keys are never logged.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import random
import re
import secrets
import signal
import socket
import socketserver
import sys
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from email.message import Message
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = ["Emulator", "EmulatorConfig", "run_emulator"]

PROJECT_ID = "tokencache-emulator"
DEFAULT_ACCOUNT_EMAIL = f"default@{PROJECT_ID}.iam.gserviceaccount.com"
DEFAULT_SCOPES = ("https://www.googleapis.com/auth/cloud-platform",)
# google-auth signs service-account assertions with Google's real endpoint as `aud`, whatever
# token_uri the key file names, so that audience must be accepted next to our own token_uri.
GOOGLE_TOKEN_URIS = ("https://oauth2.googleapis.com/token", "https://www.googleapis.com/oauth2/v4/token")
CLOCK_SKEW = 30  # seconds of iat/exp leeway, as the spec of this emulator promises
MAX_ASSERTION_LIFETIME = 3600  # Google refuses assertions valid for more than an hour
TOKEN_PREFIX = "ya29.emu-"  # noqa: S105 - a public prefix, not a secret
JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
GRANT_KINDS = ("jwt-bearer", "refresh_token", "metadata")
MAX_BODY = 1 << 20  # token requests are tiny; refuse anything that is not
METADATA_PREFIX = "/computeMetadata/v1/"
FLAVOR = ("Metadata-Flavor", "Google")
NO_STORE = (("Cache-Control", "no-store"), ("Pragma", "no-cache"))
_B64URL = re.compile(r"[A-Za-z0-9_-]*")
_DEFAULT_CLIENT_ID = "100000000000000000001"  # of the metadata server's default account
# Plain-text metadata values, by path under /computeMetadata/v1/.
_METADATA_VALUES = {
    "": "instance/\noauth2/\nproject/\nuniverse/\n",
    "project/project-id": PROJECT_ID,
    "project/numeric-project-id": "100000000001",
    "universe/universe-domain": "googleapis.com",
    "instance/zone": "projects/100000000001/zones/us-central1-a",
}

# name -> (accepted types, minimum, maximum); bool is refused separately since it is an int.
_CONFIG_RULES: dict[str, tuple[tuple[type[float], ...], float, float]] = {
    "lifetime": ((int,), 1, float("inf")),
    "latency": ((int, float), 0.0, 3600.0),
    "failure_rate": ((int, float), 0.0, 1.0),
    "fail_next": ((int,), 0, float("inf")),
}


@dataclass
class EmulatorConfig:
    """Knobs that shape token responses; mutable while the server runs."""

    lifetime: int = 3600
    latency: float = 0.0
    failure_rate: float = 0.0
    fail_next: int = 0

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            _check_config_field(name, value)

    def update(self, changes: Mapping[str, Any]) -> None:
        """Apply a partial update; every field is checked first so a bad one changes nothing."""
        for name, value in changes.items():
            _check_config_field(name, value)
        for name, value in changes.items():
            setattr(self, name, value)

    def as_dict(self) -> dict[str, Any]:
        """The config as the JSON that /config returns."""
        return asdict(self)


def _check_config_field(name: str, value: Any) -> None:
    """Raise ValueError naming the field when a config value is unknown, mistyped or out of range."""
    rule = _CONFIG_RULES.get(name)
    if rule is None:
        raise ValueError(f"unknown config field {name!r}")
    kinds, low, high = rule
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"{name} must be a number{' (integer)' if kinds == (int,) else ''}")
    if not low <= value <= high:  # also refuses NaN
        raise ValueError(f"{name} must be between {low} and {high}")


class _GrantError(Exception):
    """A token request the emulator refuses, in the shape of Google's OAuth2 errors."""

    def __init__(self, error: str, description: str, status: int = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(f"{error}: {description}")
        self.error = error
        self.description = description
        self.status = status


@dataclass(frozen=True)
class _ServiceAccount:
    email: str
    client_id: str


@dataclass(frozen=True)
class _Key:
    kid: str
    account: _ServiceAccount
    public_key: rsa.RSAPublicKey


@dataclass(frozen=True)
class _User:
    """An authorized user (gcloud ADC style) that may use the refresh_token grant."""

    email: str
    client_id: str
    client_secret: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class _Grant:
    """Who a token is being issued to and for what; kept with the token for tokeninfo."""

    kind: str
    email: str
    client_id: str
    scope: str
    subject: str | None = None


@dataclass(frozen=True)
class _Issued:
    grant: _Grant
    expires_at: float


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: dict[str, str]
    headers: Message
    body: bytes


@dataclass(frozen=True)
class _Reply:
    status: int
    body: bytes
    content_type: str
    headers: tuple[tuple[str, str], ...] = ()

    @classmethod
    def json(cls, status: int, payload: Any, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
        return cls(status, json.dumps(payload).encode(), "application/json", headers)

    @classmethod
    def text(cls, status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> _Reply:
        # The real metadata server labels plain values application/text; google-auth only cares
        # that it is not application/json.
        return cls(status, text.encode(), "application/text", headers)

    @classmethod
    def error(cls, status: int, error: str, description: str) -> _Reply:
        return cls.json(status, {"error": error, "error_description": description}, NO_STORE)


class _Registry:
    """Service-account keys and authorized users the token endpoint honours."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._accounts: dict[str, _ServiceAccount] = {}
        self._keys: dict[str, _Key] = {}
        self._users: dict[str, _User] = {}
        self._auto_accounts = 0
        self._auto_users = 0

    def next_account_email(self) -> str:
        with self._lock:
            self._auto_accounts += 1
            return f"sa-{self._auto_accounts}@{PROJECT_ID}.iam.gserviceaccount.com"

    def add_key(self, email: str, public_key: rsa.RSAPublicKey) -> _Key:
        """Register a new key; an existing account keeps its client_id, as on Google."""
        with self._lock:
            account = self._accounts.setdefault(email, _ServiceAccount(email, _numeric_id()))
            key = _Key(secrets.token_hex(20), account, public_key)
            self._keys[key.kid] = key
            return key

    def candidate_keys(self, kid: Any, iss: Any) -> list[_Key]:
        """Keys that may have signed an assertion: the one named by kid, else every key of iss."""
        with self._lock:
            if isinstance(kid, str) and kid:
                return [self._keys[kid]] if kid in self._keys else []
            return [key for key in self._keys.values() if key.account.email == iss]

    def add_user(self) -> tuple[str, _User]:
        with self._lock:
            self._auto_users += 1
            user = _User(
                email=f"user-{self._auto_users}@{PROJECT_ID}.example",
                client_id=f"{_numeric_id(12)}-emu.apps.googleusercontent.com",
                client_secret="GOCSPX-" + secrets.token_urlsafe(21),
                scopes=DEFAULT_SCOPES,
            )
            refresh_token = "1//emu-" + secrets.token_urlsafe(48)
            self._users[refresh_token] = user
            return refresh_token, user

    def user(self, refresh_token: str) -> _User | None:
        with self._lock:
            return self._users.get(refresh_token)


class _Ledger:
    """Counters and live tokens, shared by every handler thread under one lock."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._lock = threading.Lock()
        self._clock = clock
        self._tokens: dict[str, _Issued] = {}
        self._last_prune = clock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self._requests = 0
            self._failed = 0
            self._injected = 0
            self._by_grant: Counter[str] = Counter(dict.fromkeys(GRANT_KINDS, 0))
            self._by_account: Counter[str] = Counter()

    def admit(self, config: EmulatorConfig) -> bool:
        """Count a token request and decide whether to inject a failure (fail_next first)."""
        with self._lock:
            self._requests += 1
            fail = config.fail_next > 0 or random.random() < config.failure_rate
            if config.fail_next > 0:
                config.fail_next -= 1
            self._failed += int(fail)
            self._injected += int(fail)
            return not fail

    def reject(self) -> None:
        with self._lock:
            self._failed += 1

    def issue(self, grant: _Grant, lifetime: int) -> str:
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        with self._lock:
            self._prune()
            self._tokens[token] = _Issued(grant, self._clock() + lifetime)
            self._by_grant[grant.kind] += 1
            self._by_account[grant.email] += 1
        return token

    def lookup(self, token: str) -> _Issued | None:
        """The live token's record, or None when unknown or expired."""
        with self._lock:
            issued = self._tokens.get(token)
        return issued if issued and issued.expires_at > self._clock() else None

    def stats(self) -> dict[str, Any]:
        with self._lock:
            self._prune(force=True)
            return {
                "token_requests": self._requests,
                "issued": sum(self._by_grant.values()),
                "failed": self._failed,
                "injected_failures": self._injected,
                "by_grant": dict(self._by_grant),
                "by_account": dict(self._by_account),
                "live_tokens": len(self._tokens),
            }

    def _prune(self, force: bool = False) -> None:
        """Drop expired tokens; at most once a second, so issuing stays O(1) under load."""
        now = self._clock()
        if force or now - self._last_prune >= 1.0:
            self._tokens = {tok: rec for tok, rec in self._tokens.items() if rec.expires_at > now}
            self._last_prune = now


class _App:
    """The HTTP-agnostic behaviour: a _Request in, a _Reply out."""

    def __init__(self, config: EmulatorConfig, token_uri: str, clock: Callable[[], float]) -> None:
        self.config = config
        self.token_uri = token_uri
        self.clock = clock
        self.registry = _Registry()
        self.ledger = _Ledger(clock)
        self._routes: dict[tuple[str, str], Callable[[_Request], _Reply]] = {
            ("POST", "/token"): self._token,
            ("GET", "/tokeninfo"): self._tokeninfo,
            ("POST", "/tokeninfo"): self._tokeninfo,
            ("GET", "/stats"): lambda _: _Reply.json(HTTPStatus.OK, self.ledger.stats()),
            ("POST", "/stats/reset"): self._reset_stats,
            ("GET", "/config"): lambda _: _Reply.json(HTTPStatus.OK, self.config.as_dict()),
            ("POST", "/config"): self._set_config,
        }

    def handle(self, request: _Request) -> _Reply:
        if request.path == "/" or request.path.startswith("/computeMetadata/"):
            return self._metadata(request)
        route = self._routes.get((request.method, request.path))
        if route is not None:
            return route(request)
        if any(path == request.path for _, path in self._routes):
            return _Reply.error(HTTPStatus.METHOD_NOT_ALLOWED, "method_not_allowed", request.method)
        return _Reply.error(HTTPStatus.NOT_FOUND, "not_found", request.path)

    def tokeninfo(self, access_token: str) -> dict[str, Any] | None:
        issued = self.ledger.lookup(access_token)
        if issued is None:
            return None
        grant = issued.grant
        info: dict[str, Any] = {
            "azp": grant.client_id,
            "aud": grant.client_id,
            "scope": grant.scope,
            "exp": int(issued.expires_at),
            "expires_in": max(0, int(issued.expires_at - self.clock())),
            "email": grant.email,
        }
        if grant.subject is not None:
            info["sub"] = grant.subject
        return info

    # -- token endpoint ------------------------------------------------------------------

    def _token(self, request: _Request) -> _Reply:
        return self._serve_token(lambda: self._grant(request), include_scope=True)

    def _serve_token(self, make_grant: Callable[[], _Grant], *, include_scope: bool) -> _Reply:
        """Count, delay and maybe fail the request, then issue a token for the verified grant."""
        admitted = self.ledger.admit(self.config)
        if self.config.latency > 0:
            time.sleep(self.config.latency)
        if not admitted:
            return _Reply.error(HTTPStatus.INTERNAL_SERVER_ERROR, "internal_failure", "injected failure")
        try:
            grant = make_grant()
        except _GrantError as exc:
            self.ledger.reject()
            return _Reply.error(exc.status, exc.error, exc.description)
        lifetime = self.config.lifetime
        body: dict[str, Any] = {
            "access_token": self.ledger.issue(grant, lifetime),
            "expires_in": lifetime,
            "token_type": "Bearer",
        }
        if include_scope:
            body["scope"] = grant.scope
        return _Reply.json(HTTPStatus.OK, body, NO_STORE)

    def _grant(self, request: _Request) -> _Grant:
        try:
            form = _parse_form(request)
        except ValueError as exc:
            raise _GrantError("invalid_request", f"malformed body: {exc}") from exc
        grant_type = form.get("grant_type", "")
        if grant_type == JWT_BEARER:
            return self._jwt_grant(form)
        if grant_type == "refresh_token":
            return self._refresh_grant(form)
        raise _GrantError("unsupported_grant_type", f"Invalid grant_type: {grant_type!r}")

    def _jwt_grant(self, form: dict[str, str]) -> _Grant:
        assertion = form.get("assertion")
        if not assertion:
            raise _GrantError("invalid_request", "Missing required parameter: assertion")
        header, claims, signing_input, signature = _decode_jwt(assertion)
        if header.get("alg") != "RS256":
            raise _GrantError("invalid_grant", "Invalid JWT: alg must be RS256")
        keys = self.registry.candidate_keys(header.get("kid"), claims.get("iss"))
        key = _verify_signature(keys, signing_input, signature)
        audiences = (self.token_uri, *GOOGLE_TOKEN_URIS)
        scope = _check_claims(claims, key.account.email, audiences, self.clock())
        subject = claims.get("sub")
        return _Grant(
            kind="jwt-bearer",
            email=key.account.email,
            client_id=key.account.client_id,
            scope=scope,
            subject=subject if isinstance(subject, str) and subject else None,
        )

    def _refresh_grant(self, form: dict[str, str]) -> _Grant:
        user = self.registry.user(form.get("refresh_token", ""))
        if user is None:
            raise _GrantError("invalid_grant", "Bad Request: unknown refresh_token")
        secret_ok = secrets.compare_digest(form.get("client_secret", ""), user.client_secret)
        if form.get("client_id") != user.client_id or not secret_ok:
            raise _GrantError("invalid_grant", "client_id/client_secret do not match the refresh_token")
        scope = form.get("scope") or " ".join(user.scopes)
        return _Grant("refresh_token", user.email, user.client_id, scope)

    # -- tokeninfo, stats, config --------------------------------------------------------

    def _tokeninfo(self, request: _Request) -> _Reply:
        try:
            token = request.query.get("access_token") or _parse_form(request).get("access_token", "")
        except ValueError:
            token = ""
        info = self.tokeninfo(token) if token else None
        if info is None:
            return _Reply.json(HTTPStatus.BAD_REQUEST, {"error": "invalid_token"})
        return _Reply.json(HTTPStatus.OK, info)

    def _reset_stats(self, _: _Request) -> _Reply:
        self.ledger.reset()
        return _Reply.json(HTTPStatus.OK, self.ledger.stats())

    def _set_config(self, request: _Request) -> _Reply:
        try:
            changes = json.loads(request.body or b"{}")
            if not isinstance(changes, dict):
                raise ValueError("body must be a JSON object")
            self.config.update(changes)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            return _Reply.error(HTTPStatus.BAD_REQUEST, "invalid_config", str(exc))
        return _Reply.json(HTTPStatus.OK, self.config.as_dict())

    # -- metadata server -----------------------------------------------------------------

    def _metadata(self, request: _Request) -> _Reply:
        if request.headers.get(FLAVOR[0]) != FLAVOR[1]:
            return _Reply.text(HTTPStatus.FORBIDDEN, "Missing Metadata-Flavor:Google header.\n", (FLAVOR,))
        if request.path == "/":
            return _Reply.text(HTTPStatus.OK, "computeMetadata/\n", (FLAVOR,))
        rest = request.path.removeprefix(METADATA_PREFIX)
        if rest.startswith("instance/service-accounts/"):
            return self._metadata_account(request, rest.removeprefix("instance/service-accounts/"))
        if request.method != "GET":
            return _Reply.text(HTTPStatus.METHOD_NOT_ALLOWED, "Method not allowed\n", (FLAVOR,))
        value = _METADATA_VALUES.get(rest)
        if value is None or rest == request.path:
            return _Reply.text(HTTPStatus.NOT_FOUND, "Not Found\n", (FLAVOR,))
        return _Reply.text(HTTPStatus.OK, value, (FLAVOR,))

    def _metadata_account(self, request: _Request, rest: str) -> _Reply:
        """Serve instance/service-accounts/...; only the default account exists."""
        alias, _, leaf = rest.partition("/")
        if alias not in ("", "default", DEFAULT_ACCOUNT_EMAIL):
            return _Reply.text(HTTPStatus.NOT_FOUND, "Not Found\n", (FLAVOR,))
        if leaf == "token":
            return self._metadata_token(request)
        if request.method != "GET":
            return _Reply.text(HTTPStatus.METHOD_NOT_ALLOWED, "Method not allowed\n", (FLAVOR,))
        if not alias:
            listing = "" if leaf else f"default/\n{DEFAULT_ACCOUNT_EMAIL}/\n"
            return _Reply.text(HTTPStatus.OK if listing else HTTPStatus.NOT_FOUND, listing, (FLAVOR,))
        if leaf == "" and request.query.get("recursive") == "true":
            info = {"aliases": ["default"], "email": DEFAULT_ACCOUNT_EMAIL, "scopes": list(DEFAULT_SCOPES)}
            return _Reply.json(HTTPStatus.OK, info, (FLAVOR,))
        value = _account_leaf(leaf)
        if value is None:
            return _Reply.text(HTTPStatus.NOT_FOUND, "Not Found\n", (FLAVOR,))
        return _Reply.text(HTTPStatus.OK, value, (FLAVOR,))

    def _metadata_token(self, request: _Request) -> _Reply:
        scopes = [s for s in request.query.get("scopes", "").split(",") if s] or list(DEFAULT_SCOPES)
        grant = _Grant("metadata", DEFAULT_ACCOUNT_EMAIL, _DEFAULT_CLIENT_ID, " ".join(scopes))
        reply = self._serve_token(lambda: grant, include_scope=False)
        return _Reply(reply.status, reply.body, reply.content_type, (*reply.headers, FLAVOR))


def _account_leaf(leaf: str) -> str | None:
    """Plain-text values under instance/service-accounts/default/."""
    values = {
        "": "aliases\nemail\nidentity\nscopes\ntoken\n",
        "email": DEFAULT_ACCOUNT_EMAIL,
        "aliases": "default\n",
        "scopes": "".join(f"{scope}\n" for scope in DEFAULT_SCOPES),
    }
    return values.get(leaf)


# -- JWT verification --------------------------------------------------------------------


def _b64url_decode(segment: str) -> bytes:
    """Decode unpadded base64url strictly: lenient decoders skip junk and hide malformed JWTs."""
    if not _B64URL.fullmatch(segment):
        raise _GrantError("invalid_grant", "Invalid JWT: a segment is not base64url")
    try:
        return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    except (binascii.Error, ValueError) as exc:
        raise _GrantError("invalid_grant", "Invalid JWT: a segment is not base64url") from exc


def _json_segment(segment: str) -> dict[str, Any]:
    try:
        value = json.loads(_b64url_decode(segment))
    except (UnicodeDecodeError, ValueError) as exc:
        raise _GrantError("invalid_grant", "Invalid JWT: a segment is not JSON") from exc
    if not isinstance(value, dict):
        raise _GrantError("invalid_grant", "Invalid JWT: header and claims must be JSON objects")
    return value


def _decode_jwt(assertion: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    """Split a compact JWS into header, claims, signing input and signature (none verified yet)."""
    parts = assertion.split(".")
    if len(parts) != 3:
        raise _GrantError("invalid_grant", "Invalid JWT: expected three dot-separated segments")
    header, claims = _json_segment(parts[0]), _json_segment(parts[1])
    signing_input = f"{parts[0]}.{parts[1]}".encode("ascii")
    return header, claims, signing_input, _b64url_decode(parts[2])


def _verify_signature(keys: list[_Key], signing_input: bytes, signature: bytes) -> _Key:
    """Return the key whose RS256 signature matches; claims are only trusted after this."""
    if not keys:
        raise _GrantError("invalid_grant", "Invalid JWT Signature: unknown key id (kid)")
    for key in keys:
        try:
            key.public_key.verify(signature, signing_input, padding.PKCS1v15(), hashes.SHA256())
        except InvalidSignature:
            continue
        return key
    raise _GrantError("invalid_grant", "Invalid JWT Signature: signature does not match the key")


def _check_claims(claims: dict[str, Any], email: str, audiences: tuple[str, ...], now: float) -> str:
    """Check iss, aud, iat/exp and scope of a signed assertion; return the requested scope."""
    if claims.get("iss") != email:
        raise _GrantError("invalid_grant", f"Invalid JWT: iss must be the key's client_email {email}")
    if claims.get("aud") not in audiences:
        raise _GrantError("invalid_grant", f"Invalid JWT: wrong audience; expected {audiences[0]}")
    _check_times(claims.get("iat"), claims.get("exp"), now)
    scope = claims.get("scope")
    if not isinstance(scope, str) or not scope.strip():
        raise _GrantError("invalid_scope", "Invalid OAuth scope: the assertion has no scope claim")
    return scope


def _check_times(iat: Any, exp: Any, now: float) -> None:
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (iat, exp))
    if not numbers:
        raise _GrantError("invalid_grant", "Invalid JWT: iat and exp must be numeric")
    if exp + CLOCK_SKEW < now:
        raise _GrantError("invalid_grant", "Invalid JWT: assertion expired (exp is in the past)")
    if iat - CLOCK_SKEW > now:
        raise _GrantError("invalid_grant", "Invalid JWT: iat is in the future")
    if exp - iat > MAX_ASSERTION_LIFETIME:
        raise _GrantError("invalid_grant", "Invalid JWT: assertion lifetime exceeds 60 minutes")


def _parse_form(request: _Request) -> dict[str, str]:
    """Token requests are form-encoded; JSON bodies are accepted too, as Google does."""
    content_type = request.headers.get_content_type()
    text = request.body.decode("utf-8", errors="strict")
    if content_type == "application/json":
        data = json.loads(text or "{}")
        if not isinstance(data, dict):
            raise ValueError("JSON body must be an object")
        return {str(k): str(v) for k, v in data.items()}
    return {k: v[0] for k, v in parse_qs(text, keep_blank_values=True).items()}


def _numeric_id(digits: int = 21) -> str:
    return str(secrets.randbelow(9 * 10 ** (digits - 1)) + 10 ** (digits - 1))


# -- HTTP plumbing -----------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    # socketserver listens with a backlog of 5: a burst of concurrent fetches (each on a new
    # connection, HTTP/1.0) then sees connection resets and 1 s SYN retransmits, which Google's
    # endpoint does not cause.
    request_queue_size = 128
    app: _App

    def __init__(self, host: str, port: int, verbose: bool) -> None:
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.verbose = verbose
        super().__init__((host, port), _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind resolves the FQDN of the host, which can stall on broken DNS.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.socket.getsockname()[:2]


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "tokencache-emulator"
    sys_version = ""

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def _handle(self) -> None:
        try:
            request = self._read_request()
        except ValueError as exc:
            self._write(_Reply.error(HTTPStatus.BAD_REQUEST, "invalid_request", str(exc)))
            return
        try:
            reply = self.server.app.handle(request)
        except Exception as exc:  # a bug in the emulator must not look like a network failure
            traceback.print_exc(file=sys.stderr)
            reply = _Reply.error(HTTPStatus.INTERNAL_SERVER_ERROR, "server_error", type(exc).__name__)
        try:
            self._write(reply)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = (
                True  # the client gave up (a timeout, a killed worker): nothing to tell it
            )

    def _read_request(self) -> _Request:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 <= length <= MAX_BODY:
            raise ValueError("request body too large")
        body = self.rfile.read(length) if length else b""
        query = {k: v[0] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        return _Request(self.command, url.path, query, self.headers, body)

    def _write(self, reply: _Reply) -> None:
        self.send_response(reply.status)
        self.send_header("Content-Type", reply.content_type)
        self.send_header("Content-Length", str(len(reply.body)))
        for name, value in reply.headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(reply.body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # Log the path without its query: /tokeninfo?access_token=... would leak the token.
        code = int(code) if isinstance(code, int) else code
        self.log_message('"%s %s" %s', self.command, urlsplit(self.path).path, code)

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)


# -- public API --------------------------------------------------------------------------


class Emulator:
    """Google's token endpoint and metadata server on a local port, for offline tests.

    The socket is bound at construction, so url and token_uri (and key files naming them)
    are available before start(). An Emulator serves once: after stop() it cannot restart.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        config: EmulatorConfig | None = None,
        *,
        verbose: bool = False,
        clock: Callable[[], float] = time.time,
        public_url: str | None = None,
    ) -> None:
        self._host = host
        self._public_url = public_url.rstrip("/") if public_url else None
        self._server = _Server(host, port, verbose)
        self._app = _App(config or EmulatorConfig(), self.url + "/token", clock)
        self._server.app = self._app
        self._thread: threading.Thread | None = None
        self._serving = False
        self._closed = False

    @property
    def url(self) -> str:
        """Where clients reach us: ``public_url`` (as in compose) or the bound address."""
        return self._public_url or f"http://{self.metadata_host}"

    @property
    def token_uri(self) -> str:
        return self.url + "/token"

    @property
    def metadata_host(self) -> str:
        """host:port, the value for GCE_METADATA_HOST and GCE_METADATA_IP."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self._host, self._host)
        host = f"[{host}]" if ":" in host else host
        return f"{host}:{self._server.server_address[1]}"

    @property
    def config(self) -> EmulatorConfig:
        return self._app.config

    @config.setter
    def config(self, value: EmulatorConfig) -> None:
        self._app.config = value

    def start(self) -> Emulator:
        """Serve in a daemon thread; calling it again while serving is a no-op."""
        if self._closed:
            raise RuntimeError("this Emulator was stopped; create a new one")
        if not self._serving:
            self._serving = True
            self._thread = threading.Thread(
                target=self._server.serve_forever,
                kwargs={"poll_interval": 0.1},
                daemon=True,
                name=f"tokencache-emulator-{self._server.server_address[1]}",
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket; safe to call twice or without start()."""
        if self._closed:
            return
        self._closed = True
        if self._serving:
            self._server.shutdown()
        if self._thread is not None:
            self._thread.join()
        self._server.server_close()

    def serve_forever(self) -> None:
        """Serve on the calling thread until stop() is called from another thread."""
        if self._serving or self._closed:
            raise RuntimeError("this Emulator is already serving or was stopped")
        self._serving = True
        try:
            self._server.serve_forever(poll_interval=0.1)
        finally:
            self._serving = False

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def create_service_account(self, email: str | None = None) -> dict[str, str]:
        """A new RSA key in Google's service-account key-file format, honoured by /token."""
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        key = self._app.registry.add_key(
            email or self._app.registry.next_account_email(), private_key.public_key()
        )
        pem = private_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode("ascii")
        account = key.account
        return {
            "type": "service_account",
            "project_id": PROJECT_ID,
            "private_key_id": key.kid,
            "private_key": pem,
            "client_email": account.email,
            "client_id": account.client_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{quote(account.email)}",
            "universe_domain": "googleapis.com",
        }

    def write_service_account(self, path: str | os.PathLike[str], email: str | None = None) -> dict[str, str]:
        info = self.create_service_account(email)
        _write_secret_json(Path(path), info)
        return info

    def create_authorized_user(self) -> dict[str, str]:
        """gcloud-style application_default_credentials.json contents.

        google-auth's from_authorized_user_info ignores token_uri (it always uses Google's), so
        point the credentials here with .with_token_uri(info["token_uri"]).
        """
        refresh_token, user = self._app.registry.add_user()
        return {
            "account": user.email,
            "client_id": user.client_id,
            "client_secret": user.client_secret,
            "refresh_token": refresh_token,
            "token_uri": self.token_uri,
            "type": "authorized_user",
            "universe_domain": "googleapis.com",
        }

    def write_authorized_user(self, path: str | os.PathLike[str]) -> dict[str, str]:
        info = self.create_authorized_user()
        _write_secret_json(Path(path), info)
        return info

    def stats(self) -> dict[str, Any]:
        """Counters as GET /stats returns them; by_grant and by_account count issued tokens."""
        return self._app.ledger.stats()

    def reset_stats(self) -> None:
        self._app.ledger.reset()

    def validate(self, access_token: str) -> dict[str, Any] | None:
        """The tokeninfo of a live token this emulator issued, or None."""
        return self._app.tokeninfo(access_token)


def _write_secret_json(path: Path, payload: Mapping[str, str]) -> None:
    """Write key material readable by the owner only, even when the file already existed."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        os.fchmod(handle.fileno(), 0o600)
        json.dump(payload, handle, indent=2)
        handle.write("\n")


def _write_key_files(emulator: Emulator, keys_dir: str | None, accounts: int) -> Iterator[str]:
    """Write sa-N.json and authorized_user.json; yield one printable line per file."""
    if keys_dir is None:
        return
    directory = Path(keys_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for n in range(1, accounts + 1):
        info = emulator.write_service_account(directory / f"sa-{n}.json")
        yield f"wrote {directory / f'sa-{n}.json'} ({info['client_email']})"
    emulator.write_authorized_user(directory / "authorized_user.json")
    yield f"wrote {directory / 'authorized_user.json'} (authorized_user)"


@contextmanager
def _until_signalled() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM, with the previous handlers restored afterwards."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals can only be caught on the main thread; the caller must set stop
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_emulator(
    host: str,
    port: int,
    keys_dir: str | None,
    accounts: int,
    lifetime: int,
    latency: float,
    failure_rate: float,
    *,
    verbose: bool = False,
    public_url: str | None = None,
) -> None:
    """Serve the emulator for the CLI until SIGINT/SIGTERM, after writing key files."""
    config = EmulatorConfig(lifetime=lifetime, latency=latency, failure_rate=failure_rate)
    emulator = Emulator(host, port, config, verbose=verbose, public_url=public_url)
    with _until_signalled() as stop, emulator:
        for line in _write_key_files(emulator, keys_dir, accounts):
            print(line)
        print(f"emulator listening on {emulator.url}", flush=True)
        while not stop.wait(0.5):
            pass
