"""Event throughput: from commit to a caching subscriber's callback, against raw PUB/SUB.

Ours: the bench process holds a :class:`ubicore.cache.Cache` of ``UBench::Stream`` with
an ``on_change`` callback counting events; the clock starts when ``burst`` is called
and stops at the N-th callback. The instance (in the ubicore child) commits N single
row changes back to back (or N/100 commits of 100 changes: a tick of 100 tags).

Raw: a child PUB sends N messages of the same payload size, one per event, to a SUB in
the bench process that counts them. A probe handshake makes sure the SUB is subscribed
before the run; HWMs are high enough that nothing should drop, and drops are counted.
Both sides of each variant run alternately, ``reps`` times.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from harness import MEASURE_TIMEOUT_S, Child, log, median, paired_ratio
from ubicore.cache import Cache
from ubicore.client import Client

STREAM = "UBench::Stream"
STREAM_CELL = "Bench-A"
RAW_HWM = 2_000_000
RAW_IDLE_MS = 1000
HANDSHAKE_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 10.0
TARGET_RATIO = 1.0


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    size: int
    per_commit: int
    yield_every: int


VARIANTS = (
    Variant("64B", 64, 1, 64),
    Variant("1KiB", 1024, 1, 64),
    Variant("64B_x100", 64, 100, 1),
    Variant("1KiB_x100", 1024, 100, 1),
)


class RawEvents:
    """The bench side of the raw baseline: a REQ on the child's control socket, a SUB."""

    def __init__(self, child: Child) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.ctl = self.ctx.socket(zmq.REQ)
        self.sub = self.ctx.socket(zmq.SUB)
        for s in (self.ctl, self.sub):
            s.setsockopt(zmq.LINGER, 0)
        self.ctl.setsockopt(zmq.RCVTIMEO, 5000)
        self.sub.setsockopt(zmq.RCVHWM, RAW_HWM)
        self.sub.setsockopt(zmq.RCVTIMEO, RAW_IDLE_MS)
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.ctl.connect(child.info["ctl"])
        self.sub.connect(child.info["pub"])

    def _command(self, *cmd: Any) -> None:
        self.ctl.send(msgpack.packb(list(cmd)))
        self.ctl.recv()

    def handshake(self) -> None:
        """Probe until a probe arrives: the subscription is in place. Then drain."""
        deadline = time.monotonic() + HANDSHAKE_TIMEOUT_S
        while True:
            if time.monotonic() > deadline:
                raise RuntimeError("raw SUB never received a probe")
            self._command("probe")
            if self.sub.poll(100):
                break
        while self.sub.poll(50):
            self.sub.recv()

    def run(self, n: int, size: int, timeout_s: float) -> dict[str, Any]:
        t0 = time.perf_counter()
        deadline = t0 + timeout_s
        self._command("run", n, size)
        count, t_end = self._receive(n, size, t0, deadline)
        if count < n:
            t_end = time.perf_counter() - (RAW_IDLE_MS / 1000 if t_end < deadline else 0)
            while self.sub.poll(200):  # drain what is still in flight before the next run
                self.sub.recv()
        elapsed = max(t_end - t0, 1e-9)
        return {"eps": count / elapsed, "received": count, "dropped": n - count, "elapsed_s": elapsed,
                "complete": count == n}

    def _receive(self, n: int, size: int, t0: float, deadline: float) -> tuple[int, float]:
        """Receive up to ``n`` messages (the hot loop; subclasses open them): how many
        arrived, and when the last one did (checked every 1024 messages, and at the end)."""
        sub_recv = self.sub.recv
        count = 0
        t_end = t0
        try:
            while count < n:
                sub_recv()
                count += 1
                if not count & 1023:
                    t_end = time.perf_counter()
                    if t_end > deadline:
                        break
            t_end = time.perf_counter()
        except zmq.Again:  # idle for RAW_IDLE_MS: the rest was dropped
            pass
        return count, t_end

    def close(self) -> None:
        self.ctl.close(0)
        self.sub.close(0)
        self.ctx.term()


