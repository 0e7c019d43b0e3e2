"""Schema declarations: what a valid class describes, and every mistake caught at class creation."""

from __future__ import annotations

from typing import Any, Optional

import pytest

from ubicore.errors import SchemaError
from ubicore.schema import (
    Column,
    OpKind,
    Param,
    Protection,
    Relation,
    Schema,
    read,
    registered_schemas,
    schema_class,
    update,
)
from ubicore.store import Transaction


class Inventory(Schema, name="TSchema::Inventory", protection="update"):
    """An inventory for the tests."""

    items = Relation(
        Column("sku", str),
        Column("count", int, default=0),
        Column("weight", float, default=1),
        Column("fragile", bool, default=False),
        Column("photo", bytes, nullable=True, default=None),
        key=("sku",),
        persistent=True,
    )
    bins = Relation(Column("row", int), Column("col", int), Column("sku", str, nullable=True), key=("row", "col"))

    @update
    def stock(self, tx: Transaction, sku: str, count: int = 1) -> int:
        """Add stock.

        Anything after the first paragraph is not part of the description.
        """
        return count

    @read
    def lookup(self, tx: Transaction, sku: str, note: Optional[str] = None, tags: list[str] | None = None) -> Any:
        return None

    @read
    def everything(self, tx: Transaction, a: bool, b: bytes, c: float, d: dict[str, int], e: Any, f: list) -> None:  # type: ignore[type-arg]
        return None


def test_describe_of_a_valid_schema() -> None:
    assert Inventory.describe() == {
        "name": "TSchema::Inventory",
        "default_protection": "update",
        "relations": {
            "items": {
                "columns": [
                    ["sku", "str", False],
                    ["count", "int", False],
                    ["weight", "float", False],
                    ["fragile", "bool", False],
                    ["photo", "bytes", True],
                ],
                "key": ["sku"],
                "persistent": True,
            },
            "bins": {
                "columns": [["row", "int", False], ["col", "int", False], ["sku", "str", True]],
                "key": ["row", "col"],
                "persistent": False,
            },
        },
        "operations": {
            "stock": {
                "kind": "update",
                "params": [["sku", "str", True, False], ["count", "int", False, False]],
                "doc": "Add stock.",
            },
            "lookup": {
                "kind": "read",
                "params": [["sku", "str", True, False], ["note", "str", False, True], ["tags", "list", False, True]],
                "doc": "",
            },
            "everything": {
                "kind": "read",
                "params": [
                    ["a", "bool", True, False],
                    ["b", "bytes", True, False],
                    ["c", "float", True, False],
                    ["d", "map", True, False],
                    ["e", "any", True, False],
                    ["f", "list", True, False],
                ],
                "doc": "",
            },
        },
    }


def test_class_attributes_after_declaration() -> None:
    assert Inventory.schema_name == "TSchema::Inventory"
    assert Inventory.module == "TSchema"
    assert Inventory.default_protection is Protection.UPDATE
    assert list(Inventory.relations) == ["items", "bins"]
    rel = Inventory.relations["bins"]
    assert rel.name == "bins"
    assert rel.key_index == (0, 1)
    row: Any = rel.row_type(1, 2, None)  # type: ignore[call-arg, arg-type]
    assert (row.row, row.col, row.sku) == (1, 2, None)
    assert rel.key_of(row) == (1, 2)
    assert Inventory.operations["stock"].kind is OpKind.UPDATE
    assert Inventory.operations["lookup"].kind is OpKind.READ


def test_registered_schemas_contains_the_class() -> None:
    schemas = registered_schemas()
    assert schemas["TSchema::Inventory"] is Inventory
    assert schema_class("TSchema::Inventory") is Inventory
    assert schema_class("TSchema::NoSuchSchema") is None
    with pytest.raises(TypeError):
        schemas["TSchema::Other"] = Inventory  # type: ignore[index]


