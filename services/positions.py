"""``ULocation::Positions``: tag positions, fed by a simulator at a configurable rate.

A sample service for the demo and the benchmarks. Positions live in a volatile
relation (streamed at a high rate, not worth a disk write). Each simulator tick moves
every tag a small random step inside its cell's 50 m × 50 m square and commits all of
them in one transaction, i.e. one delta batch per tick.

Options: ``rate_hz`` (ticks per second, default 5; 0 stops the simulator), ``tags``
(how many tags, default 6), ``seed`` (random seed, for repeatable runs).
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from typing import Any

from ubicore.errors import BadArguments, NotFound
from ubicore.schema import Column, Relation, Schema, read, update
from ubicore.store import Transaction

log = logging.getLogger(__name__)

SCHEMA = "ULocation::Positions"
SIMULATED_TAG = re.compile(r"T-(\d+)")
AREA_M = 50.0
STEP_M = 0.5
MAX_RATE_HZ = 1000.0


class Positions(Schema, name=SCHEMA, protection="open"):
    """Tag positions in a cell."""

    positions = Relation(
        Column("tag", str),
        Column("x", float),
        Column("y", float),
        Column("z", float, default=0.0),
        Column("t", float),
        key=("tag",),
    )
    simulator = Relation(
        Column("name", str),
        Column("rate_hz", float),
        Column("tags", int),
        Column("ticks", int, default=0),
        key=("name",),
    )

    async def run(self, ctx: Any) -> None:
        rng = random.Random(self.options.get("seed"))
        with ctx.transaction() as tx:
            tx.simulator.upsert(
                name="sim",
                rate_hz=float(self.options.get("rate_hz", 5.0)),
                tags=int(self.options.get("tags", 6)),
            )
        rate = float(self.options.get("rate_hz", 5.0))
        while True:
            try:
                with ctx.transaction() as tx:
                    sim = tx.simulator.get("sim")
                    rate = sim.rate_hz
                    if rate > 0:
                        self._tick(tx, rng, sim.tags)
                        tx.simulator.update(name="sim", ticks=sim.ticks + 1)
            except Exception:  # one bad tick must not stop the simulator
                log.exception("%s at %s: a simulator tick failed", SCHEMA, self.cell)
            await asyncio.sleep(1.0 / rate if rate > 0 else 0.5)

    def _tick(self, tx: Transaction, rng: random.Random, tags: int) -> None:
        now = time.time()
        for i in range(tags):
            tag = f"T-{i + 1:03d}"
            old = tx.positions.get(tag)
            if old is None:
                x, y = rng.uniform(0, AREA_M), rng.uniform(0, AREA_M)
            else:
                x = min(AREA_M, max(0.0, old.x + rng.uniform(-STEP_M, STEP_M)))
                y = min(AREA_M, max(0.0, old.y + rng.uniform(-STEP_M, STEP_M)))
            tx.positions.upsert(tag=tag, x=round(x, 3), y=round(y, 3), t=now)
        for row in list(tx.positions):
            simulated = SIMULATED_TAG.fullmatch(row.tag)
            if simulated is not None and int(simulated.group(1)) > tags:
                tx.positions.delete(row.tag)  # placed tags (other names) are left alone

    @update
    def set_rate(self, tx: Transaction, rate_hz: float) -> None:
        """Set the simulator's ticks per second (0 pauses it)."""
        if not 0.0 <= rate_hz <= MAX_RATE_HZ:
            raise BadArguments(f"rate_hz must be in [0, {MAX_RATE_HZ:g}]", {"argument": "rate_hz"})
        tx.simulator.update(name="sim", rate_hz=rate_hz)

    @update
    def set_tags(self, tx: Transaction, tags: int) -> None:
        """Set how many tags the simulator moves."""
        if not 0 <= tags <= 100_000:
            raise BadArguments("tags must be in [0, 100000]", {"argument": "tags"})
        tx.simulator.update(name="sim", tags=tags)

    @update
    def place(self, tx: Transaction, tag: str, x: float, y: float, z: float = 0.0) -> None:
        """Put a tag at a position by hand."""
        tx.positions.upsert(tag=tag, x=x, y=y, z=z, t=time.time())

    @read
    def where(self, tx: Transaction, tag: str) -> dict[str, Any]:
        """A tag's last position."""
        row = tx.positions.get(tag)
        if row is None:
            raise NotFound(f"no tag {tag!r}")
        return row._asdict()  # type: ignore[no-any-return]
