"""Benchmark child: the asyncio floor of a round trip, ubicore's socket pump and nothing else.

Usage: ``python bench/floor_child.py``. A ROUTER driven by
:class:`ubicore.transport.sockets.Pump` in an asyncio loop sends every request's frames
straight back: the instance's I/O path with no protocol, dispatch or store behind it.
Prints ``READY {"rpc": endpoint}``; stops when stdin closes, on SIGTERM or SIGINT, or
after ``MAX_LIFETIME_S`` (:mod:`childproc`).
"""

from __future__ import annotations

import asyncio

import zmq

import childproc
from ubicore.transport.sockets import Pump, bind, make_socket


async def serve() -> None:
    loop = asyncio.get_running_loop()
    stop = childproc.stop_event()
    sock = make_socket(zmq.ROUTER, hwm=100_000)
    endpoint = bind(sock, "tcp://127.0.0.1:*")
    pump: Pump | None = None

    def echo(frames: list[bytes]) -> None:
        assert pump is not None
        pump.send(frames)

    pump = Pump(sock, echo, loop)
    try:
        childproc.ready(rpc=endpoint)
        await childproc.until_stopped(stop)
    finally:
        pump.close()


if __name__ == "__main__":
    asyncio.run(serve())
