"""``ubi security`` (tools/security_cli.py) and ``--user``/``$UBI_PASSWORD`` of ``ubi``:
click's CliRunner against a site file in a temporary directory; nothing is started."""

from __future__ import annotations

import json
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result

from ubicore.security import primitives as P
from ubicore.security.amp import password_scalar
from ubicore.security.policy import DEFAULT_USER, POLICY_FILE, SECRET_FILE, FileSecurityStore, Right
from ubicore.security.primitives import KdfParams
from ubicore.testing.site import free_ports, site_yaml
from ubicore.tools.cli import cli, credentials

KDF_ARGS = ("--kdf-time", "1", "--kdf-memory-kib", "64", "--kdf-lanes", "1")
KDF = KdfParams(t=1, p=1, m_kib=64)
SITE_NAME = "cli-site"
PASSWORD = "tr0ub4dor&3-long-enough"


@dataclass
class Site:
    path: Path
    dataset: Path

    @property
    def security(self) -> Path:
        return self.dataset / "security"

    @property
    def policy(self) -> Path:
        return self.security / POLICY_FILE

    def store(self) -> FileSecurityStore:
        return FileSecurityStore(self.dataset, SITE_NAME)

    def files_text(self) -> bytes:
        return b"".join(f.read_bytes() for f in self.security.iterdir() if f.is_file())


@pytest.fixture
def site(tmp_path: Path) -> Site:
    core, events = free_ports(2)
    path = tmp_path / "site.yaml"
    path.write_text(site_yaml(tmp_path / "data", core_port=core, event_port=events, name=SITE_NAME))
    return Site(path, tmp_path / "data")


def ubi(site: Site, *args: str, new_password: str | None = None, env: dict[str, Any] | None = None) -> Result:
    e: dict[str, Any] = {"UBI_NEW_PASSWORD": new_password, "UBI_USER": None, "UBI_PASSWORD": None, "UBI_SITE": None}
    e.update(env or {})
    return CliRunner().invoke(cli, ["--site", str(site.path), *args], env=e)


def ok(res: Result) -> str:
    assert res.exit_code == 0, res.output
    assert res.exception is None
    return res.stdout


def failed(res: Result, text: str) -> str:
    """One line ``ubi: ...`` on stderr, status 1, no traceback."""
    assert res.exit_code == 1, res.output
    assert isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("ubi: ") and text in lines[0], res.stderr
    assert res.stdout == ""
    return lines[0]


def init(site: Site) -> None:
    ok(ubi(site, "security", "init", *KDF_ARGS))


def matches(site: Site, user: str, password: str) -> bool:
    rec = site.store().users()[user].record
    return P.base_mul(password_scalar(password, user, SITE_NAME, rec.salt, rec.params).value) == rec.verifier


def users_json(site: Site) -> dict[str, dict[str, Any]]:
    return {r["user"]: r for r in json.loads(ok(ubi(site, "security", "users", "list", "--json")))}


# --- init ----------------------------------------------------------------------------------------


def test_init_creates_the_store_once(site: Site) -> None:
    out = ok(ubi(site, "security", "init", *KDF_ARGS))
    assert out == f"created {site.policy}\n"
    assert stat.S_IMODE(site.policy.stat().st_mode) == 0o600
    assert stat.S_IMODE((site.security / SECRET_FILE).stat().st_mode) == 0o600
    store = site.store()
    assert store.kdf == KDF and list(store.users()) == [DEFAULT_USER]
    assert store.users()[DEFAULT_USER].right is Right.READ and matches(site, DEFAULT_USER, "")
    before = site.policy.read_bytes()
    assert ok(ubi(site, "security", "init")) == f"{site.policy} exists; unchanged\n"
    assert site.policy.read_bytes() == before


@pytest.mark.parametrize("args", [("--kdf-memory-kib", "1"), ("--kdf-lanes", "65"), ("--kdf-time", "100")])
def test_init_refuses_bad_costs(site: Site, args: tuple[str, str]) -> None:
    failed(ubi(site, "security", "init", *args), "Argon2id parameters out of range")
    assert not site.security.exists()


def test_init_over_a_corrupted_store_is_one_line(site: Site) -> None:
    init(site)
    site.policy.write_text("{ not json")
    line = failed(ubi(site, "security", "init", *KDF_ARGS), str(site.policy))
    assert "cannot read the security store" in line
    failed(ubi(site, "security", "users", "list"), str(site.policy))


def test_bad_site_file_is_one_line(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["--site", str(tmp_path / "nope.yaml"), "security", "users", "list"])
    assert res.exit_code == 1 and "nope.yaml" in res.output and "Traceback" not in res.output


# --- users -----------------------------------------------------------------------------------------


