"""An instance's relations and their persistence.

Every relation lives in memory as a dict from key tuple to row (the relation's named
tuple); reads and dumps come from there. Persistent relations are also kept in an
embedded SQLite database in WAL mode with ``synchronous=FULL``, one file per instance
(``<dataset>/<cell>/<Module>%<Schema>.udata``), loaded at open.

A :class:`Transaction` stages writes in an overlay (so an operation reads its own
writes) and a change log. ``commit`` writes the persistent changes in one SQLite
transaction, and only once that has committed applies the overlay to memory and hands
back the change log, which the instance publishes as one delta batch. An operation that
raises, or a database that fails, leaves memory and disk as they were.

Transactions are serialisable because they do not interleave: operations run to the end
without yielding. A transaction that stays open across an ``await`` (in a schema's
``run``) and sees another commit land meanwhile is refused at commit with
:class:`ConstraintViolation` rather than committing over reads that went stale.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from .errors import ConstraintViolation, StoreError
from .protocol.messages import Change, Op
from .schema import INT64_MAX, INT64_MIN, Column, Relation, Schema

__all__ = ["RelationTx", "Store", "Transaction", "udata_path"]

_SQL_TYPES = {"str": "TEXT", "int": "INTEGER", "float": "REAL", "bool": "INTEGER", "bytes": "BLOB"}
_META_TABLE = "_ubi_meta"

Row = Any
"""A row: an instance of its relation's named tuple, whose fields are only known at run time."""
Key = tuple[Any, ...]


def udata_path(dataset: Path, cell: str, schema_name: str) -> Path:
    """Where an instance keeps its persistent relations."""
    return Path(dataset) / cell / (schema_name.replace("::", "%") + ".udata")


def _check(rel: Relation, col: Column, value: Any) -> Any:
    if value is None:
        if col.nullable:
            return None
    else:
        t = type(value)
        if t is col.type:
            if t is int and not INT64_MIN <= value <= INT64_MAX:
                raise ConstraintViolation(f"{rel.name}.{col.name}: {value} does not fit in 64 bits")
            if t is float and value != value:  # SQLite would store NaN as NULL
                raise ConstraintViolation(f"{rel.name}.{col.name}: NaN is not a storable value")
            return value
        if col.type is float and t is int:
            return float(value)
    raise ConstraintViolation(f"{rel.name}.{col.name}: expected {col.type_name}, got {type(value).__name__}")


_AS_IS = frozenset({str, bytes, bool})
"""Column types whose values, when of exactly that type, need no range or NaN check."""


def build_row(rel: Relation, values: Mapping[str, Any], base: Row | None = None) -> Row:
    """A validated row from column values; missing ones come from ``base`` or defaults."""
    if not values.keys() <= rel.index.keys():  # no set built on the hot path
        unknown = set(values) - rel.index.keys()
        raise ConstraintViolation(f"{rel.name}: no column {sorted(unknown)[0]!r}")
    out: list[Any] = []
    for i, col in enumerate(rel.columns):
        if col.name in values:
            value = values[col.name]
            out.append(value if type(value) is col.type and col.type in _AS_IS else _check(rel, col, value))
        elif base is not None:
            out.append(base[i])
        elif col.has_default:
            out.append(_check(rel, col, col.default))  # an int default of a float column becomes a float
        else:
            raise ConstraintViolation(f"{rel.name}: column {col.name!r} is required")
    return rel.row_type(*out)


