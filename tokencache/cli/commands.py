"""The ``tokencache`` command: token, ls, status, audit, rekey, keygen, worker, emulator, demo.

Conventions of the tools operators already use: ``token`` prints the token
and nothing else (like ``gcloud auth print-access-token``); ``ls``/``status``
print tables (through rich; plain columns when stdout is not a terminal) or
``--json``; ``status`` exits non-zero when something needs attention, so it
can be a health check. Every command honours the ``TOKENCACHE_*`` environment
and ``--redis-url`` (before or after the command). Errors are one line on
stderr and a non-zero exit code, never a traceback.

Stored text is not trusted: a ``sub`` is often chosen by a user (domain-wide
delegation) and error texts come from the token endpoint. Every table cell,
problem line, error line and log line escapes control and invisible format
characters (:mod:`tokencache.cli.text`), so no value can forge a row of the
tab-separated output or send an escape sequence to the terminal.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from itertools import islice
from typing import Any, NoReturn

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from tokencache import env
from tokencache.app.core import TokenRecord
from tokencache.app.reads import bad_keys
from tokencache.app.tokenstore import TokenStore
from tokencache.cli import audit
from tokencache.cli.health import UNKNOWN, Health, check
from tokencache.cli.text import cell, printable
from tokencache.constants import METRICS_HOST
from tokencache.core.audit import Event, Role
from tokencache.core.connection import describe
from tokencache.crypto import PLAINTEXT
from tokencache.errors import TokenCacheError
from tokencache.keys import normalize_scope
from tokencache.token import mask

__all__ = ["main"]

EXIT_ERROR = 1
EXIT_USAGE = 2
AUDIT_COUNT = 50
"""Entries ``tokencache audit`` shows by default (a screenful or two)."""
TABLE_PAGE = 500
"""Rows per rich table when ``ls`` prints to a terminal: it prints as it reads, a table per page."""


class _PrintableFormatter(logging.Formatter):
    """Log lines whose message part is :func:`printable`: messages quote stored keys and endpoint errors.
    (A traceback, added after the message, keeps its lines.)"""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return printable(super().formatMessage(record))


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error on one line (naming the option, and where to read more)."""

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {printable(message)} (see '{self.prog} --help')\n")