def test_add_and_list(site: Site) -> None:
    init(site)
    assert ok(ubi(site, "security", "users", "add", "alice", "--right", "update", new_password=PASSWORD)) \
        == "added alice (update)\n"
    assert ok(ubi(site, "security", "users", "add", "bob", new_password="bob-pw")) == "added bob (read)\n"
    lines = ok(ubi(site, "security", "users", "list")).splitlines()
    assert lines[0].split() == ["USER", "RIGHT", "ENABLED", "KDF"]
    assert [ln.split()[:3] for ln in lines[1:]] == [
        ["alice", "update", "True"], ["bob", "read", "True"], ["default", "read", "True"]]
    rows = users_json(site)
    assert rows["alice"] == {"user": "alice", "right": "update", "enabled": True, "kdf": "argon2id t=1 p=1 m=64KiB"}
    assert matches(site, "alice", PASSWORD) and not matches(site, "alice", "bob-pw")
    assert matches(site, "bob", "bob-pw")
    assert PASSWORD.encode() not in site.files_text() and b"bob-pw" not in site.files_text()


def test_add_an_existing_user(site: Site) -> None:
    init(site)
    ok(ubi(site, "security", "users", "add", "alice", new_password=PASSWORD))
    before = site.policy.read_bytes()
    failed(ubi(site, "security", "users", "add", "alice", new_password="other"), "user 'alice' exists")
    failed(ubi(site, "security", "users", "add", DEFAULT_USER), "user 'default' exists")
    assert site.policy.read_bytes() == before


@pytest.mark.parametrize("name", ["bad name", "x" * 65, "a/b", "é"])
def test_add_a_bad_user_name(site: Site, name: str) -> None:
    init(site)
    failed(ubi(site, "security", "users", "add", name, new_password=PASSWORD), f"user name {name!r}")
    assert list(site.store().users()) == [DEFAULT_USER]


def test_add_without_a_password_and_no_terminal(site: Site) -> None:
    init(site)
    failed(ubi(site, "security", "users", "add", "alice"),
           "no password for alice: set UBI_NEW_PASSWORD, use --generate, or run in a terminal")
    assert "alice" not in site.store().users()
    ok(ubi(site, "security", "users", "add", "carol", new_password=""))  # an empty one is a choice, not a lack
    assert matches(site, "carol", "")


def test_generate_shows_the_password_once_and_never_stores_it(site: Site) -> None:
    init(site)
    out = ok(ubi(site, "security", "users", "add", "alice", "--generate", new_password="ignored-when-generating"))
    first, second = out.splitlines()
    assert first.startswith("password for alice (shown once): ") and second == "added alice (read)"
    password = first.rsplit(" ", 1)[1]
    assert len(password) >= 12 and out.count(password) == 1
    assert matches(site, "alice", password) and not matches(site, "alice", "ignored-when-generating")
    assert password.encode() not in site.files_text()
    again = ok(ubi(site, "security", "users", "passwd", "alice", "--generate")).splitlines()[0].rsplit(" ", 1)[1]
    assert again != password and matches(site, "alice", again) and not matches(site, "alice", password)
    assert again.encode() not in site.files_text()
    listing = ok(ubi(site, "security", "users", "list")) + ok(ubi(site, "security", "users", "list", "--json"))
    assert password not in listing and again not in listing


def test_passwd(site: Site) -> None:
    init(site)
    ok(ubi(site, "security", "users", "add", "alice", "--right", "update", new_password=PASSWORD))
    salt = site.store().users()["alice"].record.salt
    assert ok(ubi(site, "security", "users", "passwd", "alice", new_password="n3w")) == "password of alice changed\n"
    entry = site.store().users()["alice"]
    assert entry.record.salt != salt and entry.right is Right.UPDATE
    assert matches(site, "alice", "n3w") and not matches(site, "alice", PASSWORD)
    failed(ubi(site, "security", "users", "passwd", "alice"), "no password for alice")
    assert matches(site, "alice", "n3w")


def test_right_disable_enable_remove(site: Site) -> None:
    init(site)
    ok(ubi(site, "security", "users", "add", "alice", new_password=PASSWORD))
    assert ok(ubi(site, "security", "users", "right", "alice", "update")) == "alice now has update\n"
    assert site.store().right("alice", "A::B", "c") is Right.UPDATE
    assert ok(ubi(site, "security", "users", "right", "alice", "none")) == "alice now has none\n"
    assert users_json(site)["alice"]["right"] == "none"
    res = ubi(site, "security", "users", "right", "alice", "admin")
    assert res.exit_code == 2 and "Traceback" not in res.output  # a usage error, from click
    assert ok(ubi(site, "security", "users", "disable", "alice")) == "alice disabled\n"
    assert users_json(site)["alice"]["enabled"] is False
    assert site.store().verifier("alice") is None
    assert ok(ubi(site, "security", "users", "enable", "alice")) == "alice enabled\n"
    assert users_json(site)["alice"]["enabled"] is True and site.store().verifier("alice") is not None
    assert matches(site, "alice", PASSWORD)  # the password survived all that
    assert ok(ubi(site, "security", "users", "remove", "alice")) == "removed alice\n"
    assert "alice" not in users_json(site)


