"""Hostile input is refused or neutralised (issue 11, findings 4, 5 and 7).

Passwords in Redis URLs never show (every form, every odd URL); the tab-separated output of ``ls`` and
``status`` and every CLI error line escape control characters, so stored text (a user-chosen ``sub``,
an endpoint's error) cannot forge a row or send a terminal escape; absurd ``expires`` and non-string
URLs fail at construction; a junk index member is skipped and counted; ports are checked by the
command line; the metrics page listens on the loopback interface unless told otherwise.
"""

from __future__ import annotations

import asyncio
import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import quote

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from redis import Redis
from rich.console import Console

from tokencache import ConfigurationError, Token, TokenStore, aio
from tokencache.app.reads import bad_keys
from tokencache.cli import commands
from tokencache.cli.text import printable
from tokencache.core.connection import connect, mask_url
from tokencache.testing.redisserver import free_port

from .conftest import SCOPE, Workers, wait_for

SECRET = "s3cr3t-Pa55"
MAX_EXPIRES = 253_402_300_799
"""9999-12-31T23:59:59Z: the latest ``expires`` a Token takes (``tokencache.constants.MAX_EXPIRES``)."""


def run(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tokencache", *args],
        env=dict(os.environ) if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- finding 4: every password form is masked --------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "secret", "shown"),
    [
        ("redis://user:SECRET@host:6390/0", SECRET, "redis://user:***@host:6390/0"),
        ("redis://:SECRET@host:6390/0", SECRET, "redis://:***@host:6390/0"),
        ("redis://host:6390/0?password=SECRET", SECRET, "redis://host:6390/0?password=***"),
        ("redis://host/0?db=1&Password=SECRET&x=1", SECRET, "redis://host/0?db=1&Password=***&x=1"),
        ("rediss://host/0?ssl_cert_reqs=required&password=SECRET", SECRET, None),
        ("redis+sentinel://u:SECRET@h1:1,h2:2/svc", SECRET, "redis+sentinel://u:***@h1:1,h2:2/svc"),
        ("redis+sentinel://h1,h2/svc?sentinel_password=SECRET", SECRET, "redis+sentinel://h1,h2/svc?sentinel_password=***"),
        ("rediss://u:SECRET@[::1]:6390/0", SECRET, "rediss://u:***@[::1]:6390/0"),
        ("u:SECRET@host:6390", SECRET, "u:***@host:6390"),
        ("unix://:SECRET@/tmp/redis.sock?db=0", SECRET, "unix://:***@/tmp/redis.sock?db=0"),
        ("unix:///tmp/redis.sock?password=SECRET", SECRET, "unix:///tmp/redis.sock?password=***"),
        ("redis://:SECRET@host:notaport/0", SECRET, "redis://:***@host:notaport/0"),
        ("redis://:s3c@r3t@host/0", "s3c@r3t", "redis://:***@host/0"),
        ("redis://:s3c/r3t@host/0", "s3c/r3t", "redis://:***@host/0"),
        ("redis://:s3c?r3t@host/0", "s3c?r3t", "redis://:***@host/0"),
        ("redis://:s3c%40r3t@host/0", "s3c%40r3t", "redis://:***@host/0"),
        ("redis://host/0?password=s3c%26r3t", "s3c%26r3t", "redis://host/0?password=***"),
        ("redis://host/0#password=SECRET", SECRET, None),
        ("redis://h?password=se;cret", "se;cret", "redis://h?password=***"),  # redis-py splits on & only
        ("foo://h/0?password=ab;cd&x=1", "ab;cd", "foo://h/0?password=***&x=1"),
        ("redis://h/0?db=0;password=SECRET", SECRET, "redis://h/0?db=0;password=***"),
        ("redis://h/0?password=a@SECRET&x=1", SECRET, "redis://h/0?password=***&x=1"),
        ("redis://user@host/0", None, "redis://user@host/0"),
        ("redis://host/0?client_name=a@b", None, "redis://host/0?client_name=a@b"),
        ("redis://u:SECRET@host/0?client_name=a@b", SECRET, "redis://u:***@b"),  # more than needed, safe
    ],
)  # fmt: skip
def test_mask_url_masks_every_password_form(url: str, secret: str | None, shown: str | None) -> None:
    url = url.replace("SECRET", SECRET)
    masked = mask_url(url)
    if secret is not None:
        assert secret not in masked and "***" in masked, masked
    if shown is not None:
        assert masked == shown


parts = st.text(st.characters(codec="utf-8", exclude_characters="\x00"), min_size=1, max_size=12)


