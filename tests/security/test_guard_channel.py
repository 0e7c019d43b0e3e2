"""The instance's group keys on its event channel (ubicore/security/guard.py), sans-IO, with an
injected clock: events clear below ``full``, rotation at the message limit and on a timer,
rekeys, and what level changes and policy changes (a user removed, a read right lost) do
to sessions and to who can read the next event.
"""
from __future__ import annotations

import pytest

from ubicore.errors import AuthenticationRequired, PermissionDenied
from ubicore.protocol.codec import parse_channel_message
from ubicore.schema import Protection
from ubicore.security.policy import Right
from ubicore.security.session import MAX_MESSAGES_PER_KEY

from .guard_support import (
    GROUPS,
    HB,
    KDF,
    Clock,
    _confirm_args,
    _hello,
    can_read,
    event,
    login,
    make_guard,
    make_policy,
    open_events,
    request,
)

# --- the channel --------------------------------------------------------------------------------


@pytest.mark.parametrize("level", [Protection.OPEN, Protection.UPDATE])
def test_events_are_clear_below_full(level: Protection) -> None:
    g = make_guard(level)
    assert g.seal_event(HB) == [HB]
    assert g.rotate("x") == [] and g.revoke(set()) == []


def test_message_limit_rotates_first() -> None:
    g = make_guard(Protection.FULL, rotate_after_messages=3)
    c = login(g, "reader")
    late = login(g, "reader2")
    epoch = g.epoch
    evs = [event(g) for _ in range(3)]
    assert [e.counter for e in evs] == [1, 2, 3] and {e.epoch for e in evs} == {epoch}
    rekeys, events = open_events(out := g.seal_event(HB))
    assert parse_channel_message(out[0]) == rekeys[0]  # the rekey goes out before the event
    assert len(rekeys) == 1 and len(events) == 1
    assert events[0].epoch == epoch + 1 and events[0].counter == 1 and rekeys[0].epoch == epoch + 2
    assert {sid for sid, _ in rekeys[0].entries} == {c.session_id, late.session_id}
    assert c.open_rekey(rekeys[0])
    assert all(can_read(c, e) for e in evs + events)
    assert can_read(late, events[0])  # periodic: without the rekey too (it holds the next key)


def test_never_seals_past_max_messages_per_key() -> None:
    g = make_guard(Protection.FULL, rotate_after_messages=2**40)
    assert g.keys.max_messages == MAX_MESSAGES_PER_KEY
    c = login(g, "reader")
    g.keys.counter = MAX_MESSAGES_PER_KEY - 1
    last = event(g)
    assert last.counter == MAX_MESSAGES_PER_KEY and can_read(c, last)
    rekeys, events = open_events(g.seal_event(HB))
    assert len(rekeys) == 1 and events[0].counter == 1 and events[0].epoch == last.epoch + 1
    assert can_read(c, events[0])


def test_periodic_rotation_by_tick() -> None:
    clock = Clock()
    g = make_guard(Protection.FULL, clock=clock, rotation_s=600.0, session_ttl_s=10_000.0)
    c = login(g, "reader")
    epoch = g.epoch
    clock.now += 599.0
    assert g.tick() == [] and g.epoch == epoch
    clock.now += 1.0
    rekeys, _ = open_events(g.tick())
    assert g.epoch == epoch + 1 and g.stats.rotations == 1
    assert [sid for sid, _ in rekeys[0].entries] == [c.session_id]
    assert can_read(c, event(g))  # without the rekey: the next key was delivered at login
    assert g.tick() == []  # the timer restarted
    clock.now += 600.0
    open_events(g.tick())
    assert g.epoch == epoch + 2
    assert not can_read(c, event(g))  # two rotations on, the rekeys are needed ...
    assert c.open_rekey(rekeys[0])
    assert can_read(c, event(g))  # ... and the first one suffices


def test_tick_never_rotates_below_full() -> None:
    clock = Clock()
    g = make_guard(Protection.UPDATE, clock=clock, rotation_s=1.0)
    epoch = g.epoch
    clock.now += 100
    assert g.tick() == [] and g.epoch == epoch


def test_rekey_epochs_and_nonces_increase_over_mixed_rotations() -> None:
    g = make_guard(Protection.FULL)
    c = login(g, "reader")
    other = login(g, "reader2")
    epochs = []
    for i, kind in enumerate(["periodic", "revoke", "periodic", "periodic", "revoke"]):
        if kind == "periodic":
            out = g.rotate("test")
        else:
            victim = login(g, "writer")
            out = g.revoke({victim.session_id})
        rekeys, _ = open_events(out)
        epochs.append(rekeys[0].epoch)
        assert c.open_rekey(rekeys[0]) and other.open_rekey(rekeys[0])
        ev = event(g)
        assert can_read(c, ev) and can_read(other, ev)
    assert epochs == sorted(set(epochs))


