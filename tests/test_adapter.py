"""The google-auth adapter and BearerAuth against a local API that checks tokens with the emulator."""

from __future__ import annotations

import datetime
import json
import pickle
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import google.auth.credentials as ga
import google.auth.exceptions
import pytest
import requests
from google.auth.transport.requests import AuthorizedSession, Request
from google.cloud import storage
from google.oauth2 import service_account
from redis import Redis

from tokencache import (
    FetchTimeoutError,
    RedisUnavailableError,
    Token,
    TokenStore,
    reset_default_store,
)
from tokencache import RefreshError as CacheRefreshError
from tokencache.adapters.google_auth import Credentials
from tokencache.adapters.requests_auth import BearerAuth
from tokencache.constants import RECHECK
from tokencache.core.sources import Sources
from tokencache.testing.emulator import Emulator

from .conftest import SCOPE, Workers, app_env, run_apps, wait_for

OTHER = "https://www.googleapis.com/auth/devstorage.read_only"
USER = "user@example.com"
NAMED = "named@tokencache-emulator.iam.gserviceaccount.com"


# -- a tiny API that accepts only tokens the emulator issued --------------------------------


class _ApiHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, so a thousand requests are quick
    disable_nagle_algorithm = True  # headers and body are two writes: no 40 ms delayed-ACK stall
    server: _ApiServer

    def do_GET(self) -> None:
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        scheme, _, token = self.headers.get("Authorization", "").partition(" ")
        info = self.server.emulator.validate(token) if scheme == "Bearer" and token else None
        body = json.dumps(info or {"error": "invalid_token"}).encode()
        self.send_response(200 if info else 401)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


class _ApiServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator: Emulator) -> None:
        self.emulator = emulator
        self.seen: list[tuple[str, dict[str, str]]] = []  # (path, lower-cased headers) of each request
        super().__init__(("127.0.0.1", 0), _ApiHandler)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.base}/v1/thing"


@pytest.fixture
def api_server(emulator: Emulator) -> Iterator[_ApiServer]:
    server = _ApiServer(emulator)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    thread.join()
    server.server_close()


@pytest.fixture
def api(api_server: _ApiServer) -> str:
    return api_server.url


# -- helpers ---------------------------------------------------------------------------------


def app_store(store: TokenStore, clock: Callable[[], float] = time.time) -> TokenStore:
    """A store like an app server's: same Redis and namespace, no credentials of its own."""
    return TokenStore(
        store.redis,
        namespace=store.keys.namespace,
        refresh_before=store.refresh_before,
        queue=store.refresh_queue.name,
        clock=clock,
        sources=Sources(use_adc=False),
    )


def issue(emulator: Emulator, scope: str = SCOPE, subject: str | None = None) -> str:
    """A real access token from the emulator (so the API accepts it); the stats are reset after."""
    creds = service_account.Credentials.from_service_account_info(
        emulator.create_service_account(), scopes=scope.split(), subject=subject
    )
    with requests.Session() as session:
        creds.refresh(Request(session))
    emulator.reset_stats()
    return str(creds.token)


def cached(emulator: Emulator, left: int, scope: str = SCOPE, sub: str | None = None) -> Token:
    """A real emulator token, cached as if it had ``left`` seconds to live."""
    access_token = issue(emulator, scope, sub)
    return Token(token=access_token, scope=scope, expires=int(time.time()) + left, sub=sub)


