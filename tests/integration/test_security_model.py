"""The security model end to end over real sockets (issue 4, "How we will know"): sites served
in process by :func:`~ubicore.testing.site.running_site`, the policy edited in the core's
``UPerm::Config`` (``rs.policy``), every instance following it as a cache over ipc, and the
SDK's clients logging in as users of that policy. What is checked:

- a membership per cell: admin at Zone-A is not admin at its sibling Zone-B;
- a right through an implied group (power implies admin), and explain's path;
- no ``default`` user: anonymous clients are refused where a session is needed, served elsewhere;
- the login prompt: the line built from group descriptions, rights kept, declining, a wrong
  password asked again, a credentials file that others can read;
- revocation under a live subscription to a full schema: not one event after the change;
  losing update keeps read;
- a schema's level changed on the running instance and changed back.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from ubicore.errors import AuthenticationFailed, ConfigError, PermissionDenied
from ubicore.login import MAX_ATTEMPTS, CredentialRequest, CredentialsFile
from ubicore.protocol.messages import Rekey, SealedEvent
from ubicore.schema import Protection
from ubicore.security.policy import Right
from ubicore.sessions import Credentials
from ubicore.testing.site import CONFIG_UPDATE, COUNTER, OPERATOR, POSITIONS, RunningSite, run_async, running_site

from ..security.attack_support import GUARD_S, cannot_open, caught_up, eavesdropper, session_of, wait_until

PERM = "UPerm::Config"
COUNTER_PER_ZONE = [{"schema": COUNTER, "level": "zone"}]


async def applied(rs: RunningSite, schema: str, cell: str, check: Any) -> None:
    """Wait until the instance's own view of the policy passes ``check(policy)``: the
    change travelled from the core's UPerm::Config through the instance's cache."""
    policy = rs.server(schema, cell).core.policy
    await wait_until(lambda: check(policy))


async def level_is(rs: RunningSite, schema: str, cell: str, level: Protection) -> None:
    server = rs.server(schema, cell)
    await wait_until(lambda: server.core.protection is level)
    naming = await rs.client.naming()
    await naming.wait_for(lambda c: c.table("instances")[(schema, cell)].protection == level.value, GUARD_S)


def add_power_group(rs: RunningSite) -> None:
    """A group ``power`` ("a power user") that implies ``admin``."""
    rs.policy.edit("add_group", name="power", description="a power user")
    rs.policy.edit("imply", group="power", implied="admin")


# --- memberships per cell ---------------------------------------------------------------------------------


@run_async
async def test_admin_at_one_cell_updates_there_and_not_at_its_sibling(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Zone-A"), (COUNTER, "Zone-B")],
                            extra_deployments=COUNTER_PER_ZONE) as rs:
        rs.policy.set_level(COUNTER, Protection.UPDATE)
        rs.policy.set_user("zoe", "zoe-pw", Right.READ)  # everyone at Site: reads everywhere
        rs.policy.edit("add_member", user="zoe", group="admin", cell="Zone-A")
        for zone in ("Zone-A", "Zone-B"):
            await level_is(rs, COUNTER, zone, Protection.UPDATE)
            await applied(rs, COUNTER, zone, lambda p: p.verifier("zoe") is not None)
        zoe = rs.new_client(user=("zoe", "zoe-pw"))
        assert await zoe.call("Zone-A", COUNTER, "bump", name="z") == 1
        with pytest.raises(PermissionDenied) as denied:
            await zoe.call("Zone-B", COUNTER, "bump", name="z")
        assert "an administrator" in denied.value.groups
        assert await rs.client.call("Zone-B", COUNTER, "bump", name="z") == 1  # the operator is admin at Site
        assert await zoe.call("Zone-B", COUNTER, "get", name="z") == 1  # read stays (everyone at Site)
        # The core explains both answers, over the wire.
        a = await rs.client.call("Site", PERM, "explain", user="zoe", schema=COUNTER, cell="Zone-A", right="update")
        b = await rs.client.call("Site", PERM, "explain", user="zoe", schema=COUNTER, cell="Zone-B", right="update")
        assert a["allowed"] and a["membership"] == {"user": "zoe", "group": "admin", "cell": "Zone-A"}
        assert not b["allowed"] and b["right"] == "read" and b["group"] == "everyone"
        # Taking the membership away is felt at Zone-A at once, by the same client.
        rs.policy.edit("remove_member", user="zoe", group="admin", cell="Zone-A")
        await applied(rs, COUNTER, "Zone-A", lambda p: p.right("zoe", COUNTER, "Zone-A") is Right.READ)
        with pytest.raises(PermissionDenied):
            await zoe.call("Zone-A", COUNTER, "bump", name="z")


# --- implied groups ------------------------------------------------------------------------------------------


@run_async
async def test_a_right_through_an_implied_group(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        rs.policy.set_level(COUNTER, Protection.UPDATE)
        add_power_group(rs)
        rs.policy.set_user("pat", "pat-pw", Right.NONE)
        rs.policy.edit("add_member", user="pat", group="power", cell="Site")  # power only
        await level_is(rs, COUNTER, "Site", Protection.UPDATE)
        await applied(rs, COUNTER, "Site", lambda p: p.right("pat", COUNTER, "Site") is Right.UPDATE)
        pat = rs.new_client(user=("pat", "pat-pw"))
        assert await pat.call("Site", COUNTER, "bump", name="p") == 1
        why = await rs.client.call("Site", PERM, "explain", user="pat", schema=COUNTER, right="update")
        assert why["allowed"] and why["path"] == ["power", "admin"] and why["group"] == "admin"
        assert why["membership"] == {"user": "pat", "group": "power", "cell": "Site"}
        assert why["rule"] == {"group": "admin", "module": "default", "schema": "default", "right": "update"}
        # Cut the implication: pat is in no group with a rule any more.
        rs.policy.edit("unimply", group="power", implied="admin")
        await applied(rs, COUNTER, "Site", lambda p: p.right("pat", COUNTER, "Site") is Right.NONE)
        with pytest.raises(PermissionDenied) as denied:
            await pat.call("Site", COUNTER, "bump", name="p")
        assert denied.value.groups == ("an administrator",)  # power no longer grants it


# --- no default user ----------------------------------------------------------------------------------------


@run_async
async def test_without_default_anonymous_clients_are_refused_where_a_session_is_needed(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site"), (CONFIG_UPDATE, "Site"),
                                                 (POSITIONS, "Zone-A")]) as rs:
        rs.policy.set_level(COUNTER, Protection.FULL)
        await level_is(rs, COUNTER, "Site", Protection.FULL)
        await rs.client.call("Site", COUNTER, "bump", name="x")
        anon = rs.new_client(anonymous=True)
        assert await anon.call("Site", COUNTER, "get", name="x") == 1  # default reads, while it exists
        rs.policy.remove_user("default")
        for schema in (COUNTER, CONFIG_UPDATE):
            await applied(rs, schema, "Site", lambda p: p.verifier("default") is None)
        late = rs.new_client(anonymous=True)
        for client in (anon, late):
            with pytest.raises(AuthenticationFailed):
                await client.call("Site", COUNTER, "get", name="x")
            with pytest.raises(AuthenticationFailed):
                await client.cache("Site", COUNTER)
            with pytest.raises(AuthenticationFailed):
                await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=2.0)
            # Open schemas and the open reads of an update-protected one need no login.
            assert await client.call("Site", CONFIG_UPDATE, "get_dump")
            cache = await client.cache("Zone-A", POSITIONS)
            await client.call("Zone-A", POSITIONS, "place", tag="ANON", x=1.0, y=1.0)
            await cache.wait_for(lambda c: ("ANON",) in c.table("positions"), GUARD_S)
            await cache.close()
        assert await rs.client.call("Site", COUNTER, "bump", name="x") == 2  # logged-in users are untouched


# --- the login prompt --------------------------------------------------------------------------------------


class Recorder:
    """A credential provider that hands out ``answers`` in turn and records each request."""

    def __init__(self, *answers: Credentials | None) -> None:
        self.answers = list(answers)
        self.requests: list[CredentialRequest] = []

    def __call__(self, request: CredentialRequest) -> Credentials | None:
        self.requests.append(request)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


def prompted_client(rs: RunningSite, provider: Any) -> Any:
    from ubicore.client import Client

    client = Client.for_site(rs.site, timeout_s=5.0, credential_provider=provider)
    rs._clients.append(client)  # closed with the site
    return client


@run_async
async def test_the_prompt_names_the_groups_and_keeps_the_rights_it_brought(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site"), (COUNTER, "Site")]) as rs:
        add_power_group(rs)
        rs.policy.set_level(COUNTER, Protection.FULL)
        await applied(rs, CONFIG_UPDATE, "Site", lambda p: "a power user" in p.granting_groups(
            CONFIG_UPDATE, "Site", Right.UPDATE))
        await level_is(rs, COUNTER, "Site", Protection.FULL)
        provider = Recorder(Credentials.password(*OPERATOR))
        client = prompted_client(rs, provider)
        assert client.user == "default"
        await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=4.0)
        [req] = provider.requests
        assert req.message == "This action requires an administrator or a power user."
        assert req.groups == ("an administrator", "a power user")
        assert (req.schema, req.cell, req.operation, req.user) == (CONFIG_UPDATE, "Site", "set_rate", "default")
        assert (req.attempt, req.failed) == (1, False)
        assert client.user == OPERATOR[0]
        # The rights stay: more updates, on other schemas too, a full cache: no second prompt.
        await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=5.0)
        assert await client.call("Site", COUNTER, "bump", name="k") == 1
        cache = await client.cache("Site", COUNTER)
        assert cache.table("counters")[("k",)].value == 1
        assert len(provider.requests) == 1
        assert (await rs.client.call("Site", CONFIG_UPDATE, "get_sensor", sensor="S-001"))["rate_hz"] == 5.0


@run_async
async def test_declining_the_prompt_gives_the_denial_itself(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        provider = Recorder(None)
        client = prompted_client(rs, provider)
        with pytest.raises(PermissionDenied) as denied:
            await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=4.0)
        assert denied.value.groups == ("an administrator",)
        [req] = provider.requests
        assert req.message == "This action requires an administrator."
        assert client.user == "default"
        assert (await client.call("Site", CONFIG_UPDATE, "get_dump"))  # reads need no prompt
        assert len(provider.requests) == 1


@run_async
async def test_a_wrong_password_is_asked_again_up_to_the_limit(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        wrong = Credentials.password(OPERATOR[0], "not-the-password")
        # Wrong once, then right: the second request says the first failed.
        provider = Recorder(wrong, Credentials.password(*OPERATOR))
        client = prompted_client(rs, provider)
        await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=4.0)
        assert [(r.attempt, r.failed) for r in provider.requests] == [(1, False), (2, True)]
        assert provider.requests[1].user == "default"  # back to who it was while asking
        assert client.user == OPERATOR[0]
        # Always wrong: asked MAX_ATTEMPTS times, then the login failure itself.
        stubborn = Recorder(wrong)
        other = prompted_client(rs, stubborn)
        with pytest.raises(AuthenticationFailed):
            await other.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=6.0)
        assert len(stubborn.requests) == MAX_ATTEMPTS
        assert [r.failed for r in stubborn.requests] == [False] + [True] * (MAX_ATTEMPTS - 1)
        assert other.user == "default"
        assert (await rs.client.call("Site", CONFIG_UPDATE, "get_sensor", sensor="S-001"))["rate_hz"] == 4.0


@run_async
async def test_a_credentials_file_must_be_private_to_be_used(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        path = tmp_path / "operator.yaml"
        path.write_text(f"user: {OPERATOR[0]}\npassword: {OPERATOR[1]}\n", encoding="utf-8")
        os.chmod(path, 0o640)
        client = prompted_client(rs, CredentialsFile(path))
        with pytest.raises(ConfigError) as err:
            await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=4.0)
        assert f"chmod 600 {path}" in str(err.value) and OPERATOR[1] not in str(err.value)
        assert client.user == "default"
        os.chmod(path, 0o600)
        await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=4.0)
        assert client.user == OPERATOR[0]
        # A file with a wrong password is given once: the login failure comes back.
        bad = tmp_path / "bad.yaml"
        bad.write_text(f"user: {OPERATOR[0]}\npassword: wrong\n", encoding="utf-8")
        os.chmod(bad, 0o600)
        with pytest.raises(AuthenticationFailed):
            await prompted_client(rs, CredentialsFile(bad)).call("Site", CONFIG_UPDATE, "reboot", sensor="S-001")


# --- revocation under a live subscription -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["remove_member", "remove_user"])
@run_async
async def test_a_revoked_reader_gets_not_one_event_after_the_change(tmp_path: Path, how: str) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        server = rs.server(COUNTER, "Site")
        rs.policy.set_level(COUNTER, Protection.FULL)
        rs.policy.set_user("rita", "rita-pw", Right.READ)
        rs.policy.set_user("rex", "rex-pw", Right.READ)  # a reader who keeps the right
        await level_is(rs, COUNTER, "Site", Protection.FULL)
        await applied(rs, COUNTER, "Site", lambda p: p.verifier("rex") is not None)
        # rita follows batch by batch in one client and caches in another (two joins of one
        # instance in one client share a replay window: each event would reach only one).
        rita, rita_f, rex = (rs.new_client(user=("rita", "rita-pw")), rs.new_client(user=("rita", "rita-pw")),
                             rs.new_client(user=("rex", "rex-pw")))
        rita_seqs: list[int] = []
        rex_seqs: list[int] = []
        rita_dumps: list[int] = []
        rita_follower = await rita_f.follow("Site", COUNTER, lambda b: rita_seqs.append(b.seq),
                                            on_dump=lambda d: rita_dumps.append(len(rita_dumps)))
        rex_follower = await rex.follow("Site", COUNTER, lambda b: rex_seqs.append(b.seq))
        rita_cache = await rita.cache("Site", COUNTER)
        for _ in range(3):
            await rs.client.call("Site", COUNTER, "bump", name="r")
        await rita_cache.wait_for(lambda c: getattr(c.table("counters").get(("r",)), "value", 0) == 3, GUARD_S)
        await wait_until(lambda: len(rita_seqs) >= 3 and len(rex_seqs) >= 3)
        old, old_f = await session_of(rita, server), await session_of(rita_f, server)
        assert old.group.epochs and old_f.group.epochs

        async with eavesdropper(server.event_endpoint) as spy:
            if how == "remove_member":
                rs.policy.edit("remove_member", user="rita", group="everyone", cell="Site")
            else:
                rs.policy.remove_user("rita")
            # The change is in force at the instance once rita's session is out of its guard.
            await wait_until(lambda: not {old.session_id, old_f.session_id} & set(server.core.guard.sessions))
            cut = server.core.sequencer.seq
            mark = len(spy.frames)
            for _ in range(6):
                await rs.client.call("Site", COUNTER, "bump", name="r")
            last = server.core.sequencer.seq
            await wait_until(lambda: bool(rex_seqs) and rex_seqs[-1] >= last)
            await caught_up(spy, server)
            after = spy.messages(mark)

        # The entitled reader saw every batch, in order, without a gap.
        assert rex_seqs == list(range(rex_seqs[0], last + 1))
        assert rex_follower.undecryptable == 0 and rex_follower.resyncs == 0
        # The revoked one applied nothing committed after the change, by batch or by dump.
        assert rita_seqs and max(rita_seqs) <= cut
        assert len(rita_dumps) == 1 and rita_cache.table("counters")[("r",)].value == 3
        assert rita_follower.seq <= cut
        # On the wire: no rekey is for it, and its key ring (old session, or any new one) opens nothing.
        events = [m for m in after if isinstance(m, SealedEvent)]
        assert len(events) >= 6
        rekeys = [m for m in after if isinstance(m, Rekey)]
        assert all({old.session_id, old_f.session_id}.isdisjoint(sid for sid, _ in m.entries) for m in rekeys)
        rings = [old.group, old_f.group]
        for client in (rita, rita_f):
            now = client.sessions.latest(server.rpc_endpoint, COUNTER, "Site")
            if now is not None:
                rings.append(now.group)
        assert all(cannot_open(ring, ev) for ring in rings for ev in events)
        # Asking afresh is refused.
        with pytest.raises((PermissionDenied, AuthenticationFailed)) as refused:
            await rita.call("Site", COUNTER, "get_dump")
        assert isinstance(refused.value, PermissionDenied if how == "remove_member" else AuthenticationFailed)
        with pytest.raises((PermissionDenied, AuthenticationFailed)):
            await rita.cache("Site", COUNTER)


@run_async
async def test_a_session_that_loses_update_keeps_read(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        server = rs.server(COUNTER, "Site")
        rs.policy.set_level(COUNTER, Protection.FULL)
        rs.policy.set_user("uma", "uma-pw", Right.UPDATE)
        await level_is(rs, COUNTER, "Site", Protection.FULL)
        await applied(rs, COUNTER, "Site", lambda p: p.right("uma", COUNTER, "Site") is Right.UPDATE)
        uma = rs.new_client(user=("uma", "uma-pw"))
        cache = await uma.cache("Site", COUNTER)
        assert await uma.call("Site", COUNTER, "bump", name="u") == 1
        session = await session_of(uma, server)
        rs.policy.set_right("uma", Right.READ)
        await applied(rs, COUNTER, "Site", lambda p: p.right("uma", COUNTER, "Site") is Right.READ)
        with pytest.raises(PermissionDenied) as denied:
            await uma.call("Site", COUNTER, "bump", name="u")
        assert "an administrator" in denied.value.groups
        # Still reading, in the same session, and the cache keeps following.
        assert await uma.call("Site", COUNTER, "get", name="u") == 1
        assert (await session_of(uma, server)).session_id == session.session_id
        await rs.client.call("Site", COUNTER, "bump", name="u")
        await cache.wait_for(lambda c: c.table("counters")[("u",)].value == 2, GUARD_S)
        assert cache.undecryptable == 0


# --- a level changed while running --------------------------------------------------------------------------


@run_async
async def test_a_schema_level_moves_the_running_instance_and_back(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        server = rs.server(COUNTER, "Site")
        iid = server.core.instance_id
        assert server.core.protection is Protection.OPEN
        anon = rs.new_client(anonymous=True)
        seen: list[int] = []
        cache = await anon.cache("Site", COUNTER)
        cache.on_change(lambda rel, old, new: seen.append(new.value) if rel == "counters" and new else None)
        assert await anon.call("Site", COUNTER, "bump", name="lv") == 1  # open: anyone updates
        assert anon.sessions.logins == 0

        rs.policy.set_level(COUNTER, Protection.FULL)
        await level_is(rs, COUNTER, "Site", Protection.FULL)
        assert server.core.instance_id == iid  # the same instance, not a restart
        # default logs in by itself and still reads; updating now needs the right.
        assert await anon.call("Site", COUNTER, "get", name="lv") == 1
        assert anon.sessions.logins >= 1
        with pytest.raises(PermissionDenied):
            await anon.call("Site", COUNTER, "bump", name="lv")
        for v in (2, 3):
            assert await rs.client.call("Site", COUNTER, "bump", name="lv") == v
        await cache.wait_for(lambda c: c.table("counters")[("lv",)].value == 3, GUARD_S)

        rs.policy.set_level(COUNTER, None)  # back to what the schema declares
        await level_is(rs, COUNTER, "Site", Protection.OPEN)
        assert server.core.instance_id == iid
        assert await anon.call("Site", COUNTER, "bump", name="lv") == 4
        await cache.wait_for(lambda c: c.table("counters")[("lv",)].value == 4, GUARD_S)
        assert seen[-1] == 4 and seen == sorted(seen)
        assert cache.rejected == 0