class RelationTx:
    """One relation seen through a transaction: reads see the transaction's own writes."""

    __slots__ = ("_rel", "_base", "_overlay", "_log", "_writable")

    def __init__(self, rel: Relation, base: dict[Key, Row], log: list[Change], writable: bool) -> None:
        self._rel = rel
        self._base = base
        self._overlay: dict[Key, Row | None] = {}
        self._log = log
        self._writable = writable

    def get(self, *key: Any) -> Row | None:
        if key in self._overlay:
            return self._overlay[key]
        return self._base.get(key)

    def __contains__(self, key: Any) -> bool:
        k = key if isinstance(key, tuple) else (key,)
        return self.get(*k) is not None

    def __iter__(self) -> Iterator[Row]:
        ov = self._overlay
        for k, row in self._base.items():
            if k not in ov:
                yield row
        for row in ov.values():
            if row is not None:
                yield row

    def __len__(self) -> int:
        return sum(1 for _ in self)

    def _write(self) -> None:
        if not self._writable:
            raise TypeError(f"{self._rel.name}: a read operation cannot change relations")

    def insert(self, **values: Any) -> Row:
        """Add a row; its key must be new."""
        self._write()
        row = build_row(self._rel, values)
        key = self._rel.key_of(row)
        if self.get(*key) is not None:
            raise ConstraintViolation(f"{self._rel.name}: key {key!r} exists")
        self._overlay[key] = row
        self._log.append(Change(self._rel.name, Op.INSERT, row))
        return row

    def update(self, **values: Any) -> Row:
        """Change some columns of the row whose key columns are given; it must exist."""
        self._write()
        try:
            key = tuple(values[k] for k in self._rel.key)
        except KeyError as exc:
            raise ConstraintViolation(f"{self._rel.name}: update needs key column {exc.args[0]!r}") from None
        old = self.get(*key)
        if old is None:
            raise ConstraintViolation(f"{self._rel.name}: no row with key {key!r}")
        row = build_row(self._rel, values, base=old)
        if row != old:
            self._overlay[key] = row
            self._log.append(Change(self._rel.name, Op.UPDATE, row))
        return row

    def upsert(self, **values: Any) -> Row:
        """Insert the row, or replace the columns given if its key exists."""
        self._write()
        rel = self._rel
        keys = rel.key
        try:
            key = (values[keys[0]],) if len(keys) == 1 else tuple(values[k] for k in keys)
        except KeyError as exc:
            raise ConstraintViolation(f"{rel.name}: upsert needs key column {exc.args[0]!r}") from None
        overlay = self._overlay
        old = overlay[key] if key in overlay else self._base.get(key)  # self.get(*key), inlined
        row = build_row(rel, values, base=old)
        if old is None:
            self._overlay[rel.key_of(row)] = row
            self._log.append(Change(rel.name, Op.INSERT, row))
        elif row != old:
            self._overlay[key] = row
            self._log.append(Change(rel.name, Op.UPDATE, row))
        return row

    def delete(self, *key: Any) -> Row | None:
        """Remove the row with this key; returns it, or None if there was none."""
        self._write()
        old = self.get(*key)
        if old is None:
            return None
        self._overlay[self._rel.key_of(old)] = None
        self._log.append(Change(self._rel.name, Op.DELETE, self._rel.key_of(old)))
        return old


class Transaction:
    """Staged changes to a store's relations; see the module docstring."""

    def __init__(self, store: Store, writable: bool) -> None:
        self._store = store
        self._generation = store.generation
        self.log: list[Change] = []
        self._views: dict[str, RelationTx] = {}
        self._writable = writable
        self.done = False

    def __getattr__(self, name: str) -> RelationTx:
        view = self._views.get(name)
        if view is None:
            rel = self._store.relations.get(name)
            if rel is None:
                raise AttributeError(f"{self._store.schema_name} has no relation {name!r}")
            view = self._views[name] = RelationTx(rel, self._store.tables[name], self.log, self._writable)
        return view

    def __getitem__(self, name: str) -> RelationTx:
        return self.__getattr__(name)

    def commit(self) -> tuple[Change, ...]:
        """Make the changes durable and visible; the change log, in order."""
        if self.done:
            raise RuntimeError("transaction already finished")
        self.done = True
        if not self.log:
            return ()
        if self._store.generation != self._generation:
            # Another transaction committed while this one was open: its reads may be
            # stale (an ``await`` inside a ``with ctx.transaction()`` block lets that happen).
            self.log.clear()
            raise ConstraintViolation(
                f"{self._store.schema_name}: another transaction committed while this one was open; "
                "do not await inside a transaction"
            )
        self._store._apply(self._views, self.log)
        return tuple(self.log)

    def rollback(self) -> None:
        self.done = True
        self._views.clear()
        self.log.clear()


