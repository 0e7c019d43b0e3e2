"""The wire codec: every record survives a round trip, and every parser answers any
input with a record or :class:`ProtocolError`, never any other exception."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubicore.errors import ProtocolError
from ubicore.protocol import codec
from ubicore.protocol.codec import (
    HEADER_DELTA,
    HEADER_ERROR,
    HEADER_HEARTBEAT,
    HEADER_REPLY,
    HEADER_REQUEST,
    MAX_FRAME_BYTES,
    encode_delta,
    encode_delta_batches,
    encode_error,
    encode_heartbeat,
    encode_reply,
    encode_request,
    pack,
    parse_channel_message,
    parse_header,
    parse_request,
    parse_server_message,
    unpack,
)
from ubicore.protocol.messages import (
    INSTANCE_ID_BYTES,
    Change,
    Delta,
    ErrorReply,
    Heartbeat,
    Kind,
    Reply,
    Request,
    Welcome,
)

PROPERTY = settings(deadline=None, max_examples=150, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

HEADERS = [HEADER_REQUEST, HEADER_REPLY, HEADER_ERROR, HEADER_DELTA, HEADER_HEARTBEAT]
IID = bytes(range(INSTANCE_ID_BYTES))

# --- strategies ---------------------------------------------------------------------------

uint64 = st.integers(0, 2**64 - 1)
names = st.text(max_size=16)
instance_ids = st.binary(min_size=INSTANCE_ID_BYTES, max_size=INSTANCE_ID_BYTES)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=16),
    st.binary(max_size=16),
)
# What msgpack gives back unchanged: arrays come back as lists, maps with str keys.
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
arg_maps = st.dictionaries(st.text(max_size=12), values, max_size=5)
changes = st.builds(Change, names, st.integers(1, 3), st.lists(scalars, max_size=5).map(tuple))
batches = st.lists(st.lists(changes, max_size=4).map(tuple), min_size=1, max_size=4).map(tuple)

requests = st.builds(Request, uint64, names, names, names, arg_maps, uint64)
replies = st.builds(Reply, uint64, values)
error_replies = st.builds(ErrorReply, uint64, names, names, arg_maps)
deltas = st.builds(Delta, instance_ids, uint64, batches)
heartbeats = st.builds(Heartbeat, instance_ids, uint64)


def encode_any(msg: Request | Reply | ErrorReply | Delta | Heartbeat) -> list[bytes]:
    match msg:
        case Request():
            return encode_request(msg)
        case Reply(corr_id=corr, result=result):
            return encode_reply(corr, result)
        case ErrorReply(corr_id=corr, code=code, message=message, detail=detail):
            return encode_error(corr, code, message, detail)
        case Delta():
            return encode_delta(msg)
        case Heartbeat():
            return encode_heartbeat(msg)
    raise AssertionError(msg)


valid_frames = st.one_of(requests, replies, error_replies, deltas, heartbeats).map(encode_any)

# --- round trips ----------------------------------------------------------------------------


@PROPERTY
@given(requests)
def test_request_round_trip(req: Request) -> None:
    assert parse_request(encode_request(req)) == req


@PROPERTY
@given(replies)
def test_reply_round_trip(rep: Reply) -> None:
    assert parse_server_message(encode_reply(rep.corr_id, rep.result)) == rep


@PROPERTY
@given(error_replies)
def test_error_reply_round_trip(err: ErrorReply) -> None:
    assert parse_server_message(encode_error(err.corr_id, err.code, err.message, err.detail)) == err


@PROPERTY
@given(deltas)
def test_delta_round_trip(delta: Delta) -> None:
    parsed = parse_channel_message(encode_delta(delta))
    assert parsed == delta
    assert isinstance(parsed, Delta) and parsed.last_seq == delta.last_seq


@PROPERTY
@given(instance_ids, uint64, batches)
def test_delta_batches_as_lists_round_trip(iid: bytes, first: int, bs: tuple[tuple[Change, ...], ...]) -> None:
    """The sequencer hands the publisher lists of tuples; they parse to the same Delta."""
    frames = encode_delta_batches(iid, first, [list(b) for b in bs])
    assert parse_channel_message(frames) == Delta(iid, first, bs)


@PROPERTY
@given(heartbeats)
def test_heartbeat_round_trip(hb: Heartbeat) -> None:
    assert parse_channel_message(encode_heartbeat(hb)) == hb


@pytest.mark.parametrize("kind", list(Kind))
def test_header_round_trip(kind: Kind) -> None:
    header = codec._HEADERS[kind]
    assert header == b"UB" + bytes((1, kind))
    assert parse_header(header) is kind


def test_change_ops_travel_as_plain_ints() -> None:
    from ubicore.protocol.messages import Op

    delta = Delta(IID, 1, ((Change("r", Op.DELETE, ("k",)),),))
    (batch,) = parse_channel_message(encode_delta(delta)).batches  # type: ignore[union-attr]
    assert batch == (Change("r", 3, ("k",)),)
    assert type(batch[0].op) is int


def test_pack_refuses_values_that_cannot_travel() -> None:
    for bad in (object(), 2**64, {1j: 1}):
        with pytest.raises(ValueError):
            pack(bad)


# --- any input: a record or ProtocolError ---------------------------------------------------

PARSERS: list[tuple[Callable[[Sequence[bytes]], object], tuple[type, ...]]] = [
    (parse_request, (Request,)),
    (parse_server_message, (Reply, ErrorReply)),
    (parse_channel_message, (Delta, Heartbeat, Welcome)),
]


def check_every_parser(frames: list[bytes]) -> None:
    """Each parser gives a record of its union or ProtocolError; any other exception
    escapes and fails the test."""
    for parse, record_types in PARSERS:
        try:
            msg = parse(frames)
        except ProtocolError:
            continue
        assert isinstance(msg, record_types)
    for frame in frames:
        try:
            assert isinstance(parse_header(frame), Kind)
        except ProtocolError:
            pass
        try:
            unpack(frame)
        except ProtocolError:
            pass


@FUZZ
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_any_frames(frames: list[bytes]) -> None:
    check_every_parser(frames)


@FUZZ
@given(st.sampled_from(HEADERS), st.binary(max_size=128))
def test_valid_header_random_body(header: bytes, body: bytes) -> None:
    check_every_parser([header, body])


@FUZZ
@given(st.sampled_from(HEADERS), st.lists(values, max_size=7))
def test_valid_header_well_formed_body_of_random_shape(header: bytes, body: list[Any]) -> None:
    check_every_parser([header, pack(body)])


@FUZZ
@given(valid_frames, st.data())
def test_valid_header_mutated_valid_body(frames: list[bytes], data: st.DataObject) -> None:
    body = bytearray(frames[1])
    for _ in range(data.draw(st.integers(0, 4), label="flips")):
        bit = data.draw(st.integers(0, len(body) * 8 - 1), label="bit")
        body[bit // 8] ^= 1 << (bit % 8)
    cut = data.draw(st.integers(0, len(body)), label="truncate to")
    header = data.draw(st.sampled_from([frames[0], *HEADERS]), label="header")
    check_every_parser([header, bytes(body[:cut])])


wild_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3)
    | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def node_paths(value: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every place inside a body where a value sits (array items and map values)."""
    out = [path]
    if isinstance(value, list):
        for i, item in enumerate(value):
            out += node_paths(item, (*path, i))
    elif isinstance(value, dict):
        for k, item in value.items():
            out += node_paths(item, (*path, k))
    return out


