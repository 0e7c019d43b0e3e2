"""Benchmark child: the raw-pyzmq baselines, blocking loops with no ubicore in them.

Usage: ``python bench/raw_child.py MODE [ARGS]``; prints ``READY {endpoints}`` and then
serves until its stdin closes (a watchdog thread exits the process) or
``MAX_LIFETIME_S`` passes.

- ``pub HWM``: a REP control socket and a PUB. Control requests (msgpack arrays):
  ``["probe"]`` publishes one 1-byte message ``b"P"`` and answers; ``["run", n, size]``
  answers, then publishes ``n`` messages of ``size`` bytes, one per event.
- ``echo``: a ROUTER that sends every request's frames straight back.
- ``dump N``: a ROUTER that answers any request with one msgpack body holding the ``N``
  rows of :func:`rows.table_row`, packed at request time.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

from rows import table_row  # noqa: E402

MAX_LIFETIME_S = 600.0


def _watchdog() -> None:
    """Exit the process when stdin closes or the lifetime is over."""
    deadline = time.monotonic() + MAX_LIFETIME_S

    def eof() -> None:
        try:
            while sys.stdin.buffer.read(4096):
                pass
        except (OSError, ValueError):
            pass
        os._exit(0)

    threading.Thread(target=eof, daemon=True).start()

    def lifetime() -> None:
        time.sleep(max(0.0, deadline - time.monotonic()))
        os._exit(3)

    threading.Thread(target=lifetime, daemon=True).start()


def _bind(sock: zmq.Socket[bytes]) -> str:
    sock.bind("tcp://127.0.0.1:*")
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def _ready(**info: str) -> None:
    print("READY " + json.dumps(info), flush=True)


def serve_pub(ctx: zmq.Context[zmq.Socket[bytes]], hwm: int) -> None:
    ctl = ctx.socket(zmq.REP)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, hwm)
    _ready(ctl=_bind(ctl), pub=_bind(pub))
    while True:
        cmd = msgpack.unpackb(ctl.recv())
        if cmd[0] == "probe":
            pub.send(b"P")
            ctl.send(b"ok")
        elif cmd[0] == "run":
            n, size = int(cmd[1]), int(cmd[2])
            payload = b"\xa5" * size
            ctl.send(b"ok")
            send = pub.send
            for _ in range(n):
                send(payload)
        else:
            ctl.send(b"?")


def serve_echo(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 100_000)
    router.setsockopt(zmq.RCVHWM, 100_000)
    _ready(rpc=_bind(router))
    recv, send = router.recv_multipart, router.send_multipart
    while True:
        send(recv())


def serve_dump(ctx: zmq.Context[zmq.Socket[bytes]], n: int) -> None:
    rows = [list(table_row(i)) for i in range(n)]
    router = ctx.socket(zmq.ROUTER)
    _ready(rpc=_bind(router))
    while True:
        frames = router.recv_multipart()
        router.send_multipart([frames[0], msgpack.packb(rows, use_bin_type=True)], copy=False)


def main() -> None:
    _watchdog()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    mode = sys.argv[1]
    if mode == "pub":
        serve_pub(ctx, int(sys.argv[2]))
    elif mode == "echo":
        serve_echo(ctx)
    elif mode == "dump":
        serve_dump(ctx, int(sys.argv[2]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
