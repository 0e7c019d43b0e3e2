"""``ubi security``: the site's security model (``UPerm::Config``), edited over the wire.

Every command is a client of the running core: it logs in like ``ubi call`` (``--user``
/ $UBI_USER with $UBI_PASSWORD or a prompt; in a terminal, a denied command asks for
credentials) and calls ``UPerm::Config`` at ``Site``. Listings read a live copy of its
relations (which takes the read right on ``UPerm::Config``: administrators and site
services have it); changes are its update operations, which check their arguments and
refuse a change that would leave nobody able to change the policy again.

New passwords never leave this process: the command fetches the site's Argon2id costs,
makes the verifier record here (ubicore.security.amp.make_verifier) and sends only the
salt, the verifier and the costs.

Every listing has ``--json`` (a list of objects with stable keys). Errors are one line,
``ubi: <code>: <message>``, and a non-zero exit; ``explain`` exits 3 for "denied".
"""

from __future__ import annotations

import asyncio
import pwd
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NoReturn, TypeVar

import click

from ubicore.client import Client
from ubicore.errors import UbiError
from ubicore.schema import Protection
from ubicore.security.amp import make_verifier
from ubicore.security.model import DEFAULT, SITE_CELL, UserKind
from ubicore.security.policy import DEFAULT_USER
from ubicore.security.primitives import KdfParams

from . import format as fmt
from .passwords import new_password, show_generated

T = TypeVar("T")
PERM = "UPerm::Config"
RIGHTS = ["none", "read", "update"]
LEVELS = [p.value for p in Protection]
KINDS = sorted(UserKind.ALL)
EXIT_DENIED = 3
"""``ubi security explain`` exits with this when the user may not."""


def _fail(message: str) -> NoReturn:
    click.echo(f"ubi: {message}", err=True)
    sys.exit(1)


# --- talking to UPerm::Config -------------------------------------------------------------------


def _session(ctx: click.Context, body: Callable[[Client], Awaitable[T]]) -> T:
    """Run ``body`` with a client of the site (``_run`` says who would be allowed on a denial)."""
    from .cli import _run, _site, credential_provider, credentials

    site = _site(ctx)
    creds = credentials(ctx)  # any prompt for the password comes before the loop starts
    provider = credential_provider(*ctx.ensure_object(dict).get("login", (False, None)))

    async def main() -> T:
        async with Client.for_site(site, credentials=creds, credential_provider=provider) as client:
            return await body(client)

    return _run(main)


async def _call(client: Client, operation: str, **args: Any) -> Any:
    return await client.call_args(SITE_CELL, PERM, operation, args)


async def _rows(client: Client, *relations: str) -> dict[str, list[Any]]:
    """The current rows of ``relations`` of ``UPerm::Config``, sorted."""
    cache = await client.cache(SITE_CELL, PERM)
    try:
        return {rel: sorted(cache.rows(rel)) for rel in relations}
    finally:
        await cache.close()


def _read(ctx: click.Context, *relations: str) -> dict[str, list[Any]]:
    async def body(client: Client) -> dict[str, list[Any]]:
        return await _rows(client, *relations)

    return _session(ctx, body)


def _update(ctx: click.Context, operation: str, done: str, **args: Any) -> Any:
    """Run one update operation of ``UPerm::Config``; print ``done``; its result."""
    async def body(client: Client) -> Any:
        return await _call(client, operation, **args)

    result = _session(ctx, body)
    click.echo(done)
    return result


def _show(rows: list[dict[str, Any]], columns: Mapping[str, Callable[[dict[str, Any]], Any]], as_json: bool) -> None:
    """A listing: JSON objects with stable keys, or a table of ``columns``."""
    if as_json:
        click.echo(fmt.to_json(rows))
    else:
        click.echo(fmt.table(list(columns), [[f(r) for f in columns.values()] for r in rows]))


json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON (a list of objects, stable keys).")


# --- new passwords --------------------------------------------------------------------------------


