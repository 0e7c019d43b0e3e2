"""Encoding and parsing of wire messages: records ⇄ ZeroMQ frames.

Frame layout (every message; docs/protocol.md has the full field tables)::

    frame 0, header, exactly 4 bytes
      offset 0  2 bytes  magic  b"UB"
      offset 2  1 byte   protocol version (1)
      offset 3  1 byte   message kind (messages.Kind)
    frame 1, body: one msgpack array, its shape fixed by the kind

Every ``parse_*`` answers any input with a record or :class:`ProtocolError`, never any
other exception: the property tests feed it arbitrary bytes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from ..errors import ProtocolError
from .messages import (
    INSTANCE_ID_BYTES,
    MAGIC,
    PROTOCOL_VERSION,
    SESSION_ID_BYTES,
    Change,
    ChannelMessage,
    Delta,
    ErrorReply,
    Heartbeat,
    Kind,
    Rekey,
    Reply,
    Request,
    Sealed,
    SealedEvent,
    ServerMessage,
    Welcome,
)

MAX_FRAME_BYTES = 64 * 1024 * 1024
"""Bodies larger than this are refused before unpacking (a 100,000-row dump is ~10 MiB)."""

_HEADERS = {kind: MAGIC + bytes((PROTOCOL_VERSION, kind)) for kind in Kind}
_KIND_OF = {int(kind): kind for kind in Kind}  # a dict lookup, not Enum.__call__, per message
HEADER_REQUEST = _HEADERS[Kind.REQUEST]
HEADER_REPLY = _HEADERS[Kind.REPLY]
HEADER_ERROR = _HEADERS[Kind.ERROR]
HEADER_DELTA = _HEADERS[Kind.DELTA]
HEADER_HEARTBEAT = _HEADERS[Kind.HEARTBEAT]
HEADER_WELCOME = _HEADERS[Kind.WELCOME]
HEADER_SEALED_REQUEST = _HEADERS[Kind.SEALED_REQUEST]
HEADER_SEALED_REPLY = _HEADERS[Kind.SEALED_REPLY]
HEADER_SEALED_EVENT = _HEADERS[Kind.SEALED_EVENT]
HEADER_REKEY = _HEADERS[Kind.REKEY]
_WELCOME = Welcome()

_packb = msgpack.Packer(use_bin_type=True, strict_types=False).pack
_new_tuple = tuple.__new__
_MAX_UINT64 = 2**64 - 1


def pack(value: Any) -> bytes:
    """Pack a body with the project's msgpack settings (bin for bytes, str for text)."""
    try:
        packed: bytes = _packb(value)
        return packed
    except (TypeError, ValueError, OverflowError) as exc:
        raise ValueError(f"value cannot travel on the wire: {exc}") from None


def _no_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack ext type {code} is not part of the protocol")


