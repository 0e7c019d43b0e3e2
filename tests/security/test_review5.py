"""Review 5 of issue 4 (the fixes since 4c2cb88): each test shows one verified finding,
fixed since: the run directory is the site file's ``run_dir`` or ``<dataset>/run``
(never under the shared temporary directory, never removed), a socket is removed only if
it is still the one bound, the guard forgets sessions wherever they end, a silent policy
channel is warned about, and the dataset's owner is taken through symlinks.

1. Any local account can stop the whole site from starting: the ipc directory's name
   under the shared temporary directory is predictable (a hash of the dataset path),
   the server refuses a directory it does not own, and it cannot remove another
   account's entry from a sticky /tmp. Every stop of the last instance rmdirs the
   directory, reopening the window.
2. An older instance of (schema, cell) that stops unlinks the socket a newer instance of
   the same (schema, cell) has just bound (libzmq unlinks a path before binding it;
   InstanceServer.stop then unlinks by name; libzmq 4.3.5's own close does not).
3. InstanceServer.stop rmdirs the run directory when its socket was the last one; an
   instance that made sure of the directory (ipc_endpoint) but has not bound yet then
   fails to start.
4. The run directory depends on the *caller's* TMPDIR: a client whose TMPDIR differs
   from the site account's (pam_tmpdir, macOS) never finds the ipc sockets.
5. SessionGuard._made_with is pruned only on a policy change: sessions that expire or
   are evicted leave their entry behind, so logins (``default`` has the empty password)
   grow it without bound on a site whose policy does not change.
6. The policy watchdog's "not been followed for N s" warning never fires when the core
   is down: the follower's cache stays LIVE (nothing detects a silent publisher), so
   the documented warning (docs/security.md "The policy is live") is never given.
7. trusted_endpoint takes the owner of the dataset path with lstat while run_dir
   resolves it: a dataset named through a symlink that another account (root, say)
   made is never trusted, so local logins and every PolicyFollower fail there (the
   instances wait for the policy for ever).
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ubicore import localipc
from ubicore.config.model import InstancePlan
from ubicore.runtime import ipc_endpoint, make_core, resolve_schema
from ubicore.schema import Protection
from ubicore.security.policy import Right
from ubicore.service import InstanceServer
from ubicore.testing.site import COUNTER, run_async, running_site, site_yaml

from .guard_support import Clock, login, make_guard

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _other_core(rs_site: object, tmp: Path, cell: str = "Site") -> object:
    """A COUNTER core with a database of its own (so two can run at once)."""
    import dataclasses

    site = dataclasses.replace(rs_site, dataset=tmp)  # type: ignore[type-var]
    plan = InstancePlan(COUNTER, cell, site.core.host, None, {})
    return make_core(site, plan, resolve_schema(site, COUNTER))


@run_async
async def test_another_account_squatting_the_ipc_directory_does_not_stop_the_site(tmp_path: Path) -> None:
    # The run directory is not under the shared temporary directory any more, where any
    # account could plant an entry under its predictable name: by default it is inside
    # the (private) dataset, and it is never removed.
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        run = localipc.run_dir(rs.site)
        assert run == rs.site.dataset / "run"
        await rs.stop_instance(COUNTER, "Site")
        await rs.stop_core()
        assert run.is_dir()  # kept for the next start


@run_async
async def test_an_older_instance_stopping_leaves_a_newer_instances_socket(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    async with running_site(tmp_path / "s", instances=[]) as rs:
        local = ipc_endpoint(rs.site, COUNTER, "Site")
        path = Path(local[len("ipc://"):])
        old = InstanceServer(_other_core(rs.site, tmp_path / "a"), address="127.0.0.1", local=local)  # type: ignore[arg-type]
        new = InstanceServer(_other_core(rs.site, tmp_path / "b"), address="127.0.0.1", local=local)  # type: ignore[arg-type]
        await old.start()
        try:
            await new.start()  # a restart while the old one is still stopping
            try:
                await old.stop()
                await asyncio.sleep(0.1)
                assert path.exists(), "the newer instance's ipc socket was unlinked by the older one's stop"
                assert localipc.trusted_endpoint(rs.site, COUNTER, "Site") == local
            finally:
                await new.stop()
        finally:
            await old.stop()


@run_async
async def test_the_last_socket_going_does_not_remove_the_directory_under_a_starting_instance(tmp_path: Path) -> None:
    (tmp_path / "s").mkdir()
    async with running_site(tmp_path / "s", instances=[]) as rs:
        await rs.stop_core()  # this host's only instances are the two below
        first = InstanceServer(_other_core(rs.site, tmp_path / "a"), address="127.0.0.1",  # type: ignore[arg-type]
                               local=ipc_endpoint(rs.site, COUNTER, "Site"))
        await first.start()
        # serve_instance: ipc_endpoint (makes sure of the directory), make_core, then bind.
        second = InstanceServer(_other_core(rs.site, tmp_path / "b", "Other"), address="127.0.0.1",  # type: ignore[arg-type]
                                local=ipc_endpoint(rs.site, COUNTER, "Other"))
        await first.stop()  # meanwhile the other one stops: its socket was the last one
        try:
            await second.start()
        finally:
            await second.stop()


def test_a_client_with_another_tmpdir_finds_the_sites_ipc_directory(tmp_path: Path) -> None:
    site_file = tmp_path / "site.yaml"
    site_file.write_text(site_yaml(tmp_path / "dataset", core_port=1, event_port=2), encoding="utf-8")
    other = tmp_path / "user-tmp"  # pam_tmpdir: /tmp/user/<uid>; macOS: /var/folders/...
    other.mkdir()
    code = ("from ubicore import localipc; from ubicore.config import load_site; "
            f"print(localipc.run_dir(load_site({str(site_file)!r})))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20,
                          env={**os.environ, "TMPDIR": str(other)}, check=True)
    assert done.stdout.strip() == str(tmp_path / "dataset" / "run")


def test_expired_sessions_leave_nothing_behind_in_the_guard() -> None:
    clock = Clock()
    guard = make_guard(Protection.FULL, clock=clock)
    for _ in range(40):  # each login's session expires before the next (no policy change)
        login(guard, "reader")
        clock.now += guard.settings.session_ttl_s + 1
        guard.tick()
    assert len(guard.sessions) == 0
    assert len(guard._made_with) <= len(guard.sessions), f"{len(guard._made_with)} entries for no session"


@run_async
async def test_an_instance_whose_core_is_down_warns_that_it_decides_with_an_old_policy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr("ubicore.runtime.POLICY_STALE_WARN_S", 0.3)
    caplog.set_level(logging.WARNING, logger="ubicore.runtime")
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        rs.policy.set_user("bob", "bob-pw", Right.UPDATE)
        server = rs.server(COUNTER, "Site")
        for _ in range(500):
            if server.core.policy.verifier("bob") is not None:
                break
            await asyncio.sleep(0.01)
        await rs.stop_core()  # the core is down: the instance decides with its last copy
        await asyncio.sleep(2.0)
        assert any("has been silent" in r.getMessage() for r in caplog.records), \
            "no staleness warning although the policy has not been followed for 2 s"



@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the dataset to another account")
def test_a_dataset_named_through_a_symlink_finds_its_own_sockets(tmp_path: Path) -> None:
    import dataclasses
    import socket

    from ubicore.config import parse_site

    real, link = tmp_path / "real", tmp_path / "link"
    real.mkdir()
    link.symlink_to(real)  # made by root (an operator's /srv/site -> /data/site)
    site_uid = 65534  # the site's account owns the dataset, the directory and the sockets
    os.chown(real, site_uid, site_uid)
    via_real = parse_site(site_yaml(real, core_port=1, event_port=2), tmp_path / "site.yaml")
    via_link = dataclasses.replace(via_real, dataset=link)
    run = localipc.run_dir(via_real)
    run.mkdir(mode=localipc.DIR_MODE)
    os.chown(run, site_uid, site_uid)
    path = localipc.socket_path(via_real, COUNTER, "Site")
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(path))
        os.chown(path, site_uid, site_uid)
        assert localipc.trusted_endpoint(via_real, COUNTER, "Site") is not None
        assert localipc.trusted_endpoint(via_link, COUNTER, "Site") is not None
    finally:
        sock.close()
        path.unlink()
        run.rmdir()
