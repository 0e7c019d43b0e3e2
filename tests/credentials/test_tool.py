"""``ubi-cache-credentials`` (credentials/tool.py, issue 5) and what a process does with what
it caches (credentials/service.py).

The tool runs as a real child process (``python -m ubicore.credentials.tool``) against a
site served in this process (``running_site``) when it checks online, and through click's
CliRunner when it checks offline or fails on usage. Covered:

- caching online: the file 0600 (0640 with ``--reader-group``), the cached π is the
  password's; ``--show`` lists site, user, date and how it was checked, never a secret;
- a wrong password or an unknown user: exit 3, one line, the old file byte-identical;
- ``--offline`` on the core's dataset with the site down, right and wrong password;
- a user outside the group ``services``: cached, with the one warning line that says so;
- ``--remove``, ``--show`` of a missing or empty file, usage mistakes (exit 2, one line);
- a changed password, a removed user, a disabled user: CredentialsOutOfDate naming the
  tool; caching again makes new clients work and an existing client recover;
- ``--copy-to`` a backup machine's dataset: the same bytes, 0600, and an instance whose
  site file names that dataset comes up on the copy alone, registers and serves.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import grp
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from ubicore.client import NAMING_CELL, NAMING_SCHEMA
from ubicore.config import SiteConfig, parse_site
from ubicore.credentials.cache import CachedCredential, cache_path, read_cache
from ubicore.credentials.service import service_credentials
from ubicore.credentials.tool import main
from ubicore.runtime import add_service_user, current_os_user, init_site, offline_policy, serve_instance
from ubicore.security.amp import CredentialsOutOfDate, make_verifier, password_scalar
from ubicore.testing import OPERATOR, TEST_KDF, RunningSite, free_ports, run_async, running_site, site_yaml
from ubicore.testing.site import CONFIG_UPDATE

pytestmark = pytest.mark.timeout(60)

TOOL = [sys.executable, "-m", "ubicore.credentials.tool"]
ENV = {k: v for k, v in os.environ.items() if not k.startswith("UBI_")}
PASSWORD = "svc-Pa55word-only-in-this-test"
NEW_PASSWORD = "svc-n3w-Pa55word-only-in-this-test"
WRONG = "not-the-password"


# --- helpers -----------------------------------------------------------------------------


async def tool(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """``ubi-cache-credentials ARGS`` in a child process (stdin: ``stdin``, else nothing)."""
    return await asyncio.to_thread(
        subprocess.run, [*TOOL, *args], input=stdin, stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True, text=True, timeout=20, env=ENV)


def invoke(*args: str, stdin: str | None = None) -> Result:
    """The tool through click's CliRunner (no terminal: stdin is not a tty)."""
    return CliRunner().invoke(main, list(args), input=stdin, env={"UBI_SITE": None})


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


