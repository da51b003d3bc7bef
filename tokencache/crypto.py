"""Encryption at rest of the access token: AES-256-GCM under a key ring the fleet shares.

Why: anyone who can read the Redis (a backup, a replica, a debugging session, a too-wide ACL)
otherwise holds every token of the fleet. Only the hash's ``token`` field is encrypted: the others
say what a token is for and when it expires, which operators read under ``redis-cli`` and which
repair and ``tokencache status`` read without any key.

Stored form of an encrypted token: ``enc:{key id}:{base64url(nonce || ciphertext || tag)}``,
unpadded. The key id beside the ciphertext picks the key of the ring that decrypts it (so a ring
of several keys rotates without downtime) and lets a process that lacks the key name it. The
associated data is the token's Redis key (namespace included), so a ciphertext copied to another
key fails authentication instead of handing out another key's token. Each encryption draws a
random 96-bit nonce: GCM stays safe for 2**32 random nonces per key (NIST SP 800-38D), which a
fleet refreshing 10,000 tokens an hour reaches after 49 years.

The ring (``TOKENCACHE_ENCRYPTION_KEYS``): comma-separated ``id:key`` entries, ``key`` 32 bytes in
base64 (standard or URL-safe alphabet, padding optional), ``id`` up to 32 of ``[A-Za-z0-9_.-]``. The
first entry encrypts every write, all of them decrypt. The entry ``plaintext`` (no key) first means
"write plaintext, decrypt with the others": a fleet turns encryption on or off through it without a
moment in which some processes write what others cannot read (docs/encryption.md). A plaintext
token reads only under a ring that holds ``plaintext`` (anywhere) or no key at all: otherwise anyone
who can write Redis, without the key, could plant a token an encrypting fleet serves. So turning
encryption on goes ``plaintext,k1`` -> ``k1,plaintext`` -> ``tokencache rekey`` -> ``k1``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tokencache import env
from tokencache.errors import ConfigurationError, EncryptionError

__all__ = ["KEY_BYTES", "PLAINTEXT", "PREFIX", "UNKNOWN_ID", "Keyring", "check_key_id", "key_id", "new_key"]

PREFIX = "enc:"
"""How an encrypted ``token`` field starts (a Google access token starts with ``ya29.``)."""
PLAINTEXT = "plaintext"
"""The ring entry, without a key, that makes a process write tokens unencrypted."""
KEY_BYTES = 32
"""AES-256."""
NONCE_BYTES = 12
TAG_BYTES = 16
_ID = re.compile(r"[A-Za-z0-9_.-]{1,32}")


def new_key() -> str:
    """A fresh random key, in the base64 the ring reads (``tokencache keygen`` prints it)."""
    return base64.b64encode(AESGCM.generate_key(bit_length=KEY_BYTES * 8)).decode()


UNKNOWN_ID = "?"
"""The key id reported for an encrypted field whose id is not one a ring can hold (written by hand)."""


def key_id(stored: str) -> str | None:
    """The id of the key a stored ``token`` field is encrypted with; None for a plaintext one.

    Only an id a ring can hold is returned as it is (:data:`UNKNOWN_ID` otherwise): the field is
    whatever Redis holds, and its id reaches log lines and ``tokencache ls``."""
    if not stored.startswith(PREFIX):
        return None
    name = stored[len(PREFIX) :].partition(":")[0]
    return name if _ID.fullmatch(name) else UNKNOWN_ID


def _b64decode(text: str) -> bytes:
    """Base64 in either alphabet, with or without padding (binascii.Error if it is not base64)."""
    text = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


class Keyring:
    """Keys by id; the first entry (a key id, or :data:`PLAINTEXT`) is what new tokens are written with.

    Immutable and safe to share between threads. ``repr`` shows the ids, never a key.
    """

    def __init__(
        self, entries: Iterable[tuple[str, bytes | None]] = (), *, source: str = "encryption"
    ) -> None:
        self.source = source
        """Where the ring came from, for error messages (the variable's name, or ``encryption``)."""
        self._ciphers: dict[str, AESGCM] = {}
        self.writer: str | None = None
        """The id of the key that encrypts writes; None: this process writes plaintext."""
        seen: set[str] = set()
        listed_plaintext = False
        for position, (name, key) in enumerate(entries, 1):
            _check_id(source, position, name, plaintext=key is None)
            if name in seen:
                raise ConfigurationError(f"{source}: key id {name!r} is listed twice")
            seen.add(name)
            if key is not None:
                self._add(name, key, first=position == 1)
            elif name != PLAINTEXT:
                raise ConfigurationError(f"{source}: key id {name!r} has no key")
            listed_plaintext = listed_plaintext or name == PLAINTEXT
        self.reads_plaintext = listed_plaintext or not self._ciphers
        """Whether a plaintext ``token`` field is handed out: only under a ring that lists ``plaintext``
        or holds no key (encryption off). A ring of keys alone refuses one, which only someone without
        the key (or a process without the ring) can have written."""

    def _add(self, name: str, key: bytes, *, first: bool) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigurationError(f"{self.source}: key {name!r} must be {KEY_BYTES} bytes, got {len(key)}")
        self._ciphers[name] = AESGCM(key)
        if first:
            self.writer = name

    @classmethod
    def parse(cls, text: str, *, source: str = "encryption") -> Keyring:
        """The ring written as ``id:key,id:key`` (``plaintext`` allowed as an entry); "" is the off ring.

        Errors name ``source``, the entry's position and its id, never a key.
        """
        if not isinstance(text, str):
            raise TypeError(f"{source} must be a string of id:key entries, not {type(text).__name__}")
        return _parse(text, source)

    @classmethod
    def from_env(cls) -> Keyring:
        """The ring of ``TOKENCACHE_ENCRYPTION_KEYS`` (unset or empty: encryption off)."""
        return _parse(os.environ.get(env.ENCRYPTION_KEYS, ""), env.ENCRYPTION_KEYS)

    @classmethod
    def of(cls, encryption: object) -> Keyring:
        """What a store's ``encryption=`` argument means: None the environment's ring, a Keyring itself,
        a string parsed as the variable is."""
        if encryption is None:
            return cls.from_env()
        if isinstance(encryption, Keyring):
            return encryption
        if isinstance(encryption, str):
            return cls.parse(encryption)
        kind = type(encryption).__name__
        raise TypeError(f"encryption must be a Keyring, a string of id:key entries or None, not {kind}")

    @property
    def ids(self) -> tuple[str, ...]:
        """The ids of the keys this ring decrypts with, in its order."""
        return tuple(self._ciphers)

    def __repr__(self) -> str:
        writer = self.writer or PLAINTEXT
        return f"Keyring(writes={writer!r}, decrypts={list(self.ids)!r})"

    def current(self, stored: str) -> bool:
        """Whether a stored ``token`` field is in the form this ring writes (``rekey`` leaves it)."""
        return key_id(stored) == self.writer

    def seal(self, value: str, redis_key: str) -> str:
        """The ``token`` field to store for the access token ``value`` under ``redis_key``."""
        if self.writer is None:
            if value.startswith(PREFIX):
                raise ValueError(
                    f"an access token starting with {PREFIX!r} cannot be stored unencrypted: it would read "
                    "as an encrypted one"
                )
            return value
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.writer].encrypt(nonce, value.encode(), redis_key.encode())
        blob = base64.urlsafe_b64encode(nonce + sealed).rstrip(b"=").decode()
        return f"{PREFIX}{self.writer}:{blob}"

    def open(self, stored: str, redis_key: str) -> str:
        """The access token in a stored ``token`` field (a plaintext one as it is, if this ring reads
        plaintext); EncryptionError if this ring lacks its key, it fails authentication, or it is a
        plaintext this ring refuses (``key_id`` is then :data:`PLAINTEXT`)."""
        name = key_id(stored)
        if name is None:
            if not self.reads_plaintext:
                raise EncryptionError(self._refuses_plaintext(redis_key), key_id=PLAINTEXT)
            return stored
        cipher = self._ciphers.get(name)
        if cipher is None:
            message = _failed(name, redis_key) if name == UNKNOWN_ID else self._lacks(name, redis_key)
            raise EncryptionError(message, key_id=name)
        try:
            blob = _b64decode(stored[len(PREFIX) + len(name) + 1 :])
            if len(blob) < NONCE_BYTES + TAG_BYTES:
                raise InvalidTag
            return cipher.decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], redis_key.encode()).decode()
        except (InvalidTag, binascii.Error, ValueError):
            raise EncryptionError(_failed(name, redis_key), key_id=name) from None

    def _refuses_plaintext(self, redis_key: str) -> str:
        ids = ", ".join(self.ids)
        return (
            f"{redis_key!r} holds a token stored in plaintext, but this ring ({ids}) does not accept "
            f"plaintext: add {PLAINTEXT!r} to {env.ENCRYPTION_KEYS} while turning encryption on (the token "
            "is not handed out here, and its next refresh replaces it)"
        )

    def _lacks(self, name: str, redis_key: str) -> str:
        held = (
            f"holds only {', '.join(repr(i) for i in self.ids)}"
            if self.ids
            else "holds no key: encryption is off here"
        )
        return (
            f"{redis_key!r} holds a token encrypted with key {name!r}, and this process's key ring {held}: "
            f"give this process the fleet's {env.ENCRYPTION_KEYS} (the token is not handed out here)"
        )


