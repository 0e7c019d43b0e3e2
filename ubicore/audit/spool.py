"""The producers' end of the audit trail: stamping, spooling and shipping records.

An instance (and a controller) reports what happens through an :class:`Auditor`, whose
events go to a :class:`Spool` (an append-only file per process) and are sent to
``UAudit::Log`` by a :class:`Shipper`. See ubicore/audit/trail.py for the whole path
and the spool file's format.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import struct
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack

from ..config.model import AuditConfig, SiteConfig
from ..errors import CredentialsError, RemoteError
from ..security.policy import DEFAULT_USER
from .chain import Event, check_event

log = logging.getLogger(__name__)

__all__ = ["AUDIT_ALERTS", "AUDIT_LOG", "Auditor", "Shipper", "Spool", "audit_paths", "event_from_row"]

AUDIT_LOG = "UAudit::Log"
AUDIT_ALERTS = "UAudit::Alerts"
REJECTED_PER_S = 100
SPOOL_MAGIC = b"UBISPOOL"
SPOOL_VERSION = 1
SPOOL_ID_BYTES = 16
SPOOL_HEADER = len(SPOOL_MAGIC) + 1 + SPOOL_ID_BYTES
MAX_FRAME = 64 * 1024
MAX_MEMORY_EVENTS = 100_000
"""Unacknowledged events held in memory; beyond that the shipper reads them back from the file."""
SHIP_BATCH = 500
SHIP_LINGER_S = 0.01
"""A shipper with fewer than SHIP_BATCH events waits this long for more: one append (one
seal, one trail commit) then carries many records."""
SHIP_RETRY_MAX_S = 2.0
SHIP_WARN_EVERY_S = 30.0
FSYNC_EVERY_S = 1.0
COMPACT_BYTES = 1 << 20
"""A spool file is emptied once everything in it is acknowledged and it passed this size."""


def audit_paths(site: SiteConfig) -> tuple[Path, Path, Path]:
    """(audit key file, checkpoint file, spool directory) of ``site``."""
    cfg, base = site.audit, Path(site.dataset)
    return (cfg.key_file or base / "audit" / "audit.key", cfg.checkpoint_file or base / "audit" / "checkpoints",
            cfg.spool_dir or base / "spool")


def _never_skipped(action: str, outcome: str) -> bool:
    return action == "rejected" or (action == "login" and outcome != "ok")


_capped = _never_skipped
"""What an unauthenticated client can cause at will (rejected messages, failed and refused
logins): recorded one by one up to REJECTED_PER_S a second, then counted into the next."""


class Auditor:
    """Stamps and filters what one process reports, then hands it to ``sink``."""

    __slots__ = ("sink", "host", "cell", "schema", "principal", "skip", "_clock", "_second", "_rejected",
                 "_dropped")

    def __init__(
        self, sink: Callable[[Event], None], *, host: str, cell: str = "", schema: str = "",
        config: AuditConfig = AuditConfig(), clock: Callable[[], float] = time.time, principal: str = DEFAULT_USER,
    ) -> None:
        self.sink, self.host, self.cell, self.schema = sink, host, cell, schema
        self.principal = principal
        """Who the process's own events (starts, stops, key rotations) name: its service user."""
        self.skip = config.skip_users_containing
        self._clock = clock
        self._second = 0
        self._rejected = 0
        self._dropped = 0

    def __call__(self, action: str, outcome: str, principal: str, address: str, detail: str) -> None:
        principal = principal or self.principal
        if self.skip and self.skip in principal and not _never_skipped(action, outcome):
            return
        now = self._clock()
        if _capped(action, outcome):
            second = int(now)
            if second != self._second:
                self._second, self._rejected = second, 0
            self._rejected += 1
            if self._rejected > REJECTED_PER_S:
                self._dropped += 1
                return
            if self._dropped:
                detail = (f"{detail} (and {self._dropped} more rejected messages or failed logins before this "
                          "one, not recorded one by one)")
                self._dropped = 0
        try:
            self.sink(Event(now, self.host, self.cell, self.schema, principal, address, action, outcome, detail))
        except Exception:  # the trail must never take an action down with it
            log.exception("audit record lost: %s %s", action, outcome)

    def child(self, *, cell: str, schema: str) -> Auditor:
        """The same sink, stamped with another cell and schema (the core's services)."""
        return Auditor(self.sink, host=self.host, cell=cell, schema=schema,
                       config=AuditConfig(skip_users_containing=self.skip), clock=self._clock, principal=self.principal)


# --- the spool -------------------------------------------------------------------------------


def _event_row(n: int, e: Event) -> list[Any]:
    return [n, e.time, e.host, e.cell, e.schema, e.principal, e.address, e.action, e.outcome, e.detail]


