"""The core's end of the audit trail: :class:`CoreWriter`, the one writer of the trail
file, its checkpoints, and the thresholds that turn records into alerts and lockouts.
See ubicore/audit/trail.py for the whole path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from ..config.model import AuditConfig
from ..security.policy import DEFAULT_USER
from .chain import Chain, Event, Record
from .keys import AuditKeys, append_checkpoint
from .spool import AUDIT_ALERTS, event_from_row
from .watch import Alert, Lockout, Watch

log = logging.getLogger(__name__)

__all__ = ["RECENT", "CoreWriter"]

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
        self._publish_timer: asyncio.TimerHandle | None = None
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
        """Close the trail file; what ``recent`` has not shown yet is shown now."""
        if self._publish_timer is not None:
            self._publish_timer.cancel()
            self._publish_timer = None
        if self._pending_publish:
            self._publish_pending()
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
        if self._publish_timer is None:
            try:
                self._publish_timer = asyncio.get_running_loop().call_later(PUBLISH_EVERY_S, self._publish_pending)
            except RuntimeError:  # no loop (closing): now
                self._publish_pending()
        if records:
            if not self._observing:
                with contextlib.suppress(RuntimeError):
                    asyncio.get_running_loop().call_soon(self._observe)
            self._observing.extend(records)

    def _publish_pending(self) -> None:
        self._publish_timer = None
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


def _shown(r: Record) -> dict[str, Any]:
    """A record as the tools show it: the proofs stay in the trail."""
    return {c: getattr(r, c) for c in _RECORD_COLUMNS[:11]}
