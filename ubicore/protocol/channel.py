"""Event channel sequencing, sans-IO: the join sequence and gap detection.

Theory of operation. An instance stamps each committed transaction with
(instance id, sequence), sequences counting 1, 2, 3… from each start; a dump is a
snapshot stamped with the sequence it includes. A follower joins by subscribing first,
*then* asking for a dump, so that no batch falls between the two:

1. ``SYNCING``: every delta that arrives is buffered.
2. ``dump_received(instance_id, seq)``: buffered batches of that instance with sequence
   ≤ seq are already in the dump and dropped; the rest must continue at seq + 1 without
   a hole and are released in order. The follower is ``LIVE``.
3. ``LIVE``: a batch at the expected sequence is released; one at or below the current
   sequence is a duplicate and dropped; one above it means batches were lost (a slow
   subscriber past its high-water mark) and a new instance id means a restart. Both
   move the follower back to ``SYNCING`` and ask the owner for a fresh dump.
   A heartbeat that shows a sequence beyond ours reveals a lost tail the same way.

The follower never touches a socket: ``feed`` returns the batches to apply and whether
a dump is needed, and the owner does the I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from .messages import Change, Delta, Heartbeat, PlainChannelMessage, Welcome

MAX_BUFFERED_BATCHES = 1_000_000
"""While a dump is in flight, at most this many batches wait; past it the whole buffer
is dropped and a fresh dump asked for (the join starts over)."""


class FollowState(enum.Enum):
    SYNCING = "syncing"
    LIVE = "live"


class ResyncReason(enum.Enum):
    GAP = "gap"
    NEW_INSTANCE = "new instance"
    BUFFER_OVERFLOW = "buffer overflow"


class Batch(NamedTuple):
    """One committed transaction to apply, with its sequence number. (A named tuple, not
    a dataclass: followers make one per batch on the channel's hot path.)"""

    seq: int
    changes: tuple[Change, ...]


@dataclass(frozen=True, slots=True)
class FeedResult:
    """What the owner must do after a feed: apply ``batches`` in order, and ask for a
    fresh dump if ``resync`` is set."""

    batches: Sequence[Batch] = ()
    resync: ResyncReason | None = None


_NOTHING = FeedResult()
_new_batch = tuple.__new__


@dataclass(slots=True)
class ChannelFollower:
    """Follows one instance's channel through the join sequence (see module doc)."""

    state: FollowState = FollowState.SYNCING
    instance_id: bytes | None = None
    seq: int = 0
    resyncs: int = 0
    duplicates: int = 0
    _buffer: list[Delta] = field(default_factory=list)
    _buffered: int = 0

    def feed(self, msg: PlainChannelMessage) -> FeedResult:
        if isinstance(msg, Welcome):
            return _NOTHING  # for the owner's join timing; no state
        if self.state is FollowState.SYNCING:
            if isinstance(msg, Delta):
                self._buffer.append(msg)
                self._buffered += len(msg.batches)
                if self._buffered > MAX_BUFFERED_BATCHES:
                    self._buffer.clear()
                    self._buffered = 0
                    return self._resync(ResyncReason.BUFFER_OVERFLOW)
            return _NOTHING
        if msg.instance_id != self.instance_id:
            return self._resync(ResyncReason.NEW_INSTANCE, keep=msg)
        if isinstance(msg, Heartbeat):
            if msg.seq > self.seq:
                return self._resync(ResyncReason.GAP)
            return _NOTHING
        return self._advance(msg)

    def dump_received(self, instance_id: bytes, seq: int) -> FeedResult:
        """The dump stamped (instance_id, seq) was applied; release what follows it."""
        self.instance_id = instance_id
        self.seq = seq
        self.state = FollowState.LIVE
        pending, self._buffer, self._buffered = self._buffer, [], 0
        released: list[Batch] = []
        duplicates = self.duplicates  # batches the dump already holds are not channel duplicates
        for delta in pending:
            if delta.instance_id != instance_id:
                continue  # from the instance before a restart, or from a newer one: see below
            res = self._advance(delta)
            released.extend(res.batches)
            if res.resync is not None:
                self.duplicates = duplicates
                return FeedResult(released, res.resync)
        self.duplicates = duplicates
        # A delta from an instance other than the dump's (a restart raced the dump) shows up
        # again on the next heartbeat or delta and triggers NEW_INSTANCE then.
        return FeedResult(released)

    def _advance(self, delta: Delta) -> FeedResult:
        expected = self.seq + 1
        first = delta.first_seq
        if first > expected:
            return self._resync(ResyncReason.GAP)
        batches = delta.batches
        if first < expected:
            skip = expected - first
            if skip >= len(batches):
                self.duplicates += len(batches)
                return _NOTHING
            self.duplicates += skip
            batches = batches[skip:]
            first = expected
        self.seq = first + len(batches) - 1
        return FeedResult([_new_batch(Batch, (first + i, b)) for i, b in enumerate(batches)])

    def resync(self, reason: ResyncReason) -> FeedResult:
        """Give up the current copy (the owner found it suspect) and ask for a dump."""
        return self._resync(reason)

    def _resync(self, reason: ResyncReason, keep: Delta | Heartbeat | None = None) -> FeedResult:
        self.state = FollowState.SYNCING
        self.resyncs += 1
        self._buffer = []
        self._buffered = 0
        if isinstance(keep, Delta):
            self._buffer.append(keep)
            self._buffered = len(keep.batches)
        return FeedResult((), reason)


@dataclass(slots=True)
class ChannelSequencer:
    """The publishing side: numbers commits and coalesces those not yet sent.

    ``commit`` stamps a batch with the next sequence; ``take`` hands back every batch
    committed since the last ``take`` as one delta, so commits made back to back travel
    in one message.
    """

    instance_id: bytes
    seq: int = 0
    _pending: list[tuple[Change, ...]] = field(default_factory=list)
    _pending_first: int = 1

    def commit(self, changes: tuple[Change, ...]) -> int:
        if not self._pending:
            self._pending_first = self.seq + 1
        self.seq += 1
        self._pending.append(changes)
        return self.seq

    @property
    def has_pending(self) -> bool:
        return bool(self._pending)

    @property
    def pending_batches(self) -> int:
        return len(self._pending)

    def take_batches(self) -> tuple[int, list[tuple[Change, ...]]] | None:
        """(first sequence, batches) committed since the last take, or None."""
        if not self._pending:
            return None
        out = (self._pending_first, self._pending)
        self._pending = []
        return out

    def take(self) -> Delta | None:
        taken = self.take_batches()
        return None if taken is None else Delta(self.instance_id, taken[0], tuple(taken[1]))
