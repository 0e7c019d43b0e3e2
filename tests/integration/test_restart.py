"""Restarts: caches rebind to a restarted instance by themselves; instances re-register
with a restarted naming registry."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

import ubicore.runtime
from ubicore.errors import CallTimeout
from ubicore.protocol.channel import Batch
from ubicore.protocol.messages import Change, Op
from ubicore.testing import CONFIG_UPDATE, COUNTER, POSITIONS, run_async, running_site


@run_async
async def test_cache_and_calls_follow_a_restarted_instance(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        # A client of its own, so that nothing the harness does on restart touches it.
        client = rs.new_client()
        for _ in range(3):
            await client.call("Site", COUNTER, "bump", name="a")
        await client.call("Site", COUNTER, "note", key="n1", text="kept")
        cache = await client.cache("Site", COUNTER)
        batches: list[Batch] = []
        follower = await client.follow("Site", COUNTER, batches.append)
        deleted: list[Any] = []
        cache.on_delete("counters", deleted.append)
        old = rs.server(COUNTER, "Site")
        old_iid = old.core.instance_id
        assert cache.instance_id == old_iid and cache.table("counters")[("a",)].value == 3

        new = await rs.restart_instance(COUNTER, "Site")
        new_iid = new.core.instance_id
        assert new_iid != old_iid

        await cache.wait_for(lambda c: c.instance_id == new_iid and c.live)
        await cache.wait_for(lambda c: follower.instance_id == new_iid and follower.live)
        assert cache.binding.rpc == new.rpc_endpoint and cache.binding.events == new.event_endpoint
        assert ("a",) not in cache.table("counters")  # volatile: the new instance starts empty
        assert [tuple(r) for r in deleted] == [("a", 3, "")]  # the re-dump shows the difference
        assert cache.table("notes")[("n1",)].text == "kept"  # persistent: survived the restart

        # The client's calls reach the new instance, and the follower hears its channel.
        await rs.settle(follower, lambda: client.call("Site", COUNTER, "note", key="n2", text="probe"))
        batches.clear()
        assert await client.call("Site", COUNTER, "bump", name="a") == 1
        await cache.wait_for(lambda c: c.table("counters").get(("a",)) is not None)
        assert cache.table("counters")[("a",)].value == 1
        assert cache.seq == new.core.sequencer.seq == 2
        await cache.wait_for(lambda c: len(batches) == 1)
        assert batches == [Batch(2, (Change("counters", Op.INSERT, ("a", 1, "")),))]
        assert (await client.find("Site", COUNTER)).instance_id == new_iid


@run_async
async def test_restart_of_a_persistent_instance_keeps_its_state(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        client = rs.new_client()
        cache = await client.cache("Site", CONFIG_UPDATE)
        await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=9.0)
        await cache.wait_for(lambda c: c.table("sensors")[("S-001",)].rate_hz == 9.0)
        changes: list[Any] = []
        cache.on_change(lambda rel, old, new: changes.append((old, new)))
        new = await rs.restart_instance(CONFIG_UPDATE, "Site")
        await cache.wait_for(lambda c: c.instance_id == new.core.instance_id and c.live)
        assert cache.table("sensors")[("S-001",)].rate_hz == 9.0
        assert changes == []  # the same rows: the re-dump changes nothing
        await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=3.0)
        await cache.wait_for(lambda c: c.table("sensors")[("S-001",)].rate_hz == 3.0)
        dump = await client.call("Site", CONFIG_UPDATE, "get_dump")
        assert {tuple(r) for r in dump["relations"]["sensors"]} == set(cache.table("sensors").values())


@run_async
async def test_instances_re_register_after_a_core_restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ubicore.runtime, "REGISTRATION_CHECK_S", 0.2)
    async with running_site(tmp_path) as rs:
        cache = await rs.client.cache("Site", COUNTER)
        old_core = rs.core
        assert old_core is not None
        await rs.stop_core()

        down = rs.new_client(timeout_s=0.3)
        with pytest.raises(CallTimeout):  # nobody serves naming now
            await down.find("Site", COUNTER)

        core = await rs.start_core()
        assert core.core.instance_id != old_core.core.instance_id
        assert core.rpc_endpoint == rs.site.core.rpc_endpoint
        # A client that starts now finds every instance once it has re-registered.
        fresh = rs.new_client()
        for (schema, cell), server in rs.servers.items():
            info = await fresh.find(cell, schema, wait_s=5.0)
            assert info.instance_id == server.core.instance_id
            assert info.rpc == server.rpc_endpoint
        # The client that was connected before follows the new registry too...
        naming = await rs.client.naming()
        await naming.wait_for(lambda c: c.instance_id == core.core.instance_id and c.live)
        await naming.wait_for(lambda c: all(k in c.table("instances") for k in rs.servers))
        assert (POSITIONS, "Zone-B") in naming.table("instances")
        # ...and its cache never lost its instance.
        assert await rs.client.call("Site", COUNTER, "bump", name="b") == 1
        await cache.wait_for(lambda c: ("b",) in c.table("counters"))
        assert cache.instance_id == rs.server(COUNTER, "Site").core.instance_id


@run_async
async def test_a_deregistered_instance_leaves_no_connection_behind(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        client = rs.new_client()
        old = await client.find("Site", COUNTER)
        await client.call("Site", COUNTER, "bump", name="a")
        assert old.rpc in client._conns
        await rs.stop_instance(COUNTER, "Site")
        naming = await client.naming()
        await naming.wait_for(lambda n: (COUNTER, "Site") not in n.table("instances"))
        assert old.rpc not in client._conns
        new = await rs.start_instance(COUNTER, "Site")
        await naming.wait_for(lambda n: (COUNTER, "Site") in n.table("instances"))
        assert await client.call("Site", COUNTER, "bump", name="a") == 1  # a fresh instance: volatile counter
        assert set(client._conns) == {rs.site.core.rpc_endpoint, new.rpc_endpoint}
