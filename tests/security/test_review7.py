"""Review 7: an attacker's and an operator's look at issue 6 (the audit trail, alerts and
lockout: d30f611, 78a4078, 6b29a5f; re-checked against 85cfdef..f6ab64e, which landed
while the review ran).

Each finding is a test that failed before its fix. Most severe
first:

1. Anyone who reaches the site locks out its service user (or the administrator): five
   wrong passwords a minute, from anywhere, and no process of the site can log in.
3. A login begun before a lockout completes during it: the lockout is checked at pass 1
   only, so a guesser pipelines up to MAX_PENDING guesses past the threshold.
14. Control characters of an unauthenticated user name reach the operator's terminal
    through ``ubi audit tail``/``search`` (forged lines, escape sequences) and the log.
6. An unauthenticated client writes records of any size: a failed login's user name is
   not capped (200 kB here; up to 64 MB), in the trail and in ``recent`` (memory).
7. A spool frame over 64 kB (such a login at an instance) is written, but cut off as
   "torn" when the spool is read back, with every record after it.
9. The core makes a new audit key when the key file is missing although the trail holds
   records: from then on the whole trail fails verification.
10. A flood of failed logins for made-up names evicts a user's failed-login window: a
    guesser with many addresses (an IPv6 /64) is never locked out.
8. Refused and malformed logins are recorded one by one without a cap: a lockout does not
   stop an unauthenticated flood of records.
5. A service user's forged record carries exactly the origin label of the real process's.
12. A spool whose ack file was lost (left empty by a crash) reuses its origin and numbers,
    and the core drops the new records as duplicates.
13. docs/security.md and docs/protocol.md still say nothing is audited, nobody locked out.

Fixed upstream while the review ran, kept as regression tests: 2 (logins at UAudit::Log
and UAudit::Alerts were not audited nor counted: f6ab64e) and 11 (an instance whose level
changed in the loop turn it was stopped in never finished stopping: 59c1ca2). Finding 4
(a service user read every spool's origin from UAudit::Log's ``origins`` relation and
silenced another process's records with one append of n = 2**62) is no longer
reachable since 85cfdef moved ``origins`` into the core's own file: see the note at 5.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from ubicore.audit.chain import AuditKeyError, Event
from ubicore.audit.trail import AUDIT_LOG, Auditor, Spool, audit_paths
from ubicore.audit.watch import Watch
from ubicore.config.model import AuditConfig
from ubicore.errors import LockedOut
from ubicore.protocol.messages import ErrorReply, Reply
from ubicore.runtime import SERVICE_USER, cached_service_credentials
from ubicore.schema import Protection
from ubicore.security.amp import ClientHandshake, PasswordSecret
from ubicore.testing.site import COUNTER, OPERATOR, run_async, running_site

from .attack_support import _challenge, raw_dealer, wait_until

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

PERM = "UPerm::Config"
LOG = AUDIT_LOG
ALERTS = "UAudit::Alerts"
ROOT = Path(__file__).resolve().parents[2]


def xfail(reason: str, raises: type[BaseException] = AssertionError) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=raises, reason=reason)


# --- helpers -------------------------------------------------------------------------------------


def records(rs: Any) -> list[Any]:
    """The whole trail, in seq order, from the core's writer (its SQLite file)."""
    return list(rs.core.companions[LOG].core.obj.writer._newest(1_000_000))


def locked(rs: Any, kind: str, subject: str) -> bool:
    """Whether UPerm::Config holds a lockout of (kind, subject) in force now."""
    rows = rs.core.companions[PERM].core.store.tables["lockouts"].values()
    return any(r.kind == kind and r.subject == subject and r.until > time.time() for r in rows)


async def begin_login(d: Any, user: str, password: str) -> tuple[ClientHandshake, Any]:
    """Pass 1 over a bare DEALER: (the client's handshake, the server's reply)."""
    hs = ClientHandshake(user, None, PasswordSecret(password))
    hello = hs.start()
    return hs, await d.request("auth_hello", {"user": hello.user, "g1": hello.g1})


