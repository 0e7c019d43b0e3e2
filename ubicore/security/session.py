"""Session crypto, sans-IO: sealing and opening protected messages.

Theory of operation. A login (:mod:`ubicore.security.amp`) leaves both sides with a
*session*: a random session id, one AES-128 key per direction of the RPC socket, and
K_sess from the exchange (used only to wrap new group keys for this session). A
``full`` instance also keeps a *group key* per epoch for its event channel.

Nobody picks a nonce. Every sealed message carries a counter in the clear; the nonce is
a 4-byte purpose prefix followed by that counter (8 bytes, big-endian), and the counter
of each key only ever grows, so no (key, nonce) pair repeats::

    prefix 00000001  client → instance requests   key: the session's c2s key
    prefix 00000002  instance → client replies    key: the session's s2c key
    prefix 00000003  channel events               key: the group key of the epoch
    prefix 00000004  group-key delivery (rekey)   key: K_sess; counter = the rekey's epoch

The associated data binds the protocol version (in the label), the schema, the cell, the
instance id, the epoch and the counter (and for RPC the session id and correlation id),
so a message cannot be replayed into another session, moved to another schema, cell or
instance, or carried across an epoch. Receivers keep a :class:`ReplayWindow` per key and
refuse any counter seen before or fallen behind the window. Every failure is one opaque
:class:`~ubicore.errors.DecryptionFailed`.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import AuthenticationRequired, DecryptionFailed, ProtocolError
from ..protocol.codec import (
    inner_bytes,
    pack,
    parse_inner_event,
    parse_inner_reply,
    parse_request_body,
    request_body,
    unpack,
)
from ..protocol.messages import (
    SESSION_ID_BYTES,
    Delta,
    Heartbeat,
    Rekey,
    Request,
    Sealed,
    SealedEvent,
    ServerMessage,
)
from . import primitives as P
from .primitives import Aead, Rng, Secret

REPLAY_WINDOW = 1024
"""Counters this far behind the highest one seen are still accepted once (reordering)."""
MAX_MESSAGES_PER_KEY = 2**32 - 1
"""A key seals at most this many messages; the session (or group key) is renewed first."""
GROUP_KEYS_KEPT = 3
"""A subscriber keeps this many group keys (previous, current, next)."""

_C2S, _S2C, _EVENT, _REKEY = b"\0\0\0\1", b"\0\0\0\2", b"\0\0\0\3", b"\0\0\0\4"
_be8 = struct.Struct(">Q").pack
_tail1 = struct.Struct(">IQ").pack  # lp(be8(n)) of one counter
_tail2 = struct.Struct(">IQIQ").pack  # lp(be8(counter), be8(corr))
# lp() is a concatenation of independently prefixed parts, so the associated data of a
# message is a per-session (or per-epoch) constant prefix followed by its varying tail.


class SessionExhausted(AuthenticationRequired):
    """A key reached MAX_MESSAGES_PER_KEY; the session must be renewed (the SDK logs in
    again, as for an expired session)."""


class ReplayWindow:
    """Sliding-window replay check over message counters (counters start at 1).

    ``check_and_mark(n)`` accepts each counter at most once, and refuses counters that
    are ``size`` or more behind the highest accepted. Call it only after the message
    authenticated, so forged counters cannot move the window.
    """

    __slots__ = ("size", "top", "_bits", "_mask")

    def __init__(self, size: int = REPLAY_WINDOW) -> None:
        self.size = size
        self.top = 0
        self._bits = 0  # bit i set: counter top - i seen
        self._mask = (1 << size) - 1

    def seen(self, n: int) -> bool:
        top = self.top
        if n > top:  # the common case first: the next counter
            return False
        if n <= 0 or n <= top - self.size:
            return True
        return bool(self._bits >> (top - n) & 1)

    def mark(self, n: int) -> None:
        top = self.top
        if n == top + 1:  # in order: one shift
            self._bits = ((self._bits << 1) | 1) & self._mask
            self.top = n
        elif n > top:
            shift = n - top
            # A jump of a window or more forgets everything (and never shifts by 2^32).
            self._bits = ((self._bits << shift) | 1) & self._mask if shift < self.size else 1
            self.top = n
        else:
            self._bits |= 1 << (top - n)

    def check_and_mark(self, n: int) -> bool:
        if self.seen(n):
            return False
        self.mark(n)
        return True


def _nonce(prefix: bytes, counter: int) -> bytes:
    return prefix + _be8(counter)


def rpc_ad(label: str, schema: str, cell: str, instance_id: bytes, epoch: int, msg: Sealed) -> bytes:
    """lp(label, schema, cell, instance id, epoch, session id, counter, corr id)."""
    return P.lp(label, schema, cell, instance_id, _be8(epoch), msg.session_id, _be8(msg.counter), _be8(msg.corr_id))


def _rpc_prefix(label: str, schema: str, cell: str, instance_id: bytes, epoch: int, session_id: bytes) -> bytes:
    return P.lp(label, schema, cell, instance_id, _be8(epoch), session_id)


def event_ad(schema: str, cell: str, instance_id: bytes, epoch: int, counter: int) -> bytes:
    """lp("ubicore-v1 event", schema, cell, instance id, epoch, counter)."""
    return P.lp("ubicore-v1 event", schema, cell, instance_id, _be8(epoch), _be8(counter))


def _event_prefix(schema: str, cell: str, instance_id: bytes, epoch: int) -> bytes:
    return P.lp("ubicore-v1 event", schema, cell, instance_id, _be8(epoch))


def rekey_ad(schema: str, cell: str, instance_id: bytes, epoch: int, session_id: bytes) -> bytes:
    return P.lp("ubicore-v1 rekey", schema, cell, instance_id, _be8(epoch), session_id)


def delivery_context(schema: str, cell: str, instance_id: bytes) -> bytes:
    """The "schema id" bound into the key delivery of pass 4."""
    return P.lp(schema, cell, instance_id)


# --- key material delivered in pass 4 ----------------------------------------------------------


@dataclass(frozen=True, slots=True, repr=False)
class SessionGrant:
    """What pass 4 delivers (sealed): the session's keys, its epoch and level, how long it
    lives, and the group keys the principal is entitled to (``full`` and read right)."""

    session_id: bytes
    c2s: Secret
    s2c: Secret
    epoch: int
    level: str
    ttl_s: float
    user: str
    group: tuple[tuple[int, Secret], ...] = ()

    def encode(self) -> bytes:
        return pack({
            "session": self.session_id, "c2s": self.c2s.value, "s2c": self.s2c.value, "epoch": self.epoch,
            "level": self.level, "ttl_s": float(self.ttl_s), "user": self.user,
            "group": [[e, k.value] for e, k in self.group],
        })

    @classmethod
    def decode(cls, payload: bytes) -> SessionGrant:
        try:
            m = unpack(payload)
            group = tuple((_epoch(e), _key(k)) for e, k in m["group"])
            sid = m["session"]
            if type(sid) is not bytes or len(sid) != SESSION_ID_BYTES:
                raise ValueError
            ttl = float(m["ttl_s"])
            if not ttl > 0:
                raise ValueError
            return cls(sid, _key(m["c2s"]), _key(m["s2c"]), _epoch(m["epoch"]), str(m["level"]), ttl, str(m["user"]), group)
        except (ProtocolError, KeyError, TypeError, ValueError):
            raise DecryptionFailed() from None

    def __repr__(self) -> str:
        return f"<SessionGrant user={self.user!r} epoch={self.epoch} level={self.level} keys redacted>"


def _key(v: object) -> Secret:
    if type(v) is not bytes or len(v) != P.AES_KEY_BYTES:
        raise ValueError("bad key")
    return Secret(v)


def _epoch(v: object) -> int:
    if type(v) is not int or not 0 <= v < 2**63:
        raise ValueError("bad epoch")
    return v


def encode_group_keys(keys: Iterable[tuple[int, Secret]]) -> bytes:
    return pack([[e, k.value] for e, k in keys])


def decode_group_keys(payload: bytes) -> tuple[tuple[int, Secret], ...]:
    try:
        return tuple((_epoch(e), _key(k)) for e, k in unpack(payload))
    except (ProtocolError, TypeError, ValueError):
        raise DecryptionFailed() from None


# --- the two ends of a session ---------------------------------------------------------------


@dataclass(eq=False)
class _SessionBase:
    schema: str
    cell: str
    instance_id: bytes
    session_id: bytes
    epoch: int
    level: str
    user: str
    expires_at: float
    _tx: Aead = field(repr=False)
    _rx: Aead = field(repr=False)
    _wrap: Aead = field(repr=False)
    tx_counter: int = 0
    window: ReplayWindow = field(default_factory=ReplayWindow, repr=False)
    rejected: int = 0
    _req_ad: bytes = field(default=b"", repr=False)
    _rep_ad: bytes = field(default=b"", repr=False)

    def __post_init__(self) -> None:
        args = (self.schema, self.cell, self.instance_id, self.epoch, self.session_id)
        self._req_ad = _rpc_prefix("ubicore-v1 request", *args)
        self._rep_ad = _rpc_prefix("ubicore-v1 reply", *args)

    def _next_counter(self) -> int:
        if self.tx_counter >= MAX_MESSAGES_PER_KEY:
            raise SessionExhausted()
        self.tx_counter += 1
        return self.tx_counter

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} user={self.user!r} {self.schema}@{self.cell} epoch={self.epoch} "
                f"level={self.level} keys redacted>")


class ClientSession(_SessionBase):
    """The client's end: seals requests, opens replies, keeps the group keys."""

    group: GroupKeyRing

    def seal_request(self, req: Request) -> Sealed:
        n = self._next_counter()
        ct = self._tx.seal(_C2S + _be8(n), request_body(req), self._req_ad + _tail2(8, n, 8, req.corr_id))
        return Sealed(self.session_id, n, req.corr_id, ct)

    def open_reply(self, msg: Sealed) -> ServerMessage:
        """The reply inside; DecryptionFailed for anything tampered, replayed or foreign."""
        if msg.session_id != self.session_id or self.window.seen(msg.counter):
            self.rejected += 1
            raise DecryptionFailed()
        try:
            plain = self._rx.open(_S2C + _be8(msg.counter), msg.ciphertext,
                                  self._rep_ad + _tail2(8, msg.counter, 8, msg.corr_id))
            inner = parse_inner_reply(plain)
        except (DecryptionFailed, ProtocolError):
            self.rejected += 1
            raise DecryptionFailed() from None
        if inner.corr_id != msg.corr_id:
            self.rejected += 1
            raise DecryptionFailed()
        self.window.mark(msg.counter)
        return inner

    def open_rekey(self, msg: Rekey) -> bool:
        """Take new group keys from a rekey message if it holds an entry for this session.
        True if keys were taken; False if there is none for us (we were left out)."""
        if msg.instance_id != self.instance_id:
            return False
        for sid, ct in msg.entries:
            if sid == self.session_id:
                try:
                    plain = self._wrap.open(_nonce(_REKEY, msg.epoch), ct,
                                            rekey_ad(self.schema, self.cell, self.instance_id, msg.epoch, sid))
                    keys = decode_group_keys(plain)
                except DecryptionFailed:
                    self.rejected += 1
                    return False
                self.group.add(keys)
                return True
        return False