# --- level changes and policy changes ----------------------------------------------------------


def test_set_level_moves_to_a_new_epoch_and_ends_sessions() -> None:
    g = make_guard(Protection.UPDATE)
    c = login(g, "writer")
    hs, reply = _hello(g, "reader", b"p")
    args = _confirm_args(hs, reply)
    epoch = g.epoch
    assert g.set_level(Protection.FULL)
    assert g.level is Protection.FULL and g.epoch > epoch and not g.sessions
    with pytest.raises(AuthenticationRequired):
        g.open(c.seal_request(request(1)))
    grant = g.confirm(b"p", args)  # a login begun under the old level finishes at the new one
    assert grant["version"] == g.epoch
    c2 = login(g, "reader")
    assert c2.level == "full" and c2.epoch == g.epoch and can_read(c2, event(g))
    assert not can_read(c, event(g))
    epoch = g.epoch
    assert not g.set_level(Protection.FULL) and g.epoch == epoch and g.sessions
    assert g.set_level(Protection.OPEN) and g.epoch > epoch and not g.sessions
    assert g.seal_event(HB) == [HB]


def test_reevaluate_only_acts_on_a_real_loss() -> None:
    g = make_guard(Protection.FULL)
    a, b, w = login(g, "reader"), login(g, "reader2"), login(g, "writer")
    epoch = g.epoch
    assert g.reevaluate() == []
    g.policy.add_user("dave", "x", Right.READ, kdf=KDF)  # nobody logged in as dave
    g.policy.set_right("writer", Right.READ)  # still reads
    assert g.reevaluate() == [] and g.epoch == epoch and len(g.sessions) == 3
    n = login(g, "nobody")  # never had the read right: losing nothing
    g.policy.set_right("nobody", Right.NONE)
    assert g.reevaluate() == [] and g.epoch == epoch
    assert {a.session_id, b.session_id, w.session_id, n.session_id} == set(g.sessions)


def test_reevaluate_drops_removed_users_and_rotates_away() -> None:
    g = make_guard(Protection.FULL)
    a, b, w = login(g, "reader"), login(g, "reader2"), login(g, "writer")
    g.policy.remove_user("reader2")
    rekeys, _ = open_events(g.reevaluate())
    assert b.session_id not in g.sessions and len(g.sessions) == 2
    assert {sid for sid, _ in rekeys[0].entries} == {a.session_id, w.session_id}
    assert a.open_rekey(rekeys[0]) and w.open_rekey(rekeys[0]) and not b.open_rekey(rekeys[0])
    for _ in range(3):
        ev = event(g)
        assert can_read(a, ev) and can_read(w, ev) and not can_read(b, ev)
    with pytest.raises(AuthenticationRequired):
        g.open(b.seal_request(request(1)))


def test_reevaluate_rotates_away_from_a_session_that_lost_read() -> None:
    g = make_guard(Protection.FULL, policy=make_policy(GROUPS))
    a, w = login(g, "reader"), login(g, "writer")
    epoch = g.epoch
    g.policy.set_right("reader", Right.NONE)
    rekeys, _ = open_events(g.reevaluate())
    assert g.epoch == epoch + 2
    assert a.session_id not in g.sessions  # ended: a new login checks the rights afresh
    assert [sid for sid, _ in rekeys[0].entries] == [w.session_id]
    assert not a.open_rekey(rekeys[0]) and w.open_rekey(rekeys[0])
    ev = event(g)
    assert can_read(w, ev) and not can_read(a, ev)
    with pytest.raises(AuthenticationRequired):
        g.open(a.seal_request(request(1)))
    again = login(g, "reader")
    s, _ = g.open(again.seal_request(request(1)))
    with pytest.raises(PermissionDenied):
        g.group_keys_for(s)
    open_events(g.rotate("periodic"))  # later rotations leave it out too
    assert g.reevaluate() == []  # and it is not "lost" a second time
    later = event(g)
    assert not can_read(a, later) and can_read(w, later)


def test_reevaluate_below_full_drops_sessions_without_rotating() -> None:
    g = make_guard(Protection.UPDATE)
    a, w = login(g, "reader"), login(g, "writer")
    epoch = g.epoch
    g.policy.remove_user("reader")
    g.policy.set_right("writer", Right.NONE)
    assert g.reevaluate() == [] and g.epoch == epoch
    assert set(g.sessions) == {w.session_id}
