"""Every Redis key tokencache writes, built in one place.

Schema (``{ns}`` is the namespace, ``tokencache`` by default; it never holds a ``:``, see
:func:`tokencache.validate.check_namespace`, so no two namespaces share a key)::

    {ns}:token:{account}:{scope}:{sub}   hash   one cached token, EXPIREAT its expires
                                                fields: token type scope sub account expires
                                                        refresh_at, + refreshed_at once fetched,
                                                        + failures last_error last_error_at
                                                        gave_up_at while refreshes fail,
                                                        + rejected_at once an API's 401 evicted it
                                                        (until replaced, nobody is handed it)
    {ns}:index                           zset   member: the token's hash key, score: expires
    {ns}:lock:{account}:{scope}:{sub}    string single-flight lock (SET NX PX, value = owner)
    {ns}:want:{account}:{scope}:{sub}    string marks that an app asked the workers for this token (SET NX PX)
    {ns}:fetched:{account}:{scope}:{sub} pubsub "a fetch of this token ended" (JSON ok/error, no token)
    {ns}:error:{account}:{scope}:{sub}   string the last fetch's error, for waiters that subscribed late (PX)
    {ns}:invalidated:{account}:{scope}:{sub}
                                         string an API's rejection evicted this token: no other eviction
                                                until it expires (SET NX PX, value = when; the rate limit)
    {ns}:backoff:{account}               string the account's token requests are on hold until it expires
                                                (PX: a rate-limited answer's Retry-After); value: why
    {ns}:repair                          string lock that lets one worker of the fleet run a repair pass
    {ns}:pools                           hash   pool heartbeats: pool name -> JSON {workers, at, host, pid}
    {ns}:audit                           stream the audit trail: one entry per token fetched, stored,
                                                invalidated or given up on (who, key, a fingerprint of
                                                the token, never the token); XADD MAXLEN ~ N
    rq:job:tc-{name}                     hash   (RQ) the token's one refresh job; {name} names the
                                                namespace and token reversibly (see job ids below)

Components are escaped so the encoding is unambiguous: ``%`` becomes ``%25``
and ``:`` becomes ``%3A``, so no component contains a raw ``:`` and splitting
on ``:`` after the prefix gives back exactly three parts. ``account=None`` is
stored as ``default``; ``sub=None`` is the empty last component (an empty
``sub`` string is refused at the API, so the two cannot collide). The scope
component is the normalized scope: whitespace- or comma-separated scopes,
duplicates dropped, sorted, joined with one space.

Job ids: RQ allows only ``[A-Za-z0-9_-]``, so a refresh job's id is ``tc-``
and the base64url (unpadded) of ``{ns}:{account}:{scope}:{sub}``, escaped as
above, with the commonest long substrings abbreviated (``%G`` for
``https://www.googleapis.com/auth/``, ``%S`` for ``.iam.gserviceaccount.com``,
``%T`` for ``tokencache``, ``%D`` for ``default``; escaped text has ``%`` only
before ``25`` or ``3A``, so a marker is never ambiguous). The id depends on
the namespace and the token key only, and :func:`parse_job_id` gives both back,
so the job carries nothing else about its token and its RQ hash stays small.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from urllib.parse import unquote

from tokencache.validate import check_name, check_namespace

__all__ = [
    "DEFAULT_ACCOUNT",
    "Keys",
    "TokenKey",
    "job_id_pattern",
    "normalize_scope",
    "parse_info",
    "parse_job_id",
]

DEFAULT_ACCOUNT = "default"
_SCOPE_SPLIT = re.compile(r"[\s,]+")
_JOB_ID_PREFIX = "tc-"


def normalize_scope(scope: str, *, name: str = "scope") -> str:
    """One canonical spelling per set of scopes: ``"b a"``, ``"a,b"``, ``"a  b"`` -> ``"a b"``."""
    if not isinstance(scope, str):
        raise TypeError(f"{name} must be a string of scopes, not {type(scope).__name__}")
    parts = sorted({part for part in _SCOPE_SPLIT.split(scope) if part})
    if not parts:
        raise ValueError(f"{name} must name at least one scope, got {scope!r}")
    return " ".join(parts)


@dataclass(frozen=True, slots=True)
class TokenKey:
    """What identifies a cached token: ``(account, normalized scope, sub)``."""

    account: str
    scope: str
    sub: str | None = None

    @classmethod
    def of(cls, account: str | None, scope: str, sub: str | None) -> TokenKey:
        """Validate and normalize the three parts (``account=None`` is ``default``)."""
        check_name("account", account)
        check_name("sub", sub)
        return cls(account or DEFAULT_ACCOUNT, normalize_scope(scope), sub)

    @property
    def scopes(self) -> list[str]:
        """The scopes as google-auth wants them."""
        return self.scope.split(" ")

    def encode(self) -> str:
        """``account:scope:sub`` with each part escaped."""
        return ":".join(_escape(part or "") for part in (self.account, self.scope, self.sub))

    @classmethod
    def decode(cls, encoded: str) -> TokenKey:
        """The inverse of :meth:`encode`."""
        parts = encoded.split(":")
        if len(parts) != 3:
            raise ValueError(f"not an encoded token key: {encoded!r}")
        account, scope, sub = (unquote(part) for part in parts)
        return cls(account, scope, sub or None)


def _escape(part: str) -> str:
    return part.replace("%", "%25").replace(":", "%3A")


_ABBREVIATIONS = {
    "%G": _escape("https://www.googleapis.com/auth/"),
    "%S": ".iam.gserviceaccount.com",
    "%T": "tokencache",
    "%D": DEFAULT_ACCOUNT,
}
"""Markers for the long substrings that nearly every job id would spell out (applied in this order)."""
_MARKER = re.compile("|".join(_ABBREVIATIONS))


def _job_name(namespace: str, key: TokenKey) -> str:
    text = _abbreviate(":".join((_escape(namespace), key.encode())))
    return _JOB_ID_PREFIX + base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def job_id_pattern(namespace: str) -> str:
    """A Redis glob (ACL key patterns, ``SCAN MATCH``) matching exactly the job ids of ``namespace``.

    Every id of the namespace encodes a text that starts with the same prefix, the namespace as
    :func:`_job_name` abbreviates it and a ``:`` (no abbreviated string holds a ``:``, and a namespace
    holds no ``%`` or ``:``, so that prefix is the text up to its first ``:`` and no two namespaces share
    it). Base64 turns 3 bytes into 4 characters: the prefix's whole groups give fixed characters, and a
    prefix whose length is not a multiple of 3 fixes some bits of one more character, which a
    character class of the 16 (one byte left over) or 4 (two) characters with those bits stands for.
    """
    check_namespace(namespace)
    prefix = (_abbreviate(_escape(namespace)) + ":").encode()
    whole = len(prefix) - len(prefix) % 3
    fixed = base64.urlsafe_b64encode(prefix[:whole]).decode()
    rest = prefix[whole:]
    if not rest:
        return f"{_JOB_ID_PREFIX}{fixed}*"
    bits = int.from_bytes(rest, "big")
    known = 8 * len(rest)  # bits of the next characters that the prefix fixes
    chars = ""
    while known >= 6:
        known -= 6
        chars += _B64URL[(bits >> known) & 0x3F]
    free = 6 - known  # the next character's bits that belong to the token key
    high = (bits & ((1 << known) - 1)) << free
    return f"{_JOB_ID_PREFIX}{fixed}{chars}[{_glob_class(_B64URL[high : high + (1 << free)])}]*"


def _glob_class(chars: str) -> str:
    """``chars`` (consecutive in the base64url alphabet) as a glob class: runs of letters or digits as
    ranges, ``-`` escaped (inside ``[]`` it would make a range)."""
    runs: list[str] = []
    for char in chars:
        if runs and runs[-1][-1].isalnum() and char.isalnum() and ord(char) == ord(runs[-1][-1]) + 1:
            runs[-1] += char
        else:
            runs.append(char)
    return "".join(f"{run[0]}-{run[-1]}" if len(run) > 2 else "\\-" if run == "-" else run for run in runs)


def _abbreviate(text: str) -> str:
    for marker, long in _ABBREVIATIONS.items():
        text = text.replace(long, marker)
    return text


def parse_job_id(job_id: str) -> tuple[str, TokenKey]:
    """The namespace and token key a refresh job's id names (ValueError if it names none)."""
    encoded = job_id.removeprefix(_JOB_ID_PREFIX)
    try:
        text = base64.b64decode(encoded + "=" * (-len(encoded) % 4), altchars=b"-_", validate=True).decode()
        namespace, _, rest = _MARKER.sub(lambda m: _ABBREVIATIONS[m.group()], text).partition(":")
        namespace, key = unquote(namespace), TokenKey.decode(rest)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise ValueError(f"not a tokencache job id: {job_id!r}") from None
    if not namespace or _job_name(namespace, key) != job_id:  # e.g. an old hashed id that happens to decode
        raise ValueError(f"not a tokencache job id: {job_id!r}")
    return namespace, key


