"""Local logins (ubicore/security/local.py, ``SessionGuard.local_login``, ``auth_local``
in dispatch): an OS user of the instance's host, named by the kernel's peer uid on the
ipc endpoint, gets a session without a password.

Sans-IO first: an :class:`InstanceCore` behind an in-memory "ipc connection" (:class:`Wire`)
that passes the uid the kernel would, and the client's own login code
(``SessionManager._login`` with ``Credentials.local()``) on the other end. Then over real
sockets with :func:`~ubicore.testing.running_site`: the kernel's uid on the ipc socket, no
uid on TCP.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ubicore.dispatch import InstanceCore
from ubicore.errors import (
    AuthenticationFailed,
    AuthenticationRequired,
    BadArguments,
    PermissionDenied,
    remote_error_from_wire,
)
from ubicore.protocol.codec import (
    encode_request,
    encode_sealed_request,
    parse_channel_message,
    parse_server_message,
)
from ubicore.protocol.messages import ErrorReply, Rekey, Reply, Request, Sealed
from ubicore.runtime import current_os_user
from ubicore.schema import Protection
from ubicore.security.amp import VerifierRecord
from ubicore.security.local import LocalClient, LocalGrant, peer_uid, server_grant
from ubicore.security.model import Group, Membership, PolicyModel, Rule, User, UserKind
from ubicore.security.policy import PolicySource, Right
from ubicore.security.primitives import KdfParams
from ubicore.security.session import ClientSession, delivery_context
from ubicore.sessions import Credentials, SessionManager
from ubicore.store import Store
from ubicore.testing import COUNTER, run_async, running_site
from ubicore.transport.rpc import RpcConnection

from .guard_support import CELL, HB, IID, SCHEMA, Box, can_read, event

SITE = "local-site"
READER, WRITER, NOBODY, OFF = ("svc-r", 5001), ("svc-w", 5002), ("svc-none", 5003), ("svc-off", 5004)
STRANGER_UID = 6000
WAIT_S = 5.0
LOW_ORDER = bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")


def policy_model(*, without: str = "", disabled: str = "", moved: tuple[str, int] | None = None) -> PolicyModel:
    """OS users: svc-r reads, svc-w updates, svc-none is in no group, svc-off is disabled;
    alice is a password user who updates."""
    users = []
    for name, uid in (READER, WRITER, NOBODY, OFF):
        if name == without:
            continue
        if moved is not None and name == moved[0]:
            uid = moved[1]
        users.append(User(name, UserKind.OS, enabled=name not in (OFF[0], disabled), uid=uid))
    users.append(User("alice", record=VerifierRecord("alice", b"s" * 16, KdfParams(1, 1, 64), b"v" * 32)))
    return PolicyModel(
        users=users,
        groups=[Group("readers"), Group("writers", implies=frozenset({"readers"}))],
        members=[Membership(READER[0], "readers", "Site"), Membership(WRITER[0], "writers", "Site"),
                 Membership(OFF[0], "writers", "Site"), Membership("alice", "writers", "Site")],
        rules=[Rule("readers", "default", "default", Right.READ), Rule("writers", "default", "default", Right.UPDATE)],
    )


class Instance:
    """A :class:`Box` instance core with a policy view of a :class:`PolicySource`."""

    def __init__(self, level: Protection) -> None:
        self.source = PolicySource(SITE)
        self.source.update(policy_model())
        self.store = Store(Box, None)
        self.core = InstanceCore(Box, CELL, self.store, protection=level, instance_id=IID,
                                 policy=self.source.policy())
        self.guard = self.core.guard

    def change(self, model: PolicyModel) -> list[list[bytes]]:
        """A policy change, applied as the instance's security tick does."""
        self.source.update(model)
        assert self.core.policy.refresh()
        return self.guard.reevaluate()


@pytest.fixture(params=[Protection.UPDATE, Protection.FULL], ids=["update", "full"])
def instance(request: pytest.FixtureRequest) -> Iterator[Instance]:
    inst = Instance(request.param)
    try:
        yield inst
    finally:
        inst.store.close()


