"""``ubi site init`` and ``ubi security`` against a running site.

Most tests serve the site in process (``running_site``) on a loop in a background
thread, because the command runs its own ``asyncio.run`` in the test's thread; the
commands go through click's CliRunner as the operator (the test site's administrator),
over real sockets. One test runs the whole path as an operator would: ``ubi site init``,
a real ``ubi site up``, then ``ubi security``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from click.testing import CliRunner, Result
from ubicore.tools.cli import cli

from tests.tools.site_thread import SiteThread
from ubicore.config import load_site
from ubicore.runtime import perm_path
from ubicore.schema import Protection
from ubicore.testing import (
    COUNTER,
    OPERATOR,
    free_ports,
    site_yaml,
)

from ..pty_support import in_terminal

T = TypeVar("T")
CONFIG = "ULocationSystem::ConfigurationUpdate"
SET_RATE = ("call", "Site", CONFIG, "set_rate", "sensor=S-001", "rate_hz=2")
PROPAGATE_S = 5.0
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def site(tmp_path: Path) -> Iterator[SiteThread]:
    st = SiteThread(tmp_path)
    st.start()
    try:
        yield st
    finally:
        st.stop()


class Ubi:
    """Runs ``ubi`` commands against one site file; keeps every output for a final check."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.outputs: list[str] = []

    def __call__(self, *args: str, user: tuple[str, str] | None = OPERATOR, new_password: str | None = None) -> Result:
        env: dict[str, str | None] = {"UBI_USER": user[0], "UBI_PASSWORD": user[1]} if user else {
            "UBI_USER": "", "UBI_PASSWORD": None}
        env["UBI_NEW_PASSWORD"] = new_password
        res = CliRunner().invoke(cli, ["--site", str(self.path), *args], env=env)
        self.outputs.append(res.output)
        assert "Traceback" not in res.output
        assert res.exception is None or isinstance(res.exception, SystemExit), repr(res.exception)
        return res

    def ok(self, *args: str, **kw: Any) -> Result:
        res = self(*args, **kw)
        assert res.exit_code == 0, res.output
        return res

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def eventually(self, want: int, *args: str, **kw: Any) -> Result:
        """Run the command until it exits ``want`` (instances take in a policy change
        within moments, not at once)."""
        deadline = time.monotonic() + PROPAGATE_S
        while True:
            res = self(*args, **kw)
            if res.exit_code == want or time.monotonic() > deadline:
                assert res.exit_code == want, res.output
                return res
            time.sleep(0.05)


def wait_level(server: Any, level: Protection) -> None:
    """Wait until a live instance runs at ``level``."""
    deadline = time.monotonic() + PROPAGATE_S
    while server.core.protection is not level:
        assert time.monotonic() < deadline, f"the instance did not move to {level.value}"
        time.sleep(0.02)


def one_line(res: Result) -> str:
    lines = res.output.strip().splitlines()
    assert len(lines) == 1, res.output
    return lines[0]


def no_secret_anywhere(ubi: Ubi, dataset: Path, *secrets: str) -> None:
    """No output, and no file of the dataset, holds any of ``secrets``."""
    for secret in secrets:
        assert all(secret not in out for out in ubi.outputs), secret
        for f in dataset.rglob("*"):
            if f.is_file() and not f.is_socket():
                assert secret.encode() not in f.read_bytes(), f"{secret} in {f}"


# --- site init ------------------------------------------------------------------------------------


def write_site_file(tmp_path: Path) -> Path:
    rpc, events = free_ports(2)
    path = tmp_path / "site.yaml"
    path.write_text(site_yaml(tmp_path / "dataset", core_port=rpc, event_port=events))
    return path


TINY_KDF = ("--kdf-t", "1", "--kdf-p", "1", "--kdf-m-kib", "64")


