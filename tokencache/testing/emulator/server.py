"""``Emulator``: the public face of the emulator, Google's token endpoint on a local port.

It binds its socket at construction (so key files can name its ``token_uri`` before it
serves), serves from a daemon thread or the calling one, and issues service-account key files
and authorized-user credentials that google-auth accepts unchanged. Key material is written
readable by the owner only.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from .app import _App
from .config import EmulatorConfig
from .constants import PROJECT_ID
from .httpd import _Server

__all__ = ["Emulator"]


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
