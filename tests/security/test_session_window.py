"""The replay window of session crypto (``ReplayWindow`` in ubicore/security/session.py):
in-order and out-of-order counters once each, duplicates, too old, zero and negative, huge
jumps, and property tests against a plain set model.
"""
from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ubicore.security.session import REPLAY_WINDOW, ReplayWindow

from .session_support import PROPERTY

# --- ReplayWindow ---------------------------------------------------------------------------------


def test_window_in_order() -> None:
    w = ReplayWindow()
    assert all(w.check_and_mark(n) for n in range(1, 3000))
    assert w.top == 2999
    assert not any(w.check_and_mark(n) for n in range(1, 3000))


def test_window_out_of_order_within_the_window_once_each() -> None:
    w = ReplayWindow(64)
    order = [10, 3, 7, 1, 60, 12, 11, 64, 2]
    assert all(w.check_and_mark(n) for n in order)
    assert not any(w.check_and_mark(n) for n in order)
    assert w.check_and_mark(5) and w.check_and_mark(63)  # holes still open, once
    assert not w.check_and_mark(5)


def test_window_duplicates_are_refused() -> None:
    w = ReplayWindow()
    assert w.check_and_mark(1)
    assert not w.check_and_mark(1)
    assert w.check_and_mark(100)
    assert not w.check_and_mark(100) and not w.check_and_mark(1)


def test_window_too_old() -> None:
    w = ReplayWindow(16)
    assert w.check_and_mark(100)
    assert not w.seen(85) and w.check_and_mark(85)  # 15 behind: last slot of the window
    assert w.seen(84) and not w.check_and_mark(84)  # 16 behind: fallen out
    assert not w.check_and_mark(1)
    w2 = ReplayWindow()
    w2.mark(REPLAY_WINDOW + 10)
    assert not w2.check_and_mark(10)
    assert w2.check_and_mark(11)


@pytest.mark.parametrize("n", [0, -1, -2**63, -(2**70)])
def test_window_zero_and_negative_never_accepted(n: int) -> None:
    w = ReplayWindow()
    assert w.seen(n) and not w.check_and_mark(n)
    w.mark(5)
    assert not w.check_and_mark(n)
    assert w.top == 5


@pytest.mark.parametrize("jump", [REPLAY_WINDOW, REPLAY_WINDOW + 1, 10**9, 2**32, 2**63, 2**64 - 1])
def test_window_huge_jumps_forget_the_past_cheaply(jump: int) -> None:
    # A late subscriber's first event can carry a counter near 2^31; the window must not
    # build a 2^31-bit integer for it (it did: 256 MB and a MemoryError past that).
    w = ReplayWindow()
    assert w.check_and_mark(3) and w.check_and_mark(5)
    top = 5 + jump
    assert w.check_and_mark(top)
    assert w.top == top and w._bits.bit_length() <= REPLAY_WINDOW
    assert not w.check_and_mark(top)
    assert not w.check_and_mark(5) and not w.check_and_mark(3)  # far behind now
    assert w.check_and_mark(top - 1) and w.check_and_mark(top - REPLAY_WINDOW + 1)
    assert not w.check_and_mark(top - REPLAY_WINDOW)


def _model(size: int, ops: list[int]) -> list[bool]:
    seen: set[int] = set()
    top = 0
    out = []
    for n in ops:
        ok = n > 0 and n > top - size and n not in seen
        if ok:
            seen.add(n)
            top = max(top, n)
        out.append(ok)
    return out


counters = st.one_of(
    st.integers(-3, 80),
    st.integers(1, 2**64 - 1),
    st.integers(2**31 - 5, 2**31 + 5),
)


@PROPERTY
@given(st.sampled_from([1, 2, 8, 64, REPLAY_WINDOW]), st.lists(counters, max_size=120))
def test_window_matches_a_set_model(size: int, ops: list[int]) -> None:
    w = ReplayWindow(size)
    assert [w.check_and_mark(n) for n in ops] == _model(size, ops)


@PROPERTY
@given(st.lists(st.integers(1, 200), max_size=300))
def test_window_matches_a_set_model_dense(ops: list[int]) -> None:
    w = ReplayWindow(32)
    got = []
    for n in ops:
        before = w.seen(n)
        got.append(w.check_and_mark(n))
        assert got[-1] is not before
    assert got == _model(32, ops)
