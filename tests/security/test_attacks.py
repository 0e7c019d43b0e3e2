"""Attacks on protection levels over real loopback ZeroMQ sockets (issue 3, "How we will know").

Every attacker here is a bare pyzmq socket in a ZeroMQ context of its own (a SUB on an
event channel, a DEALER on an instance's ROUTER, a ROUTER posing as an instance), closed
in ``finally``. The instances are real :func:`~ubicore.testing.site.running_site`
instances; clients are the SDK's. What is checked:

1. an eavesdropper on a ``full`` channel sees only sealed events and rekeys, whose bytes
   hold no plaintext (and which the group key does open to the very rows: the stream
   really carried the data, encrypted);
2. a captured sealed ``update`` request replayed runs once;
3. bit flips anywhere in a sealed request, truncations and foreign frames are dropped or
   refused and counted, and the instance keeps serving;
4. sealed requests and events moved to another schema, cell or instance do not open;
5. a client cannot get a weaker level than the schema's (clear requests are refused, a
   clear reply cannot complete a sealed call);
6. a wrong password fails without pass 4, like an unknown user;
7. a stolen verifier logs nobody in;
8. a session left out of an on-demand rotation cannot read one event published after it,
   while an entitled cache misses nothing;
9. taking the read right away in the security store cuts a live anonymous session off;
10. sessions expire and clients log in again without noticing;
11. a level change on a running instance is followed by caches and seals the channel;
12. periodic rotation loses no event.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

from ubicore.client import Client
from ubicore.errors import (
    AuthenticationFailed,
    AuthenticationRequired,
    CallTimeout,
    DecryptionFailed,
    PermissionDenied,
)
from ubicore.protocol.codec import (
    HEADER_DELTA,
    HEADER_REKEY,
    HEADER_REQUEST,
    HEADER_SEALED_EVENT,
    HEADER_SEALED_REQUEST,
    HEADER_WELCOME,
    encode_error,
    encode_reply,
    encode_request,
    encode_sealed_reply,
    encode_sealed_request,
    pack,
    parse_channel_message,
    parse_client_message,
    parse_server_message,
)
from ubicore.protocol.messages import (
    Delta,
    ErrorReply,
    Heartbeat,
    Kind,
    Rekey,
    Reply,
    Request,
    Sealed,
    SealedEvent,
)
from ubicore.schema import Protection
from ubicore.security import primitives as P
from ubicore.security.amp import (
    Challenge,
    ClientHandshake,
    Confirm,
    Grant,
    Hello,
    PasswordSecret,
)
from ubicore.security.policy import Right
from ubicore.security.primitives import KdfParams, Secret
from ubicore.security.session import (
    ClientSession,
    GroupKeyRing,
    SessionGrant,
    client_session,
    delivery_context,
    server_session,
)
from ubicore.service import InstanceServer
from ubicore.testing.site import (
    CONFIG_UPDATE,
    COUNTER,
    OPERATOR,
    TEST_KDF,
    run_async,
    running_site,
)
from ubicore.transport.rpc import RpcConnection

from .test_amp import (
    NaiveServer,
    _base,
    _sc,
    attacker_candidates,
    spec_h_c,
    spec_keys,
    spec_tt1,
)

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


# --- 1. the eavesdropper ----------------------------------------------------------------------------

SECRET_NAME = "eavesdrop-me-7f3a9c"
SECRET_PAYLOAD = "CONFIDENTIAL-payload-91c2e5"
SECRET_VALUE = 4_242_424


@run_async
async def test_eavesdropper_on_a_full_channel_decodes_nothing(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        async with eavesdropper(server.event_endpoint) as spy:
            for i in range(3):
                await rs.client.call("Site", COUNTER, "set_value", name=SECRET_NAME, value=SECRET_VALUE + i,
                                     payload=SECRET_PAYLOAD)
            server.rotate_group_key()  # a rekey on the wire too
            await rs.client.call("Site", COUNTER, "set_value", name=SECRET_NAME, value=SECRET_VALUE + 3,
                                 payload=SECRET_PAYLOAD)
            keys = await rs.client.call("Site", COUNTER, "get_keys")
            await caught_up(spy, server)
            frames = [f for f in spy.frames if f != [HEADER_WELCOME]]

        # Every message is sealed: header kind 0x13 or 0x14, nothing else.
        assert frames
        assert all(len(f) == 2 for f in frames)
        assert {bytes(f[0]) for f in frames} <= {HEADER_SEALED_EVENT, HEADER_REKEY}
        assert {f[0][3] for f in frames} <= {Kind.SEALED_EVENT, Kind.REKEY} == {0x13, 0x14}
        msgs = [parse_channel_message(f) for f in frames]
        assert all(type(m) in (SealedEvent, Rekey) for m in msgs)
        assert any(type(m) is Rekey for m in msgs)
        # No plaintext anywhere in the bytes.
        wire = b"".join(b"".join(f) for f in frames)
        for needle in (SECRET_NAME.encode(), SECRET_PAYLOAD.encode(), pack(SECRET_VALUE + 1), b"counters"):
            assert needle not in wire
        events = [m for m in msgs if type(m) is SealedEvent]
        assert len({e.ciphertext for e in events}) == len(events)
        # ...yet the stream did carry the rows: the group key opens them to exactly those values.
        ring = ring_with(keys, COUNTER, "Site", server.core.instance_id)
        inner = [ring.open(e) for e in events if ring.has(e.epoch)]
        rows = delta_rows(inner)
        assert (SECRET_NAME, SECRET_VALUE + 3, SECRET_PAYLOAD) in rows
        assert any(isinstance(m, Heartbeat) for m in inner)


# --- 2. replay -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("level", ["update", "full"])
@run_async
async def test_a_replayed_update_request_runs_once(tmp_path: Path, level: str) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")],
                            extra_deployments=[counter_at("Site", level)]) as rs:
        server = rs.server(COUNTER, "Site")
        client = rs.client
        assert await client.call("Site", COUNTER, "bump", name="r") == 1
        session = await session_of(client, server)
        # The attacker captured one sealed request a legitimate client sent.
        corr, captured = RawDealer.seal(session, "bump", {"name": "r", "by": 10})
        assert b"bump" not in b"".join(captured)
        before = server.core.stats.rejected, server.core.guard.stats.rejected
        async with raw_dealer(server.rpc_endpoint) as d:
            await d.send(captured)
            first = opened(session, await d.reply_to(corr))
            assert isinstance(first, Reply) and first.result == 11
            await d.send(captured)  # the replay
            await d.send(list(captured))  # and again
            assert await d.quiet() == []
        assert server.core.stats.rejected == before[0] + 2
        assert server.core.guard.stats.rejected == before[1] + 2
        assert await client.call("Site", COUNTER, "get", name="r") == 11  # ran once, not three times
        stats = await client.call("Site", COUNTER, "get_stats")
        assert stats["rejected"] == before[0] + 2 and stats["security"]["rejected"] == before[1] + 2
        assert await client.call("Site", COUNTER, "bump", name="r") == 12  # still serving


# --- 3. tampering ---------------------------------------------------------------------------------------


def _regions(msg: Sealed) -> dict[str, range]:
    """Where each field's value bytes lie in the body of a sealed request."""
    out, at = {}, 1  # 0x94: an array of 4
    for name, value in (("session", msg.session_id), ("counter", msg.counter), ("corr", msg.corr_id),
                        ("ciphertext", msg.ciphertext)):
        enc = pack(value)
        head = 2 if name in ("session", "ciphertext") else (1 if len(enc) > 1 else 0)  # bin8 / int type byte
        out[name] = range(at + head, at + len(enc))
        at += len(enc)
    return out