class ServerSession(_SessionBase):
    """The instance's end: opens requests, seals replies, wraps new group keys."""

    peer: bytes = b""
    may_read: bool = False

    def open_request(self, msg: Sealed) -> Request:
        if msg.session_id != self.session_id or self.window.seen(msg.counter):
            self.rejected += 1
            raise DecryptionFailed()
        try:
            plain = self._rx.open(_C2S + _be8(msg.counter), msg.ciphertext,
                                  self._req_ad + _tail2(8, msg.counter, 8, msg.corr_id))
            req = parse_request_body(plain)
        except (DecryptionFailed, ProtocolError):
            self.rejected += 1
            raise DecryptionFailed() from None
        if req.corr_id != msg.corr_id:
            self.rejected += 1
            raise DecryptionFailed()
        self.window.mark(msg.counter)
        return req

    def seal_reply(self, frames: list[bytes], corr_id: int) -> Sealed:
        """Seal a clear reply or error (its frames) for this session."""
        n = self._next_counter()
        ct = self._tx.seal(_S2C + _be8(n), inner_bytes(frames), self._rep_ad + _tail2(8, n, 8, corr_id))
        return Sealed(self.session_id, n, corr_id, ct)

    def wrap_group_keys(self, epoch: int, keys: Iterable[tuple[int, Secret]]) -> tuple[bytes, bytes]:
        """This session's rekey entry for a rekey at ``epoch``."""
        ct = self._wrap.seal(_nonce(_REKEY, epoch), encode_group_keys(keys),
                             rekey_ad(self.schema, self.cell, self.instance_id, epoch, self.session_id))
        return self.session_id, ct


