"""``UPerm::Config``: the security model of a site (DESIGN.md §6), as a schema service.

It runs in the core, fully protected, and persists in the core's dataset as
``Site/UPerm%Config.udata``. Its relations are the policy: users (verifier records,
never passwords), groups and their implications, memberships per cell, rules and schema
levels, and one ``site`` row (the site name, the Argon2id costs new verifiers get, the
key that makes unknown users' fake records stable). Every instance follows it as a
caching client and decides with :class:`ubicore.security.model.PolicyModel`, built from
these rows by :func:`build_model`.

Its update operations are what ``ubi security`` calls. Each one checks its arguments
and refuses a change that would leave nobody able to change the policy again (no
enabled password user with ``update`` on ``UPerm::Config`` at ``Site``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ubicore.errors import BadArguments, NotFound
from ubicore.schema import Column, Protection, Relation, Schema, read, update
from ubicore.security.amp import VerifierRecord
from ubicore.security.model import DEFAULT, SITE_CELL, Group, Membership, PolicyModel, Rule, User, UserKind
from ubicore.security.policy import DEFAULT_USER, Right
from ubicore.security.primitives import KdfParams
from ubicore.store import Transaction

SCHEMA = "UPerm::Config"
MODULE, NAME = "UPerm", "Config"
FAKE_KEY_BYTES = 32
_NAME_RE = re.compile(r"[A-Za-z0-9_.@\[\]-]{1,64}")  # [ ] for Ubisense-style "[Automated]" users
_PART_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")

ADMIN_GROUP, EVERYONE_GROUP, SERVICES_GROUP = "admin", "everyone", "services"
ADMIN_USER = "administrator"


def check_name(what: str, name: str) -> str:
    if type(name) is not str or not _NAME_RE.fullmatch(name):
        raise BadArguments(f"{what} name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ - [ ]", {"argument": what})
    return name


def _check_part(what: str, value: str) -> str:
    if value != DEFAULT and not _PART_RE.fullmatch(value):
        raise BadArguments(f"{what} {value!r}: a name ([A-Za-z_][A-Za-z0-9_]*) or 'default'", {"argument": what})
    return value


MAX_DESCRIPTION = 200


def _description(text: str) -> str:
    if len(text) > MAX_DESCRIPTION or any(ch in text for ch in "\n\r\0"):
        raise BadArguments(f"a description is one line of at most {MAX_DESCRIPTION} characters",
                           {"argument": "description"})
    return text


def _right(value: str) -> Right:
    try:
        return Right[value.upper()]
    except (KeyError, AttributeError):
        raise BadArguments(f"right {value!r}: one of none, read, update", {"argument": "right"}) from None


def _params(t: int, p: int, m_kib: int) -> KdfParams:
    try:
        return KdfParams(t, p, m_kib).check()
    except ValueError as exc:
        raise BadArguments(f"Argon2id costs: {exc}", {"argument": "params"}) from None


class Config(Schema, name=SCHEMA, protection="full"):
    """The site's security model: users, groups, memberships, rules, schema levels."""

    site = Relation(
        Column("name", str),
        Column("kdf_t", int),
        Column("kdf_p", int),
        Column("kdf_m_kib", int),
        Column("fake_key", bytes),
        key=("name",),
        persistent=True,
    )
    users = Relation(
        Column("name", str),
        Column("kind", str, default=UserKind.PASSWORD),
        Column("enabled", bool, default=True),
        Column("salt", bytes, default=b""),
        Column("verifier", bytes, default=b""),
        Column("kdf_t", int, default=0),
        Column("kdf_p", int, default=0),
        Column("kdf_m_kib", int, default=0),
        Column("uid", int, nullable=True, default=None),
        Column("description", str, default=""),
        key=("name",),
        persistent=True,
    )
    groups = Relation(
        Column("name", str),
        Column("description", str, default=""),
        key=("name",),
        persistent=True,
    )
    implies = Relation(Column("group", str), Column("implied", str), key=("group", "implied"), persistent=True)
    members = Relation(
        Column("user", str), Column("group", str), Column("cell", str),
        key=("user", "group", "cell"), persistent=True,
    )
    rules = Relation(
        Column("group", str), Column("module", str), Column("schema", str), Column("right", str),
        key=("group", "module", "schema"), persistent=True,
    )
    schemas = Relation(
        Column("module", str), Column("schema", str), Column("level", str),
        key=("module", "schema"), persistent=True,
    )
    lockouts = Relation(
        Column("kind", str), Column("subject", str), Column("since", float), Column("until", float),
        Column("strikes", int, default=1),
        key=("kind", "subject"), persistent=True,
    )
    """Who may not log in until when (``user`` or client ``address``): written by the
    core's audit service when failed logins cross a threshold (DESIGN.md §8); an ended
    lockout stays while its strikes still count towards a longer next one."""

    # --- users ----------------------------------------------------------------------------------

    @update
    def add_user(
        self, tx: Transaction, name: str, kind: str = UserKind.PASSWORD, salt: bytes = b"", verifier: bytes = b"",
        t: int = 0, p: int = 0, m_kib: int = 0, uid: int | None = None, description: str = "",
        groups: list[str] | None = None,
    ) -> None:
        """Add a user (a verifier record for password and service users, a Unix uid for
        OS users), a member of ``groups`` at Site."""
        check_name("user", name)
        if tx.users.get(name) is not None:
            raise BadArguments(f"user {name!r} exists", {"argument": "name"})
        row = _user_values(tx, name, kind, salt, verifier, t, p, m_kib, uid)
        tx.users.insert(**row, description=_description(description))
        for g in groups or ():
            self.add_member(tx, name, g, SITE_CELL)

    @update
    def set_password(self, tx: Transaction, name: str, salt: bytes, verifier: bytes, t: int, p: int, m_kib: int) -> None:
        """Give a password or service user a new verifier record, with a new salt (a salt is
        never reused: cached credentials notice a new password by its new salt)."""
        row = _user(tx, name)
        if row.kind == UserKind.OS:
            raise BadArguments(f"{name} is an OS user and has no password", {"argument": "name"})
        if salt == row.salt:
            raise BadArguments("a new password needs a new salt (make the record with make_verifier)",
                               {"argument": "salt"})
        values = _user_values(tx, name, row.kind, salt, verifier, t, p, m_kib, None)
        tx.users.update(**values)

    @update
    def set_enabled(self, tx: Transaction, name: str, enabled: bool) -> None:
        """Enable or disable a user (a disabled user cannot log in; its sessions end)."""
        _user(tx, name)
        tx.users.update(name=name, enabled=enabled)
        _keep_an_administrator(tx, self.options)

    @update
    def describe_user(self, tx: Transaction, name: str, description: str) -> None:
        _user(tx, name)
        tx.users.update(name=name, description=_description(description))

    @update
    def remove_user(self, tx: Transaction, name: str) -> None:
        """Remove a user and its memberships (its sessions end)."""
        _user(tx, name)
        tx.users.delete(name)
        for m in [m for m in tx.members if m.user == name]:
            tx.members.delete(*m)
        _keep_an_administrator(tx, self.options)

    # --- groups ---------------------------------------------------------------------------------

    @update
    def add_group(self, tx: Transaction, name: str, description: str = "") -> None:
        """Add a group; ``description`` is how the login prompt names it ("an administrator")."""
        check_name("group", name)
        if tx.groups.get(name) is not None:
            raise BadArguments(f"group {name!r} exists", {"argument": "name"})
        tx.groups.insert(name=name, description=_description(description))

    @update
    def describe_group(self, tx: Transaction, name: str, description: str) -> None:
        _group(tx, name)
        tx.groups.update(name=name, description=_description(description))

    @update
    def remove_group(self, tx: Transaction, name: str) -> None:
        """Remove a group with its memberships, rules and implications."""
        _group(tx, name)
        tx.groups.delete(name)
        for rel, test in (("members", lambda r: r.group == name), ("rules", lambda r: r.group == name),
                          ("implies", lambda r: name in (r.group, r.implied))):
            for row in [r for r in tx[rel] if test(r)]:
                tx[rel].delete(*(getattr(row, k) for k in self.relations[rel].key))
        _keep_an_administrator(tx, self.options)

    @update
    def imply(self, tx: Transaction, group: str, implied: str) -> None:
        """Members of ``group`` are members of ``implied`` too (transitively)."""
        _group(tx, group)
        _group(tx, implied)
        if group == implied:
            raise BadArguments("a group implies itself already", {"argument": "implied"})
        tx.implies.upsert(group=group, implied=implied)

    @update
    def unimply(self, tx: Transaction, group: str, implied: str) -> None:
        if tx.implies.delete(group, implied) is None:
            raise NotFound(f"{group} does not imply {implied}")
        _keep_an_administrator(tx, self.options)

    # --- memberships ----------------------------------------------------------------------------

    @update
    def add_member(self, tx: Transaction, user: str, group: str, cell: str = SITE_CELL) -> None:
        """``user`` is in ``group`` at ``cell`` and every cell below it."""
        _user(tx, user)
        _group(tx, group)
        _check_cell(self.options, cell)
        tx.members.upsert(user=user, group=group, cell=cell)

    @update
    def remove_member(self, tx: Transaction, user: str, group: str, cell: str = SITE_CELL) -> None:
        if tx.members.delete(user, group, cell) is None:
            raise NotFound(f"{user} is not a member of {group} at {cell}")
        _keep_an_administrator(tx, self.options)

    # --- rules and levels -----------------------------------------------------------------------

    @update
    def set_rule(self, tx: Transaction, group: str, module: str, schema: str, right: str) -> dict[str, Any]:
        """Give ``group`` a right (none, read, update) on module::schema (either may be
        ``default``). A rule (default, S) is never consulted: ``ignored`` says so."""
        _group(tx, group)
        _check_part("module", module)
        _check_part("schema", schema)
        r = _right(right)
        tx.rules.upsert(group=group, module=module, schema=schema, right=r.label)
        _keep_an_administrator(tx, self.options)
        return {"ignored": module == DEFAULT and schema != DEFAULT}

    @update
    def remove_rule(self, tx: Transaction, group: str, module: str, schema: str) -> None:
        if tx.rules.delete(group, module, schema) is None:
            raise NotFound(f"no rule ({group}, {module}, {schema})")
        _keep_an_administrator(tx, self.options)

    @update
    def set_level(self, tx: Transaction, module: str, schema: str, level: str) -> None:
        """Run module::schema at ``level`` (open, update, full), wherever it is deployed."""
        _check_part("module", module)
        _check_part("schema", schema)
        if DEFAULT in (module, schema):
            raise BadArguments("a level is set for one schema, not a wildcard", {"argument": "schema"})
        if (module, schema) == (MODULE, NAME) or module in ("UNaming", "UAudit"):
            raise BadArguments(f"the level of {module}::{schema} is fixed", {"argument": "schema"})
        try:
            Protection(level)
        except ValueError:
            raise BadArguments(f"level {level!r}: one of open, update, full", {"argument": "level"}) from None
        tx.schemas.upsert(module=module, schema=schema, level=level)

    @update
    def clear_lockout(self, tx: Transaction, kind: str, subject: str) -> bool:
        """End the lockout of a user (``kind`` user) or client address (``address``) now,
        and forget its strikes. False if there was none."""
        if kind not in ("user", "address"):
            raise BadArguments(f"kind {kind!r}: one of user, address", {"argument": "kind"})
        return tx.lockouts.delete(kind, subject) is not None

    @update
    def clear_level(self, tx: Transaction, module: str, schema: str) -> None:
        """Back to the level the site file or the schema declares."""
        if tx.schemas.delete(module, schema) is None:
            raise NotFound(f"no level is set for {module}::{schema}")

    # --- reading --------------------------------------------------------------------------------

    @read
    def explain(self, tx: Transaction, user: str, schema: str, cell: str = SITE_CELL, right: str = "read") -> dict[str, Any]:
        """May ``user`` have ``right`` on ``schema`` (Module::Schema) at ``cell``, and why."""
        need = _right(right)
        _check_cell(self.options, cell)
        try:
            return build_model(lambda rel: tx[rel], _parents(self.options)).model.explain(user, schema, cell, need).as_dict()
        except ValueError as exc:
            raise BadArguments(str(exc), {"argument": "schema"}) from None

    @read
    def settings(self, tx: Transaction) -> dict[str, Any]:
        """The site name and the Argon2id costs new verifiers are made with."""
        row = next(iter(tx.site), None)
        if row is None:
            raise NotFound("the site is not initialised")
        return {"site": row.name, "kdf": {"t": row.kdf_t, "p": row.kdf_p, "m_kib": row.kdf_m_kib}}


