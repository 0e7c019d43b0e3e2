"""The security model of DESIGN.md §6, evaluated: pure data in, decisions out.

A :class:`PolicyModel` is an immutable picture of ``UPerm::Config`` (users, groups with
their implications, memberships, rules, schema levels) plus the site's cell tree. It
answers, for a user, a schema and a cell:

- the **effective groups**: every group G with a membership (U, G, C') where C' is the
  cell or one of its ancestors, closed under implication (cycles are harmless);
- each group's **right** on ``Module::Schema``: its most specific rule, exact (M, S),
  else (M, ``default``), else (``default``, ``default``), else none. A rule
  (``default``, S) naming a schema is never consulted;
- the user's **right**: the highest over its effective groups (none < read < update).
  An unknown or disabled user has none.

One exception keeps verifier records and the audit trail safe: the security model's own
schemas (modules ``UPerm`` and ``UAudit``) are never reached by a (``default``,
``default``) rule, only by rules that name their module, so that "everyone reads
everything" does not hand out the verifier records of ``UPerm::Config`` (which would
allow offline password guessing) nor the trail of who did what from where.

A rule's right may also be ``none``: the most specific rule decides for its group (a
(G, M, ``default``, read) with (G, M, S, none) keeps G off M::S). It never takes away
what another group gives.

:meth:`PolicyModel.explain` says what decided and why: the membership, the implication
path and the rule. :meth:`PolicyModel.granting_groups` names the groups whose members
would have a right (directly or through implication), for the login prompt.
Nothing here does I/O; decisions are memoised for the life of the model.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..schema import Protection
from .amp import VerifierRecord
from .policy import Right

__all__ = [
    "DEFAULT",
    "SECURITY_MODULES",
    "SITE_CELL",
    "Explanation",
    "Group",
    "Membership",
    "PolicyModel",
    "Rule",
    "User",
    "UserKind",
    "split_schema",
]

DEFAULT = "default"
"""The wildcard of a rule's module or schema."""
SECURITY_MODULES = frozenset({"UPerm", "UAudit"})
"""Modules a (default, default) rule never reaches (see the module docstring)."""
SITE_CELL = "Site"


class UserKind:
    PASSWORD = "password"
    SERVICE = "service"
    OS = "os"
    ALL = frozenset({PASSWORD, SERVICE, OS})


@dataclass(frozen=True, slots=True)
class User:
    name: str
    kind: str = UserKind.PASSWORD
    enabled: bool = True
    record: VerifierRecord | None = field(default=None, repr=False)
    uid: int | None = None
    description: str = ""


@dataclass(frozen=True, slots=True)
class Group:
    name: str
    description: str = ""
    implies: frozenset[str] = frozenset()

    @property
    def label(self) -> str:
        """How the login prompt names the group: its description, else its name."""
        return self.description or self.name


@dataclass(frozen=True, slots=True)
class Membership:
    user: str
    group: str
    cell: str


@dataclass(frozen=True, slots=True)
class Rule:
    group: str
    module: str
    schema: str
    right: Right

    @property
    def ignored(self) -> bool:
        """(``default``, S) with an exact schema is never consulted (DESIGN.md §6)."""
        return self.module == DEFAULT and self.schema != DEFAULT

    def __str__(self) -> str:
        return f"({self.group}, {self.module}, {self.schema}, {self.right.label})"


@dataclass(frozen=True, slots=True)
class Explanation:
    """Why ``user`` has ``right`` on ``schema`` at ``cell`` (and so whether ``need`` is met)."""

    user: str
    schema: str
    cell: str
    need: Right
    right: Right
    reason: str
    group: str | None = None
    membership: Membership | None = None
    path: tuple[str, ...] = ()
    rule: Rule | None = None

    @property
    def allowed(self) -> bool:
        return self.right >= self.need

    def as_dict(self) -> dict[str, Any]:
        return {
            "user": self.user, "schema": self.schema, "cell": self.cell, "need": self.need.label,
            "right": self.right.label, "allowed": self.allowed, "reason": self.reason, "group": self.group,
            "membership": None if self.membership is None else
            {"user": self.membership.user, "group": self.membership.group, "cell": self.membership.cell},
            "path": list(self.path),
            "rule": None if self.rule is None else
            {"group": self.rule.group, "module": self.rule.module, "schema": self.rule.schema,
             "right": self.rule.right.label},
        }