@run_async
async def test_tampered_truncated_and_foreign_requests_are_dropped_and_counted(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        core, guard = server.core, server.core.guard
        await rs.client.call("Site", COUNTER, "bump", name="other")
        session = await session_of(rs.client, server)
        corr, (header, body) = RawDealer.seal(session, "set_value", {"name": "flip", "value": 1})
        sealed = parse_client_message([header, body])
        assert isinstance(sealed, Sealed)
        regions = _regions(sealed)
        assert sealed.session_id == body[regions["session"].start:regions["session"].stop]
        assert sealed.ciphertext == body[regions["ciphertext"].start:regions["ciphertext"].stop]

        tampered: list[tuple[str, list[bytes]]] = []
        for i in range(len(header)):
            for bit in range(8):
                h = bytearray(header)
                h[i] ^= 1 << bit
                tampered.append(("header", [bytes(h), body]))
        for i in range(len(body)):
            for bit in (0, 3, 7):
                b = bytearray(body)
                b[i] ^= 1 << bit
                where = next((name for name, r in regions.items() if i in r), "structure")
                tampered.append((where, [header, bytes(b)]))
        for cut in range(0, len(body), 7):
            tampered.append(("truncated", [header, body[:cut]]))
        for ct in (sealed.ciphertext[:-1], sealed.ciphertext[:16], b""):
            tampered.append(("short-ct", encode_sealed_request(Sealed(sealed.session_id, sealed.counter, corr, ct))))
        tampered += [
            ("foreign", [header]),
            ("foreign", [header, body, b"extra"]),
            ("foreign", [b""]),
            ("foreign", [os.urandom(4), os.urandom(64)]),
            ("foreign", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"]),
            ("foreign", [HEADER_REQUEST, body]),  # a sealed body under a clear header
            ("foreign", [HEADER_DELTA, body]),
            ("foreign", [HEADER_SEALED_REQUEST, pack([sealed.session_id[:15], 1, corr, sealed.ciphertext])]),
            ("foreign", [HEADER_SEALED_REQUEST, os.urandom(80)]),
        ]
        before = (core.stats.malformed, core.stats.rejected, guard.stats.rejected, guard.stats.unknown_sessions)
        async with raw_dealer(server.rpc_endpoint) as d:
            for _, frames in tampered:
                await d.send(frames)
            await d.send([header, body])  # the untouched original, last: it still runs
            answered: list[Any] = []
            async with asyncio.timeout(GUARD_S):  # the refusals carry the same corr id: wait for the sealed one
                while not isinstance(msg := parse_server_message(await d.sock.recv_multipart()), Sealed):
                    answered.append(msg)
            good = opened(session, msg)
            assert isinstance(good, Reply) and good.corr_id == corr and good.result is None
            answered += [parse_server_message(f) for f in await d.quiet()]
        # Nothing tampered got a sealed answer: at most a clear refusal.
        assert all(isinstance(m, ErrorReply) for m in answered)
        assert {m.code for m in answered} <= {"auth_required", "protocol_error"}
        auth_required = [m for m in answered if m.code == "auth_required"]
        flipped_sid = sum(1 for where, _ in tampered if where == "session")
        assert len(auth_required) == flipped_sid  # another session id: unknown, refused in the clear
        malformed = core.stats.malformed - before[0]
        rejected = core.stats.rejected - before[1]
        unknown = guard.stats.unknown_sessions - before[3]
        assert guard.stats.rejected - before[2] == rejected
        assert unknown == flipped_sid
        opened_wrong = sum(1 for where, _ in tampered if where in ("counter", "corr", "ciphertext", "short-ct"))
        assert rejected >= sum(1 for where, _ in tampered if where in ("ciphertext", "short-ct"))
        assert rejected <= opened_wrong
        assert malformed + rejected + unknown == len(tampered)  # each one dropped or refused, and counted once
        # The tampered copies did not run; the original ran once; the instance serves on.
        assert await rs.client.call("Site", COUNTER, "get", name="flip") == 1
        assert await rs.client.call("Site", COUNTER, "bump", name="other") == 2


# --- 4. moving sealed messages between schemas, cells, instances -----------------------------------------


@run_async
async def test_sealed_messages_do_not_move_between_schemas_cells_or_instances(tmp_path: Path) -> None:
    deployments = [counter_at("Site", "full"), counter_at("Zone-A", "full")]
    async with running_site(tmp_path, instances=[(COUNTER, "Site"), (COUNTER, "Zone-A"), (CONFIG_UPDATE, "Site")],
                            extra_deployments=deployments) as rs:
        a, b, cfg = rs.server(COUNTER, "Site"), rs.server(COUNTER, "Zone-A"), rs.server(CONFIG_UPDATE, "Site")
        client = rs.client
        await client.call("Site", COUNTER, "bump", name="x")
        await client.call("Zone-A", COUNTER, "bump", name="x")
        await client.call("Site", CONFIG_UPDATE, "add_sensor", sensor="S-9")
        sa, sb = await session_of(client, a), await session_of(client, b, "Zone-A")
        scfg = await session_of(client, cfg)

        corr, frames = RawDealer.seal(sa, "bump", {"name": "x", "by": 100})
        msg = parse_client_message(frames)
        assert isinstance(msg, Sealed)
        for target, name, cell, sess in ((b, COUNTER, "Zone-A", sb), (cfg, CONFIG_UPDATE, "Site", scfg)):
            guard = target.core.guard
            before = guard.stats.unknown_sessions, guard.stats.rejected
            async with raw_dealer(target.rpc_endpoint, name, cell) as d:
                # As captured: the session is A's, unknown here: refused in the clear.
                await d.send(frames)
                rep = await d.reply_to(corr)
                assert isinstance(rep, ErrorReply) and rep.code == "auth_required"
                # Relabelled with the victim's session at the target: does not open, dropped.
                moved = Sealed(sess.session_id, msg.counter, msg.corr_id, msg.ciphertext)
                await d.send(encode_sealed_request(moved))
                assert await d.quiet() == []
            assert guard.stats.unknown_sessions == before[0] + 1
            assert guard.stats.rejected == before[1] + 1
        # None of it ran anywhere; the original still runs at A, once.
        assert await client.call("Zone-A", COUNTER, "get", name="x") == 1
        async with raw_dealer(a.rpc_endpoint) as d:
            await d.send(frames)
            rep = opened(sa, await d.reply_to(corr))
            assert isinstance(rep, Reply) and rep.result == 101

        # Events: one full instance's sealed events into another's key ring.
        async with eavesdropper(a.event_endpoint) as spy:
            await client.call("Site", COUNTER, "bump", name="x")
            await caught_up(spy, a)
            events_a = spy.sealed_events()
        keys_a = await client.call("Site", COUNTER, "get_keys")
        keys_b = await client.call("Zone-A", COUNTER, "get_keys")
        iid_a, iid_b = a.core.instance_id, b.core.instance_id
        ring_b = ring_with(keys_b, COUNTER, "Zone-A", iid_b)
        for ev in events_a:
            with pytest.raises(DecryptionFailed):
                ring_b.open(ev)
            relabelled = SealedEvent(iid_b, ev.epoch, ev.counter, ev.ciphertext)  # claims to be B's
            assert cannot_open(ring_b, relabelled)
        # Even holding A's keys, a ring for another cell, schema or instance does not open A's events:
        # the associated data binds them.
        for schema, cell, iid in ((COUNTER, "Zone-A", iid_a), (CONFIG_UPDATE, "Site", iid_a), (COUNTER, "Site", iid_b)):
            wrong = ring_with(keys_a, schema, cell, iid)
            for ev in events_a:
                with pytest.raises(DecryptionFailed):
                    wrong.open(SealedEvent(iid, ev.epoch, ev.counter, ev.ciphertext))
        right = ring_with(keys_a, COUNTER, "Site", iid_a)
        assert all(isinstance(right.open(ev), (Delta, Heartbeat)) for ev in events_a)


def test_request_associated_data_binds_schema_cell_instance_and_epoch() -> None:
    """Unit level: even with the same keys on both ends, a request sealed for one
    (schema, cell, instance, epoch) does not open for another."""
    iid = os.urandom(16)
    grant = SessionGrant(os.urandom(16), P.random_key(), P.random_key(), 3, "full", 60.0, "u")
    k_sess = P.random_key()
    client = client_session(COUNTER, "Site", iid, grant, k_sess, time.monotonic() + 60)
    req = Request(5, COUNTER, "Site", "bump", {"name": "x"}, 100)
    for schema, cell, inst, epoch in ((CONFIG_UPDATE, "Site", iid, 3), (COUNTER, "Zone-A", iid, 3),
                                      (COUNTER, "Site", os.urandom(16), 3), (COUNTER, "Site", iid, 4)):
        g = SessionGrant(grant.session_id, grant.c2s, grant.s2c, epoch, "full", 60.0, "u")
        server = server_session(schema, cell, inst, g, k_sess, time.monotonic() + 60)
        with pytest.raises(DecryptionFailed):
            server.open_request(client.seal_request(req))
    server = server_session(COUNTER, "Site", iid, grant, k_sess, time.monotonic() + 60)
    assert server.open_request(client.seal_request(req)) == req


# --- 5. no downgrade --------------------------------------------------------------------------------------


@run_async
async def test_clear_requests_are_refused_where_the_level_needs_a_session(tmp_path: Path) -> None:
    deployments = [counter_at("Site", "full"), counter_at("Zone-A", "update")]
    async with running_site(tmp_path, instances=[(COUNTER, "Site"), (COUNTER, "Zone-A")],
                            extra_deployments=deployments) as rs:
        full, upd = rs.server(COUNTER, "Site"), rs.server(COUNTER, "Zone-A")
        await rs.client.call("Site", COUNTER, "set_value", name="k", value=5, payload=SECRET_PAYLOAD)
        await rs.client.call("Zone-A", COUNTER, "set_value", name="k", value=5)
        async with raw_dealer(upd.rpc_endpoint, COUNTER, "Zone-A") as d:
            before = upd.core.guard.stats.auth_required
            for op, args in (("bump", {"name": "k"}), ("set_value", {"name": "k", "value": 99}),
                             ("remove", {"name": "k"}), ("get", {"name": "k"})):
                rep = await d.request(op, args)
                assert isinstance(rep, ErrorReply) and rep.code == "auth_required", (op, rep)
            assert upd.core.guard.stats.auth_required == before + 4
            # What `update` leaves open stays open (the control).
            rep = await d.request("get_dump")
            assert isinstance(rep, Reply) and rep.result["relations"]["counters"]
        assert await rs.client.call("Zone-A", COUNTER, "get", name="k") == 5
        async with raw_dealer(full.rpc_endpoint) as d:
            for op in ("get_dump", "get_group", "get_keys", "get_stats", "get", "bump"):
                rep = await d.request(op, {"name": "k"} if op in ("get", "bump") else {})
                assert isinstance(rep, ErrorReply) and rep.code == "auth_required", (op, rep)
                assert SECRET_PAYLOAD not in repr(rep)
        assert await rs.client.call("Site", COUNTER, "get", name="k") == 5


def _session_pair() -> tuple[ClientSession, Any]:
    iid = os.urandom(16)
    grant = SessionGrant(os.urandom(16), P.random_key(), P.random_key(), 1, "full", 60.0, "operator")
    k_sess = P.random_key()
    far = time.monotonic() + 60
    return (client_session(COUNTER, "Site", iid, grant, k_sess, far), server_session(COUNTER, "Site", iid, grant, k_sess, far))


@run_async
async def test_a_rogue_instance_cannot_answer_a_sealed_call_in_the_clear() -> None:
    """A ROUTER posing as the instance answers a sealed call with a clear result, a clear
    error and a reply sealed under another session: the caller takes none of them."""
    client_s, server_s = _session_pair()
    _, other_server = _session_pair()
    ctx = zmq.asyncio.Context()
    rogue = ctx.socket(zmq.ROUTER)
    rogue.setsockopt(zmq.LINGER, 0)
    conn: RpcConnection | None = None
    try:
        rogue.bind("tcp://127.0.0.1:0")
        endpoint = rogue.getsockopt_string(zmq.LAST_ENDPOINT)
        conn = RpcConnection(endpoint)

        async def serve(answers: Callable[[int], list[list[bytes]]]) -> None:
            ident, *frames = await rogue.recv_multipart()
            assert bytes(frames[0]) == HEADER_SEALED_REQUEST and b"read_the_secret" not in b"".join(frames)
            msg = parse_client_message(frames)
            assert isinstance(msg, Sealed)
            for reply in answers(msg.corr_id):
                await rogue.send_multipart([ident, *reply])

        def forged(corr: int) -> list[list[bytes]]:
            return [
                encode_reply(corr, 42),
                encode_error(corr, "not_found", "no such counter", {}),
                encode_sealed_reply(other_server.seal_reply(encode_reply(corr, 43), corr)),
            ]

        task = asyncio.create_task(serve(forged))
        with pytest.raises(CallTimeout):
            await conn.call(COUNTER, "Site", "read_the_secret", {"name": "k"}, 0.5, client_s)
        await task
        assert conn.caller.stats.rejected == 3

        # The control: the same path takes a reply sealed under the right session.
        task = asyncio.create_task(serve(lambda c: [encode_sealed_reply(server_s.seal_reply(encode_reply(c, 7), c))]))
        assert await conn.call(COUNTER, "Site", "read_the_secret", {"name": "k"}, GUARD_S, client_s) == 7
        await task
        # A clear auth_required is the one clear answer a sealed call takes (the SDK logs in
        # again; it never carries data).
        task = asyncio.create_task(serve(lambda c: [encode_error(c, "auth_required", "log in", {})]))
        with pytest.raises(AuthenticationRequired):
            await conn.call(COUNTER, "Site", "read_the_secret", {"name": "k"}, GUARD_S, client_s)
        await task
        assert conn.caller.stats.rejected == 3
    finally:
        if conn is not None:
            conn.close()
        rogue.close(0)
        ctx.term()


# --- 6. wrong password, unknown user ---------------------------------------------------------------------


@run_async
async def test_a_wrong_password_fails_without_pass_4_like_an_unknown_user(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        guard = server.core.guard
        async with raw_dealer(server.rpc_endpoint) as d:
            session = await raw_login(d, *OPERATOR)  # the control: the raw login works
            rep = await d.sealed(session, "bump", {"name": "n"})
            assert isinstance(rep, Reply) and rep.result == 1

            challenges = {}
            for user, password in (("operator", "not-the-password"), ("mallory", "anything"),
                                   ("mallory", "anything"), ("default", "x")):
                failures = guard.stats.login_failures
                hs = ClientHandshake(user, None, PasswordSecret(password))
                hello = hs.start()
                rep = await d.request("auth_hello", {"user": user, "g1": hello.g1})
                assert isinstance(rep, Reply)
                ch = rep.result
                challenges.setdefault(user, []).append(ch)
                confirm = hs.respond(_challenge(ch), ch["site"])
                rep = await d.request("auth_confirm", {"hs": ch["hs"], "h_c": confirm.h_c})
                assert isinstance(rep, ErrorReply), rep
                assert (rep.code, rep.message) == ("auth_failed", "authentication failed")
                assert rep.detail == {}
                assert not {"h_s", "keys", "nonce"} & set(rep.detail)
                assert guard.stats.login_failures == failures + 1
                # pass 3 again (a replay into the same exchange): the exchange is gone
                rep = await d.request("auth_confirm", {"hs": ch["hs"], "h_c": confirm.h_c})
                assert isinstance(rep, ErrorReply) and rep.code == "auth_failed"
        real, fake = challenges["operator"][0], challenges["mallory"][0]
        assert set(real) == set(fake)
        for k in real:
            assert type(real[k]) is type(fake[k])
            if isinstance(real[k], bytes):
                assert len(real[k]) == len(fake[k])
        assert fake["params"] == real["params"] == {"alg": "argon2id", "t": TEST_KDF.t, "p": TEST_KDF.p,
                                                     "m_kib": TEST_KDF.m_kib}
        assert fake["site"] == real["site"] and fake["instance_id"] == real["instance_id"]
        assert fake["salt"] == challenges["mallory"][1]["salt"]  # stable per name
        assert fake["g2"] != challenges["mallory"][1]["g2"]  # but fresh per exchange
        assert P.is_valid_point(fake["g2"]) and P.is_valid_point(real["g2"])
        # The SDK says the same.
        wrong = rs.new_client(user=("operator", "not-the-password"))
        with pytest.raises(AuthenticationFailed):
            await wrong.call("Site", COUNTER, "get", name="n")


# --- 7. a stolen verifier ----------------------------------------------------------------------------------


@run_async
async def test_a_stolen_verifier_logs_nobody_in(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        guard = server.core.guard
        user = OPERATOR[0]
        record = rs.store.users()[user].record  # what the thief took from the store
        site = rs.site.name
        # Keeping the attack honest: the same computation beats the naive variant (β = [y]G1).
        a = int.from_bytes(os.urandom(32), "little") % L or 1
        naive = NaiveServer(site, record)
        g1 = P.point_mul(_sc(a), record.verifier)
        ch = naive.challenge(Hello(user, g1))
        alpha = attacker_candidates(a, 0, record.verifier, g1, ch, user, site)["naive-win"]
        naive.confirm(Confirm(spec_h_c(spec_keys(alpha, P.lp(spec_tt1(user, site, ch.salt, ch.params, g1), ch.g2), site))))

        failures, logins = guard.stats.login_failures, guard.stats.logins
        attempts = 0
        async with raw_dealer(server.rpc_endpoint) as d:
            for b in (0, int.from_bytes(os.urandom(32), "little") % L):
                for which in ("naive-win", "g2", "plus-e2B", "plus-e2G1", "plus-e2V", "times-1+e2"):
                    a = int.from_bytes(os.urandom(32), "little") % L or 1
                    g1 = P.point_mul(_sc(a), record.verifier)
                    if b:
                        g1 = P.point_add(g1, _base(b))
                    rep = await d.request("auth_hello", {"user": user, "g1": g1})
                    assert isinstance(rep, Reply)
                    ch = _challenge(rep.result)
                    assert ch.salt == record.salt and ch.params == record.params
                    alpha = attacker_candidates(a, b, record.verifier, g1, ch, user, site)[which]
                    keys = spec_keys(alpha, P.lp(spec_tt1(user, site, ch.salt, ch.params, g1), ch.g2), site)
                    rep = await d.request("auth_confirm", {"hs": rep.result["hs"], "h_c": spec_h_c(keys)})
                    assert isinstance(rep, ErrorReply), (b != 0, which, rep)
                    assert (rep.code, rep.message, rep.detail) == ("auth_failed", "authentication failed", {})
                    attempts += 1
        assert guard.stats.login_failures == failures + attempts
        assert guard.stats.logins == logins


# --- 8. on-demand rotation away from a session ---------------------------------------------------------------


@pytest.mark.parametrize("how", ["revoke", "rotate_entitled"])
@run_async
async def test_a_session_left_out_of_a_rotation_reads_nothing_published_after(tmp_path: Path, how: str) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        cache = await rs.client.cache("Site", COUNTER)
        seen: list[int] = []
        cache.on_change(lambda rel, old, new: seen.append(new.value) if rel == "counters" and new and new.name == "r" else None)
        victim = rs.new_client(anonymous=True)  # `default` may read
        await victim.call("Site", COUNTER, "get_group")
        vs = await session_of(victim, server)
        assert vs.group.epochs  # it was handed the group keys
        async with eavesdropper(server.event_endpoint) as spy:
            for _ in range(3):
                await rs.client.call("Site", COUNTER, "bump", name="r")
            await caught_up(spy, server)
            # The victim follows the channel by hand: before the rotation it reads everything.
            mark = len(spy.frames)
            before = [m for m in spy.messages() if isinstance(m, (SealedEvent, Rekey))]
            for m in before:
                if isinstance(m, Rekey):
                    vs.open_rekey(m)
            opened_before = [vs.group.open(m) for m in before if isinstance(m, SealedEvent)]
            assert ("r", 3, "") in delta_rows(opened_before)

            if how == "revoke":
                server.revoke({vs.session_id})
            else:
                server.rotate_group_key(entitled=lambda s: s.session_id != vs.session_id)
            for _ in range(5):
                await rs.client.call("Site", COUNTER, "bump", name="r")
            await cache.wait_for(lambda c: c.table("counters")[("r",)].value == 8, GUARD_S)
            await caught_up(spy, server)
            after = spy.messages(mark)
        rekeys = [m for m in after if isinstance(m, Rekey)]
        assert rekeys and all(not vs.open_rekey(m) for m in rekeys)  # no entry for the victim
        assert all(vs.session_id not in {sid for sid, _ in m.entries} for m in rekeys)
        events = [m for m in after if isinstance(m, SealedEvent)]
        assert len(events) >= 6
        assert all(cannot_open(vs.group, ev) for ev in events)
        # The entitled cache missed nothing: every value, in order, as deltas.
        assert seen == list(range(1, 9))
        assert cache.undecryptable == 0 and cache.rejected == 0
        if how == "revoke":  # the session itself is over
            async with raw_dealer(server.rpc_endpoint) as d:
                for op, args in (("get_keys", {}), ("get", {"name": "r"})):
                    rep = await d.sealed(vs, op, args)
                    assert isinstance(rep, ErrorReply) and rep.code == "auth_required"


# --- 9. policy-driven revocation ------------------------------------------------------------------------------


@run_async
async def test_taking_the_read_right_cuts_a_live_anonymous_session_off(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        await rs.client.call("Site", COUNTER, "bump", name="p")
        cache = await rs.client.cache("Site", COUNTER)
        anon = rs.new_client(anonymous=True)
        anon_cache = await anon.cache("Site", COUNTER)
        assert anon_cache.table("counters")[("p",)].value == 1
        await rs.client.call("Site", COUNTER, "bump", name="p")
        await anon_cache.wait_for(lambda c: c.table("counters")[("p",)].value == 2, GUARD_S)  # it reads, live
        anon_session = await session_of(anon, server)
        async with eavesdropper(server.event_endpoint) as spy:
            rotations = server.core.guard.stats.rotations
            mark = len(spy.frames)
            rs.store.set_right("default", Right.NONE)
            await wait_until(lambda: server.core.guard.stats.rotations > rotations)  # the next security tick
            await spy.wait_for(lambda s: any(isinstance(m, Rekey) for m in s.messages(mark)))
            for _ in range(4):
                await rs.client.call("Site", COUNTER, "bump", name="p")
            await cache.wait_for(lambda c: c.table("counters")[("p",)].value == 6, GUARD_S)
            await caught_up(spy, server)
            after = spy.messages(mark)
        first_rekey = next(i for i, m in enumerate(after) if isinstance(m, Rekey))
        assert all(anon_session.session_id not in {sid for sid, _ in m.entries} for m in after if isinstance(m, Rekey))
        events = [m for m in after[first_rekey:] if isinstance(m, SealedEvent)]
        assert len(events) >= 5
        assert all(cannot_open(anon_session.group, ev) for ev in events)
        assert anon_cache.table("counters")[("p",)].value == 2  # stuck where the right ended
        with pytest.raises(PermissionDenied):
            await anon.call("Site", COUNTER, "get_dump")
        with pytest.raises(PermissionDenied):
            await anon.call("Site", COUNTER, "get", name="p")
        with pytest.raises(PermissionDenied):
            await anon.call("Site", COUNTER, "get_keys")
        assert await rs.client.call("Site", COUNTER, "get", name="p") == 6  # the operator is untouched


# --- 10. session expiry ----------------------------------------------------------------------------------------


@run_async
async def test_expired_sessions_are_renewed_transparently(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER,
                            security={"session_ttl_s": 1}) as rs:
        server = rs.server(COUNTER, "Site")
        a, b = rs.client, rs.new_client()
        await a.call("Site", COUNTER, "bump", name="e")
        await b.call("Site", COUNTER, "bump", name="e")
        sa, sb = await session_of(a, server), await session_of(b, server)
        logins_a, logins_b = a.sessions.logins, b.sessions.logins
        # b's clock runs slow: it believes its session lives on; only the instance knows better.
        sb.expires_at = time.monotonic() + 3600
        corr, stale = RawDealer.seal(sa, "bump", {"name": "e", "by": 100})  # captured, sent later
        unknown = server.core.guard.stats.unknown_sessions
        await asyncio.sleep(1.1)
        assert await a.call("Site", COUNTER, "bump", name="e") == 3
        assert await b.call("Site", COUNTER, "bump", name="e") == 4
        assert a.sessions.logins == logins_a + 1 and b.sessions.logins == logins_b + 1
        assert (await session_of(a, server)).session_id != sa.session_id
        assert (await session_of(b, server)).session_id != sb.session_id
        assert server.core.guard.stats.unknown_sessions >= unknown + 1  # b's stale session was refused
        async with raw_dealer(server.rpc_endpoint) as d:  # an expired session's request does not run
            await d.send(stale)
            rep = await d.reply_to(corr)
            assert isinstance(rep, ErrorReply) and rep.code == "auth_required"
        assert await a.call("Site", COUNTER, "get", name="e") == 4


# --- 11. level change while running ------------------------------------------------------------------------------


@run_async
async def test_a_level_change_seals_the_channel_and_caches_keep_following(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:  # UTest::Counter runs open
        server = rs.server(COUNTER, "Site")
        client = rs.client
        await client.call("Site", COUNTER, "set_value", name="lv", value=1)
        cache = await client.cache("Site", COUNTER)
        async with eavesdropper(server.event_endpoint) as spy:
            await client.call("Site", COUNTER, "set_value", name="lv", value=2, payload="clear-before")
            await spy.wait_for(lambda s: any(b"clear-before" in f[1] for f in s.frames if len(f) == 2))

            rs.store.set_level(COUNTER, Protection.FULL)
            await wait_until(lambda: server.core.protection is Protection.FULL)
            info = await client.find("Site", COUNTER)
            naming = await client.naming()
            await naming.wait_for(lambda c: c.table("instances")[(COUNTER, "Site")].protection == "full", GUARD_S)
            assert (await client.find("Site", COUNTER)).protection == "full"
            assert info.instance_id == server.core.instance_id  # the same instance, not a restart
            for v in range(3, 6):
                await client.call("Site", COUNTER, "set_value", name="lv", value=v, payload="sealed-now")
            await cache.wait_for(lambda c: c.table("counters")[("lv",)].value == 5, GUARD_S)
            assert cache.table("counters")[("lv",)].payload == "sealed-now"
            await caught_up(spy, server)
            # The channel: once the first sealed message came, nothing clear follows.
            msgs = spy.messages()
            first_sealed = next(i for i, m in enumerate(msgs) if isinstance(m, (SealedEvent, Rekey)))
            sealed_phase = msgs[first_sealed:]
            assert all(isinstance(m, (SealedEvent, Rekey)) for m in sealed_phase)
            assert not any(b"sealed-now" in b"".join(f) for f in spy.frames)
            # A clear request is now refused.
            async with raw_dealer(server.rpc_endpoint) as d:
                rep = await d.request("get_dump")
                assert isinstance(rep, ErrorReply) and rep.code == "auth_required"

            rs.store.set_level(COUNTER, Protection.OPEN)
            await wait_until(lambda: server.core.protection is Protection.OPEN)
            await naming.wait_for(lambda c: c.table("instances")[(COUNTER, "Site")].protection == "open", GUARD_S)
            await client.call("Site", COUNTER, "set_value", name="lv", value=6, payload="clear-again")
            await cache.wait_for(lambda c: c.table("counters")[("lv",)].value == 6, GUARD_S)
            await spy.wait_for(lambda s: any(b"clear-again" in f[1] for f in s.frames if len(f) == 2))
            clear = [parse_channel_message(f) for f in spy.frames if len(f) == 2 and b"clear-again" in f[1]]
            assert all(isinstance(m, Delta) for m in clear)
        async with raw_dealer(server.rpc_endpoint) as d:
            rep = await d.request("get", {"name": "lv"})
            assert isinstance(rep, Reply) and rep.result == 6


# --- 12. periodic rotation ----------------------------------------------------------------------------------------


@run_async
async def test_periodic_rotation_loses_no_event(tmp_path: Path) -> None:
    n = 12
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER,
                            security={"rotation_s": 0.5}) as rs:
        server = rs.server(COUNTER, "Site")
        cache = await rs.client.cache("Site", COUNTER)
        seen: list[int] = []
        cache.on_change(lambda rel, old, new: seen.append(new.value) if rel == "counters" and new and new.name == "rot" else None)
        epoch0 = server.core.epoch
        async with eavesdropper(server.event_endpoint) as spy:
            for _ in range(n):
                await rs.client.call("Site", COUNTER, "bump", name="rot")
                await asyncio.sleep(0.15)
            await wait_until(lambda: server.core.epoch >= epoch0 + 3)
            await rs.client.call("Site", COUNTER, "bump", name="rot")
            await cache.wait_for(lambda c: c.table("counters")[("rot",)].value == n + 1, GUARD_S)
            msgs = spy.messages()
        assert server.core.epoch >= epoch0 + 3
        assert sum(isinstance(m, Rekey) for m in msgs) >= 3
        assert len({m.epoch for m in msgs if isinstance(m, SealedEvent)}) >= 3  # events under several keys
        assert seen == list(range(1, n + 2))
        assert cache.undecryptable == 0 and cache.rejected == 0 and cache.resyncs == 0
