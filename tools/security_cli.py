"""``ubi security``: the interim security store of a site (users, rights, schema levels).

The store lives in the site's dataset (``<dataset>/security/policy.json``); instances
re-read it within a quarter of a second of a change, so a new user can log in, a removed
one is cut off, and a schema moves to another level without a restart. The security-model
issue replaces the store with ``UPerm::Config``; these commands keep their shape.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
from collections.abc import Callable
from typing import Any

import click

from ubicore.errors import UbiError
from ubicore.schema import Protection
from ubicore.security.policy import (
    DEFAULT_USER,
    FileSecurityStore,
    Right,
    check_user_name,
)
from ubicore.security.primitives import KdfParams

from . import format as fmt

RIGHTS = [r.label for r in Right]
NAMING = "UNaming::Registry"
LEVELS = [p.value for p in Protection]


def _fail(message: str) -> None:
    click.echo(f"ubi: {message}", err=True)
    sys.exit(1)


def _store(ctx: click.Context) -> FileSecurityStore:
    from .cli import _site

    site = _site(ctx)
    try:
        return FileSecurityStore(site.dataset, site.name)
    except UbiError as exc:
        _fail(str(exc))
        raise AssertionError("unreachable")


def _new_password(name: str, generate: bool) -> str:
    if generate:
        password = secrets.token_urlsafe(12)
        click.echo(f"password for {name} (shown once): {password}")
        return password
    given = os.environ.get("UBI_NEW_PASSWORD")
    if given is not None:
        return given
    if not sys.stdin.isatty():
        _fail(f"no password for {name}: set UBI_NEW_PASSWORD, use --generate, or run in a terminal")
    entered: str = click.prompt(f"new password for {name}", hide_input=True, confirmation_prompt=True, err=True)
    return entered


def _known(store: FileSecurityStore, name: str) -> None:
    if name not in store.users():
        _fail(f"no user {name!r} in {store.path}")


@click.group()
def security() -> None:
    """Users, rights and schema protection levels of the site."""


@security.command("init")
@click.option("--kdf-time", type=int, default=None, help="Argon2id passes for new passwords (default 3).")
@click.option("--kdf-memory-kib", type=int, default=None, help="Argon2id memory in KiB (default 65536).")
@click.option("--kdf-lanes", type=int, default=None, help="Argon2id lanes (default 4).")
@click.pass_context
def init(ctx: click.Context, kdf_time: int | None, kdf_memory_kib: int | None, kdf_lanes: int | None) -> None:
    """Create the store with the user default (read), if there is none."""
    from .cli import _site

    site = _site(ctx)
    d = KdfParams()
    try:
        kdf = KdfParams(kdf_time or d.t, kdf_lanes or d.p, kdf_memory_kib or d.m_kib).check()
    except ValueError as exc:
        _fail(str(exc))
    try:
        store = FileSecurityStore(site.dataset, site.name, kdf=kdf)
        created = store.init()
    except UbiError as exc:  # an unreadable store: one line, no traceback
        _fail(str(exc))
        raise AssertionError("unreachable")
    click.echo(f"created {store.path}" if created else f"{store.path} exists; unchanged")


@security.group()
def users() -> None:
    """Who may log in, and with which right."""


@users.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def users_list(ctx: click.Context, as_json: bool) -> None:
    """The users, their right and whether they may log in."""
    rows: list[dict[str, Any]] = [
        {"user": name, "right": e.right.label, "enabled": e.enabled,
         "kdf": f"argon2id t={e.record.params.t} p={e.record.params.p} m={e.record.params.m_kib}KiB"}
        for name, e in sorted(_store(ctx).users().items())
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    else:
        click.echo(fmt.table(["user", "right", "enabled", "kdf"], [tuple(r.values()) for r in rows]))


@users.command("add")
@click.argument("name")
@click.option("--right", type=click.Choice(RIGHTS), default="read", show_default=True)
@click.option("--generate", is_flag=True, help="Generate a password and show it once.")
@click.pass_context
def users_add(ctx: click.Context, name: str, right: str, generate: bool) -> None:
    """Add a user (password from $UBI_NEW_PASSWORD, --generate or a hidden prompt)."""
    store = _store(ctx)
    try:
        check_user_name(name)
    except ValueError as exc:
        _fail(str(exc))
    if name in store.users():
        _fail(f"user {name!r} exists (use passwd or right)")
    store.set_user(name, "" if name == DEFAULT_USER else _new_password(name, generate), Right[right.upper()])
    click.echo(f"added {name} ({right})")


@users.command("passwd")
@click.argument("name")
@click.option("--generate", is_flag=True, help="Generate a password and show it once.")
@click.pass_context
def users_passwd(ctx: click.Context, name: str, generate: bool) -> None:
    """Give a user a new password (new salt; sessions already open stay open)."""
    store = _store(ctx)
    _known(store, name)
    store.set_user(name, _new_password(name, generate), store.users()[name].right, create=False)
    click.echo(f"password of {name} changed")


def _edit_user(ctx: click.Context, name: str, change: Callable[[FileSecurityStore], None], done: str) -> None:
    """Apply ``change`` to the store if ``name`` is a user; say ``done``."""
    store = _store(ctx)
    _known(store, name)
    change(store)
    click.echo(done)


@users.command("right")
@click.argument("name")
@click.argument("right", type=click.Choice(RIGHTS))
@click.pass_context
def users_right(ctx: click.Context, name: str, right: str) -> None:
    """Set a user's right on every schema (none, read, update)."""
    _edit_user(ctx, name, lambda st: st.set_right(name, Right[right.upper()]), f"{name} now has {right}")