def test_optional_params_are_nullable_and_not_required() -> None:
    params = {p.name: p for p in Inventory.operations["lookup"].params}
    assert params["sku"] == Param("sku", "str", True, False, None)
    assert params["note"] == Param("note", "str", False, True, None)
    assert params["tags"].nullable and not params["tags"].required
    stock = {p.name: p for p in Inventory.operations["stock"].params}
    assert stock["count"] == Param("count", "int", False, False, 1)


def test_default_protection_is_open_and_instances_carry_cell_and_options() -> None:
    class Plain(Schema, name="TSchema::Plain"):
        r = Relation(Column("k", str), key=["k"])

    assert Plain.default_protection is Protection.OPEN
    obj = Plain("Z1", {"rate_hz": 2})
    assert obj.cell == "Z1"
    assert obj.options == {"rate_hz": 2}
    with pytest.raises(TypeError):
        obj.options["x"] = 1  # type: ignore[index]
    assert "TSchema::Plain" in repr(obj) and "Z1" in repr(obj)


def test_async_run_is_accepted() -> None:
    class Runner(Schema, name="TSchema::Runner"):
        r = Relation(Column("k", str), key=("k",))

        async def run(self, ctx: Any) -> None:
            return None

    assert "run" not in Runner.operations


# --- declaration mistakes ------------------------------------------------------------------


def _declare(name: str, protection: str = "open", **members: Any) -> type[Schema]:
    """Create a schema class from members, as a class statement would."""
    ns: dict[str, Any] = {"__module__": __name__, **members}
    return type("Declared", (Schema,), ns, name=name, protection=protection)


def _rel(*columns: Column, key: tuple[str, ...] = ("k",)) -> Relation:
    return Relation(*(columns or (Column("k", str),)), key=key)


def _raises(name: str, *fragments: str, **members: Any) -> str:
    """Declaring ``members`` as schema ``name`` raises SchemaError naming every fragment."""
    with pytest.raises(SchemaError) as info:
        _declare(name, **members)
    msg = str(info.value)
    for fragment in fragments:
        assert fragment in msg, (fragment, msg)
    assert name not in registered_schemas()
    return msg


@pytest.mark.parametrize("bad", ["NoColons", "A::", "::B", "A::B::C", "1A::B", "A:B", "A::B c", "", 7])
def test_bad_schema_name(bad: Any) -> None:
    with pytest.raises(SchemaError) as info:
        _declare(bad, r=_rel())
    assert repr(bad) in str(info.value)
    assert "Module::Schema" in str(info.value)


def test_bad_protection() -> None:
    with pytest.raises(SchemaError) as info:
        _declare("TSchema::BadProt", protection="secret", r=_rel())
    assert "TSchema::BadProt" in str(info.value)
    assert "protection 'secret'" in str(info.value)
    assert "TSchema::BadProt" not in registered_schemas()


def test_no_relation() -> None:
    _raises("TSchema::Empty", "TSchema::Empty", "relation")


def test_relation_without_columns() -> None:
    _raises("TSchema::NoCols", "TSchema::NoCols.r", "column", r=Relation(key=("k",)))


def test_duplicate_column() -> None:
    _raises("TSchema::Dup", "TSchema::Dup.r.k", "duplicate", r=_rel(Column("k", str), Column("k", int)))


def test_key_column_not_a_column() -> None:
    _raises("TSchema::KeyMissing", "TSchema::KeyMissing.r", "'nope'", r=_rel(Column("k", str), key=("nope",)))


def test_empty_key() -> None:
    _raises("TSchema::NoKey", "TSchema::NoKey.r", "key", r=_rel(Column("k", str), key=()))


def test_key_naming_a_column_twice() -> None:
    _raises("TSchema::KeyTwice", "TSchema::KeyTwice.r", "twice", r=_rel(Column("k", str), key=("k", "k")))


def test_nullable_key() -> None:
    _raises("TSchema::NullKey", "TSchema::NullKey.r.k", "nullable", r=_rel(Column("k", str, nullable=True)))


