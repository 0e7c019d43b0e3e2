"""The life of a benchmark child process, shared by every ``*_child.py``; no ubicore in it.

A child prints one line ``READY {json}`` once it serves (:func:`ready`) and ends when its
stdin closes (the bench process closed it, or died) or ``MAX_LIFETIME_S`` passes,
whatever happens. Blocking children (the raw pyzmq baselines) start :func:`exit_on_eof`
and run their modes through :func:`main`; asyncio children take a :func:`stop_event` and
await :func:`until_stopped`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import msgpack
import zmq

MAX_LIFETIME_S = 600.0
Context = zmq.Context[zmq.Socket[bytes]]
Mode = Callable[..., None]
"""A blocking child's mode: ``mode(ctx, *argv_after_the_mode_name)``."""


def ready(**info: object) -> None:
    print("READY " + json.dumps(info), flush=True)


def _drain_stdin() -> None:
    """Return when stdin closes. Reads the file descriptor, not ``sys.stdin``: a daemon
    thread blocked in a buffered read aborts the interpreter's shutdown."""
    with contextlib.suppress(OSError, ValueError):
        fd = sys.stdin.fileno()
        while os.read(fd, 4096):
            pass


# --- blocking children ---------------------------------------------------------------------------


def exit_on_eof() -> None:
    """Exit the process when stdin closes (status 0) or the lifetime is over (status 3)."""
    deadline = time.monotonic() + MAX_LIFETIME_S

    def eof() -> None:
        _drain_stdin()
        os._exit(0)

    def lifetime() -> None:
        time.sleep(max(0.0, deadline - time.monotonic()))
        os._exit(3)

    threading.Thread(target=eof, daemon=True).start()
    threading.Thread(target=lifetime, daemon=True).start()


def bind(sock: zmq.Socket[bytes]) -> str:
    sock.bind("tcp://127.0.0.1:*")
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def router(ctx: Context, hwm: int | None = None) -> tuple[zmq.Socket[bytes], str]:
    """A ROUTER bound to a free 127.0.0.1 port (both HWMs set to ``hwm`` if given)."""
    sock = ctx.socket(zmq.ROUTER)
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    return sock, bind(sock)


def serve_pub(ctx: Context, hwm: int, publish: Callable[[zmq.Socket[bytes], int, bytes], None],
              **info: str) -> None:
    """A REP control socket and a PUB; prints READY with ``ctl``, ``pub`` and ``info``.

    Control requests (msgpack arrays): ``["probe"]`` publishes one clear 1-byte message
    ``b"P"`` and answers; ``["run", n, size]`` answers, then calls ``publish(pub, n,
    payload)`` with a payload of ``size`` bytes (``publish`` sends ``n`` messages).
    """
    ctl = ctx.socket(zmq.REP)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, hwm)
    ready(ctl=bind(ctl), pub=bind(pub), **info)
    while True:
        cmd = msgpack.unpackb(ctl.recv())
        if cmd[0] == "probe":
            pub.send(b"P")
            ctl.send(b"ok")
        elif cmd[0] == "run":
            n, size = int(cmd[1]), int(cmd[2])
            payload = b"\xa5" * size
            ctl.send(b"ok")
            publish(pub, n, payload)
        else:
            ctl.send(b"?")


def main(modes: Mapping[str, Mode]) -> None:
    """``python CHILD MODE [ARGS]``: run ``modes[MODE](ctx, *ARGS)`` until stdin closes."""
    if len(sys.argv) < 2 or sys.argv[1] not in modes:
        raise SystemExit(f"usage: {Path(sys.argv[0]).name} {{{'|'.join(modes)}}} [ARGS]")
    exit_on_eof()
    ctx: Context = zmq.Context()
    modes[sys.argv[1]](ctx, *sys.argv[2:])


# --- asyncio children ----------------------------------------------------------------------------


def stop_event() -> asyncio.Event:
    """An event set when stdin closes, on SIGTERM or on SIGINT; call it in the running loop."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    def watch_stdin() -> None:
        _drain_stdin()
        with contextlib.suppress(RuntimeError):  # the loop is already closed
            loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    return stop


async def until_stopped(stop: asyncio.Event) -> None:
    """Return when ``stop`` is set or after ``MAX_LIFETIME_S``, whichever comes first."""
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(stop.wait(), MAX_LIFETIME_S)
