"""``UPerm::Config`` (services/perm.py) driven in memory: its operations run on a real
:class:`~ubicore.store.Store` (persisted to ``tmp_path``), inside a transaction that is
committed when the operation returns and rolled back when it raises, as
``InstanceCore.run_operation`` does.

Covered: the factory policy, every refusal (typed error, store unchanged, on disk too),
the keep-an-administrator guard, ignored (``default``, S) rules, persistence across a
reopen, no password bytes in the ``.udata`` file, and ``init_site`` / ``offline_policy``
on a parsed site file.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from ubicore.services.perm import Config, build_model, write_factory_policy

from ubicore.config import parse_site
from ubicore.errors import BadArguments, NotFound, RemoteError
from ubicore.runtime import SERVICE_USER, current_os_user, init_site, offline_policy, perm_path
from ubicore.schema import Protection
from ubicore.security.amp import VerifierRecord, make_verifier
from ubicore.security.model import PolicyModel
from ubicore.security.policy import Right
from ubicore.store import Store
from ubicore.testing import CONFIG_UPDATE, TEST_KDF, free_ports, site_yaml

SITE = "perm-test"
PERM = "UPerm::Config"
CELLS: dict[str, str | None] = {"Site": None, "Building-1": "Site", "Zone-A": "Building-1"}
ADMIN_PW = "admin-Pa55word-do-not-store"
ALICE_PW = "alice-Pa55word-do-not-store"
OS_USER = ("svc", 4242)
FACTORY_RULES = {
    ("admin", "default", "default", "update"),
    ("admin", "UPerm", "default", "update"),
    ("everyone", "default", "default", "read"),
    ("services", "UPerm", "Config", "read"),
    ("services", "UNaming", "Registry", "update"),
    ("admin", "UAudit", "default", "read"),
    ("services", "UAudit", "Log", "update"),
}


def record_args(rec: VerifierRecord) -> dict[str, Any]:
    return {"salt": rec.salt, "verifier": rec.verifier, "t": rec.params.t, "p": rec.params.p, "m_kib": rec.params.m_kib}


def pw_args(user: str, password: str = "pw") -> dict[str, Any]:
    return record_args(make_verifier(user, SITE, password, TEST_KDF))


class Perm:
    """One ``UPerm::Config`` store and the schema object its operations run on."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.store = Store(Config, path)
        self.obj = Config("Site", {"cells": CELLS})

    def close(self) -> None:
        self.store.close()

    def reopen(self) -> None:
        self.store.close()
        self.store = Store(Config, self.path)

    def run(self, op: str, **args: Any) -> Any:
        tx = self.store.transaction()
        try:
            result = getattr(Config, op)(self.obj, tx, **args)
        except BaseException:
            tx.rollback()
            raise
        tx.commit()
        return result

    def rows(self, rel: str) -> set[tuple[Any, ...]]:
        return {tuple(r) for r in self.store.tables[rel].values()}

    def snapshot(self) -> dict[str, set[Any]]:
        return {name: set(rows) for name, rows in self.store.snapshot().items()}

    @property
    def model(self) -> PolicyModel:
        return build_model(lambda rel: self.store.tables[rel].values(), CELLS).model

    def refused(self, error: type[RemoteError], op: str, **args: Any) -> RemoteError:
        before, generation = self.snapshot(), self.store.generation
        with pytest.raises(error) as info:
            self.run(op, **args)
        assert type(info.value) is error
        assert self.snapshot() == before and self.store.generation == generation
        return info.value


@pytest.fixture(scope="module")
def records() -> dict[str, VerifierRecord]:
    return {"administrator": make_verifier("administrator", SITE, ADMIN_PW, TEST_KDF),
            "default": make_verifier("default", SITE, "", TEST_KDF)}


@pytest.fixture
def perm(tmp_path: Path, records: dict[str, VerifierRecord]) -> Iterator[Perm]:
    p = Perm(tmp_path / "x.udata")
    try:
        tx = p.store.transaction()
        write_factory_policy(tx, SITE, TEST_KDF, records["administrator"], records["default"], OS_USER)
        tx.commit()
        yield p
    finally:
        p.close()


