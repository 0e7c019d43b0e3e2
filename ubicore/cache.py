"""Following an instance: the caching client and the raw event follower.

A :class:`Cache` keeps a read-only local copy of an instance's relations. It joins as
DESIGN.md §4 says (subscribe, then dump, drop buffered batches up to the dump's
sequence, apply the rest: :class:`~ubicore.protocol.channel.ChannelFollower` does the
bookkeeping) and heals itself: a sequence gap or a new instance id makes it dump again,
and :meth:`Cache.rebind` moves it to new endpoints when naming says the instance
restarted or moved. Re-dumps are diffed against the local copy, so callbacks see every
difference exactly once, as insert, update or delete.

Callbacks run on the event loop and receive (old row, new row), rows being the
relation's named tuples; ``old`` is None for an insert, ``new`` None for a delete.
A :class:`Follower` is the non-caching mode: it hands over delta batches as they come.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import types
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from time import monotonic
from typing import Any, NamedTuple, Protocol

from .errors import (
    AuthenticationFailed,
    CallTimeout,
    DecryptionFailed,
    PermissionDenied,
    ProtocolError,
)
from .protocol.channel import Batch, ChannelFollower, FollowState, ResyncReason
from .protocol.messages import ChannelMessage, Op, Rekey, SealedEvent, Welcome
from .security.amp import CredentialsOutOfDate
from .security.session import ClientSession, ReplayWindow
from .transport.channel import Subscription

log = logging.getLogger(__name__)

Row = tuple[Any, ...]
Key = tuple[Any, ...]
ChangeCallback = Callable[[str, Row | None, Row | None], None]
DELETE = int(Op.DELETE)
_new_row = tuple.__new__
DUMP_TIMEOUT_S = 10.0
WELCOME_WAIT_S = 1.0
RETRY_MIN_S, RETRY_MAX_S = 0.05, 2.0
RENEW_RETRY_MAX_S = 60.0


@dataclass(frozen=True, slots=True)
class Binding:
    """Where an instance is: its endpoints and (if known) its instance id."""

    schema: str
    cell: str
    rpc: str
    events: str
    instance_id: bytes = b""
    protection: str = "open"


class InstanceLink(Protocol):
    """What a cache needs from its client: calls to the instance (sealed when its level
    wants it) and the session whose group keys open a ``full`` channel."""

    def call_binding(self, binding: Binding, operation: str, args: Mapping[str, Any], timeout_s: float) -> Awaitable[Any]: ...

    def channel_session(self, binding: Binding) -> ClientSession | None: ...

    def session_expired(self, session: ClientSession) -> bool: ...


class RelationInfo(NamedTuple):
    row_type: Any
    key_index: tuple[int, ...]
    columns: tuple[str, ...]


def _dump_parts(dump: Any) -> tuple[bytes, int, Mapping[str, Any]]:
    """(instance id, sequence, relations) of a ``get_dump`` result, checked."""
    if not isinstance(dump, dict):
        raise ProtocolError("a dump must be a map")
    iid, seq, relations = dump.get("instance_id"), dump.get("seq"), dump.get("relations")
    if type(iid) is not bytes or type(seq) is not int or seq < 0 or not isinstance(relations, dict):
        raise ProtocolError("a dump needs instance_id (bytes), seq (uint) and relations (map)")
    return iid, seq, relations


def _group_keys(raw: Any) -> list[tuple[int, Any]]:
    """Group keys from a ``get_keys`` result: [[epoch, key], ...]."""
    from .security.primitives import Secret

    if not isinstance(raw, list):
        raise ProtocolError("get_keys must answer an array")
    out = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and type(item[0]) is int and type(item[1]) is bytes
                and len(item[1]) == 16):
            raise ProtocolError("get_keys must answer [epoch, 16-byte key] pairs")
        out.append((item[0], Secret(item[1])))
    return out


def relation_infos(description: Mapping[str, Any]) -> dict[str, RelationInfo]:
    """Row types and key positions from a schema description (``get_group``)."""
    from collections import namedtuple

    out: dict[str, RelationInfo] = {}
    try:
        for name, rel in description["relations"].items():
            cols = tuple(c[0] for c in rel["columns"])
            out[name] = RelationInfo(
                namedtuple(name, cols, rename=True), tuple(cols.index(k) for k in rel["key"]), cols
            )
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ProtocolError(f"malformed schema description: {exc}") from None
    return out


class _Joined:
    """Shared machinery of Cache and Follower: a subscription, a follower, re-dumps."""

    def __init__(self, binding: Binding, link: InstanceLink) -> None:
        self.binding = binding
        self._link = link
        self.follower = ChannelFollower()
        self.ready = asyncio.Event()
        self.resyncs = 0
        self.malformed = 0
        self.undecryptable = 0
        self.rejected = 0
        self.on_rejected: Callable[[str], None] | None = None
        """Told why, each time a channel message is rejected (an instance's audit trail)."""
        self.error: Exception | None = None
        self.last_message = 0.0
        """``time.monotonic()`` (the loop's clock) of the last message on the channel
        (heartbeats come every second)."""
        self.refused: Exception | None = None
        """Set while the instance refuses this join a re-dump (the right was taken away)."""
        self.closed = False
        self._sub: Subscription | None = None
        self._dump_task: asyncio.Task[None] | None = None
        self._renewal: asyncio.Task[None] | None = None
        self._renew_after = 0.0  # loop time: a failed renewal is not tried again before it
        self._renew_backoff = 0.0
        self._again = False
        self._layout_stale = False
        self.infos: dict[str, RelationInfo] = {}
        self._windows: dict[tuple[bytes, int], ReplayWindow] = {}  # this join's replay windows: a
        # client's joins of one instance share its session's keys, not what each has seen
        self.callback_errors = 0
        self._on_close: Callable[[], None] | None = None

    def _rejected(self, why: str) -> None:
        if self.on_rejected is not None:
            try:
                self.on_rejected(f"{self.binding.schema}@{self.binding.cell}: {why}")
            except Exception:
                log.exception("the rejection hook failed")

    @property
    def schema(self) -> str:
        return self.binding.schema

    @property
    def cell(self) -> str:
        return self.binding.cell

    @property
    def instance_id(self) -> bytes | None:
        return self.follower.instance_id

    @property
    def seq(self) -> int:
        return self.follower.seq

    @property
    def live(self) -> bool:
        return self.follower.state is FollowState.LIVE

    async def _start(self, timeout_s: float) -> None:
        self._sub = Subscription(self.binding.events, self._on_message)
        self._request_dump()
        try:
            await asyncio.wait_for(self.ready.wait(), timeout_s)
        except asyncio.TimeoutError:
            await self.close()
            raise CallTimeout(f"could not join {self.schema} at {self.cell} within {timeout_s:.3g} s") from None
        except BaseException:  # cancelled: leave nothing half-joined behind
            await asyncio.shield(self.close())
            raise
        if self.error is not None:  # refused: no right to read, or the login failed
            await self.close()
            raise self.error

    def rebind(self, binding: Binding) -> None:
        """Move to new endpoints (the instance restarted or moved) and re-dump."""
        if self.closed:
            return
        if binding.events != self.binding.events and self._sub is not None:
            self._sub.close()
            self._sub = Subscription(binding.events, self._on_message)
        self.binding = binding
        self.follower = ChannelFollower(resyncs=self.follower.resyncs)
        self._layout_stale = True  # a new instance may run a newer declaration: ask get_group again
        self._request_dump()

    def _on_message(self, msg: ChannelMessage) -> None:
        self.last_message = monotonic()
        if isinstance(msg, SealedEvent):
            session = self._link.channel_session(self.binding)
            foreign = session is None or session.instance_id != msg.instance_id  # a restart, say
            if foreign or not session.group.has(msg.epoch):  # type: ignore[union-attr]
                self.undecryptable += 1
                if self.follower.state is FollowState.LIVE and (
                    foreign or msg.epoch > max(session.group.epochs, default=0)  # type: ignore[union-attr]
                ):
                    # keys we do not hold (a rekey we missed, a new instance): log in or
                    # fetch them as needed, and re-dump
                    self.follower.resync(ResyncReason.GAP)
                    self._note_resync(ResyncReason.GAP)
                return
            assert session is not None
            if self._renewal is None and self._link.session_expired(session):
                # Renew before the instance drops the session from its rekeys: a new
                # login (its grant carries the keys) and the ring carries over.
                loop = asyncio.get_running_loop()
                if loop.time() >= self._renew_after:  # not one login per event after a failure
                    self._renewal = loop.create_task(self._renew())
            try:
                msg = session.group.open(msg, self._windows)
            except DecryptionFailed:
                self.rejected += 1
                self._rejected("a sealed event did not open (tampered, replayed or foreign)")
                return
        elif isinstance(msg, Rekey):
            session = self._link.channel_session(self.binding)
            if session is not None:
                session.open_rekey(msg)
            return
        elif self.binding.protection == "full" and not isinstance(msg, Welcome):
            # A full instance never publishes in the clear: this came from someone else.
            # (After a real move to a lower level, naming updates the binding first.)
            self.rejected += 1
            self._rejected("a clear message on a fully protected channel (forged)")
            return
        res = self.follower.feed(msg)
        if res.batches:
            self._apply_batches(res.batches)
        if res.resync is not None:
            self._note_resync(res.resync)

    def _note_resync(self, reason: ResyncReason) -> None:
        self.resyncs += 1
        if reason is ResyncReason.NEW_INSTANCE:
            self._layout_stale = True  # a restart on the same endpoints may run a newer declaration
        log.info("%s@%s: re-dump (%s)", self.schema, self.cell, reason.value)
        self._request_dump()

    async def _renew(self) -> None:
        try:
            keys = await self._link.call_binding(self.binding, "get_keys", {}, DUMP_TIMEOUT_S)
            session = self._link.channel_session(self.binding)
            if session is not None:
                session.group.add(_group_keys(keys))
            self._renew_backoff = 0.0
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the channel heals by itself (a re-dump) if keys run out
            self._renew_backoff = min(RENEW_RETRY_MAX_S, max(RETRY_MAX_S, 2 * self._renew_backoff))
            self._renew_after = asyncio.get_running_loop().time() + self._renew_backoff
            log.info("%s@%s: session renewal failed (next try in %.3g s): %s", self.schema, self.cell,
                     self._renew_backoff, exc)
        finally:
            self._renewal = None

    def _request_dump(self) -> None:
        if self._dump_task is not None and not self._dump_task.done():
            self._again = True
            return
        self._dump_task = asyncio.get_running_loop().create_task(self._dump_loop())

    async def _dump_loop(self) -> None:
        delay = RETRY_MIN_S
        while not self.closed:
            sub = self._sub  # a rebind may have replaced it since the last attempt
            if sub is not None and not sub.welcomed.is_set():
                # Dump only once the publisher confirmed our subscription, so that no
                # commit falls between the dump and the channel (a publisher without
                # welcome messages costs WELCOME_WAIT_S; gap detection still heals it).
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(sub.welcomed.wait(), WELCOME_WAIT_S)
            self._again = False
            call, binding = self._link.call_binding, self.binding
            try:
                infos = self.infos
                if self._layout_stale or not infos:
                    group = await call(binding, "get_group", {}, DUMP_TIMEOUT_S)
                    infos = relation_infos(group["schema"])
                    self._layout_stale = False
                session = self._link.channel_session(binding)
                if session is not None and session.level == "full":
                    keys = _group_keys(await call(binding, "get_keys", {}, DUMP_TIMEOUT_S))
                    (self._link.channel_session(binding) or session).group.add(keys)  # a login may have renewed it
                dump = await call(binding, "get_dump", {}, DUMP_TIMEOUT_S)
                iid, seq, relations = _dump_parts(dump)
                notify = self._install_dump(relations, infos)
                self.infos = infos
            except asyncio.CancelledError:
                raise
            except (PermissionDenied, AuthenticationFailed, CredentialsOutOfDate) as exc:
                if not self.ready.is_set():  # the join fails with it
                    self.error = exc
                    self.ready.set()
                    return
                log.warning("%s@%s: %s; retrying", self.schema, self.cell, exc)
                self.refused = exc
                await asyncio.sleep(RETRY_MAX_S)
                continue
            except Exception as exc:  # unreachable, malformed, or rows that do not fit the layout
                if isinstance(exc, TypeError):
                    self._layout_stale = True
                log.info("%s@%s: dump failed (%s); retrying", self.schema, self.cell, exc)
                await asyncio.sleep(delay)
                delay = min(RETRY_MAX_S, delay * 2)
                continue
            self.refused = None
            notify()
            res = self.follower.dump_received(iid, seq)
            if res.batches:
                self._apply_batches(res.batches)
            self.ready.set()
            if res.resync is not None:
                self.resyncs += 1
                continue
            if not self._again:
                return

    def _install_dump(
        self, relations: Mapping[str, Any], infos: Mapping[str, RelationInfo]
    ) -> Callable[[], None]:
        """Take a dump in; what to tell the application, to be called once it is in."""
        raise NotImplementedError

    def _apply_batches(self, batches: list[Batch] | Any) -> None:
        raise NotImplementedError

    def _call_back(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run application code; what it raises is logged and counted, never ours to die of."""
        try:
            callback(*args)
        except Exception:
            self.callback_errors += 1
            log.exception("%s@%s: a callback raised", self.schema, self.cell)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._on_close is not None:
            self._on_close()
        if self._sub is not None:
            self._sub.close()
            self._sub = None
        for task in (self._dump_task, self._renewal):
            if task is not None and not task.done():
                task.cancel()
                try:
                    await task
                except (asyncio.CancelledError, Exception):
                    pass


class Cache(_Joined):
    """A live, read-only local copy of an instance's relations (see module docstring)."""

    def __init__(self, binding: Binding, link: InstanceLink) -> None:
        super().__init__(binding, link)
        self._tables: dict[str, dict[Key, Row]] = {}
        self._views: dict[str, Mapping[Key, Row]] = {}
        self._on_change: list[ChangeCallback] = []
        self._by_rel: dict[str, list[ChangeCallback]] = {}

    # --- reading --------------------------------------------------------------------------

    def table(self, relation: str) -> Mapping[Key, Row]:
        """A live read-only mapping key tuple → row of one relation."""
        try:
            return self._views[relation]
        except KeyError:
            raise KeyError(f"{self.schema} has no relation {relation!r}") from None

    @property
    def tables(self) -> Mapping[str, Mapping[Key, Row]]:
        return types.MappingProxyType(self._views)

    def rows(self, relation: str) -> list[Row]:
        return list(self.table(relation).values())

    async def wait_for(self, predicate: Callable[[Cache], bool], timeout_s: float = 5.0) -> None:
        """Wait until ``predicate(cache)`` holds, re-checking after every change."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not predicate(self):
            changed = asyncio.Event()
            cb: ChangeCallback = lambda r, o, n: changed.set()  # noqa: E731
            self._on_change.append(cb)
            try:
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise CallTimeout(f"condition on {self.schema} at {self.cell} not met in {timeout_s:g} s")
                try:
                    await asyncio.wait_for(changed.wait(), min(remaining, 0.25))
                except asyncio.TimeoutError:
                    pass
            finally:
                self._on_change.remove(cb)

    # --- callbacks ------------------------------------------------------------------------

    def on_change(self, callback: ChangeCallback) -> None:
        """``callback(relation, old, new)`` for every change of every relation."""
        self._on_change.append(callback)

    def _on_rel(self, relation: str, cb: ChangeCallback) -> None:
        self._by_rel.setdefault(relation, []).append(cb)

    def on_insert(self, relation: str, callback: Callable[[Row], None]) -> None:
        self._on_rel(relation, lambda r, o, n: callback(n) if o is None else None)  # type: ignore[arg-type]

    def on_update(self, relation: str, callback: Callable[[Row, Row], None]) -> None:
        self._on_rel(relation, lambda r, o, n: callback(o, n) if o is not None and n is not None else None)

    def on_delete(self, relation: str, callback: Callable[[Row], None]) -> None:
        self._on_rel(relation, lambda r, o, n: callback(o) if n is None else None)  # type: ignore[arg-type]

    def _emit(self, rel: str, old: Row | None, new: Row | None) -> None:
        for cb in self._on_change:
            self._call_back(cb, rel, old, new)
        for cb in self._by_rel.get(rel, ()):
            self._call_back(cb, rel, old, new)

    # --- applying -------------------------------------------------------------------------

    def _install_dump(self, relations: Mapping[str, Any], infos: Mapping[str, RelationInfo]) -> Callable[[], None]:
        # Build everything first (a row that does not fit raises before anything changed),
        # then update the tables in place, so that mappings handed out stay live.
        fresh: dict[str, dict[Key, Row]] = {}
        for name, info in infos.items():
            rows = relations.get(name, [])
            make, ki = info.row_type._make, info.key_index
            if len(ki) == 1:
                k0 = ki[0]
                fresh[name] = {(r[k0],): make(r) for r in rows}
            else:
                fresh[name] = {tuple(r[i] for i in ki): make(r) for r in rows}
        changes: list[tuple[str, Row | None, Row | None]] = []
        if self._on_change or self._by_rel:
            for name, new_t in fresh.items():
                old_t = self._tables.get(name, {})
                changes += [(name, old_t.get(k), row) for k, row in new_t.items() if old_t.get(k) != row]
                changes += [(name, old, None) for k, old in old_t.items() if k not in new_t]
        for name, new_t in fresh.items():
            table = self._tables.get(name)
            if table is None:
                self._tables[name] = new_t
                self._views[name] = types.MappingProxyType(new_t)
            else:
                table.clear()
                table.update(new_t)
        for name in [n for n in self._tables if n not in fresh]:  # gone from a newer declaration
            del self._tables[name], self._views[name]

        def notify() -> None:
            for change in changes:
                self._emit(*change)

        return notify

    def _apply_batches(self, batches: Any) -> None:
        try:
            self._apply_changes(batches)
        except TypeError:  # a row or key the relation cannot hold: the copy is suspect
            self.malformed += 1
            self._layout_stale = True
            self.follower.resync(ResyncReason.GAP)
            self._note_resync(ResyncReason.GAP)

    def _apply_changes(self, batches: Any) -> None:
        # The per-event hot path of a cache: per relation, everything needed is looked up
        # once per message, rows become named tuples without a Python-level call, and
        # callbacks are called inline (each table change is made before its callbacks,
        # and a callback that raises is logged, never allowed to cut a batch short).
        plans: dict[str, tuple[dict[Key, Row], Any, int, int, tuple[int, ...]]] = {}
        tables, infos = self._tables, self.infos
        on_change, by_rel = self._on_change, self._by_rel
        for batch in batches:
            for rel, op, row in batch[1]:
                plan = plans.get(rel)
                if plan is None:
                    table = tables.get(rel)
                    if table is None:
                        self.malformed += 1
                        continue
                    info = infos[rel]
                    ki = info.key_index
                    plan = plans[rel] = (table, info.row_type, len(info.columns), ki[0] if len(ki) == 1 else -1, ki)
                table, row_type, width, k0, ki = plan
                if op == DELETE:
                    old = table.pop(row, None)
                    if old is not None and (on_change or by_rel):
                        self._emit(rel, old, None)
                    continue
                if len(row) != width:
                    self.malformed += 1
                    continue
                new = _new_row(row_type, row)
                key = (new[k0],) if k0 >= 0 else tuple([new[i] for i in ki])
                old = table.get(key)
                table[key] = new
                if on_change:
                    for cb in on_change:
                        try:
                            cb(rel, old, new)
                        except Exception:
                            self.callback_errors += 1
                            log.exception("%s@%s: a callback raised", self.schema, self.cell)
                if by_rel and rel in by_rel:
                    for cb in by_rel[rel]:
                        self._call_back(cb, rel, old, new)


class Follower(_Joined):
    """Non-caching mode: ``on_batch(batch)`` for each delta batch after the join point.

    It still takes a dump to learn where the channel stands, and hands it over once as
    ``on_dump(relations)`` if given; gaps and restarts re-dump the same way as a Cache.
    """

    def __init__(
        self,
        binding: Binding,
        link: InstanceLink,
        on_batch: Callable[[Batch], None],
        on_dump: Callable[[Mapping[str, list[list[Any]]]], None] | None = None,
    ) -> None:
        super().__init__(binding, link)
        self._on_batch = on_batch
        self._on_dump = on_dump

    def _install_dump(self, relations: Mapping[str, Any], infos: Mapping[str, RelationInfo]) -> Callable[[], None]:
        on_dump = self._on_dump
        if on_dump is None:
            return lambda: None
        return lambda: self._call_back(on_dump, relations)

    def _apply_batches(self, batches: Any) -> None:
        for batch in batches:
            self._call_back(self._on_batch, batch)


__all__ = ["Binding", "Cache", "Follower", "InstanceLink", "RelationInfo"]
