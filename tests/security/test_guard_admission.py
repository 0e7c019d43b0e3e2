"""The admission table of DESIGN.md §5 as the instance's security state
(ubicore/security/guard.py) applies it, directly and through :meth:`InstanceCore.handle`:
who, with which right and which session, may run what at each protection level; and what
the login grant holds (group keys only for ``full`` and the read right).
"""
from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from ubicore.dispatch import InstanceCore
from ubicore.errors import (
    AuthenticationFailed,
    AuthenticationRequired,
    PermissionDenied,
)
from ubicore.protocol.codec import (
    encode_request,
    encode_sealed_request,
    parse_server_message,
)
from ubicore.protocol.messages import (
    ErrorReply,
    Reply,
    Request,
    Sealed,
)
from ubicore.schema import Protection
from ubicore.security.policy import Right
from ubicore.security.session import ClientSession
from ubicore.store import Store

from .guard_support import (
    CELL,
    GROUPS,
    IID,
    SCHEMA,
    USERS,
    Ask,
    Box,
    can_read,
    event,
    guard_ask,
    login,
    login_with,
    make_guard,
    make_policy,
    pw,
    request,
)

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
