"""Session crypto for requests and replies (ubicore/security/session.py), sans-IO: round trips,
counters and nonce uniqueness, replays, exhaustion, the associated data that binds every
field and the (schema, cell, instance, epoch) of each end, the session grant's encoding, and
redaction of every object that holds a key.

Sessions are built straight from a grant (``session_support.make_pair``), no key exchange.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ubicore.errors import DecryptionFailed
from ubicore.protocol.codec import encode_error, encode_reply
from ubicore.protocol.messages import ErrorReply, Reply
from ubicore.security.primitives import random_key
from ubicore.security.session import (
    MAX_MESSAGES_PER_KEY,
    GroupKeys,
    SessionExhausted,
    SessionGrant,
)

from .session_support import (
    C2S,
    CELL,
    IID,
    OTHER_IID,
    PROPERTY,
    SCHEMA,
    assert_redacted,
    make_grant,
    make_pair,
    nonce,
    req,
)

# --- RPC: requests and replies -----------------------------------------------------------------


def test_request_and_reply_round_trip() -> None:
    c, s = make_pair()
    sealed = c.seal_request(req(9, "put", name="x", value=3))
    assert sealed.session_id == c.session_id and sealed.corr_id == 9 and sealed.counter == 1
    assert b"put" not in sealed.ciphertext
    got = s.open_request(sealed)
    assert got == req(9, "put", name="x", value=3)
    reply = s.seal_reply(encode_reply(9, {"v": 3}), 9)
    assert c.open_reply(reply) == Reply(9, {"v": 3})
    err = s.seal_reply(encode_error(10, "permission_denied", "no", {"groups": ["g"]}), 10)
    assert c.open_reply(err) == ErrorReply(10, "permission_denied", "no", {"groups": ["g"]})


def test_counters_strictly_increase_per_direction() -> None:
    c, s = make_pair()
    sent = [c.seal_request(req(i)) for i in range(1, 50)]
    assert [m.counter for m in sent] == list(range(1, 50))
    for m in reversed(sent):  # reordered delivery within the window is fine
        s.open_request(m)
    replies = [s.seal_reply(encode_reply(i, i), i) for i in range(1, 30)]
    assert [m.counter for m in replies] == list(range(1, 30))
    assert [c.open_reply(m).corr_id for m in replies] == list(range(1, 30))
    assert c.tx_counter == 49 and s.tx_counter == 29


def test_no_nonce_repeats_across_many_requests() -> None:
    c, _ = make_pair()
    nonces = {nonce(C2S, c.seal_request(req(1)).counter) for _ in range(500)}
    assert len(nonces) == 500


def test_replayed_request_and_reply_are_refused_and_counted() -> None:
    c, s = make_pair()
    m = c.seal_request(req(1))
    s.open_request(m)
    with pytest.raises(DecryptionFailed):
        s.open_request(m)
    assert s.rejected == 1
    r = s.seal_reply(encode_reply(1, None), 1)
    c.open_reply(r)
    with pytest.raises(DecryptionFailed):
        c.open_reply(r)
    assert c.rejected == 1


def test_a_forged_counter_does_not_move_the_window() -> None:
    c, s = make_pair()
    m = c.seal_request(req(1))
    with pytest.raises(DecryptionFailed):
        s.open_request(m._replace(counter=10**6))
    assert s.window.top == 0
    assert s.open_request(m).corr_id == 1


def test_session_exhausted_before_the_counter_wraps() -> None:
    c, s = make_pair()
    c.tx_counter = MAX_MESSAGES_PER_KEY - 1
    assert c.seal_request(req(1)).counter == MAX_MESSAGES_PER_KEY
    with pytest.raises(SessionExhausted):
        c.seal_request(req(2))
    s.tx_counter = MAX_MESSAGES_PER_KEY
    with pytest.raises(SessionExhausted):
        s.seal_reply(encode_reply(1, 1), 1)


# --- associated data -----------------------------------------------------------------------------

VARIANTS = [
    {"schema": "TSec::Other"},
    {"schema": SCHEMA + " "},
    {"cell": "Zone-B"},
    {"instance_id": OTHER_IID},
    {"epoch": 2},
]


@pytest.mark.parametrize("other", VARIANTS, ids=lambda v: next(iter(v)))
def test_request_bound_to_schema_cell_instance_epoch(other: dict[str, Any]) -> None:
    grant, k = make_grant(), random_key()
    c, _ = make_pair(grant, k, client=other)
    _, s = make_pair(grant, k)
    m = c.seal_request(req(3))
    with pytest.raises(DecryptionFailed):
        s.open_request(m)
    c_ok, _ = make_pair(grant, k)  # the same keys and parameters open it
    _, s_ok = make_pair(grant, k)
    assert s_ok.open_request(c_ok.seal_request(req(3))).corr_id == 3


@pytest.mark.parametrize("other", VARIANTS, ids=lambda v: next(iter(v)))
def test_reply_bound_to_schema_cell_instance_epoch(other: dict[str, Any]) -> None:
    grant, k = make_grant(), random_key()
    _, s = make_pair(grant, k, server=other)
    c, _ = make_pair(grant, k)
    with pytest.raises(DecryptionFailed):
        c.open_reply(s.seal_reply(encode_reply(3, "x"), 3))


@pytest.mark.parametrize("field,value", [("session_id", b"S" * 16), ("counter", 2), ("corr_id", 8), ("ciphertext", None)])
def test_request_fields_are_bound(field: str, value: Any) -> None:
    c, s = make_pair()
    m = c.seal_request(req(7))
    c.seal_request(req(8))  # counter 2 exists too: a relabelled one must still fail
    if value is None:
        value = m.ciphertext[:-1] + bytes([m.ciphertext[-1] ^ 1])
    with pytest.raises(DecryptionFailed):
        s.open_request(m._replace(**{field: value}))
    assert s.open_request(m).corr_id == 7  # untouched, it still opens


@pytest.mark.parametrize("field,value", [("session_id", b"S" * 16), ("counter", 2), ("corr_id", 8)])
def test_reply_fields_are_bound(field: str, value: Any) -> None:
    c, s = make_pair()
    r = s.seal_reply(encode_reply(7, "x"), 7)
    with pytest.raises(DecryptionFailed):
        c.open_reply(r._replace(**{field: value}))
    assert c.open_reply(r).corr_id == 7


def test_session_id_is_bound_even_under_the_same_keys() -> None:
    # Two sessions that (absurdly) share every key still cannot take each other's messages.
    grant, k = make_grant(), random_key()
    other = dataclasses.replace(grant, session_id=b"\x01" * 16)
    c1, _ = make_pair(grant, k)
    _, s2 = make_pair(other, k)
    m = c1.seal_request(req(4))
    with pytest.raises(DecryptionFailed):
        s2.open_request(m._replace(session_id=other.session_id))


def test_inner_corr_id_must_match_the_outer_one() -> None:
    c, s = make_pair()
    r = s.seal_reply(encode_reply(5, "x"), 6)  # the frames say 5, the envelope says 6
    with pytest.raises(DecryptionFailed):
        c.open_reply(r)


def test_a_request_cannot_be_reflected_as_a_reply() -> None:
    c, s = make_pair()
    m = c.seal_request(req(1))
    with pytest.raises(DecryptionFailed):
        c.open_reply(m)  # own request echoed back: other key, other nonce prefix


# --- the grant ------------------------------------------------------------------------------------


def test_grant_round_trip() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    grant = make_grant(epoch=7, group=g.delivered())
    back = SessionGrant.decode(grant.encode())
    assert back.session_id == grant.session_id and back.epoch == 7 and back.user == "alice"
    assert back.c2s == grant.c2s and back.s2c == grant.s2c
    assert [(e, k.value) for e, k in back.group] == [(e, k.value) for e, k in grant.group]


@pytest.mark.parametrize("change", [
    {"session": b"short"}, {"c2s": b"k" * 15}, {"epoch": -1}, {"epoch": 2**63}, {"ttl_s": 0.0},
    {"ttl_s": -5.0}, {"group": [[1, b"k"]]}, {"group": "x"},
])
def test_grant_decode_refuses_malformed(change: dict[str, Any]) -> None:
    from ubicore.protocol.codec import pack, unpack

    m = unpack(make_grant().encode())
    m.update(change)
    with pytest.raises(DecryptionFailed):
        SessionGrant.decode(pack(m))


@PROPERTY
@given(st.binary(max_size=200))
def test_grant_decode_garbage(data: bytes) -> None:
    try:
        SessionGrant.decode(data)
    except DecryptionFailed:
        pass


# --- redaction ------------------------------------------------------------------------------------


def test_no_key_in_any_repr() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    grant, k = make_grant(group=g.delivered()), random_key()
    c, s = make_pair(grant, k)
    g.rotate(exclude_next=True)
    keys = [grant.c2s.value, grant.s2c.value, k.value] + [key.value for _, key in grant.group]
    keys += [key.value for _, key in g.delivered()]
    for obj in (grant, c, s, g, c.group, c.window, s._tx, c._wrap, grant.c2s, [c, s], {"s": s}):
        assert_redacted(obj, keys)
    assert "redacted" in repr(grant) and "redacted" in repr(c) and "redacted" in repr(g)
