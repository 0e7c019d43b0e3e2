"""Declaring schemas: relations with typed columns and a key, operations, protection.

A schema is a class::

    class ConfigurationUpdate(Schema, name="ULocationSystem::ConfigurationUpdate",
                              protection="update"):
        '''Sensor configuration.'''

        sensors = Relation(
            Column("sensor", str),
            Column("sink", str, default=""),
            Column("rate_hz", float, default=1.0),
            key=("sensor",),
            persistent=True,
        )

        @update
        def set_rate(self, tx: Tx, sensor: str, rate_hz: float) -> None:
            tx.sensors.update(sensor=sensor, rate_hz=rate_hz)

Mistakes (a bad name, a key column that is not a column, an unsupported type, an
operation without annotations…) raise :class:`SchemaError` when the class is created,
i.e. at import, naming the schema and the member. Each running instance gets its own
object of the class, with ``cell`` and ``options`` set; an ``async def run(self, ctx)``
method, if declared, runs beside the instance for as long as it lives (simulators,
pollers), committing through ``ctx.transaction()``.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections import namedtuple
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

from .errors import SchemaError

__all__ = [
    "Column",
    "OperationSpec",
    "Param",
    "Protection",
    "Relation",
    "Schema",
    "read",
    "registered_schemas",
    "schema_class",
    "update",
]

_PART = r"[A-Za-z_][A-Za-z0-9_]*"
SCHEMA_NAME = re.compile(rf"^{_PART}::{_PART}$")
MEMBER_NAME = re.compile(rf"^{_PART}$")
BUILTIN_OPERATIONS = frozenset({"get_group", "get_dump", "get_stats", "get_keys", "auth_hello", "auth_confirm", "auth_local"})
RESERVED_RELATION_NAMES = frozenset({"describe", "commit", "rollback", "log", "done"})
"""Names a relation cannot take: ``tx.<name>`` or ``Schema.<name>`` would not reach it."""
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The range of ``int`` columns and parameters (msgpack and SQLite integers)."""

COLUMN_TYPES: Mapping[type, str] = types.MappingProxyType(
    {str: "str", int: "int", float: "float", bool: "bool", bytes: "bytes"}
)
PARAM_TYPES: Mapping[Any, str] = types.MappingProxyType(
    {**COLUMN_TYPES, list: "list", dict: "map", Any: "any"}
)


class Protection(str, enum.Enum):
    """A schema's protection level (DESIGN.md §5)."""

    OPEN = "open"
    UPDATE = "update"
    FULL = "full"


class OpKind(str, enum.Enum):
    READ = "read"
    UPDATE = "update"


@dataclass(frozen=True, slots=True)
class Column:
    """A typed column. Without ``default`` the column is required on insert."""

    name: str
    type: type
    nullable: bool = False
    default: Any = inspect.Parameter.empty

    @property
    def type_name(self) -> str:
        return COLUMN_TYPES[self.type]

    @property
    def has_default(self) -> bool:
        return self.default is not inspect.Parameter.empty


