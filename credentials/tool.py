"""``ubi-cache-credentials``: cache a service user's credentials on this host.

::

    ubi-cache-credentials --site cells/demo.yaml              # asks for user and password
    ubi-cache-credentials --site F --user svc --password-stdin < secret
    ubi-cache-credentials --site F --offline                   # on the core's host, site down
    ubi-cache-credentials --dataset /srv/ubi --show
    ubi-cache-credentials --site F --remove
    ubi-cache-credentials --dataset /srv/ubi --copy-to /mnt/backup/ubi

Caching checks the password by logging in to the site (``--offline``: against the
verifier record in this host's copy of the policy) and writes nothing when it is
wrong. What is written is the password-derived scalar with its salt and costs, never
the password (ubicore/credentials/cache.py). Errors are one line on stderr: exit 1;
the password refused: exit 3; usage mistakes: exit 2.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path
from typing import Any

import click

from ubicore.config import SiteConfig, load_site
from ubicore.errors import AuthenticationFailed, UbiError

from .cache import cache_path, copy_cache, read_cache, remove_credential, store_credential
from .service import ServiceRights, check_offline, check_online

EXIT_REFUSED = 3
MAX_PASSWORD_BYTES = 4096


def _fail(message: str, status: int = 1) -> None:
    click.echo(f"ubi-cache-credentials: {message}", err=True)
    sys.exit(status)


def _load(site_path: str | None) -> SiteConfig:
    if site_path is None:
        _fail("no site file: give --site FILE (or set UBI_SITE)", 2)
    try:
        return load_site(site_path)  # type: ignore[arg-type]
    except UbiError as exc:
        _fail(str(exc))
    raise AssertionError("unreachable")


def _password(user: str, from_stdin: bool) -> str:
    if from_stdin:
        line = sys.stdin.readline(MAX_PASSWORD_BYTES + 1)
        if len(line) > MAX_PASSWORD_BYTES:
            _fail("the password on standard input is too long")
        password = line.rstrip("\r\n")
        if not password:
            _fail("no password on standard input")
        return password
    if not sys.stdin.isatty():
        _fail("no terminal to ask for the password: use --password-stdin")
    answer: str = click.prompt(f"password for {user}", hide_input=True, err=True)
    return answer


def _show(dataset: Path) -> None:
    entries = read_cache(cache_path(dataset))
    click.echo(f"{cache_path(dataset)}:")
    for cred in sorted(entries.values(), key=lambda c: c.site):
        when = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(cred.cached_at))
        click.echo(f"  site {cred.site}: user {cred.user}, cached {when} (checked {cred.checked}), "
                   f"argon2id t={cred.params.t} p={cred.params.p} m={cred.params.m_kib} KiB")


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--site", "site_path", envvar="UBI_SITE", default=None,
              help="The site file (also $UBI_SITE): the site's name and core endpoint.")
@click.option("--dataset", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The dataset whose credentials.dat to use (default: the site file's dataset).")
@click.option("--user", default=None, help="The service user (asked for when not given).")
@click.option("--password-stdin", is_flag=True, help="Read the password from the first line of standard input.")
@click.option("--offline", is_flag=True,
              help="Check the password against this host's copy of the policy (the core's dataset) "
                   "instead of logging in.")
@click.option("--reader-group", default=None, metavar="GROUP",
              help="Let this Unix group read the file (mode 0640) instead of the owner alone (0600).")
@click.option("--show", is_flag=True, help="List what is cached (site, user, date; never a secret).")
@click.option("--remove", is_flag=True, help="Remove the site's cached credentials.")
@click.option("--copy-to", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Place the same credentials.dat in DIR (a backup machine's dataset).")
@click.option("--timeout", type=float, default=10.0, show_default=True, help="Seconds to wait for the site.")
def main(site_path: str | None, dataset: Path | None, user: str | None, password_stdin: bool, offline: bool,
         reader_group: str | None, show: bool, remove: bool, copy_to: Path | None, timeout: float) -> None:
    """Cache the credentials of a service user in credentials.dat, so that this host's
    controllers and instances (ubi controller -d) log in without a password on disk."""
    actions = [name for name, on in (("--show", show), ("--remove", remove), ("--copy-to", copy_to is not None))
               if on]
    if len(actions) > 1:
        _fail(f"{' and '.join(actions)} do not go together", 2)
    try:
        if show or copy_to is not None:
            where = dataset if dataset is not None else _load(site_path).dataset
            if show:
                _show(where)
            else:
                assert copy_to is not None
                target = copy_cache(cache_path(where), copy_to, reader_group=reader_group)
                click.echo(f"copied {cache_path(where)} to {target}")
            return
        site = _load(site_path)
        where = dataset if dataset is not None else site.dataset
        if remove:
            if remove_credential(cache_path(where), site.name):
                click.echo(f"removed the credentials of site {site.name} from {cache_path(where)}")
            else:
                click.echo(f"no credentials of site {site.name} in {cache_path(where)}")
            return
        _cache(site, where, user, password_stdin, offline, reader_group, timeout)
    except AuthenticationFailed as exc:
        _fail(f"{exc.message}: nothing written", EXIT_REFUSED)
    except UbiError as exc:
        _fail(str(exc))
    except (KeyboardInterrupt, click.Abort):
        sys.exit(130)


def _cache(site: SiteConfig, dataset: Path, user: str | None, password_stdin: bool, offline: bool,
           reader_group: str | None, timeout: float) -> None:
    if user is None:
        if password_stdin or not sys.stdin.isatty():
            _fail("no user: give --user NAME", 2)
        user = str(click.prompt(f"service user for site {site.name}", err=True)).strip()
    password = _password(user, password_stdin)
    rights: ServiceRights | None
    if offline:
        cred, rights = check_offline(site, user, password)
    else:
        cred, rights = asyncio.run(check_online(site, user, password, timeout_s=timeout))
    del password
    path = cache_path(dataset)
    dataset.mkdir(parents=True, exist_ok=True, mode=0o700)  # a new host's dataset may not exist yet
    store_credential(path, cred, reader_group=reader_group)
    how = "against this dataset's policy" if offline else "by logging in to the site"
    mode = f"0640, readable by the group {reader_group}" if reader_group else "0600"
    click.echo(f"cached the credentials of {user} for site {site.name} in {path} "
               f"(password checked {how}; mode {mode})")
    for warning in rights.warnings(user) if rights is not None else ():
        click.echo(f"ubi-cache-credentials: warning: {warning}", err=True)


def run(argv: list[str] | None = None) -> Any:
    """The console script's entry point."""
    return main(args=argv, prog_name="ubi-cache-credentials")


if __name__ == "__main__":
    run()
