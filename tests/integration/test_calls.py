"""Finding services and calling their operations over real sockets, with typed errors."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ubicore.client import NAMING_CELL, NAMING_SCHEMA
from ubicore.errors import BadArguments, NotFound, RemoteError, RemoteFailure, Unavailable
from ubicore.testing import CONFIG_UPDATE, COUNTER, POSITIONS, run_async, running_site
from ubicore.transport.rpc import RpcConnection


@run_async
async def test_find_returns_each_running_instance(tmp_path: Path) -> None:
    async with running_site(tmp_path) as rs:
        assert len(rs.servers) == 4
        for (schema, cell), server in rs.servers.items():
            info = await rs.client.find(cell, schema)
            assert (info.schema, info.cell) == (schema, cell)
            assert info.rpc == server.rpc_endpoint
            assert info.events == server.event_endpoint
            assert info.instance_id == server.core.instance_id
            assert info.host == rs.plan(schema, cell).host
        zone_b = await rs.client.find("Zone-B", POSITIONS)
        assert zone_b.host == "host-b"
        assert zone_b.rpc.startswith("tcp://127.0.0.2:")
        assert (await rs.client.find("Site", CONFIG_UPDATE)).protection == "update"
        naming = await rs.client.find(NAMING_CELL, NAMING_SCHEMA)
        assert naming.rpc == rs.site.core.rpc_endpoint


@run_async
async def test_read_and_update_operations(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        call = rs.client.call
        assert await call("Site", CONFIG_UPDATE, "list_sensors") == ["S-001", "S-002", "S-003", "S-004"]
        assert await call("Site", CONFIG_UPDATE, "set_rate", sensor="S-002", rate_hz=7.5) is None
        assert await call("Site", CONFIG_UPDATE, "set_rate", sensor="S-003", rate_hz=3) is None  # int → float
        s2 = await call("Site", CONFIG_UPDATE, "get_sensor", sensor="S-002")
        assert s2 == {"sensor": "S-002", "sink": "", "rate_hz": 7.5, "state": "running", "reboots": 0}
        assert (await call("Site", CONFIG_UPDATE, "get_sensor", sensor="S-003"))["rate_hz"] == 3.0
        assert await call("Site", CONFIG_UPDATE, "reboot", sensor="S-001") == 1
        assert await call("Site", CONFIG_UPDATE, "reboot", sensor="S-001") == 2
        await call("Site", CONFIG_UPDATE, "add_sensor", sensor="S-100", sink="sink-1")
        assert "S-100" in await call("Site", CONFIG_UPDATE, "list_sensors")
        await call("Site", CONFIG_UPDATE, "remove_sensor", sensor="S-100")
        assert "S-100" not in await call("Site", CONFIG_UPDATE, "list_sensors")
        # call_args: arguments whose names clash with call()'s own
        assert await rs.client.call_args("Site", CONFIG_UPDATE, "get_sensor", {"sensor": "S-004"}) is not None


@run_async
async def test_not_found_for_unknown_operation_schema_and_cell(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        with pytest.raises(NotFound, match="no_such_op"):
            await rs.client.call("Site", COUNTER, "no_such_op")
        with pytest.raises(NotFound):  # naming knows no such instance
            await rs.client.call("Zone-A", COUNTER, "get", name="x")
        with pytest.raises(NotFound):
            await rs.client.call("Site", "UTest::NoSuchSchema", "get", name="x")
        with pytest.raises(NotFound, match="no counter"):  # raised by the operation itself
            await rs.client.call("Site", COUNTER, "get", name="never-set")
        # The instance itself refuses a request for another schema or cell.
        conn = RpcConnection(rs.server(COUNTER, "Site").rpc_endpoint)
        try:
            with pytest.raises(NotFound, match="UTest::Other"):
                await conn.call("UTest::Other", "Site", "get", {"name": "x"}, 2.0)
            with pytest.raises(NotFound, match="Zone-A"):
                await conn.call(COUNTER, "Zone-A", "get", {"name": "x"}, 2.0)
            assert await conn.call(COUNTER, "Site", "bump", {"name": "x"}, 2.0) == 1
        finally:
            conn.close()


@run_async
async def test_bad_arguments(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        call = rs.client.call
        with pytest.raises(BadArguments) as missing:
            await call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001")
        assert missing.value.detail == {"argument": "rate_hz"}
        with pytest.raises(BadArguments) as unknown:
            await call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=1.0, colour="red")
        assert unknown.value.detail == {"argument": "colour"}
        with pytest.raises(BadArguments) as wrong_type:
            await call("Site", CONFIG_UPDATE, "set_rate", sensor=5, rate_hz=1.0)
        assert wrong_type.value.detail == {"argument": "sensor", "expected": "str"}
        with pytest.raises(BadArguments, match="rate_hz must be in"):  # the service's own check
            await call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=0.0)
        assert (await call("Site", CONFIG_UPDATE, "get_sensor", sensor="S-001"))["rate_hz"] == 1.0
        stats = await call("Site", CONFIG_UPDATE, "get_stats")
        assert stats["errors"] == 4
        assert stats["malformed"] == 0


@run_async
async def test_remote_failure_carries_the_message_only_and_rolls_back(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        with pytest.raises(RemoteFailure) as failed:
            await rs.client.call("Site", COUNTER, "fail", message="the sensor caught fire")
        err = failed.value
        assert err.code == "remote_failure"
        assert "RuntimeError: the sensor caught fire" in err.message
        assert "Traceback" not in err.message and "File " not in err.message
        with pytest.raises(NotFound):  # the change made before the raise did not commit
            await rs.client.call("Site", COUNTER, "get", name="failed")
        await rs.client.call("Site", COUNTER, "insert", name="once")
        with pytest.raises(RemoteFailure, match="exists"):  # a broken key is a remote failure
            await rs.client.call("Site", COUNTER, "insert", name="once")
        assert isinstance(err, RemoteError)


@run_async
async def test_find_of_unregistered_services(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        client = rs.client
        with pytest.raises(NotFound):
            await client.find("Site", "UTest::Nothing")
        with pytest.raises(NotFound):  # planned, not started, never reported
            await client.find("Zone-B", POSITIONS, wait_s=0.2)
        # A controller reports the instance stopped: now it is known but unavailable.
        await client.call(
            NAMING_CELL, NAMING_SCHEMA, "report", schema=POSITIONS, cell="Zone-B", host="host-b", actual="stopped"
        )
        naming = await client.naming()
        await naming.wait_for(lambda c: (POSITIONS, "Zone-B") in c.table("services"))
        with pytest.raises(Unavailable, match="stopped"):
            await client.find("Zone-B", POSITIONS)
        with pytest.raises(Unavailable):
            await client.call("Zone-B", POSITIONS, "where", tag="T-001")
        # find(wait_s=...) waits for an instance that registers meanwhile.
        starting = asyncio.create_task(rs.start_instance(POSITIONS, "Zone-B"))
        try:
            info = await client.find("Zone-B", POSITIONS, wait_s=5.0)
        finally:
            await starting
        assert info.instance_id == rs.server(POSITIONS, "Zone-B").core.instance_id
        # A stopped instance deregisters: find no longer returns it.
        await rs.stop_instance(CONFIG_UPDATE, "Site")
        await naming.wait_for(lambda c: (CONFIG_UPDATE, "Site") not in c.table("instances"))
        with pytest.raises(NotFound):
            await client.find("Site", CONFIG_UPDATE)


@run_async
async def test_services_lists_registrations_and_states(tmp_path: Path) -> None:
    async with running_site(tmp_path) as rs:
        await rs.client.call(
            NAMING_CELL, NAMING_SCHEMA, "report", schema=COUNTER, cell="Site", host="host-a", actual="running"
        )
        naming = await rs.client.naming()
        await naming.wait_for(lambda c: len(c.table("services")) == 1)
        listing = await rs.client.services()
        assert set(listing) == {"instances", "services"}
        instances = {(r["schema"], r["cell"]): r for r in listing["instances"]}
        assert set(instances) == {*rs.servers, (NAMING_SCHEMA, NAMING_CELL), ("UPerm::Config", NAMING_CELL),
                              ("UAudit::Log", NAMING_CELL), ("UAudit::Alerts", NAMING_CELL)}
        for key, server in rs.servers.items():
            assert instances[key]["rpc"] == server.rpc_endpoint
            assert instances[key]["instance_id"] == server.core.instance_id
        assert [(r["schema"], r["cell"], r["actual"]) for r in listing["services"]] == [
            (COUNTER, "Site", "running")
        ]


@run_async
async def test_the_simulator_keeps_ticking_around_a_hand_placed_tag(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(POSITIONS, "Zone-A")]) as rs:
        await rs.client.call("Zone-A", POSITIONS, "set_rate", rate_hz=50.0)
        await rs.client.call("Zone-A", POSITIONS, "place", tag="forklift", x=1.0, y=2.0)
        cache = await rs.client.cache("Zone-A", POSITIONS)
        ticks = cache.table("simulator")[("sim",)].ticks
        await cache.wait_for(lambda c: c.table("simulator")[("sim",)].ticks >= ticks + 5, 5.0)
        assert cache.table("positions")[("forklift",)].x == 1.0