def new_session_keys(rng: Rng = os.urandom) -> tuple[bytes, Secret, Secret]:
    """A fresh session id and the two direction keys."""
    sid = rng(SESSION_ID_BYTES)
    if len(sid) != SESSION_ID_BYTES:
        raise ValueError("randomness source returned the wrong length")
    return sid, P.random_key(rng), P.random_key(rng)


def server_session(
    schema: str, cell: str, instance_id: bytes, grant: SessionGrant, k_sess: Secret, expires_at: float, *,
    peer: bytes = b"", may_read: bool = False,
) -> ServerSession:
    s = ServerSession(schema, cell, instance_id, grant.session_id, grant.epoch, grant.level, grant.user, expires_at,
                      Aead(grant.s2c), Aead(grant.c2s), Aead(k_sess))
    s.peer, s.may_read = peer, may_read
    return s


def client_session(
    schema: str, cell: str, instance_id: bytes, grant: SessionGrant, k_sess: Secret, expires_at: float
) -> ClientSession:
    s = ClientSession(schema, cell, instance_id, grant.session_id, grant.epoch, grant.level, grant.user, expires_at,
                      Aead(grant.c2s), Aead(grant.s2c), Aead(k_sess))
    s.group = GroupKeyRing(schema, cell, instance_id)
    s.group.add(grant.group)
    return s