# --- helpers of the operations ------------------------------------------------------------------


def _user(tx: Transaction, name: str) -> Any:
    row = tx.users.get(name)
    if row is None:
        raise NotFound(f"no user {name!r}")
    return row


def _group(tx: Transaction, name: str) -> Any:
    row = tx.groups.get(name)
    if row is None:
        raise NotFound(f"no group {name!r}")
    return row


def _parents(options: Mapping[str, Any]) -> dict[str, str | None] | None:
    cells = options.get("cells")
    return dict(cells) if isinstance(cells, Mapping) else None


def _check_cell(options: Mapping[str, Any], cell: str) -> None:
    parents = _parents(options)
    if parents is not None and cell not in parents:
        raise NotFound(f"no cell {cell!r} in this site", {"argument": "cell"})


def _user_values(
    tx: Transaction, name: str, kind: str, salt: bytes, verifier: bytes, t: int, p: int, m_kib: int, uid: int | None
) -> dict[str, Any]:
    if kind not in UserKind.ALL:
        raise BadArguments(f"kind {kind!r}: one of password, service, os", {"argument": "kind"})
    if kind == UserKind.OS:
        if uid is None:
            raise BadArguments("an OS user needs its Unix uid", {"argument": "uid"})
        if not 0 <= uid < 2**32:
            raise BadArguments(f"uid {uid} is out of range (0 to 4294967295)", {"argument": "uid"})
        if name == DEFAULT_USER:
            raise BadArguments("default is not an OS user", {"argument": "name"})
        for other in tx.users:
            if other.kind == UserKind.OS and other.uid == uid and other.name != name:
                raise BadArguments(f"uid {uid} is already the OS user {other.name}", {"argument": "uid"})
        return {"name": name, "kind": kind, "uid": uid, "salt": b"", "verifier": b"",
                "kdf_t": 0, "kdf_p": 0, "kdf_m_kib": 0}
    if uid is not None:
        raise BadArguments("only OS users have a uid", {"argument": "uid"})
    if len(salt) < 16 or len(verifier) != 32:
        raise BadArguments("a verifier record needs a salt of 16+ bytes and a 32-byte verifier",
                           {"argument": "verifier"})
    _params(t, p, m_kib)
    return {"name": name, "kind": kind, "uid": None, "salt": salt, "verifier": verifier,
            "kdf_t": t, "kdf_p": p, "kdf_m_kib": m_kib}


