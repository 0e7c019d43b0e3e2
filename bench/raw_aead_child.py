"""Benchmark child: raw pyzmq baselines that seal every message with AES-128-GCM.

Usage: ``python bench/raw_aead_child.py MODE [ARGS]``; prints ``READY {endpoints, key}``
and serves until its stdin closes or ``MAX_LIFETIME_S`` passes (:mod:`childproc`). No
ubicore in it: ``cryptography``'s ``AESGCM`` and pyzmq.

Every message is sealed the cheapest honest way: one random 16-byte key per direction
(``key`` in the READY line, hex; a benchmark, not a protocol), a 12-byte nonce of a
4-byte prefix and an 8-byte counter that only grows, and associated data of a fixed
64-byte context followed by that counter (about what ubicore binds: labels, schema,
cell, instance id, epoch, counter). The bench side (:mod:`measure_levels`) imports the
constants below.

- ``pub HWM``: a REP control socket and a PUB (:func:`childproc.serve_pub`).
  ``["probe"]`` publishes one clear 1-byte message ``b"P"``; ``["run", n, size]``
  answers, then publishes ``n`` messages ``counter(8) ‖ AESGCM(size bytes)``, one per
  event.
- ``echo``: a ROUTER; a request ``[id, counter(8), ciphertext]`` is opened with the
  client→server key and answered ``[id, counter(8), ciphertext]`` sealed with the
  server→client key (the reply's plaintext is the request's plaintext).
"""

from __future__ import annotations

import os
import struct
import sys
from pathlib import Path

import zmq
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

sys.path.insert(0, str(Path(__file__).resolve().parent))

import childproc  # noqa: E402

AD_CONTEXT = b"raw-aead-v1 " + b"\x5a" * 52
"""The fixed part of every message's associated data (64 bytes)."""
PREFIX_EVENT, PREFIX_C2S, PREFIX_S2C = b"\0\0\0\3", b"\0\0\0\1", b"\0\0\0\2"
BE8 = struct.Struct(">Q")


def serve_pub(ctx: childproc.Context, hwm: str) -> None:
    key = os.urandom(16)
    aead = AESGCM(key)
    last = 0  # the counter only grows, across runs

    def publish(pub: zmq.Socket[bytes], n: int, payload: bytes) -> None:
        nonlocal last
        send, encrypt, be8, counter = pub.send, aead.encrypt, BE8.pack, last
        for _ in range(n):
            counter += 1
            c = be8(counter)
            send(c + encrypt(PREFIX_EVENT + c, payload, AD_CONTEXT + c))
        last = counter

    childproc.serve_pub(ctx, int(hwm), publish, key=key.hex())


def serve_echo(ctx: childproc.Context) -> None:
    c2s_key, s2c_key = os.urandom(16), os.urandom(16)
    c2s, s2c = AESGCM(c2s_key), AESGCM(s2c_key)
    router, endpoint = childproc.router(ctx, hwm=100_000)
    childproc.ready(rpc=endpoint, c2s=c2s_key.hex(), s2c=s2c_key.hex())
    recv, send, be8 = router.recv_multipart, router.send_multipart, BE8.pack
    counter = 0
    while True:
        ident, rid, c, ct = recv()
        plain = c2s.decrypt(PREFIX_C2S + c, ct, AD_CONTEXT + c)
        counter += 1
        rc = be8(counter)
        send([ident, rid, rc, s2c.encrypt(PREFIX_S2C + rc, plain, AD_CONTEXT + rc)])


if __name__ == "__main__":
    childproc.main({"pub": serve_pub, "echo": serve_echo})