# --- the channel's group keys ------------------------------------------------------------------


class GroupKeyRing:
    """A subscriber's group keys of one instance: the newest GROUP_KEYS_KEPT epochs."""

    def __init__(self, schema: str, cell: str, instance_id: bytes) -> None:
        self.schema, self.cell, self.instance_id = schema, cell, instance_id
        self._keys: dict[int, tuple[Aead, bytes]] = {}  # epoch -> (key, associated-data prefix)
        self._windows: dict[int, ReplayWindow] = {}
        self.rejected = 0

    def __repr__(self) -> str:
        return f"<GroupKeyRing {self.schema}@{self.cell} epochs={sorted(self._keys)} keys redacted>"

    @property
    def epochs(self) -> list[int]:
        return sorted(self._keys)

    def has(self, epoch: int) -> bool:
        return epoch in self._keys

    def add(self, keys: Iterable[tuple[int, Secret]]) -> None:
        for epoch, key in keys:
            if epoch not in self._keys:
                self._keys[epoch] = (Aead(key), _event_prefix(self.schema, self.cell, self.instance_id, epoch))
                self._windows[epoch] = ReplayWindow()
        for old in sorted(self._keys)[:-GROUP_KEYS_KEPT]:
            del self._keys[old], self._windows[old]

    def clear(self) -> None:
        self._keys.clear()
        self._windows.clear()

    def adopt(self, older: GroupKeyRing) -> None:
        """Take over the keys (and their replay windows) of an earlier session's ring with
        the same instance, so a renewed session reads on without a gap."""
        if older.instance_id != self.instance_id or (older.schema, older.cell) != (self.schema, self.cell):
            return
        for epoch, entry in older._keys.items():
            self._keys[epoch] = entry  # one epoch, one key: the older entry has the window
            self._windows[epoch] = older._windows[epoch]
        for old in sorted(self._keys)[:-GROUP_KEYS_KEPT]:
            del self._keys[old], self._windows[old]

    def open(self, msg: SealedEvent, windows: dict[tuple[bytes, int], ReplayWindow] | None = None) -> Delta | Heartbeat:
        """The delta or heartbeat inside; DecryptionFailed if we hold no key for its epoch
        (check :meth:`has` first to tell that case apart), or it is tampered, replayed or
        from another channel. ``windows``: the caller's own replay windows by (instance id,
        epoch) (each subscriber of a shared ring keeps its own), else the ring's."""
        entry = self._keys.get(msg.epoch)
        if windows is None:
            window = self._windows.get(msg.epoch)
        elif entry is None:
            window = None
        else:
            key = (self.instance_id, msg.epoch)
            window = windows.get(key)
            if window is None:
                for old in [k for k in windows if k[0] != self.instance_id or k[1] not in self._keys]:
                    del windows[old]
                window = windows[key] = ReplayWindow()
        if entry is None or window is None or msg.instance_id != self.instance_id or window.seen(msg.counter):
            self.rejected += 1
            raise DecryptionFailed()
        aead, prefix = entry
        try:
            plain = aead.open(_EVENT + _be8(msg.counter), msg.ciphertext, prefix + _tail1(8, msg.counter))
            inner = parse_inner_event(plain)
        except (DecryptionFailed, ProtocolError):
            self.rejected += 1
            raise DecryptionFailed() from None
        if inner.instance_id != msg.instance_id:
            self.rejected += 1
            raise DecryptionFailed()
        window.mark(msg.counter)
        return inner