def test_site_init_makes_the_factory_policy_once(tmp_path: Path) -> None:
    path = write_site_file(tmp_path)
    ubi = Ubi(path)
    res = ubi.ok("site", "init", str(path), "--admin", "root-admin", *TINY_KDF, new_password="first-secret")
    out = res.output
    assert out.startswith(f"initialised site test: {perm_path(load_site(path))}")
    assert "argon2id t=1 p=1 m=64 KiB" in out
    assert any(ln.split()[:2] == ["root-admin", "password"] and "admin, everyone" in ln for ln in out.splitlines())
    assert any(ln.startswith("services") and "a site service" in ln for ln in out.splitlines())
    lines = out.splitlines()
    header = lines.index(next(ln for ln in lines if ln.split() == ["GROUP", "MODULE", "SCHEMA", "RIGHT"]))
    rules = {tuple(ln.split()) for ln in itertools.takewhile(str.strip, lines[header + 1:])}
    assert any(ln.startswith("service user site-service: credentials cached in ") for ln in lines)
    assert any(ln.split()[:2] == ["site-service", "service"] and "services" in ln for ln in lines)
    assert rules == {("admin", "default", "default", "update"), ("admin", "UPerm", "default", "update"),
                     ("everyone", "default", "default", "read"), ("services", "UPerm", "Config", "read"),
                     ("services", "UNaming", "Registry", "update"), ("admin", "UAudit", "default", "read"),
                     ("services", "UAudit", "Log", "update")}
    assert os.stat(perm_path(load_site(path))).st_mode & 0o077 == 0

    again = ubi("site", "init", str(path), new_password="other")
    assert again.exit_code == 1
    assert one_line(again) == (f"ubi: site test is initialised already ({perm_path(load_site(path))}); "
                               "change it with 'ubi security'")
    no_secret_anywhere(ubi, tmp_path / "dataset", "first-secret")


def test_site_init_needs_a_password_or_generates_one(tmp_path: Path) -> None:
    path = write_site_file(tmp_path)
    ubi = Ubi(path)
    none = ubi("site", "init", *TINY_KDF)  # CliRunner's stdin is no terminal
    assert none.exit_code == 1 and one_line(none).startswith("ubi: no new password for administrator: ")
    assert not perm_path(load_site(path)).exists()
    bad = ubi("site", "init", "--kdf-t", "0", new_password="x")
    assert bad.exit_code == 1 and one_line(bad) == "ubi: Argon2id costs: Argon2id parameters out of range"

    res = ubi.ok("site", "init", "--generate-password", *TINY_KDF)
    shown = [ln for ln in res.output.splitlines() if ln.startswith("password for administrator (shown once): ")]
    assert len(shown) == 1
    password = shown[0].rsplit(" ", 1)[1]
    assert len(password) >= 20 and res.output.count(password) == 1
    ubi.outputs.remove(res.output)
    no_secret_anywhere(ubi, tmp_path / "dataset", password)


# --- users ----------------------------------------------------------------------------------------


def test_users_add_passwd_enable_disable(site: SiteThread) -> None:
    rs = site.rs
    assert rs is not None
    ubi = Ubi(rs.site.source)
    alice = ("alice", "alice-first-pw")
    res = ubi.ok("security", "users", "add", "alice", "--group", "admin", "--group", "everyone",
                 "--description", "Alice", new_password=alice[1])
    assert one_line(res) == "added alice (password; admin, everyone at Site)"
    ubi.eventually(0, *SET_RATE, user=alice)

    ubi.ok("security", "users", "passwd", "alice", new_password="alice-second-pw")
    old = ubi.eventually(1, *SET_RATE, user=alice)
    assert one_line(old) == "ubi: auth_failed: authentication failed"
    ubi.eventually(0, *SET_RATE, user=("alice", "alice-second-pw"))

    assert one_line(ubi.ok("security", "users", "disable", "alice")) == "alice disabled"
    assert ubi.eventually(1, *SET_RATE, user=("alice", "alice-second-pw")).output.startswith("ubi: auth_failed")
    ubi.ok("security", "users", "enable", "alice")
    ubi.eventually(0, *SET_RATE, user=("alice", "alice-second-pw"))

    listed = {u["name"]: u for u in ubi.json("security", "users", "list")}
    assert listed["alice"] == {"name": "alice", "kind": "password", "enabled": True, "uid": None,
                               "description": "Alice", "kdf": {"t": 1, "p": 1, "m_kib": 64},
                               "groups": [{"group": "admin", "cell": "Site"}, {"group": "everyone", "cell": "Site"}]}
    assert set(listed) >= {"operator", "default", "alice"}
    assert all(set(u) == set(listed["alice"]) for u in listed.values())
    table = ubi.ok("security", "users", "list").output.splitlines()
    assert table[0].split() == ["USER", "KIND", "ENABLED", "UID", "GROUPS", "DESCRIPTION"]
    assert any(ln.split()[:3] == ["alice", "password", "yes"] and "admin, everyone" in ln for ln in table)

    # an OS user by uid, a generated password shown once, and removal
    assert "uid 4242" in ubi.ok("security", "users", "add", "svc-os", "--uid", "4242").output
    gen = ubi.ok("security", "users", "add", "robot", "--kind", "service", "--generate-password")
    password = gen.output.splitlines()[-1].split(": ", 1)[1]
    ubi.outputs.remove(gen.output)
    ubi.eventually(0, "call", "Site", CONFIG, "list_sensors", user=("robot", password))
    ubi.ok("security", "users", "remove", "robot")
    assert "robot" not in {u["name"] for u in ubi.json("security", "users", "list")}

    no_secret_anywhere(ubi, rs.site.dataset, alice[1], "alice-second-pw", password)


