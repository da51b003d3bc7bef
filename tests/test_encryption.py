"""Encryption at rest: the key ring, the stored form, and every reader and writer of a token on a real Redis.

What must hold (docs/encryption.md): only the ``token`` field is encrypted, under the hash's own key
(a ciphertext copied elsewhere does not decrypt); a process that cannot decrypt a token gets an
EncryptionError naming the key id, never garbage; a plaintext token reads only under a ring that lists
``plaintext`` (how a fleet turns encryption on) or holds no key, so no one without the key can plant
one; and ``tokencache rekey`` rewrites every token under the ring's first key.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import pickle
import time
from collections.abc import Iterator

import google.auth.exceptions
import pytest
import requests
from redis import Redis
from rq.job import Job

from tokencache import (
    ConfigurationError,
    EncryptionError,
    Keyring,
    Token,
    TokenStore,
    aio,
    reset_default_store,
)
from tokencache.adapters.google_auth import Credentials
from tokencache.adapters.requests_auth import BearerAuth
from tokencache.app.reads import bad_keys
from tokencache.cli import rekey as rekey_module
from tokencache.cli.rekey import rekey
from tokencache.core.record import UNREADABLE
from tokencache.core.sources import Sources
from tokencache.crypto import new_key
from tokencache.worker.repair import repair

from .conftest import SCOPE, Workers, async_client_like, wait_for
from .test_cli import run

NS = "tc-crypt"
SECRET = "ya29.a0-encrypted-at-rest-secret-f3k"
K1, K2 = new_key(), new_key()
RING_1 = f"k1:{K1}"
RING_2 = f"k2:{K2}"
BOTH = f"k2:{K2},k1:{K1}"


def token(secret: str = SECRET, life: int = 600, **kw: object) -> Token:
    return Token(token=secret, scope=SCOPE, expires=int(time.time()) + life, **kw)  # type: ignore[arg-type]


def store_with(redis: Redis, encryption: object, namespace: str = NS, **kw: object) -> TokenStore:
    return TokenStore(
        redis,
        namespace=namespace,
        queue=namespace,
        sources=Sources(use_adc=False),
        encryption=encryption,  # type: ignore[arg-type]
        **kw,  # type: ignore[arg-type]
    )


@pytest.fixture
def k1(real_redis: Redis) -> TokenStore:
    return store_with(real_redis, RING_1)


def field(store: TokenStore, info: object = SCOPE, sub: str | None = None) -> str:
    return store.redis.hget(store.keys.token(store.key_for_info(info, sub)), "token").decode()


# -- the ring ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spell",
    [
        lambda raw: base64.b64encode(raw).decode(),
        lambda raw: base64.b64encode(raw).decode().rstrip("="),
        lambda raw: base64.urlsafe_b64encode(raw).decode(),
        lambda raw: base64.urlsafe_b64encode(raw).decode().rstrip("="),
    ],
    ids=["standard", "standard-unpadded", "urlsafe", "urlsafe-unpadded"],
)
def test_a_key_reads_in_either_base64_with_or_without_padding(spell: object) -> None:
    raw = bytes(range(200, 232))  # '+' and '/' in standard base64, '-' and '_' in urlsafe
    ring = Keyring.parse(f"k1:{spell(raw)}")  # type: ignore[operator]
    assert ring.writer == "k1" and ring.ids == ("k1",)
    assert Keyring.parse(f"k1:{base64.b64encode(raw).decode()}").open(ring.seal("x", "key"), "key") == "x"


def test_the_first_entry_writes_and_all_decrypt() -> None:
    ring = Keyring.parse(f" k2:{K2} , k1:{K1} ")
    assert ring.writer == "k2" and ring.ids == ("k2", "k1")
    old = Keyring.parse(RING_1).seal(SECRET, "key")
    assert ring.open(old, "key") == SECRET and ring.seal(SECRET, "key").startswith("enc:k2:")
    assert repr(ring) == "Keyring(writes='k2', decrypts=['k2', 'k1'])"
    assert K1 not in repr(ring) and K2 not in repr(ring)


def test_plaintext_first_writes_plaintext_and_still_decrypts() -> None:
    ring = Keyring.parse(f"plaintext,k1:{K1}")
    assert ring.writer is None and ring.seal(SECRET, "key") == SECRET
    assert ring.open(Keyring.parse(RING_1).seal(SECRET, "key"), "key") == SECRET
    for off in (Keyring.parse(""), Keyring.parse("plaintext"), Keyring()):
        assert off.writer is None and off.ids == () and off.open(SECRET, "key") == SECRET
    assert Keyring.parse(f"k1:{K1},plaintext").open(SECRET, "key") == SECRET  # turning encryption on


def test_a_ring_of_keys_alone_refuses_plaintext() -> None:
    with pytest.raises(EncryptionError, match="stored in plaintext, but this ring") as caught:
        Keyring.parse(BOTH).open(SECRET, "key")
    assert caught.value.key_id == "plaintext" and SECRET not in str(caught.value)
    expected = "this ring (k2, k1) does not accept plaintext: add 'plaintext' to TOKENCACHE_ENCRYPTION_KEYS"
    assert expected in str(caught.value)


def test_a_plaintext_token_planted_without_the_key_is_not_served(real_redis: Redis, k1: TokenStore) -> None:
    """Someone who can write Redis but lacks the key cannot forge a token an encrypting fleet hands out."""
    k1.store(token("ya29.victims-real-token"))
    redis_key = k1.keys.token(k1.key_for_info(SCOPE))
    real_redis.hset(redis_key, "token", "ya29.mallorys-own-token")
    for call in (lambda: k1.find(SCOPE), lambda: k1.for_scope(SCOPE, timeout=1)):
        with pytest.raises(EncryptionError, match="stored in plaintext") as caught:
            call()
        assert "mallory" not in str(caught.value)
    with pytest.raises(EncryptionError, match="stored in plaintext"):
        k1.invalidate(SCOPE, "ya29.mallorys-own-token")
    assert real_redis.hget(redis_key, "token") == b"ya29.mallorys-own-token"  # nothing evicted or fetched
    assert store_with(real_redis, f"{RING_1},plaintext").find(SCOPE) == token("ya29.mallorys-own-token")


BAD_RINGS = [
    ("k1", "entry 1 is not id:key"),
    (f"k1:{K1},", "entry 2 is empty"),
    (f":{K1}", "entry 1 has an empty key id"),
    (f"k1:{K1},k1:{K2}", "key id 'k1' is listed twice"),
    ("k1:c2hvcnQ", "key 'k1' must be 32 bytes, got 5"),
    (f"k1:{K1[:-8]}", "key 'k1' must be 32 bytes"),
    ("k1:not base64!", "key 'k1' is not base64"),
    (f"bad id:{K1}", "entry 1 has a key id of 6 characters, not shown"),
    (f"plaintext:{K1}", "entry 1 has key id 'plaintext'"),
    (f"{'x' * 33}:{K1}", "ids are 1 to 32"),
]


@pytest.mark.parametrize(("ring", "message"), BAD_RINGS)
def test_a_bad_ring_is_a_configuration_error_naming_the_variable_and_id_never_a_key(
    ring: str, message: str, monkeypatch: pytest.MonkeyPatch, real_redis: Redis
) -> None:
    monkeypatch.setenv("TOKENCACHE_ENCRYPTION_KEYS", ring)
    with pytest.raises(ConfigurationError, match=r"^TOKENCACHE_ENCRYPTION_KEYS: ") as caught:
        TokenStore(real_redis, namespace=NS)  # encryption=None: the environment's ring
    assert message in str(caught.value)
    assert K1 not in str(caught.value) and K2 not in str(caught.value) and K1[:-8] not in str(caught.value)
    with pytest.raises(ConfigurationError, match=r"^TOKENCACHE_ENCRYPTION_KEYS: "):
        aio.TokenStore(async_client_like(real_redis), namespace=NS)
    with pytest.raises(ConfigurationError, match=r"^encryption: "):
        TokenStore(real_redis, namespace=NS, encryption=ring)


URLSAFE_K1 = base64.urlsafe_b64encode(base64.b64decode(K1)).decode().rstrip("=")


@pytest.mark.parametrize("key", [K1, URLSAFE_K1], ids=["standard", "urlsafe-unpadded"])
def test_a_reversed_ring_entry_never_echoes_the_key(key: str) -> None:
    """``key:id`` instead of ``id:key``: the "id" is the key, so only its length and a hint are told."""
    with pytest.raises(ConfigurationError) as caught:
        Keyring.parse(f"{key}:k1")
    assert key not in str(caught.value) and key[:8] not in str(caught.value), str(caught.value)
    assert f"a key id of {len(key)} characters, not shown (an entry written key:id?" in str(caught.value)
    with pytest.raises(ConfigurationError, match="entry 1 has key id 'plaintext'"):  # a valid id is shown
        Keyring.parse(f"plaintext:{K1}")


def test_the_encryption_argument_is_checked(real_redis: Redis) -> None:

    with pytest.raises(TypeError, match="encryption must be a Keyring, a string of id:key entries or None"):
        TokenStore(real_redis, encryption=123)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="key id 'k1' has no key"):
        Keyring([("k1", None)])


def test_the_error_keeps_its_key_id_through_pickling() -> None:
    error = pickle.loads(pickle.dumps(EncryptionError("'key' holds a token encrypted with key 'k9'", "k9")))
    assert isinstance(error, EncryptionError) and error.key_id == "k9" and "'k9'" in str(error)


def test_keygen_prints_one_entry_the_ring_reads() -> None:
    out = run("keygen", "--id", "prod-2025", env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    (line,) = out.stdout.splitlines()
    assert line.startswith("prod-2025:") and Keyring.parse(line).writer == "prod-2025"
    bad = run("keygen", "--id", "a:b", env=dict(os.environ))
    assert bad.returncode == 1 and "key id" in bad.stderr and "Traceback" not in bad.stderr


# -- the stored form --------------------------------------------------------------------------------


def test_round_trip_and_what_redis_cli_shows(k1: TokenStore) -> None:
    stored = token(sub="user@example.com")
    k1.store(stored)
    assert k1.find(SCOPE, "user@example.com") == stored
    redis_key = k1.keys.token(k1.key_for(stored))
    raw = {k.decode(): v.decode() for k, v in k1.redis.hgetall(redis_key).items()}  # HGETALL
    assert (
        raw["token"].startswith("enc:k1:") and SECRET not in raw["token"] and "encrypted" not in raw["token"]
    )
    assert raw["scope"] == SCOPE and raw["sub"] == "user@example.com" and raw["type"] == "Bearer"
    assert raw["expires"] == str(stored.expires) and raw["account"] == "" and "refresh_at" in raw
    assert 590 <= k1.redis.ttl(redis_key) <= 600
    assert k1.redis.zscore(k1.keys.index, redis_key) == stored.expires


def test_every_write_draws_a_new_nonce(k1: TokenStore) -> None:
    k1.store(token())
    first = field(k1)
    k1.store(token())
    assert field(k1) != first and k1.find(SCOPE) == token()


def test_a_plaintext_token_that_looks_encrypted_is_refused() -> None:
    with pytest.raises(ValueError, match="b64token"):  # a Token cannot hold one (no ':' in a b64token)
        token("enc:k1:abc")
    with pytest.raises(ValueError, match="cannot be stored unencrypted"):  # nor can the ring write one
        Keyring().seal("enc:k1:abc", "key")
    assert Keyring.parse(RING_1).open(Keyring.parse(RING_1).seal("enc:k1:abc", "key"), "key") == "enc:k1:abc"


def _tamper(store: TokenStore, sub: str | None = None) -> None:
    """Flip one character of the stored ciphertext (the token of SCOPE and ``sub``)."""
    redis_key = store.keys.token(store.key_for_info(SCOPE, sub))
    value = field(store, SCOPE, sub)
    flipped = value[:-5] + ("A" if value[-5] != "A" else "B") + value[-4:]
    store.redis.hset(redis_key, "token", flipped)


def test_tampered_ciphertext_is_a_clear_error_and_for_scope_does_not_overwrite_it(k1: TokenStore) -> None:
    k1.store(token())
    _tamper(k1)
    tampered = field(k1)
    for call in (lambda: k1.find(SCOPE), lambda: k1.for_scope(SCOPE, timeout=1)):
        with pytest.raises(EncryptionError, match="encrypted with key 'k1' failed authentication") as caught:
            call()
        assert caught.value.key_id == "k1" and NS in str(caught.value)
    assert field(k1) == tampered and not k1.redis.exists(k1.keys.want(k1.key_for_info(SCOPE)))


def test_a_truncated_or_unreadable_ciphertext_fails_authentication(k1: TokenStore) -> None:
    k1.store(token())
    redis_key = k1.keys.token(k1.key_for_info(SCOPE))
    for junk in ("enc:k1:", "enc:k1:AAAA", "enc:k1:!!not-base64!!", "enc:k1"):
        k1.redis.hset(redis_key, "token", junk)
        with pytest.raises(EncryptionError, match="failed authentication"):
            k1.find(SCOPE)
    k1.redis.hset(redis_key, "token", "enc:\x1b[2J\n:AAAA")  # an id no ring holds: never echoed raw
    with pytest.raises(EncryptionError, match=r"key '\?' failed authentication") as caught:
        k1.find(SCOPE)
    assert caught.value.key_id == "?" and "\x1b" not in str(caught.value)
    (record,) = k1.records()
    assert record.key_id == "?" and record.unreadable is not None


def test_a_process_without_the_key_gets_an_error_naming_it(real_redis: Redis, k1: TokenStore) -> None:
    k1.store(token())
    with pytest.raises(EncryptionError, match=r"encrypted with key 'k1'.*ring holds only 'k2'") as caught:
        store_with(real_redis, RING_2).find(SCOPE)
    assert caught.value.key_id == "k1" and "TOKENCACHE_ENCRYPTION_KEYS" in str(caught.value)
    with pytest.raises(EncryptionError, match=r"encrypted with key 'k1'.*encryption is off here"):
        store_with(real_redis, "").find(SCOPE)
    assert SECRET not in str(caught.value) and field(k1) not in str(caught.value)


def test_another_key_under_the_same_id_fails_authentication(real_redis: Redis, k1: TokenStore) -> None:
    k1.store(token())
    with pytest.raises(EncryptionError, match="'k1' failed authentication"):
        store_with(real_redis, f"k1:{K2}").find(SCOPE)


def test_a_ciphertext_copied_to_another_key_does_not_decrypt(k1: TokenStore) -> None:
    """The associated data is the hash's Redis key: Mallory, who can write to Redis but holds no key,
    cannot make her token key (sub=mallory) serve the victim's token."""
    k1.store(token(sub="victim@example.com"))
    k1.store(token("ya29.mallorys-own-token", sub="mallory@example.com"))
    victims = field(k1, SCOPE, "victim@example.com")
    k1.redis.hset(k1.keys.token(k1.key_for_info(SCOPE, "mallory@example.com")), "token", victims)
    with pytest.raises(EncryptionError, match=r"mallory.*failed authentication"):
        k1.find(SCOPE, "mallory@example.com")
    other_namespace = store_with(k1.redis, RING_1, namespace="tc-crypt-other")
    other_namespace.store(token("ya29.other-namespace", sub="victim@example.com"))
    other_key = other_namespace.keys.token(other_namespace.key_for_info(SCOPE, "victim@example.com"))
    k1.redis.hset(other_key, "token", victims)
    with pytest.raises(EncryptionError, match="failed authentication"):
        other_namespace.find(SCOPE, "victim@example.com")
    assert k1.find(SCOPE, "victim@example.com") == token(sub="victim@example.com")