@pytest.mark.parametrize("bad_type", [list, dict, tuple, complex, object, type(None)])
def test_unsupported_column_type(bad_type: type) -> None:
    _raises("TSchema::BadType", "TSchema::BadType.r.v", "unsupported column type", r=_rel(Column("k", str), Column("v", bad_type)))


def test_not_a_column() -> None:
    _raises("TSchema::NotCol", "TSchema::NotCol.r", "column 1", r=_rel(Column("k", str), ("v", int)))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("col_type", "default"),
    [(int, "1"), (int, True), (int, 1.5), (str, 1), (bool, 0), (bytes, "x"), (float, "1.0"), (float, True), (str, None), (int, 2**64)],
)
def test_default_of_the_wrong_type(col_type: type, default: Any) -> None:
    _raises("TSchema::BadDefault", "TSchema::BadDefault.r.v", "default", r=_rel(Column("k", str), Column("v", col_type, default=default)))


def test_good_defaults_are_accepted() -> None:
    cls = _declare(
        "TSchema::GoodDefaults",
        r=_rel(
            Column("k", str),
            Column("f", float, default=1),
            Column("n", int, nullable=True, default=None),
            Column("b", bytes, default=b""),
            Column("t", bool, default=True),
        ),
    )
    assert [c.has_default for c in cls.relations["r"].columns] == [False, True, True, True, True]


@pytest.mark.parametrize("bad", ["_hidden", "__x"])
def test_bad_relation_name(bad: str) -> None:
    _raises("TSchema::BadRel", f"TSchema::BadRel.{bad}", "relation names", **{bad: _rel()})


@pytest.mark.parametrize("bad", ["1x", "_x", "with space", "a-b", ""])
def test_bad_column_name(bad: str) -> None:
    _raises("TSchema::BadCol", "TSchema::BadCol.r", "column names", r=_rel(Column("k", str), Column(bad, int)))


def test_operation_parameter_without_annotation() -> None:
    def op(self: Any, tx: Transaction, sensor) -> None:  # type: ignore[no-untyped-def]
        return None

    _raises("TSchema::NoAnn", "TSchema::NoAnn.op.sensor", "annotation", r=_rel(), op=update(op))


def test_operation_annotation_that_cannot_be_resolved() -> None:
    def op(self: Any, tx: Transaction, sensor: NoSuchType) -> None:  # type: ignore[name-defined]  # noqa: F821
        return None

    _raises("TSchema::Unresolved", "TSchema::Unresolved.op", "annotations", r=_rel(), op=read(op))


def test_operation_without_self_and_tx() -> None:
    def lone(self: Any) -> None:
        return None

    def me(me: Any, tx: Transaction) -> None:
        return None

    _raises("TSchema::NoTx", "TSchema::NoTx.lone", "(self, tx", r=_rel(), lone=read(lone))
    _raises("TSchema::NotSelf", "TSchema::NotSelf.me", "(self, tx", r=_rel(), me=read(me))


@pytest.mark.parametrize("hint", ["set[int]", "tuple[int, int]", "complex", "object", "int | str", "Optional[set[int]]", "None"])
def test_unsupported_param_type(hint: str) -> None:
    ns: dict[str, Any] = {}
    exec(f"def op(self, tx: Transaction, v: {hint}) -> None: pass", globals(), ns)
    _raises("TSchema::BadParam", "TSchema::BadParam.op.v", "unsupported parameter type", r=_rel(), op=update(ns["op"]))


def test_star_args_and_kwargs() -> None:
    def star(self: Any, tx: Transaction, *values: int) -> None:
        return None

    def kw(self: Any, tx: Transaction, **values: int) -> None:
        return None

    _raises("TSchema::Star", "TSchema::Star.star.values", "*args", r=_rel(), star=update(star))
    _raises("TSchema::Kw", "TSchema::Kw.kw.values", "**kwargs", r=_rel(), kw=read(kw))


def test_positional_only_param() -> None:
    def op(self: Any, tx: Transaction, v: int, /) -> None:
        return None

    _raises("TSchema::PosOnly", "TSchema::PosOnly.op.v", r=_rel(), op=read(op))