def _keep_an_administrator(tx: Transaction, options: Mapping[str, Any]) -> None:
    """Refuse a change after which no enabled password user may update the policy."""
    model = build_model(lambda rel: tx[rel], _parents(options)).model
    for u in model.users.values():
        if u.enabled and u.kind == UserKind.PASSWORD and model.right(u.name, SCHEMA, SITE_CELL) >= Right.UPDATE:
            return
    raise BadArguments(
        "refused: after this change nobody could change the security model "
        f"(no enabled password user would have update on {SCHEMA} at {SITE_CELL})",
        {"argument": "policy"},
    )


# --- the model, from rows -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Built:
    """A policy model with the site settings that came with it."""

    model: PolicyModel
    site: str
    kdf: KdfParams | None
    fake_key: bytes


def build_model(rows: Callable[[str], Iterable[Any]], parents: Mapping[str, str | None] | None = None) -> Built:
    """A :class:`PolicyModel` from ``UPerm::Config`` rows (a transaction's, a cache's)."""
    users = []
    for u in rows("users"):
        record = None
        if u.kind != UserKind.OS and u.verifier:
            try:
                record = VerifierRecord(u.name, u.salt, KdfParams(u.kdf_t, u.kdf_p, u.kdf_m_kib).check(), u.verifier)
            except ValueError:
                record = None  # a record that cannot be used is no record: the user cannot log in
        users.append(User(u.name, u.kind, u.enabled, record, u.uid, u.description))
    implies: dict[str, set[str]] = {}
    for i in rows("implies"):
        implies.setdefault(i.group, set()).add(i.implied)
    groups = [Group(g.name, g.description, frozenset(implies.get(g.name, ()))) for g in rows("groups")]
    members = [Membership(m.user, m.group, m.cell) for m in rows("members")]
    rules = []
    for r in rows("rules"):
        try:
            rules.append(Rule(r.group, r.module, r.schema, Right[r.right.upper()]))
        except KeyError:
            continue
    levels = {}
    for s in rows("schemas"):
        try:
            levels[f"{s.module}::{s.schema}"] = Protection(s.level)
        except ValueError:
            continue
    lockouts = {(lk.kind, lk.subject): lk.until for lk in rows("lockouts")}
    site = next(iter(rows("site")), None)
    kdf = None
    if site is not None:
        try:
            kdf = KdfParams(site.kdf_t, site.kdf_p, site.kdf_m_kib).check()
        except ValueError:
            kdf = None
    model = PolicyModel(users=users, groups=groups, members=members, rules=rules, levels=levels, parents=parents,
                        lockouts=lockouts)
    return Built(model, site.name if site is not None else "", kdf, site.fake_key if site is not None else b"")