async def finish_login(d: Any, hs: ClientHandshake, ch: dict[str, Any]) -> Any:
    """Pass 3 for a pass 2 received earlier: the server's reply (Reply: logged in)."""
    confirm = hs.respond(_challenge(ch), ch["site"])
    return await d.request("auth_confirm", {"hs": ch["hs"], "h_c": confirm.h_c})


async def failed_login(d: Any, user: str, password: str = "not-the-password") -> Any:
    hs, rep = await begin_login(d, user, password)
    if not isinstance(rep, Reply):
        return rep
    return await finish_login(d, hs, rep.result)


def event(principal: str = "alice", detail: str = "x") -> Event:
    return Event(time.time(), "host-a", "Site", COUNTER, principal, "127.0.0.1", "login", "failed", detail)


# --- 1 -------------------------------------------------------------------------------------------
# Defect: SessionGuard.hello refuses every login of a locked-out user name, whoever and
# wherever it comes from, and the Watch locks any user name after failed_logins_per_user
# (5 a minute) failures, service users and administrators included. An unauthenticated
# attacker anywhere on the network keeps ``site-service`` (shared by every host by
# default) locked out for up to lockout_max_s at a time: instances cannot start (their
# PolicyFollower waits for ever), sessions that expire cannot be renewed (the follower
# then fails closed: every protected action refused), nothing is shipped to the trail.
# The same locks the administrator out of ``ubi security lockouts clear``. Nothing in the
# docs mentions it. Fix: lock (user, address) pairs rather than users, so a user's own
# hosts keep logging in; exempt service users from user lockouts (they have no typed
# password to guess; their π is 64 random bytes); or at least document the DoS and give
# the operator a way out (an allow-list of addresses, auth_local for administrators).
@run_async(timeout_s=30)
async def test_anyone_can_lock_out_the_sites_service_user(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        perm = rs.core.companions[PERM]
        async with raw_dealer(perm.rpc_endpoint, PERM, "Site") as d:  # no credentials at all
            for _ in range(5):
                rep = await failed_login(d, SERVICE_USER)
                assert isinstance(rep, ErrorReply) and rep.code == "auth_failed"
        await wait_until(lambda: sum(r.action == "login" and r.principal == SERVICE_USER and r.outcome == "failed"
                                     for r in records(rs)) == 5)
        await asyncio.sleep(0.2)  # what the core makes of them has reached the policy
        assert not locked(rs, "user", SERVICE_USER)
        # A process of the site (a restarting instance, a controller) logs in as it must:
        service = rs.new_client(credentials=cached_service_credentials(rs.site))
        settings = await service.call("Site", PERM, "settings")  # LockedOut while the attack goes on
        assert settings is not None


# --- 2 (fixed in f6ab64e while this review ran: a regression test) ------------------------------
# Was: serve_core gave an audit hook to naming and UPerm::Config only; logins at
# UAudit::Log and UAudit::Alerts were neither recorded nor counted, so a guesser there
# was never locked out.
@run_async(timeout_s=30)
async def test_failed_logins_at_the_audit_log_are_audited_and_lock_out(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        log_server = rs.core.companions[LOG]
        async with raw_dealer(log_server.rpc_endpoint, LOG, "Site") as d:
            for _ in range(5):
                rep = await failed_login(d, OPERATOR[0])
                assert isinstance(rep, ErrorReply) and rep.code == "auth_failed"
        await wait_until(lambda: locked(rs, "user", OPERATOR[0]))
        seen = [r for r in records(rs) if r.schema == LOG and r.action == "login" and r.outcome == "failed"]
        assert len(seen) == 5, f"5 failed logins at {LOG}, {len(seen)} records"


# --- 3 -------------------------------------------------------------------------------------------
# Defect: the lockout is checked in SessionGuard.hello only (guard.py:188); confirm()
# (guard.py:214) completes any login begun before it. A guesser begins many logins
# (MAX_PENDING_PER_PEER = 16 per connection, MAX_PENDING = 4096 in all; a peer id costs
# nothing), then answers them one by one: the lockout after 5 failures stops none of the
# ones already begun, so the guesser makes thousands of guesses (π precomputed offline
# from the salt of pass 2) per lockout instead of five. Fix: check
# policy.locked_out(user, address) again in confirm() before hs.confirm (a refusal there
# is not a failed guess), and cap pending logins per user name.
@run_async(timeout_s=30)
async def test_a_login_begun_before_a_lockout_does_not_complete_during_it(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        perm = rs.core.companions[PERM]
        async with raw_dealer(perm.rpc_endpoint, PERM, "Site") as d:
            begun = []
            for password in ["guess-1", "guess-2", "guess-3", "guess-4", "guess-5", OPERATOR[1]]:
                hs, rep = await begin_login(d, OPERATOR[0], password)
                assert isinstance(rep, Reply), rep
                begun.append((hs, rep.result))
            for hs, ch in begun[:5]:
                rep = await finish_login(d, hs, ch)
                assert isinstance(rep, ErrorReply) and rep.code == "auth_failed"
            await wait_until(lambda: locked(rs, "user", OPERATOR[0]))
            await asyncio.sleep(0.6)  # past a security tick: the guard's policy knows the lockout
            _, fresh = await begin_login(d, OPERATOR[0], OPERATOR[1])
            assert isinstance(fresh, ErrorReply) and fresh.code == "locked_out"  # a new login is refused
            hs, ch = begun[5]
            rep = await finish_login(d, hs, ch)  # the sixth guess, begun before the lockout
            assert isinstance(rep, ErrorReply), "a login completed while its user was locked out"


# --- 5 -------------------------------------------------------------------------------------------
# Defect: a remote record's ``origin`` is only ``"<name after the colon> as <submitter>"``
# (trail.py:497): the spool id is dropped and the name is the caller's word. Every host
# shares ``site-service`` by default, so a service user's forged records (any host, cell,
# schema, principal, address, action) carry exactly the label of the process they
# impersonate; the record cannot tell them apart, and the Watch acts on them (forged
# failed logins lock anyone out). Fix: keep the full origin (spool id included) in the
# record's label, and bind each origin to its first submitter (finding 4); advise one
# service user per host so that ``as <submitter>`` names the host.
# Residue of finding 4: ``origins`` is still keyed by the caller's origin alone and takes
# any jump in n, so whoever learns a spool's id (it is in the spool file) silences that
# spool with one append; key it by (submitter, origin) and refuse a first new n other
# than last + 1.
@run_async(timeout_s=30)
async def test_a_forged_record_does_not_carry_the_real_processs_origin(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        await wait_until(lambda: any(r.schema == COUNTER and r.action == "start" for r in records(rs)))
        real = next(r for r in records(rs) if r.schema == COUNTER and r.action == "start")
        forger = rs.new_client(credentials=cached_service_credentials(rs.site))
        await forger.call("Site", LOG, "append", origin="0" * 32 + ":instance-UTest%Counter@Site", events=[
            [1, time.time(), "host-a", "Site", COUNTER, "operator", "127.0.0.1", "update", "ok", "forged"]])
        forged = next(r for r in records(rs) if r.detail == "forged")
        assert forged.origin != real.origin, f"both records say they come from {real.origin!r}"


# --- 6 -------------------------------------------------------------------------------------------
# Defect: Event caps ``detail`` at MAX_DETAIL_CHARS (chain.py:141) but no other field.
# SessionGuard.hello audits a malformed first pass with the user name as given
# (guard.py:203), before amp's _check_user refuses names over 256 bytes: one clear
# auth_hello of up to 64 MB writes a record of that size into the trail, kept for ever in
# the core's SQLite file and in its memory (Store keeps every row), and into the Watch's
# windows. Fix: cap every text field of an Event (principal and address at, say, 256
# characters, like detail, with "…"), in Event.__post_init__ so that remote appends are
# capped too.
@run_async(timeout_s=30)
async def test_an_unauthenticated_login_cannot_write_a_huge_record(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        perm = rs.core.companions[PERM]
        async with raw_dealer(perm.rpc_endpoint, PERM, "Site") as d:
            rep = await d.request("auth_hello", {"user": "A" * 200_000, "g1": b"not a point"})
            assert isinstance(rep, ErrorReply) and rep.code == "auth_failed"
        await wait_until(lambda: any(r.action == "login" for r in records(rs)))
        biggest = max(len(r.principal) + len(r.address) + len(r.detail) for r in records(rs))
        assert biggest <= 2000, f"a record of {biggest} characters from one unauthenticated request"


# --- 7 -------------------------------------------------------------------------------------------
# Defect: Spool.put writes a frame of any size (trail.py:251) but Spool._load stops at
# the first frame over MAX_FRAME = 64 kB (trail.py:223) as if it were torn, and cuts the
# file there: that event and every one after it are lost when a spool with a backlog is
# read back (a restart while the core is down, or _reload past MAX_MEMORY_EVENTS). An
# unauthenticated login with a long user name at any instance writes such a frame
# (finding 6). Fix: cap the event's fields before they are spooled (finding 6) and make
# put() refuse or shorten anything _load would not take back.
def test_a_spool_reads_back_every_event_it_wrote(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "instance-X")
    audit = Auditor(spool.put, host="host-a", cell="Site", schema=COUNTER)
    audit("login", "failed", "A" * 70_000, "127.0.0.1", "a malformed first pass")  # an attacker's user name
    audit("update", "ok", "operator", "127.0.0.1", "bump")  # a real record after it
    spool.close()  # the process stops before the core took them
    again = Spool(tmp_path / "spool", "instance-X")
    try:
        assert len(again.pending()) == 2, f"{len(again.pending())} of 2 spooled events read back"
    finally:
        again.close()


# --- 8 -------------------------------------------------------------------------------------------
# Defect: Auditor caps ``rejected`` records at REJECTED_PER_S (trail.py:122) but records
# every failed and refused login one by one: a malformed first pass costs the attacker
# nothing (no Argon2), and once the address is locked out every further hello is
# recorded again as ``login refused`` (guard.py:192). So a lockout does not stop an
# unauthenticated client from growing the trail (and the core's memory) at the speed of
# the network. Fix: count refused logins of a locked subject (and malformed first
# passes) into one record per subject per second, as rejected messages are.
@run_async(timeout_s=30)
async def test_an_unauthenticated_flood_of_logins_is_recorded_with_a_cap(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        perm = rs.core.companions[PERM]
        before = len(records(rs))
        async with raw_dealer(perm.rpc_endpoint, PERM, "Site") as d:
            for i in range(300):
                rep = await d.request("auth_hello", {"user": f"nobody-{i}", "g1": b"x"})
                assert isinstance(rep, ErrorReply)
        await asyncio.sleep(0.2)
        logins = [r for r in records(rs)[before:] if r.action == "login"]
        assert len(logins) <= 150, f"300 unauthenticated requests wrote {len(logins)} login records"


# --- 9 -------------------------------------------------------------------------------------------
# Defect: serve_core calls load_or_create_keys (runtime.py:231): when the key file is
# missing (moved, not restored with the dataset, on a volume that did not mount, or
# deleted) the core silently makes a new key and MACs the next records with it. From
# then on ``ubi audit verify`` fails at record 1 for ever (with the new key the old
# records look forged; with the old one, the new records), and nothing said why. Fix:
# create the key only for an empty trail; with records and no key file, refuse to start
# (AuditKeyError naming the file and the fix: restore it, or archive the trail and start a new one).
@run_async(timeout_s=30)
async def test_the_core_refuses_to_start_a_trail_anew_under_a_new_key(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        key_file, checkpoint_file, _ = audit_paths(rs.site)
        await rs.stop_core()
        assert records_on_disk(rs) > 0
        key_file.unlink()
        try:
            await rs.start_core()
        except AuditKeyError:
            return  # refused: the fix
        await rs.stop_core()
        from tools.audit_cli import verify_trail
        verdict = verify_trail(rs.site.dataset, key_file, checkpoint_file)
        assert verdict.ok, f"the core started under a new key; verify now says: {verdict.reason}"


def records_on_disk(rs: Any) -> int:
    from tools.audit_cli import read_records, trail_path
    return sum(1 for _ in read_records(trail_path(rs.site.dataset)))


# --- 10 ------------------------------------------------------------------------------------------
# Defect: each threshold keeps at most max_subjects (10,000) windows and evicts the least
# recently seen (watch.py:104), and failed logins for user names that do not exist open
# windows too. A guesser with many source addresses (an IPv6 /64, a botnet) makes 4
# guesses at the administrator, then 10,000 failed logins for made-up names (malformed
# first passes: free), and the administrator's window is gone; repeat. The per-user
# lockout never fires. Fix: count per-user failures only for users the policy knows
# (an unknown name has no password to guess; the per-address window still counts it),
# so the per-user table is bounded by the real users and cannot be flooded.
def test_a_flood_of_other_names_does_not_reset_a_users_failed_logins() -> None:
    watch = Watch(AuditConfig(), countable=lambda user: user == "administrator")  # the policy's password users
    t, address = 1_000_000.0, 0
    for _ in range(3):
        for _ in range(4):
            address += 1
            watch.observe(time=t, action="login", outcome="failed", principal="administrator",
                          address=f"2001:db8::{address:x}")
        for i in range(10_000):
            address += 1
            watch.observe(time=t, action="login", outcome="failed", principal=f"made-up-{address}",
                          address=f"2001:db8::{address:x}")
        t += 1.0
    assert watch.locked("user", "administrator", t) is not None, "12 failed logins in 3 s, no lockout"


# --- 11 (fixed in 59c1ca2 while this review ran: a regression test) -----------------------------
# Was: runtime._keep_registered looped ``while True`` around ``asyncio.wait_for(wake.wait(),
# …)``; on Python 3.11 a cancellation arriving in the loop turn a level change set
# ``wake`` was swallowed, and _serve_instance's ``await keeper`` never returned (verified
# on 6b29a5f's code: set and cancel in one loop turn hang the task every time). controller._check and Cache._dump_loop loop on a flag
# set before they are cancelled; Cache.wait_for only delays a cancellation to its
# deadline; Client sessions' wait_for(shield(login)) returns the login (no loop): no
# other hang of this kind.
@run_async(timeout_s=30)
async def test_an_instance_stops_when_its_level_changes_in_the_same_turn(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        server = rs.server(COUNTER, "Site")
        assert server.on_level_change is not None
        server.on_level_change(Protection.UPDATE)  # the security tick saw a level change...
        stop = asyncio.create_task(rs.stop_instance(COUNTER, "Site"))  # ...as the instance is stopped
        done, _ = await asyncio.wait({stop}, timeout=4.0)
        if not done:  # clean up: cancel the runaway keeper again, then let the stop finish
            for task in asyncio.all_tasks():
                if task.get_coro().__qualname__ == "_keep_registered":  # type: ignore[union-attr]
                    task.cancel()
            await stop
        assert done, "the instance did not finish stopping within 4 s"


# --- 12 ------------------------------------------------------------------------------------------
# Defect: Spool.acknowledge writes the ack file with a rename and no fsync, then empties
# the spool file (trail.py:276-295); Spool numbers its events from max(ack, spooled).
# After a crash that leaves the ack file empty (a rename without fsync does that on XFS
# and others) and the spool empty, the spool keeps its id (its origin) and numbers anew
# from 1: the core, which took up to n already from that origin, drops the new records
# as duplicates. Fix: fsync the ack file before the rename and the directory after it;
# and start a new spool id whenever the ack cannot be read (an unreadable ack must never
# lower the numbering of the same origin).
def test_a_spool_never_reuses_an_origin_and_number(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool", "instance-X")
    for i in range(3):
        spool.put(event(detail=f"#{i}"))
    spool.acknowledge(3)  # the core took 1..3 of this origin
    taken = (spool.origin, 3)
    spool.close()
    spool.ack_path.write_bytes(b"")  # what a crash right after the rename can leave
    again = Spool(tmp_path / "spool", "instance-X")
    try:
        again.put(event(detail="after the crash"))
        n = next(row[0] for row in again.pending() if row[-1] == "after the crash")  # 1..3 may be re-sent: skipped
        assert not (again.origin == taken[0] and n <= taken[1]), (
            f"event {n} of origin {again.origin} again: the core will skip it")
    finally:
        again.close()


# --- 13 ------------------------------------------------------------------------------------------
# Defect: the weaknesses lists were not updated by issue 6: docs/security.md still says
# "No lockout and no rate limit on logins" and "Nothing is audited" (and "Nothing is
# written to an audit trail yet"), docs/protocol.md §19 "No lockout and no audit trail";
# neither describes the trail, what it proves (and not: key holder, records after the
# last checkpoint), nor the lockout's denial of service (finding 1) and its way out.
# Fix: rewrite those entries.
def test_the_security_docs_describe_the_audit_trail_and_lockout() -> None:
    security = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    protocol = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    stale = [s for s, text in (("Nothing is audited", security), ("No lockout and no rate limit", security),
                               ("Nothing is written to an audit trail yet", security),
                               ("No lockout and no audit trail", protocol)) if s in text]
    assert not stale, f"stale: {stale}"


# --- 14 ------------------------------------------------------------------------------------------
# Defect: a failed login's user name is any text the client chooses (newlines, ESC), and
# the tools print records as they are: tools/audit_cli.py record_line (``tail -f``) and
# tools/format.py cell_text/table (``tail``, ``search``) copy control characters to the
# operator's terminal, and CoreWriter._alert logs "ALERT … <subject>" raw. One clear
# auth_hello forges whole lines in the trail's display (an "administrator … login ok"
# that is not in the trail) or sends terminal escape sequences. Fix: show text fields
# with control characters escaped (\n, \x1b…) in cell_text and record_line, and log the
# subject with %r.
@run_async(timeout_s=30)
async def test_the_audit_tools_do_not_print_control_characters_of_a_user_name(tmp_path: Path) -> None:
    from tools.audit_cli import record_line
    from tools.format import table

    forged = "x\n#7 2026-11-22 09:00:00 host-a Site: administrator from 10.0.0.1 login ok\x1b[2K"
    async with running_site(tmp_path, instances=[]) as rs:
        perm = rs.core.companions[PERM]
        async with raw_dealer(perm.rpc_endpoint, PERM, "Site") as d:
            rep = await d.request("auth_hello", {"user": forged, "g1": b"not a point"})
            assert isinstance(rep, ErrorReply)
        await wait_until(lambda: any(r.action == "login" for r in records(rs)))
        shown = rs.core.companions[LOG].core.obj.writer.tail(10)
        line = next(record_line(r) for r in shown if r["action"] == "login")
        text = table(["principal"], [[r["principal"]] for r in shown])
        assert "\n" not in line and "\x1b" not in line, f"printed as is: {line!r}"
        assert len(text.splitlines()) == len(shown) + 1 and "\x1b" not in text, f"printed as is: {text!r}"