# --- the factory policy -------------------------------------------------------------------------


def test_the_factory_policy_is_exactly_the_seed(perm: Perm, records: dict[str, VerifierRecord]) -> None:
    assert {(g.name, g.description) for g in perm.store.tables["groups"].values()} == {
        ("admin", "an administrator"), ("everyone", "any user"), ("services", "a site service")}
    assert perm.rows("rules") == FACTORY_RULES
    assert perm.rows("members") == {("administrator", "admin", "Site"), ("administrator", "everyone", "Site"),
                                    ("default", "everyone", "Site"), ("svc", "services", "Site")}
    assert perm.rows("implies") == set() and perm.rows("schemas") == set()
    users = {u.name: u for u in perm.store.tables["users"].values()}
    assert set(users) == {"administrator", "default", "svc"}
    assert (users["administrator"].kind, users["default"].kind, users["svc"].kind) == ("password", "password", "os")
    assert users["svc"].uid == 4242 and users["svc"].verifier == b"" and users["svc"].salt == b""
    assert all(u.enabled for u in users.values())
    (site,) = perm.store.tables["site"].values()
    assert (site.name, site.kdf_t, site.kdf_p, site.kdf_m_kib) == (SITE, TEST_KDF.t, TEST_KDF.p, TEST_KDF.m_kib)
    assert len(site.fake_key) == 32

    built = build_model(lambda rel: perm.store.tables[rel].values(), CELLS)
    assert (built.site, built.kdf, built.fake_key) == (SITE, TEST_KDF, site.fake_key)
    m = built.model
    assert m.verifier("administrator") == records["administrator"]
    assert m.verifier("default") == records["default"]
    assert m.verifier("svc") is None
    svc = m.os_user(4242)
    assert svc is not None and svc.name == "svc"
    for cell in CELLS:
        assert m.right("administrator", CONFIG_UPDATE, cell) is Right.UPDATE
        assert m.right("administrator", PERM, cell) is Right.UPDATE
        assert m.right("administrator", "UPerm::Other", cell) is Right.UPDATE
        assert m.right("default", CONFIG_UPDATE, cell) is Right.READ
        assert m.right("default", PERM, cell) is Right.NONE  # (everyone, default, default) never reaches UPerm
        assert m.right("default", "UPerm::Other", cell) is Right.NONE
        assert m.right("svc", PERM, cell) is Right.READ
        assert m.right("svc", "UPerm::Other", cell) is Right.NONE
        assert m.right("svc", CONFIG_UPDATE, cell) is Right.NONE
    assert m.explain("administrator", PERM, "Site", Right.UPDATE).rule == m.rules[("admin", "UPerm", "default")]
    assert [g.label for g in m.granting_groups(PERM, Right.READ)] == ["an administrator", "a site service"]
    assert [g.label for g in m.granting_groups(PERM, Right.UPDATE)] == ["an administrator"]
    assert [g.label for g in m.granting_groups(CONFIG_UPDATE, Right.UPDATE)] == ["an administrator"]


def test_explain_says_why(perm: Perm) -> None:
    no = perm.run("explain", user="default", schema=PERM)
    assert no["allowed"] is False and no["right"] == "none" and no["need"] == "read"
    assert no["rule"] is None and no["group"] == "everyone" and no["path"] == ["everyone"]
    assert no["membership"] == {"user": "default", "group": "everyone", "cell": "Site"}
    assert no["reason"] == f"no rule of everyone covers {PERM}"  # (everyone, default, default) does not reach it
    admin = perm.run("explain", user="administrator", schema=PERM, right="update")
    assert admin["allowed"] is True and admin["group"] == "admin"
    assert admin["rule"] == {"group": "admin", "module": "UPerm", "schema": "default", "right": "update"}
    assert "(admin, UPerm, default, update)" in admin["reason"]
    yes = perm.run("explain", user="administrator", schema=CONFIG_UPDATE, cell="Zone-A", right="update")
    assert yes["allowed"] is True and yes["group"] == "admin" and yes["path"] == ["admin"]
    assert yes["rule"] == {"group": "admin", "module": "default", "schema": "default", "right": "update"}
    svc = perm.run("explain", user="svc", schema=PERM)
    assert svc["allowed"] is True and svc["group"] == "services"
    assert perm.run("explain", user="svc", schema=PERM, right="update")["allowed"] is False
    ghost = perm.run("explain", user="ghost", schema=PERM)
    assert ghost["allowed"] is False and ghost["reason"] == "no such user"
    assert perm.run("settings") == {"site": SITE, "kdf": {"t": TEST_KDF.t, "p": TEST_KDF.p, "m_kib": TEST_KDF.m_kib}}


