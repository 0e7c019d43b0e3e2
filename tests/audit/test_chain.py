"""The audit chain: records link, hash and MAC as documented, and verify catches every
kind of tampering (edited, forged, inserted, deleted, reordered, replaced, truncated)
with the right first bad record and a reason naming it. One limit is pinned down too:
a tail cut after the newest checkpoint cannot be noticed."""

from __future__ import annotations

import hashlib
import hmac
import itertools
import pickle
import struct
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubicore.audit.chain import (
    ACTIONS,
    OUTCOMES,
    RECORD_FIELDS,
    ZERO,
    Chain,
    Checkpoint,
    Event,
    Record,
    record_hash,
    verify,
    verify_checkpoint,
)
from ubicore.audit.keys import AuditKeys

KEYS = AuditKeys.generate()
OTHER_KEYS = AuditKeys.generate()
T0 = 1_714_557_600.0
N = 200


def event(i: int, *, salt: str = "") -> Event:
    return Event(
        time=T0 + i * 1.25,
        host=f"h{i % 3}",
        cell="Site" if i % 2 else "Site/Floor1",
        schema="" if i % 5 == 0 else "Counter::Main",
        principal="default" if i % 7 == 0 else f"user{i % 4}",
        address="" if i % 11 == 0 else f"10.0.0.{i % 250}",
        action=ACTIONS[i % len(ACTIONS)],
        outcome=OUTCOMES[i % len(OUTCOMES)],
        detail=f"event {i}{salt} — ünïcode",
    )


def build(n: int = N, keys: AuditKeys = KEYS, *, salt: str = "") -> tuple[Chain, list[Record]]:
    chain = Chain(keys)
    records = [chain.append(event(i, salt=salt), f"Counter::Main@Site on host h{i % 3} as svc") for i in range(1, n + 1)]
    return chain, records


_CHAIN, TRAIL = build()


def trail() -> list[Record]:
    return list(TRAIL)


def assert_bad(verdict, first_bad, *words):  # type: ignore[no-untyped-def]
    assert not verdict.ok, verdict
    assert verdict.first_bad == first_bad, verdict
    assert "\n" not in verdict.reason
    for word in words:
        assert word in verdict.reason, verdict


# --- building -------------------------------------------------------------------------------------


def test_a_chain_of_200_records_verifies() -> None:
    verdict = verify(TRAIL, KEYS)
    assert verdict.ok and verdict.checked == N and verdict.first_bad is None
    assert "200 records verified" in verdict.reason and "no checkpoint" in verdict.reason


def test_records_are_numbered_linked_and_maced() -> None:
    assert [r.seq for r in TRAIL] == list(range(1, N + 1))
    assert TRAIL[0].prev == ZERO
    for before, after in itertools.pairwise(TRAIL):
        assert after.prev == before.hash
    for r in TRAIL:
        assert r.mac == hmac.new(KEYS.mac_key.value, r.hash, hashlib.sha256).digest()
    assert TRAIL[4].event == event(5)


def _lp(*parts: bytes) -> bytes:
    return b"".join(len(p).to_bytes(4, "big") + p for p in parts)


def test_the_hash_is_the_documented_encoding() -> None:
    r = TRAIL[41]
    texts = [getattr(r, name).encode() for name in ("host", "cell", "schema", "principal", "address", "action", "outcome", "detail", "origin")]
    expected = hashlib.sha256(
        _lp(b"ubicore-audit-v1", r.seq.to_bytes(8, "big"), struct.pack(">d", r.time), *texts, r.prev)
    ).digest()
    assert r.hash == expected == record_hash(r)


def test_field_boundaries_are_unambiguous() -> None:
    chain_a, chain_b = Chain(KEYS), Chain(KEYS)
    a = chain_a.append(replace(event(1), host="ab", cell="c"), "o")
    b = chain_b.append(replace(event(1), host="a", cell="bc"), "o")
    assert a.hash != b.hash


def test_a_resumed_chain_continues_the_trail() -> None:
    chain = Chain(KEYS, last_seq=TRAIL[99].seq, last_hash=TRAIL[99].hash)
    more = [chain.append(event(i, salt="resumed"), "o") for i in range(101, 131)]
    assert more[0].seq == 101 and more[0].prev == TRAIL[99].hash
    assert verify(TRAIL[:100] + more, KEYS).ok


def test_events_outside_the_vocabularies_are_refused() -> None:
    chain = Chain(KEYS)
    with pytest.raises(ValueError, match="action"):
        chain.append(replace(event(1), action="delete_everything"), "o")
    with pytest.raises(ValueError, match="outcome"):
        chain.append(replace(event(1), outcome="maybe"), "o")
    with pytest.raises(ValueError, match="time"):
        chain.append(replace(event(1), time=float("nan")), "o")
    with pytest.raises(ValueError, match="host"):
        chain.append(replace(event(1), host="\udcff"), "o")
    assert chain.last_seq == 0 and chain.last_hash == ZERO
    assert chain.append(event(1), "o").seq == 1


