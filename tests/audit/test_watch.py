"""Tests for ubicore.audit.watch: thresholds over sliding windows, lockout back-off, bounds.

Times are explicit floats; nothing sleeps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ubicore.audit.watch import Alert, Lockout, Watch
from ubicore.config.model import AuditConfig, Threshold

DEFAULT = AuditConfig()


def fail(watch: Watch, t: float, user: str, address: str = "10.0.0.1") -> list[Alert]:
    return watch.observe(time=t, action="login", outcome="failed", principal=user, address=address)


def fail_n(watch: Watch, t: float, user: str, n: int, address: str = "10.0.0.1",
           step: float = 0.0) -> list[Alert]:
    alerts: list[Alert] = []
    for i in range(n):
        alerts += fail(watch, t + i * step, user, address)
    return alerts


def per_user(alerts: Iterable[Alert]) -> list[Alert]:
    return [a for a in alerts if a.kind == "failed_logins_per_user"]


# -- per user: the exact crossing, the lockout and its back-off --------------------------


def test_fifth_failure_fires_and_locks_for_base() -> None:
    watch = Watch(DEFAULT)
    for i in range(4):
        assert fail(watch, 100.0 + i, "alice") == []
    assert watch.locked("user", "alice", 103.0) is None
    alerts = fail(watch, 104.0, "alice")
    assert alerts == [Alert(104.0, "failed_logins_per_user", "alice", 5, 60.0, 30.0)]
    assert watch.locked("user", "alice", 104.0) == Lockout("user", "alice", 104.0, 134.0, 1)
    assert watch.locked("address", "10.0.0.1", 104.0) is None  # 5 < 20 per address


def test_locked_until_exactly_since_plus_base() -> None:
    watch = Watch(DEFAULT)
    fail_n(watch, 0.0, "alice", 5)
    # A correct password now is refused by the caller, and does not reset anything.
    assert watch.observe(time=10.0, action="login", outcome="ok", principal="alice",
                         address="10.0.0.1") == []
    assert watch.locked("user", "alice", 29.999) is not None
    assert watch.locked("user", "alice", 30.0) is None
    assert watch.lockouts(30.0) == []
    assert watch.lockouts(29.0) == [Lockout("user", "alice", 0.0, 30.0, 1)]


def test_success_does_not_reset_the_window() -> None:
    watch = Watch(DEFAULT)
    fail_n(watch, 0.0, "alice", 4)
    watch.observe(time=1.0, action="login", outcome="ok", principal="alice", address="10.0.0.1")
    assert per_user(fail(watch, 2.0, "alice"))  # the 5th failure still fires


def test_next_crossing_doubles_up_to_max() -> None:
    config = dataclasses.replace(DEFAULT, lockout_base_s=30.0, lockout_max_s=100.0)
    watch = Watch(config)
    expected = [30.0, 60.0, 100.0, 100.0]
    t = 0.0
    for strikes, duration in enumerate(expected, start=1):
        [alert] = per_user(fail_n(watch, t, "alice", 5))
        assert alert.lockout_s == duration
        lock = watch.locked("user", "alice", t)
        assert lock == Lockout("user", "alice", t, t + duration, strikes)
        t = lock.until + 1.0  # after it ends, well within forget_s


def test_continuing_attack_fires_every_count_events_not_every_event() -> None:
    watch = Watch(DEFAULT)
    alerts = per_user(fail_n(watch, 0.0, "alice", 15, step=0.1))
    assert [round(a.time, 1) for a in alerts] == [0.4, 0.9, 1.4]
    assert [a.lockout_s for a in alerts] == [30.0, 60.0, 120.0]
    lock = watch.locked("user", "alice", 2.0)
    assert lock is not None and lock.strikes == 3
    assert lock.until == pytest.approx(1.4 + 120.0)


def test_a_lockout_is_never_shortened() -> None:
    config = dataclasses.replace(DEFAULT, lockout_base_s=1000.0, lockout_max_s=1000.0)
    watch = Watch(config)
    fail_n(watch, 0.0, "alice", 5)
    fail_n(watch, 10.0, "alice", 5)  # capped at 1000 s, counted from 10: ends later
    lock = watch.locked("user", "alice", 500.0)
    assert lock is not None and (lock.since, lock.until, lock.strikes) == (10.0, 1010.0, 2)


def test_strikes_forgotten_after_forget_s() -> None:
    config = dataclasses.replace(DEFAULT, lockout_forget_s=500.0)
    watch = Watch(config)
    fail_n(watch, 0.0, "alice", 5)  # until 30
    fail_n(watch, 100.0, "alice", 5)  # 70 s after: strikes 2, 60 s, until 160
    assert watch.locked("user", "alice", 100.0) == Lockout("user", "alice", 100.0, 160.0, 2)
    assert [lock.subject for lock in watch.remembered(659.0)] == ["alice"]
    assert watch.remembered(660.0) == []
    [alert] = per_user(fail_n(watch, 660.0, "alice", 5))  # exactly forget_s after 160
    assert alert.lockout_s == 30.0
    assert watch.locked("user", "alice", 660.0) == Lockout("user", "alice", 660.0, 690.0, 1)


def test_just_before_forget_s_still_doubles() -> None:
    config = dataclasses.replace(DEFAULT, lockout_forget_s=500.0)
    watch = Watch(config)
    fail_n(watch, 0.0, "alice", 5)  # until 30
    [alert] = per_user(fail_n(watch, 529.0, "alice", 5))
    assert alert.lockout_s == 60.0


# -- per address: the password sprayer ----------------------------------------------------


def test_sprayer_locks_the_address_not_the_users() -> None:
    watch = Watch(DEFAULT)
    alerts: list[Alert] = []
    for i in range(19):
        alerts += fail(watch, float(i), f"user{i}", "203.0.113.9")
    assert alerts == []
    alerts = fail(watch, 19.0, "user19", "203.0.113.9")
    assert alerts == [Alert(19.0, "failed_logins_per_address", "203.0.113.9", 20, 60.0, 30.0)]
    assert watch.locked("address", "203.0.113.9", 19.0) == Lockout(
        "address", "203.0.113.9", 19.0, 49.0, 1)
    assert all(watch.locked("user", f"user{i}", 19.0) is None for i in range(20))
    assert watch.lockouts(20.0) == [Lockout("address", "203.0.113.9", 19.0, 49.0, 1)]
    assert watch.locked("address", "203.0.113.10", 19.0) is None


def test_user_and_address_fire_together() -> None:
    config = dataclasses.replace(DEFAULT, failed_logins_per_address=Threshold(5, 60.0))
    watch = Watch(config)
    alerts = fail_n(watch, 0.0, "alice", 5)
    assert [(a.kind, a.subject) for a in alerts] == [
        ("failed_logins_per_user", "alice"), ("failed_logins_per_address", "10.0.0.1")]
    assert [(lock.kind, lock.subject) for lock in watch.lockouts(1.0)] == [
        ("address", "10.0.0.1"), ("user", "alice")]


def test_empty_address_or_principal_is_not_counted() -> None:
    config = dataclasses.replace(DEFAULT, failed_logins_per_address=Threshold(1, 60.0),
                                 failed_logins_per_user=Threshold(1, 60.0))
    watch = Watch(config)
    assert [a.kind for a in fail(watch, 0.0, "alice", "")] == ["failed_logins_per_user"]
    assert [a.kind for a in fail(watch, 1.0, "", "10.0.0.1")] == ["failed_logins_per_address"]
    assert watch.locked("address", "", 1.0) is None and watch.locked("user", "", 1.0) is None


# -- alert-only thresholds ----------------------------------------------------------------


def test_denials_alert_without_lockout() -> None:
    watch = Watch(DEFAULT)
    alerts: list[Alert] = []
    for i in range(40):
        alerts += watch.observe(time=float(i), action="denied", outcome="", principal="bob",
                                address="10.0.0.2")
    assert alerts == [Alert(19.0, "denials_per_user", "bob", 20, 60.0, 0.0),
                      Alert(39.0, "denials_per_user", "bob", 20, 60.0, 0.0)]
    assert watch.lockouts(39.0) == [] and watch.remembered(39.0) == []


def test_rejected_alert_per_address_without_lockout() -> None:
    watch = Watch(DEFAULT)
    alerts: list[Alert] = []
    for i in range(50):
        alerts += watch.observe(time=i / 10, action="rejected", outcome="replayed",
                                principal=f"u{i}", address="198.51.100.7")
    assert alerts == [Alert(4.9, "rejected_per_address", "198.51.100.7", 50, 60.0, 0.0)]
    assert watch.lockouts(5.0) == []


def test_other_events_count_nothing() -> None:
    config = dataclasses.replace(DEFAULT, failed_logins_per_user=Threshold(1, 60.0))
    watch = Watch(config)
    for action, outcome in [("login", "ok"), ("update", "failed"), ("start", ""), ("login", "")]:
        assert watch.observe(time=0.0, action=action, outcome=outcome, principal="alice",
                             address="10.0.0.1") == []
    assert watch.tracked == 0


# -- windows slide ------------------------------------------------------------------------


def test_failures_spread_wider_than_the_window_never_fire() -> None:
    watch = Watch(DEFAULT)
    # 4 failures in any 60 s, for an hour: 15 s apart, so the 5th is 60 s after the 1st.
    assert fail_n(watch, 0.0, "alice", 240, step=15.0) == []
    assert watch.lockouts(3600.0) == []
    # 14.9 s apart: five fit in 59.6 s.
    assert per_user(fail_n(watch, 10_000.0, "bob", 5, step=14.9))


def test_the_window_edge_is_exclusive() -> None:
    config = dataclasses.replace(DEFAULT, failed_logins_per_user=Threshold(2, 10.0))
    watch = Watch(config)
    assert fail(watch, 0.0, "alice") == []
    assert per_user(fail(watch, 10.0, "alice")) == []  # 0.0 is exactly window_s old: gone
    assert per_user(fail(watch, 19.99, "alice"))


def test_time_going_backwards_is_taken_as_the_latest_time() -> None:
    config = dataclasses.replace(DEFAULT, failed_logins_per_user=Threshold(2, 10.0))
    watch = Watch(config)
    fail(watch, 100.0, "alice")
    [alert] = per_user(fail(watch, 50.0, "alice"))
    assert alert.time == 100.0
    assert watch.locked("user", "alice", 129.0) is not None


# -- the operator's clear, and restore after a restart ------------------------------------


def test_clear_lifts_the_lockout_resets_strikes_and_window() -> None:
    watch = Watch(DEFAULT)
    fail_n(watch, 0.0, "alice", 5)
    fail_n(watch, 31.0, "alice", 5)  # strikes 2
    fail_n(watch, 40.0, "alice", 4)  # 4 in the window
    assert watch.clear("user", "alice") is True
    assert watch.locked("user", "alice", 41.0) is None
    assert watch.clear("user", "alice") is False
    assert fail(watch, 41.0, "alice") == []  # the window starts empty
    [alert] = per_user(fail_n(watch, 42.0, "alice", 4))
    assert alert.lockout_s == 30.0  # strikes start again


def test_clear_of_an_address_and_unknown_kind() -> None:
    watch = Watch(DEFAULT)
    for i in range(20):
        fail(watch, 0.0, f"u{i}", "203.0.113.9")
    assert watch.clear("user", "203.0.113.9") is False
    assert watch.locked("address", "203.0.113.9", 1.0) is not None
    assert watch.clear("address", "203.0.113.9") is True
    assert watch.lockouts(1.0) == []
    with pytest.raises(ValueError, match="'user' or 'address'"):
        watch.clear("host", "x")
    with pytest.raises(ValueError):
        watch.locked("failed_logins_per_user", "x", 0.0)


def test_restore_keeps_lockouts_and_back_off() -> None:
    first = Watch(DEFAULT)
    fail_n(first, 0.0, "alice", 5)
    fail_n(first, 31.0, "alice", 5)  # strikes 2, until 91
    for i in range(20):
        fail(first, 50.0, f"u{i}", "203.0.113.9")  # address until 80
    saved = first.remembered(60.0)
    assert [(s.kind, s.subject, s.strikes) for s in saved] == [
        ("address", "203.0.113.9", 1), ("user", "alice", 2)]

    second = Watch(DEFAULT)
    second.restore(saved)
    assert second.lockouts(60.0) == first.lockouts(60.0)
    assert second.locked("user", "alice", 90.0) == Lockout("user", "alice", 31.0, 91.0, 2)
    assert second.locked("user", "alice", 91.0) is None
    [alert] = per_user(fail_n(second, 100.0, "alice", 5))
    assert alert.lockout_s == 120.0  # the third strike
    with pytest.raises(ValueError):
        second.restore([Lockout("host", "x", 0.0, 1.0, 1)])


# -- bounded memory -----------------------------------------------------------------------


def test_memory_bounded_under_a_flood_of_distinct_names() -> None:
    watch = Watch(DEFAULT, max_subjects=1000)
    fail_n(watch, 0.0, "alice", 5, address="")  # locked until 30
    for i in range(100_000):
        watch.observe(time=1.0 + i * 1e-5, action="login", outcome="failed",
                      principal=f"guess-{i}", address=f"10.{i >> 16}.{(i >> 8) & 255}.{i & 255}")
        if i % 4 == 0:
            watch.observe(time=1.0 + i * 1e-5, action="denied", outcome="", principal=f"d{i}",
                          address="")
            watch.observe(time=1.0 + i * 1e-5, action="rejected", outcome="", principal="",
                          address=f"r{i}")
    assert watch.tracked <= 4 * 1000 + 2 * 1000
    # Every distinct address fired 1 < 20 per address: the address windows are bounded too.
    assert watch.locked("user", "alice", 2.0) == Lockout("user", "alice", 0.0, 30.0, 1)


def test_memory_bounded_under_a_flood_of_lockouts_sparing_active_ones() -> None:
    config = dataclasses.replace(DEFAULT, failed_logins_per_user=Threshold(1, 60.0),
                                 lockout_base_s=10.0, lockout_max_s=1000.0,
                                 lockout_forget_s=1000.0)
    watch = Watch(config, max_subjects=4)
    for name in ("old1", "old2", "old3", "alice"):
        fail(watch, 0.0, name, "")  # until 10
    fail(watch, 20.0, "alice", "")  # strikes 2, 20 s: until 40; the old ones ended
    for i in range(2000):  # each until t + 10 <= 39.99 < 40
        fail(watch, 21.0 + i * 0.004, f"spray-{i}", "")
        assert watch.tracked <= 4 + 4  # windows + lockout records
    assert watch.locked("user", "alice", 39.0) == Lockout("user", "alice", 20.0, 40.0, 2)
    assert watch.locked("user", "old1", 1.0) is None  # its remembered strikes went first
    [alert] = per_user(fail(watch, 40.0, "alice", ""))
    assert alert.lockout_s == 40.0  # alice's strikes survived the flood


def test_active_lockouts_are_dropped_only_down_to_the_limit() -> None:
    config = dataclasses.replace(DEFAULT, failed_logins_per_user=Threshold(1, 60.0),
                                 lockout_base_s=100.0, lockout_max_s=1000.0)
    watch = Watch(config, max_subjects=4)
    for i in range(5):
        fail(watch, float(i), f"u{i}", "")  # all five in force until 100 + i
    assert [lock.subject for lock in watch.lockouts(5.0)] == ["u1", "u2", "u3", "u4"]


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        Watch(DEFAULT, max_subjects=0)
    with pytest.raises(ValueError):
        Watch(dataclasses.replace(DEFAULT, denials_per_user=Threshold(0, 60.0)))
    with pytest.raises(ValueError):
        Watch(dataclasses.replace(DEFAULT, lockout_base_s=100.0, lockout_max_s=10.0))


def test_huge_strikes_do_not_overflow() -> None:
    watch = Watch(DEFAULT)
    watch.restore([Lockout("user", "alice", 0.0, 1.0, 10_000)])
    [alert] = per_user(fail_n(watch, 2.0, "alice", 5))
    assert alert.lockout_s == DEFAULT.lockout_max_s


# -- property: the sliding windows match a brute-force recount ----------------------------

_KINDS = {
    "failed_logins_per_user": ("login", "failed", "principal"),
    "failed_logins_per_address": ("login", "failed", "address"),
    "denials_per_user": ("denied", "", "principal"),
    "rejected_per_address": ("rejected", "", "address"),
}

_events = st.lists(st.tuples(
    st.sampled_from([0.0, 0.0, 0.25, 0.5, 1.0, 3.0, 7.5]),  # time step
    st.sampled_from([("login", "failed"), ("login", "failed"), ("login", "ok"), ("denied", ""),
                     ("rejected", "")]),
    st.sampled_from(["a", "b", ""]),
    st.sampled_from(["x", "y", ""]),
), max_size=80)


def _recount(config: AuditConfig, events: list[tuple[float, str, str, str, str]]
             ) -> list[tuple[float, str, str, int]]:
    """Alerts by brute force: at each event, count this subject's events since its last
    alert that lie within the window, straight from the event list."""
    fired: list[tuple[float, str, str, int]] = []
    last_alert: dict[tuple[str, str], int] = {}
    for i, (t, action, outcome, principal, address) in enumerate(events):
        for kind, (k_action, k_outcome, field) in _KINDS.items():
            if action != k_action or (k_outcome and outcome != k_outcome):
                continue
            subject = principal if field == "principal" else address
            if not subject:
                continue
            threshold: Threshold = getattr(config, kind)
            since = last_alert.get((kind, subject), -1)
            count = 0
            for j in range(since + 1, i + 1):
                tj, aj, oj, pj, adj = events[j]
                same = aj == k_action and (not k_outcome or oj == k_outcome)
                if same and (pj if field == "principal" else adj) == subject \
                        and tj > t - threshold.window_s:
                    count += 1
            if count >= threshold.count:
                fired.append((t, kind, subject, count))
                last_alert[kind, subject] = i
    return fired


@settings(max_examples=300, deadline=None)
@given(events=_events, counts=st.lists(st.integers(1, 5), min_size=4, max_size=4),
       windows=st.lists(st.sampled_from([0.5, 1.0, 2.5, 10.0]), min_size=4, max_size=4),
       max_subjects=st.sampled_from([1, 2, 10]))
def test_windows_match_a_brute_force_recount(
        events: list[tuple[float, tuple[str, str], str, str]], counts: list[int],
        windows: list[float], max_subjects: int) -> None:
    thresholds: dict[str, Any] = {
        kind: Threshold(c, w) for kind, c, w in zip(_KINDS, counts, windows, strict=True)}
    config = dataclasses.replace(DEFAULT, **thresholds)
    flat: list[tuple[float, str, str, str, str]] = []
    t = 0.0
    for step, (action, outcome), principal, address in events:
        t += step
        flat.append((t, action, outcome, principal, address))
    watch = Watch(config, max_subjects=10)  # 2 subjects per kind + "": never evicts
    got: list[tuple[float, str, str, int]] = []
    for time, action, outcome, principal, address in flat:
        for alert in watch.observe(time=time, action=action, outcome=outcome,
                                   principal=principal, address=address):
            assert (alert.lockout_s > 0) == (alert.kind in (
                "failed_logins_per_user", "failed_logins_per_address"))
            got.append((alert.time, alert.kind, alert.subject, alert.count))
    assert sorted(got) == sorted(_recount(config, flat))
    # With eviction, never more alerts than the recount (an evicted window only forgets).
    small = Watch(config, max_subjects=max_subjects)
    fewer = [a for time, action, outcome, principal, address in flat
             for a in small.observe(time=time, action=action, outcome=outcome,
                                    principal=principal, address=address)]
    assert len(fewer) <= len(got)