def test_users_refusals_are_one_line(site: SiteThread) -> None:
    rs = site.rs
    assert rs is not None
    ubi = Ubi(rs.site.source)
    cases = [
        (("security", "users", "add", "bob"), None, "ubi: no new password for bob: set UBI_NEW_PASSWORD"),
        (("security", "users", "add", "bob", "--kind", "os"), None, "ubi: an OS user needs --uid N or --os-account"),
        (("security", "users", "add", "operator"), "pw", "ubi: bad_arguments: user 'operator' exists"),
        (("security", "users", "add", "b/b"), "pw", "ubi: bad_arguments: user name 'b/b'"),
        (("security", "users", "passwd", "nobody"), "pw", "ubi: not_found: no user 'nobody'"),
        (("security", "users", "disable", "operator"), None, "ubi: bad_arguments: refused: after this change nobody"),
        (("security", "users", "add", "x", "--group", "nogroup"), "pw", "ubi: not_found: no group 'nogroup'"),
    ]
    for args, pw, expected in cases:
        res = ubi(*args, new_password=pw)
        assert res.exit_code == 1 and one_line(res).startswith(expected), (args, res.output)
    assert "x" not in {u["name"] for u in ubi.json("security", "users", "list")}  # one transaction: no half user


def test_a_non_administrator_is_told_who_may(site: SiteThread) -> None:
    rs = site.rs
    assert rs is not None
    ubi = Ubi(rs.site.source)
    ubi.ok("security", "users", "add", "carol", new_password="carol-pw")  # everyone: reads, not the policy
    carol = ("carol", "carol-pw")
    listing = ubi.eventually(1, "security", "users", "list", user=carol)
    assert one_line(listing) == ("ubi: permission_denied: carol may not read UPerm::Config at Site. "
                                 "This action requires an administrator or a site service.")
    change = ubi("security", "groups", "add", "mine", user=carol)
    assert change.exit_code == 1
    assert one_line(change) == ("ubi: permission_denied: carol may not update UPerm::Config at Site. "
                                "This action requires an administrator.")
    anonymous = ubi("security", "rules", "list", user=None)
    assert anonymous.exit_code == 1 and "default may not read UPerm::Config" in anonymous.output
    assert one_line(ubi("security", "users", "list", user=("operator", "wrong"))) == \
        "ubi: auth_failed: authentication failed"


# --- groups, members, rules, explain ------------------------------------------------------------