@FUZZ
@given(valid_frames, st.data())
def test_valid_header_body_with_one_node_replaced(frames: list[bytes], data: st.DataObject) -> None:
    """Well-formed msgpack of almost the right shape reaches every field check."""
    body = unpack(frames[1])
    path = data.draw(st.sampled_from(node_paths(body)[1:]), label="path")
    node = body
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = data.draw(wild_values, label="replacement")
    check_every_parser([frames[0], pack(body)])


@FUZZ
@given(st.binary(max_size=8))
def test_any_header_frame(frame: bytes) -> None:
    try:
        kind = parse_header(frame)
    except ProtocolError:
        assert frame not in HEADERS
    else:
        assert frame == b"UB\x01" + bytes((kind,))


# --- specific malformations -----------------------------------------------------------------

REQ = Request(7, "A::B", "Site", "op", {"x": 1}, 500)
REQ_BODY = [7, "A::B", "Site", "op", {"x": 1}, 500]
DELTA_BODY = [IID, 1, [[["r", 1, [1, "a"]]]]]


def req(body: Any) -> Request:
    return parse_request([HEADER_REQUEST, pack(body)])


def delta(body: Any) -> object:
    return parse_channel_message([HEADER_DELTA, pack(body)])


@pytest.mark.parametrize(
    "header",
    [b"XB\x01\x01", b"ub\x01\x01", b"UB\x02\x01", b"UB\x00\x01", b"UB\x01\x7f", b"UB\x01\x00", b"UB\x01", b"UB\x01\x01\x00", b""],
    ids=["magic", "magic-case", "version-2", "version-0", "kind-7f", "kind-0", "short", "long", "empty"],
)
def test_bad_header(header: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_header(header)
    with pytest.raises(ProtocolError):
        parse_request([header, pack(REQ_BODY)])


def test_header_errors_say_what_is_wrong() -> None:
    with pytest.raises(ProtocolError, match="version 2"):
        parse_header(b"UB\x02\x01")
    with pytest.raises(ProtocolError, match="0x7f"):
        parse_header(b"UB\x01\x7f")


@pytest.mark.parametrize("n", [0, 1, 3, 4])
def test_wrong_frame_count(n: int) -> None:
    frames = [*encode_request(REQ), b"", b""][:n]
    for parse, _ in PARSERS:
        with pytest.raises(ProtocolError, match="2 frames"):
            parse(frames)


def test_a_message_of_another_direction_is_refused() -> None:
    with pytest.raises(ProtocolError):
        parse_request(encode_reply(1, None))
    with pytest.raises(ProtocolError):
        parse_server_message(encode_request(REQ))
    with pytest.raises(ProtocolError):
        parse_server_message(encode_heartbeat(Heartbeat(IID, 1)))
    with pytest.raises(ProtocolError):
        parse_channel_message(encode_request(REQ))


def test_oversized_body_is_refused_before_unpacking() -> None:
    huge = bytes(MAX_FRAME_BYTES + 1)  # zero pages: cheap to make, never read
    with pytest.raises(ProtocolError, match="exceeds"):
        unpack(huge)
    for (parse, _), header in zip(PARSERS, (HEADER_REQUEST, HEADER_REPLY, HEADER_DELTA)):
        with pytest.raises(ProtocolError, match="exceeds"):
            parse([header, huge])


def test_body_at_the_limit_is_unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    body = pack(REQ_BODY)
    monkeypatch.setattr(codec, "MAX_FRAME_BYTES", len(body))
    assert parse_request([HEADER_REQUEST, body]) == REQ
    monkeypatch.setattr(codec, "MAX_FRAME_BYTES", len(body) - 1)
    with pytest.raises(ProtocolError, match="exceeds"):
        parse_request([HEADER_REQUEST, body])


@pytest.mark.parametrize("body", [b"", b"\xc1", b"\x96\x07", pack(REQ_BODY) + b"\x00", b"\x81\x01\x02", b"\xa2\xff\xfe"])
def test_malformed_msgpack(body: bytes) -> None:
    """Empty, reserved byte, truncated, trailing data, int map key, invalid UTF-8."""
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        unpack(body)
    with pytest.raises(ProtocolError):
        parse_request([HEADER_REQUEST, body])


@pytest.mark.parametrize("body", [{"a": 1}, 5, "x", None, b"\x00", True, 1.5])
def test_non_array_body(body: Any) -> None:
    for header in HEADERS:
        for parse, _ in PARSERS:
            with pytest.raises(ProtocolError):
                parse([header, pack(body)])


@pytest.mark.parametrize(
    ("header", "arity"), [(HEADER_REQUEST, 6), (HEADER_REPLY, 2), (HEADER_ERROR, 4), (HEADER_DELTA, 3), (HEADER_HEARTBEAT, 2)]
)
def test_wrong_arity(header: bytes, arity: int) -> None:
    for n in (0, arity - 1, arity + 1):
        frames = [header, pack([0] * n)]
        for parse, _ in PARSERS:
            with pytest.raises(ProtocolError):
                parse(frames)


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (0, -1), (0, True), (0, 1.0), (0, "7"), (0, None),
        (1, b"A::B"), (1, 1), (2, None), (3, ["op"]),
        (4, [["x", 1]]), (4, None), (4, {b"x": 1}), (4, {"x": 1, b"y": 2}),
        (5, -1), (5, False), (5, 0.5),
    ],
)  # fmt: skip
def test_request_field_types(index: int, value: Any) -> None:
    body = list(REQ_BODY)
    body[index] = value
    with pytest.raises(ProtocolError):
        req(body)