def test_each_site_gets_its_own_fake_key(tmp_path: Path, records: dict[str, VerifierRecord]) -> None:
    keys = []
    for name in ("a.udata", "b.udata"):
        store = Store(Config, tmp_path / name)
        try:
            tx = store.transaction()
            write_factory_policy(tx, SITE, TEST_KDF, records["administrator"], records["default"])
            tx.commit()
            assert {u.name for u in store.tables["users"].values()} == {"administrator", "default"}
            keys.append(next(iter(store.tables["site"].values())).fake_key)
        finally:
            store.close()
    assert keys[0] != keys[1]


# --- refusals -----------------------------------------------------------------------------------

GOOD = pw_args("someone")
REFUSALS: list[tuple[type[RemoteError], str, dict[str, Any]]] = [
    # names
    (BadArguments, "add_user", {"name": "", **GOOD}),
    (BadArguments, "add_user", {"name": "has space", **GOOD}),
    (BadArguments, "add_user", {"name": "x" * 65, **GOOD}),
    (BadArguments, "add_user", {"name": "caf\u00e9", **GOOD}),
    (BadArguments, "add_user", {"name": 7, **GOOD}),
    (BadArguments, "add_user", {"name": "alice", **GOOD}),  # exists
    (BadArguments, "add_group", {"name": "a/b"}),
    (BadArguments, "add_group", {"name": ""}),
    (BadArguments, "add_group", {"name": "admin"}),  # exists
    # kinds, OS users, uids
    (BadArguments, "add_user", {"name": "bot", "kind": "robot", **GOOD}),
    (BadArguments, "add_user", {"name": "os1", "kind": "os"}),
    (BadArguments, "add_user", {"name": "os1", "kind": "os", "uid": -1}),
    (BadArguments, "add_user", {"name": "os1", "kind": "os", "uid": 2**32}),
    (BadArguments, "add_user", {"name": "default2", "kind": "os", "uid": 4242}),  # the uid is svc's
    (BadArguments, "add_user", {"name": "default", "kind": "os", "uid": 99}),
    (BadArguments, "add_user", {"name": "pwuser", "uid": 5, **GOOD}),
    # verifier records
    (BadArguments, "add_user", {"name": "bob", **GOOD, "salt": b"s" * 15}),
    (BadArguments, "add_user", {"name": "bob", **GOOD, "verifier": b"v" * 31}),
    (BadArguments, "add_user", {"name": "bob", **GOOD, "verifier": b"v" * 33}),
    (BadArguments, "add_user", {"name": "bob", **GOOD, "verifier": b""}),
    (BadArguments, "add_user", {"name": "bob", **GOOD, "t": 0}),
    (BadArguments, "add_user", {"name": "bob", **GOOD, "m_kib": 1}),
    (BadArguments, "set_password", {"name": "svc", **GOOD}),  # an OS user has no password
    (BadArguments, "set_password", {"name": "alice", **GOOD, "verifier": b"v" * 8}),
    (NotFound, "set_password", {"name": "ghost", **GOOD}),
    (NotFound, "add_user", {"name": "bob", "groups": ["everyone", "nope"], **GOOD}),  # bob is not left behind
    # unknown users, groups, cells, rows
    (NotFound, "set_enabled", {"name": "ghost", "enabled": False}),
    (NotFound, "describe_user", {"name": "ghost", "description": "x"}),
    (NotFound, "remove_user", {"name": "ghost"}),
    (NotFound, "describe_group", {"name": "nope", "description": "x"}),
    (NotFound, "remove_group", {"name": "nope"}),
    (NotFound, "imply", {"group": "ops", "implied": "nope"}),
    (NotFound, "imply", {"group": "nope", "implied": "ops"}),
    (BadArguments, "imply", {"group": "ops", "implied": "ops"}),
    (NotFound, "unimply", {"group": "ops", "implied": "admin"}),
    (NotFound, "add_member", {"user": "ghost", "group": "everyone"}),
    (NotFound, "add_member", {"user": "alice", "group": "nope"}),
    (NotFound, "add_member", {"user": "alice", "group": "ops", "cell": "Zone-Q"}),
    (NotFound, "remove_member", {"user": "alice", "group": "admin"}),
    (NotFound, "remove_member", {"user": "alice", "group": "everyone", "cell": "Zone-A"}),
    (NotFound, "set_rule", {"group": "nope", "module": "A", "schema": "X", "right": "read"}),
    (NotFound, "remove_rule", {"group": "ops", "module": "default", "schema": "default"}),
    (NotFound, "clear_level", {"module": "A", "schema": "X"}),
    # rights, parts, levels
    (BadArguments, "set_rule", {"group": "ops", "module": "A", "schema": "X", "right": "write"}),
    (BadArguments, "set_rule", {"group": "ops", "module": "A", "schema": "X", "right": ""}),
    (BadArguments, "set_rule", {"group": "ops", "module": "1A", "schema": "X", "right": "read"}),
    (BadArguments, "set_rule", {"group": "ops", "module": "A", "schema": "a-b", "right": "read"}),
    (BadArguments, "set_rule", {"group": "ops", "module": "", "schema": "X", "right": "read"}),
    (BadArguments, "set_level", {"module": "A", "schema": "X", "level": "secret"}),
    (BadArguments, "set_level", {"module": "UPerm", "schema": "Config", "level": "open"}),
    (BadArguments, "set_level", {"module": "UNaming", "schema": "Registry", "level": "full"}),
    (BadArguments, "set_level", {"module": "default", "schema": "X", "level": "full"}),
    (BadArguments, "set_level", {"module": "A", "schema": "default", "level": "full"}),
    (BadArguments, "set_level", {"module": "A::B", "schema": "X", "level": "full"}),
    # the read operation
    (BadArguments, "explain", {"user": "alice", "schema": "A::X", "right": "write"}),
    (BadArguments, "explain", {"user": "alice", "schema": "no-colons"}),
    (NotFound, "explain", {"user": "alice", "schema": "A::X", "cell": "Zone-Q"}),
]


