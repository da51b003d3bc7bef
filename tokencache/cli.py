"""The ``tokencache`` command: token, ls, worker, emulator, demo.

Every command honours the ``TOKENCACHE_*`` environment and ``--redis-url``.
Errors are one line on stderr and a non-zero exit code, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Sequence

from . import env
from .errors import TokenCacheError
from .keys import TokenKey
from .sources import default_sources
from .token import mask
from .tokenstore import TokenStore

__all__ = ["main"]

Command = Callable[[argparse.Namespace], int]


def _store(args: argparse.Namespace) -> TokenStore:
    return TokenStore.from_url(args.redis_url)


def cmd_token(args: argparse.Namespace) -> int:
    """Print a valid access token: the cached one, or one fetched with this host's credentials."""
    store = _store(args)
    info = (args.account, args.scope)
    token = store.find(info, args.sub)
    if token is None:
        key = TokenKey.of(args.account, args.scope, args.sub)
        token = default_sources().fetch(key, scope=args.scope, account=args.account)
        store.write(key, token, fetched=True)
    print(token.token)
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    """List cached tokens, masked."""
    now = time.time()
    rows = [
        {
            "account": r.key.account,
            "scope": r.key.scope,
            "sub": r.key.sub,
            "expires_in": int(r.token.expires - now),
            "refresh_at": r.bookkeeping.refresh_at,
            "failures": r.bookkeeping.failures,
            "token": mask(r.token.token),
        }
        for r in _store(args).records()
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for row in rows:
        print(
            "{account}  {scope}  sub={sub}  expires in {expires_in}s  failures={failures}  {token}".format(
                **row
            )
        )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run the refresh worker pool in the foreground."""
    from .worker import run_pool

    run_pool(_store(args), args.workers, burst=args.burst, logging_level=args.log_level)
    return 0


def cmd_emulator(args: argparse.Namespace) -> int:
    """Run the local stand-in for Google's token endpoints."""
    from .emulator import run_emulator

    run_emulator(
        args.host, args.port, args.keys, args.accounts, args.lifetime, args.latency, args.failure_rate
    )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the whole system on an embedded Redis and watch a token being refreshed."""
    from .demo import run_demo

    return run_demo(args.redis_url, duration=args.duration, lifetime=args.lifetime)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokencache", description="Fleet-wide Google OAuth2 token cache.")
    parser.add_argument("--redis-url", default=None, help=f"Redis URL (default: ${env.REDIS_URL})")
    # --redis-url works before or after the command; SUPPRESS keeps a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--redis-url", default=argparse.SUPPRESS, help=f"Redis URL (default: ${env.REDIS_URL})"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser(
        "token", parents=[common], help="print an access token (like gcloud auth print-access-token)"
    )
    p.add_argument("scope")
    p.add_argument("--account", default=None)
    p.add_argument("--sub", default=None)
    p.set_defaults(func=cmd_token)

    p = sub.add_parser("ls", parents=[common], help="list cached tokens (masked)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("worker", parents=[common], help="run the refresh worker pool")
    p.add_argument("-n", "--workers", type=int, default=2)
    p.add_argument("--burst", action="store_true", help="exit when the queue is empty")
    p.add_argument("--log-level", default="INFO")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("emulator", parents=[common], help="run the local Google token endpoint")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8089)
    p.add_argument("--keys", default=None, help="folder to write service-account key files into")
    p.add_argument("--accounts", type=int, default=1)
    p.add_argument("--lifetime", type=int, default=3600)
    p.add_argument("--latency", type=float, default=0.0)
    p.add_argument("--failure-rate", type=float, default=0.0)
    p.add_argument("--public-url", default=None, help="URL the key files name (default: the bound address)")
    p.set_defaults(func=cmd_emulator)

    p = sub.add_parser("demo", parents=[common], help="run the whole system on an embedded Redis")
    p.add_argument("--duration", type=float, default=30.0)
    p.add_argument("--lifetime", type=int, default=15)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return int(args.func(args))
    except TokenCacheError as e:
        print(f"tokencache: error: {e}", file=sys.stderr)
        return 1
    except (TypeError, ValueError) as e:
        print(f"tokencache: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
