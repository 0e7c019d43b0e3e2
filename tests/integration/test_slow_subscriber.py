"""A slow subscriber: messages past the high-water marks are dropped, never waited for.

The instance's PUB and the cache's SUB get a high-water mark of one message and small
kernel buffers, then ``UTest::Counter`` commits a burst of thousands of transactions
back to back (its ``run()`` loop does not yield, so the cache cannot read meanwhile).
The publisher must finish the burst without blocking; the cache must notice the loss
(a sequence gap, or a heartbeat beyond its sequence) and converge by a fresh dump.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import zmq

import ubicore.transport.sockets
import ubicore.transport.channel
from ubicore.testing import COUNTER, run_async, running_site
from ubicore.transport.sockets import make_socket

KERNEL_BUFFER_BYTES = 64 * 1024
BURST_COMMITS = 3000
PAYLOAD_BYTES = 1024


def small_buffers(make: Any, *, pub_hwm: int | None = None) -> Any:
    """``make_socket`` whose PUB/SUB sockets have small kernel buffers (and ``pub_hwm``)."""

    def make_small(kind: int, *, hwm: int | None = None) -> Any:
        if kind in (zmq.PUB, zmq.XPUB) and pub_hwm is not None:
            hwm = pub_hwm
        sock = make(kind, hwm=hwm)
        if kind in (zmq.PUB, zmq.XPUB, zmq.SUB):
            sock.setsockopt(zmq.SNDBUF, KERNEL_BUFFER_BYTES)
            sock.setsockopt(zmq.RCVBUF, KERNEL_BUFFER_BYTES)
        return sock

    return make_small


def tables(relations: Any) -> dict[str, set[tuple[Any, ...]]]:
    return {rel: {tuple(r) for r in rows} for rel, rows in relations.items()}


@run_async
async def test_slow_cache_detects_loss_and_converges(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        # Only the instance under test and the cache's subscription get the tiny limits
        # (the ROUTER keeps its own high-water mark, so no reply is dropped).
        monkeypatch.setattr(ubicore.transport.sockets, "make_socket", small_buffers(make_socket, pub_hwm=1))
        server = await rs.start_instance(COUNTER, "Site")
        monkeypatch.setattr(ubicore.transport.channel, "SUB_HWM", 1)
        monkeypatch.setattr(ubicore.transport.channel, "make_socket", small_buffers(make_socket))
        cache = await rs.client.cache("Site", COUNTER)
        changes_seen = 0

        def count(rel: str, old: Any, new: Any) -> None:
            nonlocal changes_seen
            changes_seen += 1

        cache.on_change(count)
        burst = await rs.client.call("Site", COUNTER, "burst", n=BURST_COMMITS, keys=64, size=PAYLOAD_BYTES)
        # The burst completes: the publisher never waited for the slow subscriber.
        await cache.wait_for(lambda c: c.table("bursts").get((burst,)) is not None and c.table("bursts")[(burst,)].done)
        dump = await rs.client.call("Site", COUNTER, "get_dump")
        assert dump["seq"] == BURST_COMMITS + 2  # the burst request, its commits, done
        assert server.core.stats.commits == BURST_COMMITS + 2
        await cache.wait_for(lambda c: c.seq == dump["seq"])
        assert cache.resyncs > 0  # the loss was noticed...
        assert changes_seen < BURST_COMMITS  # ...because most of the burst never arrived
        assert tables({rel: t.values() for rel, t in cache.tables.items()}) == tables(dump["relations"])
        assert {row.value for row in cache.rows("counters")} == set(range(BURST_COMMITS - 64, BURST_COMMITS))
        # Live again: the next commit arrives as a delta.
        assert await rs.client.call("Site", COUNTER, "bump", name="after") == 1
        await cache.wait_for(lambda c: ("after",) in c.table("counters"))
        assert cache.seq == dump["seq"] + 1