class CountingCache:
    """A Cache of one instance whose ``on_change`` callback counts changes; a run's clock
    stops at the ``target``-th (a subclass may count only some changes)."""

    def __init__(self, client: Client, cell: str, schema: str) -> None:
        self.client = client
        self.cell = cell
        self.schema = schema
        self.cache: Cache | None = None
        self.count = 0
        self.target = 0
        self.t_end = 0.0
        self.done = asyncio.Event()

    async def setup(self) -> None:
        self.cache = await self.client.cache(self.cell, self.schema, timeout_s=10.0)
        self.cache.on_change(self._on_change)

    def _on_change(self, relation: str, old: Any, new: Any) -> None:
        self.count += 1
        if self.count == self.target:
            self.t_end = time.perf_counter()
            self.done.set()

    async def arm(self, n: int) -> None:
        """Count from zero to ``n``."""
        await asyncio.sleep(0.05)  # let the last run's tail (heartbeats) settle
        self.count, self.target, self.t_end = 0, n, 0.0
        self.done.clear()

    async def wait(self, t0: float, timeout_s: float) -> float | None:
        """Seconds from ``t0`` to the target-th change; None if it did not come within ``timeout_s``."""
        try:
            await asyncio.wait_for(self.done.wait(), timeout_s)
        except TimeoutError:
            return None
        return self.t_end - t0

    async def close(self) -> None:
        if self.cache is not None:
            await self.cache.close()


class OursEvents(CountingCache):
    """The bench side of ours: a Cache of the stream and a callback counting every change."""

    def __init__(self, client: Client) -> None:
        super().__init__(client, STREAM_CELL, STREAM)

    async def wait_idle(self) -> None:
        deadline = time.monotonic() + IDLE_TIMEOUT_S
        while time.monotonic() < deadline:
            st = await self.client.call(STREAM_CELL, STREAM, "status")
            if not st["busy"]:
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the stream instance did not go idle")

    async def run(self, n: int, v: Variant, timeout_s: float) -> dict[str, Any]:
        assert self.cache is not None
        await self.wait_idle()
        await self.arm(n)
        resyncs = self.cache.resyncs
        t0 = time.perf_counter()
        await self.client.call(STREAM_CELL, STREAM, "burst", n=n, size=v.size, per_commit=v.per_commit,
                               yield_every=v.yield_every)
        elapsed = await self.wait(t0, timeout_s)
        if elapsed is None:
            elapsed = time.perf_counter() - t0
            await self.client.call(STREAM_CELL, STREAM, "cancel")
        received = self.count
        return {"eps": received / elapsed, "received": received, "elapsed_s": elapsed,
                "complete": received >= n, "resyncs": self.cache.resyncs - resyncs}


def _summary(v: Variant, n: int, ours: list[dict[str, Any]], raw: list[dict[str, Any]]) -> dict[str, Any]:
    ours_eps = median([x["eps"] for x in ours])
    raw_eps = median([x["eps"] for x in raw])
    r, paired = paired_ratio([x["eps"] for x in ours], [x["eps"] for x in raw])
    return {
        "events": n,
        "payload_bytes": v.size,
        "changes_per_commit": v.per_commit,
        "yield_every_commits": v.yield_every,
        "ubicore_eps": round(ours_eps),
        "raw_eps": round(raw_eps),
        "ratio": r,
        "target": f"ratio >= {TARGET_RATIO}",
        "met": r is not None and r >= TARGET_RATIO,
        "complete": all(x["complete"] for x in ours + raw),
        "ubicore_resyncs": sum(x["resyncs"] for x in ours),
        "raw_dropped": sum(x["dropped"] for x in raw),
        "ubicore_runs_eps": [round(x["eps"]) for x in ours],
        "raw_runs_eps": [round(x["eps"]) for x in raw],
        "runs_ratio": paired,
    }


async def bench_events(client: Client, n: int, reps: int, only: str | None = None) -> dict[str, Any]:
    """Every variant, ours and raw alternately ``reps`` times; one summary per variant."""
    ours = OursEvents(client)
    await ours.setup()
    warm = Variant("warmup", 64, 1, 64)
    await ours.run(min(n, 5000), warm, MEASURE_TIMEOUT_S)  # first pass inserts the keys
    out: dict[str, Any] = {}
    child = Child("raw_child.py", "pub", str(RAW_HWM))
    raw = None
    try:
        raw = RawEvents(child)
        raw.handshake()
        raw.run(min(n, 5000), 64, MEASURE_TIMEOUT_S)
        for v in VARIANTS:
            if only is not None and v.name != only:
                continue
            ours_runs, raw_runs = [], []
            for rep in range(reps):
                o = await ours.run(n, v, MEASURE_TIMEOUT_S)
                ours_runs.append(o)
                r = raw.run(n, v.size, MEASURE_TIMEOUT_S)
                raw_runs.append(r)
                o_note = "" if o["complete"] else " (INCOMPLETE)"
                r_note = "" if r["complete"] else f" (dropped {r['dropped']})"
                log(f"[events] {v.name} rep {rep + 1}/{reps}: ubicore {o['eps']:,.0f} ev/s{o_note},"
                    f" raw {r['eps']:,.0f} ev/s{r_note}")
            out[v.name] = _summary(v, n, ours_runs, raw_runs)
    finally:
        if raw is not None:
            raw.close()
        child.close()
        await ours.close()
    return out