def test_request_extremes() -> None:
    assert req([0, "", "", "", {}, 0]) == Request(0, "", "", "", {}, 0)
    top = 2**64 - 1
    assert req([top, "s", "c", "o", {}, top]).corr_id == top


@pytest.mark.parametrize(
    "body",
    [
        [-1, None], [True, None], [1.0, None],
        [-1, "c", "m", {}], [False, "c", "m", {}], [1, 2, "m", {}], [1, "c", None, {}],
        [1, "c", "m", []], [1, "c", "m", {b"groups": []}],
    ],
)  # fmt: skip
def test_server_message_field_types(body: list[Any]) -> None:
    header = HEADER_REPLY if len(body) == 2 else HEADER_ERROR
    with pytest.raises(ProtocolError):
        parse_server_message([header, pack(body)])


def test_reply_result_is_anything_msgpack_carries() -> None:
    for result in (None, True, -5, [1, [2]], {"k": b"v"}, {b"bytes": "keys"}):
        assert parse_server_message(encode_reply(3, result)) == Reply(3, result)


@pytest.mark.parametrize(
    "body",
    [
        [IID[:-1], 1, DELTA_BODY[2]], [IID + b"\x00", 1, DELTA_BODY[2]], [b"", 1, DELTA_BODY[2]],
        [IID.hex(), 1, DELTA_BODY[2]], [None, 1, DELTA_BODY[2]],
        [IID, -1, DELTA_BODY[2]], [IID, True, DELTA_BODY[2]], [IID, 1.0, DELTA_BODY[2]],
        [IID, 1, []], [IID, 1, None], [IID, 1, {"r": 1}], [IID, 1, ["batch"]], [IID, 1, [{}]],
        [IID, 1, [[["r", 0, [1]]]]], [IID, 1, [[["r", 4, [1]]]]], [IID, 1, [[["r", -1, [1]]]]],
        [IID, 1, [[["r", True, [1]]]]], [IID, 1, [[["r", 1.0, [1]]]]], [IID, 1, [[["r", "1", [1]]]]],
        [IID, 1, [[[b"r", 1, [1]]]]], [IID, 1, [[[None, 1, [1]]]]],
        [IID, 1, [[["r", 1, 1]]]], [IID, 1, [[["r", 1, {"k": 1}]]]], [IID, 1, [[["r", 1, None]]]],
        [IID, 1, [[["r", 1]]]], [IID, 1, [[["r", 1, [1], 0]]]], [IID, 1, [["r"]]],
        [IID, 1, [[["r", 1, [1]]], [["r", 9, [1]]]]],
    ],
)  # fmt: skip
def test_delta_field_types(body: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        delta(body)


@pytest.mark.parametrize(
    "body", [[IID[:15], 1], [IID * 2, 1], ["x" * 16, 1], [IID, -1], [IID, True], [IID, 2.0], [IID, None]]
)
def test_heartbeat_field_types(body: list[Any]) -> None:
    with pytest.raises(ProtocolError):
        parse_channel_message([HEADER_HEARTBEAT, pack(body)])


def test_delta_with_every_op_parses() -> None:
    body = [IID, 5, [[["r", 1, [1, "a"]], ["r", 2, [1, "b"]]], [["r", 3, [1]]]]]
    parsed = delta(body)
    assert parsed == Delta(IID, 5, ((Change("r", 1, (1, "a")), Change("r", 2, (1, "b"))), (Change("r", 3, (1,)),)))
    assert isinstance(parsed, Delta) and parsed.last_seq == 6
    assert delta([IID, 1, [[]]]) == Delta(IID, 1, ((),))  # an empty batch is accepted (protocol.md §5)


def test_bytes_like_frames_are_accepted() -> None:
    """Zero-copy frames (buffers) parse like bytes."""
    frames = encode_request(REQ)
    assert parse_request([bytearray(frames[0]), memoryview(frames[1])]) == REQ  # type: ignore[list-item]


def test_raw_msgpack_from_another_client_parses() -> None:
    """A client in another language packs with its own library; only the shape matters."""
    body = msgpack.packb([7, "A::B", "Site", "op", {"x": 1}, 500], use_bin_type=True)
    assert parse_request([b"UB\x01\x01", body]) == REQ


def test_welcome_is_a_lone_header_frame() -> None:
    from ubicore.protocol.codec import HEADER_WELCOME

    assert parse_channel_message([HEADER_WELCOME]) == Welcome()
    for frames in ([HEADER_WELCOME, b""], [HEADER_WELCOME, pack([])], [HEADER_WELCOME + b"x"]):
        with pytest.raises(ProtocolError):
            parse_channel_message(frames)


def test_msgpack_ext_types_are_not_part_of_the_protocol() -> None:
    import msgpack

    body = msgpack.packb([1, "S::S", "c", "op", {"x": msgpack.ExtType(5, b"\x00")}, 0], use_bin_type=True)
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        parse_request([HEADER_REQUEST, body])
    delta = msgpack.packb([IID, 1, [[["r", 1, [msgpack.ExtType(1, b"")]]]]], use_bin_type=True)
    with pytest.raises(ProtocolError, match="malformed msgpack"):
        parse_channel_message([HEADER_DELTA, delta])
