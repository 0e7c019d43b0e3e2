"""Benchmark child: raw pyzmq baselines that seal every message with AES-128-GCM.

Usage: ``python bench/raw_aead_child.py MODE [ARGS]``; prints ``READY {endpoints, key}``
and serves until its stdin closes (a watchdog thread exits the process) or
``MAX_LIFETIME_S`` passes. No ubicore in it: ``cryptography``'s ``AESGCM`` and pyzmq.

Every message is sealed the cheapest honest way: one random 16-byte key per direction
(``key`` in the READY line, hex; a benchmark, not a protocol), a 12-byte nonce of a
4-byte prefix and an 8-byte counter that only grows, and associated data of a fixed
64-byte context followed by that counter (about what ubicore binds: labels, schema,
cell, instance id, epoch, counter).

- ``pub HWM``: a REP control socket and a PUB. ``["probe"]`` publishes one clear 1-byte
  message ``b"P"``; ``["run", n, size]`` answers, then publishes ``n`` messages
  ``counter(8) ‖ AESGCM(size bytes)``, one per event.
- ``echo``: a ROUTER; a request ``[id, counter(8), ciphertext]`` is opened with the
  client→server key and answered ``[id, counter(8), ciphertext]`` sealed with the
  server→client key (the reply's plaintext is the request's plaintext).
"""

from __future__ import annotations

import json
import os
import struct
import sys
import threading
import time

import msgpack
import zmq
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

MAX_LIFETIME_S = 600.0
AD_CONTEXT = b"raw-aead-v1 " + b"\x5a" * 52
"""The fixed part of every message's associated data (64 bytes)."""
PREFIX_EVENT, PREFIX_C2S, PREFIX_S2C = b"\0\0\0\3", b"\0\0\0\1", b"\0\0\0\2"
BE8 = struct.Struct(">Q")


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

    def lifetime() -> None:
        time.sleep(max(0.0, deadline - time.monotonic()))
        os._exit(3)

    threading.Thread(target=eof, daemon=True).start()
    threading.Thread(target=lifetime, daemon=True).start()


def _bind(sock: zmq.Socket[bytes]) -> str:
    sock.bind("tcp://127.0.0.1:*")
    return str(sock.getsockopt_string(zmq.LAST_ENDPOINT))


def _ready(**info: str) -> None:
    print("READY " + json.dumps(info), flush=True)


def serve_pub(ctx: zmq.Context[zmq.Socket[bytes]], hwm: int) -> None:
    key = os.urandom(16)
    aead = AESGCM(key)
    ctl = ctx.socket(zmq.REP)
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, hwm)
    _ready(ctl=_bind(ctl), pub=_bind(pub), key=key.hex())
    counter = 0
    while True:
        cmd = msgpack.unpackb(ctl.recv())
        if cmd[0] == "probe":
            pub.send(b"P")
            ctl.send(b"ok")
        elif cmd[0] == "run":
            n, size = int(cmd[1]), int(cmd[2])
            payload = b"\xa5" * size
            ctl.send(b"ok")
            send, encrypt, be8 = pub.send, aead.encrypt, BE8.pack
            for _ in range(n):
                counter += 1
                c = be8(counter)
                send(c + encrypt(PREFIX_EVENT + c, payload, AD_CONTEXT + c))
        else:
            ctl.send(b"?")


def serve_echo(ctx: zmq.Context[zmq.Socket[bytes]]) -> None:
    c2s_key, s2c_key = os.urandom(16), os.urandom(16)
    c2s, s2c = AESGCM(c2s_key), AESGCM(s2c_key)
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.SNDHWM, 100_000)
    router.setsockopt(zmq.RCVHWM, 100_000)
    _ready(rpc=_bind(router), c2s=c2s_key.hex(), s2c=s2c_key.hex())
    recv, send, be8 = router.recv_multipart, router.send_multipart, BE8.pack
    counter = 0
    while True:
        ident, rid, c, ct = recv()
        plain = c2s.decrypt(PREFIX_C2S + c, ct, AD_CONTEXT + c)
        counter += 1
        rc = be8(counter)
        send([ident, rid, rc, s2c.encrypt(PREFIX_S2C + rc, plain, AD_CONTEXT + rc)])


def main() -> None:
    _watchdog()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context()
    mode = sys.argv[1]
    if mode == "pub":
        serve_pub(ctx, int(sys.argv[2]))
    elif mode == "echo":
        serve_echo(ctx)
    else:
        raise SystemExit(f"unknown mode {mode!r}")


if __name__ == "__main__":
    main()
