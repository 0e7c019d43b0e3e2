"""The tamper-evident audit chain: records, checkpoints and the verifier.

Theory of operation
-------------------

A producer reports an :class:`Event`. The one writer of a trail holds a :class:`Chain`,
which numbers the event (``seq`` 1, 2, 3, … with no gaps), links it to the record
before it (``prev``, the previous record's ``hash``; 32 zero bytes for record 1), hashes
it and MACs the hash under the audit MAC key (:mod:`ubicore.audit.keys`, a file kept
apart from the trail)::

    hash = SHA-256( lp("ubicore-audit-v1", seq as 8 bytes big-endian,
                       time as an IEEE double big-endian (struct ">d"),
                       host, cell, schema, principal, address, action, outcome,
                       detail, origin, prev) )
    mac  = HMAC-SHA256(mac_key, hash)

``lp`` is :func:`ubicore.security.primitives.lp`: every part preceded by its 4-byte
big-endian length, strings as UTF-8, so no two different records share an encoding.
A store must give back exactly what it was given (``time`` as the same double).

What each defence catches (:func:`verify` walks the records in the order given):

- an edited field: the recomputed hash differs from ``hash``;
- an edit whose hash was recomputed by someone without the key: the MAC differs;
- a deleted, inserted, duplicated or reordered record: ``seq`` is not the next number,
  or ``prev`` is not the hash of the record before it;
- a replaced tail (another chain's records spliced in): ``prev`` breaks at the splice;
- a truncated tail: nothing in the records themselves, so :meth:`Chain.checkpoint`
  now and then signs ``(seq, hash, time)`` of the newest record with the Ed25519 key of
  the key file; kept elsewhere, a checkpoint that vouches for a record beyond the end
  of the trail (or for a different record at its seq) proves the tail was cut.

The limit: records written after the newest checkpoint can be cut away unnoticed, and a
holder of the key file can rewrite anything not covered by a checkpoint kept out of
their reach. Checkpoint often, and keep the checkpoints where the trail's writer cannot
edit them.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from ..errors import UbiError
from ..security.primitives import ct_equal, hmac_sha256, lp, sha256

if TYPE_CHECKING:
    from .keys import AuditKeys

__all__ = [
    "ACTIONS",
    "EVENT_FIELDS",
    "MAX_DETAIL_CHARS",
    "OUTCOMES",
    "RECORD_FIELDS",
    "ZERO",
    "AuditError",
    "AuditKeyError",
    "Chain",
    "Checkpoint",
    "Event",
    "Record",
    "Verdict",
    "check_event",
    "checkpoint_message",
    "record_hash",
    "verify",
    "verify_checkpoint",
]

HASH_BYTES = 32
SIGNATURE_BYTES = 64
ZERO = bytes(HASH_BYTES)
"""The ``prev`` of record 1, and the hash of the empty trail."""
MAX_DETAIL_CHARS = 500
MAX_SEQ = 2**64 - 1

ACTIONS = (
    "login",
    "denied",
    "update",
    "policy",
    "key_rotation",
    "rejected",
    "start",
    "stop",
    "register",
    "lockout",
    "alert",
)
OUTCOMES = ("ok", "failed", "denied", "refused")

RECORD_DOMAIN = "ubicore-audit-v1"
CHECKPOINT_DOMAIN = "ubicore-audit-checkpoint-v1"


class AuditError(UbiError):
    """Raised when an audit file (the trail's checkpoints, the key file) cannot be used.
    The message names the file and what to fix. A trail that fails verification is not
    an error: :func:`verify` returns a :class:`Verdict` saying where and why."""


class AuditKeyError(AuditError):
    """Raised when the audit key file is missing, damaged, or open to other accounts.
    The message gives the ``chmod``/``chown`` that fixes permissions; a damaged key file
    cannot be repaired (records MACed under it can then only be checked by their hash
    chain and checkpoints)."""


@dataclass(frozen=True, slots=True)
class Event:
    """What a producer reports. ``detail`` longer than :data:`MAX_DETAIL_CHARS` is cut
    to that length, ending in "…"."""

    time: float
    """Unix time."""
    host: str
    """The host name of the site file where it happened."""
    cell: str
    schema: str
    """``"Module::Schema"``, or ``""`` for controller events."""
    principal: str
    """The authenticated user (``"default"`` when none); for a login, the account named."""
    address: str
    """The client's address (``"127.0.0.1"``, ``"uid 1000"`` for local logins, or ``""``)."""
    action: str
    """One of :data:`ACTIONS`."""
    outcome: str
    """One of :data:`OUTCOMES`."""
    detail: str

    def __post_init__(self) -> None:
        # Every text field is capped (a failed login's user name is the client's choice),
        # so no record, spool frame or window grows with what an attacker sends.
        try:
            if len(self.detail) <= MAX_DETAIL_CHARS and len(self.principal) <= MAX_FIELD_CHARS and len(
                    self.address) <= MAX_FIELD_CHARS and len(self.host) + len(self.cell) + len(self.schema) + len(
                    self.action) + len(self.outcome) <= MAX_FIELD_CHARS:
                return  # the common case, checked cheaply
        except TypeError:
            pass  # a field of the wrong type: check_event says which
        for name, limit in _FIELD_LIMITS:
            value = getattr(self, name)
            if isinstance(value, str) and len(value) > limit:
                object.__setattr__(self, name, value[: limit - 1] + "…")


MAX_FIELD_CHARS = 256
"""The longest host, cell, schema, principal, address, action or outcome kept."""
_FIELD_LIMITS = (("host", MAX_FIELD_CHARS), ("cell", MAX_FIELD_CHARS), ("schema", MAX_FIELD_CHARS),
                 ("principal", MAX_FIELD_CHARS), ("address", MAX_FIELD_CHARS), ("action", MAX_FIELD_CHARS),
                 ("outcome", MAX_FIELD_CHARS), ("detail", MAX_DETAIL_CHARS))
EVENT_FIELDS = ("time", "host", "cell", "schema", "principal", "address", "action", "outcome", "detail")
_TEXT_FIELDS = EVENT_FIELDS[1:]


@dataclass(frozen=True, slots=True)
class Record:
    """One chained record: the event's fields, its place in the chain, who submitted it,
    and the proofs (``hash`` and ``mac``, 32 bytes each)."""

    seq: int
    time: float
    host: str
    cell: str
    schema: str
    principal: str
    address: str
    action: str
    outcome: str
    detail: str
    origin: str
    """Who submitted it, e.g. ``"Counter::Main@Site on host h1 as svc"``."""
    prev: bytes
    hash: bytes
    mac: bytes

    @property
    def event(self) -> Event:
        return Event(
            self.time, self.host, self.cell, self.schema, self.principal,
            self.address, self.action, self.outcome, self.detail,
        )  # fmt: skip


RECORD_FIELDS = ("seq", *EVENT_FIELDS, "origin", "prev", "hash", "mac")


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement that record ``seq`` of the trail has ``hash`` (made at ``time``).
    ``seq`` 0 with a zero hash vouches for the empty trail."""

    seq: int
    hash: bytes
    time: float
    signature: bytes


@dataclass(frozen=True, slots=True)
class Verdict:
    """What :func:`verify` found. ``checked`` counts the records that passed before the
    first failure; ``first_bad`` is the seq of the first record that fails (for a
    truncation, the first missing seq; ``None`` when no record is to blame);
    ``reason`` is one readable line."""

    ok: bool
    checked: int
    first_bad: int | None
    reason: str


# --- encoding ---------------------------------------------------------------------------------


def _is_time(t: object) -> bool:
    return isinstance(t, (float, int)) and not isinstance(t, bool) and math.isfinite(t)


def _is_seq(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= MAX_SEQ


def check_event(event: Event) -> Event:
    """Refuse (ValueError) an event outside the vocabularies or with fields of the wrong
    type; return it unchanged otherwise."""
    if not isinstance(event, Event):
        raise TypeError(f"expected an Event, got {type(event).__name__}")
    if not _is_time(event.time):
        raise ValueError("event time must be a finite number (unix seconds)")
    for name in _TEXT_FIELDS:
        value = getattr(event, name)
        if not isinstance(value, str):
            raise ValueError(f"event {name} must be a string")
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError(f"event {name} is not encodable as UTF-8") from None
    if event.action not in ACTIONS:
        raise ValueError(f"unknown audit action {event.action!r}; expected one of {', '.join(ACTIONS)}")
    if event.outcome not in OUTCOMES:
        raise ValueError(f"unknown audit outcome {event.outcome!r}; expected one of {', '.join(OUTCOMES)}")
    return event


def _record_hash(seq: int, event: Event | Record, origin: str, prev: bytes) -> bytes:
    return sha256(
        lp(
            RECORD_DOMAIN,
            seq.to_bytes(8, "big"),
            struct.pack(">d", event.time),
            event.host,
            event.cell,
            event.schema,
            event.principal,
            event.address,
            event.action,
            event.outcome,
            event.detail,
            origin,
            prev,
        )
    )


def record_hash(record: Record) -> bytes:
    """The hash the record's contents call for (everything but ``hash`` and ``mac``)."""
    return _record_hash(record.seq, record, record.origin, record.prev)


def checkpoint_message(seq: int, hash: bytes, time: float) -> bytes:
    """The bytes a checkpoint signs: lp(domain, seq as 8 bytes big-endian, hash, time ">d")."""
    return lp(CHECKPOINT_DOMAIN, seq.to_bytes(8, "big"), hash, struct.pack(">d", time))


def _malformed(record: object) -> str | None:
    """Why a record cannot even be hashed, or None."""
    if not isinstance(record, Record):
        return f"not a Record but {type(record).__name__}"
    if not _is_seq(record.seq) or record.seq == 0:
        return "seq is not a positive 64-bit number"
    if not _is_time(record.time):
        return "time is not a finite number"
    for name in (*_TEXT_FIELDS, "origin"):
        value = getattr(record, name)
        if not isinstance(value, str):
            return f"{name} is not text"
        try:
            value.encode()
        except UnicodeEncodeError:
            return f"{name} is not valid text"
    for name in ("prev", "hash", "mac"):
        value = getattr(record, name)
        if not isinstance(value, bytes) or len(value) != HASH_BYTES:
            return f"{name} is not {HASH_BYTES} bytes"
    return None


# --- writing ----------------------------------------------------------------------------------


class Chain:
    """The writer's end of one trail: numbers, links and MACs each event.

    Start a new trail with ``Chain(keys)``; resume one with the seq and hash of its newest
    record (read back from the store and, ideally, verified). One writer per trail: the
    chain is not thread-safe and two chains on one trail fork it (which :func:`verify`
    reports).
    """

    __slots__ = ("_hash", "_keys", "_seq")

    def __init__(self, keys: AuditKeys, last_seq: int = 0, last_hash: bytes = ZERO) -> None:
        if not _is_seq(last_seq) or last_seq == MAX_SEQ:
            raise ValueError("last_seq must be a 64-bit number")
        if not isinstance(last_hash, bytes) or len(last_hash) != HASH_BYTES:
            raise ValueError(f"last_hash must be {HASH_BYTES} bytes")
        if last_seq == 0 and last_hash != ZERO:
            raise ValueError("an empty trail's last hash is all zeros")
        self._keys = keys
        self._seq = last_seq
        self._hash = last_hash

    def __repr__(self) -> str:
        return f"<Chain at record {self._seq}>"

    @property
    def last_seq(self) -> int:
        return self._seq

    @property
    def last_hash(self) -> bytes:
        return self._hash

    def append(self, event: Event, origin: str, *, checked: bool = False) -> Record:
        """The event as the next record. ValueError for an event outside the vocabularies
        or an origin that is not text; the chain is unchanged then. ``checked``: the
        caller ran :func:`check_event` on it already (the core's hot path)."""
        if not checked:
            check_event(event)
        if not isinstance(origin, str):
            raise ValueError("origin must be a string")
        try:
            origin.encode()
        except UnicodeEncodeError:
            raise ValueError("origin is not encodable as UTF-8") from None
        if self._seq >= MAX_SEQ:
            raise ValueError("the trail is full")
        seq = self._seq + 1
        time = float(event.time)
        h = _record_hash(seq, event, origin, self._hash)
        record = Record(
            seq=seq, time=time, host=event.host, cell=event.cell, schema=event.schema,
            principal=event.principal, address=event.address, action=event.action,
            outcome=event.outcome, detail=event.detail, origin=origin, prev=self._hash,
            hash=h, mac=hmac_sha256(self._keys.mac_key.value, h),
        )  # fmt: skip
        self._seq, self._hash = seq, h
        return record

    def checkpoint(self, now: float) -> Checkpoint:
        """A signed checkpoint of the newest record (of the empty trail: seq 0)."""
        if not _is_time(now):
            raise ValueError("checkpoint time must be a finite number (unix seconds)")
        now = float(now)
        message = checkpoint_message(self._seq, self._hash, now)
        return Checkpoint(self._seq, self._hash, now, self._keys.sign(message))


# --- checking ---------------------------------------------------------------------------------


def verify_checkpoint(cp: Checkpoint, verify_key: VerifyKey) -> bool:
    """Whether the checkpoint is well formed and signed by the key file of ``verify_key``."""
    if not isinstance(cp, Checkpoint) or not _is_seq(cp.seq) or not _is_time(cp.time):
        return False
    if not isinstance(cp.hash, bytes) or len(cp.hash) != HASH_BYTES:
        return False
    if not isinstance(cp.signature, bytes) or len(cp.signature) != SIGNATURE_BYTES:
        return False
    try:
        verify_key.verify(checkpoint_message(cp.seq, cp.hash, float(cp.time)), cp.signature)
    except BadSignatureError:
        return False
    return True


def when(t: float) -> str:
    """A unix time as people read it in reasons: ``2024-05-01 12:00:00 UTC``."""
    try:
        return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"time {t!r}"


def verify(
    records: Iterable[Record],
    keys_or_verify: AuditKeys | VerifyKey,
    checkpoints: Sequence[Checkpoint] = (),
    *,
    after_seq: int = 0,
    after_hash: bytes = ZERO,
) -> Verdict:
    """Check a trail, records in the order given, against its keys and checkpoints.

    With :class:`~ubicore.audit.keys.AuditKeys` every check runs; with only the verify
    key (the public half) MACs are skipped (the verdict says so) and the hash chain and
    the checkpoints are still checked. ``after_seq``/``after_hash`` check a trail that
    continues an earlier, already checked part (default: the whole trail from record 1).

    Checks, in order, for each record: well formed; its contents match its hash
    (edited); its MAC matches (forged); its seq is the next one (deleted, inserted,
    reordered); its prev is the hash of the record before (replaced, reordered); any
    checkpoint for its seq names its hash. Then: every checkpoint is validly signed;
    the newest checkpoint names no record beyond the end (truncated). The first failure
    decides the verdict.
    """
    if isinstance(keys_or_verify, VerifyKey):
        mac_key: bytes | None = None
        verify_key = keys_or_verify
    else:
        mac_key = keys_or_verify.mac_key.value
        verify_key = keys_or_verify.verify_key
    if not _is_seq(after_seq) or not isinstance(after_hash, bytes) or len(after_hash) != HASH_BYTES:
        raise ValueError("after_seq must be a 64-bit number and after_hash 32 bytes")

    vouched: dict[int, list[Checkpoint]] = {}
    badly_signed: list[int] = []
    for index, cp in enumerate(checkpoints, 1):
        if verify_checkpoint(cp, verify_key):
            vouched.setdefault(cp.seq, []).append(cp)
        else:
            badly_signed.append(index)

    seq, prev = after_seq, after_hash
    checked = 0

    def fail(first_bad: int | None, reason: str) -> Verdict:
        return Verdict(False, checked, first_bad, reason)

    for cp in vouched.get(seq, ()):
        if not ct_equal(cp.hash, prev):
            return fail(seq + 1, f"the trail before record {seq + 1} is not the one checkpoint of {when(cp.time)} vouches for (rewritten)")

    for record in records:
        expected = seq + 1
        problem = _malformed(record)
        if problem is not None:
            return fail(expected, f"record {expected}: malformed ({problem})")
        # a record out of place is named by the place it holds: its own seq may be the lie
        if not ct_equal(record_hash(record), record.hash):
            return fail(expected, f"record {expected}: its contents do not match its hash (edited)")
        if mac_key is not None and not ct_equal(hmac_sha256(mac_key, record.hash), record.mac):
            return fail(expected, f"record {expected}: its MAC does not match (forged or edited without the audit key)")
        if record.seq != expected:
            if record.seq < expected:
                return fail(
                    expected,
                    f"record {expected}: found record {record.seq} again after record {seq} (inserted, duplicated or reordered)",
                )
            if seq == 0:
                return fail(expected, f"record 1 is missing: the trail begins at record {record.seq} (deleted or reordered)")
            return fail(
                expected, f"record {expected} is missing: record {seq} is followed by record {record.seq} (deleted or reordered)"
            )
        if not ct_equal(record.prev, prev):
            what = "the start of the trail" if seq == 0 else f"record {seq}"
            return fail(expected, f"record {expected} does not follow {what}: its prev hash differs (replaced, inserted or reordered)")
        for cp in vouched.get(record.seq, ()):
            if not ct_equal(cp.hash, record.hash):
                return fail(
                    record.seq,
                    f"record {record.seq} is not the record checkpoint of {when(cp.time)} vouches for (truncated and rewritten)",
                )
        seq, prev = record.seq, record.hash
        checked += 1

    if badly_signed:
        return fail(None, f"checkpoint {badly_signed[0]}: bad signature (damaged, forged or made with another key)")
    newest = max((cp for cps in vouched.values() for cp in cps), key=lambda cp: (cp.seq, cp.time), default=None)
    if newest is not None and newest.seq > seq:
        end = f"ends at record {seq}" if seq > after_seq else (f"is empty after record {seq}" if seq else "is empty")
        return fail(seq + 1, f"the trail {end} but checkpoint of {when(newest.time)} vouches for record {newest.seq} (truncated)")

    reason = f"{checked} record{'' if checked == 1 else 's'} verified"
    if newest is None:
        reason += "; no checkpoint: a truncated tail would go unnoticed"
    elif newest.seq < seq:
        reason += f"; checkpoint of {when(newest.time)} vouches for record {newest.seq}, records after it are not covered"
    else:
        reason += f"; checkpoint of {when(newest.time)} vouches for the last record"
    if mac_key is None:
        reason += "; MACs not checked (no audit key)"
    return Verdict(True, checked, None, reason)