def split_schema(name: str) -> tuple[str, str]:
    module, sep, schema = name.partition("::")
    if not sep or not module or not schema:
        raise ValueError(f"{name!r} is not of the form Module::Schema")
    return module, schema


@dataclass(frozen=True, slots=True)
class _Derivation:
    membership: Membership
    path: tuple[str, ...]  # from the membership's group to this group


class PolicyModel:
    """One immutable version of the policy (see the module docstring).

    ``parents`` maps each cell of the site to its parent (``Site`` → None). A cell it does
    not know is taken to sit directly under ``Site``.
    """

    def __init__(
        self,
        *,
        users: Iterable[User] = (),
        groups: Iterable[Group] = (),
        members: Iterable[Membership] = (),
        rules: Iterable[Rule] = (),
        levels: Mapping[str, Protection] | None = None,
        parents: Mapping[str, str | None] | None = None,
        lockouts: Mapping[tuple[str, str], float] | None = None,
    ) -> None:
        self.users: Mapping[str, User] = {u.name: u for u in users}
        self.groups: Mapping[str, Group] = {g.name: g for g in groups}
        self.members: frozenset[Membership] = frozenset(members)
        self.rules: Mapping[tuple[str, str, str], Rule] = {(r.group, r.module, r.schema): r for r in rules}
        self.levels: Mapping[str, Protection] = dict(levels or {})
        self.parents: Mapping[str, str | None] = dict(parents or {SITE_CELL: None})
        self.lockouts: Mapping[tuple[str, str], float] = dict(lockouts or {})
        """(``user`` | ``address``, subject) → until (unix time): who may not log in now."""
        self._by_uid = {u.uid: u for u in self.users.values() if u.kind == UserKind.OS and u.uid is not None}
        self._member_of: dict[str, list[Membership]] = {}
        for m in sorted(self.members, key=lambda m: (m.group, m.cell)):
            self._member_of.setdefault(m.user, []).append(m)
        self._rights: dict[tuple[str, str, str], Right] = {}
        self._closures: dict[str, frozenset[str]] = {}

    def __repr__(self) -> str:
        return (f"<PolicyModel users={len(self.users)} groups={len(self.groups)} "
                f"members={len(self.members)} rules={len(self.rules)}>")

    # --- lookups -------------------------------------------------------------------------------

    def verifier(self, user: str) -> VerifierRecord | None:
        u = self.users.get(user)
        if u is None or not u.enabled or u.kind == UserKind.OS:
            return None
        return u.record

    def os_user(self, uid: int) -> User | None:
        """The enabled OS user with this Unix uid, if any."""
        u = self._by_uid.get(uid)
        return u if u is not None and u.enabled else None

    def locked_out(self, user: str, address: str, now: float) -> float | None:
        """Until when (unix time) a login of ``user`` from ``address`` is refused, if it is.
        Service users are never locked out, by name or by address: their passwords are
        random and cached, and locking them out (which anyone failing logins from the
        site's own hosts could do) would stop the site's processes."""
        if not self.lockouts:
            return None
        found = self.users.get(user)
        if found is not None and found.kind == UserKind.SERVICE:
            return None
        until = max(self.lockouts.get(("user", user), 0.0), self.lockouts.get(("address", address), 0.0)
                    if address else 0.0)
        return until if until > now else None

    def level(self, schema: str) -> Protection | None:
        return self.levels.get(schema)

    def ancestry(self, cell: str) -> list[str]:
        """The cell, its parent, ... up to ``Site``."""
        out = [cell]
        seen = {cell}
        parent = self.parents.get(cell, SITE_CELL if cell != SITE_CELL else None)
        while parent is not None and parent not in seen:
            out.append(parent)
            seen.add(parent)
            parent = self.parents.get(parent, SITE_CELL if parent != SITE_CELL else None)
        return out

    def closure(self, group: str) -> frozenset[str]:
        """The group and every group it implies, transitively."""
        got = self._closures.get(group)
        if got is None:
            seen = {group}
            todo = [group]
            while todo:
                g = self.groups.get(todo.pop())
                for h in g.implies if g is not None else ():
                    if h not in seen:
                        seen.add(h)
                        todo.append(h)
            got = self._closures[group] = frozenset(seen)
        return got

    # --- evaluation ----------------------------------------------------------------------------

    def _effective(self, user: str, cell: str) -> dict[str, _Derivation]:
        """Effective groups at ``cell``, each with the shortest derivation found (nearest
        cell first, then by group name)."""
        rank = {c: i for i, c in enumerate(self.ancestry(cell))}
        direct = sorted((m for m in self._member_of.get(user, ()) if m.cell in rank),
                        key=lambda m: (rank[m.cell], m.group))
        out: dict[str, _Derivation] = {}
        queue: deque[tuple[str, _Derivation]] = deque()
        for m in direct:
            if m.group not in out:
                out[m.group] = _Derivation(m, (m.group,))
                queue.append((m.group, out[m.group]))
        while queue:
            g, d = queue.popleft()
            group = self.groups.get(g)
            for h in sorted(group.implies) if group is not None else ():
                if h not in out:
                    out[h] = _Derivation(d.membership, (*d.path, h))
                    queue.append((h, out[h]))
        return out

    def effective_groups(self, user: str, cell: str) -> frozenset[str]:
        return frozenset(self._effective(user, cell))

    def group_rule(self, group: str, schema: str) -> Rule | None:
        """The rule that decides ``group``'s right on ``schema`` (``Module::Schema``)."""
        module, name = split_schema(schema)
        rules = self.rules
        rule = rules.get((group, module, name)) or rules.get((group, module, DEFAULT))
        if rule is None and module not in SECURITY_MODULES:
            rule = rules.get((group, DEFAULT, DEFAULT))
        return rule

    def group_right(self, group: str, schema: str) -> Right:
        rule = self.group_rule(group, schema)
        return Right.NONE if rule is None else rule.right

    def right(self, user: str, schema: str, cell: str) -> Right:
        key = (user, schema, cell)
        got = self._rights.get(key)
        if got is None:
            got = self._rights[key] = self.explain(user, schema, cell).right
        return got

    def explain(self, user: str, schema: str, cell: str, need: Right = Right.READ) -> Explanation:
        """What right ``user`` has on ``schema`` at ``cell``, and what decided it."""
        split_schema(schema)
        u = self.users.get(user)
        if u is None:
            return Explanation(user, schema, cell, need, Right.NONE, "no such user")
        if not u.enabled:
            return Explanation(user, schema, cell, need, Right.NONE, "the user is disabled")
        effective = self._effective(user, cell)
        if not effective:
            return Explanation(user, schema, cell, need, Right.NONE, f"{user} is in no group at {cell}")
        best: tuple[Right, int, str] | None = None
        for g, d in effective.items():
            r = self.group_right(g, schema)
            cand = (r, -len(d.path), g)
            if best is None or (cand[0], cand[1]) > (best[0], best[1]) or (
                    (cand[0], cand[1]) == (best[0], best[1]) and g < best[2]):
                best = cand
        assert best is not None
        right, _, g = best
        d = effective[g]
        rule = self.group_rule(g, schema)
        if rule is None:
            reason = f"no rule of {', '.join(sorted(effective))} covers {schema}"
        else:
            reason = f"rule {rule}"
        return Explanation(user, schema, cell, need, right, reason, g, d.membership, d.path, rule)

    def granting_groups(self, schema: str, need: Right) -> list[Group]:
        """Groups whose members would have ``need`` on ``schema``: those whose rules grant
        it, then the groups implying one of those; each once, by name within each part."""
        direct = sorted(g for g in self.groups if self.group_right(g, schema) >= need)
        if not direct:
            return []
        granting = set(direct)
        implying = sorted(g for g in self.groups if g not in granting and self.closure(g) & granting)
        return [self.groups[g] for g in (*direct, *implying)]
