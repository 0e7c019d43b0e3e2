"""The security model on a real site (issue 4, "How we will know"): ``ubi site up`` as child
processes (``ubicore.testing.processes``), its factory policy with OPERATOR as the
administrator, changed while it runs by a client calling ``UPerm::Config``'s operations.

- the seed policy: the administrator updates, ``default`` and a plain user only read;
- a change made through the core reaches the instance processes within a second (they
  follow ``UPerm::Config`` as the site's OS user over ipc), levels and cell memberships too;
- the OS user path: this account (the site's service user) reads the policy over ipc and
  may not change it; password users of ``everyone`` may not read it at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from typing import Any

import pytest

from ubicore.client import Client
from ubicore.errors import AuthenticationFailed, NotFound, PermissionDenied
from ubicore.security.amp import make_verifier
from ubicore.sessions import Credentials
from ubicore.testing.processes import LiveSite
from ubicore.testing.site import OPERATOR, TEST_KDF

CONFIG = "ULocationSystem::ConfigurationUpdate"
POSITIONS = "ULocation::Positions"
PERM = "UPerm::Config"
PROPAGATION_S = 1.0
"""How soon a policy change made through the core is in force in every instance process."""
pytestmark = pytest.mark.timeout(90)


async def add_user(operator: Client, site: LiveSite, name: str, password: str, groups: list[str]) -> None:
    rec = make_verifier(name, site.site.name, password, TEST_KDF)
    await operator.call("Site", PERM, "add_user", name=name, salt=rec.salt, verifier=rec.verifier,
                        t=rec.params.t, p=rec.params.p, m_kib=rec.params.m_kib, groups=groups)


async def until(probe: Any, *, within_s: float) -> float:
    """Call ``probe()`` until it returns True; the seconds that took (AssertionError past
    ``within_s``)."""
    start = time.monotonic()
    while not await probe():
        if time.monotonic() - start > within_s:
            raise AssertionError(f"not in force within {within_s:g} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def ubi(site: LiveSite, user: tuple[str, str] | None, *args: str) -> subprocess.CompletedProcess[str]:
    """``python -m ubicore.tools.cli`` in a child process, logged in as ``user``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("UBI_")}
    if user is not None:
        env.update(UBI_USER=user[0], UBI_PASSWORD=user[1])
    return subprocess.run([sys.executable, "-m", "ubicore.tools.cli", "--site", str(site.path), *args],
                          env=env, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_the_seed_policy_administrator_updates_others_read(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as operator, live_site.client(anonymous=True) as anon:
            await operator.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=7.0)
            # default reads (the open reads and a cache), and may not update.
            cache = await anon.cache("Site", CONFIG)
            await cache.wait_for(lambda c: c.table("sensors")[("S-001",)].rate_hz == 7.0, 5.0)
            assert "sensors" in (await anon.call("Site", CONFIG, "get_dump"))["relations"]
            with pytest.raises(PermissionDenied) as denied:
                await anon.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=1.0)
            assert "an administrator" in denied.value.groups
            # Another password user in everyone: reads in a session of its own, may not update.
            await add_user(operator, live_site, "pam", "pam-pw", ["everyone"])
            async with Client.for_site(live_site.site, credentials=Credentials.password("pam", "pam-pw")) as pam:
                async def known() -> bool:
                    try:
                        return bool((await pam.call("Site", CONFIG, "get_sensor", sensor="S-001"))["rate_hz"] == 7.0)
                    except AuthenticationFailed:  # the instance has not heard of pam yet
                        return False
                await until(known, within_s=PROPAGATION_S)
                with pytest.raises(PermissionDenied) as denied:
                    await pam.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=1.0)
                assert "an administrator" in denied.value.groups
            why = await operator.call("Site", PERM, "explain", user="pam", schema=CONFIG, right="update")
            assert not why["allowed"] and why["right"] == "read" and why["group"] == "everyone"

    asyncio.run(body())
    # The same answers through the ubi command, as another program would get them.
    denied_cli = ubi(live_site, ("pam", "pam-pw"), "call", "Site", CONFIG, "set_rate", "sensor=S-001", "rate_hz=2")
    assert denied_cli.returncode == 1
    assert denied_cli.stderr.strip() == (f"ubi: permission_denied: pam may not update {CONFIG} at Site. "
                                         "This action requires an administrator.")
    allowed_cli = ubi(live_site, OPERATOR, "call", "Site", CONFIG, "set_rate", "sensor=S-001", "rate_hz=2")
    assert (allowed_cli.returncode, allowed_cli.stdout.strip()) == (0, "ok"), allowed_cli.stderr
    assert "pam-pw" not in denied_cli.stdout + denied_cli.stderr


