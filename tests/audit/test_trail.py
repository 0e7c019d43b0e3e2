"""ubicore/audit/trail.py without sockets: the Auditor's filter and rate cap, the spool
file (round trip, a torn tail, the ack file, compaction, the lock), the shipper against
a fake core, and the core's writer (dedupe by origin, malformed batches, thresholds)."""

from __future__ import annotations

import asyncio
import importlib
import os
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest

from tools.audit_cli import read_records
from ubicore.audit import spool as spool_module
from ubicore.audit import trail
from ubicore.audit.chain import Event, Record, verify
from ubicore.audit.keys import AuditKeys, read_checkpoints
from ubicore.audit.trail import (
    REJECTED_PER_S,
    SPOOL_HEADER,
    Auditor,
    CoreWriter,
    Shipper,
    Spool,
    event_from_row,
)
from ubicore.audit.watch import Lockout
from ubicore.config.model import AuditConfig, Threshold
from ubicore.dispatch import InstanceCore
from ubicore.errors import BadArguments, Unavailable
from ubicore.schema import registered_schemas
from ubicore.store import Store

importlib.import_module("ubicore.services.audit")  # declares UAudit::Log and UAudit::Alerts

T0 = 1_714_557_600.0


def ev(i: int, *, action: str = "update", outcome: str = "ok", principal: str = "alice",
       address: str = "127.0.0.1") -> Event:
    return Event(T0 + i, "host-a", "Site", "UTest::Counter", principal, address, action, outcome, f"bump #{i}")


def row(n: int, e: Event) -> list[Any]:
    return [n, e.time, e.host, e.cell, e.schema, e.principal, e.address, e.action, e.outcome, e.detail]


# --- the Auditor -------------------------------------------------------------------------------------


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_the_auditor_stamps_time_host_cell_and_schema() -> None:
    got: list[Event] = []
    auditor = Auditor(got.append, host="host-a", cell="Zone-A", schema="UTest::Counter", clock=Clock(T0 + 5))
    auditor("update", "ok", "alice", "127.0.0.1", "bump")
    assert got == [Event(T0 + 5, "host-a", "Zone-A", "UTest::Counter", "alice", "127.0.0.1", "update", "ok", "bump")]
    child = auditor.child(cell="Site", schema="UPerm::Config")
    child("policy", "ok", "operator", "127.0.0.1", "add_user(name='bob')")
    assert (got[1].cell, got[1].schema, got[1].host) == ("Site", "UPerm::Config", "host-a")


def test_the_skip_filter_hides_a_principal_containing_it_but_never_failed_logins_or_rejected() -> None:
    got: list[Event] = []
    auditor = Auditor(got.append, host="h", config=AuditConfig(skip_users_containing="[Automated]"))
    bot = "svc[Automated]"
    auditor("update", "ok", bot, "127.0.0.1", "bump")
    auditor("login", "ok", bot, "127.0.0.1", "")
    auditor("denied", "denied", bot, "127.0.0.1", "bump: no")
    assert got == []  # a normal principal containing the filter is not audited
    auditor("login", "failed", bot, "127.0.0.1", "wrong password or unknown user")
    auditor("login", "refused", bot, "127.0.0.1", "locked out for 30 s more")
    auditor("rejected", "refused", bot, "127.0.0.1", "a malformed request")
    auditor("update", "ok", "alice", "127.0.0.1", "bump")
    auditor("update", "ok", "Automated", "127.0.0.1", "bump")  # the whole filter, brackets too
    assert [(e.principal, e.action, e.outcome) for e in got] == [
        (bot, "login", "failed"), (bot, "login", "refused"), (bot, "rejected", "refused"),
        ("alice", "update", "ok"), ("Automated", "update", "ok")]


def test_without_the_filter_every_principal_is_audited() -> None:
    got: list[Event] = []
    auditor = Auditor(got.append, host="h")
    auditor("update", "ok", "svc[Automated]", "", "bump")
    assert len(got) == 1


