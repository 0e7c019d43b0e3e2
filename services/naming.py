"""``UNaming::Registry``: who runs where, and in what state.

Two volatile relations. ``instances`` holds the registration of every running instance
(its endpoints, instance id and protection level); clients follow it to find services
and to rebind when one restarts or moves. ``services`` holds the administration state
of each planned instance: desired versus actual state, restarts, the last problem, as
controllers report it. Both are rebuilt after a core restart: instances re-register and
controllers re-report within one reconcile period.

The registry is update-protected: anyone reads it (clients find services without
logging in), but ``register``, ``deregister`` and ``report`` need a session whose user
has update on ``UNaming::Registry`` (the factory policy gives it to the group
``services``: service users with cached credentials, DESIGN.md §7). A registration
below the level the site runs the schema at (its ``UPerm::Config`` level, else its
deployment's, else its declaration's) is refused, so even a service user cannot talk
clients of a protected schema into clear calls.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ubicore.errors import BadArguments, NotFound, PermissionDenied
from ubicore.protocol.messages import INSTANCE_ID_BYTES
from ubicore.schema import Column, Relation, Schema, read, update
from ubicore.store import Transaction

SCHEMA = "UNaming::Registry"
CORE_MODULES = frozenset({"UNaming", "UPerm", "UAudit"})
LEVELS = ("open", "update", "full")

LevelFloor = Callable[[str, str], "str | None"]
"""(schema, cell) → the lowest level a registration may claim (None: no floor known)."""


def _not_core(schema: str) -> None:
    if schema.split("::")[0] in CORE_MODULES:
        raise PermissionDenied(f"{schema} is a core service: only the core registers it", {"groups": []})


class Registry(Schema, name=SCHEMA, protection="update"):
    """The naming registry of a site."""

    level_floor: LevelFloor | None = None
    """Set by the core (ubicore/runtime.py): the level each (schema, cell) runs at."""

    instances = Relation(
        Column("schema", str),
        Column("cell", str),
        Column("host", str),
        Column("rpc", str),
        Column("events", str),
        Column("instance_id", bytes),
        Column("protection", str),
        Column("pid", int, default=0),
        Column("started", float, default=0.0),
        Column("local", str, default=""),
        key=("schema", "cell"),
    )
    services = Relation(
        Column("schema", str),
        Column("cell", str),
        Column("host", str),
        Column("desired", str, default="running"),
        Column("actual", str, default="starting"),
        Column("restarts", int, default=0),
        Column("detail", str, default=""),
        Column("updated", float, default=0.0),
        key=("schema", "cell"),
    )

    @update
    def register(
        self,
        tx: Transaction,
        schema: str,
        cell: str,
        host: str,
        rpc: str,
        events: str,
        instance_id: bytes,
        protection: str,
        pid: int = 0,
        local: str = "",
    ) -> None:
        """Record (or replace) the registration of a running instance (``local``: its
        ipc endpoint, where OS users of its host log in). The core's own services
        (UNaming, UPerm) are registered by the core alone."""
        _not_core(schema)
        if len(instance_id) != INSTANCE_ID_BYTES:
            raise BadArguments(f"instance_id must be {INSTANCE_ID_BYTES} bytes", {"argument": "instance_id"})
        if protection not in LEVELS:
            raise BadArguments(f"protection {protection!r}: one of {', '.join(LEVELS)}", {"argument": "protection"})
        floor = self.level_floor(schema, cell) if self.level_floor is not None else None
        if floor is None and self.level_floor is not None:
            raise PermissionDenied(
                f"refused: the core knows no level for {schema} at {cell} (is it deployed? a deployment added "
                "since the core started needs a core restart)", {"groups": []})
        if floor is not None and LEVELS.index(protection) < LEVELS.index(floor):
            raise PermissionDenied(
                f"refused: {schema} at {cell} runs at {floor} on this site; a registration at {protection} "
                "would downgrade its clients", {"groups": []})
        tx.instances.upsert(
            schema=schema, cell=cell, host=host, rpc=rpc, events=events,
            instance_id=instance_id, protection=protection, pid=pid, started=time.time(), local=local,
        )

    @update
    def deregister(self, tx: Transaction, schema: str, cell: str, instance_id: bytes) -> bool:
        """Remove a registration, if it is still this instance's."""
        _not_core(schema)
        row = tx.instances.get(schema, cell)
        if row is None or row.instance_id != instance_id:
            return False
        tx.instances.delete(schema, cell)
        return True

    @read
    def lookup(self, tx: Transaction, schema: str, cell: str) -> dict[str, object]:
        """The registration of (schema, cell)."""
        row = tx.instances.get(schema, cell)
        if row is None:
            raise NotFound(f"no instance of {schema} is registered at {cell}")
        return dict(row._asdict())

    @update
    def report(
        self,
        tx: Transaction,
        schema: str,
        cell: str,
        host: str,
        actual: str,
        restarts: int = 0,
        detail: str = "",
        desired: str = "running",
    ) -> None:
        """A controller's report of the actual state of an instance it runs."""
        _not_core(schema)
        tx.services.upsert(
            schema=schema, cell=cell, host=host, desired=desired, actual=actual,
            restarts=restarts, detail=detail, updated=time.time(),
        )
