"""Wire messages as typed, immutable records: one union per direction.

A message travels as ZeroMQ frames ``[header, body]`` (docs/protocol.md): the header
carries the protocol version and the message kind, the body is msgpack. This module
holds only the records; :mod:`ubicore.protocol.codec` turns them into frames and back.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

PROTOCOL_VERSION = 1
MAGIC = b"UB"


class Kind(enum.IntEnum):
    """The message kind: byte 3 of the header frame."""

    REQUEST = 0x01
    REPLY = 0x02
    ERROR = 0x03
    SEALED_REQUEST = 0x04
    SEALED_REPLY = 0x05
    DELTA = 0x10
    HEARTBEAT = 0x11
    WELCOME = 0x12
    SEALED_EVENT = 0x13
    REKEY = 0x14


class Op(enum.IntEnum):
    """What a change does to a row."""

    INSERT = 1
    UPDATE = 2
    DELETE = 3


class Change(NamedTuple):
    """One row change. ``row`` is the full new row for insert and update, in the
    relation's declared column order; for delete, the key values, in the order of the
    relation's declared key."""

    relation: str
    op: int
    row: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Request:
    """Client → instance: call ``operation`` with keyword ``args``.

    ``timeout_ms`` is the caller's remaining deadline when it sent the request (0 for
    none). It is advisory: the caller enforces its own deadline, and an instance may
    use it to skip work nobody waits for (this one runs every request it receives).
    """

    corr_id: int
    schema: str
    cell: str
    operation: str
    args: Mapping[str, Any]
    timeout_ms: int = 0


@dataclass(frozen=True, slots=True)
class Reply:
    """Instance → client: the operation with ``corr_id`` succeeded with ``result``."""

    corr_id: int
    result: Any


@dataclass(frozen=True, slots=True)
class ErrorReply:
    """Instance → client: the operation with ``corr_id`` failed with a typed error."""

    corr_id: int
    code: str
    message: str
    detail: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Delta:
    """Event channel: consecutive commit batches of one instance.

    Batch ``i`` of ``batches`` has sequence number ``first_seq + i``; each batch holds
    the changes of one committed transaction, in order.
    """

    instance_id: bytes
    first_seq: int
    batches: tuple[tuple[Change, ...], ...]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.batches) - 1


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Event channel: the instance is alive and its last committed sequence is ``seq``."""

    instance_id: bytes
    seq: int


@dataclass(frozen=True, slots=True)
class Welcome:
    """Event channel, to one new subscriber only: its subscription is in place, so
    every batch committed from now on will reach it. A header frame and no body."""


class Sealed(NamedTuple):
    """Either direction of the RPC socket, inside a session: a request (client → instance)
    or a reply or error (instance → client), encrypted under the session's key for that
    direction. ``corr_id`` travels in the clear (bound into the associated data) so that
    a caller can match a clear ``auth_required`` answer to its call. (A named tuple, not
    a dataclass: four are made per sealed round trip.)"""

    session_id: bytes
    counter: int
    corr_id: int
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class SealedEvent:
    """Event channel of a ``full`` instance: a delta or heartbeat encrypted under the
    group key of ``epoch``; ``counter`` numbers the messages sealed under that key."""

    instance_id: bytes
    epoch: int
    counter: int
    ciphertext: bytes


@dataclass(frozen=True, slots=True)
class Rekey:
    """Event channel: new group keys, one sealed entry per entitled session."""

    instance_id: bytes
    epoch: int
    entries: tuple[tuple[bytes, bytes], ...]


ClientMessage = Request | Sealed
ServerMessage = Reply | ErrorReply
PlainChannelMessage = Delta | Heartbeat | Welcome
ChannelMessage = PlainChannelMessage | SealedEvent | Rekey

INSTANCE_ID_BYTES = 16
SESSION_ID_BYTES = 16