async def _verifier_args(client: Client, name: str, password: Callable[[], str]) -> dict[str, Any]:
    """salt, verifier and costs of a new record for ``name`` (made here; the password
    is not sent). Asks for the password after the site allowed reading its settings."""
    settings = await _call(client, "settings")
    kdf = KdfParams(**settings["kdf"])
    secret = await asyncio.to_thread(password)
    try:
        rec = await asyncio.to_thread(make_verifier, name, settings["site"], secret, kdf)
    except ValueError as exc:
        raise UbiError(str(exc)) from None
    return {"salt": rec.salt, "verifier": rec.verifier, "t": kdf.t, "p": kdf.p, "m_kib": kdf.m_kib}


# --- the command group ------------------------------------------------------------------------------


@click.group()
@click.option("--no-prompt", is_flag=True, help="When denied, fail at once instead of asking on the terminal.")
@click.option("--credentials-file", type=click.Path(dir_okay=False), default=None,
              help="When denied, log in with the user and password of this YAML file (mode 0600).")
@click.pass_context
def security(ctx: click.Context, no_prompt: bool, credentials_file: str | None) -> None:
    """Users, groups, memberships, rules and schema levels of the running site
    (UPerm::Config). Log in as an administrator: --user NAME (or $UBI_USER) with
    $UBI_PASSWORD or a prompt; in a terminal, a denied command asks who you are."""
    ctx.ensure_object(dict)["login"] = (no_prompt, credentials_file)


# --- users ------------------------------------------------------------------------------------------


@security.group()
def users() -> None:
    """Who may log in: password users, service users and OS users (by Unix uid)."""


