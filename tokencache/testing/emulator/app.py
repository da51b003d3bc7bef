"""The emulator's behaviour: token grants, tokeninfo, /stats and /config, the metadata server.

One ``_App`` routes a ``_Request`` to its handler and returns a ``_Reply``; it knows nothing of
sockets (see :mod:`.httpd`), so each endpoint reads as what Google answers, and the shared
``_serve_token`` is the one place that counts, delays and fails token requests on demand.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Callable
from dataclasses import replace
from http import HTTPStatus
from typing import Any

from .config import EmulatorConfig
from .constants import DEFAULT_ACCOUNT_EMAIL, DEFAULT_SCOPES, JWT_BEARER, PROJECT_ID
from .jwt import _check_claims, _decode_jwt, _verify_signature
from .messages import NO_STORE, _GrantError, _parse_form, _Reply, _Request
from .registry import _Grant, _Ledger, _Registry

# google-auth signs service-account assertions with Google's real endpoint as `aud`, whatever
# token_uri the key file names, so that audience must be accepted next to our own token_uri.
GOOGLE_TOKEN_URIS = ("https://oauth2.googleapis.com/token", "https://www.googleapis.com/oauth2/v4/token")
METADATA_PREFIX = "/computeMetadata/v1/"
FLAVOR = ("Metadata-Flavor", "Google")
_DEFAULT_CLIENT_ID = "100000000000000000001"  # of the metadata server's default account
# Plain-text metadata values, by path under /computeMetadata/v1/.
_METADATA_VALUES = {
    "": "instance/\noauth2/\nproject/\nuniverse/\n",
    "project/project-id": PROJECT_ID,
    "project/numeric-project-id": "100000000001",
    "universe/universe-domain": "googleapis.com",
    "instance/zone": "projects/100000000001/zones/us-central1-a",
}


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
            return self._injected_failure()
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

    def _injected_failure(self) -> _Reply:
        """The configured failure: Google's 500, or its rate-limited answers (429, or 403 "Rate Limit
        Exceeded", which the token endpoint may send instead), with Retry-After if configured."""
        status = self.config.failure_status
        if status in (HTTPStatus.TOO_MANY_REQUESTS, HTTPStatus.FORBIDDEN):
            reply = _Reply.error(status, "rate_limit_exceeded", "Rate Limit Exceeded")
        else:
            reply = _Reply.error(status, "internal_failure", "injected failure")
        if self.config.retry_after:
            return replace(reply, headers=(*reply.headers, ("Retry-After", str(self.config.retry_after))))
        return reply

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
