"""The benchmark schemas: a stream that commits on request, and a table to join.

``UBench::Stream`` keeps a volatile relation ``rows(k int key, payload bytes)``. The
update operation ``burst`` asks its ``run`` task to commit ``n`` row changes,
``per_commit`` changes per transaction, back to back; the task yields to the loop every
``yield_every`` commits so the instance keeps serving requests and its channel flushes.
``echo`` is the trivial read operation of the round-trip benchmark.

``UBench::Table`` keeps ``items(k int key, name str, x float, y float, payload bytes)``;
``fill`` inserts rows (built by :func:`rows.table_row`, as the raw baseline builds them)
for the join benchmark.

The site imports this module as ``schemas`` with ``bench/`` on ``sys.path``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from rows import STREAM_KEYS, stream_payload, table_row
from ubicore.errors import BadArguments
from ubicore.schema import Column, Relation, Schema, read, update
from ubicore.store import Transaction

STREAM = "UBench::Stream"
TABLE = "UBench::Table"
MAX_BURST = 10_000_000
MAX_PAYLOAD_BYTES = 1 << 20


class Stream(Schema, name=STREAM, protection="open"):
    """Commits row changes back to back on request."""

    rows = Relation(Column("k", int), Column("payload", bytes), key=("k",))

    def __init__(self, cell: str, options: Any = None) -> None:
        super().__init__(cell, options)
        self._requests: asyncio.Queue[tuple[int, int, int, int]] = asyncio.Queue()
        self._counter = 0
        self._busy = False
        self._cancel = False
        self.committed = 0

    async def run(self, ctx: Any) -> None:
        while True:
            n, size, per_commit, yield_every = await self._requests.get()
            self._busy, self._cancel = True, False
            try:
                await self._burst(ctx, n, size, per_commit, yield_every)
            finally:
                self._busy = False

    async def _burst(self, ctx: Any, n: int, size: int, per_commit: int, yield_every: int) -> None:
        filler = b"\xa5" * size
        commits = n // per_commit
        counter = self._counter
        for c in range(commits):
            if self._cancel:
                break
            with ctx.transaction() as tx:
                rel = tx.rows
                for _ in range(per_commit):
                    counter += 1
                    rel.upsert(k=counter % STREAM_KEYS, payload=stream_payload(counter, size, filler))
            self.committed += 1
            if (c + 1) % yield_every == 0:
                await asyncio.sleep(0)
        self._counter = counter

    @update
    def burst(self, tx: Transaction, n: int, size: int, per_commit: int = 1, yield_every: int = 64) -> int:
        """Commit ``n`` changes (``per_commit`` per transaction) from the run task."""
        if not 1 <= n <= MAX_BURST or not 1 <= per_commit <= n or n % per_commit:
            raise BadArguments("n must be a positive multiple of per_commit", {"argument": "n"})
        if not 8 <= size <= MAX_PAYLOAD_BYTES or yield_every < 1:
            raise BadArguments("size must be in [8, 1 MiB] and yield_every positive", {"argument": "size"})
        self._requests.put_nowait((n, size, per_commit, yield_every))
        return n // per_commit

    @update
    def cancel(self, tx: Transaction) -> None:
        """Stop the running burst after its current commit."""
        self._cancel = True

    @read
    def status(self, tx: Transaction) -> dict[str, Any]:
        """Whether a burst runs or waits, and how many commits were made so far."""
        return {"busy": self._busy or not self._requests.empty(), "committed": self.committed}

    @read
    def echo(self, tx: Transaction, x: int) -> int:
        """Return ``x``."""
        return x


class Table(Schema, name=TABLE, protection="open"):
    """A relation to join."""

    items = Relation(
        Column("k", int),
        Column("name", str),
        Column("x", float),
        Column("y", float),
        Column("payload", bytes),
        key=("k",),
    )

    @update
    def fill(self, tx: Transaction, start: int, count: int) -> int:
        """Insert rows ``start`` .. ``start + count - 1``; returns how many there are now."""
        items = tx.items
        for i in range(start, start + count):
            k, name, x, y, payload = table_row(i)
            items.upsert(k=k, name=name, x=x, y=y, payload=payload)
        return start + count