class Store:
    """The relations of one instance, in memory and, for persistent ones, on disk."""

    def __init__(self, schema: type[Schema], path: Path | None) -> None:
        self.schema_name = schema.schema_name
        self.relations: Mapping[str, Relation] = schema.relations
        self.tables: dict[str, dict[Key, Row]] = {n: {} for n in schema.relations}
        self.generation = 0
        """Commits so far; a transaction refuses to commit over one made after it began."""
        self.path = path
        self._persistent = {n for n, r in schema.relations.items() if r.persistent}
        self._db: sqlite3.Connection | None = None
        if self._persistent:
            if path is None:
                raise ValueError(f"{self.schema_name} has persistent relations and needs a path")
            self._open(path)

    # --- disk -----------------------------------------------------------------------------

    def _open(self, path: Path) -> None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            self._db = db
            self._ensure_tables(db)
            self._load(db)
        except sqlite3.Error as exc:
            self.close()
            raise StoreError(f"{path}: {exc}") from None
        except OSError as exc:  # the dataset directory cannot be made
            self.close()
            raise StoreError(f"{path}: {exc.strerror or exc}") from None
        except StoreError:
            self.close()  # a file we refuse is not left open
            raise

    def _ensure_tables(self, db: sqlite3.Connection) -> None:
        db.execute(f'CREATE TABLE IF NOT EXISTS "{_META_TABLE}" (name TEXT PRIMARY KEY, value TEXT NOT NULL)')
        meta = dict(db.execute(f'SELECT name, value FROM "{_META_TABLE}"').fetchall())
        stored_schema = meta.get("schema")
        if stored_schema is not None and stored_schema != self.schema_name:
            raise StoreError(f"{self.path}: holds {stored_schema}, not {self.schema_name}")
        db.execute("BEGIN")
        db.execute(f'INSERT OR REPLACE INTO "{_META_TABLE}" VALUES (?, ?)', ("schema", self.schema_name))
        for name in sorted(self._persistent):
            rel = self.relations[name]
            shape = json.dumps(rel.describe(), sort_keys=True)
            stored = meta.get(f"relation:{name}")
            if stored is not None and stored != shape:
                db.execute("ROLLBACK")
                raise StoreError(
                    f"{self.path}: relation {name!r} was written with another declaration; "
                    "move the file aside or migrate it"
                )
            cols = ", ".join(f'"{c.name}" {_SQL_TYPES[c.type_name]}' for c in rel.columns)
            keys = ", ".join(f'"{k}"' for k in rel.key)
            db.execute(f'CREATE TABLE IF NOT EXISTS "{name}" ({cols}, PRIMARY KEY ({keys}))')
            db.execute(f'INSERT OR REPLACE INTO "{_META_TABLE}" VALUES (?, ?)', (f"relation:{name}", shape))
        db.execute("COMMIT")

    def _load(self, db: sqlite3.Connection) -> None:
        for name in self._persistent:
            rel = self.relations[name]
            bools = [i for i, c in enumerate(rel.columns) if c.type is bool]
            table = self.tables[name]
            names = ", ".join(f'"{c.name}"' for c in rel.columns)
            for raw in db.execute(f'SELECT {names} FROM "{name}"'):
                values = list(raw)
                for i in bools:
                    if values[i] is not None:
                        values[i] = bool(values[i])
                row = rel.row_type(*values)
                table[rel.key_of(row)] = row

    def _apply(self, views: Mapping[str, RelationTx], log: list[Change]) -> None:
        db = self._db
        if db is not None and any(ch.relation in self._persistent for ch in log):
            try:
                db.execute("BEGIN IMMEDIATE")
                for ch in log:
                    if ch.relation not in self._persistent:
                        continue
                    rel = self.relations[ch.relation]
                    if ch.op == Op.DELETE:
                        where = " AND ".join(f'"{k}" = ?' for k in rel.key)
                        db.execute(f'DELETE FROM "{ch.relation}" WHERE {where}', ch.row)
                    else:
                        marks = ", ".join("?" * len(rel.columns))
                        db.execute(f'INSERT OR REPLACE INTO "{ch.relation}" VALUES ({marks})', ch.row)
                db.execute("COMMIT")
            except sqlite3.Error as exc:
                try:
                    db.execute("ROLLBACK")
                except sqlite3.Error:
                    pass
                raise StoreError(f"{self.path}: commit failed: {exc}") from None
        self.generation += 1
        for name, view in views.items():
            table = self.tables[name]
            for key, row in view._overlay.items():
                if row is None:
                    table.pop(key, None)
                else:
                    table[key] = row

    # --- api ------------------------------------------------------------------------------

    def transaction(self, writable: bool = True) -> Transaction:
        return Transaction(self, writable)

    def snapshot(self) -> dict[str, list[Row]]:
        """Every relation's rows, as they are now (the body of a dump)."""
        return {name: list(table.values()) for name, table in self.tables.items()}

    def close(self) -> None:
        if self._db is not None:
            try:
                self._db.close()
            finally:
                self._db = None
