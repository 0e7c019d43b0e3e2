"""Feeding the audit trail: from every process to ``UAudit::Log`` at the core.

Producers. An instance (and a controller) reports what happens through an
:class:`Auditor`: a callable ``(action, outcome, principal, address, detail)`` that
stamps the time, host, cell and schema, applies the site's
``skip_users_containing`` filter (never to failed logins or rejected messages: a
guesser could otherwise hide behind the filter) and caps rejected-message records at
:data:`REJECTED_PER_S` a second (the rest are counted into the next one).

Spooling. Outside the core, events go to a :class:`Spool` first: an append-only file
per process under the site's spool directory (``<dataset>/spool``), written before the
action's reply leaves (so a crash of the process loses nothing it acknowledged). A
:class:`Shipper` sends what the core has not acknowledged yet in batches
(``UAudit::Log.append``, as the process's service user) and retries while the core is
down; on restart a process ships what its previous run left. Each event carries its
spool's sequence number; the core remembers the last one taken per spool, so a batch
sent twice (its acknowledgement lost) is recorded once.

The spool file: ``b"UBISPOOL"``, a version byte (1), the spool's 16-byte id, then
frames of a 4-byte big-endian length and a msgpack array ``[n, time, host, cell, schema,
principal, address, action, outcome, detail]``. A torn last frame (a crash mid-write)
is cut off at open. ``<name>.ack`` holds the last ``n`` the core acknowledged (8 bytes,
big-endian, written in place); a spool whose mark is lost and that holds no event takes
a new id, so that an origin's numbers never go back. Once everything is acknowledged
and the file passed 1 MiB, the spool is emptied.

At the core. :class:`CoreWriter` is the one writer of the trail: the core's own events
and every ``append`` go through it, chained and MACed (ubicore/audit/chain.py), with a
signed checkpoint every ``checkpoint_records`` records or ``checkpoint_s`` seconds. It
feeds every committed record to the thresholds (ubicore/audit/watch.py): an alert goes
to ``UAudit::Alerts`` and into the trail; a lockout goes to ``UPerm::Config``'s
``lockouts``, where every instance's guard sees it.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import itertools
import logging
import os
import sqlite3
import struct
import time
from collections import deque
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import msgpack

from ..config.model import AuditConfig, SiteConfig
from ..errors import CredentialsError, RemoteError
from ..security.policy import DEFAULT_USER
from .chain import ACTIONS, OUTCOMES, Chain, Event, Record, check_event
from .keys import AuditKeys, append_checkpoint
from .watch import Alert, Lockout, Watch

log = logging.getLogger(__name__)

__all__ = [
    "AUDIT_LOG",
    "AUDIT_ALERTS",
    "Auditor",
    "CoreWriter",
    "Shipper",
    "Spool",
    "audit_paths",
]

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


def _shown(r: Record) -> dict[str, Any]:
    """A record as the tools show it: the proofs stay in the trail."""
    return {c: getattr(r, c) for c in _RECORD_COLUMNS[:11]}


# --- the core's writer ---------------------------------------------------------------------------


RECENT = 200
"""Records ``UAudit::Log`` also keeps in its ``recent`` relation, for live watchers."""
PUBLISH_EVERY_S = 0.1
"""How often ``recent`` takes the new records (one commit, one channel message, per period)."""
_RECORD_COLUMNS = ("seq", "time", "host", "cell", "schema", "principal", "address", "action", "outcome", "detail",
                   "origin", "prev", "hash", "mac")
_TRAIL_SQL = (
    "CREATE TABLE IF NOT EXISTS records (seq INTEGER PRIMARY KEY, time REAL, host TEXT, cell TEXT, schema TEXT, "
    "principal TEXT, address TEXT, action TEXT, outcome TEXT, detail TEXT, origin TEXT, prev BLOB, hash BLOB, "
    "mac BLOB)",
    "CREATE TABLE IF NOT EXISTS origins (origin TEXT PRIMARY KEY, last INTEGER NOT NULL, submitter TEXT NOT NULL)",
    "CREATE INDEX IF NOT EXISTS records_principal ON records (principal)",
    "CREATE INDEX IF NOT EXISTS records_time ON records (time)",
)


class CoreWriter:
    """The one writer of the trail (see the module docstring).

    The trail is an SQLite file of its own (``trail_path``, WAL, ``synchronous=FULL``,
    mode 0600): ``records`` and ``origins`` (the last event taken from each spool), so
    a batch and its dedupe mark commit together, and the core's memory holds only the
    newest :data:`RECENT` records (``UAudit::Log``'s ``recent`` relation, for
    watchers), however long the trail grows. ``log_core`` and ``alerts_core`` are the
    InstanceCores of ``UAudit::Log`` and ``UAudit::Alerts``; ``lockouts`` writes the
    policy's lockouts (a callable taking the current ones).
    """

    def __init__(
        self, trail_path: Path, log_core: Any, alerts_core: Any, keys: AuditKeys, checkpoint_path: Path,
        config: AuditConfig, lockouts: Callable[[list[Lockout]], None], *, host: str,
        clock: Callable[[], float] = time.time, countable: Callable[[str], bool] = lambda user: True,
    ) -> None:
        self.trail_path = Path(trail_path)
        self.core = log_core
        self.alerts_core = alerts_core
        self.keys = keys
        self.checkpoint_path = checkpoint_path
        self.config = config
        self._write_lockouts = lockouts
        self.host = host
        self._clock = clock
        self.db = self._open(self.trail_path)
        last = self.db.execute("SELECT seq, hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        self.committed: tuple[int, bytes] = (int(last[0]), bytes(last[1])) if last else (0, bytes(32))
        self._since_checkpoint = 0
        self._checkpointed = self.committed[0]
        self._queue: list[tuple[Event, str]] = []
        self._scheduled = False
        self.watch = Watch(config, countable=lambda user: user != DEFAULT_USER and countable(user))
        self._observing: list[Record] = []
        self.appended = 0
        self._pending_publish: list[Record] = []
        self._publish_scheduled = False
        self._publish(self._newest(RECENT))

    @staticmethod
    def _open(path: Path) -> sqlite3.Connection:
        from ..errors import StoreError

        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            try:
                os.fchmod(fd, 0o600)  # one made by an older version, or by hand, too
            finally:
                os.close(fd)
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            for statement in _TRAIL_SQL:
                db.execute(statement)
            return db
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"{path}: cannot open the audit trail: {exc}") from None

    def close(self) -> None:
        self.db.close()

    # producers ------------------------------------------------------------------------------

    def local(self, event: Event) -> None:
        """An event of the core itself: recorded within this loop turn."""
        self._queue.append((event, f"core on {self.host}"))
        if not self._scheduled:
            self._scheduled = True
            with contextlib.suppress(RuntimeError):  # no loop (closing): flush() is called at the end
                asyncio.get_running_loop().call_soon(self.flush)

    def flush(self) -> None:
        """Record the core's own queued events (one trail transaction)."""
        self._scheduled = False
        queue, self._queue = self._queue, []
        if not queue:
            return
        try:
            self._write(queue, None, 0)
        except Exception:
            log.exception("the core could not record %d audit events", len(queue))

    def append(self, origin: str, submitter: str, events: list[Any]) -> int:
        """``UAudit::Log.append``: record the new events of ``origin`` (a spool) with its
        dedupe mark, in one transaction; the last spool number taken. BadArguments for a
        malformed event (nothing recorded), RemoteFailure if the trail cannot be written."""
        from ..errors import BadArguments, RemoteFailure

        from ..errors import PermissionDenied

        row = self.db.execute("SELECT last, submitter FROM origins WHERE origin = ?", (origin,)).fetchone()
        if row is not None and row[1] != submitter:  # a spool is one process's: nobody else appends to it
            raise PermissionDenied(f"{origin.partition(':')[0][:8]}… is another user's spool", {"groups": []})
        last = int(row[0]) if row else 0
        spool_id, _, name = origin.partition(":")
        label = f"{name or origin} [{spool_id[:8]}] as {submitter}"
        fresh: list[tuple[Event, str]] = []
        newest = last
        for i, raw in enumerate(events):
            try:
                n, event = event_from_row(raw)
            except ValueError as exc:
                raise BadArguments(f"events[{i}]: {exc}", {"argument": "events"}) from None
            if n <= newest:
                continue
            newest = n
            fresh.append((event, label))
        if newest == last:
            return last
        try:
            self._write(fresh, origin, newest, submitter)
        except sqlite3.Error as exc:
            log.error("the audit trail %s could not be written: %s", self.trail_path, exc)
            raise RemoteFailure("the audit trail could not be written") from None
        return newest

    def _write(self, events: list[tuple[Event, str]], origin: str | None, last: int, submitter: str = "") -> None:
        remote = origin is not None  # event_from_row checked those already
        chain = Chain(self.keys, *self.committed)
        records = [chain.append(event, label, checked=remote) for event, label in events]
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            db.executemany(f"INSERT INTO records VALUES ({', '.join('?' * len(_RECORD_COLUMNS))})",
                           [tuple(getattr(r, c) for c in _RECORD_COLUMNS) for r in records])
            if origin is not None:
                db.execute("INSERT INTO origins VALUES (?, ?, ?) ON CONFLICT(origin) DO UPDATE SET last = excluded.last",
                           (origin, last, submitter))
            db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            raise
        self.committed = (chain.last_seq, chain.last_hash)
        self.appended += len(records)
        self._since_checkpoint += len(records)
        if self._since_checkpoint >= self.config.checkpoint_records:
            self.checkpoint()
        self._pending_publish.extend(records[-RECENT:])
        if len(self._pending_publish) > RECENT:
            del self._pending_publish[:-RECENT]
        if not self._publish_scheduled:
            self._publish_scheduled = True
            try:
                asyncio.get_running_loop().call_later(PUBLISH_EVERY_S, self._publish_pending)
            except RuntimeError:  # no loop (closing): now
                self._publish_pending()
        if records:
            if not self._observing:
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().call_soon(self._observe)
            self._observing.extend(records)

    def _publish_pending(self) -> None:
        self._publish_scheduled = False
        records, self._pending_publish = self._pending_publish, []
        self._publish(records)

    def _publish(self, records: list[Record]) -> None:
        """Show new records in ``UAudit::Log``'s ``recent`` relation (the newest RECENT)."""
        if not records:
            return
        tx = self.core.store.transaction(writable=True)
        try:
            recent = tx.recent
            for r in records[-RECENT:]:
                recent.insert(**{c: getattr(r, c) for c in _RECORD_COLUMNS[:11]})
            excess = len(self.core.store.tables["recent"]) + min(len(records), RECENT) - RECENT
            if excess > 0:
                for key in sorted(self.core.store.tables["recent"])[:excess]:
                    recent.delete(*key)
            self.core.commit(tx)
        except Exception:
            tx.rollback()
            log.exception("recent audit records not published")

    # reading ----------------------------------------------------------------------------------

    def _newest(self, count: int) -> list[Record]:
        rows = self.db.execute(f"SELECT {', '.join(_RECORD_COLUMNS)} FROM records ORDER BY seq DESC LIMIT ?",
                               (count,)).fetchall()
        return [Record(*row) for row in reversed(rows)]

    def tail(self, count: int) -> list[dict[str, Any]]:
        """The newest ``count`` records, oldest first, without their proofs."""
        return [_shown(r) for r in self._newest(count)]

    def search(self, *, user: str = "", action: str = "", cell: str = "", outcome: str = "", since: float = 0.0,
               limit: int = 1000) -> list[dict[str, Any]]:
        """Records matching every filter given, oldest first, at most ``limit`` (the newest)."""
        where: list[str] = ["time >= ?"]
        args: list[Any] = [since]
        for column, value in (("principal", user), ("action", action), ("cell", cell), ("outcome", outcome)):
            if value:
                where.append(f"{column} = ?")
                args.append(value)
        rows = self.db.execute(f"SELECT {', '.join(_RECORD_COLUMNS)} FROM records WHERE {' AND '.join(where)} "
                               "ORDER BY seq DESC LIMIT ?", (*args, limit)).fetchall()
        return [_shown(Record(*row)) for row in reversed(rows)]

    def count(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM records").fetchone()[0])

    # checkpoints ------------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Sign the newest record's place in the chain into the checkpoint file."""
        seq, digest = self.committed
        self._since_checkpoint = 0
        if seq == 0 or seq == self._checkpointed:
            return
        try:
            append_checkpoint(self.checkpoint_path, Chain(self.keys, seq, digest).checkpoint(self._clock()))
            self._checkpointed = seq
        except Exception:
            log.exception("audit checkpoint not written to %s", self.checkpoint_path)

    async def run(self) -> None:
        """Checkpoint every ``checkpoint_s`` (while records keep coming)."""
        while True:
            await asyncio.sleep(self.config.checkpoint_s)
            self.checkpoint()

    # thresholds -------------------------------------------------------------------------------

    def _observe(self) -> None:
        records, self._observing = self._observing, []
        locks: list[Lockout] = []
        for r in records:
            if r.action in ("alert", "lockout"):
                continue
            # Failed logins count per user only for the site's password users (``countable``;
            # ``default`` has no password to guess): see Watch.
            for alert in self.watch.observe(time=r.time, action=r.action, outcome=r.outcome,
                                            principal=r.principal, address=r.address):
                self._alert(alert, locks)
        if locks:
            self._write_lockouts(self.watch.remembered(self._clock()))

    def _alert(self, alert: Alert, locks: list[Lockout]) -> None:
        tx = self.alerts_core.store.transaction(writable=True)
        try:
            alerts = tx.alerts
            newest = max((a.id for a in alerts), default=0)
            alerts.insert(id=newest + 1, time=alert.time, kind=alert.kind, subject=alert.subject, count=alert.count,
                          window_s=alert.window_s, lockout_s=alert.lockout_s)
            for old in sorted(alerts, key=lambda a: a.id)[:-1000]:
                alerts.delete(old.id)
            self.alerts_core.commit(tx)
        except Exception:
            tx.rollback()
            log.exception("alert not published: %s", alert)
        by_user = alert.kind.endswith("_user")
        text = (f"{alert.count} {alert.kind.replace('_per_', ' per ').replace('_', ' ')} in {alert.window_s:g} s: "
                f"{alert.subject}")
        log.warning("ALERT %r", text)
        self.local(Event(alert.time, self.host, "Site", AUDIT_ALERTS, alert.subject if by_user else "",
                         "" if by_user else alert.subject, "alert", "refused", text))
        if alert.lockout_s > 0:
            kind = "user" if by_user else "address"
            lk = self.watch.locked(kind, alert.subject, alert.time)
            if lk is not None:
                locks.append(lk)
                self.local(Event(alert.time, self.host, "Site", AUDIT_ALERTS, alert.subject if by_user else "",
                                 "" if by_user else alert.subject, "lockout", "ok",
                                 f"{kind} {alert.subject} locked out for {lk.until - lk.since:.0f} s "
                                 f"(strike {lk.strikes})"))

    def lockouts_changed(self, rows: Iterable[Any]) -> None:
        """The policy's lockouts as they are now: ones an operator cleared are forgotten."""
        present = {(r.kind, r.subject) for r in rows}
        for lk in self.watch.remembered(self._clock()):
            if (lk.kind, lk.subject) not in present:
                self.watch.clear(lk.kind, lk.subject)


__all__ += ["ACTIONS", "OUTCOMES", "event_from_row"]
