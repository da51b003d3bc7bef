"""Start ``tokencache worker -n N`` in a subprocess, know when it is ready, and stop it.

Tests, the demo and the benchmarks all run real worker pools in subprocesses; one launcher
makes them agree on what *ready* means. Ready means that every process of the pool has
installed its SIGTERM/SIGINT handlers, because a stop signal that lands earlier is lost: RQ
installs a worker's handlers only after registering it, cleaning registries and starting the
scheduler, and a worker that missed its stop signal then waits on its queue for good. Counting
RQ's worker registrations leaves that window open. Each kind of process proves it its own way:

- the pool's parent: its heartbeat in ``{namespace}:pools`` names this process's pid. The pool
  writes it from its supervision loop, which RQ's ``WorkerPool.start`` enters only after
  installing the parent's handlers; the beat also counts the worker processes it started;
- each of the N RQ workers: its hash (``rq:worker:{name}``) says ``idle`` or ``busy``. RQ sets
  ``started`` before the handlers and ``idle`` only inside the work loop, after them. A
  worker is this pool's when it runs on this host in this pool's process group (the pool is
  started in a session of its own), so other pools on the same queue are not counted;
- the scheduler: ``Queue.scheduler_pid`` is read from the hash the scheduler process writes
  right after installing its handlers (another pool's scheduler on the same queue counts: RQ
  runs one per queue).

Every wait is bounded and a pool that dies or is late raises :class:`PoolError` with the tail
of its log. ``stop()`` is graceful (SIGTERM to the group, then SIGKILL after a grace period);
``kill()`` is for fault tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from tokencache import env as env_vars
from tokencache.testing.redisserver import SERVER_ENV
from tokencache.validate import check_count

if TYPE_CHECKING:
    from tokencache.app.tokenstore import TokenStore

__all__ = ["READY_TIMEOUT", "STOP_GRACE", "PoolError", "PoolProcess", "isolated_env", "stop_group"]

READY_TIMEOUT = 60.0
"""Seconds a pool may take to be ready: N Python processes start on a possibly busy machine."""
STOP_GRACE = 20.0
"""Seconds a stopped pool may take to finish its refreshes before its process group is killed."""
POLL_INTERVAL = 0.05
"""Seconds between readiness checks: readiness is spread over several processes and keys."""
LOG_TAIL_LINES = 8
ISOLATED_PREFIXES = ("GOOGLE_", "TOKENCACHE_", "GCE_")
"""Variables a child must not inherit: they would point it at the developer's own accounts or Redis."""
INHERITED = (SERVER_ENV,)
"""Inherited all the same: the server binary a test run chose, so a child that starts a private server of
its own (``tokencache demo``, a pytest suite using the plugin) starts the same one."""


class PoolError(RuntimeError):
    """The worker pool died, failed or was not ready in time; the message ends with its log's tail."""


def isolated_env(no_gcloud: Path, **extra: str) -> dict[str, str]:
    """This process's environment without Google or tokencache settings, plus ``extra``.

    ``CLOUDSDK_CONFIG`` points at ``no_gcloud`` (a folder that need not exist), so google-auth's
    ADC chain cannot find the developer's gcloud login either.
    """
    kept = {k: v for k, v in os.environ.items() if k in INHERITED or not k.startswith(ISOLATED_PREFIXES)}
    return {**kept, "CLOUDSDK_CONFIG": str(no_gcloud), **extra}


