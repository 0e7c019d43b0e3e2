"""Defects found by the security review of protection levels (issue 3).

Each test names its defect. Tests of fixed defects pass; defects not fixed yet are
``xfail(strict=True)``: they fail today and will report XPASS (and so fail) once
fixed, which is the signal to drop the marker.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import zmq
import zmq.asyncio

import ubicore.security.guard as guard_module
from ubicore.client import NAMING_CELL, NAMING_SCHEMA
from ubicore.errors import AuthenticationFailed, CallTimeout, LockedOut, NotFound, PermissionDenied
from ubicore.protocol.codec import encode_reply, parse_client_message
from ubicore.protocol.messages import Request
from ubicore.schema import Protection
from ubicore.security.amp import (
    ClientHandshake,
    CredentialsOutOfDate,
    PasswordSecret,
    ScalarSecret,
    UserSecret,
    password_scalar,
)
from ubicore.security.guard import MAX_PENDING, MAX_PENDING_PER_PEER
from ubicore.security.policy import Right
from ubicore.security.primitives import KdfParams, Secret
from ubicore.security.session import ClientSession
from ubicore.sessions import Credentials, SessionManager
from ubicore.credentials.service import service_credentials
from ubicore.testing.site import COUNTER, OPERATOR, TEST_KDF, run_async, running_site
from ubicore.transport.rpc import RpcConnection

from .attack_support import FULL_COUNTER, GUARD_S, counter_at, wait_until
from .guard_support import KDF, Clock, login, make_guard, make_policy

UPDATE_COUNTER = [counter_at("Site", "update")]


class GatedSecret(UserSecret):
    """The operator's password, whose derivation (run in a worker thread during pass 3)
    waits until the test lets it go: a login held open between pass 2 and pass 3."""

    def __init__(self, password: str) -> None:
        self._inner = PasswordSecret(password)
        self.entered = threading.Event()
        self.release = threading.Event()

    def scalar(self, user: str, site: str, salt: bytes, params: KdfParams) -> Secret:
        self.entered.set()
        self.release.wait(GUARD_S)
        return self._inner.scalar(user, site, salt, params)

    async def wait_entered(self) -> None:
        assert await asyncio.to_thread(self.entered.wait, GUARD_S), "the login never reached pass 3"


# --- fixed --------------------------------------------------------------------------------------------


def test_review_a_hello_flood_from_many_connections_does_not_lock_logins_out() -> None:
    # Defect (fixed, guard.hello): the per-peer cap keys on the ROUTER identity, which
    # every new connection gets afresh (or picks itself), and a full table (4,096) refused
    # every further hello: 256 connections x 16 hellos locked everybody out for 10 s,
    # renewable at ~410 messages/s. Now the oldest half-done login gives way.
    g = make_guard(Protection.UPDATE, clock=Clock(), pending_timeout_s=10.0)
    g1 = ClientHandshake("writer", None, PasswordSecret("x")).start().g1
    for i in range(MAX_PENDING):
        g.hello(b"mallory-%d" % (i // MAX_PENDING_PER_PEER), {"user": "nobody", "g1": g1})
    login(g, "writer", peer=b"alice")  # in the same instant: alice still gets in
    assert len(g._pending) <= MAX_PENDING
    with pytest.raises(AuthenticationFailed, match="too many"):  # the per-connection cap still holds
        for _ in range(MAX_PENDING_PER_PEER + 1):
            g.hello(b"greedy", {"user": "nobody", "g1": g1})


@run_async
async def test_review_a_shared_login_survives_the_caller_that_started_it_being_cancelled(tmp_path: Path) -> None:
    # Defect (fixed, SessionManager.session): the login ran inside the first caller; when
    # that caller was cancelled, its CancelledError was handed to every other caller
    # waiting for the same login, tasks nobody had cancelled.
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=UPDATE_COUNTER) as rs:
        gate = GatedSecret(OPERATOR[1])
        sm = SessionManager(Credentials(OPERATOR[0], gate), site=rs.site.name)
        conn = RpcConnection(rs.server(COUNTER, "Site").rpc_endpoint)
        try:
            first = asyncio.create_task(sm.session(conn, COUNTER, "Site", GUARD_S))
            await gate.wait_entered()
            second = asyncio.create_task(sm.session(conn, COUNTER, "Site", GUARD_S))
            await asyncio.sleep(0.01)  # the second caller now waits for the shared login
            first.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await first
            gate.release.set()
            try:
                session = await second
            except asyncio.CancelledError:
                pytest.fail("a caller nobody cancelled got CancelledError from another caller's login")
            assert isinstance(session, ClientSession)
            assert sm.current(conn.endpoint, COUNTER, "Site") is session
        finally:
            gate.release.set()
            conn.close()


@run_async
async def test_review_a_caller_waiting_for_a_shared_login_times_out_with_call_timeout(tmp_path: Path) -> None:
    # Defect (fixed, SessionManager.session): a caller waiting for another caller's login
    # past its own deadline got a bare TimeoutError, outside the typed error tree.
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=UPDATE_COUNTER) as rs:
        gate = GatedSecret(OPERATOR[1])
        sm = SessionManager(Credentials(OPERATOR[0], gate), site=rs.site.name)
        conn = RpcConnection(rs.server(COUNTER, "Site").rpc_endpoint)
        try:
            first = asyncio.create_task(sm.session(conn, COUNTER, "Site", GUARD_S))
            await gate.wait_entered()
            with pytest.raises(CallTimeout):
                await sm.session(conn, COUNTER, "Site", 0.1)
            gate.release.set()
            assert isinstance(await first, ClientSession)  # the login itself was not disturbed
        finally:
            gate.release.set()
            conn.close()


@run_async
async def test_review_out_of_date_cached_credentials_fail_a_cache_join_by_name(tmp_path: Path) -> None:
    # Defect (fixed, cache._dump_loop): CredentialsOutOfDate during a join was retried as
    # a transient failure until the join's deadline, so the caller saw CallTimeout instead
    # of "cached credentials are out of date" (which client.call did report).
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        salt = b"\x01" * 16  # not the salt the store holds: the password was changed since
        pi = password_scalar(OPERATOR[1], OPERATOR[0], rs.site.name, salt, TEST_KDF)
        client = rs.new_client(credentials=Credentials(OPERATOR[0], ScalarSecret(pi, salt, TEST_KDF)), timeout_s=2.0)
        with pytest.raises(CredentialsOutOfDate):
            await client.cache("Site", COUNTER)


@run_async
async def test_review_repeated_wrong_passwords_meet_lockout(tmp_path: Path) -> None:
    # Defect (fixed: the core's audit trail counts failed logins per user and per address
    # and locks the subject out with growing back-off, ubicore/audit/watch.py; every
    # instance's guard refuses it through UPerm::Config's lockouts): failed confirmations
    # were only summed in stats.login_failures, so online guessing ran at the guesser's
    # Argon2 speed. After 50 wrong guesses the right one got in at once. The lockout
    # travels from the instance to the core and back, so the right guess waits for it
    # to arrive (bounded by GUARD_S); the site's default thresholds hold.
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=UPDATE_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        mallory = rs.new_client(user=(OPERATOR[0], "guess"))
        for i in range(50):
            mallory.use_credentials(Credentials.password(OPERATOR[0], f"guess-{i}"))
            with pytest.raises(AuthenticationFailed):
                await mallory.call("Site", COUNTER, "bump", name="n")
        await wait_until(lambda: server.core.policy.locked_out(OPERATOR[0], "127.0.0.1", time.time()) is not None)
        mallory.use_credentials(Credentials.password(*OPERATOR))
        with pytest.raises(LockedOut) as info:
            await mallory.call("Site", COUNTER, "bump", name="n")
        assert info.value.retry_after_s > 0
        assert server.core.guard.stats.logins == 0


# --- not fixed --------------------------------------------------------------------------------------


def test_review_anonymous_logins_cannot_evict_other_users_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    # Defect (fixed: a per-user cap, guard._make_room): sessions are capped only in total
    # (100,000) and the one nearest expiry (the oldest) is dropped for a new login. Anyone
    # may log in as ``default`` (empty password), from one connection, without limit, so a
    # flood of anonymous logins ends everybody else's sessions. The cap is lowered here
    # only to keep the test small.
    monkeypatch.setattr(guard_module, "MAX_SESSIONS", 8)
    policy = make_policy()
    policy.add_user("default", "", Right.READ, kdf=KDF)
    g = make_guard(Protection.UPDATE, policy=policy)
    operator = login(g, "writer", peer=b"operator")
    for _ in range(8):
        login(g, "default", "", peer=b"mallory")
    assert operator.session_id in g.sessions


@run_async
async def test_review_a_login_in_flight_when_the_level_changes_still_succeeds(tmp_path: Path) -> None:
    # Defect (fixed: set_level keeps half-done logins): a correct password whose
    # pass 3 arrives after a level change gets "authentication failed", which the SDK does
    # not retry (it retries only auth_required), so the application's call fails. The
    # window is the client's Argon2 time (~100 ms at default costs). The guard test
    # test_set_level_moves_to_a_new_epoch_and_ends_sessions pins the clearing, so the fix
    # (keep pending logins: their grant is built from the new level and epoch anyway, or
    # answer an unknown handshake id with auth_required) is the owner's call.
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=UPDATE_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        gate = GatedSecret(OPERATOR[1])
        client = rs.new_client(credentials=Credentials(OPERATOR[0], gate))
        call = asyncio.create_task(client.call("Site", COUNTER, "bump", name="lv"))
        try:
            await gate.wait_entered()
            rs.policy.set_level(COUNTER, Protection.FULL)
            await wait_until(lambda: server.core.protection is Protection.FULL)
            gate.release.set()
            assert await call == 1
        finally:
            gate.release.set()
            if not call.done():
                call.cancel()
            with contextlib.suppress(BaseException):
                await call


@run_async
async def test_review_a_full_cache_follows_across_session_renewals_without_redumping(tmp_path: Path) -> None:
    # Defect (fixed: the ring carries over, full caches renew early): when the client's
    # session passes 0.9 of its lifetime, current() deletes it, and with it the group keys
    # the cache opens events with, though no key rotated. The next sealed event finds no
    # session: it is lost and the cache re-dumps (a Follower misses the batches). With the
    # default 1 h lifetime that is one full re-dump per cache per hour. Fix: keep the
    # newest session's ring for the channel past the session's lifetime (carry it into the
    # renewed session, which also keeps its replay windows), and have joined full caches
    # renew their session before the instance ends it, so rekeys keep reaching them.
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER,
                            security={"session_ttl_s": 1}) as rs:
        server = rs.server(COUNTER, "Site")
        cache = await rs.new_client().cache("Site", COUNTER)
        for _ in range(25):
            await rs.client.call("Site", COUNTER, "bump", name="renew")
            await asyncio.sleep(0.1)
        await cache.wait_for(lambda c: c.table("counters")[("renew",)].value == 25, GUARD_S)
        assert server.core.guard.stats.rotations == 0  # no key changed
        assert cache.undecryptable == 0 and cache.resyncs == 0


@run_async
async def test_review_a_naming_registration_cannot_talk_a_client_into_clear_calls(tmp_path: Path) -> None:
    # Defect (fixed in issue 5: naming is update-protected, only service users may
    # register, and naming refuses a registration below the level the site runs the
    # schema at): any unauthenticated caller could ``register`` a row for a full schema
    # with ``protection: open`` and an rpc endpoint of its own; a client holding no
    # session yet believed it and sent its call (arguments and all) in the clear there.
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        ctx = zmq.asyncio.Context()
        rogue = ctx.socket(zmq.ROUTER)
        rogue.setsockopt(zmq.LINGER, 0)
        try:
            rogue_ep = f"tcp://127.0.0.1:{rogue.bind_to_random_port('tcp://127.0.0.1')}"
            forged_row = dict(schema=COUNTER, cell="Site", host="h", rpc=rogue_ep, events=server.event_endpoint,
                              instance_id=server.core.instance_id)
            mallory = rs.new_client(anonymous=True)
            with pytest.raises(PermissionDenied, match="default may not update UNaming::Registry"):
                await mallory.call(NAMING_CELL, NAMING_SCHEMA, "register", protection="open", **forged_row)
            with pytest.raises(PermissionDenied, match="default may not update UNaming::Registry"):
                await mallory.call(NAMING_CELL, NAMING_SCHEMA, "deregister", schema=COUNTER, cell="Site",
                                   instance_id=server.core.instance_id)
            # A service user (trusted to register) still cannot claim a lower level than
            # the site runs the schema at: no downgrade by impersonation either.
            service = rs.new_client(credentials=service_credentials(rs.site))
            with pytest.raises(PermissionDenied, match="runs at full on this site"):
                await service.call(NAMING_CELL, NAMING_SCHEMA, "register", protection="open", **forged_row)
            with pytest.raises(PermissionDenied, match="runs at full on this site"):
                await service.call(NAMING_CELL, NAMING_SCHEMA, "register", protection="update", **forged_row)
            victim = rs.new_client()
            row = (await victim.naming()).table("instances")[(COUNTER, "Site")]
            assert (row.rpc, row.protection) == (server.rpc_endpoint, "full")  # type: ignore[attr-defined]
            with pytest.raises(NotFound, match="top-secret-name"):  # the real instance's answer, sealed
                await victim.call("Site", COUNTER, "get", name="top-secret-name")
            assert await rogue.poll(0) == 0  # nothing ever reached the rogue endpoint
        finally:
            rogue.close(0)
            ctx.term()

