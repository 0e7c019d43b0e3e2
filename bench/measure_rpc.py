"""RPC round trip: ``Client.call`` of a trivial read against a blocking raw ROUTER echo.

Ours: ``Client.call("Bench-A", "UBench::Stream", "echo", x=i)`` on the instance in the
ubicore child, one at a time, then from 8 tasks that each keep one call in flight.
Raw: a blocking DEALER in the bench process against a child's blocking ROUTER echo, one
request at a time, then with 8 requests outstanding (each reply sends the next). Every
request's latency is measured from send to reply; we report p50 and p99 in µs.

A third figure, sequential only, splits the gap: the *asyncio floor*, the same echo
with ubicore's socket pump (:class:`ubicore.transport.sockets.Pump`) in an asyncio loop
at both ends (``floor_child.py``; one future per call) and no protocol, dispatch or
store. ours − floor is what the SDK, codec and instance add; floor − raw is what
asyncio event loops cost over blocking sockets.
"""

from __future__ import annotations

import asyncio
import struct
import time
from typing import Any

import msgpack
import zmq

from harness import MEASURE_TIMEOUT_S, Child, log, percentile_us, ratio
from ubicore.client import Client
from ubicore.transport.sockets import Pump, make_socket

STREAM = "UBench::Stream"
STREAM_CELL = "Bench-A"
IN_FLIGHT = 8
RAW_RCVTIMEO_MS = 2000
TARGET_P50_RATIO = 1.5
_ID = struct.Struct("<Q")


def _stats(latencies_s: list[float]) -> dict[str, float]:
    return {"p50_us": percentile_us(latencies_s, 0.50), "p99_us": percentile_us(latencies_s, 0.99)}


async def ours_sequential(client: Client, calls: int, timeout_s: float) -> list[float]:
    lat: list[float] = []
    deadline = time.perf_counter() + timeout_s
    call, clock = client.call, time.perf_counter
    for i in range(calls):
        t0 = clock()
        result = await call(STREAM_CELL, STREAM, "echo", x=i)
        t1 = clock()
        if result != i:
            raise RuntimeError(f"echo answered {result!r} to {i}")
        lat.append(t1 - t0)
        if t1 > deadline:
            break
    return lat


async def ours_in_flight(client: Client, calls: int, timeout_s: float) -> list[float]:
    lat: list[float] = []
    deadline = time.perf_counter() + timeout_s
    per_task = calls // IN_FLIGHT
    call, clock = client.call, time.perf_counter

    async def worker(w: int) -> None:
        for i in range(per_task):
            t0 = clock()
            await call(STREAM_CELL, STREAM, "echo", x=i)
            t1 = clock()
            lat.append(t1 - t0)
            if t1 > deadline:
                break

    await asyncio.gather(*(worker(w) for w in range(IN_FLIGHT)))
    return lat


ECHO_BODY = msgpack.packb([1, STREAM, STREAM_CELL, "echo", {"x": 1}, 5000])
"""A request body of the size of ours (header + msgpack of the same call)."""


class RawRpc:
    """A blocking DEALER on the raw child's ROUTER echo, sending ``body`` each request."""

    def __init__(self, endpoint: str, body: bytes = ECHO_BODY) -> None:
        self.ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.RCVTIMEO, RAW_RCVTIMEO_MS)
        self.sock.connect(endpoint)
        self.body = body

    def sequential(self, calls: int, timeout_s: float) -> list[float]:
        send, recv, clock, body = self.sock.send_multipart, self.sock.recv_multipart, time.perf_counter, self.body
        lat: list[float] = []
        deadline = clock() + timeout_s
        for i in range(calls):
            t0 = clock()
            send([_ID.pack(i), body])
            frames = recv()
            t1 = clock()
            if _ID.unpack(frames[0])[0] != i:
                raise RuntimeError("raw echo out of order")
            lat.append(t1 - t0)
            if t1 > deadline:
                break
        return lat

    def in_flight(self, calls: int, timeout_s: float) -> list[float]:
        send, recv, clock, body = self.sock.send_multipart, self.sock.recv_multipart, time.perf_counter, self.body
        lat: list[float] = []
        sent_at: dict[int, float] = {}
        deadline = clock() + timeout_s
        sent = 0
        for _ in range(IN_FLIGHT):
            sent_at[sent] = clock()
            send([_ID.pack(sent), body])
            sent += 1
        while sent_at:
            frames = recv()
            t1 = clock()
            lat.append(t1 - sent_at.pop(_ID.unpack(frames[0])[0]))
            if sent < calls and t1 < deadline:
                sent_at[sent] = clock()
                send([_ID.pack(sent), body])
                sent += 1
        return lat

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


