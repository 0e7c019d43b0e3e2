"""The instance's security state (ubicore/security/guard.py), sans-IO, with an injected
clock: logins (pending exchanges, one-shot confirms, garbage, per-peer caps), sessions
(expiry, tampering, the counter limit, revocation) and redaction of everything that holds
a key. The clients are real (``guard_support.login``).
"""
from __future__ import annotations

import os
from typing import Any

import pytest

from ubicore.errors import (
    AuthenticationFailed,
    AuthenticationRequired,
    DecryptionFailed,
)
from ubicore.protocol.codec import encode_reply, parse_server_message
from ubicore.protocol.messages import Reply, Sealed
from ubicore.schema import Protection
from ubicore.security.amp import ClientHandshake, PasswordSecret
from ubicore.security.guard import MAX_PENDING_PER_PEER
from ubicore.security.session import MAX_MESSAGES_PER_KEY, delivery_context
from ubicore.sessions import Credentials, _grant

from .guard_support import (
    CELL,
    SCHEMA,
    Clock,
    _confirm_args,
    _hello,
    can_read,
    event,
    guard_ask,
    login,
    login_with,
    make_guard,
    open_events,
    pw,
    request,
)
from .session_support import assert_redacted

# --- logging in ---------------------------------------------------------------------------------


def test_login_makes_a_session_that_opens_and_replies() -> None:
    g = make_guard(Protection.UPDATE)
    c = login(g, "writer")
    assert c.user == "writer" and c.level == "update" and c.epoch == g.epoch
    assert set(g.sessions) == {c.session_id} and g.stats.logins == 1
    s, r = g.open(c.seal_request(request(5, "put", name="a", n=1)))
    assert s.session_id == c.session_id and r.operation == "put" and r.corr_id == 5
    frames = g.seal_reply(s, encode_reply(5, "done"), 5)
    assert frames is not None
    sealed = parse_server_message(frames)
    assert isinstance(sealed, Sealed)
    assert c.open_reply(sealed) == Reply(5, "done")


@pytest.mark.parametrize("user,password", [("writer", "wrong"), ("ghost", "anything"), ("writer", "")])
def test_wrong_password_or_unknown_user_fails_at_confirm(user: str, password: str) -> None:
    g = make_guard(Protection.UPDATE)
    with pytest.raises(AuthenticationFailed):
        login(g, user, password)
    assert not g.sessions and g.stats.login_failures == 1 and g.stats.logins == 0
    assert not g._pending  # the failed exchange is gone


def test_challenge_looks_alike_for_known_and_unknown_users() -> None:
    g = make_guard(Protection.UPDATE)
    ask = guard_ask(g)
    replies = []
    for user in ("writer", "ghost"):
        hello = ClientHandshake(user, None, PasswordSecret("x")).start()
        replies.append(ask("auth_hello", {"user": user, "g1": hello.g1}))
    assert [sorted(r) for r in replies] == [sorted(replies[0])] * 2
    assert replies[0]["params"] == replies[1]["params"]
    assert [len(r["salt"]) for r in replies] == [16, 16]


def test_confirm_is_one_shot() -> None:
    g = make_guard(Protection.UPDATE)
    hs, reply = _hello(g, "writer", b"p")
    args = _confirm_args(hs, reply)
    assert "h_s" in g.confirm(b"p", args)
    with pytest.raises(AuthenticationRequired):  # no such login any more: start again
        g.confirm(b"p", args)
    assert len(g.sessions) == 1


def test_a_wrong_confirmation_consumes_the_login() -> None:
    g = make_guard(Protection.UPDATE)
    hs, reply = _hello(g, "writer", b"p")
    args = _confirm_args(hs, reply)
    with pytest.raises(AuthenticationFailed):
        g.confirm(b"p", {**args, "h_c": bytes(32)})
    with pytest.raises(AuthenticationRequired):
        g.confirm(b"p", args)  # the right one, too late: that login is gone
    assert not g.sessions and g.stats.login_failures == 1


def test_a_confirm_from_another_peer_fails() -> None:
    g = make_guard(Protection.UPDATE)
    hs, reply = _hello(g, "writer", b"alice-conn")
    args = _confirm_args(hs, reply)
    with pytest.raises(AuthenticationRequired):
        g.confirm(b"mallory-conn", args)
    assert not g.sessions and g.stats.login_failures == 0


@pytest.mark.parametrize("args", [{}, {"hs": "text", "h_c": b"x"}, {"hs": os.urandom(16), "h_c": b"x" * 32},
                                  {"hs": None}])
def test_confirm_garbage(args: dict[str, Any]) -> None:
    g = make_guard(Protection.UPDATE)
    _hello(g, "writer", b"p")
    with pytest.raises((AuthenticationFailed, AuthenticationRequired)):  # malformed / unknown login
        g.confirm(b"p", args)
    assert not g.sessions


@pytest.mark.parametrize("args", [{}, {"user": "writer"}, {"user": 5, "g1": b"x" * 32}, {"user": "writer", "g1": "x"},
                                  {"user": "writer", "g1": bytes(32)}, {"user": "", "g1": b"\x01" * 32}])
def test_hello_garbage(args: dict[str, Any]) -> None:
    g = make_guard(Protection.UPDATE)
    with pytest.raises(AuthenticationFailed):
        g.hello(b"p", args)
    assert not g._pending


def test_pending_login_times_out() -> None:
    clock = Clock()
    g = make_guard(Protection.UPDATE, clock=clock, pending_timeout_s=10.0)
    hs, reply = _hello(g, "writer", b"p")
    args = _confirm_args(hs, reply)
    clock.now += 10.0
    with pytest.raises(AuthenticationRequired):
        g.confirm(b"p", args)
    assert not g.sessions
    hs, reply = _hello(g, "writer", b"p")  # just in time works
    args = _confirm_args(hs, reply)
    clock.now += 9.5
    g.confirm(b"p", args)
    assert len(g.sessions) == 1


