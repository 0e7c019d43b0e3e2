"""The store: transactions with read-your-writes, the change log, constraints, SQLite persistence."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ubicore.errors import ConstraintViolation, StoreError
from ubicore.protocol.messages import Change, Op
from ubicore.schema import Column, Relation, Schema
from ubicore.store import Store, Transaction, udata_path

from .faults import FailingCommit


class Stock(Schema, name="TStore::Stock"):
    """A persistent and a volatile relation, covering every column type."""

    items = Relation(
        Column("sku", str),
        Column("count", int, default=0),
        Column("weight", float, default=1),
        Column("fragile", bool, default=False),
        Column("photo", bytes, nullable=True, default=None),
        Column("note", str, nullable=True, default=None),
        key=("sku",),
        persistent=True,
    )
    bins = Relation(Column("row", int), Column("col", int), Column("sku", str), key=("row", "col"))


class Volatile(Schema, name="TStore::Volatile"):
    r = Relation(Column("k", str), Column("v", int), key=("k",))


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(Stock, udata_path(tmp_path, "Z1", Stock.schema_name))
    try:
        yield s
    finally:
        s.close()


def _committed(store: Store, fill: Any) -> tuple[Change, ...]:
    tx = store.transaction()
    fill(tx)
    return tx.commit()


def test_udata_path() -> None:
    assert udata_path(Path("/data"), "B1", "ULocation::Positions") == Path("/data/B1/ULocation%Positions.udata")
    assert udata_path("rel", "Site", "A::B") == Path("rel/Site/A%B.udata")  # type: ignore[arg-type]


def test_persistent_relations_need_a_path() -> None:
    with pytest.raises(ValueError, match="TStore::Stock"):
        Store(Stock, None)


def test_insert_get_iter_len_with_read_your_writes(store: Store) -> None:
    tx = store.transaction()
    row = tx.items.insert(sku="a", count=3)
    assert row == ("a", 3, 1, False, None, None)
    assert row.count == 3
    assert tx.items.get("a") == row
    assert "a" in tx.items and ("a",) in tx.items and "b" not in tx.items
    assert tx.items.get("b") is None
    tx.bins.insert(row=1, col=2, sku="a")
    assert tx["bins"].get(1, 2) == (1, 2, "a")
    assert len(tx.items) == 1 and len(tx.bins) == 1
    # nothing is visible outside the transaction before commit
    assert store.tables["items"] == {} and store.tables["bins"] == {}
    assert store.transaction().items.get("a") is None
    tx.commit()
    assert store.tables["items"] == {("a",): row}
    assert store.snapshot() == {"items": [row], "bins": [(1, 2, "a")]}


def test_update_upsert_delete_and_iteration_see_the_overlay(store: Store) -> None:
    _committed(store, lambda tx: [tx.items.insert(sku=s) for s in "abc"])
    tx = store.transaction()
    assert tx.items.update(sku="a", count=5).count == 5
    assert tx.items.get("a").count == 5  # type: ignore[union-attr]
    assert tx.items.upsert(sku="d", count=1) == ("d", 1, 1, False, None, None)
    assert tx.items.upsert(sku="b", note="x").note == "x"
    assert tx.items.delete("c") == ("c", 0, 1, False, None, None)
    assert tx.items.delete("c") is None
    assert tx.items.delete("zz") is None
    assert sorted(r.sku for r in tx.items) == ["a", "b", "d"]
    assert len(tx.items) == 3
    assert "c" not in tx.items
    # the committed state is untouched until commit
    assert sorted(k for (k,) in store.tables["items"]) == ["a", "b", "c"]
    tx.commit()
    rows = {r.sku: r for r in store.snapshot()["items"]}
    assert sorted(rows) == ["a", "b", "d"]
    assert rows["a"].count == 5 and rows["b"].note == "x" and rows["d"].count == 1


def test_delete_then_insert_the_same_key(store: Store) -> None:
    _committed(store, lambda tx: tx.items.insert(sku="a", count=1))
    tx = store.transaction()
    tx.items.delete("a")
    tx.items.insert(sku="a", count=2)
    assert [r.count for r in tx.items] == [2]
    log = tx.commit()
    assert [c.op for c in log] == [Op.DELETE, Op.INSERT]
    assert store.tables["items"][("a",)].count == 2


def test_change_log_in_order(store: Store) -> None:
    tx = store.transaction()
    tx.items.insert(sku="a")
    tx.bins.insert(row=0, col=0, sku="a")
    tx.items.update(sku="a", count=2)
    tx.items.upsert(sku="b", count=7)
    tx.items.upsert(sku="a", count=3)
    tx.bins.delete(0, 0)
    tx.items.delete("b")
    assert tx.commit() == (
        Change("items", Op.INSERT, ("a", 0, 1, False, None, None)),
        Change("bins", Op.INSERT, (0, 0, "a")),
        Change("items", Op.UPDATE, ("a", 2, 1, False, None, None)),
        Change("items", Op.INSERT, ("b", 7, 1, False, None, None)),
        Change("items", Op.UPDATE, ("a", 3, 1, False, None, None)),
        Change("bins", Op.DELETE, (0, 0)),
        Change("items", Op.DELETE, ("b",)),
    )


def test_update_without_an_actual_change_logs_nothing(store: Store) -> None:
    _committed(store, lambda tx: tx.items.insert(sku="a", count=2))
    tx = store.transaction()
    assert tx.items.update(sku="a", count=2) == ("a", 2, 1, False, None, None)
    assert tx.items.update(sku="a") == ("a", 2, 1, False, None, None)
    assert tx.items.upsert(sku="a", count=2).count == 2
    assert tx.log == []
    assert tx.commit() == ()


def test_int_is_accepted_for_float_and_stored_as_float(store: Store) -> None:
    tx = store.transaction()
    row = tx.items.insert(sku="a", weight=3)
    assert type(row.weight) is float and row.weight == 3.0
    # a declared int default of a float column is stored as a float too
    assert type(tx.items.insert(sku="b").weight) is float
    tx.commit()
    assert all(type(r.weight) is float for r in store.tables["items"].values())


@pytest.mark.parametrize(
    ("values", "fragment"),
    [
        ({"sku": "a", "count": True}, "items.count"),  # bool is not int
        ({"sku": "a", "count": 1.0}, "items.count"),
        ({"sku": "a", "count": "1"}, "items.count"),
        ({"sku": "a", "weight": "1.0"}, "items.weight"),
        ({"sku": "a", "weight": False}, "items.weight"),
        ({"sku": "a", "fragile": 1}, "items.fragile"),
        ({"sku": "a", "photo": "text"}, "items.photo"),
        ({"sku": "a", "photo": bytearray(b"x")}, "items.photo"),
        ({"sku": None}, "items.sku"),
        ({"sku": b"a"}, "items.sku"),
        ({"sku": "a", "count": 2**63}, "64 bits"),
        ({"sku": "a", "count": -(2**63) - 1}, "64 bits"),
        ({"sku": "a", "colour": "red"}, "colour"),
        ({"count": 1}, "'sku' is required"),
    ],
)
def test_insert_constraint_violations(store: Store, values: dict[str, Any], fragment: str) -> None:
    tx = store.transaction()
    with pytest.raises(ConstraintViolation) as info:
        tx.items.insert(**values)
    assert fragment in str(info.value)
    assert tx.log == [] and len(tx.items) == 0


def test_64_bit_limits_are_accepted(store: Store) -> None:
    tx = store.transaction()
    tx.items.insert(sku="max", count=2**63 - 1)
    tx.items.insert(sku="min", count=-(2**63))
    tx.commit()
    store.close()
    again = Store(Stock, store.path)
    try:
        assert again.tables["items"][("max",)].count == 2**63 - 1
        assert again.tables["items"][("min",)].count == -(2**63)
    finally:
        again.close()


def test_duplicate_insert_and_missing_rows(store: Store) -> None:
    _committed(store, lambda tx: tx.items.insert(sku="a"))
    tx = store.transaction()
    with pytest.raises(ConstraintViolation, match="exists"):
        tx.items.insert(sku="a")
    tx.items.insert(sku="b")
    with pytest.raises(ConstraintViolation, match="exists"):
        tx.items.insert(sku="b")  # a duplicate of the transaction's own write
    with pytest.raises(ConstraintViolation, match="no row"):
        tx.items.update(sku="zz", count=1)
    with pytest.raises(ConstraintViolation, match="key column 'sku'"):
        tx.items.update(count=1)
    with pytest.raises(ConstraintViolation, match="key column 'sku'"):
        tx.items.upsert(count=1)
    with pytest.raises(ConstraintViolation, match="items.count"):
        tx.items.update(sku="a", count="x")
    with pytest.raises(ConstraintViolation, match="no column 'nope'"):
        tx.items.update(sku="a", nope=1)
    with pytest.raises(ConstraintViolation, match="items.count"):
        tx.items.upsert(sku="c", count=None)
    with pytest.raises(ConstraintViolation, match="'row' is required"):
        tx.bins.insert(col=1, sku="a")
    assert [c.row for c in tx.log] == [("b", 0, 1.0, False, None, None)]


def test_unknown_relation_is_an_attribute_error(store: Store) -> None:
    tx = store.transaction()
    with pytest.raises(AttributeError, match="TStore::Stock has no relation 'nope'"):
        tx.nope  # noqa: B018
    with pytest.raises(AttributeError):
        tx["nope"]


def test_rollback_leaves_memory_and_disk_untouched(store: Store) -> None:
    _committed(store, lambda tx: tx.items.insert(sku="a", count=1))
    before = dict(store.tables["items"])
    tx = store.transaction()
    tx.items.update(sku="a", count=9)
    tx.items.insert(sku="b")
    tx.items.delete("a")
    tx.rollback()
    assert tx.log == []
    assert store.tables["items"] == before
    assert store.tables["bins"] == {}
    with pytest.raises(RuntimeError):
        tx.commit()
    store.close()
    again = Store(Stock, store.path)
    try:
        assert again.tables["items"] == before
    finally:
        again.close()


def test_a_transaction_commits_once(store: Store) -> None:
    tx = store.transaction()
    tx.items.insert(sku="a")
    tx.commit()
    with pytest.raises(RuntimeError):
        tx.commit()


def test_read_only_transaction_refuses_writes(store: Store) -> None:
    _committed(store, lambda tx: tx.items.insert(sku="a"))
    tx = store.transaction(writable=False)
    assert tx.items.get("a") is not None
    assert len(tx.items) == 1
    writes: list[Callable[[], Any]] = [
        lambda: tx.items.insert(sku="b"),
        lambda: tx.items.update(sku="a", count=2),
        lambda: tx.items.upsert(sku="a", count=2),
        lambda: tx.items.delete("a"),
        lambda: tx.bins.insert(row=1, col=1, sku="a"),
    ]
    for write in writes:
        with pytest.raises(TypeError, match="read operation"):
            write()
    assert tx.log == []
    assert tx.commit() == ()
    assert store.tables["items"][("a",)].count == 0


def test_persistent_relations_survive_reopen_and_volatile_ones_do_not(store: Store) -> None:
    def fill(tx: Transaction) -> None:
        tx.items.insert(sku="a", count=1, fragile=True, photo=b"\x00\xffpng", note=None)
        tx.items.insert(sku="b", count=2, weight=0.25, fragile=False, photo=None, note="n\u00e9")
        tx.items.insert(sku="c")
        tx.bins.insert(row=1, col=1, sku="a")

    _committed(store, fill)
    _committed(store, lambda tx: (tx.items.delete("c"), tx.items.update(sku="b", count=3)))
    expected = dict(store.tables["items"])
    store.close()
    again = Store(Stock, store.path)
    try:
        assert again.tables["items"] == expected
        assert again.tables["bins"] == {}
        a, b = again.tables["items"][("a",)], again.tables["items"][("b",)]
        assert type(a.fragile) is bool and a.fragile is True and b.fragile is False
        assert type(a.photo) is bytes and a.photo == b"\x00\xffpng"
        assert a.note is None and b.photo is None and b.note == "n\u00e9"
        assert type(a.weight) is float and b.weight == 0.25 and b.count == 3
        assert a.sku == "a" and a._fields == ("sku", "count", "weight", "fragile", "photo", "note")
    finally:
        again.close()


def test_nullable_bool_round_trip(tmp_path: Path) -> None:
    class Flags(Schema, name="TStore::Flags"):
        flags = Relation(Column("k", bool), Column("v", bool, nullable=True), key=("k",), persistent=True)

    path = tmp_path / "flags.udata"
    s = Store(Flags, path)
    try:
        _committed(s, lambda tx: (tx.flags.insert(k=True, v=None), tx.flags.insert(k=False, v=False)))
    finally:
        s.close()
    s = Store(Flags, path)
    try:
        assert s.tables["flags"] == {(True,): (True, None), (False,): (False, False)}
        assert all(type(k) is bool for (k,) in s.tables["flags"])
    finally:
        s.close()


def test_volatile_only_schema_needs_no_file(tmp_path: Path) -> None:
    s = Store(Volatile, None)
    try:
        _committed(s, lambda tx: tx.r.insert(k="a", v=1))
        assert s.snapshot() == {"r": [("a", 1)]}
    finally:
        s.close()
    assert list(tmp_path.iterdir()) == []


def test_reopening_with_a_changed_declaration(tmp_path: Path) -> None:
    class V1(Schema, name="TStore::Changing"):
        r = Relation(Column("k", str), key=("k",), persistent=True)

    path = tmp_path / "Z1" / "TStore%Changing.udata"
    s = Store(V1, path)
    try:
        _committed(s, lambda tx: tx.r.insert(k="a"))
    finally:
        s.close()

    class V2(Schema, name="TStore::Changing"):
        r = Relation(Column("k", str), Column("extra", int, default=0), key=("k",), persistent=True)

    with pytest.raises(StoreError) as info:
        Store(V2, path)
    assert str(path) in str(info.value)
    assert "'r'" in str(info.value)
    # the file is left as it was: the old declaration still opens it
    s = Store(V1, path)
    try:
        assert s.tables["r"] == {("a",): ("a",)}
    finally:
        s.close()


def test_a_file_of_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "x.udata"
    s = Store(Stock, path)
    s.close()

    class Other(Schema, name="TStore::Other"):
        items = Relation(Column("k", str), key=("k",), persistent=True)

    with pytest.raises(StoreError) as info:
        Store(Other, path)
    assert str(path) in str(info.value)
    assert "TStore::Stock" in str(info.value) and "TStore::Other" in str(info.value)


def test_a_file_that_is_not_a_database(tmp_path: Path) -> None:
    path = tmp_path / "junk.udata"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError) as info:
        Store(Stock, path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("problem", ["another schema", "another declaration"])
def test_a_refused_file_is_closed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, problem: str) -> None:
    class Mine(Schema, name="TStore::Refused"):
        r = Relation(Column("k", str), key=("k",), persistent=True)

    path = tmp_path / "refused.udata"
    Store(Stock if problem == "another schema" else Mine, path).close()
    refused: type[Schema] = Mine
    if problem == "another declaration":

        class Changed(Schema, name="TStore::Refused"):
            r = Relation(Column("k", int), key=("k",), persistent=True)

        refused = Changed
    opened: list[sqlite3.Connection] = []
    real_connect = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        opened.append(real_connect(*args, **kwargs))
        return opened[-1]

    monkeypatch.setattr(sqlite3, "connect", connect)
    with pytest.raises(StoreError):
        Store(refused, path)
    assert len(opened) == 1
    with pytest.raises(sqlite3.ProgrammingError):
        opened[0].execute("SELECT 1")  # closed


def test_a_failed_commit_raises_store_error_and_leaves_memory_unchanged(store: Store) -> None:
    _committed(store, lambda tx: tx.items.insert(sku="a", count=1))
    before = {n: dict(t) for n, t in store.tables.items()}
    real = store._db
    assert real is not None
    store._db = FailingCommit(real)  # type: ignore[assignment]
    tx = store.transaction()
    tx.items.update(sku="a", count=2)
    tx.items.insert(sku="b")
    tx.bins.insert(row=1, col=1, sku="b")
    with pytest.raises(StoreError) as info:
        tx.commit()
    assert str(store.path) in str(info.value) and "disk I/O error" in str(info.value)
    assert {n: dict(t) for n, t in store.tables.items()} == before
    # the database rolled back and still works
    store._db = real
    assert _committed(store, lambda tx: tx.items.insert(sku="c"))
    store.close()
    again = Store(Stock, store.path)
    try:
        assert sorted(again.tables["items"]) == [("a",), ("c",)]
        assert again.tables["items"][("a",)].count == 1
    finally:
        again.close()


def test_commit_of_volatile_changes_only_does_not_touch_the_database(store: Store) -> None:
    real = store._db
    assert real is not None
    store._db = FailingCommit(real)  # type: ignore[assignment]
    try:
        log = _committed(store, lambda tx: tx.bins.insert(row=1, col=1, sku="a"))
    finally:
        store._db = real
    assert log == (Change("bins", Op.INSERT, (1, 1, "a")),)
    assert store.tables["bins"] == {(1, 1): (1, 1, "a")}


def test_nan_is_refused_in_float_columns() -> None:
    class _N(Schema, name="UTestNaN::S"):
        r = Relation(Column("k", str), Column("v", float), key=("k",))

    tx = Store(_N, None).transaction()
    with pytest.raises(ConstraintViolation, match="NaN"):
        tx.r.insert(k="a", v=float("nan"))
    assert tx.r.insert(k="b", v=float("inf")).v == float("inf")


def test_a_dataset_that_cannot_be_created_is_a_store_error(tmp_path: Path) -> None:
    class _P(Schema, name="UTestStoreDir::S"):
        r = Relation(Column("k", str), key=("k",), persistent=True)

    blocker = tmp_path / "file-not-dir"
    blocker.write_text("")
    with pytest.raises(StoreError) as info:
        Store(_P, blocker / "cell" / "UTestStoreDir%S.udata")
    assert str(blocker) in str(info.value)


def test_a_transaction_open_across_another_commit_is_refused() -> None:
    class _C(Schema, name="UTestStoreConflict::S"):
        r = Relation(Column("k", str), Column("n", int), key=("k",))

    store = Store(_C, None)
    first = store.transaction()
    first.r.insert(k="a", n=1)
    second = store.transaction()  # opened before first commits (as across an await)
    second.r.insert(k="a", n=2)
    assert first.commit()
    with pytest.raises(ConstraintViolation, match="another transaction committed"):
        second.commit()
    assert store.tables["r"][("a",)].n == 1  # the first one's row stands, nothing half-applied
    reader = store.transaction()
    assert reader.r.get("a").n == 1 and reader.commit() == ()  # read-only ones never conflict