def test_rejected_messages_are_capped_per_second_and_the_rest_counted_into_the_next() -> None:
    got: list[Event] = []
    clock = Clock(T0 + 0.1)
    auditor = Auditor(got.append, host="h", clock=clock)
    for i in range(REJECTED_PER_S + 50):
        auditor("rejected", "refused", "default", "10.1.1.1", f"junk {i}")
    assert len(got) == REJECTED_PER_S
    assert all("more rejected" not in e.detail for e in got)
    # other actions are never capped, even within the same second
    for _ in range(2 * REJECTED_PER_S):
        auditor("denied", "denied", "mallory", "10.1.1.1", "bump: no")
    assert len(got) == 3 * REJECTED_PER_S
    clock.t = T0 + 1.2  # the next second: recorded again, with the count of the dropped ones
    auditor("rejected", "refused", "default", "10.1.1.1", "junk late")
    assert got[-1].detail.startswith("junk late (and 50 more ")
    assert got[-1].detail.endswith(" before this one, not recorded one by one)")
    auditor("rejected", "refused", "default", "10.1.1.1", "junk later")
    assert got[-1].detail == "junk later"  # counted once only


def test_a_failing_sink_never_takes_the_action_down() -> None:
    def sink(event: Event) -> None:
        raise OSError("disk full")

    Auditor(sink, host="h")("update", "ok", "alice", "", "bump")  # no exception


# --- the spool ------------------------------------------------------------------------------------


@pytest.fixture
def spool_dir(tmp_path: Path) -> Path:
    return tmp_path / "spool"


@pytest.fixture
def opened(spool_dir: Path) -> Iterator[list[Spool]]:
    spools: list[Spool] = []
    yield spools
    for s in spools:
        s.close()


def open_spool(opened: list[Spool], directory: Path, name: str = "instance-UTest%Counter@Site") -> Spool:
    s = Spool(directory, name)
    opened.append(s)
    return s


def test_a_spool_round_trips_its_events_across_a_reopen(spool_dir: Path, opened: list[Spool]) -> None:
    s = open_spool(opened, spool_dir)
    assert s.path == spool_dir / "instance-UTest%Counter@Site.spool"
    assert oct(spool_dir.stat().st_mode & 0o777) == oct(0o700)
    assert oct(s.path.stat().st_mode & 0o777) == oct(0o600)
    events = [ev(i) for i in range(1, 4)]
    for e in events:
        s.put(e)
    assert s.pending() == [row(n, e) for n, e in enumerate(events, 1)]
    assert all(event_from_row(r)[1] == e for r, e in zip(s.pending(), events))
    origin = s.origin
    assert origin.endswith(":instance-UTest%Counter@Site") and len(origin.split(":")[0]) == 32
    s.close()
    again = open_spool(opened, spool_dir)
    assert again.origin == origin  # the same spool: the core's dedupe keeps working across restarts
    assert (again.last, again.acked, again.backlog) == (3, 0, 3)
    assert again.pending() == [row(n, e) for n, e in enumerate(events, 1)]
    assert again.pending(limit=2) == [row(1, events[0]), row(2, events[1])]
    again.put(ev(4))
    assert again.pending()[-1][0] == 4


def test_the_spool_file_is_the_documented_format(spool_dir: Path, opened: list[Spool]) -> None:
    s = open_spool(opened, spool_dir)
    s.put(ev(1))
    data = s.path.read_bytes()
    assert data[:8] == b"UBISPOOL" and data[8] == 1 and data[9:25] == s.spool_id
    (length,) = struct.unpack(">I", data[25:29])
    assert len(data) == 29 + length
    assert msgpack.unpackb(data[29:]) == row(1, ev(1))


@pytest.mark.parametrize("torn", [b"\x00\x00", b"\x00\x00\x00\x40" + b"\x93\x01", b"\x00\x00\x00\x02\xc1\xc1"])
def test_a_torn_last_frame_is_cut_and_the_rest_kept(spool_dir: Path, opened: list[Spool], torn: bytes) -> None:
    s = open_spool(opened, spool_dir)
    for i in range(1, 4):
        s.put(ev(i))
    s.close()
    intact = s.path.stat().st_size
    with open(s.path, "ab") as f:  # a crash in the middle of the fourth write
        f.write(torn)
    again = open_spool(opened, spool_dir)
    assert s.path.stat().st_size == intact
    assert [r[0] for r in again.pending()] == [1, 2, 3]
    again.put(ev(4))  # appended after the cut, readable on the next open
    again.close()
    third = open_spool(opened, spool_dir)
    assert [r[0] for r in third.pending()] == [1, 2, 3, 4]
    assert third.pending()[-1] == row(4, ev(4))