def _user_rows(got: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    member_of: dict[str, list[dict[str, str]]] = {}
    for m in got["members"]:
        member_of.setdefault(m.user, []).append({"group": m.group, "cell": m.cell})
    return [
        {"name": u.name, "kind": u.kind, "enabled": u.enabled, "uid": u.uid, "description": u.description,
         "groups": member_of.get(u.name, []),
         "kdf": None if u.kind == UserKind.OS else {"t": u.kdf_t, "p": u.kdf_p, "m_kib": u.kdf_m_kib}}
        for u in got["users"]
    ]


def _memberships(groups: list[dict[str, str]]) -> str:
    return ", ".join(g["group"] if g["cell"] == SITE_CELL else f"{g['group']}@{g['cell']}" for g in groups)


@users.command("list")
@json_option
@click.pass_context
def users_list(ctx: click.Context, as_json: bool) -> None:
    """The users: kind, whether they may log in, their groups (group@cell below Site)."""
    rows = _user_rows(_read(ctx, "users", "members"))
    _show(rows, {
        "user": lambda r: r["name"], "kind": lambda r: r["kind"], "enabled": lambda r: "yes" if r["enabled"] else "no",
        "uid": lambda r: r["uid"], "groups": lambda r: _memberships(r["groups"]),
        "description": lambda r: r["description"],
    }, as_json)


@users.command("add")
@click.argument("name")
@click.option("--kind", type=click.Choice(KINDS), default=None,
              help="password (default), service (a program's account) or os (a local Unix account).")
@click.option("--uid", type=int, default=None, help="The Unix uid of an OS user.")
@click.option("--os-account", default=None, metavar="LOGIN", help="An OS user's Unix account (its uid is looked up).")
@click.option("--group", "groups", multiple=True, default=("everyone",), show_default=True,
              help="A group the user joins at Site (repeat for more).")
@click.option("--description", default="", help="Who the user is.")
@click.option("--generate-password", is_flag=True, help="Generate the password and show it once.")
@click.pass_context
def users_add(ctx: click.Context, name: str, kind: str | None, uid: int | None, os_account: str | None,
              groups: tuple[str, ...], description: str, generate_password: bool) -> None:
    """Add a user. A password or service user's password comes from $UBI_NEW_PASSWORD,
    --generate-password or a hidden prompt (twice); an OS user needs --uid or --os-account."""
    if kind is None:
        kind = UserKind.OS if uid is not None or os_account is not None else UserKind.PASSWORD
    if kind == UserKind.OS:
        if os_account is not None:
            try:
                found = pwd.getpwnam(os_account).pw_uid
            except KeyError:
                _fail(f"no Unix account {os_account!r} on this host")
            if uid is not None and uid != found:
                _fail(f"--uid {uid} is not the uid of {os_account} ({found})")
            uid = found
        if uid is None:
            _fail("an OS user needs --uid N or --os-account LOGIN")
        if generate_password:
            _fail("an OS user has no password")
    elif uid is not None or os_account is not None:
        _fail(f"--uid and --os-account are for OS users, not {kind} users")
    source: tuple[Callable[[], str], bool] | None = None
    if kind != UserKind.OS:
        source = (lambda: "", False) if name == DEFAULT_USER else new_password(name, generate_password)

    async def body(client: Client) -> None:
        args: dict[str, Any] = {"name": name, "kind": kind, "description": description, "groups": list(groups)}
        if source is None:
            args["uid"] = uid
        else:
            args.update(await _verifier_args(client, name, source[0]))
        await _call(client, "add_user", **args)

    _session(ctx, body)
    click.echo(f"added {name} ({kind}" + (f", uid {uid}" if kind == UserKind.OS else "")
               + (f"; {', '.join(groups)} at Site)" if groups else ")"))
    if source is not None and source[1]:
        show_generated(name, source[0]())


@users.command("passwd")
@click.argument("name")
@click.option("--generate-password", is_flag=True, help="Generate the password and show it once.")
@click.pass_context
def users_passwd(ctx: click.Context, name: str, generate_password: bool) -> None:
    """Give a password or service user a new password (a new salt and verifier; the
    old password stops working)."""
    source = new_password(name, generate_password)

    async def body(client: Client) -> None:
        await _call(client, "set_password", name=name, **await _verifier_args(client, name, source[0]))

    _session(ctx, body)
    click.echo(f"password of {name} changed")
    if source[1]:
        show_generated(name, source[0]())


@users.command("enable")
@click.argument("name")
@click.pass_context
def users_enable(ctx: click.Context, name: str) -> None:
    """Let a disabled user log in again."""
    _update(ctx, "set_enabled", f"{name} enabled", name=name, enabled=True)


@users.command("disable")
@click.argument("name")
@click.pass_context
def users_disable(ctx: click.Context, name: str) -> None:
    """Refuse a user's logins and end its sessions."""
    _update(ctx, "set_enabled", f"{name} disabled", name=name, enabled=False)


@users.command("describe")
@click.argument("name")
@click.argument("description")
@click.pass_context
def users_describe(ctx: click.Context, name: str, description: str) -> None:
    """Set a user's description."""
    _update(ctx, "describe_user", f"{name}: description set", name=name, description=description)


@users.command("remove")
@click.argument("name")
@click.pass_context
def users_remove(ctx: click.Context, name: str) -> None:
    """Remove a user and its memberships (removing default turns anonymous access off)."""
    _update(ctx, "remove_user", f"removed {name}", name=name)


# --- groups -----------------------------------------------------------------------------------------


@security.group()
def groups() -> None:
    """Groups: what rules are given to, and how the login prompt names who may act."""


@groups.command("list")
@json_option
@click.pass_context
def groups_list(ctx: click.Context, as_json: bool) -> None:
    """The groups, their descriptions, the groups each implies and its members."""
    got = _read(ctx, "groups", "implies", "members")
    rows = [
        {"name": g.name, "description": g.description,
         "implies": [i.implied for i in got["implies"] if i.group == g.name],
         "members": [{"user": m.user, "cell": m.cell} for m in got["members"] if m.group == g.name]}
        for g in got["groups"]
    ]
    _show(rows, {
        "group": lambda r: r["name"], "description": lambda r: r["description"],
        "implies": lambda r: ", ".join(r["implies"]),
        "members": lambda r: ", ".join(m["user"] if m["cell"] == SITE_CELL else f"{m['user']}@{m['cell']}"
                                       for m in r["members"]),
    }, as_json)


@groups.command("add")
@click.argument("name")
@click.option("--description", default="", help='How the login prompt names a member: "a power user".')
@click.pass_context
def groups_add(ctx: click.Context, name: str, description: str) -> None:
    """Add a group."""
    _update(ctx, "add_group", f"added group {name}", name=name, description=description)


@groups.command("describe")
@click.argument("name")
@click.argument("description")
@click.pass_context
def groups_describe(ctx: click.Context, name: str, description: str) -> None:
    """Set how the login prompt names a member of the group ("an administrator")."""
    _update(ctx, "describe_group", f"{name}: description set", name=name, description=description)


@groups.command("remove")
@click.argument("name")
@click.pass_context
def groups_remove(ctx: click.Context, name: str) -> None:
    """Remove a group with its memberships, rules and implications."""
    _update(ctx, "remove_group", f"removed group {name}", name=name)


@groups.command("imply")
@click.argument("group")
@click.argument("implied")
@click.option("--remove", is_flag=True, help="Drop the implication instead.")
@click.pass_context
def groups_imply(ctx: click.Context, group: str, implied: str, remove: bool) -> None:
    """Members of GROUP are members of IMPLIED too (transitively)."""
    if remove:
        _update(ctx, "unimply", f"{group} no longer implies {implied}", group=group, implied=implied)
    else:
        _update(ctx, "imply", f"{group} implies {implied}", group=group, implied=implied)


# --- memberships ------------------------------------------------------------------------------------


@security.group()
def members() -> None:
    """Memberships: a user is in a group at a cell and every cell below it."""


@members.command("list")
@click.option("--user", "user", default=None, help="Only this user's memberships.")
@click.option("--group", "group", default=None, help="Only this group's memberships.")
@json_option
@click.pass_context
def members_list(ctx: click.Context, user: str | None, group: str | None, as_json: bool) -> None:
    """The memberships (user, group, cell)."""
    rows = [{"user": m.user, "group": m.group, "cell": m.cell} for m in _read(ctx, "members")["members"]
            if user in (None, m.user) and group in (None, m.group)]
    _show(rows, {"user": lambda r: r["user"], "group": lambda r: r["group"], "cell": lambda r: r["cell"]}, as_json)


@members.command("add")
@click.argument("user")
@click.argument("group")
@click.option("--cell", default=SITE_CELL, show_default=True, help="The membership covers this cell and below.")
@click.pass_context
def members_add(ctx: click.Context, user: str, group: str, cell: str) -> None:
    """Put USER in GROUP at CELL."""
    _update(ctx, "add_member", f"{user} is in {group} at {cell}", user=user, group=group, cell=cell)


@members.command("remove")
@click.argument("user")
@click.argument("group")
@click.option("--cell", default=SITE_CELL, show_default=True)
@click.pass_context
def members_remove(ctx: click.Context, user: str, group: str, cell: str) -> None:
    """Take USER out of GROUP at CELL."""
    _update(ctx, "remove_member", f"{user} is no longer in {group} at {cell}", user=user, group=group, cell=cell)


# --- rules ------------------------------------------------------------------------------------------


@security.group()
def rules() -> None:
    """Rules: a group's right (none, read, update) on MODULE SCHEMA; either may be
    'default'. The most specific rule decides: (M, S), else (M, default), else
    (default, default)."""


def _ignored(module: str, schema: str) -> bool:
    return module == DEFAULT and schema != DEFAULT


def _ignored_warning(schema: str) -> str:
    return (f"ubi: warning: a rule (default, {schema}) is never consulted; "
            f"use MODULE::{schema} or (default, default)")


@rules.command("list")
@json_option
@click.pass_context
def rules_list(ctx: click.Context, as_json: bool) -> None:
    """The rules; a rule (default, S) is shown as never consulted."""
    rows = [{"group": r.group, "module": r.module, "schema": r.schema, "right": r.right,
             "ignored": _ignored(r.module, r.schema)} for r in _read(ctx, "rules")["rules"]]
    _show(rows, {
        "group": lambda r: r["group"], "module": lambda r: r["module"], "schema": lambda r: r["schema"],
        "right": lambda r: r["right"], "note": lambda r: "never consulted" if r["ignored"] else "",
    }, as_json)


@rules.command("set")
@click.argument("group")
@click.argument("module")
@click.argument("schema")
@click.argument("right", type=click.Choice(RIGHTS))
@click.pass_context
def rules_set(ctx: click.Context, group: str, module: str, schema: str, right: str) -> None:
    """Give GROUP the RIGHT on MODULE::SCHEMA ('default' for any)."""
    result = _update(ctx, "set_rule", f"{group}: {right} on {module}::{schema}",
                     group=group, module=module, schema=schema, right=right)
    if isinstance(result, Mapping) and result.get("ignored"):
        click.echo(_ignored_warning(schema), err=True)


@rules.command("remove")
@click.argument("group")
@click.argument("module")
@click.argument("schema")
@click.pass_context
def rules_remove(ctx: click.Context, group: str, module: str, schema: str) -> None:
    """Remove the rule (GROUP, MODULE, SCHEMA)."""
    _update(ctx, "remove_rule", f"removed the rule ({group}, {module}, {schema})",
            group=group, module=module, schema=schema)


# --- schema levels ----------------------------------------------------------------------------------


@security.group()
def schema() -> None:
    """Protection levels: set here, they override the site file and the declared default;
    running instances move to a new level without a restart."""


@schema.command("set")
@click.argument("module")
@click.argument("schema_name", metavar="SCHEMA")
@click.argument("level", type=click.Choice(LEVELS))
@click.pass_context
def schema_set(ctx: click.Context, module: str, schema_name: str, level: str) -> None:
    """Run MODULE::SCHEMA at LEVEL (open, update, full) wherever it is deployed."""
    from .cli import _site

    name = f"{module}::{schema_name}"
    _update(ctx, "set_level", f"{name} is now {level}", module=module, schema=schema_name, level=level)
    if name not in {d.schema for d in _site(ctx).deployments}:
        click.echo(f"ubi: warning: the site file deploys no {name} (misspelt?)", err=True)


@schema.command("clear")
@click.argument("module")
@click.argument("schema_name", metavar="SCHEMA")
@click.pass_context
def schema_clear(ctx: click.Context, module: str, schema_name: str) -> None:
    """Drop the level set for MODULE::SCHEMA: the site file's or the declared one applies."""
    _update(ctx, "clear_level", f"{module}::{schema_name}: level cleared", module=module, schema=schema_name)


def _declared(site: Any, name: str) -> str | None:
    from ubicore.runtime import load_schemas
    from ubicore.schema import registered_schemas

    try:
        load_schemas(site)
    except UbiError:
        return None
    cls = registered_schemas().get(name)
    return None if cls is None else cls.default_protection.value


@schema.command("list")
@json_option
@click.pass_context
def schema_list(ctx: click.Context, as_json: bool) -> None:
    """Each deployed schema's effective level and where it comes from (set here, the
    site file, the schema's declared default), and every level set here."""
    from .cli import _site

    site = _site(ctx)
    levels = {f"{s.module}::{s.schema}": s.level for s in _read(ctx, "schemas")["schemas"]}
    file_levels: dict[str, set[str | None]] = {}
    cells: dict[tuple[str, str | None], list[str]] = {}  # the table's "cells" column
    for plan in site.instances:
        file_levels.setdefault(plan.schema, set()).add(plan.protection)
        cells.setdefault((plan.schema, plan.protection), []).append(plan.cell)
    rows = []
    for name in sorted(set(file_levels) | set(levels)):
        declared = _declared(site, name)
        for in_file in sorted(file_levels.get(name, {None}), key=lambda v: v or ""):
            if name in levels:
                effective, source = levels[name], "set"
            elif in_file is not None:
                effective, source = in_file, "site file"
            else:
                effective, source = declared, "declared"
            rows.append({"schema": name, "level": effective, "source": source, "set": levels.get(name),
                         "site_file": in_file, "declared": declared, "deployed": name in file_levels})
    _show(rows, {
        "schema": lambda r: r["schema"], "level": lambda r: r["level"] or "?", "source": lambda r: r["source"],
        "set": lambda r: r["set"], "site file": lambda r: r["site_file"], "declared": lambda r: r["declared"],
        "deployed": lambda r: "yes" if r["deployed"] else "no",
        "cells": lambda r: ", ".join(sorted(cells.get((r["schema"], r["site_file"]), []))),
    }, as_json)


# --- explain ----------------------------------------------------------------------------------------


def explanation_text(e: Mapping[str, Any]) -> str:
    """``explain``'s answer for people: the verdict, then what decided it."""
    verb = "may" if e["allowed"] else "may not"
    lines = [f"{'allowed' if e['allowed'] else 'denied'}: {e['user']} {verb} {e['need']} {e['schema']} at {e['cell']}",
             f"right:      {e['right']} ({e['need']} needed)"]
    m = e.get("membership")
    if m:
        lines.append(f"membership: {m['user']} in {m['group']} at {m['cell']}")
    if e.get("path"):
        lines.append(f"path:       {' → '.join(e['path'])}")
    r = e.get("rule")
    if r:
        lines.append(f"rule:       ({r['group']}, {r['module']}, {r['schema']}, {r['right']})")
    else:
        lines.append(f"reason:     {e['reason']}")
    return "\n".join(lines)


@security.command("explain", epilog="Exit status: 0 allowed, 3 denied, 1 the question could not be answered.")
@click.argument("user")
@click.argument("schema_name", metavar="MODULE::SCHEMA")
@click.option("--cell", default=SITE_CELL, show_default=True)
@click.option("--right", type=click.Choice(["read", "update"]), default="read", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print JSON (one object).")
@click.pass_context
def explain(ctx: click.Context, user: str, schema_name: str, cell: str, right: str, as_json: bool) -> None:
    """May USER have RIGHT on MODULE::SCHEMA at CELL, and why: the membership, the
    implication path and the rule that decided. Exits 0 if allowed, 3 if denied."""
    async def body(client: Client) -> dict[str, Any]:
        got: dict[str, Any] = await _call(client, "explain", user=user, schema=schema_name, cell=cell, right=right)
        return got

    answer = _session(ctx, body)
    click.echo(fmt.to_json(answer) if as_json else explanation_text(answer))
    if not answer["allowed"]:
        sys.exit(EXIT_DENIED)


# --- lockouts ----------------------------------------------------------------------------------------


@security.group(invoke_without_command=True)
@json_option
@click.pass_context
def lockouts(ctx: click.Context, as_json: bool) -> None:
    """Users and client addresses that failed to log in too often (the site file's
    audit thresholds) and may not log in until their back-off passes. Without a
    sub-command: list them, the ones in force first."""
    if ctx.invoked_subcommand is not None:
        return
    now = time.time()
    rows = [{"kind": lk.kind, "subject": lk.subject, "since": lk.since, "until": lk.until, "strikes": lk.strikes,
             "locked": lk.until > now} for lk in _read(ctx, "lockouts")["lockouts"]]
    rows.sort(key=lambda r: (not r["locked"], r["kind"], r["subject"]))

    def state(r: dict[str, Any]) -> str:
        if r["locked"]:
            return f"locked, {r['until'] - now:.0f} s left"
        return "ended (its strikes still count)"

    _show(rows, {"kind": lambda r: r["kind"], "subject": lambda r: r["subject"], "state": state,
                 "since": lambda r: fmt.when(r["since"]), "strikes": lambda r: r["strikes"]}, as_json)


@lockouts.command("clear")
@click.option("--user", "user", default=None, help="The user to let log in again.")
@click.option("--address", default=None, help="The client address to let log in again.")
@click.pass_context
def lockouts_clear(ctx: click.Context, user: str | None, address: str | None) -> None:
    """End a lockout now and forget its strikes (give --user or --address)."""
    if (user is None) == (address is None):
        _fail("give exactly one of --user NAME or --address ADDRESS")
    kind, subject = ("user", user) if user is not None else ("address", address)
    assert subject is not None
    async def body(client: Client) -> Any:
        return await _call(client, "clear_lockout", kind=kind, subject=subject)

    cleared = _session(ctx, body)
    click.echo(f"lockout of {kind} {subject} cleared" if cleared else f"{kind} {subject} is not locked out")


def register(cli: click.Group) -> None:
    cli.add_command(security)
