"""RPC correlation on the caller's side, driven by hand with frames and a fake clock."""

from __future__ import annotations

import pytest

from ubicore import errors
from ubicore.errors import CallTimeout, RemoteError, RemoteFailure, Unavailable
from ubicore.protocol.codec import HEADER_REPLY, encode_error, encode_reply, pack, parse_request
from ubicore.protocol.messages import Request
from ubicore.protocol.rpc import Outcome, RpcCaller

T0 = 1000.0


def start(caller: RpcCaller, timeout_s: float = 1.0, now: float = T0, **args: object) -> int:
    corr, _ = caller.start("A::B", "Site", "op", args, timeout_s, now)
    return corr


def test_start_encodes_the_request() -> None:
    caller = RpcCaller()
    corr, frames = caller.start("A::B", "Site", "set", {"x": 1, "y": "z"}, 2.5, T0)
    assert parse_request(frames) == Request(corr, "A::B", "Site", "set", {"x": 1, "y": "z"}, 2500)
    assert caller.pending == 1


@pytest.mark.parametrize(("timeout_s", "timeout_ms"), [(0.0001, 1), (0.001, 1), (0.0155, 15), (30, 30000)])
def test_timeout_ms_on_the_wire(timeout_s: float, timeout_ms: int) -> None:
    _, frames = RpcCaller().start("A::B", "Site", "op", {}, timeout_s, T0)
    assert parse_request(frames).timeout_ms == timeout_ms


def test_ids_are_unique_and_increasing() -> None:
    caller = RpcCaller()
    ids = [start(caller) for _ in range(50)]
    assert ids == sorted(set(ids)) and len(ids) == 50
    assert all(i > 0 for i in ids)
    caller.receive(encode_reply(ids[0], None))
    caller.expire(T0 + 5)
    assert start(caller) > ids[-1]  # never reused, even after calls ended


def test_two_callers_count_independently() -> None:
    a, b = RpcCaller(), RpcCaller()
    assert start(a) == start(b)


@pytest.mark.parametrize("timeout_s", [0, -1.0, float("nan"), float("inf"), float("-inf")])
def test_start_refuses_a_timeout_that_is_not_positive_and_finite(timeout_s: float) -> None:
    caller = RpcCaller()
    with pytest.raises(ValueError):
        start(caller, timeout_s)
    assert caller.pending == 0 and caller.next_deadline() is None


def test_start_refuses_args_that_cannot_travel_without_registering_a_call() -> None:
    caller = RpcCaller()
    with pytest.raises(ValueError):
        caller.start("A::B", "Site", "op", {"x": object()}, 1.0, T0)
    with pytest.raises(ValueError):
        caller.start("A::B", "Site", "op", {}, 1e20, T0)  # timeout_ms beyond uint64
    assert caller.pending == 0 and caller.next_deadline() is None


def test_receive_matches_and_pops() -> None:
    caller = RpcCaller()
    c1, c2 = start(caller), start(caller)
    assert caller.receive(encode_reply(c2, {"ok": [1, 2]})) == Outcome(c2, result={"ok": [1, 2]})
    assert caller.pending == 1
    assert caller.receive(encode_reply(c1, None)) == Outcome(c1)
    assert caller.pending == 0
    assert caller.stats.unmatched_replies == 0 and caller.stats.malformed == 0


def test_duplicate_and_unknown_replies_are_unmatched() -> None:
    caller = RpcCaller()
    c = start(caller)
    assert caller.receive(encode_reply(c, 1)) is not None
    assert caller.receive(encode_reply(c, 1)) is None
    assert caller.receive(encode_reply(c + 100, 1)) is None
    assert caller.receive(encode_error(c + 101, "not_found", "no", {})) is None
    assert caller.stats.unmatched_replies == 3


@pytest.mark.parametrize(
    "frames",
    [
        [],
        [HEADER_REPLY],
        [HEADER_REPLY, b"\xc1"],
        [HEADER_REPLY, pack([-1, None])],
        [b"UB\x01\x01", pack([1, "A::B", "Site", "op", {}, 0])],  # a request, not a reply
        [b"UB\x09\x02", pack([1, None])],
        [b"junk", b"junk", b"junk"],
    ],
)
def test_malformed_frames_are_counted(frames: list[bytes]) -> None:
    caller = RpcCaller()
    c = start(caller)
    assert caller.receive(frames) is None
    assert caller.stats.malformed == 1 and caller.stats.unmatched_replies == 0
    assert caller.pending == 1 and caller.receive(encode_reply(c, 7)) == Outcome(c, result=7)