@pytest.fixture
def full() -> Iterator[Instance]:
    inst = Instance(Protection.FULL)
    try:
        yield inst
    finally:
        inst.store.close()


class Wire:
    """An in-memory connection to ``core`` through the codec, as the instance's ipc
    endpoint would carry it: ``uid`` is what the kernel says of the peer (None: a TCP
    connection). ``tamper`` rewrites the clear replies on their way to the client."""

    def __init__(self, core: InstanceCore, uid: int | None, *, endpoint: str = "ipc:///run/test.ipc",
                 tamper: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> None:
        self.core, self.uid, self.endpoint, self.tamper = core, uid, endpoint, tamper
        self._corr = itertools.count(1)

    async def call(self, schema: str, cell: str, operation: str, args: dict[str, Any], timeout_s: float,
                   session: ClientSession | None = None) -> Any:
        req = Request(next(self._corr), schema, cell, operation, args, 0)
        frames = encode_request(req) if session is None else encode_sealed_request(session.seal_request(req))
        out = self.core.handle(frames, b"ipc:peer-1", self.uid)
        assert out is not None
        msg = parse_server_message(out)
        if isinstance(msg, Sealed):
            assert session is not None
            msg = session.open_reply(msg)
        if isinstance(msg, ErrorReply):
            raise remote_error_from_wire(msg.code, msg.message, msg.detail)
        assert isinstance(msg, Reply)
        result = msg.result
        return self.tamper(dict(result)) if self.tamper is not None else result


def local_login(wire: Wire, site: str | None = SITE) -> ClientSession:
    """The client's own login code, with local credentials."""
    manager = SessionManager(Credentials.local(), site=site)
    return asyncio.run(manager._login(wire, SCHEMA, CELL, 1.0))  # type: ignore[arg-type]


def call(wire: Wire, session: ClientSession | None, op: str, **args: Any) -> Any:
    return asyncio.run(wire.call(SCHEMA, CELL, op, args, 1.0, session))


# --- peer_uid -------------------------------------------------------------------------------------


@pytest.mark.parametrize("address,uid", [
    ("host:1000:1000:4242", 1000),
    ("my-host:0:0:1", 0),
    ("a:b:c:4294967295:0:1", 4294967295),  # only the last three fields are the kernel's
    (":5001:5001:77", 5001),
])
def test_peer_uid_of_an_ipc_peer_address(address: str, uid: int) -> None:
    assert peer_uid(address) == uid


@pytest.mark.parametrize("address", [
    None, "", "host", "1000:1000:12", "host:x:1000:12", "host:-1:0:1", "host:4294967296:0:1",
    "host: :0:1", "host:1e3:0:1", "host:0x10:0:1",
])
def test_peer_uid_refuses_what_is_not_one(address: str | None) -> None:
    assert peer_uid(address) is None


def test_a_tcp_peer_is_never_asked_for_a_uid() -> None:
    """An IPv6 TCP peer address can look like ``host:uid:gid:pid`` to the parser: the
    server passes the uid of its ipc socket only, and without one auth_local is refused."""
    assert peer_uid("fe80::1:2:3") is not None  # why the parser must never see TCP addresses
    inst = Instance(Protection.FULL)
    try:
        with pytest.raises(BadArguments, match="ipc endpoint"):
            local_login(Wire(inst.core, None))
        assert not inst.guard.sessions and inst.guard.stats.logins == 0
        with pytest.raises(AuthenticationFailed, match="no ipc endpoint"):  # the client will not try over TCP
            local_login(Wire(inst.core, READER[1], endpoint="tcp://127.0.0.1:5555"))
    finally:
        inst.store.close()


# --- who may log in -------------------------------------------------------------------------------


def test_an_os_user_logs_in_by_uid(instance: Instance) -> None:
    session = local_login(Wire(instance.core, WRITER[1]))
    assert session.user == WRITER[0] and session.level == instance.guard.level.value
    assert set(instance.guard.sessions) == {session.session_id}
    assert instance.guard.sessions[session.session_id].user == WRITER[0]
    assert instance.guard.stats.logins == 1 and instance.guard.stats.login_failures == 0


@pytest.mark.parametrize("uid", [STRANGER_UID, OFF[1], 0])
def test_a_uid_that_is_no_enabled_os_user_fails_and_is_counted(instance: Instance, uid: int) -> None:
    with pytest.raises(AuthenticationFailed):
        local_login(Wire(instance.core, uid))
    assert not instance.guard.sessions
    assert instance.guard.stats.login_failures == 1 and instance.guard.stats.logins == 0


@pytest.mark.parametrize("pk", [
    None, b"", b"\x09" * 31, b"\x09" * 33, "a" * 32, 7, [1, 2], b"\x00" * 32, b"\x01" + b"\x00" * 31, LOW_ORDER,
], ids=["none", "empty", "short", "long", "str", "int", "list", "zero", "one", "low-order"])
def test_a_bad_client_key_fails_and_the_instance_keeps_serving(instance: Instance, pk: Any) -> None:
    wire = Wire(instance.core, WRITER[1])
    with pytest.raises(AuthenticationFailed):
        call(wire, None, "auth_local", pk=pk)
    with pytest.raises(AuthenticationFailed):
        call(wire, None, "auth_local")  # no key at all
    assert not instance.guard.sessions
    session = local_login(wire)  # the next one is served
    call(wire, session, "put", name="a", n=1)
    assert call(wire, session, "peek", name="a") == 1


def test_auth_local_is_not_sent_inside_a_session(instance: Instance) -> None:
    wire = Wire(instance.core, WRITER[1])
    session = local_login(wire)
    with pytest.raises(BadArguments, match="inside a session"):
        call(wire, session, "auth_local", pk=LocalClient().pk)
    assert len(instance.guard.sessions) == 1


# --- the grant --------------------------------------------------------------------------------


def flip(name: str, at: int = 0) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def tamper(reply: dict[str, Any]) -> dict[str, Any]:
        value = bytearray(reply[name])
        value[at] ^= 0x01
        reply[name] = bytes(value)
        return reply
    return tamper


def replace(name: str, value: Any) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def tamper(reply: dict[str, Any]) -> dict[str, Any]:
        reply[name] = value
        return reply
    return tamper


@pytest.mark.parametrize("tamper", [
    flip("keys"), flip("keys", -1), flip("nonce"), flip("pk"), flip("pk", 31), flip("instance_id"),
    replace("user", WRITER[0] + "x"), replace("user", READER[0]), replace("version", 99),
    replace("site", "elsewhere"), replace("pk", b"\x00" * 32), replace("nonce", b"\x00" * 11),
    replace("keys", b""), replace("user", 5), replace("version", "1"),
], ids=["keys0", "keys-1", "nonce", "pk0", "pk31", "instance-id", "user", "other-user", "version", "site",
        "pk-zero", "nonce-short", "keys-empty", "user-int", "version-str"])
def test_a_tampered_grant_fails_at_the_client(full: Instance, tamper: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    with pytest.raises(AuthenticationFailed):
        local_login(Wire(full.core, WRITER[1], tamper=tamper))
    assert local_login(Wire(full.core, WRITER[1])).user == WRITER[0]  # untouched, it works


def test_a_grant_for_another_site_fails_at_a_client_that_knows_its_site(full: Instance) -> None:
    with pytest.raises(AuthenticationFailed):
        local_login(Wire(full.core, WRITER[1]), site="another-site")
    assert local_login(Wire(full.core, WRITER[1]), site=None).user == WRITER[0]  # learns the site


def test_the_local_exchange_sans_io() -> None:
    context = delivery_context(SCHEMA, CELL, IID)
    lc = LocalClient()
    grant, k_sess = server_grant("svc", SITE, context, lc.pk, b"payload", 3)
    assert grant.version == 3 and len(grant.pk) == 32 and grant.pk != lc.pk
    payload, k_client = lc.finish(grant, SITE, context)
    assert payload == b"payload" and k_client.equals(k_sess)
    with pytest.raises(RuntimeError):
        lc.finish(grant, SITE, context)  # one-shot
    for bad in (LocalGrant("svc", grant.pk, grant.nonce, grant.wrapped, 4),  # every field is bound
                LocalGrant("svc2", grant.pk, grant.nonce, grant.wrapped, 3)):
        other = LocalClient()
        g2, _ = server_grant("svc", SITE, context, other.pk, b"payload", 3)
        forged = LocalGrant(bad.user, g2.pk, g2.nonce, g2.wrapped, bad.version)
        with pytest.raises(AuthenticationFailed):
            other.finish(forged, SITE, context)
    other = LocalClient()
    g3, _ = server_grant("svc", SITE, context, other.pk, b"payload", 3)
    with pytest.raises(AuthenticationFailed):
        other.finish(g3, SITE, delivery_context(SCHEMA, "Zone-B", IID))  # another instance's context
    assert repr(lc) == "<LocalClient>"


# --- what the session may do -----------------------------------------------------------------------


def test_sealed_calls_follow_the_os_users_right(instance: Instance) -> None:
    writer = Wire(instance.core, WRITER[1])
    w = local_login(writer)
    call(writer, w, "put", name="a", n=5)
    assert call(writer, w, "peek", name="a") == 5
    reader = Wire(instance.core, READER[1])
    r = local_login(reader)
    assert call(reader, r, "peek", name="a") == 5
    with pytest.raises(PermissionDenied):
        call(reader, r, "put", name="a", n=6)
    nobody = Wire(instance.core, NOBODY[1])
    n = local_login(nobody)  # an OS user of the site, in no group: a session, no right
    with pytest.raises(PermissionDenied):
        call(nobody, n, "peek", name="a")
    assert call(writer, w, "peek", name="a") == 5


def test_group_keys_come_at_full_only_with_the_read_right(instance: Instance) -> None:
    sessions = {name: local_login(Wire(instance.core, uid)) for name, uid in (READER, WRITER, NOBODY)}
    if instance.guard.level is Protection.FULL:
        ev = event(instance.guard)
        assert can_read(sessions[READER[0]], ev) and can_read(sessions[WRITER[0]], ev)
        assert not can_read(sessions[NOBODY[0]], ev)
        with pytest.raises(PermissionDenied):
            call(Wire(instance.core, NOBODY[1]), sessions[NOBODY[0]], "get_keys")
        assert call(Wire(instance.core, READER[1]), sessions[READER[0]], "get_keys")
    else:
        assert all(not instance.guard.sessions[s.session_id].may_read for s in sessions.values())
        assert call(Wire(instance.core, READER[1]), sessions[READER[0]], "get_keys") == []
        assert instance.guard.seal_event(HB) == [HB]  # nothing sealed below full


@pytest.mark.parametrize("change", [
    {"without": READER[0]}, {"disabled": READER[0]}, {"moved": (READER[0], 7777)},
], ids=["removed", "disabled", "uid-changed"])
def test_taking_the_os_user_away_ends_its_session(instance: Instance, change: dict[str, Any]) -> None:
    reader, writer = Wire(instance.core, READER[1]), Wire(instance.core, WRITER[1])
    r, w = local_login(reader), local_login(writer)
    assert call(reader, r, "peek", name="a") is None
    rekeys = instance.change(policy_model(**change))
    assert r.session_id not in instance.guard.sessions and w.session_id in instance.guard.sessions
    with pytest.raises(AuthenticationRequired):
        call(reader, r, "peek", name="a")
    call(writer, w, "put", name="a", n=1)  # the others go on
    if instance.guard.level is Protection.FULL:
        (frames,) = rekeys
        rekey = parse_channel_message(frames)
        assert isinstance(rekey, Rekey)
        assert {sid for sid, _ in rekey.entries} == {w.session_id}
        assert w.open_rekey(rekey) and not r.open_rekey(rekey)
        ev = event(instance.guard)
        assert can_read(w, ev) and not can_read(r, ev)
    else:
        assert rekeys == []
    with pytest.raises(AuthenticationFailed):  # and it cannot log in again
        local_login(reader)


def test_a_policy_change_that_keeps_the_os_user_keeps_its_session(instance: Instance) -> None:
    reader = Wire(instance.core, READER[1])
    r = local_login(reader)
    assert instance.change(policy_model(without=NOBODY[0])) == []
    assert r.session_id in instance.guard.sessions
    assert call(reader, r, "peek", name="a") is None


# --- over real sockets -----------------------------------------------------------------------------

FULL_COUNTER = [{"schema": COUNTER, "cell": "Site", "protection": "full"}]


async def wait_until(predicate: Callable[[], bool], what: str) -> None:
    try:
        async with asyncio.timeout(WAIT_S):
            while not predicate():
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting until {what}") from None


@run_async
async def test_an_os_user_reads_a_full_schema_over_ipc(tmp_path: Path) -> None:
    me, _ = current_os_user()
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        assert server.core.protection is Protection.FULL
        local_endpoint = server.core.endpoints["local"]
        assert local_endpoint.startswith("ipc://")
        await rs.client.call("Site", COUNTER, "bump", name="p")
        local = rs.new_client(credentials=Credentials.local())
        with pytest.raises(PermissionDenied):  # the factory policy: the service account reads the policy only
            await local.call("Site", COUNTER, "get", name="p")
        rs.policy.edit("add_member", user=me, group="everyone", cell="Site")
        await wait_until(lambda: server.core.policy.right(me, COUNTER, "Site") >= Right.READ,
                         "the instance knows the OS user reads")
        assert await local.call("Site", COUNTER, "get", name="p") == 1
        assert local.user == me  # the instance named the OS user
        cache = await local.cache("Site", COUNTER)
        assert cache.table("counters")[("p",)].value == 1  # type: ignore[attr-defined]
        await rs.client.call("Site", COUNTER, "bump", name="p")
        await cache.wait_for(lambda c: c.table("counters")[("p",)].value == 2, WAIT_S)  # sealed events
        with pytest.raises(PermissionDenied):
            await local.call("Site", COUNTER, "bump", name="p")  # everyone reads, no more
        assert any(s.user == me for s in server.core.guard.sessions.values())  # the kernel named it
        assert local_endpoint in local._conns and server.rpc_endpoint not in local._conns  # over ipc only


@run_async
async def test_auth_local_over_tcp_is_refused_and_over_ipc_is_the_kernels_uid(tmp_path: Path) -> None:
    me, _ = current_os_user()
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        server = rs.server(COUNTER, "Site")
        tcp = RpcConnection(server.rpc_endpoint)
        ipc = RpcConnection(server.core.endpoints["local"])
        try:
            with pytest.raises(BadArguments, match="ipc endpoint"):
                await tcp.call(COUNTER, "Site", "auth_local", {"pk": LocalClient().pk}, WAIT_S)
            reply = await ipc.call(COUNTER, "Site", "auth_local", {"pk": LocalClient().pk}, WAIT_S)
            assert reply["user"] == me and reply["site"] == rs.site.name
            with pytest.raises(AuthenticationFailed):
                await ipc.call(COUNTER, "Site", "auth_local", {"pk": b"\x00" * 32}, WAIT_S)
        finally:
            tcp.close()
            ipc.close()
        # A password client cannot make itself an OS user: inside its session auth_local is refused.
        with pytest.raises(BadArguments):
            await rs.client.call("Site", COUNTER, "auth_local", pk=LocalClient().pk)
        assert await rs.client.call("Site", COUNTER, "get_stats")  # and the instance serves on


@run_async
async def test_a_local_client_without_an_ipc_endpoint_is_told_why(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")], extra_deployments=FULL_COUNTER) as rs:
        assert rs.core is not None
        with rs.core.transaction() as tx:  # registered as if from another host: no ipc endpoint
            row = tx.instances.get(COUNTER, "Site")
            assert row is not None and row.local
            tx.instances.upsert(**{**row._asdict(), "local": ""})
        local = rs.new_client(credentials=Credentials.local())
        naming = await local.naming()
        await naming.wait_for(lambda c: c.table("instances")[(COUNTER, "Site")].local == "", WAIT_S)
        with pytest.raises(AuthenticationFailed, match="no ipc endpoint"):
            await local.call("Site", COUNTER, "get", name="p")