@users.command("enable")
@click.argument("name")
@click.pass_context
def users_enable(ctx: click.Context, name: str) -> None:
    """Let a disabled user log in again."""
    _edit_user(ctx, name, lambda st: st.set_enabled(name, True), f"{name} enabled")


@users.command("disable")
@click.argument("name")
@click.pass_context
def users_disable(ctx: click.Context, name: str) -> None:
    """Refuse a user's logins and end its sessions (full channels rotate their key)."""
    _edit_user(ctx, name, lambda st: st.set_enabled(name, False), f"{name} disabled")


@users.command("remove")
@click.argument("name")
@click.pass_context
def users_remove(ctx: click.Context, name: str) -> None:
    """Remove a user (removing default turns anonymous access off)."""
    _edit_user(ctx, name, lambda st: st.remove_user(name), f"removed {name}")


@security.group()
def schema() -> None:
    """Protection levels of schemas (override the declared default and the site file)."""


@schema.command("set")
@click.argument("name", metavar="MODULE::SCHEMA")
@click.argument("level", type=click.Choice(LEVELS))
@click.pass_context
def schema_set(ctx: click.Context, name: str, level: str) -> None:
    """Run a schema at LEVEL; running instances move to it without a restart."""
    if "::" not in name:
        _fail(f"expected MODULE::SCHEMA, got {name!r}")
    if name == NAMING and level != "open":
        _fail(f"{NAMING} stays open: instances register with it before they can log in")
    from .cli import _site

    if name not in {d.schema for d in _site(ctx).deployments}:
        click.echo(f"ubi: warning: the site file deploys no {name} (misspelt?)", err=True)
    _store(ctx).set_level(name, Protection(level))
    click.echo(f"{name} is now {level}")


@schema.command("clear")
@click.argument("name", metavar="MODULE::SCHEMA")
@click.pass_context
def schema_clear(ctx: click.Context, name: str) -> None:
    """Drop the override: the site file's or the declared level applies again."""
    _store(ctx).set_level(name, None)
    click.echo(f"{name}: override removed")


@schema.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def schema_list(ctx: click.Context, as_json: bool) -> None:
    """The level overrides in the store."""
    rows = sorted((k, v.value) for k, v in _store(ctx).levels().items())
    if as_json:
        click.echo(json.dumps([{"schema": k, "level": v} for k, v in rows], indent=2))
    else:
        click.echo(fmt.table(["schema", "level"], rows))


def register(cli: click.Group) -> None:
    cli.add_command(security)