class GroupKeys:
    """The instance's group keys: ``current`` seals events, ``next`` is already delivered so
    that a periodic rotation loses nothing. Epochs only grow."""

    def __init__(self, schema: str, cell: str, instance_id: bytes, *, epoch: int = 1, rng: Rng = os.urandom,
                 max_messages: int = MAX_MESSAGES_PER_KEY) -> None:
        self.schema, self.cell, self.instance_id = schema, cell, instance_id
        self._rng = rng
        self.max_messages = max_messages
        self.epoch = epoch
        self._current = P.random_key(rng)
        self._next = P.random_key(rng)
        self._aead = Aead(self._current)
        self._prefix = _event_prefix(schema, cell, instance_id, epoch)
        self.counter = 0

    def __repr__(self) -> str:
        return f"<GroupKeys {self.schema}@{self.cell} epoch={self.epoch} keys redacted>"

    def delivered(self) -> tuple[tuple[int, Secret], ...]:
        """What a newly entitled session gets: the current and the next key."""
        return ((self.epoch, self._current), (self.epoch + 1, self._next))

    @property
    def exhausted(self) -> bool:
        return self.counter >= self.max_messages

    def seal(self, frames: list[bytes]) -> SealedEvent:
        """A clear delta or heartbeat (its frames) sealed under the current key. The
        caller rotates when :attr:`exhausted` (this never seals past the limit)."""
        if self.counter >= MAX_MESSAGES_PER_KEY:
            raise SessionExhausted()
        self.counter += 1
        n = self.counter
        ct = self._aead.seal(_EVENT + _be8(n), inner_bytes(frames), self._prefix + _tail1(8, n))
        return SealedEvent(self.instance_id, self.epoch, n, ct)

    def rotate(self, *, exclude_next: bool) -> tuple[int, tuple[tuple[int, Secret], ...]]:
        """Move to a new epoch; (rekey epoch, keys to deliver to the entitled sessions).

        Periodic (``exclude_next=False``): the delivered next key becomes current and a new
        next is made; sessions get only the new next key. Revocation (``exclude_next=True``):
        the old next key went to everyone, including whoever is being left out, so both
        are replaced and sessions get the new current and next.
        """
        if exclude_next:
            self.epoch += 2
            self._current = P.random_key(self._rng)
        else:
            self.epoch += 1
            self._current = self._next
        self._next = P.random_key(self._rng)
        self._aead = Aead(self._current)
        self._prefix = _event_prefix(self.schema, self.cell, self.instance_id, self.epoch)
        self.counter = 0
        keys = ((self.epoch + 1, self._next),) if not exclude_next else self.delivered()
        return self.epoch + 1, keys
