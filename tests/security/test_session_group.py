"""Session crypto for the event channel (ubicore/security/session.py), sans-IO: sealed events
and their associated data, group keys and their rotation (periodic and revoking), the
client's key ring, and rekeys delivered to one session each.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from ubicore.errors import DecryptionFailed
from ubicore.protocol.codec import encode_heartbeat, encode_reply
from ubicore.protocol.messages import Delta, Heartbeat, Rekey
from ubicore.security.primitives import random_key
from ubicore.security.session import (
    GROUP_KEYS_KEPT,
    MAX_MESSAGES_PER_KEY,
    GroupKeyRing,
    GroupKeys,
    SessionExhausted,
    decode_group_keys,
    encode_group_keys,
)

from .session_support import (
    CELL,
    DELTA,
    HB,
    IID,
    OTHER_IID,
    REKEY,
    SCHEMA,
    make_grant,
    make_pair,
    nonce,
    ring_for,
)

# --- events ---------------------------------------------------------------------------------------


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