def test_a_file_that_is_no_spool_is_started_anew(spool_dir: Path, opened: list[Spool]) -> None:
    spool_dir.mkdir(mode=0o700)
    (spool_dir / "x.spool").write_bytes(b"not a spool at all")
    (spool_dir / "x.ack").write_bytes(struct.pack(">Q", 99))
    s = open_spool(opened, spool_dir, "x")
    assert (s.last, s.acked, s.pending()) == (0, 0, [])
    s.put(ev(1))
    s.close()
    again = open_spool(opened, spool_dir, "x")  # the old ack belonged to another spool: it is gone
    assert (again.acked, again.pending()) == (0, [row(1, ev(1))])


def test_the_ack_persists_across_a_reopen_and_acknowledged_events_are_not_sent_again(
        spool_dir: Path, opened: list[Spool]) -> None:
    s = open_spool(opened, spool_dir)
    for i in range(1, 6):
        s.put(ev(i))
    s.acknowledge(3)
    assert s.ack_path.read_bytes() == struct.pack(">Q", 3)
    assert [r[0] for r in s.pending()] == [4, 5]
    s.acknowledge(2)  # an older acknowledgement changes nothing
    assert s.acked == 3
    s.close()
    again = open_spool(opened, spool_dir)
    assert (again.acked, again.backlog) == (3, 2)
    sent: list[dict[str, Any]] = []

    async def call(schema: str, operation: str, **args: Any) -> dict[str, int]:
        sent.append({"schema": schema, "operation": operation, **args})
        return {"last": args["events"][-1][0]}

    shipper = Shipper(again, call)
    assert asyncio.run(shipper.ship_once()) == 2
    assert [(m["schema"], m["operation"], m["origin"]) for m in sent] == [("UAudit::Log", "append", again.origin)]
    assert [r[0] for r in sent[0]["events"]] == [4, 5]
    assert asyncio.run(shipper.ship_once()) == 0 and len(sent) == 1  # nothing left to send
    assert shipper.shipped == 2