@settings(max_examples=500)
@given(
    user=st.text(st.characters(whitelist_categories=("L", "N")), max_size=6),
    password=parts,
    host=st.sampled_from(["localhost:6390", "h1:1,h2:2", "[::1]:6390", "redis", "/tmp/r.sock"]),
    where=st.sampled_from(["userinfo", "raw userinfo", "password", "sentinel_password", "raw password"]),
    scheme=st.sampled_from(["redis://", "rediss://", "redis+sentinel://", "unix://", ""]),
)
def test_mask_url_never_shows_the_password(
    user: str, password: str, host: str, where: str, scheme: str
) -> None:
    def build(secret: str) -> str:
        if where == "userinfo":
            return f"{scheme}{user}:{quote(secret, safe='')}@{host}/0"
        if where == "raw userinfo":  # what people type: reserved characters left as they are
            return f"{scheme}{user}:{secret}@{host}/0"
        if where == "raw password":  # redis-py's value runs to the next '&' ('#' ends the query)
            return f"{scheme}{host}/0?db=0&password={secret}&socket_timeout=5"
        return f"{scheme}{host}/0?db=0&{where}={quote(secret, safe='')}&socket_timeout=5"

    assume(where != "raw password" or not {"&", "#"} & set(password))  # those end the value, raw
    placeholder = build("\x00")
    forms = {password, quote(password, safe="")}
    # It would show anyway, password or not: in the rest of the URL, or in the mask itself (``*``).
    assume(not any(form in placeholder or form in mask_url(placeholder) for form in forms))
    masked = mask_url(build(password))
    assert not any(form in masked for form in forms), masked
    assert masked == mask_url(build("x")), "a part of the password shows"  # no head or tail of it either


@given(st.text())
def test_mask_url_never_raises(url: str) -> None:
    assert isinstance(mask_url(url), str)


@pytest.mark.parametrize(
    "url",
    [
        f"redis://localhost:6390/0?password={SECRET}&socket_timeout=abc",
        f"redis://:{SECRET}@localhost:notaport/0",
        f"redis://localhost:6390/0?socket_timeout=x&sentinel_password={SECRET}",
        f"redis+sentinel://u:{SECRET}@h1:bad,h2:2/svc",
        f"redis+sentinel://u:{SECRET}@h1:1,h2:2",
        f"rediss+sentinel://u:{SECRET}@h1/svc?socket_timeout=x",
    ],
)
def test_a_bad_url_error_never_shows_the_password(url: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        connect(url)
    assert SECRET not in str(raised.value) and "***" in str(raised.value)
    out = run("--redis-url", url, "ls")
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert SECRET not in out.stderr + out.stdout and "Traceback" not in out.stderr


# -- finding 5: control characters in stored and endpoint text ------------------------------------------

FORGED = "evil\tforged-account\tforged-scope\n\x1b[2J\x1b]0;pwned\x07\r\x9b31m\x7f\u202eend"
RAW = ("\t", "\n", "\r", "\x1b", "\x07", "\x9b", "\x7f", "\u202e")


def cli_env(store: TokenStore, redis_url: str) -> dict[str, str]:
    return {**os.environ, "TOKENCACHE_REDIS_URL": redis_url, "TOKENCACHE_NAMESPACE": store.keys.namespace,
            "TOKENCACHE_QUEUE": store.refresh_queue.name}  # fmt: skip


def test_piped_ls_escapes_control_characters_in_every_column(store: TokenStore, redis_url: str) -> None:
    now = int(time.time())
    store.store(Token(token="ya29.a0-hostile-sub-f3k", scope=SCOPE, expires=now + 600, sub=FORGED))
    failing = Token(
        token="ya29.a0-hostile-err-f3k", scope=f"{SCOPE}\x1b[1m", expires=now + 600, account=FORGED
    )
    store.store(failing)
    store.redis.hset(store.keys.token(store.key_for(failing)), mapping={"failures": 1, "last_error": FORGED})
    out = run("ls", env=cli_env(store, redis_url))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.split("\n")
    assert lines[-1] == "" and len(lines) == 4, lines  # the header and two rows, nothing forged
    assert all(len(line.split("\t")) == 7 for line in lines[:-1]), lines
    body = out.stdout.replace("\t", "").replace("\n", "")
    assert not any(c in body for c in RAW), repr(out.stdout)
    assert (
        "evil\\tforged-account\\tforged-scope\\n\\x1b[2J\\x1b]0;pwned\\x07\\r\\x9b31m\\x7f\\u202eend" in body
    )
    assert not any(c in out.stderr.replace("\n", "") for c in RAW), repr(out.stderr)


def test_the_rich_table_prints_no_raw_escape_either() -> None:
    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, width=300, highlight=False)
    commands._print_table(("SUB", "ERROR"), [(FORGED, "x\x1b]0;pwned\x07")], console)
    text = buffer.getvalue()
    assert "\x1b[2J" not in text and "\x1b]0;" not in text and "\x07" not in text and "\u202e" not in text
    assert "\\x1b[2J" in text


