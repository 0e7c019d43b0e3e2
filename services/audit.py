"""``UAudit::Log`` and ``UAudit::Alerts``: the site's audit trail and its alert channel.

Two core schema services (DESIGN.md §8), both fully protected and run by the core.

``UAudit::Log`` fronts the trail: one record per security-relevant event (logins,
denials, update operations, security-model changes, key rotations, rejected messages,
starts and stops, lockouts and alerts), each chained to the one before by its hash and
MACed under the audit key (ubicore/audit/chain.py), which the core keeps in its own
0600 file, apart from the trail. The trail is an SQLite file the core writes itself
(ubicore/audit/trail.py's CoreWriter), so that it may grow without growing the core's
memory; the ``recent`` relation shows its newest records to watchers. Instances and
controllers ``append`` what they spooled; the trail remembers the last event taken
from each spool, so a batch sent twice is recorded once. ``tail`` and ``search`` read it. Who may:
the factory policy lets ``services`` append and ``admin`` read; a (default, default)
rule never reaches UAudit.

``UAudit::Alerts`` is the alert channel: one ``alerts`` row per threshold crossed (failed
logins per user or address, denials, rejected messages), the newest
:data:`MAX_ALERTS` kept. Follow it (``ubi watch Site UAudit::Alerts``) to see attacks
as they happen. Lockouts themselves live in ``UPerm::Config`` (``lockouts``), where
every instance's policy sees them.
"""

from __future__ import annotations

from typing import Any, Protocol

from ubicore.errors import BadArguments
from ubicore.schema import Column, Relation, Schema, read, update
from ubicore.store import Transaction

LOG = "UAudit::Log"
ALERTS = "UAudit::Alerts"
MAX_ALERTS = 1000
MAX_EVENTS_PER_APPEND = 1000
MAX_READ = 10_000


class Writer(Protocol):
    """What the core plugs into ``UAudit::Log`` (ubicore/audit/trail.py's CoreWriter)."""

    def append(self, origin: str, submitter: str, events: list[Any]) -> int: ...

    def tail(self, count: int) -> list[dict[str, Any]]: ...

    def search(self, *, user: str = "", action: str = "", cell: str = "", outcome: str = "", since: float = 0.0,
               limit: int = 1000) -> list[dict[str, Any]]: ...


class Log(Schema, name=LOG, protection="full"):
    """The audit trail of a site. The trail itself is the core's file
    ``<dataset>/Site/UAudit%Log.udata`` (ubicore/audit/trail.py); ``recent`` shows its
    newest records to watchers."""

    recent = Relation(
        Column("seq", int),
        Column("time", float),
        Column("host", str),
        Column("cell", str),
        Column("schema", str),
        Column("principal", str),
        Column("address", str),
        Column("action", str),
        Column("outcome", str),
        Column("detail", str),
        Column("origin", str),
        key=("seq",),
    )

    writer: Writer | None = None
    """Set by the core; without it, every operation is refused."""

    def _writer(self) -> Writer:
        if self.writer is None:
            raise BadArguments("this instance of UAudit::Log is not the core's: it holds no trail")
        return self.writer

    @update
    def append(self, tx: Transaction, origin: str, events: list[Any]) -> dict[str, int]:
        """Record ``events`` spooled by ``origin`` (a spool's id and its process's name,
        ``"<32 hex>:<name>"``): each ``[n, time, host, cell, schema, principal, address,
        action, outcome, detail]`` with ``n`` rising within the spool. Events already
        taken from this spool are skipped. Returns ``{"last": n}``: the spool may forget
        everything up to ``n``. The records are durable when this returns."""
        writer = self._writer()
        if not 1 <= len(origin) <= 200:
            raise BadArguments("origin: 1..200 characters", {"argument": "origin"})
        if len(events) > MAX_EVENTS_PER_APPEND:
            raise BadArguments(f"at most {MAX_EVENTS_PER_APPEND} events an append", {"argument": "events"})
        return {"last": writer.append(origin, self.caller, events)}

    @read
    def tail(self, tx: Transaction, count: int = 20) -> list[dict[str, Any]]:
        """The newest ``count`` records, oldest first."""
        if not 1 <= count <= MAX_READ:
            raise BadArguments(f"count: 1..{MAX_READ}", {"argument": "count"})
        return self._writer().tail(count)

    @read
    def search(
        self, tx: Transaction, user: str = "", action: str = "", cell: str = "", since: float = 0.0,
        outcome: str = "", limit: int = 1000,
    ) -> list[dict[str, Any]]:
        """Records matching every filter given (``user``: the principal; ``since``: unix
        time), oldest first, at most ``limit`` (the newest ones)."""
        if not 1 <= limit <= MAX_READ:
            raise BadArguments(f"limit: 1..{MAX_READ}", {"argument": "limit"})
        return self._writer().search(user=user, action=action, cell=cell, outcome=outcome, since=since, limit=limit)


class Alerts(Schema, name=ALERTS, protection="full"):
    """The alert channel of a site."""

    alerts = Relation(
        Column("id", int),
        Column("time", float),
        Column("kind", str),
        Column("subject", str),
        Column("count", int),
        Column("window_s", float),
        Column("lockout_s", float),
        key=("id",),
        persistent=True,
    )
