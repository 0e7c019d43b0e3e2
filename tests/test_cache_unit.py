"""The caching client's logic without sockets: a fake instance answers get_group and
get_dump, and channel messages are fed in by hand."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ubicore.cache import Binding, Cache
from ubicore.errors import CallTimeout
from ubicore.protocol.messages import Change, Delta, Op

IID = b"\x05" * 16
V1 = {"relations": {"r": {"columns": [["k", "str", False], ["v", "int", False]], "key": ["k"], "persistent": False}}}
V2 = {"relations": {"r": {"columns": [["k", "str", False], ["v", "int", False], ["w", "int", False]],
                          "key": ["k"], "persistent": False}}}


class FakeInstance:
    """Answers get_group / get_dump like an instance; scripted failures first."""

    def __init__(self, rows: list[list[Any]], seq: int, description: dict[str, Any] = V1) -> None:
        self.rows, self.seq, self.description = rows, seq, description
        self.fail_next: list[str] = []
        self.calls: list[str] = []

    async def call(self, schema: str, cell: str, operation: str, args: Any, timeout_s: float) -> Any:
        self.calls.append(operation)
        if operation in self.fail_next:
            self.fail_next.remove(operation)
            raise CallTimeout("scripted")
        if operation == "get_group":
            return {"schema": self.description}
        return {"instance_id": IID, "seq": self.seq, "relations": {"r": [list(r) for r in self.rows]}}


class FakeLink:
    """The client side of the fake: open calls, no sessions."""

    def __init__(self, instance: FakeInstance) -> None:
        self.instance = instance

    async def call_binding(self, b: Binding, operation: str, args: Any, timeout_s: float) -> Any:
        return await self.instance.call(b.schema, b.cell, operation, args, timeout_s)

    def channel_session(self, b: Binding) -> None:
        return None


def make_cache(instance: FakeInstance) -> Cache:
    return Cache(Binding("UT::S", "c", "tcp://fake:1", "tcp://fake:2"), FakeLink(instance))


async def joined(instance: FakeInstance) -> Cache:
    cache = make_cache(instance)
    cache._request_dump()
    await asyncio.wait_for(cache.ready.wait(), 5)
    return cache


def delta(first: int, *rows: tuple[str, int]) -> Delta:
    return Delta(IID, first, tuple((Change("r", Op.UPDATE, row),) for row in rows))


def test_a_callback_that_raises_cuts_nothing_short() -> None:
    async def body() -> None:
        cache = await joined(FakeInstance([["a", 0], ["b", 0]], 0))
        seen: list[str] = []

        def bad(rel: str, old: Any, new: Any) -> None:
            seen.append(new.k)
            raise RuntimeError("application bug")

        cache.on_change(bad)
        cache.on_update("r", lambda old, new: seen.append("per-relation " + new.k))
        cache._on_message(delta(1, ("a", 1), ("b", 1)))  # two commits in one message
        assert {k: r.v for (k,), r in cache.table("r").items()} == {"a": 1, "b": 1}
        assert seen == ["a", "per-relation a", "b", "per-relation b"]
        assert cache.callback_errors == 2 and cache.seq == 2 and cache.live
        await cache.close()

    asyncio.run(body())


def test_a_callback_raising_during_a_re_dump_does_not_stall_the_cache() -> None:
    async def body() -> None:
        instance = FakeInstance([["a", 0]], 0)
        cache = await joined(instance)
        cache.on_change(lambda r, o, n: 1 / 0)
        instance.rows, instance.seq = [["a", 5], ["z", 1]], 7
        cache._on_message(delta(3, ("a", 5)))  # a gap: re-dump, whose diff calls the callback
        await cache.wait_for(lambda c: c.live and c.seq == 7, 5)
        assert cache.table("r")[("z",)].v == 1 and cache.callback_errors == 2
        await cache.close()

    asyncio.run(body())


def test_a_failed_get_group_is_retried_until_the_new_layout_is_known() -> None:
    async def body() -> None:
        instance = FakeInstance([["a", 0]], 0)
        cache = await joined(instance)
        # The instance restarts with a newer declaration; the first get_group times out.
        instance.description, instance.rows, instance.seq = V2, [["a", 1, 2]], 0
        instance.fail_next = ["get_group"]
        cache.rebind(Binding("UT::S", "c", "tcp://fake:1", "tcp://fake:2", b"\x06" * 16))
        await cache.wait_for(lambda c: c.live and "w" in c.infos["r"].columns, 5)
        assert cache.table("r")[("a",)].w == 2
        assert instance.calls.count("get_group") == 3  # join, the failure, the retry
        await cache.close()

    asyncio.run(body())


def test_tables_handed_out_stay_live_across_a_re_dump() -> None:
    async def body() -> None:
        instance = FakeInstance([["a", 0]], 0)
        cache = await joined(instance)
        kept = cache.table("r")
        instance.rows, instance.seq = [["a", 0], ["b", 9]], 4
        cache._on_message(delta(3, ("b", 9)))  # gap: re-dump
        await cache.wait_for(lambda c: c.live and c.seq == 4, 5)
        assert kept[("b",)].v == 9 and kept is cache.table("r")
        with pytest.raises(TypeError):
            kept[("c",)] = None  # type: ignore[index]
        await cache.close()

    asyncio.run(body())


def test_a_malformed_dump_is_retried_not_fatal() -> None:
    async def body() -> None:
        instance = FakeInstance([["a", 0]], 0)
        real_call = instance.call
        answers = iter([{"instance_id": IID, "seq": 0, "relations": [1, 2]}])

        async def flaky(schema: str, cell: str, operation: str, args: Any, timeout_s: float) -> Any:
            if operation == "get_dump":
                bad = next(answers, None)
                if bad is not None:
                    return bad
            return await real_call(schema, cell, operation, args, timeout_s)

        instance.call = flaky  # type: ignore[method-assign]
        cache = await joined(instance)
        assert cache.table("r")[("a",)].v == 0
        await cache.close()

    asyncio.run(body())