def test_plaintext_tokens_read_with_encryption_on_and_rekey_encrypts_them(real_redis: Redis) -> None:
    plain, on = store_with(real_redis, ""), store_with(real_redis, f"{RING_1},plaintext")
    for i in range(3):
        plain.store(token(f"ya29.plain-{i}-0000", sub=f"u{i}"))
    assert field(plain, SCOPE, "u0") == "ya29.plain-0-0000"
    assert on.find(SCOPE, "u1") == token("ya29.plain-1-0000", sub="u1")
    done = rekey(on)
    assert (done.rewritten, done.current, done.skipped, done.failed) == (3, 0, 0, [])
    assert all(field(on, SCOPE, f"u{i}").startswith("enc:k1:") for i in range(3))
    assert store_with(real_redis, RING_1).find(SCOPE, "u2") == token("ya29.plain-2-0000", sub="u2")
    with pytest.raises(EncryptionError, match="'k1'"):
        plain.find(SCOPE, "u0")
    again = rekey(on)
    assert (again.rewritten, again.current) == (0, 3)


def test_rekey_rotates_decrypts_and_reports(real_redis: Redis, k1: TokenStore) -> None:
    for i in range(5):
        k1.store(token(f"ya29.token-{i}-0000", sub=f"u{i}"))
    k1.redis.zadd(k1.keys.index, {"junk-member": 1, k1.keys.token(k1.key_for_info(SCOPE, "gone")): 2})
    store_with(real_redis, RING_2).store(token("ya29.unreadable-0000", sub="k2-only"))
    both = store_with(real_redis, BOTH)
    ttl = real_redis.ttl(both.keys.token(both.key_for_info(SCOPE, "u0")))
    dry = rekey(both, dry_run=True)
    assert (dry.rewritten, dry.current, dry.skipped, dry.failed) == (5, 1, 2, [])
    assert field(k1, SCOPE, "u0").startswith("enc:k1:")
    done = rekey(both, page=2)
    assert (done.rewritten, done.current, done.skipped, done.failed) == (5, 1, 2, [])
    assert {field(k1, SCOPE, f"u{i}")[:7] for i in range(5)} == {"enc:k2:"}
    assert real_redis.ttl(both.keys.token(both.key_for_info(SCOPE, "u0"))) in (ttl, ttl - 1)
    new_only = store_with(real_redis, RING_2)
    assert new_only.find(SCOPE, "u3") == token("ya29.token-3-0000", sub="u3")
    assert rekey(new_only).current == 6
    k1.store(token("ya29.left-behind-0000", sub="left"))
    failed = rekey(new_only)  # the ring without k1 meets a token only k1 decrypts
    assert failed.rewritten == 0 and len(failed.failed) == 1 and "key 'k1'" in failed.failed[0]
    assert rekey(store_with(real_redis, f"plaintext,{BOTH}")).rewritten == 7
    assert (
        field(k1, SCOPE, "u4") == "ya29.token-4-0000"
        and field(k1, SCOPE, "k2-only") == "ya29.unreadable-0000"
    )


