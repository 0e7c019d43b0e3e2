"""Helpers for the tests of the instance's security state (test_guard_*.py, and
test_policy.py, test_hardening.py, test_review.py). Not a test module: nothing here is
collected.

Clients here are real: they log in with :class:`ClientHandshake` exactly as
``ubicore.sessions.SessionManager._login`` does (replies travel through msgpack as on the
wire), then seal requests with their :class:`ClientSession`, which go to
``SessionGuard.open`` or through :meth:`InstanceCore.handle`. The guard's clock is an
injected :class:`Clock`.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ubicore.config.model import SecurityConfig
from ubicore.errors import DecryptionFailed
from ubicore.protocol.codec import (
    encode_heartbeat,
    pack,
    parse_channel_message,
    unpack,
)
from ubicore.protocol.messages import (
    Heartbeat,
    Rekey,
    Request,
    SealedEvent,
)
from ubicore.schema import Column, Protection, Relation, Schema, read, update
from ubicore.security.amp import ClientHandshake, PasswordSecret
from ubicore.security.guard import SessionGuard
from ubicore.security.policy import Right, StaticPolicy
from ubicore.security.primitives import KdfParams, Secret
from ubicore.security.session import (
    ClientSession,
    SessionGrant,
    client_session,
    delivery_context,
)
from ubicore.sessions import _grant, parse_challenge
from ubicore.store import Transaction

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
    hs_id, challenge, site, instance_id = parse_challenge(ask("auth_hello", {"user": hello.user, "g1": hello.g1}))
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


def _hello(g: SessionGuard, user: str, peer: bytes) -> tuple[ClientHandshake, dict[str, Any]]:
    hs = ClientHandshake(user, None, PasswordSecret(pw(user)))
    hello = hs.start()
    return hs, g.hello(peer, {"user": user, "g1": hello.g1})


def _confirm_args(hs: ClientHandshake, reply: dict[str, Any]) -> dict[str, Any]:
    hs_id, challenge, site, _ = parse_challenge(reply)
    return {"hs": hs_id, "h_c": hs.respond(challenge, site).h_c}


# The groups a refusal names (the admission table, a read right lost to a policy change).
GROUPS = {Right.READ: ["a reader"], Right.UPDATE: ["an administrator", "a power user"]}