def event_from_row(row: Any) -> tuple[int, Event]:
    """(spool number, event) from an appended row; ValueError if it is not one."""
    if not isinstance(row, (list, tuple)) or len(row) != 10:
        raise ValueError("an event is a list of 10 fields")
    n, t = row[0], row[1]
    if type(n) is not int or n < 1 or type(t) not in (int, float):
        raise ValueError("an event starts with its number and its time")
    if not all(type(v) is str for v in row[2:]):
        raise ValueError("an event's fields after the time are text")
    event = check_event(Event(float(t), *row[2:]))
    return n, event


class Spool:
    """One process's spool file (see the module docstring). Not thread-safe: one loop."""

    def __init__(self, directory: Path, name: str) -> None:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.name = name
        self.path, self._fd = self._open_locked(directory, name)
        self.ack_path = self.path.with_suffix(".ack")
        try:
            self.spool_id, events = self._load()
        except BaseException:
            os.close(self._fd)
            raise
        self._ack_fd = os.open(self.ack_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        acked = self._read_ack()
        if acked is None and not events:
            # The mark is lost (a crash) and nothing is left to number from: numbering this
            # origin anew from 1 would make the core skip the new events as ones it has, so
            # the spool takes a new id (a new origin) instead.
            self.spool_id = os.urandom(SPOOL_ID_BYTES)
            os.pwrite(self._fd, SPOOL_MAGIC + bytes([SPOOL_VERSION]) + self.spool_id, 0)
            os.fsync(self._fd)
        self.origin = f"{self.spool_id.hex()}:{name}"
        self.acked = acked or 0
        if acked is None:
            os.pwrite(self._ack_fd, struct.pack(">Q", self.acked), 0)
            os.fsync(self._ack_fd)
        self._memory: deque[tuple[int, list[Any]]] = deque(
            (n, msgpack.unpackb(packed)) for n, packed in events if n > self.acked)
        self._complete = True  # every unacknowledged event is in memory
        self.last = max([self.acked, *(n for n, _ in events)])
        self.written = os.lseek(self._fd, 0, os.SEEK_END)
        self.wakeup = asyncio.Event()
        self._dirty_since: float | None = None

    def __repr__(self) -> str:
        return f"<Spool {self.name} last={self.last} acked={self.acked}>"

    @staticmethod
    def _open_locked(directory: Path, name: str) -> tuple[Path, int]:
        """The spool file, locked for this process; if another live process holds it (a
        restart overlapping the old run's exit), after a moment a file of our own."""
        for attempt in range(50):
            path = directory / f"{name}.spool" if attempt < 49 else directory / f"{name}.{os.getpid()}.spool"
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return path, fd
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                time.sleep(0.1)
        raise RuntimeError("unreachable")  # pragma: no cover

    def _load(self) -> tuple[bytes, list[tuple[int, bytes]]]:
        data = b""
        chunks = []
        while chunk := os.read(self._fd, 1 << 20):
            chunks.append(chunk)
        data = b"".join(chunks)
        if len(data) < SPOOL_HEADER or data[:len(SPOOL_MAGIC)] != SPOOL_MAGIC or data[len(SPOOL_MAGIC)] != SPOOL_VERSION:
            if data:
                log.error("audit spool %s is not a spool (or of another version): starting it anew", self.path)
            spool_id = os.urandom(SPOOL_ID_BYTES)
            os.ftruncate(self._fd, 0)
            os.pwrite(self._fd, SPOOL_MAGIC + bytes([SPOOL_VERSION]) + spool_id, 0)
            os.fsync(self._fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path.with_suffix(".ack"))
            return spool_id, []
        spool_id = data[len(SPOOL_MAGIC) + 1:SPOOL_HEADER]
        events: list[tuple[int, bytes]] = []
        at = SPOOL_HEADER
        while at + 4 <= len(data):
            (length,) = struct.unpack_from(">I", data, at)
            if length > MAX_FRAME or at + 4 + length > len(data):
                break
            packed = data[at + 4:at + 4 + length]
            try:
                n = msgpack.unpackb(packed)[0]
            except Exception:
                break
            if type(n) is not int:
                break
            events.append((n, packed))
            at += 4 + length
        if at != len(data):
            log.warning("audit spool %s: a torn last record (a crash mid-write) is cut off", self.path)
            os.ftruncate(self._fd, at)
        return spool_id, events

    def _read_ack(self) -> int | None:
        """The last number the core acknowledged; None if the mark is missing or torn."""
        raw = os.pread(self._ack_fd, 8, 0)
        return int(struct.unpack(">Q", raw)[0]) if len(raw) == 8 else None

    def put(self, event: Event) -> None:
        """Append one event, to the file at once (the process may crash right after)."""
        self.last += 1
        row = _event_row(self.last, event)
        packed = msgpack.packb(row, use_bin_type=True)
        frame = struct.pack(">I", len(packed)) + packed
        os.write(self._fd, frame)
        self.written += len(frame)
        if len(self._memory) < MAX_MEMORY_EVENTS:
            self._memory.append((self.last, row))
        else:
            self._complete = False
        if self._dirty_since is None:
            self._dirty_since = time.monotonic()
        self.wakeup.set()

    def pending(self, limit: int = SHIP_BATCH) -> list[Any]:
        """Up to ``limit`` unacknowledged events, oldest first, as ``append`` takes them."""
        if not self._memory and not self._complete:
            self._reload()
        return [row for _, row in itertools.islice(self._memory, limit)]

    def _reload(self) -> None:
        os.lseek(self._fd, 0, os.SEEK_SET)
        _, events = self._load()
        self._memory = deque((n, msgpack.unpackb(p)) for n, p in events if n > self.acked)
        while len(self._memory) > MAX_MEMORY_EVENTS:
            self._memory.pop()
        self._complete = not events or events[-1][0] <= (self._memory[-1][0] if self._memory else self.acked)
        os.lseek(self._fd, 0, os.SEEK_END)

    def acknowledge(self, last: int) -> None:
        """The core has every event up to ``last``: forget them (empty the file when all are)."""
        if last <= self.acked:
            return
        self.acked = min(last, self.last)
        while self._memory and self._memory[0][0] <= self.acked:
            self._memory.popleft()
        # In place, not synced: a lost or torn mark only re-sends records the core skips.
        os.pwrite(self._ack_fd, struct.pack(">Q", self.acked), 0)
        if self.acked == self.last and self._complete and self.written > COMPACT_BYTES:
            os.fsync(self._ack_fd)  # the mark must outlive the events it replaces
            os.ftruncate(self._fd, SPOOL_HEADER)
            os.lseek(self._fd, 0, os.SEEK_END)
            self.written = SPOOL_HEADER

    def sync(self) -> None:
        """fsync what was written (the shipper does it every FSYNC_EVERY_S)."""
        if self._dirty_since is not None:
            os.fsync(self._fd)
            os.fsync(self._ack_fd)
            self._dirty_since = None

    @property
    def backlog(self) -> int:
        return self.last - self.acked

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                self.sync()
            os.close(self._fd)
            os.close(self._ack_fd)
            self._fd = -1


class Shipper:
    """Sends a spool's events to ``UAudit::Log`` with ``call`` (a client's call bound to
    the process's service credentials) until closed; see the module docstring."""

    def __init__(self, spool: Spool, call: Callable[..., Any]) -> None:
        self.spool = spool
        self._call = call
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self.shipped = 0
        self.failures = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"audit shipper {self.spool.name}")

    async def _run(self) -> None:
        delay = 0.05
        warned = 0.0
        last_sync = time.monotonic()
        # The loop ends on ``_closing`` as well as on cancellation: Python 3.11's wait_for
        # swallows a cancellation that races the event it waits for (a last record put
        # just before close), and the task would go on for ever.
        while not self._closing:
            if time.monotonic() - last_sync >= FSYNC_EVERY_S:
                self.spool.sync()
                last_sync = time.monotonic()
            if not self.spool.backlog:
                self.spool.wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.spool.wakeup.wait(), FSYNC_EVERY_S)
                continue
            if self.spool.backlog < SHIP_BATCH:
                await asyncio.sleep(SHIP_LINGER_S)  # let a burst gather into one append
            try:
                await self.ship_once()
                delay = 0.05
            except (RemoteError, CredentialsError, OSError) as exc:
                self.failures += 1
                if time.monotonic() - warned > SHIP_WARN_EVERY_S:
                    warned = time.monotonic()
                    log.warning("audit records not delivered yet (%d spooled in %s): %s",
                                self.spool.backlog, self.spool.path, exc)
                await asyncio.sleep(delay)
                delay = min(SHIP_RETRY_MAX_S, delay * 2)

    async def ship_once(self, timeout_s: float = 5.0) -> int:
        """Send one batch; how many events the core now holds from this spool."""
        batch = self.spool.pending()
        if not batch:
            return 0
        answer = await self._call(AUDIT_LOG, "append", origin=self.spool.origin, events=batch, timeout_s=timeout_s)
        last = answer.get("last") if isinstance(answer, dict) else None
        if type(last) is not int:
            raise RemoteError("UAudit::Log answered append without 'last'")
        before = self.spool.acked
        self.spool.acknowledge(last)
        self.shipped += self.spool.acked - before
        return self.spool.acked - before

    async def close(self, flush_s: float = 1.0) -> None:
        """Stop; first try (for up to ``flush_s``) to deliver what is spooled."""
        self._closing = True
        self.spool.wakeup.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        deadline = time.monotonic() + flush_s
        while self.spool.backlog and time.monotonic() < deadline:
            try:
                await self.ship_once(timeout_s=max(0.05, deadline - time.monotonic()))
            except (RemoteError, CredentialsError, OSError):
                break
        self.spool.close()