def test_pending_logins_capped_per_peer() -> None:
    clock = Clock()
    g = make_guard(Protection.UPDATE, clock=clock, pending_timeout_s=10.0)
    g1 = ClientHandshake("writer", None, PasswordSecret("x")).start().g1
    for _ in range(MAX_PENDING_PER_PEER):
        g.hello(b"greedy", {"user": "writer", "g1": g1})
    with pytest.raises(AuthenticationFailed, match="too many"):
        g.hello(b"greedy", {"user": "writer", "g1": g1})
    login(g, "writer", peer=b"other")  # other peers are not held up
    clock.now += 10.0  # the greedy peer's logins expire; it may try again
    g.hello(b"greedy", {"user": "writer", "g1": g1})


def test_pass4_is_bound_to_the_instance() -> None:
    # A client that believes it talks to another instance cannot open the grant.
    g = make_guard(Protection.UPDATE)
    hs, reply = _hello(g, "writer", b"p")
    grant = _grant(g.confirm(b"p", _confirm_args(hs, reply)))
    with pytest.raises(AuthenticationFailed):
        hs.finish(grant, delivery_context(SCHEMA, CELL, b"X" * 16))


# --- sessions -------------------------------------------------------------------------------------


def test_session_expires_with_the_injected_clock() -> None:
    clock = Clock()
    g = make_guard(Protection.UPDATE, clock=clock, session_ttl_s=100.0)
    c = login(g, "writer")
    clock.now += 99.0
    g.open(c.seal_request(request(1)))
    clock.now += 1.0
    with pytest.raises(AuthenticationRequired) as exc:
        g.open(c.seal_request(request(2)))
    assert exc.value.detail == {"reason": "session"}
    assert not g.sessions and g.stats.unknown_sessions == 1
    c2 = login(g, "writer")  # a new login is a new session
    assert c2.session_id != c.session_id
    g.open(c2.seal_request(request(3)))


def test_tick_expires_sessions() -> None:
    clock = Clock()
    g = make_guard(Protection.UPDATE, clock=clock, session_ttl_s=50.0)
    login(g, "writer")
    clock.now += 20
    c2 = login(g, "reader")
    clock.now += 30
    assert g.tick() == []
    assert set(g.sessions) == {c2.session_id} and g.stats.sessions == 1


def test_unknown_session_and_tampering() -> None:
    g = make_guard(Protection.UPDATE)
    c1, c2 = login(g, "writer"), login(g, "reader")
    m = c1.seal_request(request(1))
    with pytest.raises(AuthenticationRequired):
        g.open(Sealed(os.urandom(16), m.counter, m.corr_id, m.ciphertext))
    with pytest.raises(DecryptionFailed):  # moved into another live session
        g.open(Sealed(c2.session_id, m.counter, m.corr_id, m.ciphertext))
    with pytest.raises(DecryptionFailed):
        g.open(Sealed(m.session_id, m.counter, m.corr_id, m.ciphertext[:-1] + bytes([m.ciphertext[-1] ^ 1])))
    g.open(m)
    with pytest.raises(DecryptionFailed):  # replay
        g.open(m)
    assert g.stats.rejected == 3 and g.stats.unknown_sessions == 1
    g.open(c1.seal_request(request(2)))  # the session survives all that
    g.open(c2.seal_request(request(3)))


def test_reply_after_the_counter_limit_ends_the_session() -> None:
    g = make_guard(Protection.UPDATE)
    c = login(g, "writer")
    s, _ = g.open(c.seal_request(request(1)))
    s.tx_counter = MAX_MESSAGES_PER_KEY
    assert g.seal_reply(s, encode_reply(1, None), 1) is None
    assert not g.sessions


def test_revoke_ends_the_session_and_rotates_away() -> None:
    g = make_guard(Protection.FULL)
    keep, gone = login(g, "reader"), login(g, "reader2")
    epoch = g.epoch
    rekeys, _ = open_events(g.revoke({gone.session_id}))
    assert g.epoch == epoch + 2
    assert [sid for sid, _ in rekeys[0].entries] == [keep.session_id]
    assert keep.open_rekey(rekeys[0]) and not gone.open_rekey(rekeys[0])
    ev = event(g)
    assert can_read(keep, ev) and not can_read(gone, ev)
    with pytest.raises(AuthenticationRequired):
        g.open(gone.seal_request(request(1)))


# --- redaction ------------------------------------------------------------------------------------


def test_no_secret_in_any_repr() -> None:
    g = make_guard(Protection.FULL)
    c, sg, k_sess = login_with(guard_ask(g), SCHEMA, CELL, "reader", pw("reader"))
    s = g.sessions[c.session_id]
    hs = ClientHandshake("reader", None, PasswordSecret(pw("reader")))
    hs.start()
    g.rotate("x")
    creds = Credentials.password("reader", pw("reader"))
    keys = [sg.c2s.value, sg.s2c.value, k_sess.value, g.policy.server_secret.value]
    keys += [k.value for _, k in sg.group] + [k.value for _, k in g.keys.delivered()]
    rec = g.policy.verifier("reader")
    assert rec is not None
    keys.append(rec.verifier)
    for obj in (g, g.sessions, s, c, c.group, sg, g.keys, g.stats, g.policy, creds, creds.secret, hs, rec):
        assert_redacted(obj, keys, pw("reader"))
    assert creds.user in repr(creds)
