"""examples/app.py as a real process with no credentials, served by real `tokencache worker` processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from tokencache import TokenStore, mask
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import free_port

from .conftest import SCOPE, Workers, app_env, wait_for

ROOT = Path(__file__).resolve().parent.parent
CREDENTIALS = (
    "GOOGLE_APPLICATION_CREDENTIALS",
    "TOKENCACHE_CREDENTIALS",
    "GCE_METADATA_HOST",
    "GCE_METADATA_IP",
)


class ExampleApp:
    """``python -m examples.app`` on a free port; its log (stdout and stderr) goes to a file."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        assert not set(CREDENTIALS) & set(env), "the example app must run without credentials"
        self.url = f"http://127.0.0.1:{env['APP_PORT']}/"
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "examples.app"], cwd=ROOT, env=env, stdout=out, stderr=out
            )
        wait_for(self.healthy, 15, what="the example app to listen")

    def healthy(self) -> bool:
        assert self.proc.poll() is None, f"the example app exited:\n{self.log.read_text()}"
        try:
            return requests.get(self.url + "healthz", timeout=1).status_code == 200
        except requests.ConnectionError:
            return False

    def get(self) -> requests.Response:
        return requests.get(self.url, timeout=20)

    def stop(self) -> str:
        """SIGTERM, which the app must honour (docker compose stop sends it); its whole log."""
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(10) == 0
        return self.log.read_text()


@pytest.fixture
def start_app(
    redis_url: str, store: TokenStore, emulator: Emulator, tmp_path: Path
) -> Iterator[Callable[..., ExampleApp]]:
    apps: list[ExampleApp] = []

    def start(timeout: float = 15) -> ExampleApp:
        env = app_env(redis_url, tmp_path, credentials=None)
        env.update(
            TOKENCACHE_NAMESPACE=store.keys.namespace,
            TOKENCACHE_QUEUE=store.refresh_queue.name,
            APP_HOST="127.0.0.1",
            APP_PORT=str(free_port()),
            APP_API_URL=emulator.url + "/tokeninfo",
            APP_TIMEOUT=str(timeout),
        )
        apps.append(ExampleApp(env, tmp_path / f"app-{len(apps)}.log"))
        return apps[-1]

    yield start
    for app in apps:
        if app.proc.poll() is None:
            os.kill(app.proc.pid, signal.SIGKILL)
            app.proc.wait(5)


def test_the_app_calls_the_api_with_the_fleet_token_fetched_once(
    start_app: Callable[..., ExampleApp],
    workers: Workers,
    store: TokenStore,
    emulator: Emulator,
    credentials_env: dict[str, str],
) -> None:
    workers.start(1)
    app = start_app()
    with ThreadPoolExecutor(4) as pool:  # a cold cache, hit by concurrent requests
        responses = list(pool.map(lambda _: app.get(), range(4)))
    responses += [app.get() for _ in range(3)]

    assert [r.status_code for r in responses] == [200] * 7, [r.text for r in responses]
    token = store.find(SCOPE)
    assert token is not None
    for body in (r.json() for r in responses):
        assert body["token"] == mask(token.token) and body["scope"] == SCOPE
        assert body["api"]["status"] == 200
        assert body["api"]["answer"]["email"] == credentials_env["default"]
    assert emulator.stats()["token_requests"] == 1

    log = app.stop()
    assert mask(token.token) in log  # one line per request, so the check below has teeth
    for text in [log, *(r.text for r in responses)]:
        assert token.token not in text
        assert token.token[7:-3] not in text


def test_without_workers_the_app_answers_503_and_fetches_nothing_itself(
    start_app: Callable[..., ExampleApp], emulator: Emulator
) -> None:
    app = start_app(timeout=1)
    response = app.get()
    assert response.status_code == 503
    assert response.json()["error"].startswith("FetchTimeoutError")
    assert emulator.stats()["token_requests"] == 0, "an app without credentials must not fetch"
    assert app.get().status_code == 503
    assert "Traceback" not in app.stop()
