"""Sentinel URLs: parsed in one place (core/connection.py), refused clearly when bad, masked when shown."""

from __future__ import annotations

import pytest
import redis.asyncio

from tokencache import ConfigurationError, TokenStore
from tokencache.core.connection import DEFAULT_SENTINEL_PORT, connect, describe, mask_url, parse_sentinel_url
from tokencache.core.sentinel import FollowingConnection, FollowingPool, FollowingSSLConnection

SECRET = "s3cr3t-pw"


def test_the_full_form_is_parsed() -> None:
    url = f"rediss+sentinel://app:{SECRET}@s1:26380,[::1]:26381,s3/primary/2?sentinel_password=sp&socket_timeout=3"
    parsed = parse_sentinel_url(url)
    assert parsed is not None
    assert parsed.sentinels == (("s1", 26380), ("::1", 26381), ("s3", DEFAULT_SENTINEL_PORT))
    assert (parsed.service, parsed.db, parsed.tls) == ("primary", 2, True)
    assert (parsed.username, parsed.password, parsed.sentinel_password) == ("app", SECRET, "sp")
    kwargs = parsed.connection_kwargs()
    assert kwargs["socket_timeout"] == 3.0 and kwargs["db"] == 2 and kwargs["password"] == SECRET
    assert parsed.sentinel_kwargs()["password"] == "sp"
    assert SECRET not in repr(parsed) and "'sp'" not in repr(parsed)


def test_the_short_form_defaults() -> None:
    parsed = parse_sentinel_url("redis+sentinel://sentinel/tokens")
    assert parsed is not None
    assert parsed.sentinels == (("sentinel", 26379),)
    assert (parsed.db, parsed.tls, parsed.password, parsed.sentinel_password) == (0, False, None, None)
    assert parse_sentinel_url("redis://localhost:6390/0") is None


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://h1:26379,h2:26379", "no service name"),
        ("redis+sentinel://h1:26379/", "no service name"),
        (f"redis+sentinel://:{SECRET}@h1:nope/svc", "port 'nope'"),
        ("redis+sentinel://h1:70000/svc", "port '70000'"),
        ("redis+sentinel://h1,,h2/svc", "an empty host"),
        ("redis+sentinel://h1/svc/notadb", "database number"),
        ("redis+sentinel://h1/svc/0/more", "database number"),
    ],
)
def test_a_bad_url_is_refused_with_what_is_wrong(url: str, says: str) -> None:
    for make in (lambda: connect(url), lambda: TokenStore.from_url(url), lambda: parse_sentinel_url(url)):
        with pytest.raises(ConfigurationError, match=says) as caught:
            make()
        assert SECRET not in str(caught.value)
        assert "redis+sentinel://[[user]:password@]host[:port]" in str(caught.value)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (f"redis+sentinel://:{SECRET}@h1,h2:26380/svc", "redis+sentinel://:***@h1,h2:26380/svc"),
        (f"rediss+sentinel://u:{SECRET}@[::1]:1,h2/svc/1", "rediss+sentinel://u:***@[::1]:1,h2/svc/1"),
        (
            f"redis+sentinel://u:{SECRET}@h1,h2/svc?sentinel_password={SECRET}x&db=1",
            "redis+sentinel://u:***@h1,h2/svc?sentinel_password=***&db=1",
        ),
        (f"redis+sentinel://h1:bad,h2/svc?sentinel_password={SECRET}", "redis+sentinel://h1:bad,h2/svc?sentinel_password=***"),
    ],
)  # fmt: skip
def test_sentinel_urls_are_masked(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_a_client_is_built_without_reaching_any_server() -> None:
    """Building the client connects nowhere: the first command asks the sentinels."""
    url = f"redis+sentinel://u:{SECRET}@127.0.0.1:1/svc/3"
    client = connect(url)
    pool = client.connection_pool
    assert isinstance(pool, FollowingPool)
    assert pool.connection_class is FollowingConnection
    assert pool.connection_kwargs["db"] == 3 and pool.max_connections == 50
    assert describe(client) == "redis+sentinel://u:***@127.0.0.1:1/svc/3"
    assert (
        connect("rediss+sentinel://127.0.0.1:1/svc").connection_pool.connection_class
        is FollowingSSLConnection
    )
    aclient = connect(url, client_class=redis.asyncio.Redis)
    assert type(aclient.connection_pool).__name__ == "AsyncFollowingPool"