def _failed(name: str, redis_key: str) -> str:
    return (
        f"{redis_key!r}: the token encrypted with key {name!r} failed authentication (changed in Redis, "
        f"copied from another key, or encrypted with another key of the same id): it is not handed out, "
        "and its next refresh replaces it"
    )


def check_key_id(name: str, source: str) -> str:
    """``name`` if the ring accepts it as a key id; ConfigurationError naming ``source`` otherwise."""
    _check_id(source, 1, name, plaintext=False)
    return name


def _check_id(source: str, position: int, name: str, *, plaintext: bool) -> None:
    """A key id as the ring allows it (:data:`PLAINTEXT` only without a key)."""
    if plaintext and name == PLAINTEXT:
        return
    if not _ID.fullmatch(name) or name == PLAINTEXT:
        shown = _shown_id(name)
        raise ConfigurationError(
            f"{source}: entry {position} has {shown}: ids are 1 to 32 of A-Z a-z 0-9 _ . - "
            f"({PLAINTEXT!r} is reserved, and takes no key)"
        )


def _shown_id(name: str) -> str:
    """A key id for an error message: only one a ring could hold is echoed; anything else may be the key
    itself (an entry written ``key:id``), so only its length is told."""
    if not name:
        return "an empty key id"
    if _ID.fullmatch(name):
        return f"key id {name!r}"
    return f"a key id of {len(name)} characters, not shown (an entry written key:id? entries are id:key)"


@functools.lru_cache(maxsize=8)
def _parse(text: str, source: str) -> Keyring:
    """Parsed once per distinct value: every refresh job builds a store from the environment."""
    if not text.strip():
        return Keyring(source=source)
    entries: list[tuple[str, bytes | None]] = []
    for position, entry in enumerate(text.split(","), 1):
        entry = entry.strip()
        if entry == PLAINTEXT:
            entries.append((PLAINTEXT, None))
            continue
        name, colon, encoded = entry.partition(":")
        if not colon:
            what = "is empty (a stray comma?)" if not entry else "is not id:key"
            raise ConfigurationError(f"{source}: entry {position} {what}")
        name = name.strip()
        _check_id(source, position, name, plaintext=False)
        entries.append((name, _key(source, name, encoded)))
    return Keyring(entries, source=source)


def _key(source: str, name: str, encoded: str) -> bytes:
    try:
        return _b64decode(encoded)
    except (binascii.Error, ValueError):
        raise ConfigurationError(f"{source}: key {name!r} is not base64") from None