def count_reads(monkeypatch: pytest.MonkeyPatch, store: TokenStore) -> Counter[str]:
    """Count the store's for_scope calls (what the adapter does on each refresh)."""
    reads = Counter[str]()
    real = store.for_scope

    def counting(*args: Any, **kwargs: Any) -> Token:
        reads["for_scope"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(store, "for_scope", counting)
    return reads


def redis_commands(redis: Redis) -> dict[str, int]:
    """Commands the server ran since the last CONFIG RESETSTAT, minus the bookkeeping ones."""
    stats = redis.info("commandstats")
    return {
        name.removeprefix("cmdstat_"): value["calls"]
        for name, value in stats.items()
        if not name.startswith(("cmdstat_info", "cmdstat_config"))
    }


def naive_utc(expires: int) -> datetime.datetime:
    return datetime.datetime.fromtimestamp(expires, datetime.UTC).replace(tzinfo=None)


# -- AuthorizedSession -------------------------------------------------------------------------


def test_authorized_session_reaches_the_api_with_one_fetch(
    store: TokenStore, emulator: Emulator, credentials_env: dict[str, str], api: str
) -> None:
    creds = Credentials([SCOPE], store=store)
    with AuthorizedSession(creds) as session:
        replies = [session.get(api, timeout=5) for _ in range(20)]
    assert [r.status_code for r in replies] == [200] * 20
    assert replies[0].json()["scope"] == SCOPE
    assert emulator.stats()["token_requests"] == 1
    cached_token = store.find(SCOPE)
    assert cached_token is not None and creds.token == cached_token.token
    assert creds.expiry == naive_utc(cached_token.expires) and creds.expiry.tzinfo is None
    assert creds.valid and creds.token_state is ga.TokenState.FRESH


def test_a_fresh_cached_token_means_no_google_request(
    store: TokenStore, emulator: Emulator, credentials_env: dict[str, str], api: str
) -> None:
    token = cached(emulator, 600)
    store.store(token)
    with AuthorizedSession(
        Credentials(SCOPE, store=store)
    ) as session:  # this store could fetch, and must not
        assert {session.get(api, timeout=5).status_code for _ in range(10)} == {200}
    assert emulator.stats()["token_requests"] == 0


def run_children(
    store: TokenStore, redis_url: str, api: str, env: dict[str, str], n: int, each: int
) -> list[Any]:
    """n app processes, released at one instant, each making ``each`` requests through the adapter."""
    ns, queue = store.keys.namespace, store.refresh_queue.name
    commands = [
        [sys.executable, "-m", "tests.adapter_child", redis_url, ns, queue, str(i), api, str(each)]
        for i in range(n)
    ]
    return run_apps(store, commands, env, 60)


@pytest.mark.exclusive
@pytest.mark.parametrize("fetcher", ["workers", "an app with credentials"])
def test_a_thousand_requests_from_four_processes_make_one_token_request(
    request: pytest.FixtureRequest,
    fetcher: str,
    store: TokenStore,
    redis_url: str,
    emulator: Emulator,
    api: str,
    tmp_path: Path,
) -> None:
    if fetcher == "workers":
        workers: Workers = request.getfixturevalue("workers")
        workers.start(1)
        key_file = None
    else:
        key_file = str(tmp_path / "app-key.json")
        emulator.write_service_account(key_file)
    emulator.config.latency = 0.3  # so all four really miss together
    results = run_children(store, redis_url, api, app_env(redis_url, tmp_path, credentials=key_file), 4, 250)
    assert all("token" in r and r["statuses"] == {"200": 250} for r in results), results
    assert len({r["token"] for r in results}) == 1
    assert [r["reads"] for r in results] == [1, 1, 1, 1]  # one cache read per process, not per request
    assert emulator.stats()["token_requests"] == 1


# -- what the adapter reports and reads -----------------------------------------------------------


def test_expiry_matches_the_cached_token(store: TokenStore, emulator: Emulator) -> None:
    token = Token(token="ya29.cached-token-value", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(token)
    creds = Credentials([SCOPE], store=app_store(store))
    assert not creds.valid and creds.token_state is ga.TokenState.INVALID
    creds.refresh(None)
    assert creds.token == token.token
    assert creds.expiry == naive_utc(token.expires)
    assert emulator.stats()["token_requests"] == 0


def test_copies_read_their_own_cache_keys(store: TokenStore, emulator: Emulator) -> None:
    expires = int(time.time()) + 600
    tokens = {
        "base": Token(token="ya29.base-token-000", scope=SCOPE, expires=expires),
        "scopes": Token(token="ya29.other-scope-00", scope=OTHER, expires=expires),
        "subject": Token(token="ya29.subject-token0", scope=SCOPE, expires=expires, sub=USER),
        "account": Token(token="ya29.named-account0", scope=SCOPE, expires=expires, account=NAMED),
    }
    for token in tokens.values():
        store.store(token)
    base = Credentials([SCOPE], store=app_store(store))
    copies = {
        "base": base,
        "scopes": base.with_scopes([OTHER]),
        "subject": base.with_subject(USER),
        "account": base.with_account(NAMED),
    }
    for name, creds in copies.items():
        creds.refresh(None)
        assert creds.token == tokens[name].token, name
    assert base.scopes == [SCOPE] and base.subject is None and base.account is None
    assert copies["scopes"].scopes == [OTHER] and copies["subject"].subject == USER
    assert copies["account"].account == NAMED
    assert emulator.stats()["token_requests"] == 0


def test_scopes_as_client_libraries_set_them(store: TokenStore) -> None:
    expires = int(time.time()) + 600
    store.store(Token(token="ya29.other-scope-00", scope=OTHER, expires=expires))
    app = app_store(store)
    bare = Credentials(None, store=app)
    assert bare.requires_scopes and bare.scopes is None
    scoped = ga.with_scopes_if_required(bare, None, default_scopes=[OTHER])
    assert isinstance(scoped, Credentials) and scoped is not bare
    assert scoped.default_scopes == [OTHER] and scoped.has_scopes([OTHER])
    scoped.refresh(None)
    assert scoped.token == "ya29.other-scope-00"
    fixed = Credentials(f"{SCOPE} {OTHER}", store=app)
    assert not fixed.requires_scopes and fixed.scopes == [SCOPE, OTHER]
    assert ga.with_scopes_if_required(fixed, [OTHER], default_scopes=[OTHER]) is fixed


def test_inside_google_auths_threshold_but_fresh_for_us_reads_once(
    store: TokenStore, emulator: Emulator, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.store(cached(emulator, 60))  # google-auth would call refresh() before every request
    app = app_store(store)
    reads = count_reads(monkeypatch, app)
    creds = Credentials([SCOPE], store=app)
    with AuthorizedSession(creds) as session:
        assert session.get(api, timeout=5).status_code == 200
        assert ga.Credentials.expired.fget(creds)  # type: ignore[attr-defined]  # google-auth's own view
        store.redis.config_resetstat()
        assert {session.get(api, timeout=5).status_code for _ in range(50)} == {200}
        assert redis_commands(store.redis) == {}
    assert reads["for_scope"] == 1
    assert not creds.expired and creds.token_state is ga.TokenState.FRESH
    assert emulator.stats()["token_requests"] == 0


def test_a_rejected_token_is_reported_not_reread(
    store: TokenStore, emulator: Emulator, api: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """google-auth's refresh after a 401 evicts the token for the fleet and waits for the workers'
    new one (tests/test_rejected_token.py has them); with none running, the wait times out."""
    store.store(Token(token="ya29.revoked-token-value", scope=SCOPE, expires=int(time.time()) + 600))
    app = app_store(store)
    reads = count_reads(monkeypatch, app)
    creds = Credentials([SCOPE], store=app, timeout=0.5)
    with (
        AuthorizedSession(creds) as session,
        pytest.raises(google.auth.exceptions.RefreshError, match="tokencache worker") as info,
    ):
        session.get(api, timeout=5)
    assert info.value.retryable and reads["for_scope"] == 2  # the first read, then the wait
    assert store.find(SCOPE) is None and store.redis.llen(store.refresh_queue.queue.key) == 1
    assert emulator.stats()["token_requests"] == 0


def test_inside_our_margin_rereads_at_most_once_per_recheck(store: TokenStore) -> None:
    start = time.time()
    now = [start]
    app = app_store(store, clock=lambda: now[0])
    app.store(Token(token="ya29.first-token-00", scope=SCOPE, expires=int(start) + 300))
    creds = Credentials([SCOPE], store=app)
    creds.refresh(None)
    expires = int(start) + 300
    now[0] = expires - 11
    assert not creds.expired and creds.token_state is ga.TokenState.FRESH
    now[0] = expires - 10  # the workers' refresh is due: worth a look
    assert creds.expired and creds.token_state is ga.TokenState.STALE and creds.token is not None
    creds.refresh(None)  # still the old token (no worker ran)
    assert creds.token == "ya29.first-token-00"
    now[0] += RECHECK / 2
    assert not creds.expired  # no re-read on every request while we wait for the new token
    now[0] += RECHECK / 2
    assert creds.expired
    app.store(Token(token="ya29.second-token0", scope=SCOPE, expires=int(start) + 900))
    creds.refresh(None)
    assert creds.token == "ya29.second-token0" and creds.expiry == naive_utc(int(start) + 900)
    assert not creds.expired
    now[0] = start + 900 - 1  # the store stops handing it out: unusable
    assert creds.expired and creds.token_state is ga.TokenState.INVALID


# -- what client libraries ask of credentials --------------------------------------------------

BILLING = "billing-project"


def test_a_storage_client_bills_the_quota_project(
    store: TokenStore, emulator: Emulator, api_server: _ApiServer
) -> None:
    """google-cloud-storage turns client_options' quota project into with_quota_project() and sends it."""
    token = cached(emulator, 600)
    store.store(token)
    creds = Credentials([SCOPE], store=app_store(store))
    client = storage.Client(
        credentials=creds,
        project="p",
        client_options={"quota_project_id": BILLING, "api_endpoint": api_server.base},
    )
    try:
        client.get_bucket("quota-test")
    finally:
        client.close()
    ((path, headers),) = api_server.seen
    assert path.startswith("/storage/v1/b/quota-test")
    assert headers["authorization"] == f"Bearer {token.token}"
    assert headers["x-goog-user-project"] == BILLING
    assert creds.quota_project_id is None  # the client billed a copy; the caller's credentials are unchanged
    assert emulator.stats()["token_requests"] == 0


def test_the_quota_project_survives_every_copy(
    store: TokenStore, emulator: Emulator, api_server: _ApiServer
) -> None:
    """Each copy reads its own token and still bills the quota project; BearerAuth sends no quota header."""
    tokens = {
        "scopes": cached(emulator, 600, scope=OTHER),
        "subject": cached(emulator, 600, sub=USER),
        "account": Token(token=issue(emulator), scope=SCOPE, expires=int(time.time()) + 600, account=NAMED),
    }
    for token in tokens.values():
        store.store(token)
    billed = Credentials([SCOPE], store=app_store(store)).with_quota_project(BILLING)
    copies = {
        "scopes": billed.with_scopes([OTHER]),
        "subject": billed.with_subject(USER),
        "account": billed.with_account(NAMED),
    }
    for name, creds in copies.items():
        assert creds.quota_project_id == BILLING, name
        with AuthorizedSession(creds) as session:
            assert session.get(api_server.url, timeout=5).status_code == 200, name
        headers = api_server.seen[-1][1]
        assert headers["authorization"] == f"Bearer {tokens[name].token}", name
        assert headers["x-goog-user-project"] == BILLING, name
    auth = BearerAuth(SCOPE, NAMED, store=app_store(store))
    assert requests.get(api_server.url, auth=auth, timeout=5).status_code == 200
    assert "x-goog-user-project" not in api_server.seen[-1][1]
    assert emulator.stats()["token_requests"] == 0


def test_quota_project_id_and_the_rest_client_libraries_read(
    store: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = Credentials([SCOPE], NAMED, store=store, quota_project_id=BILLING, project_id="p")
    assert isinstance(creds, ga.CredentialsWithQuotaProject) and creds.universe_domain == "googleapis.com"
    headers: dict[str, str] = {}
    creds.apply(headers, token="ya29.some-token-value")
    assert headers == {"authorization": "Bearer ya29.some-token-value", "x-goog-user-project": BILLING}
    assert creds.with_quota_project(None).quota_project_id is None and creds.quota_project_id == BILLING
    monkeypatch.setenv("GOOGLE_CLOUD_QUOTA_PROJECT", "from-env")
    assert creds.with_quota_project_from_environment().quota_project_id == "from-env"
    clone = pickle.loads(pickle.dumps(Credentials([SCOPE], quota_project_id=BILLING)))  # the default store
    assert clone.with_subject(USER).quota_project_id == BILLING
    assert BILLING in repr(creds)
    assert creds.get_cred_info()["principal"] == NAMED
    client = storage.Client(credentials=creds)  # no project passed: the credentials' own, not ADC
    assert client.project == "p" and client._credentials.quota_project_id == BILLING
    client.close()


# -- errors ------------------------------------------------------------------------------------


def test_no_token_in_time_is_a_google_refresh_error(store: TokenStore, api: str) -> None:
    creds = Credentials([SCOPE], store=app_store(store), timeout=0.5)
    with AuthorizedSession(creds) as session, pytest.raises(google.auth.exceptions.RefreshError) as info:
        session.get(api, timeout=5)
    assert isinstance(info.value.__cause__, FetchTimeoutError)
    assert "tokencache worker" in str(info.value) and info.value.retryable


def test_a_failed_fetch_is_a_google_refresh_error(
    store: TokenStore, emulator: Emulator, credentials_env: dict[str, str]
) -> None:
    emulator.config.fail_next = 1
    creds = Credentials([SCOPE], store=store, timeout=5)
    with pytest.raises(google.auth.exceptions.RefreshError, match="500") as info:
        creds.refresh(None)
    assert isinstance(info.value.__cause__, CacheRefreshError) and not info.value.retryable
    error_key = store.keys.error(store.key_for_info(SCOPE))
    wait_for(lambda: not store.redis.exists(error_key), 5, what="the failure forgotten (ERROR_TTL)")
    creds.refresh(None)
    assert creds.valid


def test_unreachable_redis_is_a_google_refresh_error() -> None:
    down = TokenStore.from_url("redis://127.0.0.1:1/0", sources=Sources(use_adc=False))
    try:
        with pytest.raises(google.auth.exceptions.RefreshError, match="cannot reach Redis") as info:
            Credentials([SCOPE], store=down).refresh(None)
        assert isinstance(info.value.__cause__, RedisUnavailableError)
    finally:
        down.redis.close()


def test_no_scopes_is_a_google_refresh_error(store: TokenStore) -> None:
    with pytest.raises(google.auth.exceptions.RefreshError, match="no scopes"):
        Credentials([], store=store).refresh(None)


@pytest.mark.parametrize(
    ("kwargs", "error", "name"),
    [
        ({"scopes": 5}, TypeError, "scopes"),
        ({"scopes": b"scope"}, TypeError, "scopes"),
        ({"scopes": [SCOPE, 5]}, TypeError, "scopes"),
        ({"scopes": [SCOPE, " "]}, ValueError, "scopes"),
        ({"scopes": [SCOPE], "account": 5}, TypeError, "account"),
        ({"scopes": [SCOPE], "account": ""}, ValueError, "account"),
        ({"scopes": [SCOPE], "subject": 5}, TypeError, "subject"),
        ({"scopes": [SCOPE], "subject": " "}, ValueError, "subject"),
        ({"scopes": [SCOPE], "store": "redis://localhost"}, TypeError, "store"),
        ({"scopes": [SCOPE], "timeout": 0}, ValueError, "timeout"),
        ({"scopes": [SCOPE], "timeout": "3"}, TypeError, "timeout"),
        ({"scopes": [SCOPE], "quota_project_id": 5}, TypeError, "quota_project_id"),
        ({"scopes": [SCOPE], "quota_project_id": ""}, ValueError, "quota_project_id"),
        ({"scopes": [SCOPE], "project_id": b"p"}, TypeError, "project_id"),
    ],
)
def test_credentials_arguments_are_checked(kwargs: dict[str, Any], error: type[Exception], name: str) -> None:
    with pytest.raises(error, match=name):
        Credentials(**kwargs)


def test_copies_check_their_arguments() -> None:
    creds = Credentials([SCOPE])
    with pytest.raises(TypeError, match="scopes"):
        creds.with_scopes(5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="default_scopes"):
        creds.with_scopes(None, default_scopes=[5])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="subject"):
        creds.with_subject("")
    with pytest.raises(TypeError, match="account"):
        creds.with_account(5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quota_project_id"):
        creds.with_quota_project(" ")


def test_repr_never_shows_the_token(store: TokenStore) -> None:
    secret = "ya29.very-secret-token-value"
    store.store(Token(token=secret, scope=SCOPE, expires=int(time.time()) + 600))
    creds = Credentials([SCOPE], subject=None, store=store)
    creds.refresh(None)
    auth = BearerAuth(SCOPE, store=store)
    assert secret not in repr(creds) and "very-secret" not in repr(creds)
    assert secret not in repr(auth) and "tc-test" in repr(creds) and "cloud-platform" in repr(auth)


def test_the_default_store_is_looked_up_at_first_use(
    store: TokenStore, redis_url: str, api: str, emulator: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", "redis://127.0.0.1:1/0")  # nothing there
    reset_default_store()
    creds, auth = Credentials([SCOPE]), BearerAuth(SCOPE)
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENCACHE_NAMESPACE", store.keys.namespace)
    reset_default_store()
    token = cached(emulator, 600)
    store.store(token)
    try:
        creds.refresh(None)
        assert creds.token == token.token
        assert requests.get(api, auth=auth, timeout=5).status_code == 200
        clone = pickle.loads(pickle.dumps(creds))  # picklable with the default store, as google-auth's are
        assert clone.token == token.token and clone.valid and clone.with_subject(USER).subject == USER
    finally:
        reset_default_store()


# -- BearerAuth ----------------------------------------------------------------------------------


def test_bearer_auth_sends_the_cached_token_in_one_round_trip(
    store: TokenStore, emulator: Emulator, api: str
) -> None:
    store.store(cached(emulator, 600, sub=USER))
    auth = BearerAuth(SCOPE, sub=USER, store=app_store(store))
    store.redis.config_resetstat()
    replies = [requests.get(api, auth=auth, timeout=5) for _ in range(5)]
    assert redis_commands(store.redis) == {"hgetall": 5}  # one round trip per request on a hit
    assert [r.status_code for r in replies] == [200] * 5 and replies[0].json()["sub"] == USER
    assert emulator.stats()["token_requests"] == 0


def test_bearer_auth_fetches_once_on_a_miss(
    store: TokenStore, emulator: Emulator, credentials_env: dict[str, str], api: str
) -> None:
    auth = BearerAuth(SCOPE, store=store)
    with requests.Session() as session:
        session.auth = auth
        assert {session.get(api, timeout=5).status_code for _ in range(10)} == {200}
    assert emulator.stats()["token_requests"] == 1


def test_bearer_auth_errors_are_tokencache_errors(store: TokenStore, api: str) -> None:
    with pytest.raises(FetchTimeoutError):
        requests.get(api, auth=BearerAuth(SCOPE, store=app_store(store), timeout=0.3), timeout=5)


def test_bearer_auth_equality_and_hash(store: TokenStore) -> None:
    other_store = app_store(store)
    same = BearerAuth(f"{OTHER} {SCOPE}", store=store), BearerAuth(f"{SCOPE},{OTHER}", store=store)
    assert same[0] == same[1] and hash(same[0]) == hash(same[1]) and len(set(same)) == 1
    assert BearerAuth(SCOPE, "default") == BearerAuth(SCOPE)
    different = [
        BearerAuth(SCOPE, store=store),
        BearerAuth(SCOPE, store=other_store),
        BearerAuth(SCOPE, sub=USER, store=store),
        BearerAuth(SCOPE, NAMED, store=store),
        BearerAuth(OTHER, store=store),
    ]
    assert len(set(different)) == len(different)
    assert BearerAuth(SCOPE) != "Bearer" and BearerAuth(SCOPE) != requests.auth.HTTPBasicAuth("a", "b")


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "name"),
    [
        ((None,), {}, TypeError, "scope"),
        ((" ",), {}, ValueError, "scope"),
        ((SCOPE, 5), {}, TypeError, "account"),
        ((SCOPE, None, ""), {}, ValueError, "sub"),
        ((SCOPE,), {"store": object()}, TypeError, "store"),
        ((SCOPE,), {"timeout": -1}, ValueError, "timeout"),
    ],
)
def test_bearer_auth_arguments_are_checked(
    args: tuple[Any, ...], kwargs: dict[str, Any], error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        BearerAuth(*args, **kwargs)