def test_long_details_are_cut_to_500_characters() -> None:
    e = replace(event(1), detail="x" * 600)
    assert len(e.detail) == 500 and e.detail.endswith("…")
    assert Event(T0, "h", "c", "", "u", "", "login", "ok", "y" * 500).detail == "y" * 500


def test_bad_resume_points_are_refused() -> None:
    with pytest.raises(ValueError):
        Chain(KEYS, last_seq=-1)
    with pytest.raises(ValueError):
        Chain(KEYS, last_seq=5, last_hash=b"short")
    with pytest.raises(ValueError):
        Chain(KEYS, last_seq=0, last_hash=TRAIL[0].hash)


# --- tampering ------------------------------------------------------------------------------------


def _edit(r: Record, field: str) -> Record:
    value = getattr(r, field)
    if field == "seq":
        new: object = value + 1
    elif field == "time":
        new = value + 0.001
    elif isinstance(value, bytes):
        new = bytes([value[0] ^ 0x01]) + value[1:]
    else:
        new = value + "!"
    return replace(r, **{field: new})


@pytest.mark.parametrize("field", RECORD_FIELDS)
@pytest.mark.parametrize("k", [1, 17, N])
def test_editing_any_field_of_any_record_is_caught(field: str, k: int) -> None:
    records = trail()
    records[k - 1] = _edit(records[k - 1], field)
    verdict = verify(records, KEYS)
    assert verdict.checked == k - 1
    if field == "mac":
        assert_bad(verdict, k, f"record {k}:", "MAC")
    else:
        assert_bad(verdict, k, f"record {k}: its contents do not match its hash (edited)")


def test_an_edit_with_its_hash_recomputed_without_the_key_is_caught_by_the_mac() -> None:
    records = trail()
    edited = replace(records[16], principal="administrator", outcome="ok")
    records[16] = replace(edited, hash=record_hash(edited))
    assert_bad(verify(records, KEYS), 17, "record 17:", "MAC", "forged")


def test_a_rewritten_tail_under_another_key_is_caught_by_the_mac() -> None:
    records = trail()
    forger = Chain(OTHER_KEYS, last_seq=records[149].seq, last_hash=records[149].hash)
    forged = [forger.append(event(i, salt="forged"), "o") for i in range(151, N + 1)]
    assert_bad(verify(records[:150] + forged, KEYS), 151, "MAC")


def test_an_inserted_forged_record_is_caught() -> None:
    records = trail()
    forged = Record(50, T0, "h1", "Site", "", "intruder", "", "login", "ok", "", "o", records[48].hash, ZERO, bytes(32))
    forged = replace(forged, hash=record_hash(forged))
    records.insert(49, forged)
    assert_bad(verify(records, KEYS), 50, "record 50:", "MAC")


def test_an_inserted_copy_of_a_genuine_record_is_caught() -> None:
    records = trail()
    records.insert(49, records[29])
    assert_bad(verify(records, KEYS), 50, "record 50: found record 30 again", "inserted")


@pytest.mark.parametrize("k", [1, 2, 100, N - 1])
def test_a_deleted_record_is_caught(k: int) -> None:
    records = trail()
    del records[k - 1]
    verdict = verify(records, KEYS)
    assert_bad(verdict, k, f"record {k} is missing", "deleted")
    assert verdict.checked == k - 1


def test_deleting_the_last_record_needs_a_checkpoint() -> None:
    cp = _CHAIN.checkpoint(T0 + 10_000)
    assert_bad(verify(TRAIL[:-1], KEYS, [cp]), N, f"ends at record {N - 1}", f"record {N}", "truncated")


def test_swapped_records_are_caught() -> None:
    records = trail()
    records[59], records[139] = records[139], records[59]
    assert_bad(verify(records, KEYS), 60, "record 60 is missing", "reordered")


def test_adjacent_swapped_records_are_caught() -> None:
    records = trail()
    records[9], records[10] = records[10], records[9]
    assert_bad(verify(records, KEYS), 10, "record 10 is missing", "reordered")


def test_reversed_records_are_caught() -> None:
    assert_bad(verify(list(reversed(TRAIL)), KEYS), 1, "record 1 is missing", f"begins at record {N}", "reordered")


def test_a_replaced_tail_is_caught_by_the_prev_chain() -> None:
    _, other = build(salt="other trail")  # same key, same numbering, another history
    records = TRAIL[:149] + other[149:]
    assert_bad(verify(records, KEYS), 150, "record 150 does not follow record 149", "replaced")