TYPED = [
    errors.NotFound,
    errors.BadArguments,
    errors.AuthenticationRequired,
    errors.AuthenticationFailed,
    errors.LockedOut,
    errors.PermissionDenied,
    errors.Unavailable,
    errors.CallTimeout,
    errors.RemoteFailure,
    errors.RemoteProtocolError,
]


def test_every_remote_error_class_has_its_own_code() -> None:
    remote = {getattr(errors, n) for n in errors.__all__}
    remote = {c for c in remote if isinstance(c, type) and issubclass(c, RemoteError) and c is not RemoteError}
    assert remote == set(TYPED)
    assert len({c.code for c in TYPED}) == len(TYPED)


@pytest.mark.parametrize("cls", TYPED, ids=lambda c: c.__name__)
def test_error_reply_becomes_the_typed_error(cls: type[RemoteError]) -> None:
    caller = RpcCaller()
    c = start(caller)
    out = caller.receive(encode_error(c, cls.code, "it went wrong", {"argument": "x"}))
    assert out is not None and out.corr_id == c and out.result is None
    assert type(out.error) is cls
    assert out.error.message == "it went wrong" and out.error.detail == {"argument": "x"}
    assert out.error.code == cls.code


def test_unknown_error_code_becomes_remote_failure() -> None:
    caller = RpcCaller()
    c = start(caller)
    out = caller.receive(encode_error(c, "from_the_future", "new kind of failure", {}))
    assert out is not None and type(out.error) is RemoteFailure
    assert out.error.message == "new kind of failure"


def test_permission_denied_carries_the_groups() -> None:
    caller = RpcCaller()
    c = start(caller)
    out = caller.receive(encode_error(c, "permission_denied", "denied", {"groups": ["an administrator"]}))
    assert out is not None and isinstance(out.error, errors.PermissionDenied)
    assert out.error.groups == ("an administrator",)


def test_expire_times_out_exactly_the_calls_due() -> None:
    caller = RpcCaller()
    c1 = start(caller, 1.0)
    c2 = start(caller, 2.0)
    c3 = start(caller, 3.0)
    assert caller.next_deadline() == T0 + 1.0
    assert caller.expire(T0 + 0.999) == []
    out = caller.expire(T0 + 2.0)  # a deadline equal to now is due
    assert sorted(o.corr_id for o in out) == [c1, c2]
    for o in out:
        assert isinstance(o.error, CallTimeout) and isinstance(o.error, TimeoutError)
        assert isinstance(o.error, RemoteError) and o.result is None
    assert caller.stats.timeouts == 2 and caller.pending == 1
    assert caller.next_deadline() == T0 + 3.0
    assert caller.expire(T0 + 2.5) == []
    assert caller.receive(encode_reply(c1, "late")) is None
    assert caller.stats.unmatched_replies == 1
    assert caller.receive(encode_reply(c3, "on time")) == Outcome(c3, result="on time")
    assert caller.next_deadline() is None and caller.expire(T0 + 1e9) == []


def test_deadlines_follow_the_clock_each_call_started_at() -> None:
    caller = RpcCaller()
    late_start = start(caller, 1.0, now=T0 + 10)
    early = start(caller, 5.0, now=T0)
    assert caller.next_deadline() == T0 + 5.0
    assert [o.corr_id for o in caller.expire(T0 + 5.0)] == [early]
    assert [o.corr_id for o in caller.expire(T0 + 11.0)] == [late_start]


def test_cancel_then_late_reply_is_unmatched() -> None:
    caller = RpcCaller()
    c = start(caller)
    caller.cancel(c)
    caller.cancel(c)  # twice, or for an unknown id: harmless
    caller.cancel(12345)
    assert caller.pending == 0 and caller.next_deadline() is None
    assert caller.receive(encode_reply(c, 1)) is None
    assert caller.stats.unmatched_replies == 1
    assert caller.expire(T0 + 100) == [] and caller.stats.timeouts == 0


def test_fail_all_ends_every_pending_call() -> None:
    caller = RpcCaller()
    ids = {start(caller), start(caller), start(caller)}
    caller.receive(encode_reply(min(ids), None))
    err = Unavailable("connection closed")
    out = caller.fail_all(err)
    assert {o.corr_id for o in out} == ids - {min(ids)}
    assert all(o.error is err for o in out)
    assert caller.pending == 0 and caller.fail_all(err) == []
    assert caller.expire(T0 + 100) == []


def test_permission_denied_groups_tolerate_a_peer_sending_nonsense() -> None:
    from ubicore.errors import PermissionDenied

    assert PermissionDenied("x", {"groups": ["an administrator", 3]}).groups == ("an administrator",)
    assert PermissionDenied("x", {"groups": "an administrator"}).groups == ()
    assert PermissionDenied("x", {"groups": 7}).groups == ()
    assert PermissionDenied("x").groups == ()
