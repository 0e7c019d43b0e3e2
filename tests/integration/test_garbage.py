"""Robustness on real sockets: garbage to an instance's ROUTER and on an event channel.

The instance answers what it can (``protocol_error`` when a correlation id can be read,
``not_found`` for a well-formed request meant for someone else), drops the rest, counts
every malformed message in ``get_stats`` and keeps serving. A subscription drops and
counts garbage and keeps delivering the valid messages around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from ubicore.client import NAMING_CELL, NAMING_SCHEMA
from ubicore.errors import ProtocolError
from ubicore.protocol.codec import (
    HEADER_DELTA,
    HEADER_HEARTBEAT,
    HEADER_REPLY,
    HEADER_REQUEST,
    encode_delta,
    encode_heartbeat,
    pack,
    parse_channel_message,
    parse_server_message,
)
from ubicore.protocol.messages import Change, ChannelMessage, Delta, ErrorReply, Heartbeat, Op, Reply
from ubicore.runtime import make_core
from ubicore.schema import registered_schemas
from ubicore.service import InstanceServer
from ubicore.testing import COUNTER, run_async, running_site
from ubicore.transport.channel import Subscription

GUARD_S = 5.0


@contextlib.asynccontextmanager
async def raw_socket(kind: int, endpoint: str, *, bind: bool = False) -> AsyncIterator[zmq.asyncio.Socket]:
    """A bare pyzmq socket in a context of its own, closed and terminated on exit."""
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        if bind:
            sock.bind(endpoint)
        else:
            sock.connect(endpoint)
        yield sock
    finally:
        sock.close(0)
        ctx.term()


def request(corr: int, schema: str, cell: str, op: str, args: Any = None) -> list[bytes]:
    return [HEADER_REQUEST, pack([corr, schema, cell, op, {} if args is None else args, 0])]


def undecodable_requests(rng: random.Random) -> list[list[bytes]]:
    """Frames from which no correlation id can be read: dropped without a reply."""
    valid = request(7, COUNTER, "Site", "get", {"name": "x"})
    fixed = [
        [b""],
        [rng.randbytes(37)],
        [b"XX\x01\x01", valid[1]],  # wrong magic
        [HEADER_REQUEST, valid[1][:-4]],  # truncated body
        [HEADER_REQUEST],  # one frame
        [HEADER_REQUEST, valid[1], b"extra"],  # three frames
        [HEADER_REQUEST, b"\xc1"],  # a byte msgpack never uses
        [HEADER_REQUEST, pack({"corr": 9})],  # a map, not an array
        [HEADER_REQUEST, pack(["nine", COUNTER, "Site", "get", {}, 0])],  # corr id not an integer
    ]
    randoms = [
        [b"\x00" + rng.randbytes(rng.randrange(0, 64)) for _ in range(rng.randrange(1, 4))] for _ in range(100)
    ]
    return fixed + randoms


@run_async
async def test_instance_survives_garbage_on_its_router(tmp_path: Path) -> None:
    rng = random.Random(1234)
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        server = rs.server(COUNTER, "Site")
        dropped = undecodable_requests(rng)
        answered: list[tuple[list[bytes], tuple[str, int, str]]] = [
            ([HEADER_REQUEST, pack([101, COUNTER, "Site", "get", "not a map", 0])], ("error", 101, "protocol_error")),
            ([HEADER_REQUEST, pack([102])], ("error", 102, "protocol_error")),
            ([HEADER_REPLY, pack([103, None])], ("error", 103, "protocol_error")),  # a reply sent to a server
            ([HEADER_REQUEST, pack([104, COUNTER, "Site", 5, {}, 0])], ("error", 104, "protocol_error")),
            # another protocol version or an unknown kind: told so rather than left to time out
            ([b"UB\x09\x01", request(108, COUNTER, "Site", "get")[1]], ("error", 108, "protocol_error")),
            ([b"UB\x01\x7f", request(109, COUNTER, "Site", "get")[1]], ("error", 109, "protocol_error")),
            (request(105, "UTest::Other", "Site", "get", {"name": "x"}), ("error", 105, "not_found")),
            (request(106, COUNTER, "Zone-A", "get", {"name": "x"}), ("error", 106, "not_found")),
            (request(107, COUNTER, "Site", "bump", {"name": "raw"}), ("reply", 107, "")),
        ]
        malformed = len(dropped) + 6
        async with raw_socket(zmq.DEALER, server.rpc_endpoint) as dealer:
            messages = dropped + [frames for frames, _ in answered]
            rng.shuffle(messages)
            for frames in messages:
                await dealer.send_multipart(frames)
            await dealer.send_multipart(request(999, COUNTER, "Site", "get_stats"))
            got: list[tuple[str, int, str]] = []
            stats: dict[str, int] = {}
            async with asyncio.timeout(GUARD_S):
                while not stats:
                    msg = parse_server_message(await dealer.recv_multipart())
                    if isinstance(msg, Reply) and msg.corr_id == 999:
                        stats = msg.result
                    elif isinstance(msg, ErrorReply):
                        got.append(("error", msg.corr_id, msg.code))
                    else:
                        got.append(("reply", msg.corr_id, ""))
        assert sorted(got) == sorted(expected for _, expected in answered)
        assert stats["malformed"] == malformed
        assert stats["requests"] == 4  # 105, 106, 107, then get_stats itself
        # The instance still serves well-formed calls, from the raw peer's call onwards.
        assert await rs.client.call("Site", COUNTER, "bump", name="raw") == 2
        final = await rs.client.call("Site", COUNTER, "get_stats")
        assert final["malformed"] == malformed


def channel_garbage(iid: bytes) -> list[list[bytes]]:
    ok_batch = [["counters", Op.INSERT, ["g", 1, ""]]]
    return [
        [os.urandom(40)],
        [b"XX\x01\x10", pack([iid, 1, ok_batch])],
        [HEADER_DELTA, pack([iid[:5], 1, ok_batch])],  # short instance id
        [HEADER_DELTA, pack([iid, 1, []])],  # no batches
        [HEADER_DELTA, pack([iid, 1, [[["counters", 9, ["g", 1, ""]]]]])],  # no such op
        [HEADER_DELTA, pack([iid, -1, ok_batch])],  # negative sequence
        [HEADER_DELTA, pack([iid, 1, ok_batch])[:-3]],  # truncated
        [HEADER_HEARTBEAT, pack([iid, 1]), b"extra"],  # three frames
        [HEADER_REQUEST, pack([1, COUNTER, "Site", "get", {}, 0])],  # not a channel kind
        [HEADER_HEARTBEAT],
    ]


def check_all_malformed(garbage: Sequence[list[bytes]]) -> None:
    for frames in garbage:
        with pytest.raises(ProtocolError):
            parse_channel_message(frames)


async def publish_until(pub: zmq.asyncio.Socket, frames: list[bytes], done: Any) -> None:
    """Publish ``frames`` again and again until ``done()``: PUB drops what it sends
    before the subscriber's connection is up."""
    async with asyncio.timeout(GUARD_S):
        while not done():
            await pub.send_multipart(frames)
            await asyncio.sleep(0.01)


