"""Caching clients and followers over real sockets: dumps, callbacks, ordering."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from ubicore.protocol.channel import Batch
from ubicore.protocol.messages import Change, Op
from ubicore.testing import CONFIG_UPDATE, COUNTER, run_async, running_site

DEFAULT_SENSORS = ("S-001", "S-002", "S-003", "S-004")


def dump_tables(dump: dict[str, Any]) -> dict[str, set[tuple[Any, ...]]]:
    return {rel: {tuple(r) for r in rows} for rel, rows in dump["relations"].items()}


def cache_tables(cache: Any) -> dict[str, set[tuple[Any, ...]]]:
    return {rel: {tuple(r) for r in table.values()} for rel, table in cache.tables.items()}


@run_async
async def test_initial_dump_contents(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        await rs.client.call("Site", CONFIG_UPDATE, "set_sink", sensor="S-003", sink="sink-3")
        cache = await rs.client.cache("Site", CONFIG_UPDATE)
        dump = await rs.client.call("Site", CONFIG_UPDATE, "get_dump")
        assert cache.live
        assert cache.instance_id == rs.server(CONFIG_UPDATE, "Site").core.instance_id == dump["instance_id"]
        assert cache.seq == dump["seq"]
        assert cache_tables(cache) == dump_tables(dump)
        sensors = cache.table("sensors")
        assert sorted(sensors) == [(s,) for s in DEFAULT_SENSORS]
        row = sensors[("S-003",)]
        assert row._fields == ("sensor", "sink", "rate_hz", "state", "reboots")
        assert (row.sensor, row.sink, row.rate_hz, row.reboots) == ("S-003", "sink-3", 1.0, 0)
        assert cache.rows("sensors") == list(sensors.values())


@run_async
async def test_callbacks_carry_old_and_new_rows(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        cache = await rs.client.cache("Site", CONFIG_UPDATE)
        await rs.settle(cache, lambda: rs.client.call("Site", CONFIG_UPDATE, "set_sink", sensor="S-001", sink="p"))
        inserts: list[Any] = []
        updates: list[tuple[Any, Any]] = []
        deletes: list[Any] = []
        changes: list[tuple[str, Any, Any]] = []
        cache.on_insert("sensors", inserts.append)
        cache.on_update("sensors", lambda old, new: updates.append((old, new)))
        cache.on_delete("sensors", deletes.append)
        cache.on_change(lambda rel, old, new: changes.append((rel, old, new)))
        call = rs.client.call
        await call("Site", CONFIG_UPDATE, "add_sensor", sensor="S-100", sink="north", rate_hz=2.0)
        await call("Site", CONFIG_UPDATE, "set_rate", sensor="S-100", rate_hz=4.0)
        await call("Site", CONFIG_UPDATE, "remove_sensor", sensor="S-100")
        await cache.wait_for(lambda c: len(changes) == 3)
        (added,) = inserts
        assert added == ("S-100", "north", 2.0, "running", 0) and added.sink == "north"
        ((old, new),) = updates
        assert (old.rate_hz, new.rate_hz) == (2.0, 4.0) and old.sensor == new.sensor == "S-100"
        (removed,) = deletes
        assert removed == new
        assert changes == [("sensors", None, added), ("sensors", old, new), ("sensors", new, None)]
        assert ("S-100",) not in cache.table("sensors")


@run_async
async def test_cached_tables_are_read_only(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        cache = await rs.client.cache("Site", CONFIG_UPDATE)
        sensors = cache.table("sensors")
        row = sensors[("S-001",)]
        with pytest.raises(TypeError):
            sensors[("S-999",)] = row  # type: ignore[index]
        with pytest.raises(TypeError):
            del sensors[("S-001",)]  # type: ignore[attr-defined]
        with pytest.raises(TypeError):
            cache.tables["sensors"] = {}  # type: ignore[index]
        with pytest.raises(AttributeError):
            setattr(row, "rate_hz", 9.0)  # noqa: B010  # rows are named tuples
        with pytest.raises(KeyError, match="no relation"):
            cache.table("nope")
        assert set(sensors) == {(s,) for s in DEFAULT_SENSORS}
        # The view is live: it follows the instance although nobody may write to it.
        await rs.client.call("Site", CONFIG_UPDATE, "add_sensor", sensor="S-005")
        await cache.wait_for(lambda c: ("S-005",) in sensors)


@run_async
async def test_cache_sees_every_commit_in_order(tmp_path: Path) -> None:
    n = 400
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        cache = await rs.client.cache("Site", COUNTER)
        await rs.settle(cache, lambda: rs.client.call("Site", COUNTER, "bump", name="probe"))
        resyncs = cache.resyncs
        seen: list[int] = []
        cache.on_insert("counters", lambda new: seen.append(new.value))
        cache.on_update("counters", lambda old, new: seen.append(new.value))
        results = await asyncio.gather(*(rs.client.call("Site", COUNTER, "bump", name="hits") for _ in range(n)))
        assert sorted(results) == list(range(1, n + 1))
        await cache.wait_for(lambda c: len(seen) >= n)
        assert seen == list(range(1, n + 1))  # each commit once, in commit order
        assert cache.resyncs == resyncs
        dump = await rs.client.call("Site", COUNTER, "get_dump")
        assert cache.seq == dump["seq"] == n + 1
        assert cache_tables(cache) == dump_tables(dump)


@run_async
async def test_cache_converges_after_many_rapid_updates(tmp_path: Path) -> None:
    rates = [2.0 + i / 8 for i in range(300)]
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        cache = await rs.client.cache("Site", CONFIG_UPDATE)
        await rs.settle(cache, lambda: rs.client.call("Site", CONFIG_UPDATE, "set_sink", sensor="S-001", sink="p"))
        resyncs = cache.resyncs
        seen: list[float] = []
        cache.on_update("sensors", lambda old, new: seen.append(new.rate_hz) if new.sensor == "S-002" else None)
        await asyncio.gather(
            *(rs.client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-002", rate_hz=r) for r in rates),
            *(rs.client.call("Site", CONFIG_UPDATE, "reboot", sensor="S-004") for _ in range(50)),
        )
        dump = await rs.client.call("Site", CONFIG_UPDATE, "get_dump")
        await cache.wait_for(lambda c: c.seq >= dump["seq"])
        assert cache.seq == dump["seq"]
        assert cache_tables(cache) == dump_tables(dump)
        assert sorted(seen) == rates  # every committed value exactly once
        assert cache.table("sensors")[("S-002",)].rate_hz == seen[-1]
        assert cache.table("sensors")[("S-004",)].reboots == 50
        assert cache.resyncs == resyncs


@run_async
async def test_follower_gets_batches_in_order_after_the_join_point(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        for _ in range(5):
            await rs.client.call("Site", COUNTER, "bump", name="c")
        batches: list[Batch] = []
        dumps: list[Any] = []
        follower = await rs.client.follow("Site", COUNTER, batches.append, on_dump=dumps.append)
        assert follower.live and follower.seq == 5
        (dump,) = dumps
        assert [tuple(r) for r in dump["counters"]] == [("c", 5, "")]
        await rs.settle(follower, lambda: rs.client.call("Site", COUNTER, "bump", name="probe"))
        assert follower.seq == 6
        resyncs, n_dumps = follower.resyncs, len(dumps)
        batches.clear()
        await asyncio.gather(*(rs.client.call("Site", COUNTER, "bump", name="c") for _ in range(50)))
        await rs.client.call("Site", COUNTER, "remove", name="c")
        deadline = asyncio.get_running_loop().time() + 5
        while len(batches) < 51 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert [b.seq for b in batches] == list(range(7, 58))
        assert [b.changes for b in batches[:-1]] == [
            (Change("counters", Op.UPDATE, ("c", v, "")),) for v in range(6, 56)
        ]
        assert batches[-1].changes == (Change("counters", Op.DELETE, ("c",)),)
        assert follower.resyncs == resyncs and len(dumps) == n_dumps


@run_async
async def test_a_join_is_tight_no_commit_falls_between_dump_and_channel(tmp_path: Path) -> None:
    # The instance's XPUB welcomes each subscriber once its subscription is in place,
    # and the cache dumps only then: a commit made the moment the join returns must
    # arrive as a delta, never by a re-dump. Without the welcome this fails now and then.
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        for i in range(15):
            cache = await rs.client.cache("Site", COUNTER)
            await rs.client.call("Site", COUNTER, "bump", name=f"join-{i}")
            await cache.wait_for(lambda c, i=i: (f"join-{i}",) in c.table("counters"), 3.0)
            assert cache.resyncs == 0, f"join {i} needed a re-dump"
            await cache.close()
