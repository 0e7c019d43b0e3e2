"""Deadlines over real sockets: a call or a join with nobody answering ends in CallTimeout.

Each case runs under an outer ``asyncio.timeout`` far longer than the call's deadline;
a hang would end there with a plain TimeoutError, which ``pytest.raises(CallTimeout)``
does not accept.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ubicore.client import NAMING_CELL, NAMING_SCHEMA, Client
from ubicore.errors import CallTimeout, RemoteError
from ubicore.testing import COUNTER, free_ports, run_async, running_site
from ubicore.transport.rpc import RpcConnection

HANG_GUARD_S = 5.0


def client_of_nobody(*, timeout_s: float) -> Client:
    """A client whose core endpoints are free ports where nothing listens."""
    rpc_port, event_port = free_ports(2)
    return Client(f"tcp://127.0.0.1:{rpc_port}", f"tcp://127.0.0.1:{event_port}", timeout_s=timeout_s)


@run_async
async def test_call_to_an_endpoint_where_nothing_listens_times_out(tmp_path: Path) -> None:
    (port,) = free_ports(1)
    conn = RpcConnection(f"tcp://127.0.0.1:{port}")
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            with pytest.raises(CallTimeout) as info:
                await conn.call(COUNTER, "Site", "get", {"name": "x"}, 0.2)
            assert isinstance(info.value, TimeoutError) and isinstance(info.value, RemoteError)
            assert info.value.code == "timeout"
            # Many calls in flight all end by their deadlines, and nothing is left pending.
            results = await asyncio.gather(
                *(conn.call(COUNTER, "Site", "bump", {"name": "x"}, 0.1 + i / 100) for i in range(20)),
                return_exceptions=True,
            )
        assert all(isinstance(r, CallTimeout) for r in results)
        assert conn.caller.pending == 0
        assert conn.caller.stats.timeouts == 21
    finally:
        conn.close()


@run_async
async def test_client_whose_core_has_nobody_times_out(tmp_path: Path) -> None:
    client = client_of_nobody(timeout_s=0.2)
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            with pytest.raises(CallTimeout):  # find joins the naming registry first
                await client.find("Site", COUNTER)
            with pytest.raises(CallTimeout):
                await client.call("Site", COUNTER, "get", name="x")
            with pytest.raises(CallTimeout):  # naming itself is reached directly
                await client.call(NAMING_CELL, NAMING_SCHEMA, "lookup", schema=COUNTER, cell="Site")
    finally:
        await client.close()


@run_async
async def test_joining_an_instance_that_does_not_answer_times_out(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        # A registration whose endpoints nobody serves (a crashed instance, say).
        rpc_port, event_port = free_ports(2)
        await rs.client.call(
            NAMING_CELL, NAMING_SCHEMA, "register", schema=COUNTER, cell="Site", host="host-a",
            rpc=f"tcp://127.0.0.1:{rpc_port}", events=f"tcp://127.0.0.1:{event_port}",
            instance_id=bytes(16), protection="open",
        )
        info = await rs.client.find("Site", COUNTER, wait_s=2.0)
        assert info.rpc.endswith(f":{rpc_port}")
        async with asyncio.timeout(HANG_GUARD_S):
            with pytest.raises(CallTimeout):
                await rs.client.cache("Site", COUNTER, timeout_s=0.2)
            with pytest.raises(CallTimeout):
                await rs.client.follow("Site", COUNTER, lambda batch: None, timeout_s=0.2)
            with pytest.raises(CallTimeout):
                await rs.client.call("Site", COUNTER, "bump", name="x", timeout_s=0.2)
        # The client still works for what does answer.
        assert (await rs.client.call(NAMING_CELL, NAMING_SCHEMA, "lookup", schema=COUNTER, cell="Site"))[
            "rpc"
        ] == info.rpc


@run_async
async def test_a_call_deadline_bounds_the_naming_join_too(tmp_path: Path) -> None:
    # The client's own timeout is long; the call's short deadline must still hold while
    # the client tries to join a naming registry that is not there.
    client = client_of_nobody(timeout_s=30.0)
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            for attempt in (
                lambda: client.call("Site", COUNTER, "get", name="x", timeout_s=0.3),
                lambda: client.cache("Site", COUNTER, timeout_s=0.3),
                lambda: client.follow("Site", COUNTER, lambda b: None, timeout_s=0.3),
            ):
                with pytest.raises(CallTimeout):
                    await attempt()
    finally:
        await client.close()


@run_async
async def test_a_closed_cache_lets_go_of_the_client(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        client = rs.new_client()
        for _ in range(5):
            cache = await client.cache("Site", COUNTER)
            await cache.close()
        assert client._joined == []


@run_async
async def test_a_second_naming_join_gets_only_the_time_that_is_left(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ubicore.cache import Cache

    budgets: list[float] = []
    real_start = Cache._start

    async def recording_start(self: Cache, timeout_s: float) -> None:
        budgets.append(timeout_s)
        await real_start(self, timeout_s)

    monkeypatch.setattr(Cache, "_start", recording_start)
    client = client_of_nobody(timeout_s=30.0)
    try:
        async with asyncio.timeout(HANG_GUARD_S):
            first = asyncio.create_task(client.call("Site", COUNTER, "get", name="x", timeout_s=0.6))
            await asyncio.sleep(0.2)  # the second arrives while the first holds the join
            second = asyncio.create_task(client.call("Site", COUNTER, "get", name="x", timeout_s=0.9))
            for task in (first, second):
                with pytest.raises(CallTimeout):
                    await task
        # The second waited ~0.4 s for the first's join to fail, so it has ~0.5 s left,
        # not its whole 0.9 s; or no time at all, and then no join is started.
        assert budgets[0] == pytest.approx(0.6, abs=0.05)
        assert len(budgets) == 1 or budgets[1] < 0.9 - 0.2
    finally:
        await client.close()


@run_async
async def test_a_cancelled_join_leaves_nothing_open(tmp_path: Path) -> None:
    # run_async fails the test with LeakedSockets if a half-joined cache kept its SUB.
    client = client_of_nobody(timeout_s=30.0)
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(client.naming(), 0.3)
    finally:
        await client.close()
