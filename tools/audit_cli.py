"""``ubi audit``: verify, tail and search the site's audit trail (UAudit::Log).

``verify`` reads the trail where the core keeps it (``<dataset>/Site/UAudit%Log.udata``)
with the audit key file and the checkpoint file, and needs no running core: run it on
the core's host. ``tail`` and ``search`` ask the running core (log in as someone who
may read UAudit::Log: the factory policy lets administrators).

Exit status: 0 fine; 3 the trail fails verification; 1 an error; 2 a usage mistake.
"""

from __future__ import annotations

import asyncio
import re
import sqlite3
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import click

from ubicore.audit.chain import Record, Verdict, verify, when
from ubicore.audit.keys import load_keys, read_checkpoints
from ubicore.audit.trail import AUDIT_LOG, audit_paths
from ubicore.client import Client
from ubicore.errors import UbiError
from ubicore.store import udata_path

from . import format as fmt

EXIT_TAMPERED = 3
COLUMNS = ("seq", "time", "host", "cell", "schema", "principal", "address", "action", "outcome", "detail")
_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def trail_path(dataset: Path) -> Path:
    return udata_path(dataset, "Site", AUDIT_LOG)


def read_records(path: Path) -> Iterator[Record]:
    """The records of a trail file, in ``seq`` order, read-only (the core may run)."""
    if not path.exists():
        raise UbiError(f"no audit trail at {path} (run this on the core's host, or give --dataset)")
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        cursor = db.execute("SELECT seq, time, host, cell, schema, principal, address, action, outcome, detail, "
                            "origin, prev, hash, mac FROM records ORDER BY seq")
        for row in cursor:
            yield Record(*row)
    except sqlite3.Error as exc:
        raise UbiError(f"{path}: cannot read the trail: {exc}") from None
    finally:
        db.close()


def verify_trail(dataset: Path, key_file: Path, checkpoint_file: Path) -> Verdict:
    keys = load_keys(key_file)
    checkpoints = read_checkpoints(checkpoint_file)
    return verify(read_records(trail_path(dataset)), keys, checkpoints)


