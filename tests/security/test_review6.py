"""Review 6: an attacker's look at issue 5 (service credentials, 85bf8a2 and 31243e2).

Each test shows one verified finding, fixed since (each failed before its fix). Most
severe first:

1. An instance's security policy can be fed by an impostor: the PolicyFollower now
   joins ``UPerm::Config`` over TCP at the endpoints and the level that naming's row
   says, and naming (update level) is read in the clear, so whoever can rewrite that
   row on the wire (``get_dump`` / the clear channel) points the follower at a server
   of their own at ``open``; the follower reads its dump in the clear and enforces the
   attacker's users and rules. (Before, the follower reached the real core over its
   trusted ipc endpoint.)
2. A server that has proven nothing makes service processes give up for good: the salt
   and costs of pass 2 are unauthenticated, yet a mismatch is final
   (CredentialsOutOfDate, a CredentialsError): wait_for_login and PolicyFollower.start
   re-raise it, ``ubi controller`` / ``ubi instance`` exit 78, and supervisors never
   restart 78. An impostor on the core's port (a local account while the core
   restarts, or anyone on the path) stops a whole site until an operator steps in.
3. A controller whose credentials go out of date while it runs loses its checker for
   good, and then cannot stop its children: HostController._report and _check catch
   RemoteError only, so CredentialsOutOfDate kills the checker task, and run()'s
   ``finally`` re-raises it from ``await checker`` before ``supervisor.stop()``.
4. The level floor fails open: for a schema the running core does not know (one added
   to the site file after the core started, say) level_floor returns None and naming
   accepts a service user's registration at ``open``.
5. ``report`` has no ``_not_core`` check: a service user writes the administration
   state of the core's own services (``ubi site status`` shows it).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from pathlib import Path

import pytest

from ubicore.client import Client
from ubicore.config import parse_site
from ubicore.controller import HostController, wait_for_login
from ubicore.dispatch import InstanceCore
from ubicore.errors import CredentialsError, PermissionDenied, RemoteError, UbiError
from ubicore.runtime import (
    SERVICE_USER,
    PolicyFollower,
    cached_service_credentials,
    init_site,
    perm_path,
    resolve_schema,
    serve_core,
)
from ubicore.schema import Protection
from ubicore.security.amp import make_verifier
from ubicore.security.policy import StaticPolicy
from ubicore.service import InstanceServer
from ubicore.store import Store
from ubicore.testing.site import TEST_KDF, run_async, running_site, site_yaml

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")

NAMING = "UNaming::Registry"
PERM = "UPerm::Config"


def _impostor_site(tmp_path: Path, name: str, rpc_port: int = 1, event_port: int = 2) -> object:
    """A site of the attacker's own: the victim's site name, a dataset the attacker made
    (``ubi site init``, administrator ``mallory``), no knowledge of any victim secret."""
    text = site_yaml(tmp_path / "evil", core_port=rpc_port, event_port=event_port, name=name)
    path = tmp_path / "evil.yaml"
    path.write_text(text, encoding="utf-8")
    evil = parse_site(text, path)
    init_site(evil, "mallory-password", admin_user="mallory", kdf=TEST_KDF)
    return evil


# --- 1 -------------------------------------------------------------------------------------------


@run_async(timeout_s=30)
async def test_an_instance_never_follows_a_policy_served_in_the_clear(tmp_path: Path) -> None:
    # Defect: ubicore/runtime.py PolicyFollower.start joins UPerm::Config with
    # client.cache(), which takes the row's rpc/events/protection from naming
    # (client.py find/_registration). Naming runs at update: its get_dump and channel are
    # clear (DESIGN.md §5), so the row is only as trustworthy as the network. Here the
    # row says what an on-path attacker makes it say: UPerm::Config at "open" on the
    # attacker's server. The follower then reads the attacker's policy without any login.
    # Fix: the client never takes a core schema below its fixed level (UPerm::Config is
    # always full: perm.set_level refuses to change it; UNaming::Registry update), e.g. a
    # floor in Client.find/_registration/call_args for CORE schemas, or PolicyFollower
    # pinning the binding to "full"; then the AMP login (mutual: the server proves the
    # verifier) stops any impostor. Better still, reach the core over its trusted ipc
    # endpoint when the follower runs on the core's host, as before.
    (tmp_path / "v").mkdir()
    async with running_site(tmp_path / "v", instances=[]) as rs:
        evil = _impostor_site(tmp_path, rs.site.name)
        schema = resolve_schema(evil, PERM)  # type: ignore[arg-type]
        fake_core = InstanceCore(schema, "Site", Store(schema, perm_path(evil)),  # type: ignore[arg-type]
                                 options={"cells": {}}, protection=Protection.OPEN,
                                 policy=StaticPolicy(rs.site.name))
        fake = InstanceServer(fake_core, address="127.0.0.1")
        await fake.start()
        client = Client.for_site(rs.site, credentials=cached_service_credentials(rs.site), timeout_s=2.0)
        follower = PolicyFollower(rs.site, client)
        try:
            assert rs.core is not None
            with rs.core.transaction() as tx:  # what the clear registry says after the rewrite
                row = tx.instances.get(PERM, "Site")
                assert row is not None
                tx.instances.upsert(**{**row._asdict(), "rpc": fake.rpc_endpoint, "events": fake.event_endpoint,
                                       "protection": "open", "instance_id": fake_core.instance_id, "local": ""})
            with contextlib.suppress(asyncio.TimeoutError, RemoteError, CredentialsError):
                await asyncio.wait_for(follower.start(retry_s=0.1), 2.0)
            users = set(follower.source.model.users)
            assert "mallory" not in users, f"the instance follows the attacker's policy: users {sorted(users)}"
        finally:
            await follower.close()
            await client.close()
            await fake.stop()


# --- 2 -------------------------------------------------------------------------------------------


@run_async(timeout_s=40)
async def test_an_impostor_core_does_not_make_service_processes_give_up(tmp_path: Path) -> None:
    # Defect: pass 2 (salt, costs) comes from a server that has proven nothing yet, but
    # CachedSecret.scalar (credentials/service.py:99) turns a mismatch into
    # CredentialsOutOfDate, which wait_for_login (ubicore/controller.py:188-207: it
    # retries only CallTimeout/Unavailable) and PolicyFollower.start (runtime.py:389-390)
    # let out; the CLI exits 78 and Supervisor._watch never restarts 78. Any server on
    # the core's port (a local account that binds it while the core restarts; an
    # on-path attacker) stops every controller and instance of the site for good.
    # Fix: a mismatch before the server proved itself is not proof that the cache is
    # stale: keep retrying (back off, log the hint once per minute, re-read the file as
    # CachedSecret does) in wait_for_login and PolicyFollower.start, and keep EX_CONFIG
    # for what is certain (no file, an unsafe or damaged file); or have the supervisor
    # restart 78 at MAX_BACKOFF_S instead of never.
    (tmp_path / "v").mkdir()
    async with running_site(tmp_path / "v", instances=[]) as rs:
        creds = cached_service_credentials(rs.site)
        await rs.stop_core()
        evil = _impostor_site(tmp_path, rs.site.name, rs.site.core.rpc_port, rs.site.core.event_port)
        controller_client = Client.for_site(rs.site, credentials=creds, timeout_s=2.0)
        instance_client = Client.for_site(rs.site, credentials=cached_service_credentials(rs.site), timeout_s=2.0)
        follower = PolicyFollower(rs.site, instance_client)
        stop = asyncio.Event()
        login: asyncio.Task[None] | None = None
        following: asyncio.Task[None] | None = None
        try:
            async with serve_core(evil):  # type: ignore[arg-type]
                login = asyncio.create_task(wait_for_login(controller_client, rs.site, stop))
                following = asyncio.create_task(follower.start(retry_s=0.1))
                await asyncio.sleep(1.5)
                for task, what in ((login, "wait_for_login"), (following, "PolicyFollower.start")):
                    if task.done() and task.exception() is not None:
                        raise AssertionError(f"{what} gave up on an unauthenticated salt: {task.exception()!r}")
            await rs.start_core()  # the real core is back: both must now succeed
            assert login is not None and following is not None
            await asyncio.wait_for(asyncio.gather(login, following), 15.0)
            assert controller_client.user == SERVICE_USER
            assert SERVICE_USER in follower.source.model.users
        finally:
            stop.set()
            for pending in (login, following):
                if pending is not None:
                    pending.cancel()
                    with contextlib.suppress(BaseException):
                        await pending
            await follower.close()
            await instance_client.close()
            await controller_client.close()


# --- 3 -------------------------------------------------------------------------------------------


@run_async(timeout_s=40)
async def test_a_controller_with_stale_credentials_keeps_checking_and_stops_its_children(tmp_path: Path) -> None:
    # Defect: ubicore/controller.py HostController._report (:127) and _check (:147) catch
    # RemoteError only; CredentialsOutOfDate is a CredentialsError, so the first report
    # after the service user's password changed kills the _check task (children are no
    # longer marked running, nothing is re-reported, a re-cache does not heal it). At
    # stop, run()'s finally re-raises it from ``await checker`` (:161) before
    # ``supervisor.stop()`` and ``client.close()``: the instances are never SIGTERMed
    # (they only notice through --parent-pid once the controller process is gone).
    # Fix: catch CredentialsError in _report/_check (log it with the hint, rate-limited,
    # keep looping), and in run() stop the supervisor and close the client whatever
    # awaiting the checker raises (try/finally, or suppress Exception there too).
    (tmp_path / "v").mkdir()
    procs: list[int] = []
    async with running_site(tmp_path / "v", instances=[]) as rs:
        creds = cached_service_credentials(rs.site)
        rec = make_verifier(SERVICE_USER, rs.site.name, "a new password", TEST_KDF)
        rs.policy.edit("set_password", name=SERVICE_USER, salt=rec.salt, verifier=rec.verifier,
                       t=TEST_KDF.t, p=TEST_KDF.p, m_kib=TEST_KDF.m_kib)
        controller = HostController(rs.site, "host-a", creds)
        for child in controller.supervisor.children.values():  # harmless children, real processes
            child.argv = [sys.executable, "-c", "import time; time.sleep(30)"]
        stop = asyncio.Event()
        running = asyncio.create_task(controller.run(stop))
        try:
            async with asyncio.timeout(10):
                while not all(c.proc is not None for c in controller.supervisor.children.values()):
                    await asyncio.sleep(0.05)
            procs = [c.proc.pid for c in controller.supervisor.children.values() if c.proc is not None]
            await asyncio.sleep(1.0)  # a report has been tried with the stale credentials
            stop.set()
            outcome: UbiError | None = None
            try:
                await asyncio.wait_for(running, 15.0)
            except UbiError as exc:  # CredentialsOutOfDate today
                outcome = exc
            alive = [c.name for c in controller.supervisor.children.values()
                     if c.proc is not None and c.proc.returncode is None]
            assert not alive, f"run() left children running: {alive} (it ended with {outcome!r})"
            assert outcome is None, f"run() ended with {outcome!r}"
        finally:
            stop.set()
            running.cancel()
            with contextlib.suppress(BaseException):
                await running
            for pid in procs:  # only the processes this test started
                with contextlib.suppress(ProcessLookupError, ChildProcessError):
                    os.kill(pid, signal.SIGKILL)
            for child in controller.supervisor.children.values():
                if child.proc is not None and child.proc.returncode is None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(child.proc.wait(), 5.0)
            await controller.client.close()


# --- 4 -------------------------------------------------------------------------------------------


@run_async(timeout_s=30)
async def test_naming_refuses_a_registration_whose_level_it_cannot_check(tmp_path: Path) -> None:
    # Defect: services/naming.py:95-96 applies the floor only when level_floor returns a
    # level; runtime.level_floor (:285-295) returns None for a schema the running core
    # did not load (a deployment and import added to the site file after the core
    # started, until the core restarts), so a service user registers it at "open" and
    # its clients make clear calls to wherever the registration points.
    # Fix: fail closed: refuse a registration whose floor is unknown (PermissionDenied
    # "restart the core to load the deployment of ..."), or treat an unknown floor as
    # "full".
    (tmp_path / "v").mkdir()
    async with running_site(tmp_path / "v", instances=[]) as rs:
        service = rs.new_client(credentials=cached_service_credentials(rs.site))
        with pytest.raises(PermissionDenied):
            await service.call("Site", NAMING, "register", schema="UAcme::Vault", cell="Site", host="host-a",
                               rpc="tcp://127.0.0.1:9", events="tcp://127.0.0.1:10",
                               instance_id=os.urandom(16), protection="open")


# --- 5 -------------------------------------------------------------------------------------------


@run_async(timeout_s=30)
async def test_a_service_user_cannot_report_the_state_of_core_services(tmp_path: Path) -> None:
    # Defect: services/naming.py:124-139 ``report`` does not call _not_core, unlike
    # register and deregister, so a service user writes the administration state of
    # UPerm::Config / UNaming::Registry ("crashed", any detail) that ``ubi site status``
    # and Client.services() show.
    # Fix: call _not_core(schema) first in report (the core's services are reported by
    # the core alone); consider also checking that ``host`` is a host of the site.
    (tmp_path / "v").mkdir()
    async with running_site(tmp_path / "v", instances=[]) as rs:
        service = rs.new_client(credentials=cached_service_credentials(rs.site))
        with pytest.raises(PermissionDenied):
            await service.call("Site", NAMING, "report", schema=PERM, cell="Site", host="host-a",
                               actual="crashed", detail="forged")