def stop_group(proc: subprocess.Popen[Any], grace: float = STOP_GRACE, *, terminated: bool = False) -> int:
    """SIGTERM to ``proc``'s process group, SIGKILL to it after ``grace`` seconds; the exit code.

    ``terminated``: the SIGTERM was sent already (a second one would be a cold shutdown to RQ).
    Once ``proc`` has exited, the group is SIGKILLed anyway so that no orphan outlives it.
    """
    if proc.poll() is None:
        if not terminated:
            _signal_group(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(grace)
    _signal_group(proc.pid, signal.SIGKILL)
    return proc.wait(5)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _process_group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except (ProcessLookupError, PermissionError):
        return None


class PoolProcess:
    """One ``tokencache worker -n N`` subprocess on ``redis_url``: its parent, workers and scheduler.

    ``namespace``, ``queue`` and ``refresh_before`` (when given) are passed to the pool through
    the environment, over ``env`` (default ``os.environ``). Its output goes to ``log`` (default:
    a temporary file removed at stop). The pool runs in a process group of its own, so that
    ``stop()`` and ``kill()`` reach every process of it and nothing else.
    """

    def __init__(
        self,
        redis_url: str,
        workers: int = 1,
        *,
        namespace: str | None = None,
        queue: str | None = None,
        refresh_before: int | None = None,
        env: Mapping[str, str] | None = None,
        args: Iterable[str] = (),
        log_level: str | None = None,
        log: Path | None = None,
    ) -> None:
        check_count("workers", workers)
        self.redis_url = redis_url
        self.workers = workers
        self.env = self._child_env(env, namespace, queue, refresh_before)
        self.namespace = self.env.get(env_vars.NAMESPACE) or env_vars.DEFAULT_NAMESPACE
        self.queue = self.env.get(env_vars.QUEUE) or self.namespace  # the queue follows the namespace
        level = ("--log-level", log_level) if log_level else ()
        self.command = [sys.executable, "-m", "tokencache", "worker", "-n", str(workers), *level, *args]
        self.log = log
        """Where the pool's output goes: ``log``, or a temporary file from start() to stop()."""
        self._log_dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._store: TokenStore | None = None
        self._terminated = False
        self._last_tail = ""

    def _child_env(
        self, base: Mapping[str, str] | None, namespace: str | None, queue: str | None, before: int | None
    ) -> dict[str, str]:
        child = dict(os.environ if base is None else base)
        child[env_vars.REDIS_URL] = self.redis_url
        settings = {env_vars.NAMESPACE: namespace, env_vars.QUEUE: queue, env_vars.REFRESH_BEFORE: before}
        child.update({name: str(value) for name, value in settings.items() if value is not None})
        return child

    @classmethod
    def for_store(cls, store: TokenStore, redis_url: str, workers: int = 1, **options: Any) -> PoolProcess:
        """A pool that serves ``store``: its namespace, queue and refresh margin."""
        return cls(
            redis_url,
            workers,
            namespace=store.keys.namespace,
            queue=store.refresh_queue.name,
            refresh_before=store.refresh_before,
            **options,
        )

    @property
    def pid(self) -> int:
        """The pool's parent process (also its process group id)."""
        if self.process is None:
            raise RuntimeError("the pool has not been started")
        return self.process.pid

    def start(self, *, wait: bool = True, timeout: float = READY_TIMEOUT) -> PoolProcess:
        """Start the pool; with ``wait``, return once it is ready (see the module docstring)."""
        if self.process is not None:
            raise RuntimeError("this pool was already started")
        if self.log is None:
            self._log_dir = Path(tempfile.mkdtemp(prefix="tokencache-pool-"))
            self.log = self._log_dir / "pool.log"
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.command,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.kill()  # not ready means it may not hear a SIGTERM: do not wait on one
                raise
        return self

    def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Block until the pool is ready; PoolError if it exits or ``timeout`` seconds pass first."""
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if time.monotonic() > deadline:
                raise self._error(f"was not ready within {timeout:g} s ({self._progress()})")
            time.sleep(POLL_INTERVAL)

    def is_ready(self) -> bool:
        """Whether the parent, all N workers and a scheduler have installed their signal handlers."""
        code = self.poll()
        if code is not None:
            raise self._error(f"exited with code {code} before it was ready")
        return (
            self._parent_beating()
            and len(self.ready_workers()) >= self.workers
            and self._readiness_store().refresh_queue.queue.scheduler_pid is not None
        )

    def ready_workers(self) -> list[Any]:
        """This pool's RQ workers that have reached their work loop (``rq.Worker`` objects)."""
        from rq.worker import Worker, WorkerStatus

        queue = self._readiness_store().refresh_queue.queue
        loop_states = (WorkerStatus.IDLE, WorkerStatus.BUSY)
        return [w for w in Worker.all(queue=queue) if w.get_state() in loop_states and self._owns(w)]

    def _owns(self, worker: Any) -> bool:
        same_host = worker.hostname == socket.gethostname()
        return bool(same_host and worker.pid and _process_group(worker.pid) == self.pid)

    def _parent_beating(self) -> bool:
        store = self._readiness_store()
        for raw in store.redis.hvals(store.keys.pools):
            beat = json.loads(raw)
            if beat.get("pid") == self.pid and beat.get("host") == socket.gethostname():
                return int(beat.get("workers", 0)) >= self.workers
        return False

    def _progress(self) -> str:
        parent = "beating" if self._parent_beating() else "no heartbeat yet"
        scheduler = self._readiness_store().refresh_queue.queue.scheduler_pid
        return f"parent: {parent}; workers in their loop: {len(self.ready_workers())}/{self.workers}; " + (
            "scheduler running" if scheduler else "no scheduler yet"
        )

    def _readiness_store(self) -> TokenStore:
        if self._store is None:
            from tokencache.app.tokenstore import TokenStore
            from tokencache.core.sources import Sources

            self._store = TokenStore.from_url(
                self.redis_url, namespace=self.namespace, queue=self.queue, sources=Sources(use_adc=False)
            )
        return self._store

    def poll(self) -> int | None:
        """The pool's exit code, or None while it runs."""
        return self.process.poll() if self.process is not None else None

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the pool's parent to exit (``subprocess.TimeoutExpired`` after ``timeout``)."""
        if self.process is None:
            raise RuntimeError("the pool has not been started")
        return self.process.wait(timeout)

    def run_burst(self, timeout: float = 120.0) -> None:
        """Start with ``--burst`` and wait until the pool has worked off its queue and exited."""
        if "--burst" not in self.command:
            self.command.append("--burst")
        self.start(wait=False)
        try:
            code = self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise self._error(f"did not finish its burst within {timeout:g} s") from None
        finally:
            self._close()
        if code != 0:
            raise self._error(f"burst run failed with exit code {code}")

    def terminate(self) -> None:
        """Send the group its SIGTERM without waiting, to stop several pools at once; then stop()."""
        if self.process is not None and self.process.poll() is None and not self._terminated:
            _signal_group(self.process.pid, signal.SIGTERM)
            self._terminated = True

    def stop(self, grace: float = STOP_GRACE) -> int | None:
        """Stop gracefully (SIGTERM to the group; SIGKILL after ``grace`` s); the exit code."""
        if self.process is None:
            return None
        try:
            return stop_group(self.process, grace, terminated=self._terminated)
        finally:
            self._close()

    def kill(self) -> None:
        """SIGKILL every process of the pool at once, as a crash would (for fault tests)."""
        if self.process is not None:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
        self._close()

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the pool's output, on one line (kept after the log is removed)."""
        if self.log is not None and self.log.exists():
            text = self.log.read_text(errors="replace").strip().splitlines()
            self._last_tail = " | ".join(text[-lines:]) or "(empty log)"
        return self._last_tail or "(no log)"

    def _error(self, what: str) -> PoolError:
        return PoolError(
            f"the worker pool (pid {self.process and self.process.pid}) {what}: {self.log_tail()}"
        )

    def _close(self) -> None:
        """Forget the readiness connection and remove a temporary log (its tail is kept)."""
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._log_dir is not None:
            self.log_tail()
            shutil.rmtree(self._log_dir, ignore_errors=True)
            self._log_dir = self.log = None

    def __enter__(self) -> PoolProcess:
        return self.start() if self.process is None else self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
