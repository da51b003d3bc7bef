"""An app of the fleet: an HTTP endpoint that calls a Google-style API with the shared token.

    TOKENCACHE_REDIS_URL=redis://localhost:6379/0 APP_API_URL=http://localhost:8089/tokeninfo \
        python -m examples.app

It holds no Google credentials. Each ``GET /`` reads the fleet's token from
Redis with ``tokencache.for_scope`` (one round trip on a hit; on a miss the
refresh workers fetch it once for the whole fleet), calls the API with it and
answers JSON: the token masked, and what the API said. Neither the answer nor
the log ever holds the token unmasked. ``GET /healthz`` answers without
touching Redis or the API. SIGTERM stops it cleanly.

Environment: ``TOKENCACHE_REDIS_URL`` and the other ``TOKENCACHE_*`` variables
of the store, and the app's own:

    APP_HOST, APP_PORT   where to listen (0.0.0.0, 8080)
    APP_API_URL          the API to call (docker-compose: the emulator's /tokeninfo)
    APP_SCOPE            the token's scope (cloud-platform)
    APP_ACCOUNT          the token's account (unset: the workers' default account)
    APP_TIMEOUT          seconds to wait for a token on a cold cache (10)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import requests

import tokencache

log = logging.getLogger("examples.app")

CLOUD_PLATFORM = "https://www.googleapis.com/auth/cloud-platform"
API_TIMEOUT = 5.0  # seconds; a hung API must not hold a request thread forever


@dataclass(frozen=True)
class Settings:
    """The app's own configuration, read from ``APP_*``."""

    host: str = "0.0.0.0"
    port: int = 8080
    api_url: str = "http://localhost:8089/tokeninfo"
    scope: str = CLOUD_PLATFORM
    account: str | None = None
    timeout: float = 10.0

    @classmethod
    def from_env(cls) -> Settings:
        e = os.environ
        return cls(
            host=e.get("APP_HOST") or cls.host,
            port=int(e.get("APP_PORT") or cls.port),
            api_url=e.get("APP_API_URL") or cls.api_url,
            scope=e.get("APP_SCOPE") or cls.scope,
            account=e.get("APP_ACCOUNT") or None,
            timeout=float(e.get("APP_TIMEOUT") or cls.timeout),
        )


def redact(text: str, secret: str) -> str:
    """``text`` with every occurrence of ``secret`` masked (an API may echo the token back)."""
    return text.replace(secret, tokencache.mask(secret)) if secret else text


def call_api(url: str, access_token: str) -> tuple[int, Any]:
    """POST to the API with the token; its status and JSON (or text) answer."""
    # Google APIs read the Authorization header; tokeninfo reads the form body. Neither puts the
    # token in the URL, where proxies and access logs would keep it.
    response = requests.post(
        url,
        data={"access_token": access_token},
        headers={"Authorization": f"Bearer {access_token}"},
        timeout=API_TIMEOUT,
    )
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text[:500]


class App(ThreadingHTTPServer):
    """The HTTP server; one thread per request, all sharing tokencache's default store."""

    daemon_threads = True

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        super().__init__((settings.host, settings.port), Handler)

    def answer(self) -> tuple[int, dict[str, Any], str]:
        """Status, JSON body and the raw token (empty if none) of one ``GET /``."""
        s = self.settings
        try:
            token = tokencache.for_scope((s.account, s.scope), timeout=s.timeout)
        except tokencache.TokenCacheError as e:
            log.warning("no token for %s: %s", s.scope, e)
            return HTTPStatus.SERVICE_UNAVAILABLE, {"error": f"{type(e).__name__}: {e}"}, ""
        body: dict[str, Any] = {
            "token": tokencache.mask(token.token),
            "account": token.account or "default",
            "scope": token.scope,
            "expires": token.expires,
        }
        try:
            status, answer = call_api(s.api_url, token.token)
        except requests.RequestException as e:
            body["error"] = f"{s.api_url} unreachable: {type(e).__name__}"
            return HTTPStatus.BAD_GATEWAY, body, token.token
        body["api"] = {"url": s.api_url, "status": status, "answer": answer}
        return (HTTPStatus.OK if status < 400 else HTTPStatus.BAD_GATEWAY), body, token.token


class Handler(BaseHTTPRequestHandler):
    server: App
    server_version = "tokencache-example"
    sys_version = ""
    masked = "-"

    def do_GET(self) -> None:
        path = urlsplit(self.path).path
        if path == "/healthz":
            self._send(HTTPStatus.OK, {"ok": True})
        elif path == "/":
            status, body, token = self.server.answer()
            self.masked = tokencache.mask(token) if token else "-"
            self._send(status, body, secret=token)
        else:
            self._send(HTTPStatus.NOT_FOUND, {"error": f"no route {path}"})

    def _send(self, status: int, body: dict[str, Any], secret: str = "") -> None:
        data = redact(json.dumps(body), secret).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # The path without its query: a client could put a token in it.
        log.info('"%s %s" %s token=%s', self.command, urlsplit(self.path).path, code, self.masked)

    def log_message(self, format: str, *args: Any) -> None:
        log.warning("%s", format % args)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    settings = Settings.from_env()
    app = App(settings)
    # shutdown() waits for serve_forever() to return, so it cannot run on serve_forever's thread.
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=app.shutdown).start())
    host, port = app.server_address[:2]
    log.info("listening on http://%s:%s/, calling %s", host, port, settings.api_url)
    try:
        app.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        app.server_close()


if __name__ == "__main__":
    main()