@run_async
async def test_subscription_counts_garbage_and_delivers_the_rest(tmp_path: Path) -> None:
    iid = os.urandom(16)
    garbage = channel_garbage(iid)
    check_all_malformed(garbage)
    async with raw_socket(zmq.PUB, "tcp://127.0.0.1:*", bind=True) as pub:
        endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
        received: list[ChannelMessage] = []
        sub = Subscription(endpoint, received.append)
        try:
            hello = Heartbeat(iid, 0)
            await publish_until(pub, encode_heartbeat(hello), lambda: bool(received))
            valid = [Delta(iid, i, ((Change("counters", Op.UPDATE, ("g", i, "")),),)) for i in range(1, 6)]
            for delta, junk in zip(valid, [garbage[:2], garbage[2:4], garbage[4:6], garbage[6:8], garbage[8:]]):
                for frames in junk:
                    await pub.send_multipart(frames)
                await pub.send_multipart(encode_delta(delta))
            await pub.send_multipart(encode_heartbeat(Heartbeat(iid, 5)))
            async with asyncio.timeout(GUARD_S):
                while Heartbeat(iid, 5) not in received:
                    await asyncio.sleep(0.01)
        finally:
            sub.close()
    assert sub.malformed == len(garbage)
    assert [m for m in received if m != hello] == [*valid, Heartbeat(iid, 5)]


@run_async
async def test_cache_on_a_channel_with_garbage_applies_the_valid_deltas(tmp_path: Path) -> None:
    """A cache whose registration points at a fake channel (a raw PUB) and at a real,
    unregistered instance for its dump: garbage frames between valid deltas are dropped
    without a resync and the deltas apply in order."""
    async with running_site(tmp_path, instances=[]) as rs:
        core = make_core(rs.site, rs.plan(COUNTER, "Site"), registered_schemas()[COUNTER])
        server = InstanceServer(core, address="127.0.0.1")
        await server.start()
        try:
            async with raw_socket(zmq.PUB, "tcp://127.0.0.1:*", bind=True) as pub:
                fake_events = pub.getsockopt_string(zmq.LAST_ENDPOINT)
                await rs.client.call(
                    NAMING_CELL, NAMING_SCHEMA, "register", schema=COUNTER, cell="Site", host="host-a",
                    rpc=server.rpc_endpoint, events=fake_events, instance_id=core.instance_id, protection="open",
                )
                await rs.client.find("Site", COUNTER, wait_s=GUARD_S)
                cache = await rs.client.cache("Site", COUNTER)
                assert cache.live and cache.seq == 0 and len(cache.table("counters")) == 0
                iid = core.instance_id

                def delta(seq: int, value: int) -> list[bytes]:
                    op = Op.INSERT if seq == 1 else Op.UPDATE
                    return encode_delta(Delta(iid, seq, ((Change("counters", op, ("f", value, "")),),)))

                table = cache.table("counters")
                await publish_until(pub, delta(1, 10), lambda: ("f",) in table)  # repeats are duplicates
                garbage = channel_garbage(iid)
                for seq in range(2, 12):
                    await pub.send_multipart(garbage[seq % len(garbage)])
                    await pub.send_multipart(delta(seq, seq * 10))
                await cache.wait_for(lambda c: c.seq == 11, GUARD_S)
                assert table[("f",)].value == 110
                assert cache.resyncs == 0 and cache.malformed == 0
                await cache.close()
        finally:
            await server.stop()
