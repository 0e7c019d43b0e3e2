"""Schemas for tests: ``UTest::Counter``, a small service with every kind of state.

Importing this module declares the schema (the registry of schemas is per process, so
the name is taken once). The in-process site of :mod:`ubicore.testing.site` imports it
and deploys one instance at ``Site`` by default.

``UTest::Counter`` holds

- ``counters`` (volatile): named integer counters with an optional payload string;
- ``notes`` (persistent): text notes that survive a restart;
- ``bursts`` (volatile): one row per :meth:`Counter.burst` request, ``done`` once its
  commits are all made.

``burst(n)`` is how tests make *many separate* delta batches quickly: one operation is
one transaction, so the operation only records the request, and the instance's
``run()`` loop then commits ``n`` transactions back to back, without yielding to the
event loop, before it marks the burst done.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Mapping
from typing import Any

from ..errors import BadArguments, NotFound
from ..schema import Column, Relation, Schema, read, update
from ..store import Transaction

__all__ = ["COUNTER", "MAX_BURST_COMMITS", "Counter"]

COUNTER = "UTest::Counter"
MAX_BURST_COMMITS = 1_000_000
MAX_PAYLOAD_BYTES = 1 << 20


class Counter(Schema, name=COUNTER, protection="open"):
    """Named counters (volatile), notes (persistent) and a burst generator."""

    counters = Relation(
        Column("name", str),
        Column("value", int, default=0),
        Column("payload", str, default=""),
        key=("name",),
    )
    notes = Relation(Column("key", str), Column("text", str), key=("key",), persistent=True)
    bursts = Relation(
        Column("burst", int),
        Column("commits", int),
        Column("done", bool, default=False),
        key=("burst",),
    )

    def __init__(self, cell: str, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(cell, options)
        self._pending: deque[tuple[int, int, int, int]] = deque()
        self._wake = asyncio.Event()

    async def run(self, ctx: Any) -> None:
        """Carry out the bursts asked for, one after another."""
        while True:
            while self._pending:
                self._burst(ctx, *self._pending.popleft())
            await self._wake.wait()
            self._wake.clear()

    @staticmethod
    def _burst(ctx: Any, burst_id: int, n: int, keys: int, size: int) -> None:
        payload = "x" * size
        for i in range(n):
            with ctx.transaction() as tx:
                tx.counters.upsert(name=f"b{i % keys:05d}", value=i, payload=payload)
        with ctx.transaction() as tx:
            tx.bursts.update(burst=burst_id, done=True)

    @update
    def bump(self, tx: Transaction, name: str, by: int = 1) -> int:
        """Add ``by`` to a counter (created at 0); its new value."""
        row = tx.counters.get(name)
        value = (0 if row is None else row.value) + by
        tx.counters.upsert(name=name, value=value)
        return int(value)

    @update
    def set_value(self, tx: Transaction, name: str, value: int, payload: str = "") -> None:
        """Set a counter, creating it if needed."""
        tx.counters.upsert(name=name, value=value, payload=payload)

    @update
    def insert(self, tx: Transaction, name: str, value: int = 0) -> None:
        """Create a counter; a name that exists breaks the key (a remote failure)."""
        tx.counters.insert(name=name, value=value)

    @update
    def remove(self, tx: Transaction, name: str) -> bool:
        """Delete a counter; whether it existed."""
        return tx.counters.delete(name) is not None

    @update
    def note(self, tx: Transaction, key: str, text: str) -> None:
        """Write a persistent note."""
        tx.notes.upsert(key=key, text=text)

    @update
    def fail(self, tx: Transaction, message: str) -> None:
        """Change a counter, then raise RuntimeError(message): nothing may commit."""
        tx.counters.upsert(name="failed", value=1)
        raise RuntimeError(message)

    @update
    def burst(self, tx: Transaction, n: int, keys: int = 16, size: int = 0) -> int:
        """Commit ``n`` separate transactions soon after this call; the burst's id.

        Commit ``i`` sets counter ``b{i % keys:05d}`` to ``i`` with a payload of ``size``
        bytes; the burst's row in ``bursts`` turns ``done`` after the last one.
        """
        if not 0 < n <= MAX_BURST_COMMITS:
            raise BadArguments(f"n must be in [1, {MAX_BURST_COMMITS}]", {"argument": "n"})
        if not 0 < keys <= n:
            raise BadArguments("keys must be in [1, n]", {"argument": "keys"})
        if not 0 <= size <= MAX_PAYLOAD_BYTES:
            raise BadArguments(f"size must be in [0, {MAX_PAYLOAD_BYTES}]", {"argument": "size"})
        burst_id = len(tx.bursts) + 1
        tx.bursts.insert(burst=burst_id, commits=n)
        self._pending.append((burst_id, n, keys, size))
        self._wake.set()
        return burst_id

    @read
    def get(self, tx: Transaction, name: str) -> int:
        """A counter's value."""
        row = tx.counters.get(name)
        if row is None:
            raise NotFound(f"no counter {name!r}")
        return int(row.value)
