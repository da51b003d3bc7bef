"""Connecting to Redis, and turning redis-py's errors into ours.

Every Redis call of the library runs inside :func:`redis_errors`, so a caller
sees :class:`RedisUnavailableError` with the URL (password masked) and a hint,
never a raw ``redis.exceptions`` class.

One error is not the server's but one key's: WRONGTYPE, a key holding another
type than the command reads (a ``redis-cli SET`` over a token hash). Reads of
many keys send their pipeline with ``execute(raise_on_error=False)`` and pass
the replies through :func:`raise_other_errors`, so such a key comes back as
its own reply (:func:`is_wrong_type`) for the caller to skip, while any other
error still fails the whole read.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import parse_qsl, unquote, unquote_plus, urlencode

import redis
import redis.connection
from redis import BlockingConnectionPool, Redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio import Redis as AsyncRedis

from tokencache import env
from tokencache.constants import HEALTH_CHECK_INTERVAL, MAX_CONNECTIONS, SENTINEL_TIMEOUT, SOCKET_TIMEOUT
from tokencache.core.sentinel import (
    AsyncFollowingConnection,
    AsyncFollowingPool,
    AsyncFollowingSentinel,
    AsyncFollowingSSLConnection,
    FollowingConnection,
    FollowingPool,
    FollowingSentinel,
    FollowingSSLConnection,
)
from tokencache.errors import ConfigurationError, RedisUnavailableError

__all__ = [
    "DEFAULT_SENTINEL_PORT",
    "SentinelURL",
    "connect",
    "describe",
    "is_wrong_type",
    "mask_url",
    "parse_sentinel_url",
    "raise_other_errors",
    "redis_errors",
    "unavailable",
]

C = TypeVar("C", Redis, AsyncRedis)


MASK = "***"
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")
_QUERY_PARAM = re.compile(r"([?&#])([^=&#]*)=([^&#]*)")
"""A query parameter as redis-py reads it (``parse_qs`` splits on ``&`` only: ``;`` is in the value)."""
_SEMICOLON_PARAM = re.compile(r"(;)([^=&#;]*)=([^&#;]*)")
"""A ``;``-separated parameter, as other parsers split (``?a=1;password=x``): masked too, never less."""


def mask_url(url: str) -> str:
    """The URL with every password replaced by ``***``: ``user:pass@``, ``:pass@``, and the value of
    each query parameter whose name contains ``password`` (``?password=``, ``sentinel_password``).

    It never raises and parses nothing it does not need (no port, no host list), so comma-separated
    Sentinel hosts, IPv6 literals, a bad port or a URL without a scheme still come back masked. Query
    passwords are masked first, up to the next ``&`` or ``#`` (``;`` included, as redis-py reads it),
    then the user part, which ends at the URL's last ``@``, so ``@ / ? #`` typed raw into a password
    are masked with it (a rare ``@`` in another query value masks more than needed, never less).
    """
    return _masked(url)[0]


def _masked(url: str) -> tuple[str, list[str]]:
    """``mask_url(url)``, and the passwords it hid (each as written and percent-decoded)."""
    scheme = _SCHEME.match(url)
    head = scheme.group() if scheme else ""
    rest = url[len(head) :]
    secrets: list[str] = []
    for pattern in (_QUERY_PARAM, _SEMICOLON_PARAM):  # before the user part: a raw '@' in a query password
        rest = pattern.sub(lambda m: _mask_param(m, secrets), rest)
    at = rest.rfind("@")  # the last one: '@', '/', '?' or '#' typed raw into a password stay inside
    if at >= 0:
        user, colon, password = rest[:at].partition(":")
        if colon:
            secrets.append(password)
            rest = f"{user}:{MASK}{rest[at:]}"
    return head + rest, [
        form for secret in secrets if secret for form in {secret, unquote(secret), unquote_plus(secret)}
    ]


def _mask_param(match: re.Match[str], secrets: list[str]) -> str:
    separator, name, value = match.groups()
    if "password" not in unquote(name).lower():
        return match.group()
    secrets.append(value)
    return f"{separator}{name}={MASK}"


def _scrub(text: str, url: str) -> str:
    """``text`` (an error about ``url``) without any password of ``url`` in it."""
    for secret in sorted(_masked(url)[1], key=len, reverse=True):
        text = text.replace(secret, MASK)
    return text


DEFAULT_SENTINEL_PORT = 26379
"""Where a sentinel listens when its URL gives no port (Redis's own default for Sentinel)."""

_SENTINEL_SCHEMES = {"redis+sentinel": False, "rediss+sentinel": True}
_HOST = re.compile(r"^(?:\[(?P<ipv6>[^\]]+)\]|(?P<name>[^:\[\]]+))(?::(?P<port>[^:]*))?$")


@dataclass(frozen=True)
class SentinelURL:
    """A ``redis+sentinel://`` (or ``rediss+sentinel://``) URL, parsed.

    ``redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db]``: the hosts are
    the sentinels, ``service_name`` the primary they watch (``sentinel monitor NAME``). The user and
    password are the data nodes' (primary and replicas); the ``sentinel_password`` (and
    ``sentinel_username``) query parameters are the sentinels' own. ``rediss+`` means TLS to the data
    nodes; other query parameters are redis-py's, as in a ``redis://`` URL.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)
    options: tuple[tuple[str, str], ...] = ()
    """Other query parameters (``socket_timeout``, ``ssl_ca_certs``...), for the data nodes."""

    def connection_kwargs(self) -> dict[str, Any]:
        """redis-py's keyword arguments for the data nodes (query parameters typed as redis-py types them)."""
        query = urlencode(self.options)
        url = f"{'rediss' if self.tls else 'redis'}://localhost/?{query}"
        kwargs: dict[str, Any] = redis.connection.parse_url(url)  # type: ignore[no-untyped-call]
        for where in ("host", "port", "connection_class"):
            kwargs.pop(where, None)
        kwargs.update(db=self.db, username=self.username, password=self.password)
        return kwargs

    def rq_settings(self) -> dict[str, Any]:
        """The ``SENTINEL`` setting of plain ``rq worker -c`` for this URL (rq builds the client from it).

        The connection class is ours, so RQ's workers and scheduler follow the master too.
        """
        kwargs = self.connection_kwargs()
        kwargs["connection_class"] = FollowingSSLConnection if self.tls else FollowingConnection
        for named in ("db", "username", "password", "ssl"):
            kwargs.pop(named, None)
        return {
            "INSTANCES": list(self.sentinels),
            "MASTER_NAME": self.service,
            "DB": self.db,
            "USERNAME": self.username,
            "PASSWORD": self.password,
            "SOCKET_TIMEOUT": kwargs.pop("socket_timeout", SOCKET_TIMEOUT),
            "SSL": self.tls,
            "SENTINEL_KWARGS": self.sentinel_kwargs(),
            "CONNECTION_KWARGS": kwargs,
        }

    def sentinel_kwargs(self) -> dict[str, Any]:
        """redis-py's keyword arguments for the sentinels: their password, and short timeouts."""
        return {
            "username": self.sentinel_username,
            "password": self.sentinel_password,
            "socket_timeout": SENTINEL_TIMEOUT,
            "socket_connect_timeout": SENTINEL_TIMEOUT,
        }


def parse_sentinel_url(url: str) -> SentinelURL | None:
    """``url`` parsed if it is a Sentinel URL (None for any other scheme); ConfigurationError if it is bad."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in _SENTINEL_SCHEMES:
        return None

    def bad(why: str) -> ConfigurationError:
        return ConfigurationError(
            f"bad Sentinel URL {mask_url(url)!r}: {why} (the form is "
            "redis+sentinel://[[user]:password@]host[:port][,host[:port]...]/service_name[/db])"
        )

    rest, _, query = rest.partition("?")
    at = rest.rfind("@")
    userinfo, hosts_path = (rest[:at], rest[at + 1 :]) if at >= 0 else ("", rest)
    hosts, _, path = hosts_path.partition("/")
    user, colon, password = userinfo.partition(":")
    params = parse_qsl(query, keep_blank_values=True)
    special = {name: value for name, value in params if name in ("sentinel_password", "sentinel_username")}
    parts = [unquote(part) for part in path.split("/")] if path else []
    if not parts or not parts[0]:
        raise bad("no service name (the name the sentinels monitor) after the hosts")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise bad(f"the path after the service name must be a database number, not {'/'.join(parts[1:])!r}")
    return SentinelURL(
        sentinels=tuple(_sentinel_host(host, bad) for host in hosts.split(",")),
        service=parts[0],
        db=int(parts[1]) if len(parts) == 2 else 0,
        tls=_SENTINEL_SCHEMES[scheme.lower()],
        username=unquote(user) or None,
        password=unquote(password) if colon else None,
        sentinel_username=special.get("sentinel_username") or None,
        sentinel_password=special.get("sentinel_password"),
        options=tuple((n, v) for n, v in params if n not in special),
    )


def _sentinel_host(text: str, bad: Any) -> tuple[str, int]:
    match = _HOST.match(text)
    if match is None:
        raise bad(f"{text!r} is not a host[:port]" if text else "an empty host in the list of sentinels")
    port = match.group("port")
    if port is None:
        return match.group("ipv6") or match.group("name"), DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise bad(f"port {port!r} of {text!r} is not a number from 1 to 65535")
    return match.group("ipv6") or match.group("name"), int(port)


def _connect_sentinel(parsed: SentinelURL, url: str, client_class: type[C], options: dict[str, Any]) -> C:
    """A client of the primary ``parsed`` names, on a pool that follows the master (core/sentinel.py)."""
    is_async = client_class is AsyncRedis
    manager_class = AsyncFollowingSentinel if is_async else FollowingSentinel
    pool_class: Any = AsyncFollowingPool if is_async else FollowingPool
    if parsed.tls:
        connection_class: Any = AsyncFollowingSSLConnection if is_async else FollowingSSLConnection
    else:
        connection_class = AsyncFollowingConnection if is_async else FollowingConnection
    kwargs = {**parsed.connection_kwargs(), **options}
    kwargs.pop("ssl", None)
    manager = manager_class(list(parsed.sentinels), sentinel_kwargs=parsed.sentinel_kwargs())
    pool = pool_class(
        parsed.service, manager, connection_class=connection_class, timeout=SOCKET_TIMEOUT, **kwargs
    )
    pool.tokencache_url = url
    return client_class.from_pool(pool)


def connect(url: str | None = None, *, client_class: type[C] = Redis, **options: Any) -> C:  # type: ignore[assignment]
    """A redis-py client (sync, or ``client_class=redis.asyncio.Redis``) for ``url``.

    ``None`` reads ``TOKENCACHE_REDIS_URL``. A ``redis+sentinel://`` URL (:class:`SentinelURL`) gives a
    client of the primary the sentinels name, whose connections follow it across a failover.
    Timeouts default to :data:`SOCKET_TIMEOUT`. The pool
    blocks (up to that timeout) when all its connections are busy instead of failing at once: a
    hundred threads or coroutines reading tokens at the same moment should queue, not error.
    """
    if url is not None and not isinstance(url, str):
        raise TypeError(f"url must be a Redis URL string or None, not {type(url).__name__}")
    url = url or env.redis_url()
    options.setdefault("socket_timeout", SOCKET_TIMEOUT)
    options.setdefault("socket_connect_timeout", SOCKET_TIMEOUT)
    options.setdefault("health_check_interval", HEALTH_CHECK_INTERVAL)
    pool_class = AsyncBlockingPool if client_class is AsyncRedis else BlockingConnectionPool
    options.setdefault("max_connections", MAX_CONNECTIONS)
    try:
        sentinel = parse_sentinel_url(url)
        if sentinel is not None:
            return _connect_sentinel(sentinel, url, client_class, options)
        pool = pool_class.from_url(url, timeout=SOCKET_TIMEOUT, **options)
    except ConfigurationError:
        raise
    except ValueError as e:  # not chained: the parser's own message may quote part of a password
        raise ConfigurationError(f"bad Redis URL {mask_url(url)!r}: {_scrub(str(e), url)}") from None
    return client_class.from_pool(pool)  # type: ignore[arg-type]  # the client owns (and closes) its pool


def describe(client: Redis | AsyncRedis) -> str:
    """Where ``client`` points, as a URL without its password."""
    sentinel_url = getattr(client.connection_pool, "tokencache_url", None)
    if sentinel_url:
        return mask_url(sentinel_url)
    kw = client.connection_pool.connection_kwargs
    if "path" in kw:
        return f"unix://{kw['path']}?db={kw.get('db', 0)}"
    user = kw.get("username")
    auth = f"{user or ''}:***@" if kw.get("password") else (f"{user}@" if user else "")
    scheme = "rediss" if client.connection_pool.connection_class.__name__.startswith("SSL") else "redis"
    return f"{scheme}://{auth}{kw.get('host', 'localhost')}:{kw.get('port', 6379)}/{kw.get('db', 0)}"


TLS_HINT = (
    "With rediss://, also check ssl_ca_certs (the CA that signed the server's certificate), that the "
    "URL's host is in that certificate, and ssl_certfile/ssl_keyfile if the server requires client "
    "certificates (docs/security.md#tls)."
)
"""Said after a connection error over TLS: the handshake's reasons are easy to misread (a missing client
certificate shows up as the server closing the connection)."""


def unavailable(client: Redis | AsyncRedis, error: redis.RedisError) -> RedisUnavailableError:
    """Our error for a redis-py error raised by ``client`` (for hot paths that skip :func:`redis_errors`)."""
    if isinstance(error, redis.ConnectionError | redis.TimeoutError):
        where = describe(client)
        tls = f" {TLS_HINT}" if where.startswith("rediss:") else ""
        return RedisUnavailableError(
            f"cannot reach Redis at {where}: {str(error).rstrip('.')}. "
            f"Is redis-server running, and is {env.REDIS_URL} right?{tls}"
        )
    return RedisUnavailableError(f"Redis at {describe(client)} refused a command: {error}")


@contextmanager
def redis_errors(client: Redis | AsyncRedis) -> Iterator[None]:
    """Translate redis-py errors raised inside the block into RedisUnavailableError."""
    try:
        yield
    except redis.RedisError as e:
        raise unavailable(client, e) from e


def is_wrong_type(reply: object) -> bool:
    """Whether a reply (or a raised error) is WRONGTYPE: its key holds another type than the command reads."""
    return isinstance(reply, redis.ResponseError) and str(reply).startswith("WRONGTYPE")


R = TypeVar("R", bound=list[Any])


def raise_other_errors(replies: R) -> R:
    """The replies of ``execute(raise_on_error=False)``, once none is an error other than WRONGTYPE.

    Call it inside :func:`redis_errors`: any other error (a refused command, a server still loading)
    is the server's, so it is raised, as ``execute()`` would have.
    """
    for reply in replies:
        if isinstance(reply, redis.RedisError) and not is_wrong_type(reply):
            raise reply
    return replies