@pytest.mark.parametrize("reserved", ["get_group", "get_dump", "get_stats", "_private"])
def test_reserved_operation_names(reserved: str) -> None:
    def op(self: Any, tx: Transaction) -> None:
        return None

    _raises("TSchema::Reserved", f"TSchema::Reserved.{reserved}", "reserved", r=_rel(), **{reserved: read(op)})


def test_relation_and_operation_sharing_a_name() -> None:
    class Base(Schema, name="TSchema::ClashBase"):
        items = Relation(Column("k", str), key=("k",))

    def items(self: Any, tx: Transaction) -> None:
        return None

    # A subclass cannot turn an inherited relation into an operation, nor the reverse.
    with pytest.raises(SchemaError) as info:
        type("Clash", (Base,), {"__module__": __name__, "other": _rel(), "items": read(items)}, name="TSchema::Clash")
    assert "TSchema::Clash.items" in str(info.value)
    assert "share the name" in str(info.value)

    class OpBase(Schema, name="TSchema::ClashOpBase"):
        r = Relation(Column("k", str), key=("k",))

        @read
        def items(self, tx: Transaction) -> None:
            return None

    with pytest.raises(SchemaError) as info:
        type("Clash2", (OpBase,), {"__module__": __name__, "items": _rel()}, name="TSchema::Clash2")
    assert "TSchema::Clash2.items" in str(info.value)
    assert "TSchema::Clash" not in registered_schemas()
    assert "TSchema::Clash2" not in registered_schemas()


def test_a_subclass_inherits_relations_and_operations() -> None:
    class Base(Schema, name="TSchema::InheritBase"):
        items = Relation(Column("k", str), key=("k",))

        @read
        def count(self, tx: Transaction) -> int:
            return len(tx.items)

    class Derived(Base, name="TSchema::InheritDerived"):
        extra = Relation(Column("k", str), key=("k",))

    assert list(Derived.relations) == ["items", "extra"]
    assert list(Derived.operations) == ["count"]
    assert list(Base.relations) == ["items"]


def test_non_async_run() -> None:
    def run(self: Any, ctx: Any) -> None:
        return None

    _raises("TSchema::SyncRun", "TSchema::SyncRun.run", "async def run", r=_rel(), run=run)


@pytest.mark.parametrize("member", ["describe", "commit", "rollback", "log", "done"])
def test_relation_names_that_would_be_shadowed(member: str) -> None:
    # tx.<name> and Schema.<name> must reach the relation / the framework, never the other.
    _raises("TSchema::Shadow", f"TSchema::Shadow.{member}", "reserved", **{member: _rel()})


def test_operation_named_describe() -> None:
    def describe(self: Any, tx: Transaction) -> None:
        return None

    _raises("TSchema::ShadowOp", "TSchema::ShadowOp.describe", "reserved", r=_rel(), describe=read(describe))


def test_async_operations_are_refused_at_declaration() -> None:
    with pytest.raises(SchemaError, match=r"UTestAsync::S\.op: operations run inside a transaction"):

        class _S(Schema, name="UTestAsync::S"):
            r = Relation(Column("k", str), key=("k",))

            @update
            async def op(self, tx: Any) -> None:
                return None


def test_two_classes_cannot_claim_one_schema_name() -> None:
    class _First(Schema, name="UTestDup::S"):
        r = Relation(Column("k", str), key=("k",))

    with pytest.raises(SchemaError, match=r"UTestDup::S: already declared by .*_First"):

        class _Second(Schema, name="UTestDup::S"):
            __module__ = "another_package.schemas"
            r = Relation(Column("k", str), key=("k",))


@pytest.mark.parametrize("name", ["default::Thing", "Thing::default"])
def test_default_is_not_a_module_or_schema_name(name: str) -> None:
    """``default`` is the wildcard of security rules: a schema so named could not be told apart."""
    with pytest.raises(SchemaError, match="wildcard"):
        class Wild(Schema, name=name):
            rows = Relation(Column("k", str), key=("k",))
