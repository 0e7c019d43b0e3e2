"""Channel sequencing: the follower's join sequence and gap detection, the publisher's
sequencer, and a model test of the two over a lossy channel."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubicore.protocol import channel
from ubicore.protocol.channel import (
    Batch,
    ChannelFollower,
    ChannelSequencer,
    FeedResult,
    FollowState,
    ResyncReason,
)
from ubicore.protocol.messages import Change, Delta, Heartbeat, Op

IID = b"\x01" * 16
IID2 = b"\x02" * 16


def change(seq: int) -> tuple[Change, ...]:
    """The (recognisable) batch committed at ``seq``."""
    return (Change("r", Op.INSERT, (seq, f"v{seq}")),)


def delta(first: int, n: int = 1, iid: bytes = IID) -> Delta:
    return Delta(iid, first, tuple(change(first + i) for i in range(n)))


def seqs(res: FeedResult) -> list[int]:
    return [b.seq for b in res.batches]


def check_batches(res: FeedResult, expected: list[int]) -> None:
    assert res.batches == [Batch(s, change(s)) for s in expected]


def live_at(seq: int, iid: bytes = IID) -> ChannelFollower:
    f = ChannelFollower()
    res = f.dump_received(iid, seq)
    assert res == FeedResult([]) and f.state is FollowState.LIVE
    return f


# --- join: buffering until the dump -------------------------------------------------------


def test_starts_syncing_and_buffers_until_the_dump() -> None:
    f = ChannelFollower()
    assert f.state is FollowState.SYNCING
    for msg in (delta(1, 2), delta(3), Heartbeat(IID, 3), delta(4, 2), Heartbeat(IID, 9)):
        res = f.feed(msg)
        assert res.batches == () and res.resync is None
    assert f.state is FollowState.SYNCING and f.resyncs == 0


def test_buffered_deltas_at_or_below_the_dump_are_dropped_the_rest_released_in_order() -> None:
    f = ChannelFollower()
    for d in (delta(1, 2), delta(3), delta(4, 2), delta(6)):
        f.feed(d)
    res = f.dump_received(IID, 3)
    check_batches(res, [4, 5, 6])
    assert res.resync is None
    assert (f.state, f.instance_id, f.seq) == (FollowState.LIVE, IID, 6)


def test_a_delta_straddling_the_dump_sequence_is_trimmed() -> None:
    f = ChannelFollower()
    f.feed(delta(2, 4))  # sequences 2..5
    res = f.dump_received(IID, 3)
    check_batches(res, [4, 5])
    assert f.seq == 5


def test_everything_buffered_already_in_the_dump() -> None:
    f = ChannelFollower()
    f.feed(delta(1, 3))
    res = f.dump_received(IID, 7)
    assert res.batches == [] and res.resync is None
    assert (f.state, f.seq) == (FollowState.LIVE, 7)
    check_batches(f.feed(delta(8)), [8])


def test_a_gap_after_the_dump_while_buffering_resyncs() -> None:
    f = ChannelFollower()
    f.feed(delta(4))
    f.feed(delta(6))  # 5 was lost
    res = f.dump_received(IID, 3)
    check_batches(res, [4])
    assert res.resync is ResyncReason.GAP
    assert f.state is FollowState.SYNCING and f.resyncs == 1
    res = f.dump_received(IID, 6)  # the fresh dump: nothing of the old buffer survives
    assert res.batches == [] and f.seq == 6


def test_a_gap_right_after_the_dump_resyncs() -> None:
    f = ChannelFollower()
    f.feed(delta(5, 2))
    res = f.dump_received(IID, 3)
    assert res.batches == [] and res.resync is ResyncReason.GAP


def test_buffered_deltas_of_another_instance_are_ignored_at_the_dump() -> None:
    f = ChannelFollower()
    f.feed(delta(1, iid=IID2))
    f.feed(delta(3))
    f.feed(delta(2, iid=IID2))
    res = f.dump_received(IID, 2)
    check_batches(res, [3])
    assert f.instance_id == IID and res.resync is None


# --- live -------------------------------------------------------------------------------------


def test_live_releases_in_order() -> None:
    f = live_at(3)
    check_batches(f.feed(delta(4)), [4])
    check_batches(f.feed(delta(5, 3)), [5, 6, 7])
    assert f.seq == 7 and f.duplicates == 0 and f.resyncs == 0


def test_live_drops_and_counts_duplicates() -> None:
    f = live_at(3)
    f.feed(delta(4, 2))
    res = f.feed(delta(4, 2))
    assert res == FeedResult() and f.duplicates == 2
    res = f.feed(delta(2))
    assert res.batches == () and f.duplicates == 3
    check_batches(f.feed(delta(5, 3)), [6, 7])  # 5 again, then new ones
    assert f.duplicates == 4 and f.seq == 7 and f.state is FollowState.LIVE


def test_live_gap_resyncs() -> None:
    f = live_at(3)
    res = f.feed(delta(5))
    assert res.batches == () and res.resync is ResyncReason.GAP
    assert f.state is FollowState.SYNCING and f.resyncs == 1
    f.feed(delta(6))  # buffered while the fresh dump is in flight
    check_batches(f.dump_received(IID, 5), [6])


def test_live_new_instance_resyncs_and_keeps_the_delta_for_after_the_dump() -> None:
    f = live_at(9)
    res = f.feed(delta(1, iid=IID2))
    assert res.batches == () and res.resync is ResyncReason.NEW_INSTANCE
    assert f.state is FollowState.SYNCING and f.resyncs == 1
    f.feed(delta(2, iid=IID2))
    res = f.dump_received(IID2, 0)
    check_batches(res, [1, 2])
    assert (f.instance_id, f.seq) == (IID2, 2)


def test_kept_delta_of_the_new_instance_already_in_its_dump_is_dropped() -> None:
    f = live_at(9)
    f.feed(delta(1, iid=IID2))
    res = f.dump_received(IID2, 1)
    assert res.batches == [] and f.seq == 1


def test_live_heartbeat_of_a_new_instance_resyncs() -> None:
    f = live_at(9)
    res = f.feed(Heartbeat(IID2, 0))
    assert res.resync is ResyncReason.NEW_INSTANCE
    assert f.dump_received(IID2, 0).batches == []


def test_live_heartbeat_ahead_reveals_a_lost_tail() -> None:
    f = live_at(3)
    res = f.feed(Heartbeat(IID, 4))
    assert res.batches == () and res.resync is ResyncReason.GAP
    assert f.state is FollowState.SYNCING


@pytest.mark.parametrize("hb_seq", [3, 2, 0])
def test_live_heartbeat_at_or_behind_changes_nothing(hb_seq: int) -> None:
    f = live_at(3)
    assert f.feed(Heartbeat(IID, hb_seq)) == FeedResult()
    assert (f.state, f.seq, f.resyncs, f.duplicates) == (FollowState.LIVE, 3, 0, 0)


def test_buffer_overflow_resyncs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(channel, "MAX_BUFFERED_BATCHES", 3)
    f = ChannelFollower()
    assert f.feed(delta(1, 2)) == FeedResult()
    assert f.feed(delta(3)) == FeedResult()  # exactly the limit still waits
    res = f.feed(delta(4))
    assert res.batches == () and res.resync is ResyncReason.BUFFER_OVERFLOW
    assert f.state is FollowState.SYNCING and f.resyncs == 1
    f.feed(delta(5))
    check_batches(f.dump_received(IID, 4), [5])  # the overflowed buffer is gone


# --- the sequencer ----------------------------------------------------------------------------


def test_sequencer_numbers_commits_and_coalesces() -> None:
    s = ChannelSequencer(IID)
    assert s.take() is None and s.take_batches() is None and not s.has_pending
    assert [s.commit(change(i)) for i in (1, 2, 3)] == [1, 2, 3]
    assert s.has_pending and s.pending_batches == 3 and s.seq == 3
    assert s.take() == delta(1, 3)
    assert s.take() is None and s.pending_batches == 0
    assert s.commit(change(4)) == 4
    assert s.commit(change(5)) == 5
    assert s.take_batches() == (4, [change(4), change(5)])
    assert s.take() is None
    assert s.commit(change(6)) == 6
    d = s.take()
    assert d == delta(6) and d is not None and d.last_seq == 6


# --- model: a sequencer and a follower over a lossy channel ---------------------------------

KEYS = st.integers(0, 4)
edits = st.lists(st.tuples(KEYS, st.none() | st.integers(0, 9)), min_size=1, max_size=4)
fates = st.sampled_from(["deliver", "lose", "duplicate"])
# Each step names an action (repeats make it likelier: restarts are rare so that most runs
# exercise the join, trimming and gap paths of one instance) and carries every argument.
ACTIONS = ["commit"] * 4 + ["flush"] * 3 + ["deliver"] * 3 + ["dump"] * 2 + ["dump_arrives"] * 2
ACTIONS += ["heartbeat", "restart"]
Step = tuple[str, list[tuple[int, int | None]], str, int, bool]
steps_st = st.lists(
    st.tuples(st.sampled_from(ACTIONS), edits, fates, st.integers(1, 3), st.booleans()),
    min_size=10,
    max_size=60,
)

State = dict[int, int]


@dataclass
class Publisher:
    """An instance: its state, its sequencer, and what every sequence committed."""

    state: State = field(default_factory=dict)
    starts: int = 0
    seq: ChannelSequencer = field(init=False)
    history: dict[tuple[bytes, int], tuple[tuple[Change, ...], State]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.restart(keep_state=True)

    def restart(self, keep_state: bool) -> None:
        """A new instance id; unsent batches die with the old process."""
        self.starts += 1
        if not keep_state:
            self.state = {}
        self.seq = ChannelSequencer(bytes([self.starts]) * 16)

    def commit(self, edits: list[tuple[int, int | None]]) -> None:
        out = []
        for key, value in edits:
            if key not in self.state:
                out.append(Change("r", Op.INSERT, (key, value or 0)))
                self.state[key] = value or 0
            elif value is None:
                out.append(Change("r", Op.DELETE, (key,)))
                del self.state[key]
            else:
                out.append(Change("r", Op.UPDATE, (key, value)))
                self.state[key] = value
        n = self.seq.commit(tuple(out))
        self.history[(self.seq.instance_id, n)] = (tuple(out), dict(self.state))

    def dump(self) -> tuple[bytes, int, State]:
        return self.seq.instance_id, self.seq.seq, dict(self.state)


def apply(state: State, changes: tuple[Change, ...]) -> None:
    """Strict: applying a batch twice or out of order breaks an insert/update/delete."""
    for ch in changes:
        key = ch.row[0]
        if ch.op == Op.INSERT:
            assert key not in state
            state[key] = ch.row[1]
        elif ch.op == Op.UPDATE:
            assert key in state
            state[key] = ch.row[1]
        else:
            assert ch.op == Op.DELETE and key in state
            del state[key]


@dataclass
class Subscriber:
    """The owner of a follower: applies what it releases, asks for dumps on resync."""

    pub: Publisher
    follower: ChannelFollower = field(default_factory=ChannelFollower)
    state: State | None = None
    applied: int = 0
    dump_wanted: bool = True  # it subscribed first; now it wants its first dump
    in_flight: tuple[bytes, int, State] | None = None
    released_since_dump: list[int] = field(default_factory=list)

    def handle(self, res: FeedResult) -> None:
        for b in res.batches:
            assert self.state is not None and self.follower.instance_id is not None
            assert b.seq == self.applied + 1, "released out of order or twice"
            assert self.released_since_dump == [] or b.seq > self.released_since_dump[-1]
            changes, after = self.pub.history[(self.follower.instance_id, b.seq)]
            assert b.changes == changes
            apply(self.state, b.changes)
            assert self.state == after
            self.applied = b.seq
            self.released_since_dump.append(b.seq)
        if res.resync is not None:
            assert self.follower.state is FollowState.SYNCING
            self.dump_wanted = True

    def take_dump(self) -> None:
        if self.dump_wanted and self.in_flight is None:
            self.in_flight = self.pub.dump()
            self.dump_wanted = False

    def dump_arrives(self) -> None:
        if self.in_flight is not None:
            iid, seq, state = self.in_flight
            self.in_flight = None
            self.state, self.applied, self.released_since_dump = state, seq, []
            self.handle(self.follower.dump_received(iid, seq))


def publish(pub: Publisher, queue: list[Any], fate: str, msg: Any) -> None:
    if fate != "lose":
        queue.append(msg)
    if fate == "duplicate":
        queue.append(msg)


def flush(pub: Publisher, queue: list[Any], fate: str) -> None:
    d = pub.seq.take()
    if d is not None:
        publish(pub, queue, fate, d)


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(steps_st, fates)
def test_follower_converges_on_the_publisher_over_a_lossy_channel(steps: list[Step], last_fate: str) -> None:
    pub = Publisher()
    sub = Subscriber(pub)
    queue: list[Any] = []  # the channel, in order; lost messages never enter it

    def deliver(n: int) -> None:
        for msg in queue[:n]:
            sub.handle(sub.follower.feed(msg))
        del queue[:n]

    for action, batch_edits, fate, n, keep_state in steps:
        if action == "commit":
            pub.commit(batch_edits)
        elif action == "flush":
            flush(pub, queue, fate)
        elif action == "deliver":
            deliver(n)
        elif action == "heartbeat":  # as the service does: flush first, then the heartbeat
            flush(pub, queue, fate)
            publish(pub, queue, fate, Heartbeat(pub.seq.instance_id, pub.seq.seq))
        elif action == "dump":
            sub.take_dump()
        elif action == "dump_arrives":
            sub.dump_arrives()
        else:
            pub.restart(keep_state)

    # The end: the last batches go out (perhaps lost), everything in flight arrives,
    # then heartbeat and dump cycles until the follower is at rest.
    flush(pub, queue, last_fate)
    deliver(len(queue))
    sub.dump_arrives()
    for _ in range(3):
        sub.handle(sub.follower.feed(Heartbeat(pub.seq.instance_id, pub.seq.seq)))
        if not sub.dump_wanted:
            break
        sub.take_dump()
        sub.dump_arrives()
    assert not sub.dump_wanted
    assert sub.follower.state is FollowState.LIVE
    assert (sub.follower.instance_id, sub.follower.seq) == (pub.seq.instance_id, pub.seq.seq)
    assert sub.state == pub.state


def test_batches_the_dump_already_holds_are_not_counted_as_duplicates() -> None:
    iid = b"\x07" * 16
    f = ChannelFollower()
    b = (Change("r", 1, ("k",)),)
    f.feed(Delta(iid, 1, (b, b, b)))
    res = f.dump_received(iid, 2)
    assert [x.seq for x in res.batches] == [3] and f.duplicates == 0
    f.feed(Delta(iid, 3, (b,)))  # the channel repeats batch 3: a real duplicate
    assert f.duplicates == 1