@pytest.mark.parametrize("command", [("passwd", "zed"), ("right", "zed", "read"), ("disable", "zed"),
                                     ("enable", "zed"), ("remove", "zed")], ids=lambda c: c[0])
def test_unknown_user(site: Site, command: tuple[str, ...]) -> None:
    init(site)
    before = site.policy.read_bytes()
    failed(ubi(site, "security", "users", *command, new_password="x"), f"no user 'zed' in {site.policy}")
    assert site.policy.read_bytes() == before


def test_removing_default_turns_anonymous_access_off_and_back(site: Site) -> None:
    init(site)
    ok(ubi(site, "security", "users", "remove", DEFAULT_USER))
    assert DEFAULT_USER not in site.store().users()
    # default has the empty password: adding it back asks for none
    assert ok(ubi(site, "security", "users", "add", DEFAULT_USER, "--right", "none")) == "added default (none)\n"
    assert matches(site, DEFAULT_USER, "") and site.store().right(DEFAULT_USER, "", "") is Right.NONE


# --- schema levels ----------------------------------------------------------------------------------


def test_schema_set_list_clear(site: Site) -> None:
    init(site)
    assert ok(ubi(site, "security", "schema", "set", "ULocation::Positions", "full")) == \
        "ULocation::Positions is now full\n"
    ok(ubi(site, "security", "schema", "set", "UTest::Counter", "update"))
    lines = ok(ubi(site, "security", "schema", "list")).splitlines()
    assert [ln.split() for ln in lines] == [["SCHEMA", "LEVEL"], ["ULocation::Positions", "full"],
                                           ["UTest::Counter", "update"]]
    assert json.loads(ok(ubi(site, "security", "schema", "list", "--json"))) == [
        {"schema": "ULocation::Positions", "level": "full"}, {"schema": "UTest::Counter", "level": "update"}]
    assert ok(ubi(site, "security", "schema", "clear", "UTest::Counter")) == "UTest::Counter: override removed\n"
    assert {k: v.value for k, v in site.store().levels().items()} == {"ULocation::Positions": "full"}
    ok(ubi(site, "security", "schema", "set", "ULocation::Positions", "open"))
    assert {k: v.value for k, v in site.store().levels().items()} == {"ULocation::Positions": "open"}


def test_schema_set_errors(site: Site) -> None:
    init(site)
    failed(ubi(site, "security", "schema", "set", "Positions", "full"), "expected MODULE::SCHEMA, got 'Positions'")
    failed(ubi(site, "security", "schema", "set", "UNaming::Registry", "update"), "UNaming::Registry stays open")
    ok(ubi(site, "security", "schema", "set", "UNaming::Registry", "open"))
    ok(ubi(site, "security", "schema", "clear", "UNaming::Registry"))
    res = ubi(site, "security", "schema", "set", "A::B", "secret")
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert site.store().levels() == {}


# --- who a command logs in as -----------------------------------------------------------------------


def test_user_without_password_and_no_terminal(site: Site) -> None:
    res = ubi(site, "--user", "alice", "call", "Site", "A::B", "op", "--timeout", "0.2")
    failed(res, "no password for alice: set UBI_PASSWORD or run in a terminal")
    res = ubi(site, "call", "Site", "A::B", "op", "--timeout", "0.2", env={"UBI_USER": "bob"})
    failed(res, "no password for bob")


def test_credentials_from_user_and_ubi_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("UBI_PASSWORD", PASSWORD)
    ctx = click.Context(cli, obj={"user": "alice"})
    creds = credentials(ctx)
    assert creds is not None and creds.user == "alice"
    assert PASSWORD not in repr(creds) and PASSWORD not in repr(creds.secret)
    salt = b"s" * 16
    assert creds.secret.scalar("alice", SITE_NAME, salt, KDF) == password_scalar(PASSWORD, "alice", SITE_NAME, salt, KDF)
    assert credentials(click.Context(cli, obj={"user": None})) is None  # nobody given: anonymous
    monkeypatch.setenv("UBI_PASSWORD", "")
    empty = credentials(ctx)
    assert empty is not None and empty.user == "alice"  # an empty password is still a password