def test_groups_members_rules_and_explain(site: SiteThread) -> None:
    rs = site.rs
    assert rs is not None
    ubi = Ubi(rs.site.source)
    ubi.ok("security", "users", "add", "dave", "--group", "everyone", new_password="dave-pw")
    ubi.ok("security", "groups", "add", "ops", "--description", "an operator")
    ubi.ok("security", "groups", "add", "power", "--description", "a power user")
    assert one_line(ubi.ok("security", "groups", "imply", "power", "ops")) == "power implies ops"
    assert one_line(ubi.ok("security", "members", "add", "dave", "power", "--cell", "Zone-A")) == \
        "dave is in power at Zone-A"
    assert one_line(ubi.ok("security", "rules", "set", "ops", "UTest", "default", "update")) == \
        "ops: update on UTest::default"

    groups = {g["name"]: g for g in ubi.json("security", "groups", "list")}
    assert groups["power"] == {"name": "power", "description": "a power user", "implies": ["ops"],
                               "members": [{"user": "dave", "cell": "Zone-A"}]}
    assert groups["admin"]["members"] == [{"user": "operator", "cell": "Site"}]
    text = ubi.ok("security", "groups", "list").output.splitlines()
    assert text[0].split() == ["GROUP", "DESCRIPTION", "IMPLIES", "MEMBERS"]
    assert any(ln.startswith("power") and "ops" in ln and "dave@Zone-A" in ln for ln in text)

    assert ubi.json("security", "members", "list", "--user", "dave") == [
        {"user": "dave", "group": "everyone", "cell": "Site"}, {"user": "dave", "group": "power", "cell": "Zone-A"}]
    assert ubi.json("security", "members", "list", "--group", "power") == [
        {"user": "dave", "group": "power", "cell": "Zone-A"}]
    rules = ubi.json("security", "rules", "list")
    assert {"group": "ops", "module": "UTest", "schema": "default", "right": "update", "ignored": False} in rules
    assert {"group": "admin", "module": "UPerm", "schema": "default", "right": "update", "ignored": False} in rules
    assert {"group": "services", "module": "UPerm", "schema": "Config", "right": "read", "ignored": False} in rules
    assert not any(r["group"] == "everyone" and r["module"] == "UPerm" for r in rules)
    # everyone's (default, default, read) does not reach the policy itself
    perm = ubi("security", "explain", "dave", "UPerm::Config")
    assert perm.exit_code == 3 and perm.output.splitlines()[:2] == [
        "denied: dave may not read UPerm::Config at Site", "right:      none (read needed)"]
    assert "reason:     no rule of everyone covers UPerm::Config" in perm.output and "rule:" not in perm.output

    # explain: allowed through membership at Zone-A, implication power → ops, rule of ops
    res = ubi.ok("security", "explain", "dave", COUNTER, "--cell", "Zone-A", "--right", "update")
    assert res.output.splitlines() == [
        f"allowed: dave may update {COUNTER} at Zone-A",
        "right:      update (update needed)",
        "membership: dave in power at Zone-A",
        "path:       power → ops",
        "rule:       (ops, UTest, default, update)",
    ]
    doc = json.loads(ubi.ok("security", "explain", "dave", COUNTER, "--cell", "Zone-A", "--right", "update",
                            "--json").output)
    assert doc["allowed"] and doc["path"] == ["power", "ops"] and doc["membership"]["cell"] == "Zone-A"
    # denied at Site (the membership covers Zone-A and below): exit 3
    denied = ubi("security", "explain", "dave", COUNTER, "--right", "update")
    assert denied.exit_code == 3
    assert denied.output.splitlines()[:2] == [f"denied: dave may not update {COUNTER} at Site",
                                              "right:      read (update needed)"]
    assert "rule:       (everyone, default, default, read)" in denied.output
    assert ubi("security", "explain", "dave", COUNTER, "--right", "update", "--json").exit_code == 3
    nobody = ubi("security", "explain", "nobody", COUNTER)
    assert nobody.exit_code == 3 and "reason:     no such user" in nobody.output
    bad = ubi("security", "explain", "dave", "NoColons")
    assert bad.exit_code == 1 and one_line(bad).startswith("ubi: bad_arguments: ")
    assert "3 denied" in ubi.ok("security", "explain", "--help").output

    # an ignored rule: warned about, still written, exit 0
    ignored = ubi("security", "rules", "set", "ops", "default", "Counter", "read")
    assert ignored.exit_code == 0
    assert ignored.stderr.strip() == ("ubi: warning: a rule (default, Counter) is never consulted; "
                                      "use MODULE::Counter or (default, default)")
    assert any(r["ignored"] for r in ubi.json("security", "rules", "list"))
    assert "never consulted" in ubi.ok("security", "rules", "list").output
    assert ubi.ok("security", "rules", "set", "ops", "UTest", "Counter", "read").stderr == ""

    # taking it apart again
    ubi.ok("security", "rules", "remove", "ops", "default", "Counter")
    ubi.ok("security", "groups", "imply", "power", "ops", "--remove")
    after = ubi("security", "explain", "dave", COUNTER, "--cell", "Zone-A", "--right", "update")
    assert after.exit_code == 3
    ubi.ok("security", "members", "remove", "dave", "power", "--cell", "Zone-A")
    ubi.ok("security", "groups", "describe", "ops", "an operations person")
    assert {g["name"]: g["description"] for g in ubi.json("security", "groups", "list")}["ops"] == \
        "an operations person"
    ubi.ok("security", "groups", "remove", "ops")
    assert not any(r["group"] == "ops" for r in ubi.json("security", "rules", "list"))
    missing = ubi("security", "rules", "remove", "ops", "UTest", "default")
    assert missing.exit_code == 1 and one_line(missing).startswith("ubi: not_found: ")