@pytest.mark.parametrize("error,op,args", REFUSALS, ids=[f"{op}-{i}" for i, (_, op, _) in enumerate(REFUSALS)])
def test_a_refused_operation_raises_its_typed_error_and_changes_nothing(
    perm: Perm, error: type[RemoteError], op: str, args: dict[str, Any]
) -> None:
    perm.run("add_user", name="alice", groups=["everyone"], **pw_args("alice"))
    perm.run("add_group", name="ops", description="an operator")
    before = perm.snapshot()
    perm.refused(error, op, **args)
    perm.reopen()  # and nothing reached the disk
    assert perm.snapshot() == before


# --- keeping an administrator -------------------------------------------------------------------

LAST_ADMIN_CHANGES: list[tuple[str, dict[str, Any]]] = [
    ("remove_user", {"name": "administrator"}),
    ("set_enabled", {"name": "administrator", "enabled": False}),
    ("remove_member", {"user": "administrator", "group": "admin"}),
    ("remove_rule", {"group": "admin", "module": "UPerm", "schema": "default"}),
    ("set_rule", {"group": "admin", "module": "UPerm", "schema": "default", "right": "read"}),
    ("set_rule", {"group": "admin", "module": "UPerm", "schema": "default", "right": "none"}),
    ("set_rule", {"group": "admin", "module": "UPerm", "schema": "Config", "right": "read"}),  # exact shadows
    ("set_rule", {"group": "admin", "module": "UPerm", "schema": "Config", "right": "none"}),
    ("remove_group", {"name": "admin"}),
]


