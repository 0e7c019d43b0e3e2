"""Several joins of one fully protected instance in one client share its session."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ubicore.schema import Protection
from ubicore.testing import COUNTER, run_async, running_site


@run_async
async def test_two_caches_and_a_follower_of_one_full_instance_each_see_every_event(tmp_path: Path) -> None:
    """Found by the issue-4 tests: the replay window lived in the session's key ring, so
    the first join to open an event made it a "replay" for the others, which saw nothing."""
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        rs.policy.set_level(COUNTER, Protection.FULL)
        server = rs.server(COUNTER, "Site")
        async with asyncio.timeout(5):
            while server.core.protection is not Protection.FULL:
                await asyncio.sleep(0.01)
        client = rs.client
        first = await client.cache("Site", COUNTER)
        second = await client.cache("Site", COUNTER)
        seen: list[int] = []
        follower = await client.follow("Site", COUNTER, lambda batch: seen.append(batch.seq))
        await rs.settle(first, lambda: client.call("Site", COUNTER, "bump", name="warm"))
        await rs.settle(second, lambda: client.call("Site", COUNTER, "bump", name="warm"))
        await rs.settle(follower, lambda: client.call("Site", COUNTER, "bump", name="warm"))
        start = server.core.sequencer.seq
        for i in range(5):
            await client.call("Site", COUNTER, "bump", name=f"n{i}")
        target = server.core.sequencer.seq
        async with asyncio.timeout(5):
            while min(first.seq, second.seq, follower.seq) < target:
                await asyncio.sleep(0.01)
        for cache in (first, second):
            assert {f"n{i}" for i in range(5)} <= {k[0] for k in cache.table("counters")}
            assert cache.rejected == 0 and cache.resyncs == 0
        assert [s for s in seen if s > start] == list(range(start + 1, target + 1))
        assert follower.rejected == 0
        for joined in (first, second, follower):
            await joined.close()