def mode_of(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def host_dir(tmp_path: Path, name: str = "host2") -> Path:
    """Another host's dataset directory (only its credentials.dat is used)."""
    d = tmp_path / name
    d.mkdir(mode=0o700)
    return d


def verifier_args(site: str, user: str, password: str) -> dict[str, object]:
    rec = make_verifier(user, site, password, TEST_KDF)
    return {"salt": rec.salt, "verifier": rec.verifier, "t": TEST_KDF.t, "p": TEST_KDF.p, "m_kib": TEST_KDF.m_kib}


def add_service(rs: RunningSite, name: str, password: str, groups: tuple[str, ...] = ("services",)) -> None:
    rs.policy.edit("add_user", name=name, kind="service", groups=list(groups),
                   **verifier_args(rs.site.name, name, password))


async def cache_online(rs: RunningSite, dataset: Path, user: str, password: str) -> subprocess.CompletedProcess[str]:
    done = await tool("--site", str(rs.site.source), "--dataset", str(dataset), "--user", user, "--password-stdin",
                      stdin=password + "\n")
    assert done.returncode == 0, done.stderr
    return done


async def in_force() -> None:
    """Let a policy edit take effect: the core rebuilds its policy one loop turn after a
    commit (runtime._after_commits)."""
    await asyncio.sleep(0.05)


def secrets_of(cred: CachedCredential, *passwords: str) -> list[str]:
    """The forms a secret could leak in: the passwords, π in hex (either case) and base64."""
    pi = cred.scalar.value
    return [*passwords, pi.hex(), pi.hex().upper(), base64.b64encode(pi).decode()]


def assert_no_secret(texts: list[str], cred: CachedCredential, *passwords: str) -> None:
    for text in texts:
        for secret in secrets_of(cred, *passwords):
            assert secret not in text
        assert cred.scalar.value.decode("latin-1") not in text


def offline_site(tmp_path: Path) -> SiteConfig:
    """An initialised site that is not running: ``svc`` (in services, PASSWORD) and
    ``loner`` (a service user in no group, PASSWORD)."""
    rpc, events = free_ports(2)
    path = tmp_path / "site.yaml"
    path.write_text(site_yaml(tmp_path / "dataset", core_port=rpc, event_port=events), encoding="utf-8")
    site = parse_site(path.read_text(encoding="utf-8"), path)
    init_site(site, OPERATOR[1], admin_user=OPERATOR[0], kdf=TEST_KDF, os_user=current_os_user())
    add_service_user(site, "svc", PASSWORD, kdf=TEST_KDF)
    with offline_policy(site) as (obj, tx):
        obj.add_user(tx, "loner", kind="service", groups=[], **verifier_args(site.name, "loner", PASSWORD))
    return site


# --- caching online ------------------------------------------------------------------------


@run_async(timeout_s=30)
async def test_caching_online_writes_the_scalar_0600_and_show_lists_no_secret(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        add_service(rs, "svc", PASSWORD)
        host = host_dir(tmp_path)
        done = await cache_online(rs, host, "svc", PASSWORD)
        path = cache_path(host)
        assert mode_of(path) == 0o600 and os.lstat(path).st_uid == os.getuid()
        cred = read_cache(path)[rs.site.name]
        assert (cred.user, cred.checked, cred.params) == ("svc", "online", TEST_KDF)
        assert abs(cred.cached_at - time.time()) < 60
        # what is cached is π for this password, salt and costs: logins need no password
        assert cred.scalar.equals(password_scalar(PASSWORD, "svc", rs.site.name, cred.salt, cred.params))
        assert one_line(done.stdout).startswith(f"cached the credentials of svc for site {rs.site.name} in {path}")
        assert "0600" in done.stdout and "by logging in" in done.stdout
        assert done.stderr == ""  # svc is in services: no warning
        assert not [n for n in os.listdir(host) if n != "credentials.dat"]  # no temporary file left

        shown = await tool("--dataset", str(host), "--show")
        assert shown.returncode == 0, shown.stderr
        lines = shown.stdout.strip().splitlines()
        assert lines[0] == f"{path}:"
        assert len(lines) == 2
        day = time.strftime("%Y-%m-%d", time.localtime(cred.cached_at))
        assert lines[1].strip().startswith(f"site {rs.site.name}: user svc, cached {day} ")
        assert "(checked online)" in lines[1]
        # the same through the site file (its dataset is the site's own, cached by init_site)
        own = await tool("--site", str(rs.site.source), "--show")
        assert own.returncode == 0 and "user site-service" in own.stdout and "(checked offline)" in own.stdout
        site_cred = read_cache(cache_path(rs.site.dataset))[rs.site.name]
        assert_no_secret([done.stdout, done.stderr, shown.stdout, shown.stderr, own.stdout], cred, PASSWORD)
        assert_no_secret([own.stdout, own.stderr], site_cred)


@run_async(timeout_s=30)
async def test_a_wrong_password_or_an_unknown_user_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        add_service(rs, "svc", PASSWORD)
        host = host_dir(tmp_path)
        await cache_online(rs, host, "svc", PASSWORD)
        path = cache_path(host)
        before, st = path.read_bytes(), os.stat(path)
        site = str(rs.site.source)
        for user, password in (("svc", WRONG), ("nobody-such", PASSWORD), ("svc", PASSWORD.upper())):
            done = await tool("--site", site, "--dataset", str(host), "--user", user, "--password-stdin",
                              stdin=password + "\n")
            assert done.returncode == 3, (user, done.stdout, done.stderr)
            line = one_line(done.stderr)
            assert line.startswith("ubi-cache-credentials: ") and line.endswith("nothing written"), line
            assert done.stdout == ""
            assert password not in done.stderr
            assert path.read_bytes() == before
            assert (os.stat(path).st_ino, os.stat(path).st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
            assert sorted(os.listdir(host)) == ["credentials.dat"]
        # a wrong password into a dataset that had no cache leaves none
        empty = host_dir(tmp_path, "host3")
        done = await tool("--site", site, "--dataset", str(empty), "--user", "svc", "--password-stdin",
                          stdin=WRONG + "\n")
        assert done.returncode == 3 and os.listdir(empty) == []


@run_async(timeout_s=30)
async def test_a_user_outside_services_is_cached_with_a_warning_and_a_reader_group_gets_0640(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        add_service(rs, "loner", PASSWORD, groups=())
        host = host_dir(tmp_path)
        done = await cache_online(rs, host, "loner", PASSWORD)
        assert read_cache(cache_path(host))[rs.site.name].user == "loner"
        warning = one_line(done.stderr)
        assert warning.startswith("ubi-cache-credentials: warning: loner may not ")
        assert "group services" in warning and "ubi security members add loner services" in warning

        # --reader-group: 0640 and that group (another one than ours when we may chown to it)
        group = grp.getgrgid(os.getgid())
        if os.getuid() == 0:
            group = next((g for g in grp.getgrall() if g.gr_gid != os.getgid()), group)
        add_service(rs, "svc", PASSWORD)
        shared = host_dir(tmp_path, "shared")
        done = await tool("--site", str(rs.site.source), "--dataset", str(shared), "--user", "svc",
                          "--password-stdin", "--reader-group", group.gr_name, stdin=PASSWORD + "\n")
        assert done.returncode == 0, done.stderr
        st = os.lstat(cache_path(shared))
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == group.gr_gid
        assert f"0640, readable by the group {group.gr_name}" in done.stdout
        assert read_cache(cache_path(shared))[rs.site.name].user == "svc"  # still a safe file for its reader
        # an unknown group: one line, nothing written
        done = await tool("--site", str(rs.site.source), "--dataset", str(host_dir(tmp_path, "h4")), "--user", "svc",
                          "--password-stdin", "--reader-group", "no-such-group-xyz", stdin=PASSWORD + "\n")
        assert done.returncode == 1 and "no-such-group-xyz" in one_line(done.stderr)
        assert os.listdir(tmp_path / "h4") == []


# --- caching offline (the core's host, the site down) --------------------------------------


def test_offline_checks_against_the_datasets_policy_while_the_site_is_down(tmp_path: Path) -> None:
    site = offline_site(tmp_path)
    path = cache_path(site.dataset)
    before = path.read_bytes()  # site-service's entry, cached by init_site
    refused = invoke("--site", str(site.source), "--offline", "--user", "svc", "--password-stdin", stdin=WRONG + "\n")
    assert refused.exit_code == 3
    assert one_line(refused.stderr) == "ubi-cache-credentials: wrong password for svc: nothing written"
    assert path.read_bytes() == before
    unknown = invoke("--site", str(site.source), "--offline", "--user", "ghost", "--password-stdin",
                     stdin=PASSWORD + "\n")
    assert unknown.exit_code == 3 and "ghost" in one_line(unknown.stderr) and path.read_bytes() == before

    done = invoke("--site", str(site.source), "--offline", "--user", "svc", "--password-stdin",
                  stdin=PASSWORD + "\n")
    assert done.exit_code == 0, done.output
    assert "against this dataset's policy" in done.stdout and done.stderr == ""
    cred = read_cache(path)[site.name]
    assert (cred.user, cred.checked) == ("svc", "offline") and mode_of(path) == 0o600
    assert cred.scalar.equals(password_scalar(PASSWORD, "svc", site.name, cred.salt, cred.params))
    assert_no_secret([done.output], cred, PASSWORD)

    loner = invoke("--site", str(site.source), "--offline", "--user", "loner", "--password-stdin",
                   stdin=PASSWORD + "\n")
    assert loner.exit_code == 0
    assert "group services" in one_line(loner.stderr)
    assert read_cache(path)[site.name].user == "loner"

    # --offline where the dataset holds no policy (not the core's host): one line, exit 1
    other = host_dir(tmp_path)
    elsewhere = dataclasses.replace(site, dataset=other)
    elsewhere_file = tmp_path / "elsewhere.yaml"
    elsewhere_file.write_text(Path(site.source).read_text().replace(str(site.dataset), str(other)))
    assert parse_site(elsewhere_file.read_text(), elsewhere_file).dataset == elsewhere.dataset
    nopolicy = invoke("--site", str(elsewhere_file), "--offline", "--user", "svc", "--password-stdin",
                      stdin=PASSWORD + "\n")
    assert nopolicy.exit_code == 1 and "--offline needs the site's policy" in one_line(nopolicy.stderr)


# --- removing, showing, usage ---------------------------------------------------------------


def test_remove_show_and_usage_mistakes_are_one_line(tmp_path: Path) -> None:
    site = offline_site(tmp_path)
    path = cache_path(site.dataset)
    f = str(site.source)

    removed = invoke("--site", f, "--remove")
    assert removed.exit_code == 0 and f"removed the credentials of site {site.name}" in removed.stdout
    assert not path.exists()
    again = invoke("--site", f, "--remove")
    assert again.exit_code == 0 and f"no credentials of site {site.name}" in again.stdout
    missing = invoke("--site", f, "--show")
    assert missing.exit_code == 1
    assert one_line(missing.stderr).startswith(f"ubi-cache-credentials: no cached credentials at {path}")

    path.touch(mode=0o600)  # an empty file: damaged, said in one line
    empty = invoke("--dataset", str(site.dataset), "--show")
    assert empty.exit_code == 1 and "damaged" in one_line(empty.stderr)
    path.unlink()

    # no terminal and no --user; --password-stdin without --user: exit 2, one line
    for args in (("--site", f), ("--site", f, "--password-stdin")):
        done = invoke(*args, stdin=PASSWORD + "\n")
        assert done.exit_code == 2, done.output
        assert one_line(done.stderr) == "ubi-cache-credentials: no user: give --user NAME"
    # a user but no terminal to ask for the password
    nopw = invoke("--site", f, "--user", "svc")
    assert nopw.exit_code == 1 and "--password-stdin" in one_line(nopw.stderr)
    # no site file; two actions at once
    nosite = invoke("--user", "svc", "--password-stdin", stdin=PASSWORD + "\n")
    assert nosite.exit_code == 2 and "--site" in one_line(nosite.stderr)
    both = invoke("--site", f, "--show", "--remove")
    assert both.exit_code == 2 and "do not go together" in one_line(both.stderr)
    assert not path.exists()


# --- out of date ------------------------------------------------------------------------------


@run_async(timeout_s=30)
async def test_a_changed_password_is_out_of_date_until_cached_again(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        add_service(rs, "svc", PASSWORD)
        host = host_dir(tmp_path)
        await cache_online(rs, host, "svc", PASSWORD)
        works = rs.new_client(credentials=service_credentials(rs.site, host))
        assert await works.login(NAMING_CELL, NAMING_SCHEMA) == "svc"

        rs.policy.edit("set_password", name="svc", **verifier_args(rs.site.name, "svc", NEW_PASSWORD))
        await in_force()
        existing = rs.new_client(credentials=service_credentials(rs.site, host))
        with pytest.raises(CredentialsOutOfDate) as err:
            await existing.login(NAMING_CELL, NAMING_SCHEMA)
        message = str(err.value)
        assert "out of date" in message and f"ubi-cache-credentials --site {rs.site.source}" in message
        assert "svc" in message and PASSWORD not in message and NEW_PASSWORD not in message
        assert "\n" not in message

        done = await cache_online(rs, host, "svc", NEW_PASSWORD)
        assert done.returncode == 0
        fresh = rs.new_client(credentials=service_credentials(rs.site, host))
        assert await fresh.login(NAMING_CELL, NAMING_SCHEMA) == "svc"
        # the client that failed re-reads the renewed file at its next login
        assert await existing.login(NAMING_CELL, NAMING_SCHEMA) == "svc"
        await existing.call(NAMING_CELL, "UPerm::Config", "settings")  # and works (services read the policy)


@run_async(timeout_s=30)
async def test_a_removed_or_disabled_user_is_out_of_date(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        for name in ("gone", "off"):
            add_service(rs, name, PASSWORD)
            await cache_online(rs, host_dir(tmp_path, name), name, PASSWORD)
        rs.policy.remove_user("gone")
        rs.policy.set_enabled("off", False)
        await in_force()
        for name in ("gone", "off"):
            client = rs.new_client(credentials=service_credentials(rs.site, tmp_path / name))
            with pytest.raises(CredentialsOutOfDate) as err:
                await client.login(NAMING_CELL, NAMING_SCHEMA)
            assert "ubi-cache-credentials" in str(err.value) and name in str(err.value)
        # enabled again: the same cache works (its record did not change)
        rs.policy.set_enabled("off", True)
        await in_force()
        again = rs.new_client(credentials=service_credentials(rs.site, tmp_path / "off"))
        assert await again.login(NAMING_CELL, NAMING_SCHEMA) == "off"


# --- the copy for a backup machine --------------------------------------------------------------


@run_async(timeout_s=30)
async def test_copy_to_a_second_dataset_brings_an_instance_up_there(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[]) as rs:
        backup = host_dir(tmp_path, "backup")
        original = cache_path(rs.site.dataset)
        done = await tool("--dataset", str(rs.site.dataset), "--copy-to", str(backup))
        assert done.returncode == 0, done.stderr
        assert one_line(done.stdout) == f"copied {original} to {cache_path(backup)}"
        copy = cache_path(backup)
        assert copy.read_bytes() == original.read_bytes()
        assert mode_of(copy) == 0o600 and os.lstat(copy).st_uid == os.getuid()
        # through the site file too, and again (an existing copy is replaced atomically)
        again = await tool("--site", str(rs.site.source), "--copy-to", str(backup))
        assert again.returncode == 0 and copy.read_bytes() == original.read_bytes()
        # a missing target directory: one line
        nodir = await tool("--dataset", str(rs.site.dataset), "--copy-to", str(tmp_path / "nowhere"))
        assert nodir.returncode == 1 and "does not exist" in one_line(nodir.stderr)

        # The backup machine: its site file names the second dataset, the core is the
        # first site's. Only the copy is there to log in with.
        original.rename(original.with_name("moved-away"))
        site_b = dataclasses.replace(rs.site, dataset=backup)
        plan = rs.plan(CONFIG_UPDATE, "Site")
        async with serve_instance(site_b, plan) as server:
            iid = server.core.instance_id
            naming = await rs.client.naming()
            await naming.wait_for(
                lambda c: (row := c.table("instances").get((CONFIG_UPDATE, "Site"))) is not None
                and row.instance_id == iid, 5.0)  # type: ignore[attr-defined]
            found = await rs.client.find("Site", CONFIG_UPDATE)
            assert found.rpc == server.rpc_endpoint and found.pid == os.getpid()
            await rs.client.call("Site", CONFIG_UPDATE, "set_sink", sensor="S-002", sink="udp://backup")
            got = await rs.client.call("Site", CONFIG_UPDATE, "get_sensor", sensor="S-002")
            assert got["sink"] == "udp://backup"
            assert (backup / "run").is_dir()  # its ipc endpoint lives in the second dataset
