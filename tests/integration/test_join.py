"""The join waits for the publisher's welcome: the dump is never taken before the
subscription is in place, however slowly the subscription comes up."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import zmq

from ubicore.cache import Binding, Cache
from ubicore.protocol.codec import HEADER_WELCOME, encode_reply, parse_request
from ubicore.testing import COUNTER, Counter, free_ports, run_async
from ubicore.transport.rpc import RpcConnection
from ubicore.transport.sockets import make_socket

PUBLISHER_LATE_S = 0.3


@run_async
async def test_dump_is_requested_only_after_the_subscription_is_welcomed(tmp_path: Path) -> None:
    rpc_port, events_port = free_ports(2)
    rpc_ep, events_ep = f"tcp://127.0.0.1:{rpc_port}", f"tcp://127.0.0.1:{events_port}"
    seen: dict[str, float] = {}
    router = make_socket(zmq.ROUTER)
    router.bind(rpc_ep)
    xpub = make_socket(zmq.XPUB)
    xpub.setsockopt(zmq.XPUB_WELCOME_MSG, HEADER_WELCOME)
    loop = asyncio.get_running_loop()

    def on_request() -> None:
        while router.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            ident, *frames = router.recv_multipart()
            req = parse_request(frames)
            seen.setdefault(req.operation, time.monotonic())
            result: Any = (
                {"schema": Counter.describe()} if req.operation == "get_group"
                else {"instance_id": b"\x01" * 16, "seq": 0, "relations": {}}
            )
            router.send_multipart([ident, *encode_reply(req.corr_id, result)])

    def on_subscription() -> None:
        while xpub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            xpub.recv_multipart()
            seen.setdefault("subscribed", time.monotonic())

    loop.add_reader(router.getsockopt(zmq.FD), on_request)
    readers = [router]
    conns: list[RpcConnection] = []

    class Link:  # a clear link: the fake instance is open
        async def call_binding(self, b: Binding, op: str, args: Any, timeout_s: float) -> Any:
            if not conns:
                conns.append(RpcConnection(b.rpc))
            return await conns[0].call(b.schema, b.cell, op, args, timeout_s)

        def channel_session(self, b: Binding) -> None:
            return None

    cache = Cache(Binding(COUNTER, "Site", rpc_ep, events_ep), Link())
    try:
        start = asyncio.create_task(cache._start(5.0))
        await asyncio.sleep(PUBLISHER_LATE_S)  # the publisher is late: the SUB cannot subscribe yet
        assert "get_dump" not in seen
        xpub.bind(events_ep)
        loop.add_reader(xpub.getsockopt(zmq.FD), on_subscription)
        readers.append(xpub)
        on_subscription()
        await start
        assert cache.live
        assert seen["subscribed"] <= seen["get_dump"]
    finally:
        await cache.close()
        for conn in conns:
            conn.close()
        for sock in readers:
            loop.remove_reader(sock.getsockopt(zmq.FD))
        router.close(0)
        xpub.close(0)