# --- schema levels --------------------------------------------------------------------------------


def test_schema_set_moves_a_live_instance(site: SiteThread) -> None:
    rs = site.rs
    assert rs is not None
    ubi = Ubi(rs.site.source)
    server = site.call(lambda: rs.server(COUNTER, "Site"))
    assert server.core.protection is Protection.OPEN
    rows = {r["schema"]: r for r in ubi.json("security", "schema", "list")}
    assert rows[COUNTER] == {"schema": COUNTER, "level": "open", "source": "declared", "set": None,
                             "site_file": None, "declared": "open", "deployed": True}
    assert rows[CONFIG]["level"] == "update"

    assert one_line(ubi.ok("security", "schema", "set", "UTest", "Counter", "full")) == f"{COUNTER} is now full"
    wait_level(server, Protection.FULL)
    assert server is site.call(lambda: rs.server(COUNTER, "Site"))  # the same instance: no restart
    rows = {r["schema"]: r for r in ubi.json("security", "schema", "list")}
    assert (rows[COUNTER]["level"], rows[COUNTER]["source"], rows[COUNTER]["set"]) == ("full", "set", "full")
    table = ubi.ok("security", "schema", "list").output.splitlines()
    assert table[0].split()[:3] == ["SCHEMA", "LEVEL", "SOURCE"]
    assert any(ln.split()[:3] == [COUNTER, "full", "set"] for ln in table)
    # anonymous readers of a full schema now need a login; the operator still reads
    assert ubi.eventually(0, "dump", "Site", COUNTER).exit_code == 0

    typo = ubi("security", "schema", "set", "UTest", "Countr", "update")
    assert typo.exit_code == 0 and "warning: the site file deploys no UTest::Countr" in typo.stderr
    fixed = ubi("security", "schema", "set", "UPerm", "Config", "open")
    assert fixed.exit_code == 1 and one_line(fixed) == "ubi: bad_arguments: the level of UPerm::Config is fixed"

    ubi.ok("security", "schema", "clear", "UTest", "Counter")
    wait_level(server, Protection.OPEN)
    cleared = ubi("security", "schema", "clear", "UTest", "Counter")
    assert cleared.exit_code == 1 and one_line(cleared) == "ubi: not_found: no level is set for UTest::Counter"


# --- the login options of call, dump and watch -----------------------------------------------------


def test_credentials_file_logs_in_when_denied(site: SiteThread, tmp_path: Path) -> None:
    rs = site.rs
    assert rs is not None
    ubi = Ubi(rs.site.source)
    creds = tmp_path / "creds.yaml"
    creds.write_text(f"user: {OPERATOR[0]}\npassword: {OPERATOR[1]}\n")
    creds.chmod(0o600)
    denied = ubi(*SET_RATE, user=None)
    assert denied.exit_code == 1 and "permission_denied: default may not update" in denied.output
    assert ubi(*SET_RATE, "--credentials-file", str(creds), user=None).exit_code == 0
    assert ubi(*SET_RATE, "--no-prompt", user=None).exit_code == 1

    ubi.ok("security", "schema", "set", "UTest", "Counter", "full")
    server = site.call(lambda: rs.server(COUNTER, "Site"))
    wait_level(server, Protection.FULL)
    ubi.ok("security", "rules", "set", "everyone", "UTest", "Counter", "none")
    ubi.eventually(1, "dump", "Site", COUNTER, user=None)
    assert ubi("dump", "Site", COUNTER, "--credentials-file", str(creds), user=None).exit_code == 0
    watched = ubi("watch", "Site", COUNTER, "--duration", "0.1", "--credentials-file", str(creds), user=None)
    assert watched.exit_code == 0 and watched.output.startswith("counters (")

    admin_only = ubi("security", "users", "list", user=None)
    assert admin_only.exit_code == 1 and "default may not read UPerm::Config" in admin_only.output
    assert "operator" in ubi.ok("security", "--credentials-file", str(creds), "users", "list", user=None).output

    creds.chmod(0o644)
    loose = ubi(*SET_RATE, "--credentials-file", str(creds), user=None)
    assert loose.exit_code == 1 and one_line(loose) == (
        f"ubi: {creds}: others can read these credentials; fix it with: chmod 600 {creds}")