def test_a_policy_change_reaches_the_instance_processes_within_a_second(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as operator:
            a = await operator.find("Zone-A", POSITIONS)
            b = await operator.find("Zone-B", POSITIONS)
            cfg = await operator.find("Site", CONFIG)
            assert len({a.pid, b.pid, cfg.pid, live_site.proc.pid}) == 4  # each its own process
            # A new user: the instance process knows it (its login is accepted) within a second.
            await add_user(operator, live_site, "nina", "nina-pw", [])
            nina = Client.for_site(live_site.site, credentials=Credentials.password("nina", "nina-pw"))
            try:
                async def logs_in() -> bool:
                    try:
                        await nina.call("Site", CONFIG, "get_sensor", sensor="S-001")
                    except AuthenticationFailed:
                        return False
                    except PermissionDenied:  # logged in; in no group, so no right yet
                        return True
                    raise AssertionError("nina, in no group, was allowed to read")
                await until(logs_in, within_s=PROPAGATION_S)

                # A schema's level: both zone processes (two hosts) move to full at once.
                await operator.call("Site", PERM, "set_level", module="ULocation", schema="Positions", level="full")
                naming = await operator.naming()

                async def sealed() -> bool:
                    rows = naming.table("instances")
                    return all(rows[(POSITIONS, z)].protection == "full" for z in ("Zone-A", "Zone-B"))
                await until(sealed, within_s=PROPAGATION_S)
                assert (await operator.find("Zone-B", POSITIONS)).instance_id == b.instance_id  # not restarted

                # A membership at one cell: nina reads Zone-B's sealed positions, not Zone-A's.
                await operator.call("Site", PERM, "add_member", user="nina", group="everyone", cell="Zone-B")

                async def reads_b() -> bool:
                    try:
                        return bool(await nina.call("Zone-B", POSITIONS, "get_dump"))
                    except PermissionDenied:
                        return False
                await until(reads_b, within_s=PROPAGATION_S)
                cache = await nina.cache("Zone-B", POSITIONS)
                ticks: list[object] = []
                cache.on_update("positions", lambda old, new: ticks.append(new))
                await cache.wait_for(lambda c: len(ticks) >= 3, 5.0)  # the simulator's ticks, opened
                assert cache.undecryptable == 0 and cache.rejected == 0
                with pytest.raises(PermissionDenied):
                    await nina.call("Zone-A", POSITIONS, "get_dump")
            finally:
                await nina.close()
                with contextlib.suppress(NotFound):  # NotFound: the level was never set
                    await operator.call("Site", PERM, "clear_level", module="ULocation", schema="Positions")

            async def opened() -> bool:
                rows = naming.table("instances")
                return all(rows[(POSITIONS, z)].protection == "open" for z in ("Zone-A", "Zone-B"))
            await until(opened, within_s=PROPAGATION_S)

    asyncio.run(body())


def test_the_os_user_reads_the_policy_over_ipc_and_may_not_change_it(live_site: LiveSite) -> None:
    async def body() -> None:
        async with Client.for_site(live_site.site, credentials=Credentials.local()) as local, \
                live_site.client(anonymous=True) as anon:
            info = await local.find("Site", PERM)
            assert info.local.startswith("ipc://")
            policy = await local.cache("Site", PERM)  # what every instance process does
            assert OPERATOR[0] in {k[0] for k in policy.table("users")}
            assert ("services", "UPerm", "Config") in policy.table("rules")
            with pytest.raises(PermissionDenied) as denied:
                await local.call("Site", PERM, "add_group", name="intruders")
            assert "an administrator" in denied.value.groups
            # Password users of everyone never see the verifier records.
            with pytest.raises(PermissionDenied):
                await anon.cache("Site", PERM)
            with pytest.raises(PermissionDenied):
                await anon.call("Site", PERM, "explain", user=OPERATOR[0], schema=CONFIG)
            await policy.close()

    asyncio.run(body())