@pytest.mark.parametrize("op,args", LAST_ADMIN_CHANGES, ids=[op for op, _ in LAST_ADMIN_CHANGES])
def test_the_last_administrator_cannot_be_taken_away(perm: Perm, op: str, args: dict[str, Any]) -> None:
    err = perm.refused(BadArguments, op, **args)
    assert "nobody could change the security model" in str(err)
    assert perm.model.right("administrator", PERM, "Site") is Right.UPDATE


def test_admins_default_default_rule_is_not_the_path_to_the_policy(perm: Perm) -> None:
    """(default, default) never reaches UPerm: taking admin's wide rule away (or making it
    none) leaves the administrator's update on the policy, so it is allowed."""
    perm.run("set_rule", group="admin", module="default", schema="default", right="none")
    assert perm.model.right("administrator", CONFIG_UPDATE, "Site") is Right.READ  # everyone's
    perm.run("remove_rule", group="admin", module="default", schema="default")
    assert ("admin", "default", "default", "update") not in perm.rows("rules")
    assert perm.model.right("administrator", PERM, "Site") is Right.UPDATE
    # now (admin, UPerm, default) is the only path, and (everyone, default, default, update) is no other one
    perm.run("set_rule", group="everyone", module="default", schema="default", right="update")
    assert perm.model.right("default", CONFIG_UPDATE, "Site") is Right.UPDATE
    assert perm.model.right("default", PERM, "Site") is Right.NONE
    for op, args in LAST_ADMIN_CHANGES:
        perm.refused(BadArguments, op, **args)


def test_who_does_not_count_as_another_administrator(perm: Perm) -> None:
    perm.run("add_member", user="svc", group="admin")  # an OS user: no password, cannot run the tools remotely
    perm.run("add_user", name="robot", kind="service", groups=["admin"], **pw_args("robot"))  # a service user
    perm.run("add_user", name="off", groups=["admin"], **pw_args("off"))
    perm.run("set_enabled", name="off", enabled=False)  # disabled
    perm.run("add_user", name="local", **pw_args("local"))
    perm.run("add_member", user="local", group="admin", cell="Building-1")  # not at Site
    for op, args in LAST_ADMIN_CHANGES:
        perm.refused(BadArguments, op, **args)


def test_unimply_that_removes_the_last_path_is_refused(perm: Perm) -> None:
    perm.run("add_group", name="ops")
    perm.run("imply", group="ops", implied="admin")
    perm.run("add_member", user="administrator", group="ops")
    perm.run("remove_member", user="administrator", group="admin")  # still admin, through ops
    ex = perm.model.explain("administrator", PERM, "Site", Right.UPDATE)
    assert ex.allowed and ex.path == ("ops", "admin")
    perm.refused(BadArguments, "unimply", group="ops", implied="admin")
    perm.refused(BadArguments, "remove_group", name="ops")
    perm.refused(BadArguments, "remove_member", user="administrator", group="ops")
    # Once another administrator exists, the same changes go through.
    perm.run("add_user", name="bob", groups=["admin"], **pw_args("bob"))
    perm.run("unimply", group="ops", implied="admin")
    assert perm.model.right("administrator", PERM, "Site") is Right.NONE  # ops has no rule; everyone's misses UPerm
    perm.run("remove_group", name="ops")
    assert perm.model.right("bob", PERM, "Site") is Right.UPDATE


def test_with_another_administrator_the_changes_are_allowed(perm: Perm) -> None:
    perm.run("add_user", name="bob", groups=["admin"], **pw_args("bob"))
    perm.run("set_enabled", name="administrator", enabled=False)
    perm.run("set_enabled", name="administrator", enabled=True)
    perm.run("remove_member", user="administrator", group="admin")
    perm.run("remove_user", name="administrator")
    assert "administrator" not in perm.model.users
    perm.refused(BadArguments, "remove_user", name="bob")  # now bob is the last one
    perm.refused(BadArguments, "remove_rule", group="admin", module="UPerm", schema="default")
    # Another group with the update right on the policy lets admin's rule and admin go.
    perm.run("add_group", name="root")
    perm.run("set_rule", group="root", module="default", schema="default", right="update")  # misses UPerm
    perm.run("add_member", user="bob", group="root")
    perm.refused(BadArguments, "remove_rule", group="admin", module="UPerm", schema="default")
    perm.run("set_rule", group="root", module="UPerm", schema="Config", right="update")
    perm.run("remove_rule", group="admin", module="UPerm", schema="default")
    perm.run("remove_group", name="admin")
    assert perm.model.right("bob", PERM, "Site") is Right.UPDATE
    assert "admin" not in perm.model.groups
    assert not any("admin" in r for r in perm.rows("members") | perm.rows("rules") | perm.rows("implies"))


