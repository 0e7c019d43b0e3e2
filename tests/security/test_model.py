"""The security model evaluator (ubicore/security/model.py) against a brute force.

The brute force below is written from DESIGN.md §6, not from model.py: effective groups
are the fixpoint of "add every group a group already in the set implies", starting
from the memberships at the cell or any ancestor; a group's right is its most specific
rule, except that a (``default``, ``default``) rule never reaches the security model's
own module ``UPerm``; a user's right the highest of its groups'. Hypothesis draws random
sites (a cell tree of depth ≤ 4, groups with random implications, cycles included,
memberships, rules over a few modules, ``UPerm`` among them, and schemas with
``default`` wildcards and ignored (``default``, S) rules) and every (user, schema, cell)
must agree. ``explain`` must name a derivation that actually holds, and
``granting_groups`` exactly the groups whose closure holds a group with the right.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubicore.security.amp import VerifierRecord
from ubicore.security.model import (
    SECURITY_MODULES,
    Group,
    Membership,
    PolicyModel,
    Rule,
    User,
    UserKind,
)
from ubicore.security.policy import Right
from ubicore.security.primitives import KdfParams

SITE = "Site"
WILD = "default"
SECURITY = "UPerm"  # the security model's own module: no (default, default) rule reaches it
MODULES = ("A", "B", SECURITY)
NAMES = ("X", "Y")
SCHEMAS = ("A::X", "A::Y", "B::X", "B::Y", "C::X",  # C has no rule of its own: wildcards only
           "UPerm::X", "UPerm::Config", "UPermX::X")  # Config: (UPerm, default) only; UPermX is no UPerm
UNKNOWN_CELL = "Nowhere"
GHOST = "ghost"  # has memberships, is no user
MAX_DEPTH = 4


def record(user: str) -> VerifierRecord:
    return VerifierRecord(user, b"s" * 16, KdfParams(1, 1, 64), b"v" * 32)


# --- the brute force --------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    parents: dict[str, str | None]
    users: dict[str, bool]  # name → enabled
    groups: tuple[str, ...]
    implies: frozenset[tuple[str, str]]
    members: frozenset[tuple[str, str, str]]
    rules: dict[tuple[str, str, str], Right]

    def model(self) -> PolicyModel:
        implied: dict[str, set[str]] = {g: set() for g in self.groups}
        for a, b in self.implies:
            implied[a].add(b)
        return PolicyModel(
            users=[User(u, UserKind.PASSWORD, enabled, record(u)) for u, enabled in self.users.items()],
            groups=[Group(g, f"the {g} group" if i % 2 else "", frozenset(implied[g]))
                    for i, g in enumerate(self.groups)],
            members=[Membership(*m) for m in self.members],
            rules=[Rule(g, m, s, r) for (g, m, s), r in self.rules.items()],
            parents=self.parents,
        )

    def ancestors(self, cell: str) -> list[str]:
        """The cell and its ancestors up to Site; a cell the tree lacks hangs off Site."""
        chain = [cell]
        while chain[-1] != SITE:
            parent = self.parents.get(chain[-1], SITE)
            assert parent is not None
            chain.append(parent)
        return chain

    def closure(self, start: set[str]) -> set[str]:
        got = set(start)
        while True:
            more = got | {b for a, b in self.implies if a in got}
            if more == got:
                return got
            got = more

    def effective(self, user: str, cell: str) -> set[str]:
        above = set(self.ancestors(cell))
        return self.closure({g for u, g, c in self.members if u == user and c in above})

    def group_rule(self, group: str, schema: str) -> tuple[tuple[str, str, str], Right] | None:
        module, name = schema.split("::")
        keys = [(group, module, name), (group, module, WILD)]
        if module != SECURITY:  # UPerm is reached only by rules naming it
            keys.append((group, WILD, WILD))
        for key in keys:
            if key in self.rules:
                return key, self.rules[key]
        return None

    def group_right(self, group: str, schema: str) -> Right:
        found = self.group_rule(group, schema)
        return Right.NONE if found is None else found[1]

    def right(self, user: str, schema: str, cell: str) -> Right:
        if not self.users.get(user, False):
            return Right.NONE
        return max((self.group_right(g, schema) for g in self.effective(user, cell)), default=Right.NONE)

    def granting(self, schema: str, need: Right) -> set[str]:
        return {g for g in self.groups if any(self.group_right(h, schema) >= need for h in self.closure({g}))}


@st.composite
def worlds(draw: st.DrawFn) -> World:
    parents: dict[str, str | None] = {SITE: None}
    depth = {SITE: 0}
    for i in range(draw(st.integers(0, 7))):
        parent = draw(st.sampled_from(sorted(c for c in parents if depth[c] < MAX_DEPTH - 1)))
        name = f"C{i}"
        parents[name] = parent
        depth[name] = depth[parent] + 1
    groups = tuple(f"g{i}" for i in range(draw(st.integers(1, 5))))
    users = {f"u{i}": draw(st.booleans() | st.just(True)) for i in range(draw(st.integers(1, 4)))}
    group = st.sampled_from(groups)
    implies = draw(st.frozensets(st.tuples(group, group).filter(lambda e: e[0] != e[1]), max_size=8))
    cells = sorted(parents)
    members = draw(st.frozensets(
        st.tuples(st.sampled_from([*users, GHOST]), group, st.sampled_from(cells)), max_size=12))
    rule_key = st.tuples(group, st.sampled_from((*MODULES, WILD)), st.sampled_from((*NAMES, WILD)))
    rules = draw(st.dictionaries(rule_key, st.sampled_from(list(Right)), max_size=18))
    return World(parents, users, groups, implies, members, rules)


def check_explanation(w: World, m: PolicyModel, user: str, schema: str, cell: str, need: Right) -> None:
    ex = m.explain(user, schema, cell, need)
    expected = w.right(user, schema, cell)
    assert ex.right == expected
    assert (ex.user, ex.schema, ex.cell, ex.need) == (user, schema, cell, need)
    assert ex.allowed == (expected >= need)
    if expected is Right.NONE and need > Right.NONE:
        assert not ex.allowed
    if user not in w.users or not w.users[user] or not w.effective(user, cell):
        assert ex.right is Right.NONE and ex.group is None and ex.membership is None and ex.rule is None
        assert ex.reason
        return
    # A derivation that holds: the user's own membership, at the cell or above it, and a
    # path of implication edges from its group to the deciding group.
    assert ex.group is not None and ex.membership is not None
    assert ex.membership.user == user
    assert (ex.membership.user, ex.membership.group, ex.membership.cell) in w.members
    assert ex.membership.cell in w.ancestors(cell)
    assert ex.path[0] == ex.membership.group and ex.path[-1] == ex.group
    assert all((a, b) in w.implies for a, b in zip(ex.path, ex.path[1:]))
    assert ex.group in w.effective(user, cell)
    assert w.group_right(ex.group, schema) == ex.right
    found = w.group_rule(ex.group, schema)
    if found is None:
        assert ex.rule is None and ex.right is Right.NONE
    else:
        assert ex.rule is not None
        assert (ex.rule.group, ex.rule.module, ex.rule.schema) == found[0]
        assert ex.rule.right == found[1] == ex.right
        assert ex.rule == m.group_rule(ex.group, schema)
        assert not ex.rule.ignored
        assert str(ex.rule) in ex.reason
    d = ex.as_dict()
    assert d["right"] == ex.right.label and d["allowed"] == ex.allowed and d["path"] == list(ex.path)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(worlds())
def test_model_agrees_with_the_brute_force(w: World) -> None:
    m = w.model()
    cells = [*w.parents, UNKNOWN_CELL]
    for user in [*w.users, GHOST]:
        for cell in cells:
            assert m.effective_groups(user, cell) == w.effective(user, cell)
            assert m.ancestry(cell) == w.ancestors(cell)
            for schema in SCHEMAS:
                assert m.right(user, schema, cell) == w.right(user, schema, cell)
                assert m.right(user, schema, cell) == w.right(user, schema, cell)  # memoised: the same
                for need in (Right.READ, Right.UPDATE):
                    check_explanation(w, m, user, schema, cell, need)
    for schema in SCHEMAS:
        for g in w.groups:
            assert m.group_right(g, schema) == w.group_right(g, schema)
            assert m.closure(g) == w.closure({g})
        for need in Right:
            got = [g.name for g in m.granting_groups(schema, need)]
            assert len(got) == len(set(got))
            assert set(got) == w.granting(schema, need)
            direct = sorted(g for g in w.groups if w.group_right(g, schema) >= need)
            if direct:  # those whose rules grant it first, then those implying one, by name in each part
                assert got == direct + sorted(set(got) - set(direct))


@settings(max_examples=100, deadline=None)
@given(worlds(), st.sampled_from(MODULES), st.sampled_from(NAMES), st.sampled_from(list(Right)))
def test_a_default_module_rule_naming_a_schema_changes_nothing(w: World, module: str, name: str, right: Right) -> None:
    base = w.model()
    g = w.groups[0]
    ignored = Rule(g, WILD, name, right)
    assert ignored.ignored
    extra = PolicyModel(users=base.users.values(), groups=base.groups.values(), members=base.members,
                        rules=[*base.rules.values(), ignored], parents=w.parents)
    schema = f"{module}::{name}"
    for user in w.users:
        for cell in w.parents:
            assert extra.right(user, schema, cell) == base.right(user, schema, cell)
            assert extra.explain(user, schema, cell).rule != ignored
    assert [x.name for x in extra.granting_groups(schema, Right.READ)] == \
        [x.name for x in base.granting_groups(schema, Right.READ)]


# --- examples -----------------------------------------------------------------------------------


def test_implication_cycles_are_harmless() -> None:
    m = PolicyModel(
        users=[User("alice", record=record("alice"))],
        groups=[Group("g1", implies=frozenset({"g2"})), Group("g2", implies=frozenset({"g3"})),
                Group("g3", implies=frozenset({"g1"})), Group("loner", implies=frozenset({"loner"}))],
        members=[Membership("alice", "g2", SITE)],
        rules=[Rule("g1", "A", "X", Right.UPDATE), Rule("loner", WILD, WILD, Right.UPDATE)],
    )
    assert m.effective_groups("alice", SITE) == {"g1", "g2", "g3"}
    assert m.closure("g1") == m.closure("g2") == m.closure("g3") == {"g1", "g2", "g3"}
    assert m.closure("loner") == {"loner"}
    ex = m.explain("alice", "A::X", SITE, Right.UPDATE)
    assert ex.allowed and ex.group == "g1" and ex.path == ("g2", "g3", "g1")
    assert m.right("alice", "A::Y", SITE) is Right.NONE
    assert [g.name for g in m.granting_groups("A::X", Right.UPDATE)] == ["g1", "loner", "g2", "g3"]


def test_disabled_and_unknown_users_have_no_right() -> None:
    m = PolicyModel(
        users=[User("on", record=record("on")), User("off", enabled=False, record=record("off"))],
        groups=[Group("admin")],
        members=[Membership(u, "admin", SITE) for u in ("on", "off", "ghost")],
        rules=[Rule("admin", WILD, WILD, Right.UPDATE)],
    )
    assert m.right("on", "A::X", SITE) is Right.UPDATE
    for user, why in (("off", "disabled"), ("ghost", "no such user")):
        assert m.right(user, "A::X", SITE) is Right.NONE
        ex = m.explain(user, "A::X", SITE)
        assert not ex.allowed and why in ex.reason and ex.group is None
    assert m.verifier("on") is not None
    assert m.verifier("off") is None and m.verifier("ghost") is None


def test_os_users_have_no_verifier_and_are_found_by_uid() -> None:
    m = PolicyModel(users=[
        User("svc", UserKind.OS, uid=4242, record=record("svc")),  # a record on an OS user is never used
        User("gone", UserKind.OS, enabled=False, uid=4343),
        User("pw", record=record("pw")),
    ])
    assert m.verifier("svc") is None and m.verifier("pw") is not None
    svc = m.os_user(4242)
    assert svc is not None and svc.name == "svc"
    assert m.os_user(4343) is None  # disabled
    assert m.os_user(1) is None


def test_an_unknown_cell_sits_under_site() -> None:
    m = PolicyModel(
        users=[User("alice", record=record("alice")), User("bob", record=record("bob"))],
        groups=[Group("readers"), Group("local")],
        members=[Membership("alice", "readers", SITE), Membership("bob", "local", "Building-1")],
        rules=[Rule("readers", WILD, WILD, Right.READ), Rule("local", WILD, WILD, Right.UPDATE)],
        parents={SITE: None, "Building-1": SITE, "Zone-A": "Building-1"},
    )
    assert m.ancestry("Nowhere") == ["Nowhere", SITE]
    assert m.ancestry("Zone-A") == ["Zone-A", "Building-1", SITE]
    assert m.right("alice", "A::X", "Nowhere") is Right.READ  # Site covers it
    assert m.right("bob", "A::X", "Nowhere") is Right.NONE  # Building-1 does not
    assert m.right("bob", "A::X", "Zone-A") is Right.UPDATE
    assert m.right("bob", "A::X", SITE) is Right.NONE  # a membership covers its cell and below only


def test_a_none_rule_shadows_a_wildcard_for_its_group_only() -> None:
    m = PolicyModel(
        users=[User(u, record=record(u)) for u in ("guest", "staff", "both")],
        groups=[Group("guests"), Group("staff", "a staff member"), Group("auditors", "an auditor")],
        members=[Membership("guest", "guests", SITE), Membership("staff", "staff", SITE),
                 Membership("both", "guests", SITE), Membership("both", "auditors", SITE)],
        rules=[Rule("guests", "M", WILD, Right.READ), Rule("guests", "M", "S", Right.NONE),
               Rule("staff", WILD, WILD, Right.UPDATE), Rule("staff", "M", WILD, Right.NONE),
               Rule("auditors", WILD, WILD, Right.READ)],
    )
    assert m.right("guest", "M::S", SITE) is Right.NONE  # the exact rule decides for guests
    ex = m.explain("guest", "M::S", SITE)
    assert ex.rule == Rule("guests", "M", "S", Right.NONE) and ex.group == "guests" and not ex.allowed
    assert "(guests, M, S, none)" in ex.reason
    assert m.right("guest", "M::T", SITE) is Right.READ  # only the exact schema
    assert m.explain("guest", "M::T", SITE).rule == Rule("guests", "M", WILD, Right.READ)
    assert m.right("guest", "N::S", SITE) is Right.NONE  # guests have no rule for N
    # (M, default, none) beats (default, default, update) for staff, on M only
    assert m.right("staff", "M::S", SITE) is Right.NONE and m.right("staff", "M::T", SITE) is Right.NONE
    assert m.explain("staff", "M::T", SITE).rule == Rule("staff", "M", WILD, Right.NONE)
    assert m.right("staff", "N::S", SITE) is Right.UPDATE
    # never takes away what another group gives
    assert m.right("both", "M::S", SITE) is Right.READ
    ex = m.explain("both", "M::S", SITE)
    assert ex.group == "auditors" and ex.rule == Rule("auditors", WILD, WILD, Right.READ)
    assert [g.name for g in m.granting_groups("M::S", Right.READ)] == ["auditors"]
    assert [g.name for g in m.granting_groups("M::T", Right.READ)] == ["auditors", "guests"]
    assert [g.label for g in m.granting_groups("N::S", Right.UPDATE)] == ["a staff member"]
    assert m.granting_groups("M::T", Right.UPDATE) == []


def test_a_default_default_rule_never_reaches_the_security_model() -> None:
    m = PolicyModel(
        users=[User(u, record=record(u)) for u in ("reader", "writer")],
        groups=[Group("readers"), Group("writers")],
        members=[Membership("reader", "readers", SITE), Membership("writer", "writers", SITE)],
        rules=[Rule("readers", WILD, WILD, Right.READ), Rule("writers", WILD, WILD, Right.UPDATE),
               Rule("writers", WILD, "Config", Right.UPDATE)],  # ignored: reaches nothing either
    )
    assert SECURITY_MODULES == {"UPerm", "UAudit"}
    for schema in ("UPerm::Config", "UPerm::Anything", "UAudit::Log", "UAudit::Alerts"):
        for user, group in (("reader", "readers"), ("writer", "writers")):
            assert m.right(user, schema, SITE) is Right.NONE
            assert m.group_rule(group, schema) is None and m.group_right(group, schema) is Right.NONE
            ex = m.explain(user, schema, SITE)
            assert ex.rule is None and not ex.allowed and ex.group == group
            assert ex.reason == f"no rule of {group} covers {schema}"
        assert m.granting_groups(schema, Right.READ) == []
    # every other module, even one whose name starts with UPerm, is reached as before
    for schema in ("Other::Config", "UPermX::Config", "uperm::Config"):
        assert m.right("reader", schema, SITE) is Right.READ
        assert m.right("writer", schema, SITE) is Right.UPDATE
        assert m.explain("writer", schema, SITE).rule == Rule("writers", WILD, WILD, Right.UPDATE)


def test_rules_naming_uperm_reach_it() -> None:
    m = PolicyModel(
        users=[User(u, record=record(u)) for u in ("admin", "reader", "svc")],
        groups=[Group("admin", "an administrator"), Group("policy-readers"), Group("services", "a site service")],
        members=[Membership("admin", "admin", SITE), Membership("reader", "policy-readers", SITE),
                 Membership("svc", "services", SITE)],
        rules=[Rule("policy-readers", "UPerm", WILD, Right.READ),
               Rule("policy-readers", WILD, WILD, Right.UPDATE),  # does not lift UPerm above read
               Rule("admin", WILD, WILD, Right.UPDATE), Rule("admin", "UPerm", WILD, Right.UPDATE),
               Rule("services", "UPerm", "Config", Right.READ)],
    )
    for schema in ("UPerm::Config", "UPerm::Anything"):
        assert m.right("reader", schema, SITE) is Right.READ
        ex = m.explain("reader", schema, SITE, Right.READ)
        assert ex.allowed and ex.rule == Rule("policy-readers", "UPerm", WILD, Right.READ)
        assert "(policy-readers, UPerm, default, read)" in ex.reason
        assert m.right("admin", schema, SITE) is Right.UPDATE
        assert m.explain("admin", schema, SITE, Right.UPDATE).rule == Rule("admin", "UPerm", WILD, Right.UPDATE)
    assert m.right("reader", "Other::Config", SITE) is Right.UPDATE
    assert m.right("svc", "UPerm::Config", SITE) is Right.READ  # the exact rule
    assert m.right("svc", "UPerm::Anything", SITE) is Right.NONE
    assert [g.label for g in m.granting_groups("UPerm::Config", Right.READ)] == \
        ["an administrator", "policy-readers", "a site service"]
    assert [g.name for g in m.granting_groups("UPerm::Anything", Right.READ)] == ["admin", "policy-readers"]
    assert [g.name for g in m.granting_groups("UPerm::Config", Right.UPDATE)] == ["admin"]


def test_a_malformed_schema_name_is_refused() -> None:
    m = PolicyModel()
    for bad in ("AX", "::X", "A::", ""):
        with pytest.raises(ValueError):
            m.explain("u", bad, SITE)
    assert "users=0" in repr(m)
