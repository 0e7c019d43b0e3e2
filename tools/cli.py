"""The ``ubi`` command: thin click commands over the SDK and the process runners.

Each command parses its options, calls the library and prints the outcome. The
library's own errors become one line on stderr and exit status 1; unusable service
credentials exit 78 (EX_CONFIG: supervisors do not restart the process); usage mistakes
exit 2 (click). Nothing here prints a traceback.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import os
import sys
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import click
import yaml

from ubicore.client import Client
from ubicore.config import SiteConfig, load_site
from ubicore.errors import BadArguments, CredentialsError, PermissionDenied, UbiError
from ubicore.login import (
    CredentialProvider,
    CredentialsFile,
    TerminalPrompt,
    requirement,
)
from ubicore.schema import BUILTIN_OPERATIONS
from ubicore.sessions import Credentials

from . import format as fmt

T = TypeVar("T")
DEFAULT_SITE = "cells/demo.yaml"


EX_CONFIG = 78


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"ubi: {message}", err=True)
    sys.exit(status)


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    try:
        return asyncio.run(coro_fn())  # type: ignore[arg-type]
    except UbiError as exc:
        code = getattr(exc, "code", None)
        text = str(exc)
        if isinstance(exc, PermissionDenied):  # say who may: "This action requires an administrator."
            text = f"{exc.message}. {requirement(exc.groups)}"
        _fail(f"{code}: {text}" if code else text, EX_CONFIG if isinstance(exc, CredentialsError) else 1)
    except KeyboardInterrupt:
        sys.exit(130)
    raise AssertionError("unreachable")


def _site(ctx: click.Context) -> SiteConfig:
    obj = ctx.ensure_object(dict)
    if "site" not in obj:
        try:
            obj["site"] = load_site(obj["site_path"])
        except UbiError as exc:
            _fail(str(exc))
    site: SiteConfig = obj["site"]
    return site


def credentials(ctx: click.Context) -> Credentials | None:
    """Who the command logs in as: ``--user`` (or $UBI_USER) with $UBI_PASSWORD or a
    hidden prompt; nobody given: ``default``, the anonymous user."""
    obj = ctx.ensure_object(dict)
    user = obj.get("user")
    if not user:
        return None
    password = os.environ.get("UBI_PASSWORD")
    if password is None:
        if not sys.stdin.isatty():
            _fail(f"no password for {user}: set UBI_PASSWORD or run in a terminal")
        password = click.prompt(f"password for {user}", hide_input=True, err=True)
    return Credentials.password(user, password)


def _client(ctx: click.Context, **kwargs: Any) -> Client:
    return Client.for_site(_site(ctx), credentials=credentials(ctx), **kwargs)


def credential_provider(no_prompt: bool, credentials_file: str | None) -> CredentialProvider | None:
    """Who is asked for credentials when an action is denied: the file given, else the
    terminal (unless ``--no-prompt`` or stdin is no terminal), else nobody."""
    if credentials_file is not None:
        return CredentialsFile(credentials_file)
    if no_prompt or not sys.stdin.isatty():
        return None
    return TerminalPrompt()


def login_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``--no-prompt`` and ``--credentials-file`` of the commands that may be denied."""
    fn = click.option("--credentials-file", type=click.Path(dir_okay=False), default=None,
                      help="When denied, log in with the user and password of this YAML file (mode 0600).")(fn)
    return click.option("--no-prompt", is_flag=True,
                        help="When denied, fail at once instead of asking on the terminal.")(fn)


