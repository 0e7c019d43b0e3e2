"""Review of issue 4 (the security model, local logins, live policy): each test shows one
finding, fixed since (ubicore/localipc.py, naming's core rows, the policy watchdog).

1. Naming is open, and an instance's PolicyFollower (local credentials) goes wherever
   naming's ``local`` column says UPerm::Config is, and a local login never authenticates
   the server: anyone who can register with naming and listen on an ipc socket of the
   host feeds instances a policy of their choosing.
2. An instance whose follower lost read on UPerm::Config keeps deciding with its last
   policy for ever: a user removed afterwards is still served (fails open, silently).
3. run_dir's fallback under the temporary directory follows a symlink planted there.
4. Other OS users of the host cannot reach the ipc endpoint at all (dir 0700, socket
   0755), so OS users other than the site's own account can never log in locally.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import shutil
import tempfile
import subprocess
import sys
from pathlib import Path

import pytest

from ubicore import localipc
from ubicore.config.model import InstancePlan
from ubicore.errors import AuthenticationFailed, ConfigError, PermissionDenied
from ubicore.runtime import (
    PERM_SCHEMA,
    SERVICE_USER,
    cell_parents,
    current_os_user,
    feed_policy,
    init_site,
    make_core,
    resolve_schema,
)
from ubicore.schema import Protection
from ubicore.security.policy import PolicySource, Right
from ubicore.service import InstanceServer
from ubicore.testing.site import COUNTER, TEST_KDF, run_async, running_site, site_yaml

from .attack_support import wait_until


@run_async
async def test_anyone_registering_uperm_config_cannot_feed_instances_a_forged_policy(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    async with running_site(tmp_path / "s", instances=[]) as rs:
        rs.policy.set_level(COUNTER, Protection.UPDATE)  # the real policy: anonymous users may not bump
        # The attacker's UPerm::Config: the site's name, a dataset of its own (no level for
        # UTest::Counter, so it runs open), served on an ipc socket the attacker owns.
        evil_site = dataclasses.replace(rs.site, dataset=tmp_path / "evil")
        init_site(evil_site, "attacker-pw", kdf=TEST_KDF, os_user=current_os_user())
        source = PolicySource(evil_site.name)
        core = make_core(evil_site, InstancePlan(PERM_SCHEMA, "Site", evil_site.core.host, None,
                                                 {"cells": cell_parents(evil_site)}),
                         resolve_schema(evil_site, PERM_SCHEMA), source.policy())
        feed_policy(source, lambda rel: core.store.tables[rel].values(), cell_parents(evil_site))
        core.policy.refresh()
        evil = InstanceServer(core, address="127.0.0.1", local=f"ipc://{tmp_path}/e.ipc")
        await evil.start()
        try:
            anon = rs.new_client(anonymous=True)
            forged = dict(schema=PERM_SCHEMA, cell="Site", host="host-a", rpc=evil.rpc_endpoint,
                          events=evil.event_endpoint, instance_id=core.instance_id, protection="full",
                          local=core.endpoints["local"])
            with pytest.raises(PermissionDenied):  # fixed: only the core registers its own services
                await anon.call("Site", "UNaming::Registry", "register", **forged)
            # And were naming lying anyway, an instance logs in to UPerm::Config as the
            # site's service user, and the key exchange authenticates the server too: one
            # without the service user's verifier record cannot answer, so the instance
            # waits (saying its credentials look out of date) rather than follow a policy
            # of the attacker's choosing.
            assert rs.core is not None
            with rs.core.transaction() as tx:
                tx.instances.upsert(**forged, pid=0, started=0.0)
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(rs.start_instance(COUNTER, "Site"), 2.0)
            assert (COUNTER, "Site") not in rs.servers
            assert evil.core.guard.stats.login_failures == 0  # it never got a pass 3 to test
        finally:
            await evil.stop()


@run_async
async def test_an_instance_that_cannot_follow_the_policy_does_not_keep_serving_removed_users(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        rs.policy.set_level(COUNTER, Protection.UPDATE)
        rs.policy.set_user("bob", "bob-pw", Right.UPDATE)
        server = rs.server(COUNTER, "Site")
        await wait_until(lambda: server.core.protection is Protection.UPDATE
                         and server.core.policy.verifier("bob") is not None)
        # The site's service account loses read on UPerm::Config (a mistake, or an attacker
        # who got admin once and wants revocations to stop reaching the instances).
        rs.policy.edit("remove_member", user=SERVICE_USER, group="services", cell="Site")
        await asyncio.sleep(0.5)
        rs.policy.remove_user("bob")
        await asyncio.sleep(1.0)
        bob = rs.new_client(user=("bob", "bob-pw"))
        with pytest.raises((PermissionDenied, AuthenticationFailed)):
            await bob.call("Site", COUNTER, "bump", name="x")  # it no longer knows bob
        # It fails closed, not open: nobody is served a protected action until the policy
        # is readable again, and then it follows the policy as it is now.
        with pytest.raises((PermissionDenied, AuthenticationFailed)):
            await rs.client.call("Site", COUNTER, "bump", name="x")
        assert server.core.protection is Protection.UPDATE  # the levels stay as they were
        rs.policy.edit("add_member", user=SERVICE_USER, group="services", cell="Site")
        await wait_until(lambda: server.core.policy.verifier("operator") is not None, 10.0)
        assert await rs.client.call("Site", COUNTER, "bump", name="x") == 1
        assert server.core.policy.verifier("bob") is None


def test_run_dir_refuses_a_symlink(tmp_path: Path) -> None:
    from ubicore.config import parse_site

    target = tmp_path / "elsewhere"  # a private directory the link points at
    target.mkdir(mode=0o700)
    run = tmp_path / "run"
    run.symlink_to(target)
    site = parse_site(site_yaml(tmp_path / "dataset", core_port=1, event_port=2, run_dir=run), tmp_path / "site.yaml")
    with pytest.raises(ConfigError):
        localipc.ensure_run_dir(site)
    (target / (localipc.socket_path(site, COUNTER, "Site").name)).touch()
    assert localipc.trusted_endpoint(site, COUNTER, "Site") is None  # nor does a client go there


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another account")
@run_async
async def test_an_os_user_of_another_account_can_reach_the_ipc_endpoint(tmp_path: Path) -> None:
    # The operator names a run_dir other accounts can traverse (the default, inside the
    # private dataset, is for the site's own account only).
    shared = Path(tempfile.mkdtemp(prefix="ubicore-run-"))  # pytest's tmp_path is private to root
    os.chmod(shared, 0o711)
    try:
        await _reach_as_another_account(tmp_path, shared)
    finally:
        shutil.rmtree(shared, ignore_errors=True)


async def _reach_as_another_account(tmp_path: Path, shared: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], run_dir=shared) as rs:
        rs.policy.edit("add_user", name="nobody-user", kind="os", uid=65534, groups=["everyone"])
        path = rs.server(COUNTER, "Site").core.endpoints["local"][len("ipc://"):]
        code = f"import socket; socket.socket(socket.AF_UNIX).connect({path!r})"
        done = await asyncio.to_thread(
            subprocess.run, ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", code],
            capture_output=True, text=True, timeout=20)
        assert done.returncode == 0, done.stderr.strip().splitlines()[-1:]
