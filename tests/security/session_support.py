"""Helpers for the session crypto tests (test_session_*.py, and test_guard_login.py,
test_policy.py). Not a test module: nothing here is collected.

Sessions are built straight from a :class:`SessionGrant` (no key exchange): both ends get
the same grant and K_sess (``make_pair``), and a test then varies one parameter of one end
(schema, cell, instance id, epoch) or tampers with one field of a message.
``assert_redacted`` checks that no key shows in an object's repr.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from hypothesis import HealthCheck, settings

from ubicore.protocol.codec import encode_delta, encode_heartbeat
from ubicore.protocol.messages import (
    Change,
    Delta,
    Heartbeat,
    Request,
)
from ubicore.security.primitives import Secret, random_key
from ubicore.security.session import (
    ClientSession,
    GroupKeyRing,
    GroupKeys,
    ServerSession,
    SessionGrant,
    client_session,
    new_session_keys,
    server_session,
)

PROPERTY = settings(deadline=None, max_examples=200, database=None, suppress_health_check=[HealthCheck.too_slow])

SCHEMA = "TSec::Box"
CELL = "Zone-A"
IID = b"I" * 16
OTHER_IID = b"J" * 16


# --- helpers -----------------------------------------------------------------------------------


def make_grant(*, epoch: int = 1, level: str = "full", user: str = "alice", ttl_s: float = 60.0,
               group: tuple[tuple[int, Secret], ...] = ()) -> SessionGrant:
    sid, c2s, s2c = new_session_keys()
    return SessionGrant(sid, c2s, s2c, epoch, level, ttl_s, user, group)


def make_pair(
    grant: SessionGrant | None = None, k_sess: Secret | None = None, *,
    server: dict[str, Any] | None = None, client: dict[str, Any] | None = None,
) -> tuple[ClientSession, ServerSession]:
    """Both ends of one session; ``server``/``client`` override schema, cell, instance_id
    (and ``epoch``) of that end only."""
    grant = grant or make_grant()
    k_sess = k_sess or random_key()

    def params(over: dict[str, Any] | None) -> tuple[str, str, bytes, SessionGrant]:
        over = over or {}
        g = dataclasses.replace(grant, epoch=over["epoch"]) if "epoch" in over else grant
        return over.get("schema", SCHEMA), over.get("cell", CELL), over.get("instance_id", IID), g

    cs, cc, ci, cg = params(client)
    ss, sc, si, sg = params(server)
    return (client_session(cs, cc, ci, cg, k_sess, 1e12),
            server_session(ss, sc, si, sg, k_sess, 1e12, peer=b"peer", may_read=True))


def req(corr: int = 7, op: str = "peek", **args: Any) -> Request:
    return Request(corr, SCHEMA, CELL, op, args, 0)


def secret_forms(keys: Iterable[bytes]) -> list[str]:
    """Ways a key could leak into a repr: hex (both cases) and Python's bytes repr."""
    out: list[str] = []
    for k in keys:
        out += [k.hex(), k.hex().upper(), repr(k)[2:-1]]
    return out


def assert_redacted(obj: object, keys: Iterable[bytes], *words: str) -> None:
    forms = secret_forms(keys) + [w for w in words if w]
    for text in (repr(obj), str(obj)):
        for f in forms:
            assert f not in text, f"{type(obj).__name__} repr leaks a secret: {text}"


C2S, REKEY = b"\0\0\0\1", b"\0\0\0\4"  # nonce prefixes (module docstring of session.py)


def nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + counter.to_bytes(8, "big")


HB = encode_heartbeat(Heartbeat(IID, 5))
DELTA = encode_delta(Delta(IID, 3, ((Change("boxes", 1, ("a", 1)),),)))


def ring_for(keys: GroupKeys, **over: Any) -> GroupKeyRing:
    r = GroupKeyRing(over.get("schema", SCHEMA), over.get("cell", CELL), over.get("instance_id", IID))
    r.add(keys.delivered())
    return r