def _port(lowest: int) -> Callable[[str], int]:
    """An argparse type: a TCP port number from ``lowest`` to 65535."""

    def port(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not lowest <= value <= 65535:
            raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port ({lowest}-65535)")
        return value

    return port


_HOSTNAME = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


def _host(text: str) -> str:
    """An argparse type: an IP address or a host name to listen on (anything else fails at bind time,
    after the pool has started, with a traceback)."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        if not _HOSTNAME.fullmatch(text):
            raise argparse.ArgumentTypeError(f"{text!r} is not an IP address or a host name") from None
    return text


def _store(args: argparse.Namespace, role: Role = Role.OPERATOR) -> TokenStore:
    """The environment's store; what it appends to the audit trail says ``role`` (an operator's fetch
    with ``token``, by default)."""
    store = TokenStore.from_url(args.redis_url)
    store.audit = store.audit.as_role(role)
    return store


def _console() -> Console:
    return Console(highlight=False, soft_wrap=True)


def _print_table(columns: Sequence[str], rows: Iterable[Sequence[str]], console: Console) -> int:
    """A rich table on a terminal; tab-separated full values otherwise (for grep, cut and awk). Either
    way each cell is escaped (:func:`~tokencache.cli.text.cell`): one row per line, one column per tab,
    no raw escapes. Rows are printed as they come (a terminal gets a table per :data:`TABLE_PAGE`
    rows), so a listing of a million tokens never holds them all. Returns how many rows it printed."""
    count = 0
    if not console.is_terminal:
        print("\t".join(columns))
        for count, row in enumerate(rows, 1):  # noqa: B007 (count is the result)
            print("\t".join(cell(text) for text in row))
        return count
    pending = iter(rows)
    while page := list(islice(pending, TABLE_PAGE)):
        table = Table(*columns, box=box.SIMPLE, pad_edge=False, show_header=count == 0)
        for row in page:
            table.add_row(*(Text(cell(text)) for text in row))  # Text: a '[' in a scope is not markup
        console.print(table)
        count += len(page)
    if count == 0:
        console.print(Table(*columns, box=box.SIMPLE, pad_edge=False))
    return count


def _print_json_list(items: Iterable[dict[str, Any]]) -> None:
    """``print(json.dumps(list(items), indent=2))``, the same text, one item at a time."""
    opened = False
    for item in items:
        sys.stdout.write(("," if opened else "[") + "\n  " + json.dumps(item, indent=2).replace("\n", "\n  "))
        opened = True
    sys.stdout.write("\n]\n" if opened else "[]\n")


def number(text: str) -> int:
    """An argparse type: a whole number >= 0 (argparse reports a ValueError as a usage error)."""
    value = int(text)
    if value < 0:
        raise ValueError(text)
    return value


def _seconds(value: float) -> str:
    return f"{value:.0f}s" if abs(value) < 120 else f"{value / 60:.0f}m"


def cmd_token(args: argparse.Namespace) -> int:
    """Print a valid access token: the cached one, or one fetched once for the fleet."""
    token = _store(args).for_scope((args.account, args.scope), args.sub, timeout=args.timeout)
    if args.json:
        print(json.dumps({**token.to_dict(), "expires_in": int(token.expires_in())}))
    else:
        print(token.token)
    return 0


def _last_refresh(record: TokenRecord, now: float) -> str:
    book = record.bookkeeping
    if book.rejected_at is not None:
        return f"rejected by an API {_seconds(now - book.rejected_at)} ago: refetching"
    if book.failures:
        return f"failing x{book.failures}: {(book.last_error or '')[:60]}"
    if book.refreshed_at:
        return f"ok {_seconds(now - book.refreshed_at)} ago"
    return "stored"


def _ls_row(record: TokenRecord, now: float) -> dict[str, Any]:
    book = record.bookkeeping
    return {
        "account": record.key.account,
        "scope": record.key.scope,
        "sub": record.key.sub,
        "expires_in": int(record.token.expires - now),
        "refresh_at": book.refresh_at,
        "refresh_in": None if book.refresh_at is None else int(book.refresh_at - now),
        "last_refresh": _last_refresh(record, now),
        "failures": book.failures,
        "encrypted_with": record.key_id,
        "token": _shown(record),
    }


def _shown(record: TokenRecord) -> str:
    """The token, masked; for one this process cannot decrypt, the id of the key it lacks (or that it is
    a plaintext this ring refuses: it is not shown, masked or not, as it may be a planted one)."""
    if record.unreadable is not None:
        if record.unreadable.key_id == PLAINTEXT:
            return "(plaintext refused)"
        return f"(encrypted: {record.unreadable.key_id})"
    return mask(record.token.token)


def cmd_ls(args: argparse.Namespace) -> int:
    """List cached tokens, masked: streamed, a page of the index at a time (never all of them in memory)."""
    now = time.time()
    with bad_keys.collect() as skipped:  # each is also logged on stderr, with why
        rows = (_ls_row(record, now) for record in _store(args).records())
        if args.json:
            _print_json_list(rows)
            return 0
        console = _console()
        columns = ("ACCOUNT", "SCOPE", "SUB", "EXPIRES IN", "NEXT REFRESH", "LAST REFRESH", "TOKEN")
        count = _print_table(columns, (_ls_cells(r) for r in rows), console)
    if console.is_terminal:
        console.print(f"{count} token(s)" + (f", {len(skipped)} bad key(s) skipped" if skipped else ""))
    return 0


def _ls_cells(r: dict[str, Any]) -> tuple[str, ...]:
    return (
        r["account"],
        r["scope"],
        r["sub"] or "-",
        _seconds(r["expires_in"]),
        "-" if r["refresh_in"] is None else f"in {_seconds(r['refresh_in'])}",
        r["last_refresh"],
        r["token"],
    )


def _server_cell(h: Health) -> str:
    if h.redis_version == UNKNOWN and h.redis_memory == UNKNOWN:
        return f"{h.redis_url} (Redis version and memory unknown: this Redis user may not run INFO)"
    return f"{h.redis_url} ({h.server}, {h.redis_memory} used)"


def _status_rows(h: Health) -> list[tuple[str, str]]:
    return [
        ("redis", _server_cell(h)),
        ("namespace / queue", f"{h.namespace} / {h.queue}"),
        ("worker pools", f"{h.pools} alive" + (f", {len(h.dead_pools)} stopped" if h.dead_pools else "")),
        ("workers", f"{h.workers} alive ({h.rq_registrations} RQ registrations)"),
        ("scheduler", "running" if h.scheduler else "NOT RUNNING"),
        ("index entries", str(h.tokens)),
        ("refreshes scheduled / queued", f"{h.scheduled} / {h.queued}"),
        ("refreshes overdue", str(len(h.overdue))),
        ("refreshes failed (gave up)", str(h.failed)),
        ("tokens failing to refresh", str(len(h.failing))),
        ("bad keys skipped", str(len(h.skipped))),
        ("tokens by encryption key", _by_key(h.encryption) or "-"),
        ("tokens not decryptable here", str(len(h.undecryptable))),
        ("tokens expired, not replaced", str(len(h.expired))),
        ("jobs of other namespaces refused", str(len(h.refused))),
    ]


def _by_key(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} {n}" for name, n in sorted(counts.items()))


def cmd_acl(args: argparse.Namespace) -> int:
    """Print the Redis users' ``ACL SETUSER`` lines for the environment's namespace and queue (no Redis)."""
    from tokencache.cli.acl import role_lines

    namespace = env.namespace()
    try:
        lines = role_lines(namespace, env.queue_name(namespace))
    except ValueError as e:
        raise SystemExit(f"tokencache acl: {e}") from None
    print("\n".join(lines))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Check Redis, workers, scheduler and refreshes; exit 1 when something needs attention."""
    store = _store(args)
    health = check(store, describe(store.redis))
    if args.json:
        print(json.dumps(health.as_dict(), indent=2))
    else:
        console = _console()
        _print_table(("CHECK", "STATE"), _status_rows(health), console)
        for problem in health.problems:
            console.print(Text.assemble(("attention: ", "bold red"), printable(problem)))
        if not health.problems:
            console.print(Text("ok", "green"))
    return EXIT_ERROR if health.problems else 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Show the audit trail, newest last; with ``--follow``, then every new entry until interrupted."""
    store = _store(args)
    scope = normalize_scope(args.scope, name="--scope") if args.scope is not None else None
    wanted = audit.Filter(account=args.account, scope=scope, event=args.event)
    entries, newest = audit.tail(store.redis, store.keys.audit, args.count, wanted)
    printer = audit.Printer(as_json=args.json)
    printer(entries)
    if args.follow:
        printer(audit.follow(store.redis, store.keys.audit, newest, wanted))
    return 0


def cmd_rekey(args: argparse.Namespace) -> int:
    """Rewrite every cached token under the key ring's first entry; exit 1 if any could not be decrypted."""
    from tokencache.cli.rekey import rekey

    store = _store(args)
    done = rekey(store, dry_run=args.dry_run)
    writer = store.encryption.writer
    verb = "would rewrite" if args.dry_run else "rewrote"
    under = f"under key {writer!r}" if writer else "in plaintext"
    for failure in done.failed:
        print(f"tokencache: cannot decrypt {failure}", file=sys.stderr)
    print(
        f"{verb} {done.rewritten} {under}, {done.current} already current, {done.skipped} skipped, "
        f"{len(done.failed)} failed ({done.seconds:.2f}s)"
    )
    return EXIT_ERROR if done.failed else 0


