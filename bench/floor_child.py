"""Benchmark child: the asyncio floor of a round trip, ubicore's socket pump and nothing else.

Usage: ``python bench/floor_child.py``. A ROUTER driven by
:class:`ubicore.transport.sockets.Pump` in an asyncio loop sends every request's frames
straight back: the instance's I/O path with no protocol, dispatch or store behind it.
Prints ``READY {"rpc": endpoint}``; stops when stdin closes, on SIGTERM, or after
``MAX_LIFETIME_S``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading

import zmq

from ubicore.transport.sockets import Pump, bind, make_socket

MAX_LIFETIME_S = 600.0


async def serve() -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)

    def watch_stdin() -> None:
        with contextlib.suppress(OSError, ValueError):
            while sys.stdin.buffer.read(4096):
                pass
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    sock = make_socket(zmq.ROUTER, hwm=100_000)
    endpoint = bind(sock, "tcp://127.0.0.1:*")
    pump: Pump | None = None

    def echo(frames: list[bytes]) -> None:
        assert pump is not None
        pump.send(frames)

    pump = Pump(sock, echo, loop)
    try:
        print("READY " + json.dumps({"rpc": endpoint}), flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), MAX_LIFETIME_S)
    finally:
        pump.close()


if __name__ == "__main__":
    asyncio.run(serve())