def test_a_trail_not_starting_from_zero_is_caught() -> None:
    _, other = build(3, salt="x")
    records = [replace(other[0], prev=TRAIL[0].hash)]
    records = [replace(records[0], hash=record_hash(records[0]))]
    records = [replace(records[0], mac=hmac.new(KEYS.mac_key.value, records[0].hash, hashlib.sha256).digest())]
    assert_bad(verify(records, KEYS), 1, "record 1 does not follow the start of the trail")


def test_malformed_records_are_reported_not_raised() -> None:
    records = trail()
    records[5] = replace(records[5], prev=records[5].prev[:31])
    assert_bad(verify(records, KEYS), 6, "record 6: malformed", "prev")
    records = trail()
    records[5] = replace(records[5], time=float("inf"))
    assert_bad(verify(records, KEYS), 6, "malformed", "time")
    records = trail()
    records[5] = replace(records[5], seq=True)
    assert_bad(verify(records, KEYS), 6, "malformed", "seq")
    assert_bad(verify([*TRAIL[:3], "not a record"], KEYS), 4, "malformed")  # type: ignore[list-item]


# --- checkpoints and truncation -------------------------------------------------------------------


def checkpoint_at(seq: int, records: list[Record] = TRAIL, keys: AuditKeys = KEYS) -> Checkpoint:
    chain = Chain(keys, last_seq=seq, last_hash=records[seq - 1].hash if seq else ZERO)
    return chain.checkpoint(T0 + seq * 1.25 + 0.5)


def test_checkpoints_sign_the_newest_record() -> None:
    cp = _CHAIN.checkpoint(T0 + 999.5)
    assert (cp.seq, cp.hash, cp.time) == (N, TRAIL[-1].hash, T0 + 999.5) and len(cp.signature) == 64
    assert verify_checkpoint(cp, KEYS.verify_key)
    assert not verify_checkpoint(cp, OTHER_KEYS.verify_key)
    for changed in (replace(cp, seq=N - 1), replace(cp, hash=TRAIL[0].hash), replace(cp, time=cp.time + 1)):
        assert not verify_checkpoint(changed, KEYS.verify_key)
    verdict = verify(TRAIL, KEYS, [cp])
    assert verdict.ok and "vouches for the last record" in verdict.reason


def test_a_truncated_tail_is_caught_by_a_checkpoint() -> None:
    cps = [checkpoint_at(100), checkpoint_at(195)]
    verdict = verify(TRAIL[:190], KEYS, cps)
    assert_bad(verdict, 191, "the trail ends at record 190 but checkpoint of 2024-05-01", "vouches for record 195 (truncated)")
    assert verdict.checked == 190


def test_a_truncated_tail_without_a_later_checkpoint_is_not_catchable() -> None:
    """The documented limit: records after the newest checkpoint can be cut unnoticed."""
    verdict = verify(TRAIL[:190], KEYS, [checkpoint_at(100), checkpoint_at(190)])
    assert verdict.ok and verdict.checked == 190
    verdict = verify(TRAIL[:190], KEYS, [checkpoint_at(100)])
    assert verdict.ok and "records after it are not covered" in verdict.reason


def test_a_truncated_and_regrown_trail_is_caught_by_the_checkpoint_hash() -> None:
    chain = Chain(KEYS, last_seq=150, last_hash=TRAIL[149].hash)
    regrown = TRAIL[:150] + [chain.append(event(i, salt="regrown"), "o") for i in range(151, N + 1)]
    assert verify(regrown, KEYS).ok  # on its own, a regrown trail is a valid trail
    verdict = verify(regrown, KEYS, [checkpoint_at(120), checkpoint_at(195)])
    assert_bad(verdict, 195, "record 195 is not the record checkpoint of", "truncated")


def test_an_emptied_trail_is_caught() -> None:
    assert_bad(verify([], KEYS, [checkpoint_at(5)]), 1, "the trail is empty but", "record 5 (truncated)")
    empty_cp = Chain(KEYS).checkpoint(T0)
    assert empty_cp.seq == 0 and empty_cp.hash == ZERO
    assert verify([], KEYS, [empty_cp]).ok


def test_a_checkpoint_with_a_flipped_signature_bit_is_caught() -> None:
    good, cp = checkpoint_at(100), checkpoint_at(195)
    flipped = replace(cp, signature=cp.signature[:10] + bytes([cp.signature[10] ^ 0x04]) + cp.signature[11:])
    verdict = verify(TRAIL, KEYS, [good, flipped])
    assert_bad(verdict, None, "checkpoint 2: bad signature")