# --- end to end: processes ------------------------------------------------------------------------


@pytest.mark.slow
def test_init_then_up_then_security_as_processes(tmp_path: Path) -> None:
    from ubicore.controller import wait_until_up
    from ubicore.testing.processes import SITE_TEMPLATE, start_site, stop_site

    rpc, events = free_ports(2)
    path = tmp_path / "site.yaml"
    path.write_text(SITE_TEMPLATE.format(dataset=tmp_path / "dataset", rpc=rpc, events=events))
    ubi = Ubi(path)
    admin = ("chief", "chief-secret-pw")
    ubi.ok("site", "init", "--admin", admin[0], *TINY_KDF, new_password=admin[1])
    proc = start_site(path)
    try:
        assert not asyncio.run(wait_until_up(load_site(path), 30.0))
        ubi.ok("security", "users", "add", "erin", "--group", "admin", "--group", "everyone", user=admin,
               new_password="erin-secret-pw")
        erin = ("erin", "erin-secret-pw")
        ubi.eventually(0, *SET_RATE, user=erin)
        assert ubi.eventually(0, "security", "explain", "erin", CONFIG, "--right", "update", user=erin)
        ubi.ok("security", "users", "disable", "chief", user=erin)
        assert one_line(ubi("security", "users", "list", user=admin)) == "ubi: auth_failed: authentication failed"
    finally:
        stop_site(proc)
    no_secret_anywhere(ubi, tmp_path / "dataset", admin[1], "erin-secret-pw")


# --- in a terminal: the login prompt ---------------------------------------------------------------


def test_a_denied_command_asks_on_the_terminal(site: SiteThread) -> None:
    rs = site.rs
    assert rs is not None
    path = str(rs.site.source)
    login = [("user: ", OPERATOR[0]), ("password: ", OPERATOR[1])]
    code, shown = in_terminal(["--site", path, *SET_RATE], login)
    assert code == 0, shown
    assert f"This action requires an administrator. (set_rate on {CONFIG} at Site)" in shown
    assert shown.rstrip().endswith("ok") and OPERATOR[1] not in shown  # the password is not echoed

    code, shown = in_terminal(["--site", path, "security", "users", "list"], login)
    assert code == 0 and "This action requires an administrator or a site service." in shown
    assert any(ln.split()[:2] == ["operator", "password"] for ln in shown.splitlines()), shown

    code, shown = in_terminal(["--site", path, *SET_RATE, "--no-prompt"], [])
    assert code == 1 and "user: " not in shown
    assert shown.strip().endswith(f"ubi: permission_denied: default may not update {CONFIG} at Site. "
                                  "This action requires an administrator.")
    code, shown = in_terminal(["--site", path, "security", "--no-prompt", "rules", "list"], [])
    assert code == 1 and "user: " not in shown and "default may not read UPerm::Config" in shown


def test_site_init_asks_twice_on_the_terminal(tmp_path: Path) -> None:
    path = write_site_file(tmp_path)
    code, shown = in_terminal(["site", "init", str(path), *TINY_KDF], [
        ("new password for administrator: ", "typed-secret"), ("confirmation: ", "typed-secret")])
    assert code == 0, shown
    assert "initialised site test" in shown and "typed-secret" not in shown
    ubi = Ubi(path)
    no_secret_anywhere(ubi, tmp_path / "dataset", "typed-secret")