async def _until_signalled(body: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    from ubicore.supervisor import stop_on_signals

    stop = asyncio.Event()
    stop_on_signals(stop)
    await body(stop)


@click.group()
@click.option("--site", "site_path", envvar="UBI_SITE", default=DEFAULT_SITE, show_default=True,
              help="The site file (also $UBI_SITE).")
@click.option("--log-level", envvar="UBI_LOG_LEVEL", default="warning", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"]), help="Also $UBI_LOG_LEVEL.")
@click.option("--user", envvar="UBI_USER", default=None,
              help="Log in as this user (also $UBI_USER; password from $UBI_PASSWORD or a prompt).")
@click.pass_context
def cli(ctx: click.Context, site_path: str, log_level: str, user: str | None) -> None:
    """ubicore: cell-based schema services for sites full of sensors."""
    logging.basicConfig(
        level=log_level.upper(), format=f"%(asctime)s {os.getpid()} %(name)s %(levelname)s %(message)s"
    )
    os.environ["UBI_LOG_LEVEL"] = log_level  # children log alike
    ctx.ensure_object(dict)["site_path"] = site_path
    ctx.obj["user"] = user


# --- processes ----------------------------------------------------------------------------


def _prompt(question: str, hide: bool) -> str:
    answer: str = click.prompt(question, hide_input=hide, err=True)
    return answer


def _service_credentials(
    site: SiteConfig, daemon: bool, credentials_stdin: bool, check: str = "online"
) -> tuple[Any, bytes | None]:
    """(Credentials, what to hand children) of a controller, an instance or ``site up``:
    on standard input from a parent, from credentials.dat, or (not ``daemon``, in a
    terminal) asked for and checked (``check``: online or offline)."""
    service: Any = importlib.import_module("ubicore.credentials.service")
    interactive = not daemon and not credentials_stdin and sys.stdin.isatty()
    try:
        found: tuple[Any, bytes | None] = service.obtain(
            site, daemon=not interactive, from_stdin=credentials_stdin, prompt=_prompt if interactive else None,
            check=check)
        return found
    except (UbiError, ValueError) as exc:
        _fail(str(exc), EX_CONFIG if isinstance(exc, CredentialsError) else 1)
    except (KeyboardInterrupt, click.Abort):
        sys.exit(130)
    raise AssertionError("unreachable")


daemon_option = click.option("-d", "--daemon", "daemon", is_flag=True,
                             help="Never prompt: log in with the cached service credentials (ubi-cache-credentials) "
                                  "or exit with status 78.")
stdin_option = click.option("--credentials-stdin", is_flag=True, hidden=True,
                            help="Read the service credentials a parent hands over on standard input.")


@cli.command()
@click.option("--parent-pid", type=int, default=None, hidden=True, help="Stop when this process is gone.")
@daemon_option
@click.pass_context
def core(ctx: click.Context, parent_pid: int | None, daemon: bool) -> None:
    """Run the core services of the site (naming, the security policy). The core holds
    the policy itself and logs in nowhere: it never prompts, with or without -d."""
    from ubicore.controller import run_core

    site = _site(ctx)
    _run(lambda: _until_signalled(lambda stop: run_core(site, stop, parent_pid=parent_pid)))


@cli.command()
@click.option("--host", required=True, help="The host of the site file this controller runs.")
@click.option("--parent-pid", type=int, default=None, hidden=True, help="Stop when this process is gone.")
@daemon_option
@stdin_option
@click.pass_context
def controller(ctx: click.Context, host: str, parent_pid: int | None, daemon: bool, credentials_stdin: bool) -> None:
    """Run, restart and report the instances of one host, logged in as the site's
    service user: with the credentials cached by ubi-cache-credentials, else (without
    -d, in a terminal) a service user and password asked for once."""
    from ubicore.controller import run_controller

    site = _site(ctx)
    if host not in site.hosts:
        _fail(f"{site.source}: hosts: no host {host!r}; hosts are {', '.join(site.hosts)}")
    creds, handoff = _service_credentials(site, daemon, credentials_stdin)
    _run(lambda: _until_signalled(lambda stop: run_controller(site, host, stop, credentials=creds, handoff=handoff,
                                                              parent_pid=parent_pid)))


@cli.command(hidden=True)
@click.argument("schema")
@click.argument("cell")
@click.option("--parent-pid", type=int, default=None, hidden=True, help="Stop when this process is gone.")
@stdin_option
@click.pass_context
def instance(ctx: click.Context, schema: str, cell: str, parent_pid: int | None, credentials_stdin: bool) -> None:
    """Run one instance (controllers start these). It never prompts."""
    from ubicore.controller import run_instance

    site = _site(ctx)
    creds, _ = _service_credentials(site, True, credentials_stdin)
    _run(lambda: _until_signalled(lambda stop: run_instance(site, schema, cell, stop, parent_pid=parent_pid,
                                                            credentials=creds)))


@cli.group()
def site() -> None:
    """Whole sites on this machine."""


@site.command("up")
@click.argument("file", required=False)
@daemon_option
@click.pass_context
def site_up(ctx: click.Context, file: str | None, daemon: bool) -> None:
    """Bring up the core and a controller for every host of FILE, until Ctrl-C. The
    controllers log in with the service credentials cached in the dataset; without a
    cache (and without -d, in a terminal) a service user and password are asked for
    once, checked against the dataset's policy and handed to them in memory."""
    from ubicore.controller import run_site
    from ubicore.runtime import check_initialised

    if file is not None:
        ctx.obj["site_path"] = file
    cfg = _site(ctx)
    try:
        check_initialised(cfg)
    except UbiError as exc:
        _fail(str(exc))
    handoff = None
    if cfg.instances:  # the whole site runs here, with its policy: a prompt's answer is checked offline
        _, handoff = _service_credentials(cfg, daemon, False, check="offline")

    def on_up(missing: Any) -> None:
        if missing:
            click.echo(f"not up in time: {', '.join(missing)}", err=True)
        click.echo(f"site {cfg.name} up: {len(cfg.instances)} instances on {len(cfg.hosts)} hosts; Ctrl-C stops it")

    _run(lambda: _until_signalled(lambda stop: run_site(cfg, stop, on_up=on_up, handoff=handoff)))
    click.echo(f"site {cfg.name} stopped")


@site.command("init")
@click.argument("file", required=False)
@click.option("--admin", default="administrator", show_default=True, help="The first administrator's name.")
@click.option("--generate-password", is_flag=True, help="Generate the administrator's password and show it once.")
@click.option("--kdf-t", type=int, default=None, help="Argon2id passes of new passwords (default 3).")
@click.option("--kdf-p", type=int, default=None, help="Argon2id lanes (default 4).")
@click.option("--kdf-m-kib", type=int, default=None, help="Argon2id memory in KiB (default 65536).")
@click.option("--service-user", default="site-service", show_default=True,
              help="The service user whose credentials are cached in the dataset for this host's controllers.")
@click.option("--no-service-user", is_flag=True, help="Make no service user (cache one later with ubi-cache-credentials).")
@click.pass_context
def site_init(ctx: click.Context, file: str | None, admin: str, generate_password: bool, kdf_t: int | None,
              kdf_p: int | None, kdf_m_kib: int | None, service_user: str, no_service_user: bool) -> None:
    """Create FILE's dataset and its security model: the administrator ADMIN (password
    from $UBI_NEW_PASSWORD, --generate-password or a hidden prompt, twice), the user
    default (no password, reads), this OS account as an OS user of the site, the groups
    admin, everyone and services, and the service user SERVICE_USER (in services) with a
    random password kept nowhere: its credentials are cached in the dataset's
    credentials.dat, so 'ubi site up' and 'ubi controller -d' run on this host at once.
    Run once, before the first 'ubi site up'."""
    from ubicore.runtime import cache_tool_hint, current_os_user, init_site, perm_path
    from ubicore.security.primitives import KdfParams

    from .passwords import new_password, show_generated

    if file is not None:
        ctx.obj["site_path"] = file
    cfg = _site(ctx)
    if perm_path(cfg).exists():
        _fail(f"site {cfg.name} is initialised already ({perm_path(cfg)}); change it with 'ubi security'")
    d = KdfParams()
    try:
        kdf = KdfParams(d.t if kdf_t is None else kdf_t, d.p if kdf_p is None else kdf_p,
                        d.m_kib if kdf_m_kib is None else kdf_m_kib).check()
    except ValueError as exc:
        _fail(f"Argon2id costs: {exc}")
    password, generated = new_password(admin, generate_password)
    try:
        made = init_site(cfg, password(), admin_user=admin, kdf=kdf, os_user=current_os_user(),
                         service_user=None if no_service_user else service_user)
    except ValueError as exc:  # a user name make_verifier refuses
        _fail(str(exc))
    except UbiError as exc:
        _fail(str(exc))
    if not made:
        _fail(f"site {cfg.name} is initialised already ({perm_path(cfg)}); change it with 'ubi security'")
    click.echo(_policy_summary(cfg))
    if not no_service_user:
        click.echo(f"\nservice user {service_user}: credentials cached in {cfg.dataset / 'credentials.dat'} (its "
                   "password is random and kept nowhere; for another host, set one with 'ubi security users passwd "
                   f"{service_user}' and {cache_tool_hint(cfg)} there, or copy the file "
                   "with ubi-cache-credentials --copy-to)")
    else:
        click.echo(f"\nno service user: add one to the group services, then {cache_tool_hint(cfg)}")
    if generated:
        show_generated(admin, password())


def _policy_summary(cfg: SiteConfig) -> str:
    """What ``site init`` made, read back from the dataset."""
    from ubicore.runtime import offline_policy, perm_path

    with offline_policy(cfg) as (_, tx):
        site_row = next(iter(tx.site))
        member_of: dict[str, list[str]] = {}
        for m in tx.members:
            member_of.setdefault(m.user, []).append(m.group if m.cell == "Site" else f"{m.group}@{m.cell}")
        user_rows = [(u.name, u.kind + (f" (uid {u.uid})" if u.uid is not None else ""),
                      ", ".join(sorted(member_of.get(u.name, []))), u.description) for u in sorted(tx.users)]
        group_rows = [(g.name, g.description) for g in sorted(tx.groups)]
        rule_rows = [(r.group, r.module, r.schema, r.right) for r in sorted(tx.rules)]
    return "\n".join([
        f"initialised site {cfg.name}: {perm_path(cfg)}",
        f"new passwords: argon2id t={site_row.kdf_t} p={site_row.kdf_p} m={site_row.kdf_m_kib} KiB",
        "", fmt.table(["user", "kind", "groups", "description"], user_rows),
        "", fmt.table(["group", "description"], group_rows),
        "", fmt.table(["group", "module", "schema", "right"], rule_rows),
    ])


@cli.command()
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@click.pass_context
def demo(ctx: click.Context, duration: float | None) -> None:
    """The demo site with a live client showing state changes as they happen."""
    from .demo import run_demo

    cfg = _site(ctx)
    _run(lambda: _until_signalled(lambda stop: run_demo(cfg, stop, click.echo, duration)))


# --- clients ------------------------------------------------------------------------------


def _parse_value(type_name: str, text: str) -> Any:
    if type_name == "str":
        return text
    if type_name == "int":
        return int(text, 0)
    if type_name == "float":
        return float(text)
    if type_name == "bool":
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError("expected true or false")
    if type_name == "bytes":
        return bytes.fromhex(text[2:]) if text.startswith("0x") else text.encode()
    return yaml.safe_load(text)


def parse_arguments(params: list[list[Any]], pairs: tuple[str, ...]) -> dict[str, Any]:
    """``key=value`` words, converted by the operation's declared parameter types."""
    types = {p[0]: p[1] for p in params}
    args: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise BadArguments(f"expected key=value, got {pair!r}")
        if key not in types:
            raise BadArguments(f"unknown argument {key!r}; the operation takes {', '.join(types) or 'none'}")
        try:
            args[key] = _parse_value(types[key], text)
        except (ValueError, yaml.YAMLError):
            raise BadArguments(f"argument {key!r}: {text!r} is not a {types[key]}") from None
    return args


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_context
def services(ctx: click.Context, as_json: bool) -> None:
    """What runs where, with its state."""
    cfg = _site(ctx)

    async def body() -> None:
        async with _client(ctx) as client:
            state = await client.services()
        inst = {(r["schema"], r["cell"]): r for r in state["instances"]}
        adm = {(r["schema"], r["cell"]): r for r in state["services"]}
        rows = []
        for key in sorted(set(inst) | set(adm)):
            i, a = inst.get(key, {}), adm.get(key, {})
            rows.append({
                "schema": key[0], "cell": key[1], "host": i.get("host") or a.get("host", ""),
                "state": a.get("actual", "running" if i else "unknown"), "restarts": a.get("restarts", 0),
                "protection": i.get("protection", ""), "rpc": i.get("rpc", ""), "events": i.get("events", ""),
                "pid": i.get("pid", 0),
            })
        if as_json:
            click.echo(fmt.to_json(rows))
        else:
            cols = ["schema", "cell", "host", "state", "restarts", "protection", "rpc", "events"]
            click.echo(fmt.table(cols, [[r[c] for c in cols] for r in rows]))

    _run(body)


@cli.command()
@click.argument("cell")
@click.argument("schema")
@click.argument("operation")
@click.argument("arguments", nargs=-1)
@click.option("--timeout", type=float, default=5.0, show_default=True, help="Seconds to wait for the reply.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@login_options
@click.pass_context
def call(ctx: click.Context, cell: str, schema: str, operation: str, arguments: tuple[str, ...],
         timeout: float, as_json: bool, no_prompt: bool, credentials_file: str | None) -> None:
    """Call OPERATION of SCHEMA at CELL with key=value ARGUMENTS."""
    _site(ctx)  # a bad site file fails here, before the loop starts
    provider = credential_provider(no_prompt, credentials_file)

    async def body() -> Any:
        async with _client(ctx, timeout_s=timeout, credential_provider=provider) as client:
            ops = (await client.describe(cell, schema))["schema"]["operations"]
            if operation not in ops and operation not in BUILTIN_OPERATIONS:
                from ubicore.errors import NotFound

                raise NotFound(f"{schema} has no operation {operation!r}; it has {', '.join(sorted(ops))}")
            params = ops.get(operation, {"params": []})["params"]
            args = parse_arguments(params, arguments)
            return await client.call_args(cell, schema, operation, args, timeout_s=timeout)

    result = _run(body)
    click.echo(fmt.to_json(result) if as_json else fmt.result_text(result))


def _print_tables(cache: Any, as_json: bool) -> None:
    for name, info in cache.infos.items():
        rows = sorted(cache.rows(name))
        if as_json:
            click.echo(fmt.to_json({"relation": name, "rows": rows}))
        else:
            click.echo(f"{name} ({len(rows)} rows)")
            click.echo(fmt.table(list(info.columns), rows))


@cli.command()
@click.argument("cell")
@click.argument("schema")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@login_options
@click.pass_context
def dump(ctx: click.Context, cell: str, schema: str, as_json: bool, no_prompt: bool,
         credentials_file: str | None) -> None:
    """Print the relations of SCHEMA at CELL."""
    _site(ctx)  # a bad site file fails here, before the loop starts
    provider = credential_provider(no_prompt, credentials_file)

    async def body() -> None:
        async with _client(ctx, credential_provider=provider) as client:
            _print_tables(await client.cache(cell, schema), as_json)

    _run(body)


@cli.command()
@click.argument("cell")
@click.argument("schema")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.option("--duration", type=float, default=None, help="Stop after this many seconds.")
@login_options
@click.pass_context
def watch(ctx: click.Context, cell: str, schema: str, as_json: bool, duration: float | None, no_prompt: bool,
          credentials_file: str | None) -> None:
    """Print the relations of SCHEMA at CELL, then every change as it happens."""
    _site(ctx)  # a bad site file fails here, before the loop starts
    provider = credential_provider(no_prompt, credentials_file)

    cache: Any = None

    def show(rel: str, old: Any, new: Any) -> None:
        if as_json:
            op = "insert" if old is None else "delete" if new is None else "update"
            click.echo(fmt.to_json({"relation": rel, "op": op, "old": old, "new": new}))
        else:
            click.echo(fmt.change_text(rel, old, new, cache.infos[rel].key_index))

    async def body(stop: asyncio.Event) -> None:
        nonlocal cache
        async with _client(ctx, credential_provider=provider) as client:
            cache = await client.cache(cell, schema)
            _print_tables(cache, as_json)
            cache.on_change(show)
            if duration is not None:
                asyncio.get_running_loop().call_later(duration, stop.set)
            await stop.wait()

    _run(lambda: _until_signalled(body))


from . import security_cli  # noqa: E402  (registers ``ubi security``)

security_cli.register(cli)

from . import audit_cli  # noqa: E402  (registers ``ubi audit``)

audit_cli.register(cli)


def main() -> None:
    cli(prog_name="ubi")


if __name__ == "__main__":
    main()
