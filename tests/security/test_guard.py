"""The instance's security state (ubicore/security/guard.py), sans-IO, with an injected
clock: logins, sessions, the admission table of DESIGN.md §5, group keys and their
rotation on a timer, at the message limit, on revocation and on policy changes.

Clients here are real: they log in with :class:`ClientHandshake` exactly as
``ubicore.sessions.SessionManager._login`` does (replies travel through msgpack as on the
wire), then seal requests with their :class:`ClientSession`, which go to
``SessionGuard.open`` or through :meth:`InstanceCore.handle`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ubicore.config.model import SecurityConfig
from ubicore.dispatch import InstanceCore
from ubicore.errors import (
    AuthenticationFailed,
    AuthenticationRequired,
    DecryptionFailed,
    PermissionDenied,
)
from ubicore.protocol.codec import (
    encode_heartbeat,
    encode_reply,
    encode_request,
    encode_sealed_request,
    pack,
    parse_channel_message,
    parse_server_message,
    unpack,
)
from ubicore.protocol.messages import (
    ErrorReply,
    Heartbeat,
    Rekey,
    Reply,
    Request,
    Sealed,
    SealedEvent,
)
from ubicore.schema import Column, Protection, Relation, Schema, read, update
from ubicore.security.amp import ClientHandshake, PasswordSecret
from ubicore.security.guard import MAX_PENDING_PER_PEER, SessionGuard
from ubicore.security.policy import Right, StaticPolicy
from ubicore.security.primitives import KdfParams, Secret
from ubicore.security.session import (
    MAX_MESSAGES_PER_KEY,
    ClientSession,
    SessionGrant,
    client_session,
    delivery_context,
)
from ubicore.sessions import Credentials, _challenge, _grant
from ubicore.store import Store, Transaction

from .test_session import assert_redacted

KDF = KdfParams(t=1, p=1, m_kib=64)
SITE = "guard-site"
SCHEMA = "TGuard::Box"
CELL = "Zone-A"
IID = b"G" * 16
USERS = {"nobody": Right.NONE, "reader": Right.READ, "writer": Right.UPDATE, "reader2": Right.READ}
HB = encode_heartbeat(Heartbeat(IID, 1))


def pw(user: str) -> str:
    return f"{user}-secret-password"


class Box(Schema, name=SCHEMA):
    """One read and one update operation."""

    boxes = Relation(Column("name", str), Column("n", int, default=0), key=("name",))

    @read
    def peek(self, tx: Transaction, name: str) -> int | None:
        row = tx.boxes.get(name)
        return None if row is None else int(row.n)

    @update
    def put(self, tx: Transaction, name: str, n: int) -> None:
        tx.boxes.upsert(name=name, n=n)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_policy(groups: dict[Right, list[str]] | None = None) -> StaticPolicy:
    p = StaticPolicy(SITE, fake_params=KDF, groups=groups)
    for name, right in USERS.items():
        p.add_user(name, pw(name), right, kdf=KDF)
    p.refresh()
    return p


def make_guard(level: Protection, *, clock: Clock | None = None, policy: StaticPolicy | None = None,
               **settings: Any) -> SessionGuard:
    return SessionGuard(SCHEMA, CELL, IID, level, policy or make_policy(), settings=SecurityConfig(**settings),
                        clock=clock or Clock())


Ask = Callable[[str, dict[str, Any]], Any]


def guard_ask(guard: SessionGuard, peer: bytes = b"peer-1") -> Ask:
    """The two login operations, their replies through msgpack as on the wire."""
    def ask(op: str, args: dict[str, Any]) -> Any:
        args = unpack(pack(args))
        reply = guard.hello(peer, args) if op == "auth_hello" else guard.confirm(peer, args)
        return unpack(pack(reply))
    return ask


def login_with(ask: Ask, schema: str, cell: str, user: str, password: str) -> tuple[ClientSession, SessionGrant, Secret]:
    """``SessionManager._login``, synchronously."""
    hs = ClientHandshake(user, None, PasswordSecret(password))
    hello = hs.start()
    hs_id, challenge, site, instance_id = _challenge(ask("auth_hello", {"user": hello.user, "g1": hello.g1}))
    confirm = hs.respond(challenge, site)
    grant = _grant(ask("auth_confirm", {"hs": hs_id, "h_c": confirm.h_c}))
    payload, k_sess = hs.finish(grant, delivery_context(schema, cell, instance_id))
    sg = SessionGrant.decode(payload)
    assert sg.epoch == grant.version
    return client_session(schema, cell, instance_id, sg, k_sess, 1e12), sg, k_sess


def login(guard: SessionGuard, user: str, password: str | None = None, peer: bytes = b"peer-1") -> ClientSession:
    return login_with(guard_ask(guard, peer), SCHEMA, CELL, user, pw(user) if password is None else password)[0]


def request(corr: int = 1, op: str = "peek", **args: Any) -> Request:
    return Request(corr, SCHEMA, CELL, op, args or {"name": "a"}, 0)


def open_events(frames_list: list[list[bytes]]) -> tuple[list[Rekey], list[SealedEvent]]:
    rekeys, events = [], []
    for frames in frames_list:
        msg = parse_channel_message(frames)
        if isinstance(msg, Rekey):
            rekeys.append(msg)
        else:
            assert isinstance(msg, SealedEvent)
            events.append(msg)
    return rekeys, events


def can_read(c: ClientSession, ev: SealedEvent) -> bool:
    try:
        return isinstance(c.group.open(ev), Heartbeat)
    except DecryptionFailed:
        return False


def event(guard: SessionGuard) -> SealedEvent:
    rekeys, events = open_events(guard.seal_event(HB))
    assert not rekeys and len(events) == 1
    return events[0]


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


def _hello(g: SessionGuard, user: str, peer: bytes) -> tuple[ClientHandshake, dict[str, Any]]:
    hs = ClientHandshake(user, None, PasswordSecret(pw(user)))
    hello = hs.start()
    return hs, g.hello(peer, {"user": user, "g1": hello.g1})


def _confirm_args(hs: ClientHandshake, reply: dict[str, Any]) -> dict[str, Any]:
    hs_id, challenge, site, _ = _challenge(reply)
    return {"hs": hs_id, "h_c": hs.respond(challenge, site).h_c}


def test_confirm_is_one_shot() -> None:
    g = make_guard(Protection.UPDATE)
    hs, reply = _hello(g, "writer", b"p")
    args = _confirm_args(hs, reply)
    assert "h_s" in g.confirm(b"p", args)
    with pytest.raises(AuthenticationFailed):
        g.confirm(b"p", args)
    assert len(g.sessions) == 1


def test_a_wrong_confirmation_consumes_the_login() -> None:
    g = make_guard(Protection.UPDATE)
    hs, reply = _hello(g, "writer", b"p")
    args = _confirm_args(hs, reply)
    with pytest.raises(AuthenticationFailed):
        g.confirm(b"p", {**args, "h_c": bytes(32)})
    with pytest.raises(AuthenticationFailed):
        g.confirm(b"p", args)  # the right one, too late
    assert not g.sessions and g.stats.login_failures == 1


def test_a_confirm_from_another_peer_fails() -> None:
    g = make_guard(Protection.UPDATE)
    hs, reply = _hello(g, "writer", b"alice-conn")
    args = _confirm_args(hs, reply)
    with pytest.raises(AuthenticationFailed):
        g.confirm(b"mallory-conn", args)
    assert not g.sessions


@pytest.mark.parametrize("args", [{}, {"hs": "text", "h_c": b"x"}, {"hs": os.urandom(16), "h_c": b"x" * 32},
                                  {"hs": None}])
def test_confirm_garbage(args: dict[str, Any]) -> None:
    g = make_guard(Protection.UPDATE)
    _hello(g, "writer", b"p")
    with pytest.raises(AuthenticationFailed):
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
    with pytest.raises(AuthenticationFailed):
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
        g.open(Sealed(m.session_id, m.counter, m.corr_id, m.ciphertext[:-1] + b"\0"))
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


# --- the admission table (DESIGN.md §5) -------------------------------------------------------

OK, AUTH, DENY = "ok", "auth_required", "permission_denied"
WHO = [None, "nobody", "reader", "writer"]  # no session; sessions with right none, read, update
TABLE = {
    # level     operation      no session, none,  read,  update
    ("open", "get_group"): (OK, OK, OK, OK),
    ("open", "get_dump"): (OK, OK, OK, OK),
    ("open", "read"): (OK, OK, OK, OK),
    ("open", "update"): (OK, OK, OK, OK),
    ("update", "get_group"): (OK, OK, OK, OK),
    ("update", "get_dump"): (OK, OK, OK, OK),
    ("update", "read"): (AUTH, DENY, OK, OK),
    ("update", "update"): (AUTH, DENY, DENY, OK),
    ("full", "get_group"): (AUTH, DENY, OK, OK),
    ("full", "get_dump"): (AUTH, DENY, OK, OK),
    ("full", "read"): (AUTH, DENY, OK, OK),
    ("full", "update"): (AUTH, DENY, DENY, OK),
}
OPS = {"get_group": ("get_group", {}), "get_dump": ("get_dump", {}), "read": ("peek", {"name": "a"}),
       "update": ("put", {"name": "a", "n": 4})}
GROUPS = {Right.READ: ["a reader"], Right.UPDATE: ["an administrator", "a power user"]}


@pytest.fixture
def cores() -> Iterator[Callable[[Protection], InstanceCore]]:
    stores: list[Store] = []

    def make(level: Protection) -> InstanceCore:
        store = Store(Box, None)
        stores.append(store)
        return InstanceCore(Box, CELL, store, protection=level, instance_id=IID, policy=make_policy(GROUPS))

    yield make
    for s in stores:
        s.close()


def core_ask(core: InstanceCore, peer: bytes = b"peer-1") -> Ask:
    def ask(op: str, args: dict[str, Any]) -> Any:
        out = core.handle(encode_request(Request(99, SCHEMA, CELL, op, args, 0)), peer)
        assert out is not None
        msg = parse_server_message(out)
        if isinstance(msg, ErrorReply):
            raise AuthenticationFailed(msg.message)
        assert isinstance(msg, Reply)
        return msg.result
    return ask


def core_call(core: InstanceCore, c: ClientSession | None, op: str, args: dict[str, Any], corr: int = 3) -> Reply | ErrorReply:
    req = Request(corr, SCHEMA, CELL, op, args, 0)
    if c is None:
        out = core.handle(encode_request(req), b"peer-1")
        assert out is not None
        msg = parse_server_message(out)
        assert not isinstance(msg, Sealed)
        return msg
    out = core.handle(encode_sealed_request(c.seal_request(req)), b"peer-1")
    assert out is not None
    sealed = parse_server_message(out)
    assert isinstance(sealed, Sealed), sealed
    return c.open_reply(sealed)


@pytest.mark.parametrize("who_index", range(4), ids=[str(w) for w in WHO])
@pytest.mark.parametrize("level,op", list(TABLE))
def test_admission_table(cores: Callable[[Protection], InstanceCore], level: str, op: str, who_index: int) -> None:
    core = cores(Protection(level))
    who = WHO[who_index]
    c = None if who is None else login_with(core_ask(core), SCHEMA, CELL, who, pw(who))[0]
    name, args = OPS[op]
    got = core_call(core, c, name, args)
    want = TABLE[(level, op)][who_index]
    if want == OK:
        assert isinstance(got, Reply), got
        return
    assert isinstance(got, ErrorReply) and got.code == want, got
    if want == DENY:
        need = "update" if op == "update" else "read"
        assert got.detail == {"groups": GROUPS[Right[need.upper()]], "right": need}
        assert got.message == f"{who} may not {need} {SCHEMA} at {CELL}"
    else:
        assert got.detail == {"level": level}


def test_admit_directly_counts_refusals() -> None:
    g = make_guard(Protection.FULL, policy=make_policy(GROUPS))
    with pytest.raises(AuthenticationRequired):
        g.admit(None, "peek", False)
    s, _ = g.open(login(g, "reader").seal_request(request(1)))
    g.admit(s, "peek", False)
    with pytest.raises(PermissionDenied) as exc:
        g.admit(s, "put", True)
    assert exc.value.detail["groups"] == ["an administrator", "a power user"]
    assert (g.stats.auth_required, g.stats.denied) == (1, 1)


def test_denied_without_groups_configured() -> None:
    g = make_guard(Protection.UPDATE)
    s, _ = g.open(login(g, "reader").seal_request(request(1)))
    with pytest.raises(PermissionDenied) as exc:
        g.admit(s, "put", True)
    assert exc.value.detail == {"groups": [], "right": "update"}


def test_sealed_request_for_login_operations_is_refused(cores: Callable[[Protection], InstanceCore]) -> None:
    core = cores(Protection.UPDATE)
    c = login_with(core_ask(core), SCHEMA, CELL, "writer", pw("writer"))[0]
    got = core_call(core, c, "auth_hello", {"user": "writer", "g1": b"x"})
    assert isinstance(got, ErrorReply) and got.code == "bad_arguments"


def test_core_drops_what_does_not_open_and_keeps_serving(cores: Callable[[Protection], InstanceCore]) -> None:
    core = cores(Protection.FULL)
    c = login_with(core_ask(core), SCHEMA, CELL, "writer", pw("writer"))[0]
    m = c.seal_request(Request(1, SCHEMA, CELL, "put", {"name": "a", "n": 1}, 0))
    bad = Sealed(m.session_id, m.counter, m.corr_id, bytes(len(m.ciphertext)))
    assert core.handle(encode_sealed_request(bad)) is None
    assert core.stats.rejected == 1
    assert core.handle(encode_sealed_request(m)) is not None
    assert core.handle(encode_sealed_request(m)) is None  # replay: dropped, nothing runs twice
    assert core.stats.rejected == 2
    stranger = Sealed(os.urandom(16), 1, 42, b"x" * 40)
    err = parse_server_message(core.handle(encode_sealed_request(stranger)) or [])
    assert isinstance(err, ErrorReply) and err.code == "auth_required" and err.corr_id == 42
    got = core_call(core, c, "peek", {"name": "a"})
    assert got == Reply(3, 1)


# --- what the grant holds ---------------------------------------------------------------------


@pytest.mark.parametrize("level", list(Protection))
@pytest.mark.parametrize("user", ["nobody", "reader", "writer"])
def test_grant_holds_group_keys_only_for_full_and_read(level: Protection, user: str) -> None:
    g = make_guard(level)
    c, sg, _ = login_with(guard_ask(g), SCHEMA, CELL, user, pw(user))
    assert sg.level == level.value and sg.epoch == g.epoch and sg.user == user
    entitled = level is Protection.FULL and USERS[user] >= Right.READ
    if entitled:
        assert [(e, k.value) for e, k in sg.group] == [(e, k.value) for e, k in g.keys.delivered()]
        assert can_read(c, event(g))
    else:
        assert sg.group == () and c.group.epochs == []
    assert g.sessions[c.session_id].may_read is entitled


def test_get_keys(cores: Callable[[Protection], InstanceCore]) -> None:
    g = make_guard(Protection.FULL)
    s_read, _ = g.open(login(g, "reader").seal_request(request(1)))
    assert g.group_keys_for(s_read) == [[e, k.value] for e, k in g.keys.delivered()]
    s_none, _ = g.open(login(g, "nobody").seal_request(request(1)))
    with pytest.raises(PermissionDenied):
        g.group_keys_for(s_none)
    assert not s_none.may_read
    with pytest.raises(AuthenticationRequired):
        g.group_keys_for(None)
    assert make_guard(Protection.UPDATE).group_keys_for(None) == []


# --- the channel --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [Protection.OPEN, Protection.UPDATE])
def test_events_are_clear_below_full(level: Protection) -> None:
    g = make_guard(level)
    assert g.seal_event(HB) == [HB]
    assert g.rotate("x") == [] and g.revoke(set()) == []


def test_message_limit_rotates_first() -> None:
    g = make_guard(Protection.FULL, rotate_after_messages=3)
    c = login(g, "reader")
    late = login(g, "reader2")
    epoch = g.epoch
    evs = [event(g) for _ in range(3)]
    assert [e.counter for e in evs] == [1, 2, 3] and {e.epoch for e in evs} == {epoch}
    rekeys, events = open_events(out := g.seal_event(HB))
    assert parse_channel_message(out[0]) == rekeys[0]  # the rekey goes out before the event
    assert len(rekeys) == 1 and len(events) == 1
    assert events[0].epoch == epoch + 1 and events[0].counter == 1 and rekeys[0].epoch == epoch + 2
    assert {sid for sid, _ in rekeys[0].entries} == {c.session_id, late.session_id}
    assert c.open_rekey(rekeys[0])
    assert all(can_read(c, e) for e in evs + events)
    assert can_read(late, events[0])  # periodic: without the rekey too (it holds the next key)


def test_never_seals_past_max_messages_per_key() -> None:
    g = make_guard(Protection.FULL, rotate_after_messages=2**40)
    assert g.keys.max_messages == MAX_MESSAGES_PER_KEY
    c = login(g, "reader")
    g.keys.counter = MAX_MESSAGES_PER_KEY - 1
    last = event(g)
    assert last.counter == MAX_MESSAGES_PER_KEY and can_read(c, last)
    rekeys, events = open_events(g.seal_event(HB))
    assert len(rekeys) == 1 and events[0].counter == 1 and events[0].epoch == last.epoch + 1
    assert can_read(c, events[0])


def test_periodic_rotation_by_tick() -> None:
    clock = Clock()
    g = make_guard(Protection.FULL, clock=clock, rotation_s=600.0, session_ttl_s=10_000.0)
    c = login(g, "reader")
    epoch = g.epoch
    clock.now += 599.0
    assert g.tick() == [] and g.epoch == epoch
    clock.now += 1.0
    rekeys, _ = open_events(g.tick())
    assert g.epoch == epoch + 1 and g.stats.rotations == 1
    assert [sid for sid, _ in rekeys[0].entries] == [c.session_id]
    assert can_read(c, event(g))  # without the rekey: the next key was delivered at login
    assert g.tick() == []  # the timer restarted
    clock.now += 600.0
    open_events(g.tick())
    assert g.epoch == epoch + 2
    assert not can_read(c, event(g))  # two rotations on, the rekeys are needed ...
    assert c.open_rekey(rekeys[0])
    assert can_read(c, event(g))  # ... and the first one suffices


def test_tick_never_rotates_below_full() -> None:
    clock = Clock()
    g = make_guard(Protection.UPDATE, clock=clock, rotation_s=1.0)
    epoch = g.epoch
    clock.now += 100
    assert g.tick() == [] and g.epoch == epoch


def test_rekey_epochs_and_nonces_increase_over_mixed_rotations() -> None:
    g = make_guard(Protection.FULL)
    c = login(g, "reader")
    other = login(g, "reader2")
    epochs = []
    for i, kind in enumerate(["periodic", "revoke", "periodic", "periodic", "revoke"]):
        if kind == "periodic":
            out = g.rotate("test")
        else:
            victim = login(g, "writer")
            out = g.revoke({victim.session_id})
        rekeys, _ = open_events(out)
        epochs.append(rekeys[0].epoch)
        assert c.open_rekey(rekeys[0]) and other.open_rekey(rekeys[0])
        ev = event(g)
        assert can_read(c, ev) and can_read(other, ev)
    assert epochs == sorted(set(epochs))


# --- level changes and policy changes ----------------------------------------------------------


def test_set_level_moves_to_a_new_epoch_and_ends_sessions() -> None:
    g = make_guard(Protection.UPDATE)
    c = login(g, "writer")
    hs, reply = _hello(g, "reader", b"p")
    args = _confirm_args(hs, reply)
    epoch = g.epoch
    assert g.set_level(Protection.FULL)
    assert g.level is Protection.FULL and g.epoch > epoch and not g.sessions
    with pytest.raises(AuthenticationRequired):
        g.open(c.seal_request(request(1)))
    grant = g.confirm(b"p", args)  # a login begun under the old level finishes at the new one
    assert grant["version"] == g.epoch
    c2 = login(g, "reader")
    assert c2.level == "full" and c2.epoch == g.epoch and can_read(c2, event(g))
    assert not can_read(c, event(g))
    epoch = g.epoch
    assert not g.set_level(Protection.FULL) and g.epoch == epoch and g.sessions
    assert g.set_level(Protection.OPEN) and g.epoch > epoch and not g.sessions
    assert g.seal_event(HB) == [HB]


def test_reevaluate_only_acts_on_a_real_loss() -> None:
    g = make_guard(Protection.FULL)
    a, b, w = login(g, "reader"), login(g, "reader2"), login(g, "writer")
    epoch = g.epoch
    assert g.reevaluate() == []
    g.policy.add_user("dave", "x", Right.READ, kdf=KDF)  # nobody logged in as dave
    g.policy.set_right("writer", Right.READ)  # still reads
    assert g.reevaluate() == [] and g.epoch == epoch and len(g.sessions) == 3
    n = login(g, "nobody")  # never had the read right: losing nothing
    g.policy.set_right("nobody", Right.NONE)
    assert g.reevaluate() == [] and g.epoch == epoch
    assert {a.session_id, b.session_id, w.session_id, n.session_id} == set(g.sessions)


def test_reevaluate_drops_removed_users_and_rotates_away() -> None:
    g = make_guard(Protection.FULL)
    a, b, w = login(g, "reader"), login(g, "reader2"), login(g, "writer")
    g.policy.remove_user("reader2")
    rekeys, _ = open_events(g.reevaluate())
    assert b.session_id not in g.sessions and len(g.sessions) == 2
    assert {sid for sid, _ in rekeys[0].entries} == {a.session_id, w.session_id}
    assert a.open_rekey(rekeys[0]) and w.open_rekey(rekeys[0]) and not b.open_rekey(rekeys[0])
    for _ in range(3):
        ev = event(g)
        assert can_read(a, ev) and can_read(w, ev) and not can_read(b, ev)
    with pytest.raises(AuthenticationRequired):
        g.open(b.seal_request(request(1)))


def test_reevaluate_rotates_away_from_a_session_that_lost_read() -> None:
    g = make_guard(Protection.FULL, policy=make_policy(GROUPS))
    a, w = login(g, "reader"), login(g, "writer")
    epoch = g.epoch
    g.policy.set_right("reader", Right.NONE)
    rekeys, _ = open_events(g.reevaluate())
    assert g.epoch == epoch + 2
    assert a.session_id not in g.sessions  # ended: a new login checks the rights afresh
    assert [sid for sid, _ in rekeys[0].entries] == [w.session_id]
    assert not a.open_rekey(rekeys[0]) and w.open_rekey(rekeys[0])
    ev = event(g)
    assert can_read(w, ev) and not can_read(a, ev)
    with pytest.raises(AuthenticationRequired):
        g.open(a.seal_request(request(1)))
    again = login(g, "reader")
    s, _ = g.open(again.seal_request(request(1)))
    with pytest.raises(PermissionDenied):
        g.group_keys_for(s)
    open_events(g.rotate("periodic"))  # later rotations leave it out too
    assert g.reevaluate() == []  # and it is not "lost" a second time
    later = event(g)
    assert not can_read(a, later) and can_read(w, later)


def test_reevaluate_below_full_drops_sessions_without_rotating() -> None:
    g = make_guard(Protection.UPDATE)
    a, w = login(g, "reader"), login(g, "writer")
    epoch = g.epoch
    g.policy.remove_user("reader")
    g.policy.set_right("writer", Right.NONE)
    assert g.reevaluate() == [] and g.epoch == epoch
    assert set(g.sessions) == {w.session_id}


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
