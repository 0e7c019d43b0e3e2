"""Supervising child processes: start, watch, restart with back-off, stop cleanly.

Used twice: a controller supervises the instances of its host, and ``ubi site up``
supervises the core and the controllers. A child that exits while it should run is
restarted after a back-off that doubles up to ``MAX_BACKOFF_S`` and resets once the
child has stayed up for ``STABLE_S``; one that exits with ``EX_CONFIG`` (78: its
configuration or credentials are unusable, which only an operator can fix) is not
restarted and stays ``failed``. A child may be handed bytes on its standard input (the
service credentials a prompt obtained: never on a command line or in the environment).
Stopping sends SIGTERM to every child, waits
``grace_s`` and kills whatever is left, so no process outlives its supervisor's stop.
Children are told their supervisor's pid on their command line (``--parent-pid``) and
stop when it is gone, which covers a supervisor killed with SIGKILL, even during the
child's start-up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

EX_CONFIG = 78
"""sysexits' EX_CONFIG: the exit status of a child that must not be restarted."""
MIN_BACKOFF_S = 0.25
MAX_BACKOFF_S = 10.0
STABLE_S = 30.0
DEFAULT_GRACE_S = 5.0


@dataclass(slots=True)
class Child:
    """One supervised process and what is known of it."""

    name: str
    argv: Sequence[str]
    state: str = "stopped"  # starting | running | crashed | failed | stopping | stopped
    stdin: bytes | None = field(default=None, repr=False)  # handed to each start (secrets: never shown)
    restarts: int = 0
    last_exit: int | None = None
    proc: asyncio.subprocess.Process | None = None
    started_at: float = 0.0
    backoff_s: float = MIN_BACKOFF_S

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None


StateCallback = Callable[[Child], Awaitable[None] | None]


SECRET_VARIABLES = ("UBI_PASSWORD", "UBI_NEW_PASSWORD")
"""Passwords a command may take from its environment; its children never inherit them."""


def child_environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in SECRET_VARIABLES}


class Supervisor:
    """Runs children until :meth:`stop`; see the module docstring."""

    def __init__(self, on_state: StateCallback | None = None, *, grace_s: float = DEFAULT_GRACE_S) -> None:
        self.children: dict[str, Child] = {}
        self._on_state = on_state
        self._grace_s = grace_s
        self._stopping = False
        self._watchers: list[asyncio.Task[None]] = []

    def add(self, name: str, argv: Sequence[str], *, stdin: bytes | None = None) -> Child:
        child = Child(name, list(argv), stdin=stdin)
        self.children[name] = child
        return child

    async def _set(self, child: Child, state: str) -> None:
        child.state = state
        if self._on_state is not None:
            try:
                res = self._on_state(child)
                if res is not None:
                    await res
            except Exception:
                log.exception("state callback failed for %s", child.name)

    async def _spawn(self, child: Child) -> None:
        # A session of its own: a terminal's Ctrl-C reaches only the top process, which
        # then stops its children in order (children watch their parent's pid in case it
        # dies without doing so).
        child.proc = await asyncio.create_subprocess_exec(
            *child.argv, stdin=asyncio.subprocess.DEVNULL if child.stdin is None else asyncio.subprocess.PIPE,
            start_new_session=True, env=child_environment()
        )
        child.started_at = time.monotonic()
        if child.stdin is not None and child.proc.stdin is not None:
            with contextlib.suppress(ConnectionError):
                child.proc.stdin.write(child.stdin)
                await child.proc.stdin.drain()
            child.proc.stdin.close()
        await self._set(child, "starting")

    async def _watch(self, child: Child) -> None:
        while not self._stopping:
            try:
                await self._spawn(child)
            except OSError as exc:
                log.error("cannot start %s: %s", child.name, exc)
                child.last_exit = None
            else:
                assert child.proc is not None
                code = await child.proc.wait()
                child.last_exit = code
                if self._stopping:
                    break
                if code == EX_CONFIG:
                    log.error("%s exited with status %d (unusable configuration or credentials; see its "
                              "message above): not restarting it", child.name, code)
                    await self._set(child, "failed")
                    return
                if time.monotonic() - child.started_at > STABLE_S:
                    child.backoff_s = MIN_BACKOFF_S
                log.warning("%s exited with %s; restarting in %.2f s", child.name, code, child.backoff_s)
            child.restarts += 1
            await self._set(child, "crashed")
            await asyncio.sleep(child.backoff_s)
            child.backoff_s = min(MAX_BACKOFF_S, child.backoff_s * 2)

    def start(self) -> None:
        """Start every child and its watcher; returns at once."""
        for child in self.children.values():
            self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch {child.name}"))

    async def mark_running(self, name: str) -> None:
        child = self.children.get(name)
        if child is not None and child.state == "starting":
            await self._set(child, "running")

    def hold(self) -> None:
        """Restart nothing from now on (a stop is coming; children may already be exiting)."""
        self._stopping = True

    async def stop(self) -> None:
        """SIGTERM every child, wait up to the grace period, SIGKILL the rest."""
        self._stopping = True
        procs = [c.proc for c in self.children.values() if c.proc is not None and c.proc.returncode is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs], timeout=self._grace_s)
            for proc in procs:
                if proc.returncode is None:
                    log.warning("pid %s did not stop in %.1f s; killing it", proc.pid, self._grace_s)
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
            for proc in procs:
                await proc.wait()
        for task in self._watchers:
            task.cancel()
        for task in self._watchers:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._watchers.clear()
        for child in self.children.values():
            await self._set(child, "stopped")


async def watch_parent(parent_pid: int, stop: asyncio.Event, period_s: float = 0.5) -> None:
    """Set ``stop`` when ``parent_pid`` is no longer this process's parent (it died and
    this process was re-parented), checking at once and then every ``period_s``."""
    while not stop.is_set():
        if os.getppid() != parent_pid:
            log.warning("parent process %d is gone; stopping", parent_pid)
            stop.set()
            return
        await asyncio.sleep(period_s)


def stop_on_signals(stop: asyncio.Event) -> None:
    """SIGINT, SIGTERM and SIGHUP (the terminal went away) set ``stop`` instead of raising."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(sig, stop.set)