def parse_since(text: str, now: float | None = None) -> float:
    """``10m``, ``2h``, ``1d`` ago, or an ISO date/time (local time): unix seconds."""
    now = time.time() if now is None else now
    m = _RELATIVE.match(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise click.BadParameter(f"{text!r}: give 30s, 10m, 2h, 1d or a date such as 2026-11-22T09:00") from None


def record_line(r: dict[str, Any]) -> str:
    """One record on one line (``tail --follow``, the demo)."""
    where = f"{r['schema']}@{r['cell']}" if r["schema"] else r["cell"]
    who = r["principal"] or "-"
    frm = f" from {r['address']}" if r["address"] else ""
    return fmt.printable(f"#{r['seq']} {fmt.when(r['time'])} {r['host']} {where}: {who}{frm} {r['action']} "
                         f"{r['outcome']}" + (f": {r['detail']}" if r["detail"] else ""))


def _show(records: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        for r in records:
            click.echo(fmt.to_json(r))
        return
    rows = [[r["seq"], fmt.when(r["time"]), r["host"], r["cell"], r["schema"], r["principal"], r["address"],
             r["action"], r["outcome"], r["detail"]] for r in records]
    click.echo(fmt.table(list(COLUMNS), rows))


@click.group()
@click.option("--no-prompt", is_flag=True, help="When denied, fail at once instead of asking on the terminal.")
@click.option("--credentials-file", type=click.Path(dir_okay=False), default=None,
              help="When denied, log in with the user and password of this YAML file (mode 0600).")
@click.pass_context
def audit(ctx: click.Context, no_prompt: bool, credentials_file: str | None) -> None:
    """The site's audit trail: who did what, where, from where, and with what outcome.
    tail and search log in like 'ubi security' (--user, or a prompt when denied)."""
    ctx.ensure_object(dict)["login"] = (no_prompt, credentials_file)


@audit.command("verify", epilog="Exit status: 0 intact, 3 tampered with, 1 the trail could not be read.")
@click.option("--dataset", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The core's dataset (default: the site file's).")
@click.option("--key-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The audit key file (default: the site file's audit.key_file).")
@click.option("--checkpoint-file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The checkpoint file (default: the site file's audit.checkpoint_file).")
@click.pass_context
def verify_command(ctx: click.Context, dataset: Path | None, key_file: Path | None,
                   checkpoint_file: Path | None) -> None:
    """Check every record's hash, MAC and place in the chain, and the signed checkpoints:
    names the first record that fails and why (edited, inserted, deleted, reordered or
    a truncated tail)."""
    from .cli import _fail, _site

    site = _site(ctx)
    default_key, default_cp, _ = audit_paths(site)
    try:
        verdict = verify_trail(dataset or site.dataset, key_file or default_key, checkpoint_file or default_cp)
    except UbiError as exc:
        _fail(str(exc))
    if not verdict.ok:
        where = f"record {verdict.first_bad}: " if verdict.first_bad is not None else ""
        if verdict.reason.startswith(where):  # the reason names the record itself
            where = ""
        click.echo(f"ubi: the audit trail FAILS verification: {where}{verdict.reason}", err=True)
        sys.exit(EXIT_TAMPERED)
    click.echo(f"the audit trail is intact: {verdict.reason}")


def _query(ctx: click.Context, operation: str, args: dict[str, Any]) -> list[dict[str, Any]]:
    from .security_cli import _session

    async def body(client: Client) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = await client.call_args("Site", AUDIT_LOG, operation, args)
        return got

    return _session(ctx, body)


@audit.command("tail")
@click.option("-n", "--count", type=click.IntRange(1, 10_000), default=20, show_default=True,
              help="How many of the newest records.")
@click.option("-f", "--follow", is_flag=True, help="Then print new records as they come, until Ctrl-C.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.pass_context
def tail(ctx: click.Context, count: int, follow: bool, as_json: bool) -> None:
    """The newest records of the trail."""
    records = _query(ctx, "tail", {"count": count})
    _show(records, as_json)
    if not follow:
        return
    from .security_cli import _session

    last = records[-1]["seq"] if records else 0

    async def body(client: Client) -> None:
        nonlocal last
        while True:
            await asyncio.sleep(0.5)
            fresh = [r for r in await client.call_args("Site", AUDIT_LOG, "tail", {"count": 1000})
                     if r["seq"] > last]
            if fresh:
                last = fresh[-1]["seq"]
                for r in fresh:
                    click.echo(fmt.to_json(r) if as_json else record_line(r))

    _session(ctx, body)


@audit.command("search")
@click.option("--user", default="", help="Only this principal's records.")
@click.option("--action", default="", help="Only this action (login, denied, update, policy, key_rotation, "
                                           "rejected, start, stop, register, lockout, alert).")
@click.option("--outcome", default="", help="Only this outcome (ok, failed, denied, refused).")
@click.option("--cell", default="", help="Only records of this cell.")
@click.option("--since", default=None, help="Only records since then: 30s, 10m, 2h, 1d or an ISO date/time.")
@click.option("--limit", type=click.IntRange(1, 10_000), default=1000, show_default=True,
              help="At most this many (the newest).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON lines.")
@click.pass_context
def search(ctx: click.Context, user: str, action: str, outcome: str, cell: str, since: str | None, limit: int,
           as_json: bool) -> None:
    """Records matching every filter given, oldest first."""
    args: dict[str, Any] = {"user": user, "action": action, "outcome": outcome, "cell": cell, "limit": limit,
                            "since": parse_since(since) if since else 0.0}
    _show(_query(ctx, "search", args), as_json)


def register(cli: click.Group) -> None:
    cli.add_command(audit)


__all__ = ["audit", "parse_since", "read_records", "register", "trail_path", "verify_trail", "when"]
