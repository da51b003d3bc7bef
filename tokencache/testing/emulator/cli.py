"""``tokencache emulator``: write key files, then serve until SIGINT or SIGTERM.

The command's loop lives here, apart from :class:`~.server.Emulator`, because it owns
process-wide state (signal handlers, stdout) that a test's in-process emulator must not touch.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from .config import EmulatorConfig
from .server import Emulator

__all__ = ["run_emulator"]


def _write_key_files(emulator: Emulator, keys_dir: str | None, accounts: int) -> Iterator[str]:
    """Write sa-N.json and authorized_user.json; yield one printable line per file."""
    if keys_dir is None:
        return
    directory = Path(keys_dir)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for n in range(1, accounts + 1):
        info = emulator.write_service_account(directory / f"sa-{n}.json")
        yield f"wrote {directory / f'sa-{n}.json'} ({info['client_email']})"
    emulator.write_authorized_user(directory / "authorized_user.json")
    yield f"wrote {directory / 'authorized_user.json'} (authorized_user)"


@contextmanager
def _until_signalled() -> Iterator[threading.Event]:
    """An event set by SIGINT/SIGTERM, with the previous handlers restored afterwards."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop  # signals can only be caught on the main thread; the caller must set stop
        return

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def run_emulator(
    host: str,
    port: int,
    keys_dir: str | None,
    accounts: int,
    lifetime: int,
    latency: float,
    failure_rate: float,
    *,
    verbose: bool = False,
    public_url: str | None = None,
) -> None:
    """Serve the emulator for the CLI until SIGINT/SIGTERM, after writing key files."""
    config = EmulatorConfig(lifetime=lifetime, latency=latency, failure_rate=failure_rate)
    emulator = Emulator(host, port, config, verbose=verbose, public_url=public_url)
    with _until_signalled() as stop, emulator:
        for line in _write_key_files(emulator, keys_dir, accounts):
            print(line)
        print(f"emulator listening on {emulator.url}", flush=True)
        while not stop.wait(0.5):
            pass
