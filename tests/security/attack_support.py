"""Raw-socket attackers and helpers for the attack tests (test_attacks_*.py, test_review.py).
Not a test module: nothing here is collected.

Every attacker is a bare pyzmq socket in a ZeroMQ context of its own, closed in
``finally``: ``raw_dealer`` (a DEALER on an instance's ROUTER, which can send any frames,
seal requests under a stolen session and log in by hand with ``raw_login``) and
``eavesdropper`` (a SUB on an event channel recording every message). The rest waits for
things that must happen (bounded by ``GUARD_S``, never a timing assertion) and opens what
the group keys open.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import zmq
import zmq.asyncio

from ubicore.client import Client
from ubicore.errors import DecryptionFailed
from ubicore.protocol.codec import (
    HEADER_WELCOME,
    encode_request,
    encode_sealed_request,
    parse_channel_message,
    parse_server_message,
)
from ubicore.protocol.messages import (
    Delta,
    ErrorReply,
    Heartbeat,
    Reply,
    Request,
    Sealed,
    SealedEvent,
)
from ubicore.security import primitives as P
from ubicore.security.amp import (
    Challenge,
    ClientHandshake,
    Grant,
    PasswordSecret,
)
from ubicore.security.primitives import KdfParams, Secret
from ubicore.security.session import (
    ClientSession,
    GroupKeyRing,
    SessionGrant,
    client_session,
    delivery_context,
)
from ubicore.service import InstanceServer
from ubicore.testing.site import COUNTER

GUARD_S = 5.0
"""Upper bound on waiting for something that must happen (never a timing assertion)."""
QUIET_S = 0.3
"""How long a dropped message is given to (not) produce a reply."""
L = P.L


def counter_at(cell: str, level: str) -> dict[str, Any]:
    return {"schema": COUNTER, "cell": cell, "protection": level}


FULL_COUNTER = [counter_at("Site", "full")]


# --- raw attacker sockets ------------------------------------------------------------------------


class RawDealer:
    """A bare DEALER on an instance's ROUTER: sends frames, reads replies by correlation id."""

    _corr = itertools.count(7_000_000)

    def __init__(self, sock: zmq.asyncio.Socket, schema: str, cell: str) -> None:
        self.sock, self.schema, self.cell = sock, schema, cell
        self.stray: list[Any] = []

    @classmethod
    def next_corr(cls) -> int:
        return next(cls._corr)

    async def send(self, frames: list[bytes]) -> None:
        await self.sock.send_multipart(frames)

    async def recv(self, timeout_s: float) -> list[bytes] | None:
        try:
            return list(await asyncio.wait_for(self.sock.recv_multipart(), timeout_s))
        except TimeoutError:
            return None

    async def reply_to(self, corr: int, timeout_s: float = GUARD_S) -> Reply | ErrorReply | Sealed:
        """The reply with this correlation id (others are kept in ``stray``)."""
        async with asyncio.timeout(timeout_s):
            while True:
                msg = parse_server_message(await self.sock.recv_multipart())
                if msg.corr_id == corr:
                    return msg
                self.stray.append(msg)

    async def quiet(self, timeout_s: float = QUIET_S) -> list[list[bytes]]:
        """Whatever arrives within ``timeout_s`` (a dropped message produces nothing)."""
        got = []
        while (frames := await self.recv(timeout_s)) is not None:
            got.append(frames)
        return got

    async def request(self, op: str, args: dict[str, Any] | None = None, *, schema: str | None = None,
                      cell: str | None = None) -> Reply | ErrorReply | Sealed:
        """A clear request."""
        corr = self.next_corr()
        await self.send(encode_request(Request(corr, schema or self.schema, cell or self.cell, op, args or {}, 5000)))
        return await self.reply_to(corr)

    @staticmethod
    def seal(session: ClientSession, op: str, args: dict[str, Any]) -> tuple[int, list[bytes]]:
        corr = RawDealer.next_corr()
        req = Request(corr, session.schema, session.cell, op, args, 5000)
        return corr, encode_sealed_request(session.seal_request(req))

    async def sealed(self, session: ClientSession, op: str, args: dict[str, Any] | None = None) -> Reply | ErrorReply:
        """A request sealed under ``session``; its opened reply (or a clear error)."""
        corr, frames = self.seal(session, op, args or {})
        await self.send(frames)
        return opened(session, await self.reply_to(corr))


def opened(session: ClientSession, msg: Reply | ErrorReply | Sealed) -> Reply | ErrorReply:
    if isinstance(msg, Sealed):
        return session.open_reply(msg)
    return msg


@contextlib.asynccontextmanager
async def raw_dealer(endpoint: str, schema: str = COUNTER, cell: str = "Site") -> AsyncIterator[RawDealer]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        sock.connect(endpoint)
        yield RawDealer(sock, schema, cell)
    finally:
        sock.close(0)
        ctx.term()


