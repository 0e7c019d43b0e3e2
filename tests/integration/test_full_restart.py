"""A cache of a fully protected instance across restarts of that instance."""

from __future__ import annotations

import asyncio
from pathlib import Path

from ubicore.testing.site import COUNTER, run_async, running_site

FULL_COUNTER = [{"schema": COUNTER, "cell": "Site", "protection": "full"}]


@run_async(timeout_s=30)
async def test_a_full_cache_follows_a_restarted_instance(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        cache = await rs.new_client().cache("Site", COUNTER)
        await rs.client.call("Site", COUNTER, "set_value", name="a", value=1)
        await cache.wait_for(lambda c: c.table("counters").get(("a",)) is not None, 5)
        first = cache.instance_id
        for round_ in range(2):
            server = await rs.restart_instance(COUNTER, "Site")
            await rs.client.call("Site", COUNTER, "set_value", name="a", value=10 + round_)
            await cache.wait_for(lambda c: c.instance_id == server.core.instance_id
                                 and c.table("counters").get(("a",)) is not None
                                 and c.table("counters")[("a",)].value == 10 + round_, 10)
        assert cache.instance_id != first
        # live on the new instance: the next change arrives as an event, opened with new keys
        before = cache.resyncs
        await rs.client.call("Site", COUNTER, "set_value", name="b", value=2)
        await cache.wait_for(lambda c: ("b",) in c.table("counters"), 5)
        await asyncio.sleep(0.2)
        assert cache.resyncs == before and cache.rejected == 0