def cmd_keygen(args: argparse.Namespace) -> int:
    """Print a new ring entry ``id:key`` (a random AES-256 key in base64) for TOKENCACHE_ENCRYPTION_KEYS."""
    from tokencache.crypto import check_key_id, new_key

    print(f"{check_key_id(args.id, '--id')}:{new_key()}")
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the refresh worker pool in the foreground."""
    from tokencache.worker.pool import run_pool

    logging.getLogger("tokencache").setLevel(args.log_level)
    run_pool(
        _store(args, Role.WORKER),
        args.workers,
        burst=args.burst,
        logging_level=args.log_level,
        metrics_port=args.metrics_port,
        metrics_host=args.metrics_host,
    )
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    """Run the local stand-in for Google's token endpoints."""
    from tokencache.testing.emulator import run_emulator

    run_emulator(
        args.host,
        args.port,
        args.keys,
        args.accounts,
        args.lifetime,
        args.latency,
        args.failure_rate,
        public_url=args.public_url,
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole system on an embedded Redis and watch the tokens being refreshed."""
    from tokencache.cli.demo import run_demo

    return run_demo(args.redis_url, duration=args.duration, lifetime=args.lifetime)


def _add_data_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "token", parents=[common], help="print an access token (like gcloud auth print-access-token)"
    )
    p.add_argument("scope")
    p.add_argument("--account", default=None)
    p.add_argument("--sub", default=None)
    p.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for a fetch on a miss")
    p.add_argument("--json", action="store_true", help="the whole token as JSON")
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("ls", parents=[common], help="list cached tokens (masked)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser(
        "status", parents=[common], help="check Redis, workers and refreshes (exit 1: attention)"
    )
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser(
        "rekey", parents=[common], help="rewrite every token under the first key of the ring (rotation)"
    )
    p.add_argument("--dry-run", action="store_true", help="count what would be rewritten, write nothing")
    p.set_defaults(func=cmd_rekey)

    p = sub.add_parser("keygen", help=f"print a new id:key entry for ${env.ENCRYPTION_KEYS}")
    p.add_argument(
        "--id", default=time.strftime("k%Y%m%d", time.gmtime()), help="key id (default: kYYYYMMDD)"
    )
    p.set_defaults(func=cmd_keygen)


def _add_audit_command(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "audit", parents=[common], help="the audit trail: tokens fetched, stored, invalidated, given up on"
    )
    p.add_argument("-n", "--count", type=number, default=AUDIT_COUNT, help="entries (default: %(default)s)")
    p.add_argument("-f", "--follow", action="store_true", help="then print new entries (Ctrl-C ends)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--account", default=None, help="only this account's entries")
    p.add_argument("--scope", default=None, help="only this scope's entries")
    p.add_argument("--event", choices=[e.value for e in Event], default=None, help="only this event")
    p.set_defaults(func=cmd_audit)


def _add_process_commands(sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("worker", parents=[common], help="run the refresh worker pool")
    p.add_argument("-n", "--workers", type=int, default=2)
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--log-level", default="INFO")
    p.add_argument(
        "--metrics-port", type=_port(1), default=None, help="serve Prometheus metrics on this port"
    )
    p.add_argument(
        "--metrics-host",
        type=_host,
        default=METRICS_HOST,
        help=f"address of the metrics page (default {METRICS_HOST}: it is unauthenticated; 0.0.0.0: all)",
    )
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("emulator", parents=[common], help="run the local Google token endpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=_port(0), default=8089, help="0: any free port (printed)")
    p.add_argument("--keys", default=None, help="folder to write service-account key files into")
    p.add_argument("--accounts", type=int, default=1)
    p.add_argument("--lifetime", type=int, default=3600)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--failure-rate", type=float, default=0.0)
    p.add_argument("--public-url", default=None, help="URL the key files name (default: the bound address)")
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("demo", parents=[common], help="run the whole system on an embedded Redis")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--lifetime", type=int, default=16)
    p.set_defaults(func=cmd_demo)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="tokencache", description="Fleet-wide Google OAuth2 token cache.")
    parser.add_argument("--redis-url", default=None, help=f"Redis URL (default: ${env.REDIS_URL})")
    # --redis-url works before or after the command; SUPPRESS keeps a value given before it.
    common = _Parser(add_help=False)
    common.add_argument(
        "--redis-url", default=argparse.SUPPRESS, help=f"Redis URL (default: ${env.REDIS_URL})"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_data_commands(sub, common)
    _add_audit_command(sub, common)
    p = sub.add_parser(
        "acl",
        parents=[common],
        help="print the Redis users' ACL SETUSER lines for this namespace (docs/security.md)",
    )
    p.set_defaults(func=cmd_acl)
    _add_process_commands(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    handler = logging.StreamHandler()
    handler.setFormatter(_PrintableFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[handler])
    try:
        return int(args.func(args))
    except TokenCacheError as e:
        return _fail(e, EXIT_ERROR)
    except (TypeError, ValueError) as e:
        return _fail(e, EXIT_USAGE)
    except KeyboardInterrupt:
        return 130
    except OSError as e:  # a port in use, a folder that cannot be written
        return _fail(e, EXIT_ERROR)


def _fail(error: BaseException, code: int) -> int:
    """One line on stderr (an error may quote stored or endpoint text: printable) and the exit code."""
    print(f"tokencache: error: {printable(str(error))}", file=sys.stderr)
    return code
