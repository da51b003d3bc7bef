"""``tokencache rekey``: rewrite every cached token under the key ring's first entry, while the fleet runs.

The last step but one of a key rotation (docs/encryption.md): once every process holds the new key
first, tokens written before still carry the old key id until their next refresh. ``rekey`` rewrites
them now, so the old key can leave the ring without waiting out a token lifetime; the same run encrypts
plaintext tokens (a fleet turning encryption on) or, with ``plaintext`` first, decrypts them.

It walks the index with ``ZSCAN``, a page at a time, so the index is never held in memory, and a
token whose index score changes meanwhile (a refresh moves it) is still visited: a rank-ordered walk
would skip some of those. ``ZSCAN`` may return a member twice (a rehash of the index mid-walk); the
second visit finds it current. Each token is rewritten by :data:`~tokencache.core.scripts.REKEY`,
a compare-and-set on the exact field read, so a token that a refresh replaced in between is left
alone: that refresh wrote it under the writing key already. Only the ``token`` field changes; the
hash keeps its other fields and its ``EXPIREAT``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import cast

from redis import RedisError
from redis.client import Pipeline

from tokencache.app.reads import WRONG_TYPE, bad_keys
from tokencache.app.tokenstore import TokenStore
from tokencache.constants import INDEX_PAGE
from tokencache.core import scripts
from tokencache.core.connection import raise_other_errors, redis_errors
from tokencache.errors import EncryptionError
from tokencache.keys import TokenKey

__all__ = ["Rekeyed", "rekey"]


@dataclass
class Rekeyed:
    """What a rekey run did, token by token."""

    rewritten: int = 0
    """Rewritten under the ring's first entry (re-encrypted, encrypted, or decrypted to plaintext)."""
    current: int = 0
    """Already in the form the ring writes: left as they are."""
    skipped: int = 0
    """Gone since they were indexed, changed meanwhile (a refresh wrote them anew), or not a token hash."""
    failed: list[str] = field(default_factory=list)
    """``key: why`` of each token this process could not decrypt (a key it lacks, a failed authentication)."""
    seconds: float = 0.0


def rekey(store: TokenStore, *, dry_run: bool = False, page: int = INDEX_PAGE) -> Rekeyed:
    """Rewrite every indexed token of ``store``'s namespace under ``store.encryption``'s first entry.

    ``dry_run`` counts what would be rewritten and writes nothing.
    """
    started = time.monotonic()
    done = Rekeyed()
    cursor = 0
    with redis_errors(store.redis):
        while True:
            cursor, members = cast(
                tuple[int, list[tuple[bytes, float]]], store.redis.zscan(store.keys.index, cursor, count=page)
            )
            _page(store, [member for member, _ in members], done, dry_run)
            if cursor == 0:
                break
    done.seconds = time.monotonic() - started
    return done


def _page(store: TokenStore, members: list[bytes], done: Rekeyed, dry_run: bool) -> None:
    """Read the token fields of one page, then rewrite those not current in one pipeline."""
    keys = [key for key in map(store.keys.index_member, members) if key is not None]  # junk: repair drops it
    done.skipped += len(members) - len(keys)
    with store.redis.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.hget(store.keys.token(key), "token")
        fields = raise_other_errors(pipe.execute(raise_on_error=False))
    rewrites = [
        rewrite
        for key, stored in zip(keys, fields, strict=True)
        if (rewrite := _judge(store, key, stored, done)) is not None
    ]
    if dry_run:
        done.rewritten += len(rewrites)
    elif rewrites:
        replies = scripts.run_pipeline(store.redis, _queue(rewrites), transaction=False)
        done.rewritten += sum(1 for reply in replies if reply == 1)
        done.skipped += sum(1 for reply in replies if reply != 1)


def _judge(
    store: TokenStore, key: TokenKey, stored: bytes | RedisError | None, done: Rekeyed
) -> tuple[str, bytes, str] | None:
    """The rewrite one token needs, ``(hash key, field as read, new field)``; None (counted) if none."""
    redis_key = store.keys.token(key)
    if isinstance(stored, RedisError):
        bad_keys.skip(redis_key, WRONG_TYPE, "listing")
        done.skipped += 1
        return None
    if stored is None:
        done.skipped += 1  # expired since it was indexed, or a placeholder of a token asked for
        return None
    ring = store.encryption
    try:
        plain = ring.open(stored.decode(), redis_key)
    except EncryptionError as e:
        done.failed.append(f"{key.encode()}: {e}")
        return None
    except UnicodeDecodeError:
        done.skipped += 1  # not a token tokencache wrote
        return None
    if ring.current(stored.decode()):
        done.current += 1
        return None
    return redis_key, stored, ring.seal(plain, redis_key)


def _queue(rewrites: list[tuple[str, bytes, str]]) -> Callable[[Pipeline], None]:
    def queue(pipe: Pipeline) -> None:
        for redis_key, stored, new in rewrites:
            scripts.REKEY(pipe, [redis_key], [stored, new])

    return queue
