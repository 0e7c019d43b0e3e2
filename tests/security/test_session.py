"""Session crypto (ubicore/security/session.py), sans-IO: the replay window, nonce
uniqueness, the associated data of every sealed kind, group keys and their rotation, and
redaction of every object that holds a key.

Sessions here are built straight from a :class:`SessionGrant` (no key exchange): both
ends get the same grant and K_sess, and the tests then vary one parameter of one end
(schema, cell, instance id, epoch) or tamper with one field of a message.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubicore.errors import DecryptionFailed
from ubicore.protocol.codec import (
    encode_delta,
    encode_error,
    encode_heartbeat,
    encode_reply,
)
from ubicore.protocol.messages import (
    Change,
    Delta,
    ErrorReply,
    Heartbeat,
    Rekey,
    Reply,
    Request,
)
from ubicore.security.primitives import Secret, random_key
from ubicore.security.session import (
    GROUP_KEYS_KEPT,
    MAX_MESSAGES_PER_KEY,
    REPLAY_WINDOW,
    ClientSession,
    GroupKeyRing,
    GroupKeys,
    ReplayWindow,
    ServerSession,
    SessionExhausted,
    SessionGrant,
    client_session,
    decode_group_keys,
    encode_group_keys,
    new_session_keys,
    server_session,
)

PROPERTY = settings(deadline=None, max_examples=200, database=None, suppress_health_check=[HealthCheck.too_slow])

SCHEMA = "TSec::Box"
CELL = "Zone-A"
IID = b"I" * 16
OTHER_IID = b"J" * 16


# --- helpers (also used by test_guard) ---------------------------------------------------------


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


# --- ReplayWindow ---------------------------------------------------------------------------------


def test_window_in_order() -> None:
    w = ReplayWindow()
    assert all(w.check_and_mark(n) for n in range(1, 3000))
    assert w.top == 2999
    assert not any(w.check_and_mark(n) for n in range(1, 3000))


def test_window_out_of_order_within_the_window_once_each() -> None:
    w = ReplayWindow(64)
    order = [10, 3, 7, 1, 60, 12, 11, 64, 2]
    assert all(w.check_and_mark(n) for n in order)
    assert not any(w.check_and_mark(n) for n in order)
    assert w.check_and_mark(5) and w.check_and_mark(63)  # holes still open, once
    assert not w.check_and_mark(5)


def test_window_duplicates_are_refused() -> None:
    w = ReplayWindow()
    assert w.check_and_mark(1)
    assert not w.check_and_mark(1)
    assert w.check_and_mark(100)
    assert not w.check_and_mark(100) and not w.check_and_mark(1)


def test_window_too_old() -> None:
    w = ReplayWindow(16)
    assert w.check_and_mark(100)
    assert not w.seen(85) and w.check_and_mark(85)  # 15 behind: last slot of the window
    assert w.seen(84) and not w.check_and_mark(84)  # 16 behind: fallen out
    assert not w.check_and_mark(1)
    w2 = ReplayWindow()
    w2.mark(REPLAY_WINDOW + 10)
    assert not w2.check_and_mark(10)
    assert w2.check_and_mark(11)


@pytest.mark.parametrize("n", [0, -1, -2**63, -(2**70)])
def test_window_zero_and_negative_never_accepted(n: int) -> None:
    w = ReplayWindow()
    assert w.seen(n) and not w.check_and_mark(n)
    w.mark(5)
    assert not w.check_and_mark(n)
    assert w.top == 5


@pytest.mark.parametrize("jump", [REPLAY_WINDOW, REPLAY_WINDOW + 1, 10**9, 2**32, 2**63, 2**64 - 1])
def test_window_huge_jumps_forget_the_past_cheaply(jump: int) -> None:
    # A late subscriber's first event can carry a counter near 2^31; the window must not
    # build a 2^31-bit integer for it (it did: 256 MB and a MemoryError past that).
    w = ReplayWindow()
    assert w.check_and_mark(3) and w.check_and_mark(5)
    top = 5 + jump
    assert w.check_and_mark(top)
    assert w.top == top and w._bits.bit_length() <= REPLAY_WINDOW
    assert not w.check_and_mark(top)
    assert not w.check_and_mark(5) and not w.check_and_mark(3)  # far behind now
    assert w.check_and_mark(top - 1) and w.check_and_mark(top - REPLAY_WINDOW + 1)
    assert not w.check_and_mark(top - REPLAY_WINDOW)


def _model(size: int, ops: list[int]) -> list[bool]:
    seen: set[int] = set()
    top = 0
    out = []
    for n in ops:
        ok = n > 0 and n > top - size and n not in seen
        if ok:
            seen.add(n)
            top = max(top, n)
        out.append(ok)
    return out


counters = st.one_of(
    st.integers(-3, 80),
    st.integers(1, 2**64 - 1),
    st.integers(2**31 - 5, 2**31 + 5),
)


@PROPERTY
@given(st.sampled_from([1, 2, 8, 64, REPLAY_WINDOW]), st.lists(counters, max_size=120))
def test_window_matches_a_set_model(size: int, ops: list[int]) -> None:
    w = ReplayWindow(size)
    assert [w.check_and_mark(n) for n in ops] == _model(size, ops)


@PROPERTY
@given(st.lists(st.integers(1, 200), max_size=300))
def test_window_matches_a_set_model_dense(ops: list[int]) -> None:
    w = ReplayWindow(32)
    got = []
    for n in ops:
        before = w.seen(n)
        got.append(w.check_and_mark(n))
        assert got[-1] is not before
    assert got == _model(32, ops)


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


# --- events ---------------------------------------------------------------------------------------


def ring_for(keys: GroupKeys, **over: Any) -> GroupKeyRing:
    r = GroupKeyRing(over.get("schema", SCHEMA), over.get("cell", CELL), over.get("instance_id", IID))
    r.add(keys.delivered())
    return r


def test_event_round_trip_and_replay() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = ring_for(g)
    ev = g.seal(DELTA)
    assert ev.epoch == 1 and ev.counter == 1 and b"boxes" not in ev.ciphertext
    got = ring.open(ev)
    assert isinstance(got, Delta) and got.first_seq == 3
    with pytest.raises(DecryptionFailed):
        ring.open(ev)
    assert isinstance(ring.open(g.seal(HB)), Heartbeat)
    assert ring.rejected == 1


@pytest.mark.parametrize("over", [{"schema": "TSec::Other"}, {"cell": "Zone-B"}], ids=["schema", "cell"])
def test_event_bound_to_schema_and_cell(over: dict[str, Any]) -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = ring_for(g, **over)
    with pytest.raises(DecryptionFailed):
        ring.open(g.seal(HB))


def test_event_bound_to_instance_id() -> None:
    # Same keys at two "instances": a message of one does not open as the other's.
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = GroupKeyRing(SCHEMA, CELL, OTHER_IID)
    ring.add(g.delivered())
    ev = g.seal(encode_heartbeat(Heartbeat(OTHER_IID, 1)))
    with pytest.raises(DecryptionFailed):
        ring.open(dataclasses.replace(ev, instance_id=OTHER_IID))


def test_event_bound_to_epoch_even_under_the_same_key() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    key = g.delivered()[0][1]
    ring = GroupKeyRing(SCHEMA, CELL, IID)
    ring.add([(1, key), (2, key)])
    ev = g.seal(HB)
    with pytest.raises(DecryptionFailed):
        ring.open(dataclasses.replace(ev, epoch=2))
    assert isinstance(ring.open(ev), Heartbeat)


def test_event_counter_bound() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = ring_for(g)
    ev = g.seal(HB)
    g.seal(HB)
    with pytest.raises(DecryptionFailed):
        ring.open(dataclasses.replace(ev, counter=2))


def test_event_inner_instance_must_match() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = ring_for(g)
    with pytest.raises(DecryptionFailed):
        ring.open(g.seal(encode_heartbeat(Heartbeat(OTHER_IID, 1))))


def test_an_event_must_hold_a_delta_or_heartbeat() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = ring_for(g)
    with pytest.raises(DecryptionFailed):
        ring.open(g.seal(encode_reply(1, "not an event")))


# --- group keys: nonces and rotation ----------------------------------------------------------


def test_group_counter_resets_only_with_a_new_key() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    used: set[tuple[bytes, int]] = set()
    epochs = [g.epoch]
    for round_ in range(6):
        key = g.delivered()[0][1].value
        for _ in range(5):
            ev = g.seal(HB)
            assert g.delivered()[0][1].value == key  # sealing never changes the key
            pair = (key, ev.counter)
            assert pair not in used
            used.add(pair)
        assert g.counter == 5
        g.rotate(exclude_next=round_ % 2 == 1)
        assert g.counter == 0
        assert g.delivered()[0][1].value != key
        epochs.append(g.epoch)
    assert epochs == sorted(set(epochs))


def test_rekey_epochs_strictly_increase_over_mixed_rotations() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    rekey_epochs: list[int] = []
    seen_current = {g.delivered()[0][1].value}
    for exclude in [False, True, True, False, False, True, False]:
        before = g.epoch
        epoch, keys = g.rotate(exclude_next=exclude)
        assert g.epoch == before + (2 if exclude else 1)
        assert epoch == g.epoch + 1
        assert [e for e, _ in keys] == ([g.epoch, g.epoch + 1] if exclude else [g.epoch + 1])
        rekey_epochs.append(epoch)
        cur = g.delivered()[0][1].value
        assert cur not in seen_current or not exclude  # periodic: the delivered next became current
        seen_current.add(cur)
    assert rekey_epochs == sorted(set(rekey_epochs))


def test_rekey_nonces_unique_per_session_over_rotations() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    c, s = make_pair(make_grant(group=g.delivered()))
    nonces = []
    for exclude in [False, True, False, True, True, False]:
        epoch, keys = g.rotate(exclude_next=exclude)
        sid, ct = s.wrap_group_keys(epoch, keys)
        nonces.append(nonce(REKEY, epoch))
        assert c.open_rekey(Rekey(IID, epoch, ((sid, ct),)))
        assert isinstance(c.group.open(g.seal(HB)), Heartbeat)
    assert len(set(nonces)) == len(nonces)


def test_periodic_rotation_loses_no_event_without_the_rekey() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = ring_for(g)
    assert isinstance(ring.open(g.seal(HB)), Heartbeat)
    g.rotate(exclude_next=False)  # the rekey never arrives
    ev = g.seal(HB)
    assert ev.epoch == 2
    assert isinstance(ring.open(ev), Heartbeat)


def test_revocation_rotation_locks_out_old_keys() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = ring_for(g)
    _, keys = g.rotate(exclude_next=True)
    for _ in range(3):
        ev = g.seal(HB)
        assert not ring.has(ev.epoch)
        with pytest.raises(DecryptionFailed):
            ring.open(ev)
    ring2 = ring_for(g)
    assert isinstance(ring2.open(g.seal(HB)), Heartbeat)
    fresh = GroupKeyRing(SCHEMA, CELL, IID)
    fresh.add(keys)
    assert isinstance(fresh.open(g.seal(HB)), Heartbeat)


def test_ring_keeps_only_the_newest_epochs() -> None:
    ring = GroupKeyRing(SCHEMA, CELL, IID)
    g = GroupKeys(SCHEMA, CELL, IID)
    ring.add(g.delivered())
    old = g.seal(HB)
    for _ in range(4):
        _, keys = g.rotate(exclude_next=False)
        ring.add(keys)
        assert len(ring.epochs) <= GROUP_KEYS_KEPT
    assert ring.epochs == [g.epoch + 1 - i for i in reversed(range(GROUP_KEYS_KEPT))]
    assert not ring.has(old.epoch)
    with pytest.raises(DecryptionFailed):
        ring.open(old)
    ring.add([(1, random_key())])  # an old epoch arriving late is not kept either
    assert ring.epochs == [g.epoch + 1 - i for i in reversed(range(GROUP_KEYS_KEPT))]


def test_ring_does_not_replace_a_key_it_holds() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    ring = ring_for(g)
    ring.add([(g.epoch, random_key())])
    assert isinstance(ring.open(g.seal(HB)), Heartbeat)


def test_group_keys_never_seal_past_the_limit() -> None:
    g = GroupKeys(SCHEMA, CELL, IID, max_messages=3)
    for _ in range(3):
        g.seal(HB)
    assert g.exhausted
    g.counter = MAX_MESSAGES_PER_KEY - 1
    assert g.seal(HB).counter == MAX_MESSAGES_PER_KEY
    with pytest.raises(SessionExhausted):
        g.seal(HB)
    g.rotate(exclude_next=False)
    assert not g.exhausted and g.seal(HB).counter == 1


# --- rekey ----------------------------------------------------------------------------------------


def test_rekey_delivers_only_to_its_session() -> None:
    g = GroupKeys(SCHEMA, CELL, IID)
    c1, s1 = make_pair(make_grant(group=g.delivered()))
    c2, _ = make_pair(make_grant(group=g.delivered()))
    epoch, keys = g.rotate(exclude_next=True)
    rk = Rekey(IID, epoch, (s1.wrap_group_keys(epoch, keys),))
    assert c1.open_rekey(rk)
    assert not c2.open_rekey(rk)
    ev = g.seal(HB)
    assert isinstance(c1.group.open(ev), Heartbeat)
    with pytest.raises(DecryptionFailed):
        c2.group.open(ev)


@pytest.mark.parametrize("over", [{"schema": "TSec::Other"}, {"cell": "Zone-B"}, {"instance_id": OTHER_IID}],
                         ids=["schema", "cell", "instance"])
def test_rekey_bound_to_schema_cell_instance(over: dict[str, Any]) -> None:
    grant, k = make_grant(), random_key()
    c, _ = make_pair(grant, k, client=over)
    _, s = make_pair(grant, k)
    g = GroupKeys(SCHEMA, CELL, IID)
    epoch, keys = g.rotate(exclude_next=False)
    rk = Rekey(over.get("instance_id", IID), epoch, (s.wrap_group_keys(epoch, keys),))
    assert not c.open_rekey(rk)
    assert not c.group.has(epoch)


def test_rekey_bound_to_epoch_and_session_id() -> None:
    grant, k = make_grant(), random_key()
    c1, s1 = make_pair(grant, k)
    twin = dataclasses.replace(grant, session_id=b"\x02" * 16)
    c2, _ = make_pair(twin, k)  # same K_sess, another session id
    g = GroupKeys(SCHEMA, CELL, IID)
    epoch, keys = g.rotate(exclude_next=False)
    sid, ct = s1.wrap_group_keys(epoch, keys)
    assert not c1.open_rekey(Rekey(IID, epoch + 1, ((sid, ct),)))
    assert not c2.open_rekey(Rekey(IID, epoch, ((twin.session_id, ct),)))
    assert c1.rejected == 1 and c2.rejected == 1
    tampered = ct[:-1] + bytes([ct[-1] ^ 0x80])
    assert not c1.open_rekey(Rekey(IID, epoch, ((sid, tampered),)))
    assert c1.open_rekey(Rekey(IID, epoch, ((sid, ct),)))
    assert c1.group.has(epoch)


def test_group_key_encoding_round_trip_and_garbage() -> None:
    keys = ((4, random_key()), (5, random_key()))
    back = decode_group_keys(encode_group_keys(keys))
    assert [(e, k.value) for e, k in back] == [(e, k.value) for e, k in keys]
    for bad in [b"", b"\xc1", b"\x91\x92\x01\xc4\x03abc", b"\x91\x92\xff\xc4\x10" + b"k" * 16]:
        with pytest.raises(DecryptionFailed):
            decode_group_keys(bad)


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
