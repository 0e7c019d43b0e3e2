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

from .chain import ACTIONS, OUTCOMES
from .spool import (
    AUDIT_ALERTS,
    AUDIT_LOG,
    COMPACT_BYTES,
    REJECTED_PER_S,
    SPOOL_HEADER,
    SPOOL_ID_BYTES,
    SPOOL_MAGIC,
    SPOOL_VERSION,
    Auditor,
    Shipper,
    Spool,
    audit_paths,
    event_from_row,
)
from .writer import RECENT, CoreWriter

__all__ = [
    "ACTIONS", "AUDIT_ALERTS", "AUDIT_LOG", "COMPACT_BYTES", "OUTCOMES", "RECENT", "REJECTED_PER_S", "SPOOL_HEADER",
    "SPOOL_ID_BYTES", "SPOOL_MAGIC", "SPOOL_VERSION", "Auditor", "CoreWriter", "Shipper", "Spool", "audit_paths",
    "event_from_row",
]