def test_status_and_error_lines_escape_stored_text(store: TokenStore, redis_url: str) -> None:
    now = int(time.time())
    hostile = Token(token="ya29.a0-hostile-key-f3k", scope=SCOPE, expires=now + 5, sub=FORGED)
    store.store(hostile)
    store.redis.set(store.keys.token(store.key_for(hostile)), "someone else's string")  # a bad key, named
    status = run("status", env=cli_env(store, redis_url))
    assert status.returncode == 1, status.stderr
    assert not any(c in status.stdout.replace("\t", "").replace("\n", "") for c in RAW), repr(status.stdout)
    assert "\\x1b[2J" in status.stdout
    assert not any(c in status.stderr.replace("\n", "") for c in RAW), repr(status.stderr)
    robot = "robot@x.example"
    store.redis.set(
        store.keys.error(store.key_for_info((robot, SCOPE))), FORGED, px=60_000
    )  # an endpoint's words
    token = run("token", SCOPE, "--account", robot, "--timeout", "5", env=cli_env(store, redis_url))
    assert token.returncode == 1 and token.stderr.count("\n") == 1, repr(token.stderr)
    assert not any(c in token.stderr.rstrip("\n") for c in RAW) and "\\x1b[2J" in token.stderr


@pytest.mark.parametrize(
    "token",
    ["ya29.a\x1b]0;pwned\x07", "ya29.a b", "ya29.a\nb", "ya29.\u202eab", "ya29.a=b", "==", "ya29.\u3164",
     "ya29.ab%"],
)  # fmt: skip
def test_an_access_token_outside_the_b64token_alphabet_is_refused(token: str) -> None:
    """RFC 6750: ``[A-Za-z0-9._~+/-]+=*``. The error names the field and never shows the value."""
    with pytest.raises(ValueError, match=r"Token\.token") as raised:
        Token(token=token, scope=SCOPE, expires=int(time.time()) + 600)
    assert token not in str(raised.value) and "\x1b" not in str(raised.value)


@pytest.mark.parametrize("token", ["ya29.a0AfB_-~+/x", "ya29.abc==", "A", "ya29.emu-x_Y-z"])
def test_b64tokens_are_accepted(token: str) -> None:
    assert Token(token=token, scope=SCOPE, expires=int(time.time()) + 600).token == token


def test_a_stored_token_outside_the_alphabet_reads_as_malformed(store: TokenStore, redis_url: str) -> None:
    """``tokencache token`` printed the stored field raw; a hash whose token is no b64token is a bad key:
    skipped and reported (escaped), never handed out or printed."""
    stored = Token(token="ya29.a0-forged-later-f3k", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(stored)
    forged = "ya29.x\x1b]0;pwned\x07\x1b[2J"
    store.redis.hset(store.keys.token(store.key_for(stored)), "token", forged)
    with bad_keys.collect() as skipped:
        assert store.find(SCOPE) is None and list(store.tokens()) == []
    assert any("Token.token" in reason for reason in skipped.values()), skipped
    out = run("token", SCOPE, "--timeout", "1", env=cli_env(store, redis_url))
    assert forged not in out.stdout + out.stderr and "\x1b" not in out.stdout + out.stderr, repr(out)
    assert out.returncode == 1, repr(out)
    ls = run("ls", env=cli_env(store, redis_url))
    assert ls.returncode == 0 and "Token.token" in ls.stderr and "\x1b" not in ls.stdout + ls.stderr, ls


@pytest.mark.parametrize(
    "char",
    ["\x00", "\x1b", "\x7f", "\x9b", "\u00ad", "\u061c", "\u200b", "\u202e", "\u2028", "\u2029",
     "\u2066", "\ufeff", "\U000e0041", "\U000e007f", "\u3164", "\u115f", "\u1160", "\uffa0", "\ue000",
     "\U0001d173", "\u0378"],
)  # fmt: skip
def test_printable_escapes_every_control_format_and_invisible_character(char: str) -> None:
    escaped = printable(f"a{char}b")
    assert char not in escaped and escaped.startswith("a\\") and escaped.endswith("b"), escaped


@pytest.mark.parametrize("text", ["plain", "ünïcödé", "日本語", "a b", "a\u00a0b", "emoji \U0001f600", "ǅ"])
def test_printable_keeps_printable_text(text: str) -> None:
    assert printable(text) == text


# -- finding 7: absurd values, junk and ports ------------------------------------------------------------


@pytest.mark.parametrize(("expires", "error"), [(2**62, ValueError), (10**30, ValueError),
                         (MAX_EXPIRES + 1, ValueError), (-1, ValueError), (True, TypeError), (1.5, TypeError),
                         ("1767225600", TypeError)])  # fmt: skip
def test_absurd_expires_is_refused_at_construction(expires: object, error: type[Exception]) -> None:
    with pytest.raises(error, match="expires"):
        Token(token="ya29.x", scope=SCOPE, expires=expires)  # type: ignore[arg-type]


def test_the_latest_expires_allowed_is_stored_and_read(store: TokenStore) -> None:
    last = Token(token="ya29.a0-year-9999-f3k", scope=SCOPE, expires=MAX_EXPIRES)
    store.store(last)
    assert store.find(SCOPE) == last and list(store.tokens()) == [last]


@pytest.mark.parametrize("url", [123, b"redis://localhost:6390/0", ["redis://localhost"]])
def test_a_url_that_is_not_a_string_is_a_type_error(url: object) -> None:
    with pytest.raises(TypeError, match="url"):
        TokenStore.from_url(url)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="url"):
        aio.TokenStore.from_url(url)  # type: ignore[arg-type]