def test_rekey_leaves_a_token_refreshed_between_its_read_and_its_write(
    real_redis: Redis, k1: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    k1.store(token())
    both = store_with(real_redis, BOTH)
    judge = rekey_module._judge

    def refreshed_meanwhile(*args: object) -> object:
        rewrite = judge(*args)  # type: ignore[arg-type]
        both.store(token("ya29.refreshed-meanwhile"))  # a refresh lands before the compare-and-set
        return rewrite

    monkeypatch.setattr(rekey_module, "_judge", refreshed_meanwhile)
    done = rekey(both)
    assert (done.rewritten, done.skipped) == (0, 1)
    assert both.find(SCOPE) == token("ya29.refreshed-meanwhile") and field(both).startswith("enc:k2:")


def test_rekey_pages_through_a_large_index(real_redis: Redis) -> None:
    plain, on = store_with(real_redis, ""), store_with(real_redis, f"{RING_1},plaintext")
    expires = int(time.time()) + 600
    with real_redis.pipeline(transaction=False) as pipe:
        for i in range(1500):
            plain.write_commands(pipe, plain.key_for(token(sub=f"u{i}")), Token(
                token=f"ya29.bulk-{i:04}", scope=SCOPE, expires=expires, sub=f"u{i}"
            ), fetched=False)  # fmt: skip
        pipe.execute()
    done = rekey(on, page=100)
    assert done.rewritten == 1500 and done.current == 0 and not done.failed
    assert on.find(SCOPE, "u1234") == Token(token="ya29.bulk-1234", scope=SCOPE, expires=expires, sub="u1234")


# -- invalidate, listings, repair ---------------------------------------------------------------------


def test_invalidate_compares_the_decrypted_token(k1: TokenStore) -> None:
    k1.store(token())
    assert not k1.invalidate(SCOPE, "ya29.some-other-token")
    assert k1.find(SCOPE) == token()
    assert k1.invalidate(SCOPE, SECRET)
    assert k1.find(SCOPE) is None and k1.redis.hexists(k1.keys.token(k1.key_for_info(SCOPE)), "rejected_at")
    assert not k1.invalidate(SCOPE, SECRET)  # evicted already
    assert not k1.invalidate(SCOPE, "ya29.never-cached", "nobody")


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_a_rekey_between_invalidates_read_and_script_does_not_lose_the_eviction(
    real_redis: Redis, mode: str
) -> None:
    """invalidate() reads the field, compares it decrypted, then the script compares the field byte for
    byte: a rekey in between (the same token, a new ciphertext) answers "not the stored token", so the
    field is read again and the script retried."""
    store_with(real_redis, RING_1).store(token("ya29.rejected-by-the-api"))
    operator = store_with(real_redis, BOTH)
    rekeys: list[int] = []

    def rekey_once() -> None:
        if not rekeys:
            rekeys.append(rekey(operator).rewritten)

    if mode == "sync":
        app = store_with(real_redis, BOTH)
        real_hget = app.redis.hget

        def hget_then_rekey(*a: object, **k: object) -> object:
            value = real_hget(*a, **k)
            rekey_once()
            return value

        app.redis.hget = hget_then_rekey  # type: ignore[method-assign]
        evicted = app.invalidate(SCOPE, "ya29.rejected-by-the-api")
    else:

        async def scenario() -> bool:
            async with aio.TokenStore(
                async_client_like(real_redis), namespace=NS, queue=NS, sources=Sources(use_adc=False),
                encryption=BOTH,
            ) as app:  # fmt: skip
                real = app.redis.hget

                async def hget_then_rekey(*a: object, **k: object) -> object:
                    value = await real(*a, **k)
                    rekey_once()
                    return value

                app.redis.hget = hget_then_rekey  # type: ignore[method-assign]
                return await app.invalidate(SCOPE, "ya29.rejected-by-the-api")

        evicted = asyncio.run(scenario())
    assert rekeys == [1], "the rekey ran between the read and the script"
    still = operator.find(SCOPE)
    assert evicted and still is None, f"evicted={evicted}; find() still hands out {still!r}"


def test_invalidate_gives_up_on_a_field_rewritten_at_every_read(real_redis: Redis) -> None:
    """The retries are bounded: a field re-encrypted between every read and its script is left alone."""
    store_with(real_redis, RING_1).store(token("ya29.rejected-by-the-api"))
    rings = [store_with(real_redis, BOTH), store_with(real_redis, f"{RING_1},{RING_2}")]
    app = store_with(real_redis, BOTH)
    real_hget, reads = app.redis.hget, []

    def hget_then_rekey(*a: object, **k: object) -> object:
        value = real_hget(*a, **k)
        reads.append(rekey(rings[len(reads) % 2]).rewritten)
        return value

    app.redis.hget = hget_then_rekey  # type: ignore[method-assign]
    assert app.invalidate(SCOPE, "ya29.rejected-by-the-api") is False
    assert reads == [1, 1, 1]  # INVALIDATE_ATTEMPTS reads, each followed by a rewrite
    assert rings[0].find(SCOPE) == token("ya29.rejected-by-the-api")


def test_invalidate_without_the_key_raises_and_changes_nothing(real_redis: Redis, k1: TokenStore) -> None:
    k1.store(token())
    with pytest.raises(EncryptionError, match="'k1'"):
        store_with(real_redis, RING_2).invalidate(SCOPE, SECRET)
    assert k1.find(SCOPE) == token()


def test_tokens_skip_and_report_what_cannot_be_decrypted_and_records_show_it(
    real_redis: Redis, k1: TokenStore, caplog: pytest.LogCaptureFixture
) -> None:
    k1.store(token(sub="a"))
    store_with(real_redis, RING_2).store(token(sub="b"))
    store_with(real_redis, "").store(token(sub="c"))
    with caplog.at_level(logging.WARNING), bad_keys.collect() as skipped:
        listed = list(k1.tokens())
    assert [t.sub for t in listed] == ["a"] and listed[0].token == SECRET
    why = {key.rpartition(":")[2]: text for key, text in skipped.items()}
    assert "encrypted with key 'k2'" in why["b"] and "'k2'" in caplog.text
    assert "stored in plaintext" in why["c"] and len(why) == 2
    records = {r.key.sub: r for r in k1.records()}
    assert (records["a"].key_id, records["b"].key_id, records["c"].key_id) == ("k1", "k2", None)
    assert records["c"].unreadable is not None and records["c"].token.token == UNREADABLE
    assert records["b"].unreadable is not None and records["b"].unreadable.key_id == "k2"
    assert records["a"].unreadable is None and records["a"].token.token == SECRET
    assert SECRET not in records["b"].token.token  # what Redis holds, never decrypted garbage


def test_repair_passes_over_a_token_it_cannot_decrypt(real_redis: Redis, k1: TokenStore) -> None:
    """Repair reads no token field: a ring without the token's key (or no ring) re-enqueues its lost job."""
    k1.store(token(life=3))  # due at once: repair judges it
    job_key = Job.key_for(k1.keys.job_id(k1.key_for_info(SCOPE)))
    queue = k1.refresh_queue
    for ring in (RING_2, ""):
        real_redis.delete(job_key, queue.queue.key, queue.scheduled.key)  # the refresh job lost
        assert repair(store_with(real_redis, ring))["enqueue"] == 1
        assert real_redis.exists(job_key)


def test_ls_status_and_rekey_commands(real_redis: Redis, k1: TokenStore, workers: Workers) -> None:
    env = {**workers.env(), "TOKENCACHE_NAMESPACE": NS, "TOKENCACHE_QUEUE": NS}
    k1.store(token(sub="a"))
    store_with(real_redis, RING_2).store(token("ya29.a0-second-secret-f3k", sub="b"))
    store_with(real_redis, "").store(token(sub="c"))
    rows = {
        r["sub"]: r
        for r in json.loads(run("ls", "--json", env={**env, "TOKENCACHE_ENCRYPTION_KEYS": RING_1}).stdout)
    }
    assert rows["a"]["token"] == "ya29.a0…f3k" and rows["a"]["encrypted_with"] == "k1"
    assert rows["b"]["token"] == "(encrypted: k2)" and rows["b"]["encrypted_with"] == "k2"
    assert rows["c"]["token"] == "(plaintext refused)" and rows["c"]["encrypted_with"] is None
    plain = run("ls", env={**env, "TOKENCACHE_ENCRYPTION_KEYS": RING_1})
    assert plain.returncode == 0 and "(encrypted: k2)" in plain.stdout and "enc:" not in plain.stdout
    assert "secret" not in plain.stdout
    status = json.loads(run("status", "--json", env=env).stdout)  # a monitoring host holds no key
    assert status["encryption"] == {"k1": 1, "k2": 1, "plaintext": 1} and len(status["undecryptable"]) == 2
    keyed = json.loads(run("status", "--json", env={**env, "TOKENCACHE_ENCRYPTION_KEYS": RING_1}).stdout)
    refused = [u for u in keyed["undecryptable"] if "stored in plaintext" in u]
    assert len(keyed["undecryptable"]) == 2 and len(refused) == 1
    assert not any("encrypt" in p for p in status["problems"])
    text = run("status", env=env).stdout
    assert "k1 1, k2 1, plaintext 1" in text
    dry = run("rekey", "--dry-run", env={**env, "TOKENCACHE_ENCRYPTION_KEYS": f"{BOTH},plaintext"})
    assert (
        dry.returncode == 0
        and "would rewrite 2 under key 'k2', 1 already current, 0 skipped, 0 failed" in dry.stdout
    )
    out = run("rekey", env={**env, "TOKENCACHE_ENCRYPTION_KEYS": RING_1})
    assert (
        out.returncode == 1
        and "rewrote 0 under key 'k1', 1 already current, 0 skipped, 2 failed" in out.stdout
    )
    assert "cannot decrypt" in out.stderr and "key 'k2'" in out.stderr and "Traceback" not in out.stderr
    assert "stored in plaintext" in out.stderr
    out = run("rekey", env={**env, "TOKENCACHE_ENCRYPTION_KEYS": f"{BOTH},plaintext"})

    assert out.returncode == 0 and "rewrote 2 under key 'k2', 1 already current" in out.stdout
    bad = run("ls", env={**env, "TOKENCACHE_ENCRYPTION_KEYS": f"k1:{K1},"})
    assert bad.returncode == 1 and "TOKENCACHE_ENCRYPTION_KEYS: entry 2 is empty" in bad.stderr
    assert K1 not in bad.stderr


# -- the near cache, asyncio, the adapters ------------------------------------------------------------


@pytest.fixture
def near(redis_url: str) -> Iterator[TokenStore]:
    store = TokenStore.from_url(redis_url, namespace=NS, near_cache=True, encryption=BOTH)
    assert store.near_cache is not None and store.near_cache.wait_active(5)
    yield store
    store.close()


def test_the_near_cache_holds_decrypted_tokens_and_follows_a_rekey(k1: TokenStore, near: TokenStore) -> None:
    cache, redis_key = near.near_cache, near.keys.token(near.key_for_info(SCOPE))
    assert cache is not None
    k1.store(token())

    def cached() -> Token | None:
        assert near.find(SCOPE) == token()
        return cache.get(redis_key, time.time())

    assert wait_for(cached, 5, what="the near cache filled") == token()  # decrypted, as find() returns it
    before = cache.epoch()
    assert rekey(near).rewritten == 1  # an HSET of the token field: a write Redis tells near caches about
    wait_for(lambda: cache.epoch() != before, 5, interval=0.001, what="the invalidation push")
    assert wait_for(cached, 5, what="the near cache filled again") == token()
    assert field(near).startswith("enc:k2:")
    _tamper(near)
    wait_for(lambda: cache.get(redis_key, time.time()) is None, 5, what="the tampered token dropped")
    with pytest.raises(EncryptionError, match="failed authentication"):
        near.find(SCOPE)


def test_asyncio_reads_writes_invalidates_and_lists_encrypted(real_redis: Redis, k1: TokenStore) -> None:
    async def scenario() -> None:
        async with aio.TokenStore(
            async_client_like(real_redis),
            namespace=NS,
            queue=NS,
            sources=Sources(use_adc=False),
            encryption=BOTH,
        ) as store:
            await store.store(token(sub="async"))
            assert field(k1, SCOPE, "async").startswith("enc:k2:")
            assert await store.find(SCOPE) == token()  # written by the sync k1 store
            assert sorted(str(t.sub) for t in await store.tokens()) == ["None", "async"]
            assert not await store.invalidate(SCOPE, "ya29.other")
            assert await store.invalidate(SCOPE, SECRET)
        async with aio.TokenStore(async_client_like(real_redis), namespace=NS, encryption=RING_1) as k1_only:
            with pytest.raises(EncryptionError, match="encrypted with key 'k2'"):
                await k1_only.find(SCOPE, "async")

    k1.store(token())
    asyncio.run(scenario())
    with pytest.raises(EncryptionError, match="'k2'"):
        k1.find(SCOPE, "async")


def test_the_adapters_read_encrypted_tokens_from_the_default_store(
    real_redis: Redis, redis_url: str, k1: TokenStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    k1.store(token())
    monkeypatch.setenv("TOKENCACHE_REDIS_URL", redis_url)
    monkeypatch.setenv("TOKENCACHE_NAMESPACE", NS)
    monkeypatch.setenv("TOKENCACHE_ENCRYPTION_KEYS", BOTH)
    reset_default_store()
    try:
        creds = Credentials([SCOPE])
        creds.refresh(None)
        assert creds.token == SECRET
        sent = BearerAuth(SCOPE)(requests.Request("GET", "http://127.0.0.1:1/").prepare())
        assert sent.headers["Authorization"] == f"Bearer {SECRET}"
        monkeypatch.setenv("TOKENCACHE_ENCRYPTION_KEYS", RING_2)  # a process without k1
        reset_default_store()
        with pytest.raises(google.auth.exceptions.RefreshError, match="encrypted with key 'k1'") as caught:
            Credentials([SCOPE]).refresh(None)
        assert not caught.value.retryable
    finally:
        reset_default_store()


# -- workers -----------------------------------------------------------------------------------------------


def test_a_worker_pool_refreshes_encrypted_tokens_under_its_key(
    store: TokenStore, workers: Workers, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOKENCACHE_ENCRYPTION_KEYS", BOTH)  # the pool's environment
    workers.start(1)
    app = store_with(store.redis, BOTH, namespace=store.keys.namespace)
    old_k1 = store_with(store.redis, RING_1, namespace=store.keys.namespace)
    old_k1.store(token("ya29.about-to-expire-0000", life=12, sub="a"))
    app.store(token("ya29.about-to-expire-0000", life=12, sub="b"))
    store_with(store.redis, RING_2, namespace=store.keys.namespace).store(
        token("ya29.about-to-expire-0000", life=12, sub="c")
    )
    _tamper(app, "c")  # fails authentication: the refresh replaces it all the same
    app.store(token("ya29.about-to-expire-0000", life=12, sub="d"))
    app.redis.hset(app.keys.token(app.key_for_info(SCOPE, "d")), "token", "ya29.planted-0000")  # refused
    for sub in ("a", "b", "c", "d"):
        new = wait_for(lambda sub=sub: _replaced(app, sub), 15, what=f"the refresh of {sub}")
        assert new.expires > time.time() + 60
        assert field(app, SCOPE, sub).startswith("enc:k2:")
    wait_for(lambda: "whose stored token this worker cannot read" in workers.pools[0].log_tail(200), 5)


def _replaced(store: TokenStore, sub: str) -> Token | None:
    try:
        found = store.find(SCOPE, sub)
    except EncryptionError:
        return None
    return found if found is not None and found.token != "ya29.about-to-expire-0000" else None