def test_set_rule_says_when_a_rule_is_ignored(perm: Perm) -> None:
    perm.run("add_group", name="ops")
    perm.run("add_user", name="alice", groups=["ops", "everyone"], **pw_args("alice"))
    before = {s: perm.model.right("alice", s, "Site") for s in ("A::X", "A::Y", "B::X")}
    assert perm.run("set_rule", group="ops", module="default", schema="X", right="update") == {"ignored": True}
    assert ("ops", "default", "X", "update") in perm.rows("rules")  # kept, never consulted
    assert {s: perm.model.right("alice", s, "Site") for s in before} == before
    assert perm.run("set_rule", group="ops", module="A", schema="default", right="read") == {"ignored": False}
    assert perm.run("set_rule", group="ops", module="A", schema="X", right="update") == {"ignored": False}
    assert perm.run("set_rule", group="ops", module="default", schema="default", right="none") == {"ignored": False}
    m = perm.model
    assert (m.right("alice", "A::X", "Site"), m.right("alice", "A::Y", "Site"), m.right("alice", "B::X", "Site")) == \
        (Right.UPDATE, Right.READ, Right.READ)  # B::X: everyone's read, not ops' none
    perm.run("remove_rule", group="ops", module="A", schema="X")
    assert perm.model.right("alice", "A::X", "Site") is Right.READ


def test_levels_and_descriptions(perm: Perm) -> None:
    perm.run("set_level", module="A", schema="X", level="full")
    perm.run("set_level", module="A", schema="X", level="update")
    assert perm.rows("schemas") == {("A", "X", "update")}
    assert perm.model.level("A::X") is Protection.UPDATE
    perm.run("clear_level", module="A", schema="X")
    assert perm.model.level("A::X") is None
    perm.run("describe_group", name="admin", description="a site administrator")
    perm.run("describe_user", name="svc", description="the service account")
    assert [g.label for g in perm.model.granting_groups(PERM, Right.UPDATE)] == ["a site administrator"]
    assert perm.model.users["svc"].description == "the service account"


# --- persistence --------------------------------------------------------------------------------


def test_the_policy_survives_a_reopen_and_holds_no_password(perm: Perm) -> None:
    alice = make_verifier("alice", SITE, ALICE_PW, TEST_KDF)
    perm.run("add_user", name="alice", description="Alice", **record_args(alice))
    perm.run("add_group", name="ops", description="an operator")
    perm.run("imply", group="ops", implied="everyone")
    perm.run("add_member", user="alice", group="ops", cell="Zone-A")
    perm.run("set_rule", group="ops", module="ULocationSystem", schema="default", right="update")
    perm.run("set_level", module="ULocation", schema="Positions", level="full")
    perm.run("add_user", name="tool", kind="os", uid=5000)
    perm.run("set_enabled", name="tool", enabled=False)
    perm.run("set_password", name="administrator", **pw_args("administrator", ADMIN_PW + "-2"))
    before = perm.snapshot()
    decisions = {(u, s, c): perm.model.explain(u, s, c).as_dict()
                 for u in ("alice", "administrator", "default", "svc", "tool")
                 for s in (PERM, CONFIG_UPDATE, "ULocation::Positions") for c in CELLS}
    perm.reopen()
    assert perm.snapshot() == before
    m = perm.model
    assert {k: m.explain(*k).as_dict() for k in decisions} == decisions
    assert m.right("alice", CONFIG_UPDATE, "Zone-A") is Right.UPDATE
    assert m.right("alice", CONFIG_UPDATE, "Building-1") is Right.NONE
    assert m.verifier("alice") == alice
    assert m.os_user(5000) is None and m.users["tool"].enabled is False
    assert m.level("ULocation::Positions") is Protection.FULL
    perm.close()
    files = [f for f in perm.path.parent.iterdir() if f.name.startswith(perm.path.name)]
    data = b"".join(f.read_bytes() for f in files)
    assert alice.verifier in data  # the records are there...
    for secret in (ALICE_PW, ADMIN_PW, ADMIN_PW + "-2"):  # ...the passwords are not, in any common encoding
        for encoding in ("utf-8", "utf-16-le", "utf-16-be"):
            assert secret.encode(encoding) not in data