class Eavesdropper:
    """A bare SUB socket on an event channel recording every message, in arrival order."""

    def __init__(self, sock: zmq.asyncio.Socket) -> None:
        self.sock = sock
        self.frames: list[list[bytes]] = []
        self.welcomed = asyncio.Event()
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while True:
            frames = list(await self.sock.recv_multipart())
            if frames == [HEADER_WELCOME]:
                self.welcomed.set()
            self.frames.append(frames)

    def messages(self, start: int = 0) -> list[Any]:
        """Everything after the first ``start`` messages, parsed (welcomes left out)."""
        return [parse_channel_message(f) for f in self.frames[start:] if f != [HEADER_WELCOME]]

    def sealed_events(self, start: int = 0) -> list[SealedEvent]:
        return [m for m in self.messages(start) if isinstance(m, SealedEvent)]

    async def wait_for(self, predicate: Callable[[Eavesdropper], bool], timeout_s: float = GUARD_S) -> None:
        async with asyncio.timeout(timeout_s):
            while not predicate(self):
                await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task


@contextlib.asynccontextmanager
async def eavesdropper(endpoint: str) -> AsyncIterator[Eavesdropper]:
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.SUB)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SUBSCRIBE, b"")
    spy: Eavesdropper | None = None
    try:
        sock.connect(endpoint)
        spy = Eavesdropper(sock)
        async with asyncio.timeout(GUARD_S):
            await spy.welcomed.wait()
        yield spy
    finally:
        if spy is not None:
            await spy.stop()
        sock.close(0)
        ctx.term()


# --- logging in by hand ---------------------------------------------------------------------------


def _challenge(result: dict[str, Any]) -> Challenge:
    p = result["params"]
    return Challenge(result["g2"], result["salt"], KdfParams(p["t"], p["p"], p["m_kib"]))


async def raw_login(d: RawDealer, user: str, password: str) -> ClientSession:
    """The four passes over a bare DEALER, as any client could do them."""
    hs = ClientHandshake(user, None, PasswordSecret(password))
    hello = hs.start()
    rep = await d.request("auth_hello", {"user": hello.user, "g1": hello.g1})
    assert isinstance(rep, Reply), rep
    ch = rep.result
    confirm = hs.respond(_challenge(ch), ch["site"])
    rep = await d.request("auth_confirm", {"hs": ch["hs"], "h_c": confirm.h_c})
    assert isinstance(rep, Reply), rep
    g = rep.result
    payload, k_sess = hs.finish(Grant(g["h_s"], g["nonce"], g["keys"], g["version"]),
                                delivery_context(d.schema, d.cell, ch["instance_id"]))
    sg = SessionGrant.decode(payload)
    return client_session(d.schema, d.cell, ch["instance_id"], sg, k_sess, time.monotonic() + sg.ttl_s)


async def session_of(client: Client, server: InstanceServer, cell: str = "Site") -> ClientSession:
    """The client's live session with this instance (it logs in on its first sealed call)."""
    s = client.sessions.current(server.rpc_endpoint, server.core.name, cell)
    assert s is not None, "the client holds no session with this instance"
    return s


def ring_with(keys: list[list[Any]], schema: str, cell: str, iid: bytes) -> GroupKeyRing:
    ring = GroupKeyRing(schema, cell, iid)
    ring.add((e, Secret(k)) for e, k in keys)
    return ring


def delta_rows(msgs: list[Delta | Heartbeat]) -> list[tuple[Any, ...]]:
    return [tuple(ch.row) for m in msgs if isinstance(m, Delta) for b in m.batches for ch in b]


def cannot_open(ring: GroupKeyRing, ev: SealedEvent) -> bool:
    if not ring.has(ev.epoch):
        return True
    try:
        ring.open(ev)
    except DecryptionFailed:
        return True
    return False


async def caught_up(spy: Eavesdropper, server: InstanceServer) -> None:
    """Wait until the eavesdropper holds everything ``server`` published so far: a heartbeat
    is sealed now, and the channel keeps its order."""
    server.heartbeat()
    keys = server.core.guard.keys
    epoch, counter = keys.epoch, keys.counter
    await spy.wait_for(lambda s: any((e.epoch, e.counter) >= (epoch, counter) for e in s.sealed_events()))


async def wait_until(predicate: Callable[[], bool], timeout_s: float = GUARD_S) -> None:
    async with asyncio.timeout(timeout_s):
        while not predicate():
            await asyncio.sleep(0.01)


# --- planted secrets: what must never show on the wire ----------------------------------------------

SECRET_NAME = "eavesdrop-me-7f3a9c"
SECRET_PAYLOAD = "CONFIDENTIAL-payload-91c2e5"
SECRET_VALUE = 4_242_424