class PumpRpc:
    """The asyncio floor: a DEALER driven by ubicore's Pump, one future per call."""

    def __init__(self, endpoint: str) -> None:
        self.sock = make_socket(zmq.DEALER)
        self.sock.connect(endpoint)
        self.pump = Pump(self.sock, self._on_frames)
        self.fut: asyncio.Future[list[bytes]] | None = None
        self.body = ECHO_BODY

    def _on_frames(self, frames: list[bytes]) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_result(frames)

    def _abort(self) -> None:
        if self.fut is not None and not self.fut.done():
            self.fut.set_exception(TimeoutError("no reply from the raw echo"))

    async def sequential(self, calls: int, timeout_s: float) -> list[float]:
        loop = asyncio.get_running_loop()
        watchdog = loop.call_later(timeout_s + 5.0, self._abort)  # one timer, not one per call
        lat: list[float] = []
        clock, send, body = time.perf_counter, self.pump.send, self.body
        deadline = clock() + timeout_s
        try:
            for i in range(calls):
                self.fut = loop.create_future()
                t0 = clock()
                send([_ID.pack(i), body])
                frames = await self.fut
                t1 = clock()
                if _ID.unpack(frames[0])[0] != i:
                    raise RuntimeError("pump echo out of order")
                lat.append(t1 - t0)
                if t1 > deadline:
                    break
        finally:
            watchdog.cancel()
        return lat

    def close(self) -> None:
        self.pump.close()


def _summary(mode: str, ours: list[float], raw: list[float]) -> dict[str, Any]:
    o, r = _stats(ours), _stats(raw)
    r50 = ratio(o["p50_us"], r["p50_us"])
    return {
        "calls": {"ubicore": len(ours), "raw": len(raw)},
        "in_flight": IN_FLIGHT if mode == "in_flight8" else 1,
        "ubicore_p50_us": o["p50_us"], "ubicore_p99_us": o["p99_us"],
        "raw_p50_us": r["p50_us"], "raw_p99_us": r["p99_us"],
        "ratio_p50": r50, "ratio_p99": ratio(o["p99_us"], r["p99_us"]),
        "target": f"ratio_p50 <= {TARGET_P50_RATIO}",
        "met": r50 is not None and r50 <= TARGET_P50_RATIO,
    }


async def bench_rpc(client: Client, calls: int, reps: int) -> dict[str, Any]:
    """Sequential and 8-in-flight, ours and raw alternately ``reps`` times (samples pooled)."""
    child = Child("raw_child.py", "echo")
    floor_child = None
    raw = pump = None
    out: dict[str, Any] = {}
    try:
        floor_child = Child("floor_child.py")
        raw = RawRpc(child.info["rpc"])
        pump = PumpRpc(floor_child.info["rpc"])
        await ours_sequential(client, 300, MEASURE_TIMEOUT_S)  # warm up all three
        raw.sequential(300, MEASURE_TIMEOUT_S)
        await pump.sequential(300, MEASURE_TIMEOUT_S)
        pooled: dict[str, tuple[list[float], list[float]]] = {"sequential": ([], []), "in_flight8": ([], [])}
        floor: list[float] = []
        for rep in range(reps):
            for mode in pooled:
                if mode == "sequential":
                    o = await ours_sequential(client, calls, MEASURE_TIMEOUT_S)
                    r = raw.sequential(calls, MEASURE_TIMEOUT_S)
                    floor.extend(await pump.sequential(calls, MEASURE_TIMEOUT_S))
                else:
                    o = await ours_in_flight(client, calls, MEASURE_TIMEOUT_S)
                    r = raw.in_flight(calls, MEASURE_TIMEOUT_S)
                pooled[mode][0].extend(o)
                pooled[mode][1].extend(r)
                so, sr = _stats(o), _stats(r)
                log(f"[rpc] {mode} rep {rep + 1}/{reps}: ubicore p50 {so['p50_us']} µs p99 {so['p99_us']} µs,"
                    f" raw p50 {sr['p50_us']} µs p99 {sr['p99_us']} µs")
        for mode, (o_all, r_all) in pooled.items():
            out[mode] = _summary(mode, o_all, r_all)
            expected = calls if mode == "sequential" else calls // IN_FLIGHT * IN_FLIGHT
            out[mode]["complete"] = len(o_all) >= reps * expected and len(r_all) >= reps * calls
        f, raw_seq = _stats(floor), _stats(pooled["sequential"][1])
        out["sequential"].update(asyncio_floor_p50_us=f["p50_us"], asyncio_floor_p99_us=f["p99_us"],
                                 ratio_floor_p50=ratio(f["p50_us"], raw_seq["p50_us"]))
        log(f"[rpc] asyncio floor (Pump at both ends, no protocol): p50 {f['p50_us']} µs p99 {f['p99_us']} µs")
    finally:
        if pump is not None:
            pump.close()
        if raw is not None:
            raw.close()
        if floor_child is not None:
            floor_child.close()
        child.close()
    return out