def test_a_junk_index_member_is_skipped_and_counted(real_redis: Redis, redis_url: str) -> None:
    """The issue's ``ZADD tokencache:index 1 garbage``: tokens(), records(), aio, ls and status go on."""
    store = TokenStore(real_redis)  # the default namespace, as in the issue
    good = Token(token="ya29.a0-next-to-junk-f3k", scope=SCOPE, expires=int(time.time()) + 600)
    store.store(good)
    real_redis.zadd("tokencache:index", {"garbage": 1})
    with bad_keys.collect() as skipped:
        assert list(store.tokens()) == [good]
        assert [r.token for r in store.records()] == [good]
    assert set(skipped) == {"garbage"}

    async def listed() -> list[Token]:
        async with aio.TokenStore.from_url(redis_url) as astore:
            return await astore.tokens()

    with bad_keys.collect() as skipped:
        assert asyncio.run(listed()) == [good]
    assert set(skipped) == {"garbage"}
    environ = {**os.environ, "TOKENCACHE_REDIS_URL": redis_url}
    environ.pop("TOKENCACHE_NAMESPACE", None)
    environ.pop("TOKENCACHE_QUEUE", None)
    ls = run("ls", env=environ)
    assert ls.returncode == 0 and ls.stdout.count("\n") == 2 and "garbage" in ls.stderr, ls
    status = run("status", "--json", env=environ)
    assert '"garbage"' in status.stdout and "Traceback" not in status.stderr, status


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("emulator", "--port", "99999"), "--port"),
        (("emulator", "--port", "-1"), "--port"),
        (("emulator", "--port", "http"), "--port"),
        (("worker", "--metrics-port", "99999"), "--metrics-port"),
        (("worker", "--metrics-port", "-1"), "--metrics-port"),
        (("worker", "--metrics-port", "0"), "--metrics-port"),
        (("worker", "--metrics-host", "not a host"), "--metrics-host"),
        (("worker", "--metrics-host", "-h"), "--metrics-host"),
        (("worker", "--metrics-host", "a..b"), "--metrics-host"),
        (("worker", "--metrics-host", "999.1.1.1:80"), "--metrics-host"),
    ],
)
def test_a_bad_port_is_one_line_naming_the_option(args: tuple[str, ...], option: str) -> None:
    out = run(*args, "--redis-url", "redis://localhost:1/0")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.count("\n") == 1 and f"argument {option}" in out.stderr, out.stderr


def listening_address(port: int) -> str | None:
    """The local address a TCP socket listening on ``port`` is bound to, from /proc/net/tcp{,6}."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if int(hex_port, 16) == port and state == "0A":  # LISTEN
                if len(address) == 8:
                    return socket.inet_ntop(socket.AF_INET, bytes.fromhex(address)[::-1])
                return address
    return None


def test_the_metrics_page_listens_on_loopback_by_default(store: TokenStore, workers: Workers) -> None:
    port = free_port()
    workers.start(1, args=("--metrics-port", str(port)))
    assert wait_for(lambda: listening_address(port), 10, what="the metrics port") == "127.0.0.1"
    args = commands._parser().parse_args(["worker", "--metrics-port", "9108", "--metrics-host", "0.0.0.0"])
    assert (args.metrics_port, args.metrics_host) == (9108, "0.0.0.0")
    assert commands._parser().parse_args(["worker"]).metrics_host == "127.0.0.1"
    assert commands._parser().parse_args(["emulator"]).host == "127.0.0.1"