# --- init_site and offline_policy on a parsed site ------------------------------------------------


def test_init_site_and_offline_policy(tmp_path: Path) -> None:
    core_port, event_port = free_ports(2)
    path = tmp_path / "site.yaml"
    text = site_yaml(tmp_path / "dataset", core_port=core_port, event_port=event_port, name=SITE)
    path.write_text(text, encoding="utf-8")
    site = parse_site(text, path)
    me, uid = current_os_user()
    assert uid == os.getuid() and me
    assert init_site(site, ADMIN_PW, kdf=TEST_KDF, os_user=(me, uid)) is True
    assert init_site(site, "another", kdf=TEST_KDF) is False  # initialised once
    assert stat.S_IMODE(perm_path(site).stat().st_mode) == 0o600
    with offline_policy(site) as (obj, tx):
        m = build_model(lambda rel: tx[rel], obj.options["cells"]).model
        assert {u.name for u in m.users.values()} == {"administrator", "default", me, SERVICE_USER}
        assert m.os_user(uid) is not None and m.right(me, PERM, "Site") is Right.READ
        assert m.users[SERVICE_USER].kind == "service" and m.right(SERVICE_USER, PERM, "Site") is Right.READ
        assert m.right(SERVICE_USER, "UNaming::Registry", "Site") is Right.UPDATE
        assert m.right("administrator", CONFIG_UPDATE, "Zone-B") is Right.UPDATE
        type(obj).add_user(obj, tx, name="alice", groups=["everyone"], **pw_args("alice"))
        type(obj).add_member(obj, tx, user="alice", group="admin", cell="Zone-B")  # a cell of the site file
        with pytest.raises(NotFound):
            type(obj).add_member(obj, tx, user="alice", group="admin", cell="Zone-Q")
    with pytest.raises(RuntimeError), offline_policy(site) as (obj, tx):
        type(obj).remove_user(obj, tx, name="alice")
        raise RuntimeError("changed my mind")
    with pytest.raises(BadArguments), offline_policy(site) as (obj, tx):  # refused: nothing is committed
        type(obj).remove_user(obj, tx, name="administrator")
    with offline_policy(site) as (obj, tx):
        m = build_model(lambda rel: tx[rel], obj.options["cells"]).model
        assert m.right("alice", CONFIG_UPDATE, "Zone-B") is Right.UPDATE  # committed, and not removed
        assert m.right("alice", CONFIG_UPDATE, "Zone-A") is Right.READ
        assert m.right("administrator", PERM, "Site") is Right.UPDATE
    data = perm_path(site).read_bytes()
    assert ADMIN_PW.encode() not in data



def test_descriptions_are_one_short_line_and_uids_are_in_range(perm: Perm) -> None:
    """Acceptance review: a 5,000-character description was taken; a uid out of range was
    refused as if it were missing."""
    for bad in ("x" * 201, "two\nlines"):
        perm.refused(BadArguments, "add_group", name="g", description=bad)
        perm.refused(BadArguments, "describe_user", name="administrator", description=bad)
        perm.refused(BadArguments, "add_user", name="u", description=bad, **pw_args("u"))
    perm.run("add_group", name="g", description="x" * 200)
    for uid in (-5, 2**32):
        err = perm.refused(BadArguments, "add_user", name="o", kind="os", uid=uid)
        assert "out of range" in err.message
    assert "needs its Unix uid" in perm.refused(BadArguments, "add_user", name="o", kind="os").message