SERVICE_RULES = (
    (SERVICES_GROUP, MODULE, NAME, Right.READ),  # instances follow the policy
    (SERVICES_GROUP, "UNaming", "Registry", Right.UPDATE),  # and register with naming
    (ADMIN_GROUP, "UAudit", DEFAULT, Right.READ),  # (default, default) never reaches UAudit either
    (SERVICES_GROUP, "UAudit", "Log", Right.UPDATE),  # every process appends to the trail
)
"""The factory rules the site's own processes need (added to the factory policy by
issues 5 and 6: a site initialised before lacks some; :func:`add_missing_service_rules`)."""


def add_missing_service_rules(tx: Transaction) -> list[tuple[str, str, str, str]]:
    """Add each of :data:`SERVICE_RULES` whose (group, module, schema) has no rule yet and
    whose group exists: the rules added. A rule an operator set is never changed."""
    added = []
    for group, module, schema, right in SERVICE_RULES:
        if tx.groups.get(group) is not None and tx.rules.get(group, module, schema) is None:
            tx.rules.insert(group=group, module=module, schema=schema, right=right.label)
            added.append((group, module, schema, right.label))
    return added


def write_factory_policy(
    tx: Transaction, site: str, kdf: KdfParams, admin: VerifierRecord, default: VerifierRecord,
    os_user: tuple[str, int] | None = None,
) -> None:
    """A new site's policy: the administrator (the sole member of ``admin``) updates,
    everyone reads, nobody but administrators and site services reads the policy itself
    (a (default, default) rule never reaches UPerm: ubicore/security/model.py)."""
    tx.site.insert(name=site, kdf_t=kdf.t, kdf_p=kdf.p, kdf_m_kib=kdf.m_kib, fake_key=os.urandom(FAKE_KEY_BYTES))
    for name, description in ((ADMIN_GROUP, "an administrator"), (EVERYONE_GROUP, "any user"),
                              (SERVICES_GROUP, "a site service")):
        tx.groups.insert(name=name, description=description)
    for rec, groups, description in ((admin, (ADMIN_GROUP, EVERYONE_GROUP), "the site's first administrator"),
                                     (default, (EVERYONE_GROUP,), "anyone who does not log in")):
        tx.users.insert(name=rec.user, kind=UserKind.PASSWORD, salt=rec.salt, verifier=rec.verifier,
                        kdf_t=rec.params.t, kdf_p=rec.params.p, kdf_m_kib=rec.params.m_kib, description=description)
        for g in groups:
            tx.members.insert(user=rec.user, group=g, cell=SITE_CELL)
    if os_user is not None:
        name, uid = os_user
        tx.users.insert(name=name, kind=UserKind.OS, uid=uid, description="the account the site's services run as")
        tx.members.insert(user=name, group=SERVICES_GROUP, cell=SITE_CELL)
    for group, module, schema, right in (
        (ADMIN_GROUP, DEFAULT, DEFAULT, Right.UPDATE),
        (ADMIN_GROUP, MODULE, DEFAULT, Right.UPDATE),  # (default, default) never reaches UPerm
        (EVERYONE_GROUP, DEFAULT, DEFAULT, Right.READ),
        *SERVICE_RULES,
    ):
        tx.rules.insert(group=group, module=module, schema=schema, right=right.label)