def test_a_checkpoint_from_another_key_is_caught_and_not_trusted() -> None:
    foreign = checkpoint_at(N, keys=OTHER_KEYS)
    assert_bad(verify(TRAIL, KEYS, [foreign]), None, "checkpoint 1: bad signature")
    # nor does a forged checkpoint make a genuine trail look truncated or rewritten
    forged = replace(checkpoint_at(N, keys=OTHER_KEYS), seq=N + 50)
    assert "bad signature" in verify(TRAIL, KEYS, [forged]).reason


def test_a_record_problem_is_reported_before_a_checkpoint_problem() -> None:
    records = trail()
    del records[9]
    bad_cp = replace(checkpoint_at(50), signature=bytes(64))
    assert_bad(verify(records, KEYS, [bad_cp]), 10, "record 10 is missing")


def test_verify_key_only_checks_the_chain_and_checkpoints_but_not_macs() -> None:
    verdict = verify(TRAIL, KEYS.verify_key, [checkpoint_at(N)])
    assert verdict.ok and "MACs not checked" in verdict.reason
    records = trail()
    records[16] = _edit(records[16], "detail")
    assert_bad(verify(records, KEYS.verify_key), 17, "edited")
    assert_bad(verify(TRAIL[:190], KEYS.verify_key, [checkpoint_at(195)]), 191, "truncated")


def test_verify_continues_from_a_checked_point() -> None:
    assert verify(TRAIL[100:], KEYS, after_seq=100, after_hash=TRAIL[99].hash).ok
    assert_bad(verify(TRAIL[101:], KEYS, after_seq=100, after_hash=TRAIL[99].hash), 101, "record 101 is missing")


def test_verify_consumes_an_iterator_once() -> None:
    assert verify(iter(TRAIL), KEYS, [checkpoint_at(N)]).ok


# --- secrets ----------------------------------------------------------------------------------


def test_no_secret_shows_in_reprs_or_verdicts() -> None:
    secrets = [KEYS.mac_key.value, KEYS.signing_seed.value]
    cp = _CHAIN.checkpoint(T0)
    shown = [repr(KEYS), str(KEYS), repr(_CHAIN), str(_CHAIN), repr(TRAIL[0]), repr(cp), repr(verify(TRAIL, KEYS))]
    shown += [repr(KEYS.mac_key), str(KEYS.signing_seed)]
    for text in shown:
        for secret in secrets:
            assert secret.hex() not in text and repr(secret) not in text and str(secret) not in text
    with pytest.raises(TypeError):
        pickle.dumps(KEYS)


# --- property -------------------------------------------------------------------------------------

_text = st.text(max_size=12)
events = st.builds(
    Event,
    time=st.floats(min_value=-1e12, max_value=1e12, allow_nan=False),
    host=_text,
    cell=_text,
    schema=_text,
    principal=_text,
    address=_text,
    action=st.sampled_from(ACTIONS),
    outcome=st.sampled_from(OUTCOMES),
    detail=st.text(max_size=40),
)


def _mutate(r: Record, field: str, position: int, xor: int) -> Record:
    """Change one byte of the field's encoding (insert one if the field is empty)."""
    value = getattr(r, field)
    if field == "seq":
        raw = value.to_bytes(8, "big")
    elif field == "time":
        raw = struct.pack(">d", value)
    elif isinstance(value, str):
        raw = value.encode()
    else:
        raw = value
    if raw:
        i = position % len(raw)
        raw = raw[:i] + bytes([raw[i] ^ xor]) + raw[i + 1 :]
    else:
        raw = bytes([xor])
    if field == "seq":
        new: object = int.from_bytes(raw, "big")
    elif field == "time":
        new = struct.unpack(">d", raw)[0]
    elif isinstance(value, str):
        new = raw.decode("utf-8", "surrogateescape")
    else:
        new = raw
    return replace(r, **{field: new})


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    evs=st.lists(events, min_size=1, max_size=8),
    origin=_text,
    data=st.data(),
)
def test_any_single_byte_mutation_of_any_record_is_caught(evs: list[Event], origin: str, data: st.DataObject) -> None:
    chain = Chain(KEYS)
    records = [chain.append(e, origin) for e in evs]
    assert verify(records, KEYS).ok
    k = data.draw(st.integers(0, len(records) - 1), label="record")
    field = data.draw(st.sampled_from(RECORD_FIELDS), label="field")
    position = data.draw(st.integers(0, 2**16), label="position")
    xor = data.draw(st.integers(1, 255), label="xor")
    records[k] = _mutate(records[k], field, position, xor)
    verdict = verify(records, KEYS)
    assert not verdict.ok and verdict.first_bad == k + 1, verdict