def parse_info(info: object, sub: str | None = None) -> TokenKey:
    """Goth's ``info``: a scope string, or an ``(account, scope)`` tuple."""
    if isinstance(info, str):
        return TokenKey.of(None, info, sub)
    if isinstance(info, tuple) and len(info) == 2:
        account, scope = info
        return TokenKey.of(account, scope, sub)
    raise TypeError(f"info must be a scope string or an (account, scope) tuple, not {info!r}")


@dataclass(frozen=True, slots=True)
class Keys:
    """The key builder of one namespace."""

    namespace: str

    def __post_init__(self) -> None:
        check_namespace(self.namespace)  # no ':' in it: no namespace's keys can be another's

    @property
    def index(self) -> str:
        return f"{self.namespace}:index"

    @property
    def pools(self) -> str:
        return f"{self.namespace}:pools"

    @property
    def audit(self) -> str:
        """The audit trail's stream (see :mod:`tokencache.core.audit`)."""
        return f"{self.namespace}:audit"

    @property
    def repair(self) -> str:
        return f"{self.namespace}:repair"

    @property
    def token_prefix(self) -> str:
        """What every token hash key starts with (the near cache tracks this prefix)."""
        return f"{self.namespace}:token:"

    def token(self, key: TokenKey) -> str:
        return self.token_prefix + key.encode()

    def lock(self, key: TokenKey) -> str:
        return f"{self.namespace}:lock:{key.encode()}"

    def want(self, key: TokenKey) -> str:
        return f"{self.namespace}:want:{key.encode()}"

    def error(self, key: TokenKey) -> str:
        return f"{self.namespace}:error:{key.encode()}"

    def invalidated(self, key: TokenKey) -> str:
        return f"{self.namespace}:invalidated:{key.encode()}"

    def backoff(self, account: str) -> str:
        """The hold every fetcher of ``account`` honours after a rate-limited answer."""
        return f"{self.namespace}:backoff:{_escape(account)}"

    def channel(self, key: TokenKey) -> str:
        return f"{self.namespace}:fetched:{key.encode()}"

    def parse_token(self, redis_key: str) -> TokenKey:
        """The TokenKey of a token hash's Redis key (from the index)."""
        if not redis_key.startswith(self.token_prefix):
            raise ValueError(f"{redis_key!r} is not a token key of namespace {self.namespace!r}")
        return TokenKey.decode(redis_key[len(self.token_prefix) :])

    def index_member(self, member: bytes) -> TokenKey | None:
        """The TokenKey of an index member as Redis returns it; None if it is not a token key of this
        namespace (junk someone wrote into the index: readers skip it, repair drops it)."""
        try:
            return self.parse_token(member.decode())
        except (UnicodeDecodeError, ValueError):
            return None

    @property
    def job_key_pattern(self) -> str:
        """The glob of this namespace's refresh job hashes (``rq:job:<id>``), and of no other namespace's:
        what an ACL key pattern names (docs/security.md, ``tokencache acl``)."""
        return "rq:job:" + job_id_pattern(self.namespace)

    def job_id(self, key: TokenKey) -> str:
        """The refresh job's RQ id: names the namespace and ``key`` reversibly, in RQ's alphabet."""
        return _job_name(self.namespace, key)