def test_compaction_empties_the_file_once_everything_is_acknowledged(
        spool_dir: Path, opened: list[Spool], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(spool_module, "COMPACT_BYTES", 0)  # compact at any size
    s = open_spool(opened, spool_dir)
    for i in range(1, 4):
        s.put(ev(i))
    s.acknowledge(2)
    assert s.path.stat().st_size > SPOOL_HEADER  # one left: nothing is cut yet
    s.acknowledge(3)
    assert s.path.stat().st_size == SPOOL_HEADER and s.backlog == 0
    s.put(ev(4))  # numbering goes on (the core remembers 3 for this spool)
    assert s.pending() == [row(4, ev(4))]
    s.acknowledge(4)
    s.close()
    assert s.path.stat().st_size == SPOOL_HEADER
    again = open_spool(opened, spool_dir)
    assert (again.last, again.acked, again.pending()) == (4, 4, [])
    again.put(ev(5))
    assert again.pending()[0][0] == 5


def test_a_small_acknowledged_spool_is_left_for_the_ack_mark_to_cover(spool_dir: Path, opened: list[Spool]) -> None:
    s = open_spool(opened, spool_dir)
    for i in range(1, 4):
        s.put(ev(i))
    s.acknowledge(3)
    assert s.path.stat().st_size <= SPOOL_HEADER + trail.COMPACT_BYTES
    s.close()
    again = open_spool(opened, spool_dir)
    assert (again.last, again.acked, again.backlog, again.pending()) == (3, 3, 0, [])


def test_an_acknowledgement_beyond_what_was_written_is_held_to_the_last(spool_dir: Path, opened: list[Spool]) -> None:
    s = open_spool(opened, spool_dir)
    s.put(ev(1))
    s.acknowledge(50)
    assert (s.acked, s.last) == (1, 1)
    s.put(ev(2))
    assert s.pending()[0][0] == 2


def test_a_second_spool_of_the_same_name_while_the_first_is_held_gets_its_own_file(
        spool_dir: Path, opened: list[Spool], monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_spool(opened, spool_dir)
    first.put(ev(1))
    naps: list[float] = []
    monkeypatch.setattr(time, "sleep", naps.append)  # the 5 s of waiting for the old run to exit
    second = open_spool(opened, spool_dir)  # a second open file description: flock refuses it
    assert second.path == spool_dir / f"instance-UTest%Counter@Site.{os.getpid()}.spool"
    assert naps  # it waited for the old run to let go first
    assert second.spool_id != first.spool_id and second.origin != first.origin
    assert second.pending() == []
    second.put(ev(2))
    assert first.pending() == [row(1, ev(1))]  # neither writes into the other's file
    assert second.pending() == [row(1, ev(2))]


def test_a_restart_overlapping_the_old_runs_exit_gets_the_file_once_it_is_let_go(
        spool_dir: Path, opened: list[Spool], monkeypatch: pytest.MonkeyPatch) -> None:
    first = open_spool(opened, spool_dir)
    first.put(ev(1))
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            first.close()  # the old run exits while the new one waits

    monkeypatch.setattr(time, "sleep", nap)
    second = open_spool(opened, spool_dir)
    assert second.path == first.path and second.origin == first.origin
    assert second.pending() == [row(1, ev(1))]  # what the old run left is shipped by the new one
    assert len(naps) == 3


def test_a_spool_locked_by_another_process_is_left_alone(spool_dir: Path, opened: list[Spool],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    first = open_spool(opened, spool_dir)
    first.put(ev(1))
    script = ("import sys, time; from pathlib import Path; import ubicore.audit.spool as t;"
              "t.time.sleep = lambda s: None; s = t.Spool(Path(sys.argv[1]), sys.argv[2]);"
              "print(s.path.name, len(s.pending())); s.close()")
    out = subprocess.run([sys.executable, "-c", script, str(spool_dir), first.name], capture_output=True,
                         text=True, timeout=30, check=True).stdout.split()
    assert out[0].startswith("instance-UTest%Counter@Site.") and out[0].endswith(".spool")
    assert out[0] != first.path.name and int(out[0].split(".")[1]) != os.getpid()
    assert out[1] == "0"
    assert first.pending() == [row(1, ev(1))]


# --- the shipper --------------------------------------------------------------------------------


def test_the_shipper_retries_while_the_core_is_down_and_delivers_once_it_is_back(
        spool_dir: Path, opened: list[Spool]) -> None:
    s = open_spool(opened, spool_dir)
    core_up = False
    received: list[list[Any]] = []
    calls = 0

    async def call(schema: str, operation: str, **args: Any) -> dict[str, int]:
        nonlocal calls
        calls += 1
        if not core_up:
            raise Unavailable("the core is down")
        received.extend(args["events"])
        return {"last": args["events"][-1][0]}

    async def main() -> None:
        nonlocal core_up
        shipper = Shipper(s, call)
        shipper.start()
        try:
            for i in range(1, 6):
                s.put(ev(i))
            async with asyncio.timeout(5):
                while shipper.failures < 3:
                    await asyncio.sleep(0.01)
            assert received == [] and s.backlog == 5
            core_up = True
            async with asyncio.timeout(10):
                while s.backlog:
                    await asyncio.sleep(0.01)
            s.put(ev(6))
            async with asyncio.timeout(5):
                while s.backlog:
                    await asyncio.sleep(0.01)
        finally:
            await shipper.close(flush_s=0.5)

    asyncio.run(main())
    assert [r[0] for r in received] == [1, 2, 3, 4, 5, 6]
    assert open_spool(opened, spool_dir).pending() == []


def test_closing_the_shipper_flushes_what_is_spooled(spool_dir: Path, opened: list[Spool]) -> None:
    s = open_spool(opened, spool_dir)
    received: list[int] = []

    async def call(schema: str, operation: str, **args: Any) -> dict[str, int]:
        received.extend(r[0] for r in args["events"])
        return {"last": args["events"][-1][0]}

    async def main() -> None:
        shipper = Shipper(s, call)
        shipper.start()
        await asyncio.sleep(0)
        s.put(ev(1))
        s.put(ev(2))  # the last records put just before close
        await shipper.close(flush_s=1.0)

    asyncio.run(main())
    assert received == [1, 2]


def test_a_shipper_that_cannot_deliver_before_close_leaves_the_events_for_the_next_run(
        spool_dir: Path, opened: list[Spool]) -> None:
    s = open_spool(opened, spool_dir)

    async def call(schema: str, operation: str, **args: Any) -> dict[str, int]:
        raise Unavailable("the core is down")

    async def main() -> None:
        shipper = Shipper(s, call)
        shipper.start()
        s.put(ev(1))
        await shipper.close(flush_s=0.2)

    asyncio.run(main())
    again = open_spool(opened, spool_dir)
    assert again.pending() == [row(1, ev(1))]


# --- the core's writer ------------------------------------------------------------------------------


class Core:
    """A CoreWriter over its own trail file and the UAudit::Log and UAudit::Alerts cores."""

    def __init__(self, tmp_path: Path, config: AuditConfig | None = None, keys: AuditKeys | None = None) -> None:
        schemas = registered_schemas()
        log_schema, alerts_schema = schemas["UAudit::Log"], schemas["UAudit::Alerts"]
        self.log = InstanceCore(log_schema, "Site", Store(log_schema, None))
        self.alerts = InstanceCore(alerts_schema, "Site", Store(alerts_schema, tmp_path / "alerts.udata"))
        self.keys = keys or AuditKeys.generate()
        self.trail = tmp_path / "Site" / "UAudit%Log.udata"
        self.checkpoints = tmp_path / "checkpoints"
        self.lockouts: list[list[Lockout]] = []
        self.writer = CoreWriter(self.trail, self.log, self.alerts, self.keys, self.checkpoints, config or AuditConfig(),
                                 self.lockouts.append, host="host-a", clock=lambda: T0 + 1000)
        self.log.obj.writer = self.writer  # type: ignore[attr-defined]

    def close(self) -> None:
        self.writer.close()
        self.log.store.close()
        self.alerts.store.close()

    def append(self, origin: str, events: list[Any], submitter: str = "site-service") -> int:
        return self.writer.append(origin, submitter, events)

    def records(self) -> list[Record]:
        return list(read_records(self.trail))

    def last_taken(self, origin: str) -> int | None:
        found = self.writer.db.execute("SELECT last FROM origins WHERE origin = ?", (origin,)).fetchone()
        return None if found is None else int(found[0])


@pytest.fixture
def core(tmp_path: Path) -> Iterator[Core]:
    c = Core(tmp_path)
    yield c
    c.close()


ORIGIN = "0123456789abcdef0123456789abcdef:instance-UTest%Counter@Site"


def test_a_batch_appended_twice_is_recorded_once(core: Core) -> None:
    batch = [row(n, ev(n)) for n in range(1, 4)]
    assert core.append(ORIGIN, batch) == 3
    assert core.append(ORIGIN, batch) == 3  # the acknowledgement was lost: sent again
    records = core.records()
    assert [r.detail for r in records] == ["bump #1", "bump #2", "bump #3"]
    assert [r.seq for r in records] == [1, 2, 3]
    (origin,) = {r.origin for r in records}  # who submitted them: the spool's process and its user
    assert origin.startswith("instance-UTest%Counter@Site") and origin.endswith(" as site-service")
    assert core.last_taken(ORIGIN) == 3
    assert verify(records, core.keys).ok


def test_a_partially_overlapping_batch_records_only_the_new_events(core: Core) -> None:
    core.append(ORIGIN, [row(n, ev(n)) for n in range(1, 4)])
    assert core.append(ORIGIN, [row(n, ev(n)) for n in range(2, 7)]) == 6
    assert [r.detail for r in core.records()] == [f"bump #{n}" for n in range(1, 7)]
    # another spool's numbers are its own
    other = "fedcba9876543210fedcba9876543210:instance-UTest%Counter@Zone-A"
    assert core.append(other, [row(n, ev(10 + n)) for n in range(1, 3)]) == 2
    assert len(core.records()) == 8
    assert verify(core.records(), core.keys).ok


def test_a_restarted_core_continues_the_chain_and_still_knows_what_it_took(tmp_path: Path) -> None:
    first = Core(tmp_path)
    try:
        first.append(ORIGIN, [row(n, ev(n)) for n in range(1, 4)])
    finally:
        first.close()
    second = Core(tmp_path, keys=first.keys)
    try:
        assert second.writer.committed[0] == 3
        assert second.append(ORIGIN, [row(n, ev(n)) for n in range(1, 6)]) == 5  # 1..3 were taken before
        records = second.records()
        assert [r.detail for r in records] == [f"bump #{n}" for n in range(1, 6)]
        assert verify(records, second.keys).ok
    finally:
        second.close()


def test_events_out_of_order_within_a_batch_are_not_taken_twice(core: Core) -> None:
    core.append(ORIGIN, [row(1, ev(1)), row(3, ev(3)), row(2, ev(2)), row(3, ev(3))])
    assert [r.detail for r in core.records()] == ["bump #1", "bump #3"]


@pytest.mark.parametrize("bad", [
    "not a list",
    [1, T0, "h", "Site", "S", "p", "a", "update", "ok"],  # 9 fields
    [0, T0, "h", "Site", "S", "p", "a", "update", "ok", "d"],  # n < 1
    [True, T0, "h", "Site", "S", "p", "a", "update", "ok", "d"],
    [2, "yesterday", "h", "Site", "S", "p", "a", "update", "ok", "d"],
    [2, T0, "h", "Site", "S", "p", b"bytes", "update", "ok", "d"],
    [2, T0, "h", "Site", "S", "p", "a", "teleport", "ok", "d"],  # no such action
    [2, T0, "h", "Site", "S", "p", "a", "update", "maybe", "d"],  # no such outcome
    [2, float("nan"), "h", "Site", "S", "p", "a", "update", "ok", "d"],
])
def test_a_malformed_event_is_refused_and_nothing_of_its_batch_is_staged(core: Core, bad: Any) -> None:
    core.append(ORIGIN, [row(1, ev(1))])
    before = core.writer.committed
    with pytest.raises(BadArguments) as info:
        core.append(ORIGIN, [row(2, ev(2)), bad, row(4, ev(4))])
    assert "events[1]" in info.value.message and info.value.detail == {"argument": "events"}
    assert [r.seq for r in core.records()] == [1]
    assert core.last_taken(ORIGIN) == 1
    assert core.writer.committed == before
    # the chain goes on from where it was: the next good batch follows record 1
    core.append(ORIGIN, [row(2, ev(2))])
    assert [r.seq for r in core.records()] == [1, 2] and verify(core.records(), core.keys).ok


def test_the_append_operation_refuses_a_bad_origin_too_many_events_or_no_writer(core: Core) -> None:
    obj = core.log.obj
    spec = core.log.schema.operations["append"]
    tx = core.log.store.transaction(writable=True)
    try:
        with pytest.raises(BadArguments):
            spec.func(obj, tx, origin="", events=[])
        with pytest.raises(BadArguments):
            spec.func(obj, tx, origin=ORIGIN, events=[row(n, ev(n)) for n in range(1, 1002)])
        assert spec.func(obj, tx, origin=ORIGIN, events=[row(1, ev(1))]) == {"last": 1}
        obj.writer = None  # type: ignore[attr-defined]
        with pytest.raises(BadArguments, match="not the core's"):
            spec.func(obj, tx, origin=ORIGIN, events=[row(2, ev(2))])
    finally:
        tx.rollback()
    assert [r.seq for r in core.records()] == [1]


def test_the_newest_records_are_shown_in_recent_and_read_back_by_tail_and_search(core: Core) -> None:
    core.append(ORIGIN, [row(n, ev(n, principal="alice" if n % 2 else "bob")) for n in range(1, 301)])
    recent = core.log.store.tables["recent"]
    assert len(recent) == trail.RECENT and min(k[0] for k in recent) == 301 - trail.RECENT
    assert [r["seq"] for r in core.writer.tail(3)] == [298, 299, 300]
    assert set(core.writer.tail(1)[0]) == {"seq", "time", "host", "cell", "schema", "principal", "address",
                                           "action", "outcome", "detail", "origin"}  # no proofs
    bobs = core.writer.search(user="bob", limit=1000)
    assert len(bobs) == 150 and all(r["principal"] == "bob" for r in bobs)
    assert [r["seq"] for r in core.writer.search(action="update", limit=2)] == [299, 300]
    assert core.writer.search(action="login") == []
    assert core.writer.count() == 300


def test_the_cores_own_events_are_chained_with_the_appended_ones_and_checkpointed(tmp_path: Path) -> None:
    c = Core(tmp_path, AuditConfig(checkpoint_records=5))

    async def main() -> None:
        c.writer.local(Event(T0, "host-a", "Site", "", "", "", "start", "ok", "core up"))
        c.writer.local(Event(T0, "host-a", "Site", "", "", "", "start", "ok", "core up again"))
        await asyncio.sleep(0)  # recorded within the loop turn, in one transaction
        assert [r.detail for r in c.records()] == ["core up", "core up again"]
        c.append(ORIGIN, [row(n, ev(n)) for n in range(1, 5)])

    try:
        asyncio.run(main())
        records = c.records()
        assert [r.seq for r in records] == list(range(1, 7))
        assert records[0].origin == "core on host-a"
        cps = read_checkpoints(c.checkpoints)
        assert [cp.seq for cp in cps] == [6]  # 5 records passed: one checkpoint, of the newest
        assert verify(records, c.keys, cps).ok
    finally:
        c.close()


def failed_login(n: int, user: str, address: str = "10.9.9.9") -> list[Any]:
    return row(n, Event(T0 + n * 0.01, "host-a", "Site", "UTest::Counter", user, address, "login", "failed",
                        "wrong password or unknown user"))


def test_failed_logins_crossing_the_threshold_raise_an_alert_and_a_lockout(tmp_path: Path) -> None:
    config = AuditConfig(failed_logins_per_user=Threshold(5, 60.0), lockout_base_s=7.0)
    c = Core(tmp_path, config)

    async def main() -> None:
        c.append(ORIGIN, [failed_login(n, "operator") for n in range(1, 5)])
        await asyncio.sleep(0.01)
        assert c.lockouts == [] and not c.alerts.store.tables["alerts"]
        c.append(ORIGIN, [failed_login(5, "operator")])
        for _ in range(5):
            await asyncio.sleep(0)

    try:
        asyncio.run(main())
        (alert,) = c.alerts.store.tables["alerts"].values()
        assert (alert.kind, alert.subject, alert.count, alert.window_s, alert.lockout_s) == (
            "failed_logins_per_user", "operator", 5, 60.0, 7.0)
        assert len(c.lockouts) == 1
        (lk,) = c.lockouts[0]
        assert (lk.kind, lk.subject, lk.strikes) == ("user", "operator", 1)
        assert lk.until - lk.since == pytest.approx(7.0)
        tail = c.records()[-2:]
        assert [(r.action, r.outcome, r.principal, r.schema) for r in tail] == [
            ("alert", "refused", "operator", "UAudit::Alerts"), ("lockout", "ok", "operator", "UAudit::Alerts")]
        assert "locked out for 7 s" in tail[1].detail
        assert verify(c.records(), c.keys).ok
    finally:
        c.close()


def test_failed_logins_of_default_count_per_address_only(tmp_path: Path) -> None:
    config = AuditConfig(failed_logins_per_user=Threshold(3, 60.0), failed_logins_per_address=Threshold(6, 60.0))
    c = Core(tmp_path, config)

    async def main() -> None:
        c.append(ORIGIN, [failed_login(n, "default", f"10.0.0.{n}") for n in range(1, 6)])
        await asyncio.sleep(0.01)
        assert c.lockouts == []  # five anonymous failures from five addresses: nobody is locked out
        c.append(ORIGIN, [failed_login(n, "default") for n in range(6, 12)])
        await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        kinds = {(lk.kind, lk.subject) for lks in c.lockouts for lk in lks}
        assert kinds == {("address", "10.9.9.9")}
    finally:
        c.close()


def test_a_lockout_an_operator_cleared_is_forgotten(tmp_path: Path) -> None:
    config = AuditConfig(failed_logins_per_user=Threshold(2, 60.0), lockout_base_s=5.0)
    c = Core(tmp_path, config)

    async def main() -> None:
        c.append(ORIGIN, [failed_login(n, "bob") for n in range(1, 3)])
        await asyncio.sleep(0.01)
        assert c.writer.watch.remembered(T0 + 1) != []
        c.writer.lockouts_changed([])  # the policy's lockouts no longer name bob
        assert c.writer.watch.remembered(T0 + 1) == []
        c.append(ORIGIN, [failed_login(n, "bob") for n in range(3, 5)])
        await asyncio.sleep(0.01)

    try:
        asyncio.run(main())
        (lk,) = c.lockouts[-1]
        assert lk.strikes == 1  # starts again at one strike: not doubled
    finally:
        c.close()
