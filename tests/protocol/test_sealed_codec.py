"""The sealed message kinds of the codec (0x04 sealed request, 0x05 sealed reply, 0x13
sealed event, 0x14 rekey): round trips, and every parser answering any bytes with a
record or :class:`ProtocolError`, never another exception."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubicore.errors import ProtocolError
from ubicore.protocol.codec import (
    HEADER_REKEY,
    HEADER_SEALED_EVENT,
    HEADER_SEALED_REPLY,
    HEADER_SEALED_REQUEST,
    encode_rekey,
    encode_sealed_event,
    encode_sealed_reply,
    encode_sealed_request,
    pack,
    parse_channel_message,
    parse_client_message,
    parse_inner_event,
    parse_inner_reply,
    parse_request_body,
    parse_server_message,
    unpack,
)
from ubicore.protocol.messages import (
    INSTANCE_ID_BYTES,
    MAGIC,
    PROTOCOL_VERSION,
    SESSION_ID_BYTES,
    Kind,
    Rekey,
    Request,
    Sealed,
    SealedEvent,
)

PROPERTY = settings(deadline=None, max_examples=150, database=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=300, database=None, suppress_health_check=[HealthCheck.too_slow])

SEALED_HEADERS = [HEADER_SEALED_REQUEST, HEADER_SEALED_REPLY, HEADER_SEALED_EVENT, HEADER_REKEY]
PARSERS: list[Callable[[Sequence[bytes]], Any]] = [parse_channel_message, parse_client_message, parse_server_message]

uint64 = st.integers(0, 2**64 - 1)
session_ids = st.binary(min_size=SESSION_ID_BYTES, max_size=SESSION_ID_BYTES)
instance_ids = st.binary(min_size=INSTANCE_ID_BYTES, max_size=INSTANCE_ID_BYTES)
ciphertexts = st.binary(max_size=300)
sealeds = st.builds(Sealed, session_ids, uint64, uint64, ciphertexts)
sealed_events = st.builds(SealedEvent, instance_ids, uint64, uint64, ciphertexts)
rekeys = st.builds(Rekey, instance_ids, uint64,
                   st.lists(st.tuples(session_ids, ciphertexts), max_size=6).map(tuple))
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(allow_nan=False),
                    st.text(max_size=8), st.binary(max_size=20))
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                      | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), inner, max_size=3),
                      max_leaves=10)
# bytes of the right length for an id show up often, so the deeper checks are reached
id_like = st.one_of(session_ids, instance_ids, st.binary(min_size=15, max_size=17), values)


def check_every_parser(frames: list[bytes]) -> None:
    for parse in PARSERS:
        try:
            msg = parse(frames)
        except ProtocolError:
            continue
        assert msg is not None


# --- round trips ----------------------------------------------------------------------------------


@PROPERTY
@given(sealeds)
def test_sealed_request_round_trip(msg: Sealed) -> None:
    frames = encode_sealed_request(msg)
    assert frames[0] == MAGIC + bytes((PROTOCOL_VERSION, Kind.SEALED_REQUEST))
    assert parse_client_message(frames) == msg
    with pytest.raises(ProtocolError):
        parse_server_message(frames)  # a request is not a reply
    with pytest.raises(ProtocolError):
        parse_channel_message(frames)


@PROPERTY
@given(sealeds)
def test_sealed_reply_round_trip(msg: Sealed) -> None:
    frames = encode_sealed_reply(msg)
    assert frames[0] == MAGIC + bytes((PROTOCOL_VERSION, Kind.SEALED_REPLY))
    assert parse_server_message(frames) == msg
    with pytest.raises(ProtocolError):
        parse_client_message(frames)
    with pytest.raises(ProtocolError):
        parse_channel_message(frames)


@PROPERTY
@given(sealed_events)
def test_sealed_event_round_trip(msg: SealedEvent) -> None:
    frames = encode_sealed_event(msg)
    assert frames[0] == MAGIC + bytes((PROTOCOL_VERSION, Kind.SEALED_EVENT))
    assert parse_channel_message(frames) == msg
    for parse in (parse_client_message, parse_server_message):
        with pytest.raises(ProtocolError):
            parse(frames)


@PROPERTY
@given(rekeys)
def test_rekey_round_trip(msg: Rekey) -> None:
    frames = encode_rekey(msg)
    assert frames[0] == MAGIC + bytes((PROTOCOL_VERSION, Kind.REKEY))
    back = parse_channel_message(frames)
    assert back == msg and isinstance(back, Rekey) and type(back.entries) is tuple
    for parse in (parse_client_message, parse_server_message):
        with pytest.raises(ProtocolError):
            parse(frames)


def test_sealed_bodies_are_the_documented_arrays() -> None:
    s = Sealed(b"s" * 16, 3, 9, b"ct")
    assert unpack(encode_sealed_request(s)[1]) == [b"s" * 16, 3, 9, b"ct"]
    e = SealedEvent(b"i" * 16, 2, 5, b"ct")
    assert unpack(encode_sealed_event(e)[1]) == [b"i" * 16, 2, 5, b"ct"]
    r = Rekey(b"i" * 16, 4, ((b"s" * 16, b"w"),))
    assert unpack(encode_rekey(r)[1]) == [b"i" * 16, 4, [[b"s" * 16, b"w"]]]


# --- field checks ---------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [
    [b"s" * 15, 1, 1, b"c"], [b"s" * 17, 1, 1, b"c"], ["s" * 16, 1, 1, b"c"], [b"s" * 16, -1, 1, b"c"],
    [b"s" * 16, 1, -(2**63), b"c"], [b"s" * 16, 1.0, 1, b"c"], [b"s" * 16, True, 1, b"c"], [b"s" * 16, 1, 1, "c"],
    [b"s" * 16, 1, 1], [b"s" * 16, 1, 1, b"c", b"x"], {"a": 1}, None,
])
@pytest.mark.parametrize("header", [HEADER_SEALED_REQUEST, HEADER_SEALED_REPLY], ids=["request", "reply"])
def test_bad_sealed_rpc_bodies(header: bytes, body: Any) -> None:
    parse = parse_client_message if header == HEADER_SEALED_REQUEST else parse_server_message
    with pytest.raises(ProtocolError):
        parse([header, pack(body)])


@pytest.mark.parametrize("body", [
    [b"i" * 15, 1, 1, b"c"], [b"i" * 16, -1, 1, b"c"], [b"i" * 16, 1, "1", b"c"], [b"i" * 16, 1, 1, None],
    [b"i" * 16, 1, 1], (), 7,
])
def test_bad_sealed_event_bodies(body: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_channel_message([HEADER_SEALED_EVENT, pack(body)])


@pytest.mark.parametrize("body", [
    [b"i" * 16, 1, {}], [b"i" * 16, 1, b"entries"], [b"i" * 16, 1, [[b"s" * 16]]],
    [b"i" * 16, 1, [[b"s" * 15, b"c"]]], [b"i" * 16, 1, [[b"s" * 16, "c"]]], [b"i" * 16, 1, [b"s" * 16]],
    [b"i" * 16, 1, [[b"s" * 16, b"c", b"x"]]], [b"i" * 16, -3, []], [b"i" * 16, 1], [b"i" * 3, 1, []],
])
def test_bad_rekey_bodies(body: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_channel_message([HEADER_REKEY, pack(body)])


def test_rekey_with_no_entries_is_well_formed() -> None:
    assert parse_channel_message(encode_rekey(Rekey(b"i" * 16, 1, ()))) == Rekey(b"i" * 16, 1, ())


# --- fuzzing --------------------------------------------------------------------------------------


@FUZZ
@given(st.sampled_from(SEALED_HEADERS), st.binary(max_size=200))
def test_sealed_header_random_body(header: bytes, body: bytes) -> None:
    check_every_parser([header, body])


@FUZZ
@given(st.sampled_from(SEALED_HEADERS), st.lists(st.one_of(id_like, uint64, values), max_size=6))
def test_sealed_header_array_body_of_random_shape(header: bytes, body: list[Any]) -> None:
    check_every_parser([header, pack(body)])


@FUZZ
@given(st.sampled_from(SEALED_HEADERS), instance_ids, uint64,
       st.lists(st.one_of(st.lists(id_like, max_size=3), id_like), max_size=4))
def test_rekey_like_bodies(header: bytes, iid: bytes, epoch: int, entries: list[Any]) -> None:
    check_every_parser([header, pack([iid, epoch, entries])])


@FUZZ
@given(st.one_of(sealeds.map(encode_sealed_request), sealeds.map(encode_sealed_reply),
                 sealed_events.map(encode_sealed_event), rekeys.map(encode_rekey)), st.data())
def test_mutated_sealed_messages(frames: list[bytes], data: st.DataObject) -> None:
    body = bytearray(frames[1])
    for _ in range(data.draw(st.integers(0, 4), label="flips")):
        bit = data.draw(st.integers(0, len(body) * 8 - 1), label="bit")
        body[bit // 8] ^= 1 << (bit % 8)
    cut = data.draw(st.integers(0, len(body)), label="truncate to")
    header = data.draw(st.sampled_from([frames[0], *SEALED_HEADERS]), label="header")
    check_every_parser([header, bytes(body[:cut])])


@FUZZ
@given(st.lists(st.binary(max_size=40), max_size=4), st.sampled_from(SEALED_HEADERS))
def test_sealed_header_in_any_frame_list(frames: list[bytes], header: bytes) -> None:
    check_every_parser([header, *frames])
    check_every_parser([*frames, header])


@FUZZ
@given(st.binary(max_size=200))
def test_inner_payload_parsers(data: bytes) -> None:
    """What a sealed message holds, once opened: reply, event or request body."""
    for parse in (parse_inner_reply, parse_inner_event, parse_request_body):
        try:
            parse(data)
        except ProtocolError:
            pass


@FUZZ
@given(st.sampled_from([0x01, 0x02, 0x03, 0x10, 0x11, 0x12, 0x13, 0x14, 0x04, 0x05, 0x00, 0xFF]),
       st.lists(values, max_size=5))
def test_inner_payloads_of_any_kind(kind: int, body: list[Any]) -> None:
    data = bytes([kind]) + pack(body)
    for parse in (parse_inner_reply, parse_inner_event):
        try:
            parse(data)
        except ProtocolError:
            pass


def test_inner_reply_refuses_an_event_and_vice_versa() -> None:
    with pytest.raises(ProtocolError):
        parse_inner_reply(bytes([Kind.HEARTBEAT]) + pack([b"i" * 16, 1]))
    with pytest.raises(ProtocolError):
        parse_inner_event(bytes([Kind.REPLY]) + pack([1, None]))
    with pytest.raises(ProtocolError):
        parse_inner_event(b"")
    with pytest.raises(ProtocolError):
        parse_inner_reply(b"")


def test_request_body_is_what_a_sealed_request_carries() -> None:
    from ubicore.protocol.codec import request_body

    r = Request(3, "A::B", "c", "op", {"x": [1, b"2"]}, 50)
    assert parse_request_body(request_body(r)) == r
