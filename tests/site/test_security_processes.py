"""The security model on a real site (issue 4, "How we will know"): ``ubi site up`` as child
processes (``ubicore.testing.processes``), its factory policy with OPERATOR as the
administrator, changed while it runs by a client calling ``UPerm::Config``'s operations.

- the seed policy: the administrator updates, ``default`` and a plain user only read;
- a change made through the core reaches the instance processes within a second (they
  follow ``UPerm::Config`` as the site's OS user over ipc), levels and cell memberships too;
- the OS user path: this account (the site's service user) reads the policy over ipc and
  may not change it; password users of ``everyone`` may not read it at all;
- admin at Zone-A (host-a's process) is not admin at its sibling Zone-B (host-b's);
- a right through an implied group (power implies admin) and explain's path;
- the login prompt's line built from the granting groups' descriptions, in the SDK and on a
  terminal; the rights it brings stay;
- ``default`` removed: anonymous clients are refused where a session is needed, served elsewhere;
- revocation under a live subscription to a full schema at host-b: on the wire, not one
  event after the change opens with any key the revoked client holds, while an entitled
  reader follows on.
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
from ubicore.errors import (
    AuthenticationFailed,
    DecryptionFailed,
    NotFound,
    PermissionDenied,
)
from ubicore.login import CredentialRequest
from ubicore.protocol.codec import HEADER_WELCOME, parse_channel_message
from ubicore.protocol.messages import Rekey, SealedEvent
from ubicore.security.amp import make_verifier
from ubicore.security.session import GroupKeyRing
from ubicore.sessions import Credentials
from ubicore.testing.processes import LiveSite
from ubicore.testing.site import OPERATOR, TEST_KDF

from ..pty_support import in_terminal
from ..security.attack_support import Eavesdropper, eavesdropper

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
            await cache.wait_for(lambda c: getattr(c.table("sensors")[("S-001",)], "rate_hz", None) == 7.0, 5.0)
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
                    rows: Any = naming.table("instances")
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
                rows: Any = naming.table("instances")
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


# --- issue 4's remaining cases, each over the same processes ---------------------------------------------
# Each test leaves the policy as it found it (levels cleared, ``default`` back), so their order
# does not matter; ``power`` is made where it is needed, by whichever test comes first.

GUARD_S = 5.0
"""Upper bound on waiting for something that must happen (never a timing assertion)."""


def password_client(site: LiveSite, user: str, password: str, **kw: Any) -> Client:
    return Client.for_site(site.site, timeout_s=5.0, credentials=Credentials.password(user, password), **kw)


async def ensure_power(operator: Client) -> None:
    """A group ``power`` ("a power user") that implies ``admin``, made once per site."""
    policy = await operator.cache("Site", PERM)
    try:
        if ("power",) not in policy.table("groups"):
            await operator.call("Site", PERM, "add_group", name="power", description="a power user")
        if ("power", "admin") not in policy.table("implies"):
            await operator.call("Site", PERM, "imply", group="power", implied="admin")
    finally:
        await policy.close()


async def levels_are(operator: Client, schema: str, level: str) -> None:
    """Wait until both zones' instance processes run ``schema`` at ``level`` (naming's word,
    which each instance updates when it moves)."""
    def moved(c: Any) -> bool:
        rows: Any = c.table("instances")
        return all(rows[(schema, z)].protection == level for z in ("Zone-A", "Zone-B"))
    await (await operator.naming()).wait_for(moved, GUARD_S)


async def refused_with(call: Any, error: type[Exception]) -> bool:
    """True once ``call()`` raises ``error``; False while it raises the other login error
    (the instance has not heard of the change yet)."""
    try:
        await call()
    except error:
        return True
    except (AuthenticationFailed, PermissionDenied):
        return False
    return False


def succeeds(fn: Any, *args: Any, **kw: Any) -> Any:
    """A probe for :func:`until`: True once ``fn(*args, **kw)`` is allowed; False while the
    login or the right is refused (the instance has not heard of the change yet)."""
    async def probe() -> bool:
        try:
            await fn(*args, **kw)
        except (AuthenticationFailed, PermissionDenied):
            return False
        return True
    return probe


def test_admin_at_one_cell_updates_there_and_not_at_its_sibling(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as operator:
            await operator.call("Site", PERM, "set_level", module="ULocation", schema="Positions", level="update")
            try:
                await levels_are(operator, POSITIONS, "update")
                await add_user(operator, live_site, "zed", "zed-pw", ["everyone"])
                await operator.call("Site", PERM, "add_member", user="zed", group="admin", cell="Zone-A")
                async with password_client(live_site, "zed", "zed-pw") as zed:
                    # Zone-A (host-a's process) lets zed update once it has the membership.
                    await until(succeeds(zed.call, "Zone-A", POSITIONS, "place", tag="ZED", x=1.0, y=2.0),
                                within_s=GUARD_S)
                    assert (await zed.call("Zone-A", POSITIONS, "where", tag="ZED"))["x"] == 1.0
                    # Zone-B (host-b's process) knows zed (the login is accepted) and refuses.
                    await until(lambda: refused_with(
                        lambda: zed.call("Zone-B", POSITIONS, "place", tag="ZED", x=1.0, y=2.0),
                        PermissionDenied), within_s=GUARD_S)
                    with pytest.raises(PermissionDenied) as denied:
                        await zed.call("Zone-B", POSITIONS, "set_rate", rate_hz=20.0)
                    assert "an administrator" in denied.value.groups
                    assert f"zed may not update {POSITIONS} at Zone-B" in str(denied.value)
                    with pytest.raises(NotFound):  # nothing was placed there
                        await operator.call("Zone-B", POSITIONS, "where", tag="ZED")
                    # Reads at both (everyone at Site).
                    for zone in ("Zone-A", "Zone-B"):
                        assert (await zed.call(zone, POSITIONS, "where", tag="T-001"))["tag"] == "T-001"
                        assert "positions" in (await zed.call(zone, POSITIONS, "get_dump"))["relations"]
                a = await operator.call("Site", PERM, "explain", user="zed", schema=POSITIONS, cell="Zone-A",
                                        right="update")
                b = await operator.call("Site", PERM, "explain", user="zed", schema=POSITIONS, cell="Zone-B",
                                        right="update")
                assert a["allowed"] and a["membership"] == {"user": "zed", "group": "admin", "cell": "Zone-A"}
                assert not b["allowed"] and b["right"] == "read" and b["group"] == "everyone"
            finally:
                with contextlib.suppress(NotFound):
                    await operator.call("Site", PERM, "clear_level", module="ULocation", schema="Positions")
            await levels_are(operator, POSITIONS, "open")

    asyncio.run(body())


def test_a_right_through_an_implied_group(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as operator:
            await ensure_power(operator)
            await add_user(operator, live_site, "pat", "pat-pw", ["power"])  # power only, not admin
            async with password_client(live_site, "pat", "pat-pw") as pat:
                await until(succeeds(pat.call, "Site", CONFIG, "set_rate", sensor="S-002", rate_hz=3.0),
                            within_s=GUARD_S)
                assert (await operator.call("Site", CONFIG, "get_sensor", sensor="S-002"))["rate_hz"] == 3.0
            why = await operator.call("Site", PERM, "explain", user="pat", schema=CONFIG, right="update")
            assert why["allowed"] and why["path"] == ["power", "admin"] and why["group"] == "admin"
            assert why["membership"] == {"user": "pat", "group": "power", "cell": "Site"}
            assert why["rule"] == {"group": "admin", "module": "default", "schema": "default", "right": "update"}

    asyncio.run(body())


class Recorder:
    """A credential provider that answers every request with ``answer`` and records it."""

    def __init__(self, answer: Credentials | None) -> None:
        self.answer = answer
        self.requests: list[CredentialRequest] = []

    def __call__(self, request: CredentialRequest) -> Credentials | None:
        self.requests.append(request)
        return self.answer


def test_the_prompt_is_built_from_the_right_groups_descriptions(live_site: LiveSite) -> None:
    message = "This action requires an administrator or a power user."

    async def body() -> None:
        async with live_site.client() as operator:
            await ensure_power(operator)
            # The Site instance's process grants update to power too once the change is there.
            async with live_site.client(anonymous=True) as anon:
                async def names_power() -> bool:
                    try:
                        await anon.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=1.0)
                    except PermissionDenied as denied:
                        return denied.groups == ("an administrator", "a power user")
                    raise AssertionError("default was allowed to update")
                await until(names_power, within_s=GUARD_S)
            provider = Recorder(Credentials.password(*OPERATOR))
            async with Client.for_site(live_site.site, timeout_s=5.0, credential_provider=provider) as client:
                assert client.user == "default"
                await client.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=4.0)
                [req] = provider.requests
                assert req.message == message
                assert req.groups == ("an administrator", "a power user")
                assert (req.schema, req.cell, req.operation, req.user) == (CONFIG, "Site", "set_rate", "default")
                assert client.user == OPERATOR[0]
                await client.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=5.0)
                assert len(provider.requests) == 1  # the rights stay: no second prompt
            assert (await operator.call("Site", CONFIG, "get_sensor", sensor="S-001"))["rate_hz"] == 5.0

    asyncio.run(body())
    # The same line on a terminal, from the ubi command, which then logs in and succeeds.
    code, shown = in_terminal(["--site", str(live_site.path), "call", "Site", CONFIG, "set_rate", "sensor=S-001",
                               "rate_hz=6"], [("user: ", OPERATOR[0]), ("password: ", OPERATOR[1])])
    assert code == 0, shown
    assert f"{message} (set_rate on {CONFIG} at Site)" in shown
    assert shown.rstrip().endswith("ok") and OPERATOR[1] not in shown  # the password is not echoed


def test_without_default_anonymous_clients_are_refused_where_a_session_is_needed(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as operator, live_site.client(anonymous=True) as anon:
            await operator.call("Site", PERM, "remove_user", name="default")
            try:
                # An anonymous client with a session from before, then fresh ones.
                await until(lambda: refused_with(
                    lambda: anon.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=1.0),
                    AuthenticationFailed), within_s=GUARD_S)
                async with live_site.client(anonymous=True) as late:
                    for client in (anon, late):
                        with pytest.raises(AuthenticationFailed):
                            await client.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=1.0)
                        # The open reads of an update-protected schema and an open schema need no login.
                        assert "sensors" in (await client.call("Site", CONFIG, "get_dump"))["relations"]
                        cache = await client.cache("Zone-B", POSITIONS)
                        try:
                            await client.call("Zone-B", POSITIONS, "place", tag="ANON", x=3.0, y=4.0)
                            await cache.wait_for(lambda c: ("ANON",) in c.table("positions"), GUARD_S)
                        finally:
                            await cache.close()
                # A full schema: no anonymous read at all, in either zone's process.
                await operator.call("Site", PERM, "set_level", module="ULocation", schema="Positions", level="full")
                try:
                    await levels_are(operator, POSITIONS, "full")
                    async with live_site.client(anonymous=True) as late:
                        for client in (anon, late):
                            for zone in ("Zone-A", "Zone-B"):
                                with pytest.raises(AuthenticationFailed):
                                    await client.call(zone, POSITIONS, "get_dump")
                                with pytest.raises(AuthenticationFailed):
                                    await client.cache(zone, POSITIONS)
                    assert "positions" in (await operator.call("Zone-B", POSITIONS, "get_dump"))["relations"]
                finally:
                    await operator.call("Site", PERM, "clear_level", module="ULocation", schema="Positions")
                await levels_are(operator, POSITIONS, "open")
            finally:  # default back as the factory made it: an empty password, in everyone
                rec = make_verifier("default", live_site.site.name, "", TEST_KDF)
                await operator.call("Site", PERM, "add_user", name="default", salt=rec.salt, verifier=rec.verifier,
                                    t=rec.params.t, p=rec.params.p, m_kib=rec.params.m_kib, groups=["everyone"],
                                    description="anyone who does not log in")
            async with live_site.client(anonymous=True) as back:
                await until(lambda: refused_with(
                    lambda: back.call("Site", CONFIG, "set_rate", sensor="S-001", rate_hz=1.0),
                    PermissionDenied), within_s=GUARD_S)

    asyncio.run(body())


def opens(ring: GroupKeyRing, ev: SealedEvent) -> bool:
    """Whether ``ring`` holds a key that opens ``ev`` (a fresh replay window: only the key counts)."""
    if not ring.has(ev.epoch):
        return False
    try:
        ring.open(ev, {})
    except DecryptionFailed:
        return False
    return True


def test_a_revoked_reader_of_a_full_schema_reads_not_one_event_after_the_change(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as operator:
            await operator.call("Site", PERM, "set_level", module="ULocation", schema="Positions", level="full")
            try:
                await levels_are(operator, POSITIONS, "full")
                await add_user(operator, live_site, "rita", "rita-pw", ["everyone"])
                await add_user(operator, live_site, "rex", "rex-pw", ["everyone"])  # keeps the right
                async with password_client(live_site, "rita", "rita-pw") as rita, \
                        password_client(live_site, "rex", "rex-pw") as rex:
                    for reader in (rita, rex):  # host-b's process has heard of both
                        await until(succeeds(reader.call, "Zone-B", POSITIONS, "get_dump"), within_s=GUARD_S)
                    await revoke_under_subscription(operator, rita, rex)
            finally:
                with contextlib.suppress(NotFound):
                    await operator.call("Site", PERM, "clear_level", module="ULocation", schema="Positions")
            await levels_are(operator, POSITIONS, "open")

    asyncio.run(body())


async def revoke_under_subscription(operator: Client, rita: Client, rex: Client) -> None:
    info = await rita.find("Zone-B", POSITIONS)
    assert info.host == "host-b" and info.protection == "full"
    rita_cache = await rita.cache("Zone-B", POSITIONS)
    rex_cache = await rex.cache("Zone-B", POSITIONS)
    try:
        start = rita_cache.seq
        await rita_cache.wait_for(lambda c: c.seq >= start + 3, GUARD_S)  # the simulator's ticks, opened
        old = rita.sessions.latest(info.rpc, POSITIONS, "Zone-B")
        assert old is not None and old.group.epochs
        async with eavesdropper(info.events) as spy:
            # Before the change rita's keys open what is on the wire (the check below can fail).
            await spy.wait_for(lambda s: len(s.sealed_events()) >= 3)
            assert any(opens(old.group, ev) for ev in spy.sealed_events())
            mark = len(spy.frames)
            await operator.call("Site", PERM, "remove_member", user="rita", group="everyone", cell="Site")

            # The change in force at host-b: the rekey that leaves rita's session out.
            def revoked(s: Eavesdropper) -> int | None:
                for i, frames in enumerate(s.frames[mark:], mark):
                    if frames != [HEADER_WELCOME]:
                        msg = parse_channel_message(frames)
                        if isinstance(msg, Rekey) and old.session_id not in {sid for sid, _ in msg.entries}:
                            return i
                return None
            await spy.wait_for(lambda s: revoked(s) is not None)
            cut = revoked(spy)
            assert cut is not None
            rex_at_cut = rex_cache.seq
            # The entitled reader keeps following; the channel goes on without rita.
            await rex_cache.wait_for(lambda c: c.seq >= rex_at_cut + 10, GUARD_S)
            await spy.wait_for(lambda s: len(s.sealed_events(cut)) >= 10)
            after = spy.messages(cut)
        events = [m for m in after if isinstance(m, SealedEvent)]
        rekeys = [m for m in after if isinstance(m, Rekey)]
        assert all(old.session_id not in {sid for sid, _ in m.entries} for m in rekeys)
        rings = [old.group]
        now = rita.sessions.latest(info.rpc, POSITIONS, "Zone-B")
        if now is not None and now is not old:
            rings.append(now.group)
        assert not any(opens(ring, ev) for ring in rings for ev in events)
        assert rex_cache.undecryptable == 0 and rex_cache.rejected == 0
        assert rita_cache.seq < rex_cache.seq
        # Asking afresh is refused.
        with pytest.raises(PermissionDenied):
            await rita.call("Zone-B", POSITIONS, "get_dump")
    finally:
        for cache in (rita_cache, rex_cache):
            with contextlib.suppress(Exception):
                await cache.close()