class Relation:
    """A typed table with a key. ``persistent`` relations survive restarts (SQLite);
    volatile ones live in memory only (positions streaming at a high rate)."""

    __slots__ = ("columns", "key", "persistent", "name", "row_type", "key_index", "index")

    def __init__(self, *columns: Column, key: tuple[str, ...] | list[str], persistent: bool = False) -> None:
        self.columns = tuple(columns)
        self.key = tuple(key)
        self.persistent = persistent
        self.name = ""
        self.row_type: type[tuple[Any, ...]] = tuple
        self.key_index: tuple[int, ...] = ()
        self.index: Mapping[str, int] = {}

    def _bind(self, schema: str, name: str) -> None:
        where = f"{schema}.{name}"
        if not MEMBER_NAME.match(name) or name.startswith("_"):
            raise SchemaError(f"{where}: relation names must match [A-Za-z][A-Za-z0-9_]*")
        if name in RESERVED_RELATION_NAMES:
            raise SchemaError(f"{where}: the name is reserved")
        if not self.columns:
            raise SchemaError(f"{where}: a relation needs at least one column")
        seen: dict[str, int] = {}
        for i, col in enumerate(self.columns):
            if not isinstance(col, Column):
                raise SchemaError(f"{where}: column {i} is not a Column")
            if not MEMBER_NAME.match(col.name) or col.name.startswith("_"):
                raise SchemaError(f"{where}.{col.name}: column names must match [A-Za-z][A-Za-z0-9_]*")
            if col.name in seen:
                raise SchemaError(f"{where}.{col.name}: duplicate column")
            if col.type not in COLUMN_TYPES:
                raise SchemaError(f"{where}.{col.name}: unsupported column type {col.type!r}; use one of str, int, float, bool, bytes")
            if col.has_default and not _value_fits(col, col.default):
                raise SchemaError(f"{where}.{col.name}: default {col.default!r} is not a {col.type_name}")
            seen[col.name] = i
        if not self.key:
            raise SchemaError(f"{where}: a relation needs a key")
        for k in self.key:
            if k not in seen:
                raise SchemaError(f"{where}: key column {k!r} is not a column")
            if self.columns[seen[k]].nullable:
                raise SchemaError(f"{where}.{k}: a key column cannot be nullable")
        if len(set(self.key)) != len(self.key):
            raise SchemaError(f"{where}: key names a column twice")
        self.name = name
        self.index = types.MappingProxyType(seen)
        self.key_index = tuple(seen[k] for k in self.key)
        self.row_type = namedtuple(name, [c.name for c in self.columns])  # type: ignore[misc]

    def key_of(self, row: tuple[Any, ...]) -> tuple[Any, ...]:
        return tuple(row[i] for i in self.key_index)

    def describe(self) -> dict[str, Any]:
        return {
            "columns": [[c.name, c.type_name, c.nullable] for c in self.columns],
            "key": list(self.key),
            "persistent": self.persistent,
        }


def _value_fits(col: Column, value: Any) -> bool:
    if value is None:
        return col.nullable
    t = col.type
    if t is float:
        return type(value) in (float, int)
    if t is int:
        return type(value) is int and INT64_MIN <= value <= INT64_MAX
    return type(value) is t


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    type_name: str
    required: bool
    nullable: bool
    default: Any = None


@dataclass(frozen=True, slots=True)
class OperationSpec:
    """A declared operation: its kind, parameters and the function that runs it."""

    name: str
    kind: OpKind
    params: tuple[Param, ...]
    func: Callable[..., Any]
    doc: str

    def describe(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "params": [[p.name, p.type_name, p.required, p.nullable] for p in self.params],
            "doc": self.doc,
        }


F = TypeVar("F", bound=Callable[..., Any])


def _mark(kind: OpKind) -> Callable[[F], F]:
    def deco(func: F) -> F:
        func.__ubi_operation__ = kind  # type: ignore[attr-defined]
        return func

    return deco


read = _mark(OpKind.READ)
"""Declare a read operation: it sees the relations and may not change them."""
update = _mark(OpKind.UPDATE)
"""Declare an update operation: its changes commit durably and publish as one batch."""


def _param_type(hint: Any) -> tuple[str, bool] | None:
    """Map an annotation to (wire type name, nullable), or None if unsupported."""
    if hint in PARAM_TYPES:
        return PARAM_TYPES[hint], False
    origin = typing.get_origin(hint)
    if origin in (list, dict):
        return PARAM_TYPES[origin], False
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(hint)) == 2:
            inner = _param_type(args[0])
            if inner is not None:
                return inner[0], True
    return None


def _operation_spec(schema: str, name: str, func: Callable[..., Any], kind: OpKind) -> OperationSpec:
    where = f"{schema}.{name}"
    if name in BUILTIN_OPERATIONS or name == "describe" or name.startswith("_"):
        raise SchemaError(f"{where}: the name is reserved")
    if inspect.iscoroutinefunction(func):
        raise SchemaError(f"{where}: operations run inside a transaction and cannot be async")
    try:
        hints = typing.get_type_hints(func)
    except Exception as exc:
        raise SchemaError(f"{where}: cannot resolve annotations: {exc}") from None
    sig = inspect.signature(func)
    ps = list(sig.parameters.values())
    if len(ps) < 2 or ps[0].name != "self":
        raise SchemaError(f"{where}: an operation takes (self, tx, ...)")
    params = []
    for p in ps[2:]:
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            raise SchemaError(f"{where}.{p.name}: *args and **kwargs are not allowed")
        if p.name not in hints:
            raise SchemaError(f"{where}.{p.name}: the parameter needs a type annotation")
        mapped = _param_type(hints[p.name])
        if mapped is None:
            raise SchemaError(f"{where}.{p.name}: unsupported parameter type {hints[p.name]!r}")
        required = p.default is p.empty
        params.append(Param(p.name, mapped[0], required, mapped[1], None if required else p.default))
    doc = inspect.cleandoc(func.__doc__ or "").split("\n\n")[0]
    return OperationSpec(name, kind, tuple(params), func, doc)