def unpack(body: bytes, *, use_list: bool = True) -> Any:
    """Unpack a body; malformed msgpack becomes :class:`ProtocolError`. With
    ``use_list=False`` arrays come as tuples (channel rows then need no copy)."""
    if len(body) > MAX_FRAME_BYTES:
        raise ProtocolError(f"body of {len(body)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=use_list, ext_hook=_no_ext)
    except Exception as exc:  # msgpack raises a zoo of types on garbage
        raise ProtocolError(f"malformed msgpack body: {type(exc).__name__}") from None


def parse_header(frame: bytes) -> Kind:
    """The kind named by a header frame, after checking magic and version."""
    if len(frame) != 4 or frame[:2] != MAGIC:
        raise ProtocolError("not a ubicore header frame")
    if frame[2] != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {frame[2]}")
    try:
        return _KIND_OF[frame[3]]
    except KeyError:
        raise ProtocolError(f"unknown message kind 0x{frame[3]:02x}") from None


def _split(frames: Sequence[bytes]) -> tuple[Kind, Any]:
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    return parse_header(bytes(frames[0])), unpack(bytes(frames[1]))


def _array(body: Any, n: int, what: str) -> list[Any]:
    if not isinstance(body, list) or len(body) != n:
        raise ProtocolError(f"{what} body must be an array of {n}")
    return body


def _uint(value: Any, what: str) -> int:
    if type(value) is not int or not 0 <= value <= _MAX_UINT64:
        raise ProtocolError(f"{what} must be an unsigned integer")
    return value


def _str(value: Any, what: str) -> str:
    if type(value) is not str:
        raise ProtocolError(f"{what} must be a string")
    return value


def _map(value: Any, what: str) -> dict[str, Any]:
    # bytes keys pass msgpack's strict_map_key; the records promise str keys (args are
    # keyword arguments), so anything else is refused here, not deep in an instance.
    if type(value) is not dict or not all(type(k) is str for k in value):
        raise ProtocolError(f"{what} must be a map with string keys")
    return value


def _instance_id(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != INSTANCE_ID_BYTES:
        raise ProtocolError(f"instance id must be {INSTANCE_ID_BYTES} bytes")
    return value


# --- requests and replies ---------------------------------------------------------------


def encode_request(req: Request) -> list[bytes]:
    return [HEADER_REQUEST, request_body(req)]


def parse_request(frames: Sequence[bytes]) -> Request:
    kind, body = _split(frames)
    if kind is not Kind.REQUEST:
        raise ProtocolError(f"expected a request, got {kind.name.lower()}")
    return _request_body(body)


def _request_body(body: Any) -> Request:
    corr, schema, cell, op, args, timeout_ms = _array(body, 6, "request")
    return Request(
        _uint(corr, "corr_id"),
        _str(schema, "schema"),
        _str(cell, "cell"),
        _str(op, "operation"),
        _map(args, "args"),
        _uint(timeout_ms, "timeout_ms"),
    )


def encode_reply_packed(corr_id: int, packed_result: bytes) -> list[bytes]:
    """Reply frames around a result already packed (saves packing it twice)."""
    return [HEADER_REPLY, b"\x92" + pack(corr_id) + packed_result]  # 0x92: array of 2


def encode_reply(corr_id: int, result: Any) -> list[bytes]:
    return [HEADER_REPLY, pack([corr_id, result])]


def encode_error(corr_id: int, code: str, message: str, detail: Mapping[str, Any]) -> list[bytes]:
    return [HEADER_ERROR, pack([corr_id, code, message, dict(detail)])]


def _server_body(kind: Kind, body: Any) -> ServerMessage:
    if kind is Kind.REPLY:
        corr, result = _array(body, 2, "reply")
        return Reply(_uint(corr, "corr_id"), result)
    if kind is Kind.ERROR:
        corr, code, message, detail = _array(body, 4, "error")
        return ErrorReply(
            _uint(corr, "corr_id"), _str(code, "code"), _str(message, "message"), _map(detail, "detail")
        )
    raise ProtocolError(f"expected a reply, got {kind.name.lower()}")


def parse_server_message(frames: Sequence[bytes]) -> ServerMessage | Sealed:
    kind, body = _split(frames)
    if kind is Kind.SEALED_REPLY:
        return _sealed(body)
    return _server_body(kind, body)


# --- sealed messages (the outer layer; ubicore.security.session opens them) -------------


def _bin(value: Any, what: str) -> bytes:
    if type(value) is not bytes:
        raise ProtocolError(f"{what} must be binary")
    return value


def _session_id(value: Any) -> bytes:
    if type(value) is not bytes or len(value) != SESSION_ID_BYTES:
        raise ProtocolError(f"session id must be {SESSION_ID_BYTES} bytes")
    return value


def _sealed(body: Any) -> Sealed:
    # On every sealed call's path twice: checks inline.
    if type(body) is not list or len(body) != 4:
        raise ProtocolError("sealed message body must be an array of 4")
    sid, counter, corr, ct = body
    if type(sid) is not bytes or len(sid) != SESSION_ID_BYTES:
        raise ProtocolError(f"session id must be {SESSION_ID_BYTES} bytes")
    if type(counter) is not int or not 0 <= counter <= _MAX_UINT64 or type(corr) is not int or not 0 <= corr <= _MAX_UINT64:
        raise ProtocolError("counter and corr_id must be unsigned integers")
    if type(ct) is not bytes:
        raise ProtocolError("ciphertext must be binary")
    return _new_tuple(Sealed, body)


def encode_sealed_request(msg: Sealed) -> list[bytes]:
    return [HEADER_SEALED_REQUEST, pack([msg.session_id, msg.counter, msg.corr_id, msg.ciphertext])]


def encode_sealed_reply(msg: Sealed) -> list[bytes]:
    return [HEADER_SEALED_REPLY, pack([msg.session_id, msg.counter, msg.corr_id, msg.ciphertext])]


def parse_client_message(frames: Sequence[bytes]) -> Request | Sealed:
    """A request, clear or sealed (the instance's side of the RPC socket)."""
    kind, body = _split(frames)
    if kind is Kind.SEALED_REQUEST:
        return _sealed(body)
    if kind is not Kind.REQUEST:
        raise ProtocolError(f"expected a request, got {kind.name.lower()}")
    return _request_body(body)


def request_body(req: Request) -> bytes:
    """The msgpack body of a request (the plaintext of a sealed one)."""
    return pack([req.corr_id, req.schema, req.cell, req.operation, dict(req.args), req.timeout_ms])


def parse_request_body(body: bytes) -> Request:
    return _request_body(unpack(body))


def inner_bytes(frames: Sequence[bytes]) -> bytes:
    """A clear message's frames as one plaintext: the kind byte, then the body."""
    return bytes(frames[0][3:4]) + bytes(frames[1])


def parse_inner_reply(plaintext: bytes) -> ServerMessage:
    """A reply or error from a sealed reply's plaintext (kind byte + body)."""
    if not plaintext:
        raise ProtocolError("empty sealed payload")
    try:
        kind = _KIND_OF[plaintext[0]]
    except KeyError:
        raise ProtocolError(f"unknown message kind 0x{plaintext[0]:02x}") from None
    return _server_body(kind, unpack(plaintext[1:]))


def encode_sealed_event(msg: SealedEvent) -> list[bytes]:
    return [HEADER_SEALED_EVENT, pack([msg.instance_id, msg.epoch, msg.counter, msg.ciphertext])]


def encode_rekey(msg: Rekey) -> list[bytes]:
    return [HEADER_REKEY, pack([msg.instance_id, msg.epoch, [list(e) for e in msg.entries]])]


def parse_inner_event(plaintext: bytes) -> Delta | Heartbeat:
    """A delta or heartbeat from a sealed event's plaintext (kind byte + body)."""
    if not plaintext or plaintext[0] not in (Kind.DELTA, Kind.HEARTBEAT):
        raise ProtocolError("a sealed event must hold a delta or a heartbeat")
    msg = parse_channel_message([_HEADERS[Kind(plaintext[0])], plaintext[1:]])
    assert isinstance(msg, (Delta, Heartbeat))
    return msg


# --- event channel ----------------------------------------------------------------------


def encode_delta_batches(instance_id: bytes, first_seq: int, batches: Sequence[Sequence[Change]]) -> list[bytes]:
    """Frames for consecutive commit batches; changes are ``(relation, op, row)`` triples."""
    return [HEADER_DELTA, pack([instance_id, first_seq, batches])]


def encode_delta(delta: Delta) -> list[bytes]:
    return encode_delta_batches(delta.instance_id, delta.first_seq, delta.batches)


def encode_heartbeat(hb: Heartbeat) -> list[bytes]:
    return [HEADER_HEARTBEAT, pack([hb.instance_id, hb.seq])]


def _parse_batches(raw: Any) -> tuple[tuple[Change, ...], ...]:
    # The per-event hot path of every subscriber: checks inline, no per-change copies.
    if type(raw) is not tuple or not raw:
        raise ProtocolError("delta batches must be a non-empty array")
    out = []
    for batch in raw:
        if type(batch) is not tuple:
            raise ProtocolError("a delta batch must be an array")
        for ch in batch:
            if type(ch) is not tuple or len(ch) != 3:
                raise ProtocolError("a change must be an array of 3")
            rel, op, row = ch
            if type(rel) is not str or type(op) is not int or not 1 <= op <= 3 or type(row) is not tuple:
                raise ProtocolError("a change must be [relation, op 1..3, row array]")
        out.append(tuple([_new_tuple(Change, ch) for ch in batch]))  # Change(...) minus its Python __new__
    return tuple(out)


def parse_channel_message(frames: Sequence[bytes]) -> ChannelMessage:
    if len(frames) == 1 and bytes(frames[0]) == HEADER_WELCOME:
        return _WELCOME
    if len(frames) != 2:
        raise ProtocolError(f"expected 2 frames, got {len(frames)}")
    kind = parse_header(bytes(frames[0]))
    if kind is Kind.SEALED_EVENT or kind is Kind.REKEY:
        return _parse_sealed_channel(kind, unpack(bytes(frames[1])))
    if kind is not Kind.DELTA and kind is not Kind.HEARTBEAT:
        raise ProtocolError(f"expected a channel message, got {kind.name.lower()}")
    body = unpack(bytes(frames[1]), use_list=False)
    if type(body) is not tuple:
        raise ProtocolError(f"{kind.name.lower()} body must be an array")
    if kind is Kind.DELTA:
        if len(body) != 3:
            raise ProtocolError("delta body must be an array of 3")
        iid, first, batches = body
        return Delta(_instance_id(iid), _uint(first, "first_seq"), _parse_batches(batches))
    if len(body) != 2:
        raise ProtocolError("heartbeat body must be an array of 2")
    iid, seq = body
    return Heartbeat(_instance_id(iid), _uint(seq, "seq"))


def _parse_sealed_channel(kind: Kind, body: Any) -> SealedEvent | Rekey:
    if kind is Kind.SEALED_EVENT:
        iid, epoch, counter, ct = _array(body, 4, "sealed event")
        return SealedEvent(_instance_id(iid), _uint(epoch, "epoch"), _uint(counter, "counter"), _bin(ct, "ciphertext"))
    iid, epoch, entries = _array(body, 3, "rekey")
    if not isinstance(entries, list):
        raise ProtocolError("rekey entries must be an array")
    out = []
    for entry in entries:
        sid, ct = _array(entry, 2, "rekey entry")
        out.append((_session_id(sid), _bin(ct, "ciphertext")))
    return Rekey(_instance_id(iid), _uint(epoch, "epoch"), tuple(out))
