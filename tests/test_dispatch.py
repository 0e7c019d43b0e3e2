"""InstanceCore, sans-IO: requests in, replies out, commits staged in the sequencer."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubicore.dispatch import InstanceCore, check_arguments
from ubicore.errors import BadArguments, PermissionDenied, ProtocolError
from ubicore.protocol.codec import HEADER_REPLY, HEADER_REQUEST, encode_request, pack, parse_request, parse_server_message
from ubicore.protocol.messages import Change, ErrorReply, Op, Reply, Request
from ubicore.schema import Column, Protection, Relation, Schema, read, update
from ubicore.store import Store, Transaction, udata_path

from .faults import FailingCommit

SHOP = "TDispatch::Shop"
CELL = "Z1"


class Shop(Schema, name=SHOP):
    """A shop with operations that succeed and fail in every way the core must handle."""

    items = Relation(
        Column("sku", str),
        Column("count", int, default=0),
        Column("price", float, default=0.0),
        Column("note", str, nullable=True, default=None),
        key=("sku",),
    )

    @update
    def add(self, tx: Transaction, sku: str, count: int = 1, price: float = 0.0, note: Optional[str] = None) -> int:
        """Add stock of one item."""
        old = tx.items.get(sku)
        row = tx.items.upsert(sku=sku, count=(old.count if old else 0) + count, price=price, note=note)
        return int(row.count)

    @update
    def add_many(self, tx: Transaction, skus: list[str]) -> None:
        for sku in skus:
            tx.items.insert(sku=sku)

    @read
    def count(self, tx: Transaction, sku: str) -> int | None:
        row = tx.items.get(sku)
        return None if row is None else int(row.count)

    @read
    def echo(self, tx: Transaction, price: float, flag: bool = False, data: bytes = b"", extra: dict[str, Any] | None = None) -> list[Any]:
        return [price, type(price).__name__, flag, data, extra]

    @read
    def sneaky(self, tx: Transaction) -> None:
        tx.items.insert(sku="sneaky")

    @update
    def fail_value(self, tx: Transaction, sku: str) -> None:
        tx.items.insert(sku=sku)
        raise ValueError("no such colour")

    @update
    def fail_denied(self, tx: Transaction, sku: str) -> None:
        tx.items.insert(sku=sku)
        raise PermissionDenied("stock is locked", {"groups": ["a stock keeper"]})

    @update
    def fail_detail(self, tx: Transaction) -> None:
        raise BadArguments("odd detail", {"thing": object()})

    @read
    def fail_int_keys(self, tx: Transaction) -> None:
        raise BadArguments("int keys", {1: "one"})  # type: ignore[dict-item]

    @update
    def duplicate(self, tx: Transaction, sku: str) -> None:
        tx.items.insert(sku=sku)
        tx.items.insert(sku=sku)

    @update
    def bad_result(self, tx: Transaction, kind: str) -> Any:
        tx.items.insert(sku="bad")
        return {"set": {1, 2}, "object": object(), "huge": 2**70, "intkeys": {1: "a"}}[kind]


class Ledger(Schema, name="TDispatch::Ledger"):
    entries = Relation(Column("id", int), Column("amount", float), key=("id",), persistent=True)

    @update
    def book(self, tx: Transaction, id: int, amount: float) -> None:
        tx.entries.insert(id=id, amount=amount)


@pytest.fixture
def core() -> Iterator[InstanceCore]:
    store = Store(Shop, None)
    try:
        yield InstanceCore(Shop, CELL, store, instance_id=b"I" * 16)
    finally:
        store.close()


def call(core: InstanceCore, operation: str, args: dict[str, Any] | None = None, *, corr: int = 7, schema: str = SHOP, cell: str = CELL) -> Reply | ErrorReply:
    frames = core.handle(encode_request(Request(corr, schema, cell, operation, args or {})))
    assert frames is not None
    msg = parse_server_message(frames)
    assert msg.corr_id == corr
    return msg


def ok(core: InstanceCore, operation: str, **args: Any) -> Any:
    msg = call(core, operation, args)
    assert isinstance(msg, Reply), msg
    return msg.result


def error(core: InstanceCore, operation: str, **args: Any) -> ErrorReply:
    msg = call(core, operation, args)
    assert isinstance(msg, ErrorReply), msg
    return msg


def _state(core: InstanceCore) -> dict[str, Any]:
    return {n: dict(t) for n, t in core.store.tables.items()}


# --- operations -----------------------------------------------------------------------------


def test_update_then_read(core: InstanceCore) -> None:
    assert ok(core, "add", sku="a", count=2) == 2
    assert ok(core, "add", sku="a", count=3, note="n") == 5
    assert ok(core, "count", sku="a") == 5
    assert ok(core, "count", sku="zz") is None
    assert core.store.tables["items"][("a",)] == ("a", 5, 0.0, "n")


def test_each_commit_stages_one_batch(core: InstanceCore) -> None:
    commits: list[int] = []
    core._on_commit = lambda: commits.append(core.sequencer.seq)
    assert core.sequencer.seq == 0 and not core.sequencer.has_pending
    ok(core, "add", sku="a")
    assert core.sequencer.seq == 1 and core.sequencer.pending_batches == 1
    ok(core, "add_many", skus=["b", "c"])
    assert core.sequencer.seq == 2 and core.sequencer.pending_batches == 2
    assert commits == [1, 2]
    taken = core.sequencer.take_batches()
    assert taken == (
        1,
        [
            (Change("items", Op.INSERT, ("a", 1, 0.0, None)),),
            (Change("items", Op.INSERT, ("b", 0, 0.0, None)), Change("items", Op.INSERT, ("c", 0, 0.0, None))),
        ],
    )
    ok(core, "add", sku="a", count=1)
    delta = core.sequencer.take()
    assert delta is not None and delta.instance_id == b"I" * 16
    assert delta.first_seq == 3 and delta.batches == ((Change("items", Op.UPDATE, ("a", 2, 0.0, None)),),)
    assert core.stats.commits == 3 and core.stats.changes == 4


def test_reads_and_empty_updates_stage_nothing(core: InstanceCore) -> None:
    ok(core, "add", sku="a", count=2)
    core.sequencer.take()
    assert ok(core, "count", sku="a") == 2
    assert ok(core, "add", sku="a", count=0) == 2  # an upsert that changes nothing
    ok(core, "add_many", skus=[])
    assert core.sequencer.seq == 1 and not core.sequencer.has_pending
    assert core.stats.commits == 1


def test_read_result_round_trips_the_wire(core: InstanceCore) -> None:
    assert ok(core, "echo", price=2.5, flag=True, data=b"\x00\x01", extra={"k": [1, "v"]}) == [2.5, "float", True, b"\x00\x01", {"k": [1, "v"]}]


# --- built-in operations ------------------------------------------------------------------


def test_get_group(core: InstanceCore) -> None:
    ok(core, "add", sku="a")
    group = ok(core, "get_group")
    assert group == {
        "instance_id": b"I" * 16,
        "seq": 1,
        "protection": "open",
        "epoch": 1,
        "rpc": "",
        "events": "",
        "schema": Shop.describe(),
    }
    core.endpoints.update(rpc="tcp://127.0.0.1:5000", events="tcp://127.0.0.1:5001")
    group = ok(core, "get_group")
    assert (group["rpc"], group["events"]) == ("tcp://127.0.0.1:5000", "tcp://127.0.0.1:5001")


def test_get_group_shows_the_configured_protection() -> None:
    store = Store(Shop, None)
    core = InstanceCore(Shop, CELL, store, protection=Protection.UPDATE)
    try:
        group = ok(core, "get_group")  # open under update
        assert group["protection"] == "update"
        assert group["schema"]["default_protection"] == "open"
        assert type(group["instance_id"]) is bytes and len(group["instance_id"]) == 16
        assert group["instance_id"] == core.instance_id
    finally:
        store.close()


def test_a_full_instance_refuses_clear_get_group() -> None:
    store = Store(Shop, None)
    core = InstanceCore(Shop, CELL, store, protection=Protection.FULL)
    try:
        err = error(core, "get_group")
        assert err.code == "auth_required" and err.detail == {"level": "full"}
    finally:
        store.close()


def test_instance_ids_differ_between_instances() -> None:
    store = Store(Shop, None)
    try:
        assert InstanceCore(Shop, CELL, store).instance_id != InstanceCore(Shop, CELL, store).instance_id
    finally:
        store.close()


def test_get_dump(core: InstanceCore) -> None:
    assert ok(core, "get_dump") == {"instance_id": b"I" * 16, "seq": 0, "relations": {"items": []}}
    ok(core, "add", sku="a", count=2, price=1.5)
    ok(core, "add", sku="b", note="x")
    dump = ok(core, "get_dump")
    assert dump["seq"] == 2
    assert sorted(dump["relations"]["items"]) == [["a", 2, 1.5, None], ["b", 1, 0.0, "x"]]


def test_get_stats(core: InstanceCore) -> None:
    ok(core, "add", sku="a")
    error(core, "nope")
    assert core.handle([b"garbage"]) is None
    stats = ok(core, "get_stats")
    security = stats.pop("security")
    assert stats == {"requests": 3, "errors": 1, "malformed": 1, "commits": 1, "changes": 1, "deltas_sent": 0,
                     "rejected": 0}
    assert security["logins"] == 0 and security["rejected"] == 0


def test_builtins_ignore_arguments(core: InstanceCore) -> None:
    msg = call(core, "get_dump", {"x": 1})
    assert isinstance(msg, Reply) and msg.result["relations"] == {"items": []}


# --- not found and bad arguments ----------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "cell", "operation"),
    [
        ("TDispatch::Other", CELL, "add"),
        (SHOP, "Z2", "add"),
        (SHOP, "z1", "get_dump"),
        ("TDispatch::Other", CELL, "get_group"),
        (SHOP, CELL, "nope"),
        (SHOP, CELL, "_private"),
        (SHOP, CELL, "describe"),
        (SHOP, CELL, "__init__"),
    ],
)
def test_not_found(core: InstanceCore, schema: str, cell: str, operation: str) -> None:
    msg = call(core, operation, {"sku": "a"}, schema=schema, cell=cell)
    assert isinstance(msg, ErrorReply) and msg.code == "not_found"
    assert core.stats.errors == 1 and core.stats.requests == 1
    assert _state(core) == {"items": {}}


@pytest.mark.parametrize(
    ("operation", "args", "argument"),
    [
        ("add", {}, "sku"),
        ("add", {"count": 1}, "sku"),
        ("add", {"sku": "a", "colour": "red"}, "colour"),
        ("add", {"sku": 1}, "sku"),
        ("add", {"sku": None}, "sku"),
        ("add", {"sku": b"a"}, "sku"),
        ("add", {"sku": "a", "count": True}, "count"),
        ("add", {"sku": "a", "count": 1.0}, "count"),
        ("add", {"sku": "a", "count": None}, "count"),
        ("add", {"sku": "a", "price": "1"}, "price"),
        ("add", {"sku": "a", "price": False}, "price"),
        ("add", {"sku": "a", "note": 3}, "note"),
        ("add_many", {"skus": {"a": 1}}, "skus"),
        ("echo", {"price": 1.0, "flag": 1}, "flag"),
        ("echo", {"price": 1.0, "data": "x"}, "data"),
        ("echo", {"price": 1.0, "extra": [1]}, "extra"),
    ],
)
def test_bad_arguments(core: InstanceCore, operation: str, args: dict[str, Any], argument: str) -> None:
    msg = call(core, operation, args)
    assert isinstance(msg, ErrorReply) and msg.code == "bad_arguments", msg
    assert msg.detail["argument"] == argument
    assert repr(argument) in msg.message
    assert _state(core) == {"items": {}} and core.sequencer.seq == 0


def test_int_accepted_for_float_and_none_for_optional(core: InstanceCore) -> None:
    assert ok(core, "echo", price=3) == [3.0, "float", False, b"", None]
    assert ok(core, "echo", price=3, extra=None)[4] is None
    assert ok(core, "add", sku="a", price=2, note=None) == 1
    row = core.store.tables["items"][("a",)]
    assert type(row.price) is float and row.note is None


def test_check_arguments_directly() -> None:
    add = Shop.operations["add"]
    assert check_arguments(add, {"sku": "a"}) == {"sku": "a"}  # defaults are left to the function
    assert check_arguments(add, {"sku": "a", "price": 2, "note": None}) == {"sku": "a", "price": 2.0, "note": None}
    assert type(check_arguments(add, {"sku": "a", "price": 2})["price"]) is float
    with pytest.raises(BadArguments) as info:
        check_arguments(add, {"sku": "a", "zeta": 1, "alpha": 2})
    assert info.value.detail == {"argument": "alpha"} and "unknown" in info.value.message
    with pytest.raises(BadArguments) as info:
        check_arguments(add, {"count": 1})
    assert info.value.detail == {"argument": "sku"} and "missing" in info.value.message
    with pytest.raises(BadArguments) as info:
        check_arguments(add, {"sku": "a", "count": "1"})
    assert info.value.detail == {"argument": "count", "expected": "int"}
    assert "must be int, got str" in info.value.message
    echo = Shop.operations["echo"]
    assert check_arguments(echo, {"price": 1.5, "extra": {"a": [1]}}) == {"price": 1.5, "extra": {"a": [1]}}


def test_int_arguments_must_fit_in_64_bits() -> None:
    add = Shop.operations["add"]
    assert check_arguments(add, {"sku": "a", "count": 2**63 - 1})["count"] == 2**63 - 1
    for big in (2**63, -(2**63) - 1):
        with pytest.raises(BadArguments) as info:
            check_arguments(add, {"sku": "a", "count": big})
        assert info.value.detail == {"argument": "count", "expected": "int"}


def test_check_arguments_with_keys_that_are_not_strings() -> None:
    # msgpack maps may carry bytes keys; they are unknown arguments, never a crash
    add = Shop.operations["add"]
    with pytest.raises(BadArguments):
        check_arguments(add, {b"sku": "a", "x": 1})  # type: ignore[dict-item]
    with pytest.raises(BadArguments):
        check_arguments(add, {"sku": "a", b"count": 1})  # type: ignore[dict-item]


# --- failing operations -------------------------------------------------------------------


def test_a_remote_error_passes_its_code_through(core: InstanceCore) -> None:
    msg = error(core, "fail_denied", sku="a")
    assert (msg.code, msg.message, msg.detail) == ("permission_denied", "stock is locked", {"groups": ["a stock keeper"]})
    assert _state(core) == {"items": {}} and not core.sequencer.has_pending


def test_a_remote_error_whose_detail_cannot_travel_still_gets_a_reply(core: InstanceCore) -> None:
    msg = error(core, "fail_detail")
    assert msg.code == "bad_arguments" and msg.message == "odd detail"


def test_a_remote_error_detail_with_other_keys_reaches_the_caller_with_string_keys(core: InstanceCore) -> None:
    msg = error(core, "fail_int_keys")
    assert (msg.code, msg.detail) == ("bad_arguments", {"1": "one"})


def test_an_exception_becomes_remote_failure_without_traceback(core: InstanceCore) -> None:
    ok(core, "add", sku="a")
    core.sequencer.take()
    before = _state(core)
    msg = error(core, "fail_value", sku="b")
    assert msg.code == "remote_failure"
    assert "no such colour" in msg.message and "ValueError" in msg.message
    for leak in ("Traceback", 'File "', ".py", __file__, "line "):
        assert leak not in msg.message
    assert msg.detail == {}
    assert _state(core) == before
    assert not core.sequencer.has_pending and core.sequencer.seq == 1
    assert core.stats.errors == 1 and core.stats.commits == 1
    # the instance keeps serving
    assert ok(core, "add", sku="b") == 1


def test_a_constraint_violation_becomes_remote_failure(core: InstanceCore) -> None:
    msg = error(core, "duplicate", sku="a")
    assert msg.code == "remote_failure" and "exists" in msg.message
    assert _state(core) == {"items": {}} and core.sequencer.seq == 0


def test_a_read_operation_cannot_write(core: InstanceCore) -> None:
    msg = error(core, "sneaky")
    assert msg.code == "remote_failure" and "read operation" in msg.message
    assert _state(core) == {"items": {}} and core.sequencer.seq == 0


@pytest.mark.parametrize("kind", ["set", "object", "huge", "intkeys"])
def test_a_result_that_cannot_travel_commits_nothing(core: InstanceCore, kind: str) -> None:
    msg = error(core, "bad_result", kind=kind)
    assert msg.code == "remote_failure"
    assert "Traceback" not in msg.message
    assert _state(core) == {"items": {}}
    assert core.sequencer.seq == 0 and not core.sequencer.has_pending
    assert core.stats.commits == 0


def test_a_store_that_cannot_commit_answers_remote_failure(tmp_path: Path) -> None:
    path = udata_path(tmp_path, CELL, Ledger.schema_name)
    store = Store(Ledger, path)
    try:
        core = InstanceCore(Ledger, CELL, store)
        ledger = Ledger.schema_name
        assert call(core, "book", {"id": 1, "amount": 2}, schema=ledger) == Reply(7, None)
        real = store._db
        assert real is not None
        store._db = FailingCommit(real)  # type: ignore[assignment]
        try:
            msg = call(core, "book", {"id": 2, "amount": 3.5}, schema=ledger)
        finally:
            store._db = real
        assert isinstance(msg, ErrorReply) and msg.code == "remote_failure"
        assert "disk I/O" not in msg.message and str(tmp_path) not in msg.message  # no paths on the wire
        assert list(store.tables["entries"]) == [(1,)]
        assert core.sequencer.seq == 1 and core.stats.commits == 1
    finally:
        store.close()
    store = Store(Ledger, path)
    try:
        assert store.tables["entries"] == {(1,): (1, 2.0)}
    finally:
        store.close()


# --- malformed frames ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("frames", "corr"),
    [
        ([], None),
        ([b""], None),
        ([b"garbage"], None),
        ([HEADER_REQUEST], None),
        ([HEADER_REQUEST, b"\xc1"], None),
        ([HEADER_REQUEST, pack([1, SHOP, CELL, "add", {}, 0]), b"extra"], None),
        ([b"UB\x02\x01", pack([1, SHOP, CELL, "add", {}, 0])], 1),  # another version is told so
        ([b"XX\x01\x01", pack([1, SHOP, CELL, "add", {}, 0])], None),
        ([b"UB\x01\x7f", pack([1, SHOP, CELL, "add", {}, 0])], 1),
        ([HEADER_REQUEST, pack([-1, SHOP, CELL, "add", {}, 0])], None),
        ([HEADER_REQUEST, pack(["1", SHOP, CELL, "add", {}, 0])], None),
        ([HEADER_REQUEST, pack({"corr": 1})], None),
        ([HEADER_REQUEST, pack([])], None),
        ([HEADER_REQUEST, pack([5])], 5),
        ([HEADER_REQUEST, pack([5, SHOP, CELL, "add", {}])], 5),
        ([HEADER_REQUEST, pack([6, SHOP, CELL, "add", [], 0])], 6),
        ([HEADER_REQUEST, pack([7, SHOP, CELL, 3, {}, 0])], 7),
        ([HEADER_REQUEST, pack([8, SHOP, CELL, "add", {}, -1])], 8),
        ([HEADER_REQUEST, pack([2**64 - 1, b"schema", CELL, "add", {}, 0])], 2**64 - 1),
        ([HEADER_REPLY, pack([9, "result"])], 9),
    ],
)
def test_malformed_frames(core: InstanceCore, frames: list[bytes], corr: int | None) -> None:
    out = core.handle(frames)
    assert core.stats.malformed == 1
    assert core.stats.requests == 0
    if corr is None:
        assert out is None
    else:
        assert out is not None
        msg = parse_server_message(out)
        assert isinstance(msg, ErrorReply) and msg.code == "protocol_error" and msg.corr_id == corr
    assert _state(core) == {"items": {}}


def test_bytes_argument_names_get_an_error_reply(core: InstanceCore) -> None:
    msg = call(core, "add", {b"sku": "a", "zz": 1})  # type: ignore[dict-item]
    assert isinstance(msg, ErrorReply) and msg.code in ("bad_arguments", "protocol_error")
    assert _state(core) == {"items": {}}


# --- fuzz ---------------------------------------------------------------------------------

_FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
_OPERATIONS = [*Shop.operations, "get_group", "get_dump", "get_stats", "nope", ""]
_NAMES = sorted({p.name for spec in Shop.operations.values() for p in spec.params})
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=8)
)
_values = st.recursive(
    _scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4) | st.binary(max_size=4), inner, max_size=4),
    max_leaves=12,
)
_args = st.dictionaries(st.sampled_from(_NAMES) | st.text(max_size=6) | st.binary(max_size=4), _values, max_size=5)


def _check_answer(core: InstanceCore, frames: list[bytes]) -> None:
    """The invariant: no exception; None, or frames a caller can parse, for the right call."""
    try:
        req: Request | None = parse_request(frames)
    except ProtocolError:
        req = None
    out = core.handle(frames)
    if req is not None:
        assert out is not None
    if out is not None:
        msg = parse_server_message(out)
        if req is not None:
            assert msg.corr_id == req.corr_id
        else:
            assert isinstance(msg, ErrorReply) and msg.code == "protocol_error"


def _fresh_core() -> InstanceCore:
    return InstanceCore(Shop, CELL, Store(Shop, None))  # volatile only: nothing to close


@_FUZZ
@given(st.lists(st.binary(max_size=48), max_size=4))
def test_fuzz_arbitrary_frames(frames: list[bytes]) -> None:
    _check_answer(_fresh_core(), frames)


@_FUZZ
@given(st.sampled_from([HEADER_REQUEST, HEADER_REPLY, b"UB\x01\x7f"]), _values)
def test_fuzz_arbitrary_bodies(header: bytes, body: Any) -> None:
    _check_answer(_fresh_core(), [header, pack(body)])


@_FUZZ
@given(
    st.integers(min_value=0, max_value=2**64 - 1),
    st.sampled_from([SHOP, "TDispatch::Other", ""]),
    st.sampled_from([CELL, "Z2"]),
    st.sampled_from(_OPERATIONS),
    _args,
    st.integers(min_value=0, max_value=2**64 - 1),
)
def test_fuzz_requests(corr: int, schema: str, cell: str, operation: str, args: dict[Any, Any], timeout_ms: int) -> None:
    core = _fresh_core()
    _check_answer(core, [HEADER_REQUEST, pack([corr, schema, cell, operation, args, timeout_ms])])
    # whatever happened, the state is made of valid rows and the dump still travels
    _check_answer(core, encode_request(Request(1, SHOP, CELL, "get_dump", {})))


_mutation = st.tuples(st.sampled_from(["flip", "cut", "insert", "drop", "dup", "swap"]), st.integers(0, 200), st.binary(min_size=1, max_size=4))


@_FUZZ
@given(st.sampled_from(_OPERATIONS), _args, st.lists(_mutation, min_size=1, max_size=4))
def test_fuzz_mutated_requests(operation: str, args: dict[Any, Any], mutations: list[tuple[str, int, bytes]]) -> None:
    frames = [bytearray(f) for f in encode_request(Request(3, SHOP, CELL, "add", {"sku": "a", "count": 2}))]
    if args:
        frames[1] = bytearray(pack([3, SHOP, CELL, operation, args, 0]))
    for how, at, data in mutations:
        if not frames:
            break
        f = frames[at % len(frames)]
        i = at % (len(f) + 1)
        if how == "flip" and f:
            f[i % len(f)] ^= data[0]
        elif how == "cut":
            del f[i:]
        elif how == "insert":
            f[i:i] = data
        elif how == "drop":
            del frames[at % len(frames)]
        elif how == "dup":
            frames.append(bytearray(f))
        elif how == "swap":
            frames.reverse()
    _check_answer(_fresh_core(), [bytes(f) for f in frames])


def test_another_protocol_version_is_answered_not_left_to_time_out(core: InstanceCore) -> None:
    out = core.handle([b"UB\x02\x01", pack([41, SHOP, CELL, "add", {}, 0])])
    assert out is not None
    msg = parse_server_message(out)
    assert isinstance(msg, ErrorReply) and msg.corr_id == 41
    assert (msg.code, msg.message) == ("protocol_error", "unsupported protocol version 2")
