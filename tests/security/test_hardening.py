"""Defects found by review, each pinned by a test that fails on the code before its fix."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from ubicore.cache import Binding, Cache
from ubicore.errors import AuthenticationFailed, AuthenticationRequired
from ubicore.protocol.messages import Change, Delta, Heartbeat, Op
from ubicore.schema import Protection
from ubicore.security.session import MAX_MESSAGES_PER_KEY, SessionExhausted
from ubicore.sessions import parse_challenge

from ..test_cache_unit import IID, FakeInstance, FakeLink
from .guard_support import _confirm_args, _hello, login, make_guard, request


def test_a_full_channel_drops_clear_events() -> None:
    """Review: a cache applied clear deltas on a full channel (an injection path)."""

    async def body() -> None:
        inst = FakeInstance([["a", 1]], seq=1)
        cache = Cache(Binding("UT::S", "c", "tcp://fake:1", "tcp://fake:2", protection="full"), FakeLink(inst))
        cache._request_dump()
        await asyncio.wait_for(cache.ready.wait(), 5)
        cache._on_message(Delta(IID, 2, ((Change("r", Op.UPDATE, ("a", 666)),),)))
        cache._on_message(Heartbeat(IID, 9))
        assert cache.table("r")[("a",)][1] == 1
        assert cache.rejected == 2 and cache.resyncs == 0
        await cache.close()

    asyncio.run(body())


def test_a_confirm_from_another_connection_leaves_the_login_intact() -> None:
    """Review: someone else's auth_confirm with a stolen handshake id cancelled the login."""
    g = make_guard(Protection.UPDATE)
    hs, reply = _hello(g, "writer", b"alice-conn")
    args = _confirm_args(hs, reply)
    with pytest.raises(AuthenticationRequired):
        g.confirm(b"mallory-conn", args)
    assert "h_s" in g.confirm(b"alice-conn", args)


def test_a_client_refuses_argon2_costs_beyond_its_cap() -> None:
    """Review: any endpoint could make a client spend up to 4 GiB on one login."""
    reply = {"hs": b"h" * 16, "g2": b"g" * 32, "salt": b"s" * 16, "site": "x", "instance_id": b"i" * 16,
             "params": {"alg": "argon2id", "t": 3, "p": 4, "m_kib": 4 * 1024 * 1024}}
    with pytest.raises(AuthenticationFailed):
        parse_challenge(reply)
    reply["params"] = {"alg": "argon2id", "t": 3, "p": 4, "m_kib": 65536}
    assert parse_challenge(reply)[1].params.m_kib == 65536


def test_an_exhausted_client_session_asks_for_a_new_login() -> None:
    """Review: a session at its message limit raised an exception outside the error tree;
    it is now AuthenticationRequired, which the SDK answers by logging in again."""
    g = make_guard(Protection.UPDATE)
    c = login(g, "writer")
    c.tx_counter = MAX_MESSAGES_PER_KEY
    with pytest.raises(AuthenticationRequired) as info:
        c.seal_request(request(1))
    assert isinstance(info.value, SessionExhausted)
    assert dataclasses.is_dataclass(c)


def test_the_per_user_session_cap_evicts_that_users_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: the caps scanned every session on every login; now they use the table's
    per-user index, which must stay true through every way a session ends."""
    from ubicore.security import guard as guard_module
    from ubicore.security.policy import Right

    from .guard_support import make_policy

    monkeypatch.setattr(guard_module, "MAX_SESSIONS_PER_USER", 3)
    policy = make_policy()
    g = make_guard(Protection.FULL, policy=policy)
    writers = [login(g, "writer") for _ in range(3)]
    reader = login(g, "reader")
    fourth = login(g, "writer")  # the writer's oldest gives way, nobody else's
    assert writers[0].session_id not in g.sessions
    assert {writers[1].session_id, writers[2].session_id, fourth.session_id, reader.session_id} == set(g.sessions)
    assert {u: len(s) for u, s in g.sessions.by_user.items()} == {"writer": 3, "reader": 1}
    g.revoke({writers[1].session_id})
    policy.set_right("reader", Right.NONE)
    g.reevaluate()
    assert {u: list(s) for u, s in g.sessions.by_user.items()} == {"writer": [writers[2].session_id, fourth.session_id]}
    g.set_level(Protection.UPDATE)
    assert g.sessions.by_user == {} and not g.sessions
