"""HTTP plumbing: a threaded stdlib server that turns each request into a ``_Request`` for the app.

Kept apart from the behaviour so that what is HTTP-specific stays small and visible: a deeper
listen backlog for bursts of fetches, no reverse DNS at bind, a size limit on bodies, and an
access log that never shows a query string (``/tokeninfo?access_token=`` would leak a token).
"""

from __future__ import annotations

import socket
import socketserver
import sys
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .app import _App
from .messages import _Reply, _Request

MAX_BODY = 1 << 20  # token requests are tiny; refuse anything that is not


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
