"""Attacks on sealed traffic over real loopback ZeroMQ sockets (issue 3, "How we will know"),
by an eavesdropper and a man on the wire. The instances are real
:func:`~ubicore.testing.site.running_site` instances; clients are the SDK's; the attackers
are the bare sockets of ``attack_support``. What is checked:

1. an eavesdropper on a ``full`` channel sees only sealed events and rekeys, whose bytes
   hold no plaintext (and which the group key does open to the very rows: the stream
   really carried the data, encrypted);
2. a captured sealed ``update`` request replayed runs once;
3. bit flips anywhere in a sealed request, truncations and foreign frames are dropped or
   refused and counted, and the instance keeps serving;
4. sealed requests and events moved to another schema, cell or instance do not open.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import pytest

from ubicore.errors import DecryptionFailed
from ubicore.protocol.codec import (
    HEADER_DELTA,
    HEADER_REKEY,
    HEADER_REQUEST,
    HEADER_SEALED_EVENT,
    HEADER_SEALED_REQUEST,
    HEADER_WELCOME,
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
from ubicore.security import primitives as P
from ubicore.security.session import SessionGrant, client_session, server_session
from ubicore.testing.site import (
    CONFIG_UPDATE,
    COUNTER,
    run_async,
    running_site,
)

from .attack_support import (
    FULL_COUNTER,
    GUARD_S,
    SECRET_NAME,
    SECRET_PAYLOAD,
    SECRET_VALUE,
    RawDealer,
    cannot_open,
    caught_up,
    counter_at,
    delta_rows,
    eavesdropper,
    opened,
    raw_dealer,
    ring_with,
    session_of,
)

# --- 1. the eavesdropper ----------------------------------------------------------------------------


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
