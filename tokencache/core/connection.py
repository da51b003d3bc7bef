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
from typing import Any, TypeVar
from urllib.parse import unquote, unquote_plus

import redis
from redis import BlockingConnectionPool, Redis
from redis.asyncio import BlockingConnectionPool as AsyncBlockingPool
from redis.asyncio import Redis as AsyncRedis

from tokencache import env
from tokencache.constants import HEALTH_CHECK_INTERVAL, MAX_CONNECTIONS, SOCKET_TIMEOUT
from tokencache.errors import ConfigurationError, RedisUnavailableError

__all__ = [
    "connect",
    "describe",
    "is_wrong_type",
    "mask_url",
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


def connect(url: str | None = None, *, client_class: type[C] = Redis, **options: Any) -> C:  # type: ignore[assignment]
    """A redis-py client (sync, or ``client_class=redis.asyncio.Redis``) for ``url``.

    ``None`` reads ``TOKENCACHE_REDIS_URL``. Timeouts default to :data:`SOCKET_TIMEOUT`. The pool
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
        pool = pool_class.from_url(url, timeout=SOCKET_TIMEOUT, **options)
    except ValueError as e:  # not chained: the parser's own message may quote part of a password
        raise ConfigurationError(f"bad Redis URL {mask_url(url)!r}: {_scrub(str(e), url)}") from None
    return client_class.from_pool(pool)  # type: ignore[arg-type]  # the client owns (and closes) its pool


def describe(client: Redis | AsyncRedis) -> str:
    """Where ``client`` points, as a URL without its password."""
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