_REGISTRY: dict[str, type[Schema]] = {}


class Schema:
    """Base class of every schema; see the module docstring for how to declare one."""

    schema_name: ClassVar[str]
    module: ClassVar[str]
    default_protection: ClassVar[Protection]
    relations: ClassVar[Mapping[str, Relation]]
    operations: ClassVar[Mapping[str, OperationSpec]]

    cell: str
    options: Mapping[str, Any]

    def __init_subclass__(cls, *, name: str, protection: str = "open", **kw: Any) -> None:
        super().__init_subclass__(**kw)
        if not isinstance(name, str) or not SCHEMA_NAME.match(name):
            raise SchemaError(f"{cls.__qualname__}: schema name {name!r} is not of the form Module::Schema")
        if "default" in name.split("::"):
            raise SchemaError(f"{name}: 'default' is the wildcard of security rules, not a module or schema name")
        try:
            level = Protection(protection)
        except ValueError:
            raise SchemaError(f"{name}: protection {protection!r} is not one of open, update, full") from None
        # A subclass of a schema inherits its relations and operations.
        rels: dict[str, Relation] = {}
        ops: dict[str, OperationSpec] = {}
        for base in reversed(cls.__mro__[1:]):
            if issubclass(base, Schema) and "schema_name" in vars(base):
                rels.update(base.relations)
                ops.update(base.operations)
        for attr, value in list(vars(cls).items()):
            if isinstance(value, Relation):
                if attr in ops:
                    raise SchemaError(f"{name}.{attr}: a relation and an operation share the name")
                value._bind(name, attr)
                rels[attr] = value
            elif callable(value) and hasattr(value, "__ubi_operation__"):
                if attr in rels:
                    raise SchemaError(f"{name}.{attr}: a relation and an operation share the name")
                ops[attr] = _operation_spec(name, attr, value, value.__ubi_operation__)
        if not rels:
            raise SchemaError(f"{name}: a schema needs at least one relation")
        if "run" in vars(cls) and not inspect.iscoroutinefunction(vars(cls)["run"]):
            raise SchemaError(f"{name}.run: run must be declared 'async def run(self, ctx)'")
        cls.schema_name = name
        cls.module = name.split("::")[0]
        cls.default_protection = level
        cls.relations = types.MappingProxyType(rels)
        cls.operations = types.MappingProxyType(ops)
        other = _REGISTRY.get(name)
        if other is not None and other.__module__ != cls.__module__:  # a module may redeclare (reload, tests)
            raise SchemaError(
                f"{name}: already declared by {other.__module__}.{other.__qualname__}; schema names are unique"
            )
        _REGISTRY[name] = cls

    caller: str = "default"
    """Who calls the operation running now: the session's user, or ``default`` (set by
    the instance before each operation; read it, never write it)."""

    def __init__(self, cell: str, options: Mapping[str, Any] | None = None) -> None:
        self.cell = cell
        self.options = types.MappingProxyType(dict(options or {}))

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """The schema as it travels in ``get_group`` (docs/protocol.md)."""
        return {
            "name": cls.schema_name,
            "default_protection": cls.default_protection.value,
            "relations": {n: r.describe() for n, r in cls.relations.items()},
            "operations": {n: o.describe() for n, o in cls.operations.items()},
        }

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.schema_name} at {self.cell}>"


def registered_schemas() -> Mapping[str, type[Schema]]:
    """Every schema class declared so far in this process, by ``Module::Schema`` name."""
    return types.MappingProxyType(_REGISTRY)


def schema_class(name: str) -> type[Schema] | None:
    return _REGISTRY.get(name)
