"""Attacks on the life of sessions and group keys over real loopback ZeroMQ sockets (issue 3,
"How we will know"): who still reads after a rotation, a revocation, an expiry or a level
change. The instances are real :func:`~ubicore.testing.site.running_site` instances; clients
are the SDK's; the eavesdropper is the bare SUB socket of ``attack_support``. What is
checked (numbered as in the issue's list, which test_attacks_wire.py begins):

8. a session left out of an on-demand rotation cannot read one event published after it,
   while an entitled cache misses nothing;
9. taking the read right away in the security store cuts a live anonymous session off;
10. sessions expire and clients log in again without noticing;
11. a level change on a running instance is followed by caches and seals the channel;
12. periodic rotation loses no event.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from ubicore.errors import PermissionDenied
from ubicore.protocol.codec import parse_channel_message
from ubicore.protocol.messages import (
    Delta,
    ErrorReply,
    Rekey,
    Reply,
    SealedEvent,
)
from ubicore.schema import Protection
from ubicore.security.policy import Right
from ubicore.testing.site import COUNTER, run_async, running_site

from .attack_support import (
    FULL_COUNTER,
    GUARD_S,
    RawDealer,
    cannot_open,
    caught_up,
    delta_rows,
    eavesdropper,
    raw_dealer,
    session_of,
    wait_until,
)

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
            rs.policy.set_right("default", Right.NONE)
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

            rs.policy.set_level(COUNTER, Protection.FULL)
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

            rs.policy.set_level(COUNTER, Protection.OPEN)
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
