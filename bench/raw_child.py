"""Benchmark child: the raw-pyzmq baselines, blocking loops with no ubicore in them.

Usage: ``python bench/raw_child.py MODE [ARGS]``; prints ``READY {endpoints}`` and then
serves until its stdin closes or ``MAX_LIFETIME_S`` passes (:mod:`childproc`).

- ``pub HWM``: a REP control socket and a PUB (:func:`childproc.serve_pub`). Control
  requests (msgpack arrays): ``["probe"]`` publishes one 1-byte message ``b"P"`` and
  answers; ``["run", n, size]`` answers, then publishes ``n`` messages of ``size`` bytes,
  one per event.
- ``echo``: a ROUTER that sends every request's frames straight back.
- ``dump N``: a ROUTER that answers any request with one msgpack body holding the ``N``
  rows of :func:`rows.table_row`, packed at request time.
"""

from __future__ import annotations

import sys
from pathlib import Path

import msgpack
import zmq

sys.path.insert(0, str(Path(__file__).resolve().parent))

import childproc  # noqa: E402
from rows import table_row  # noqa: E402


def _publish(pub: zmq.Socket[bytes], n: int, payload: bytes) -> None:
    send = pub.send
    for _ in range(n):
        send(payload)


def serve_pub(ctx: childproc.Context, hwm: str) -> None:
    childproc.serve_pub(ctx, int(hwm), _publish)


def serve_echo(ctx: childproc.Context) -> None:
    router, endpoint = childproc.router(ctx, hwm=100_000)
    childproc.ready(rpc=endpoint)
    recv, send = router.recv_multipart, router.send_multipart
    while True:
        send(recv())


def serve_dump(ctx: childproc.Context, n: str) -> None:
    rows = [list(table_row(i)) for i in range(int(n))]
    router, endpoint = childproc.router(ctx)
    childproc.ready(rpc=endpoint)
    while True:
        frames = router.recv_multipart()
        router.send_multipart([frames[0], msgpack.packb(rows, use_bin_type=True)], copy=False)


if __name__ == "__main__":
    childproc.main({"pub": serve_pub, "echo": serve_echo, "dump": serve_dump})
