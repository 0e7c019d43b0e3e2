"""The interim security store and the in-memory policy (ubicore/security/policy.py)."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ubicore.errors import AuthenticationFailed, ConfigError
from ubicore.schema import Protection
from ubicore.security import primitives as P
from ubicore.security.amp import password_scalar
from ubicore.security.guard import SessionGuard
from ubicore.security.policy import (
    DEFAULT_USER,
    POLICY_FILE,
    SECRET_BYTES,
    SECRET_FILE,
    FileSecurityStore,
    Right,
    StaticPolicy,
    check_user_name,
)
from ubicore.security.primitives import KdfParams

from .guard_support import CELL, IID, SCHEMA, can_read, event, login, make_guard
from .session_support import assert_redacted

KDF = KdfParams(t=1, p=1, m_kib=64)
SITE = "policy-site"
PASSWORD = "correct horse battery staple"


def store_at(tmp_path: Path) -> FileSecurityStore:
    return FileSecurityStore(tmp_path, SITE, kdf=KDF)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def matches(store: FileSecurityStore, user: str, password: str) -> bool:
    rec = store.verifier(user) or store.users()[user].record
    return P.base_mul(password_scalar(password, user, SITE, rec.salt, rec.params).value) == rec.verifier


def test_right_order_and_labels() -> None:
    assert Right.NONE < Right.READ < Right.UPDATE
    assert [r.label for r in Right] == ["none", "read", "update"]


@pytest.mark.parametrize("name", ["", "a b", "x" * 65, "é", "a/b", "a:b"])
def test_bad_user_names(name: str) -> None:
    with pytest.raises(ValueError):
        check_user_name(name)


def test_good_user_names() -> None:
    for name in ("a", "alice.smith@site-1", "x" * 64, "A_9"):
        assert check_user_name(name) == name


# --- FileSecurityStore ----------------------------------------------------------------------------


def test_a_missing_store_is_empty(tmp_path: Path) -> None:
    s = store_at(tmp_path)
    assert not s.exists and s.users() == {} and s.levels() == {}
    assert s.verifier(DEFAULT_USER) is None and s.right(DEFAULT_USER, SCHEMA, CELL) is Right.NONE
    assert len(s.server_secret) == SECRET_BYTES  # fake records still work, stable for the instance
    assert not (tmp_path / "security").exists()  # reading creates nothing


def test_init_creates_default_and_private_files(tmp_path: Path) -> None:
    s = store_at(tmp_path)
    assert s.init()
    sec = tmp_path / "security"
    assert mode(sec / SECRET_FILE) == 0o600 and mode(sec / POLICY_FILE) == 0o600
    assert mode(sec) & 0o077 == 0
    assert len((sec / SECRET_FILE).read_bytes()) == SECRET_BYTES
    assert s.server_secret.value == (sec / SECRET_FILE).read_bytes()
    assert list(s.users()) == [DEFAULT_USER]
    entry = s.users()[DEFAULT_USER]
    assert entry.right is Right.READ and entry.enabled and entry.record.params == KDF
    assert matches(s, DEFAULT_USER, "")
    doc = json.loads((sec / POLICY_FILE).read_text())
    assert doc["version"] == 1 and doc["site"] == SITE and doc["kdf"] == {"t": 1, "p": 1, "m_kib": 64}
    key = (sec / SECRET_FILE).read_bytes()
    assert not s.init()  # a second init changes nothing
    assert (sec / SECRET_FILE).read_bytes() == key


def test_round_trip_through_a_second_reader(tmp_path: Path) -> None:
    w = store_at(tmp_path)
    w.init()
    w.set_user("alice", PASSWORD, Right.UPDATE)
    w.set_user("bob", "bob-pw", Right.READ)
    w.set_level("ULocation::Positions", Protection.FULL)
    w.set_level("UTest::Counter", Protection.UPDATE)
    r = FileSecurityStore(tmp_path, SITE)  # no kdf given: the store's own costs are used
    assert r.kdf == KDF
    assert sorted(r.users()) == ["alice", "bob", DEFAULT_USER]
    assert r.right("alice", SCHEMA, CELL) is Right.UPDATE and r.right("bob", SCHEMA, CELL) is Right.READ
    assert matches(r, "alice", PASSWORD) and not matches(r, "alice", "bob-pw")
    assert r.levels() == {"ULocation::Positions": Protection.FULL, "UTest::Counter": Protection.UPDATE}
    assert r.level("ULocation::Positions") is Protection.FULL and r.level("A::B") is None
    assert r.server_secret == w.server_secret

    w.set_right("bob", Right.NONE)
    w.set_enabled("alice", False)
    w.set_level("UTest::Counter", None)
    w.set_level("Never::Set", None)
    assert r.refresh()
    assert r.right("bob", SCHEMA, CELL) is Right.NONE
    assert r.verifier("alice") is None and r.right("alice", SCHEMA, CELL) is Right.NONE
    assert not r.users()["alice"].enabled
    assert r.levels() == {"ULocation::Positions": Protection.FULL}

    w.set_enabled("alice", True)
    w.remove_user("bob")
    assert r.refresh()
    assert r.verifier("alice") is not None and "bob" not in r.users() and r.verifier("bob") is None


def test_set_user_changes_the_salt_and_keeps_others(tmp_path: Path) -> None:
    s = store_at(tmp_path)
    s.set_user("alice", PASSWORD, Right.READ)  # no init: the store is made on the first write
    assert DEFAULT_USER in s.users()
    old = s.users()["alice"].record
    s.set_user("alice", "new password", Right.UPDATE, create=False)
    new = s.users()["alice"].record
    assert new.salt != old.salt and matches(s, "alice", "new password") and not matches(s, "alice", PASSWORD)
    assert s.users()["alice"].right is Right.UPDATE
    with pytest.raises(KeyError):
        s.set_user("nobody-here", "x", Right.READ, create=False)
    assert "nobody-here" not in store_at(tmp_path).users()
    with pytest.raises(ValueError):
        s.set_user("bad name", "x", Right.READ)


def test_refresh_is_true_only_on_a_change(tmp_path: Path) -> None:
    w = store_at(tmp_path)
    w.init()
    r = store_at(tmp_path)
    assert not r.refresh() and not r.refresh()
    w.set_level("A::B", Protection.FULL)
    assert r.refresh() and not r.refresh()
    w.set_level("A::B", Protection.FULL)  # rewritten with the same content
    assert not r.refresh()
    w.set_right(DEFAULT_USER, Right.NONE)
    assert r.refresh() and not r.refresh()
    (tmp_path / "security" / POLICY_FILE).unlink()
    assert r.refresh() and r.users() == {} and not r.refresh()


def test_store_files_never_hold_the_password(tmp_path: Path) -> None:
    s = store_at(tmp_path)
    s.set_user("alice", PASSWORD, Right.READ)
    s.set_user("bob", PASSWORD + "2", Right.READ)
    s.set_user("alice", PASSWORD + "3", Right.READ, create=False)
    for f in (tmp_path / "security").iterdir():
        data = f.read_bytes()
        for p in (PASSWORD, PASSWORD + "2", PASSWORD + "3"):
            assert p.encode() not in data and p.encode().hex().encode() not in data
    doc = json.loads((tmp_path / "security" / POLICY_FILE).read_text())
    assert set(doc["users"]["alice"]) == {"salt", "verifier", "right", "enabled", "params"}


@pytest.mark.parametrize("text,where", [
    ("{not json", ""),
    ("[]", "version"),
    ('{"version": 2}', "version"),
    ('{"version": 1, "users": {"eve": {"salt": "zz"}}}', "users.eve"),
    ('{"version": 1, "users": {"eve": {"salt": "00", "verifier": "00", "right": "root", '
     '"params": {"t": 1, "p": 1, "m_kib": 64}}}}', "users.eve"),
    ('{"version": 1, "schemas": {"A::B": "secret"}}', "schemas.A::B"),
    ('{"version": 1, "kdf": {"t": 0, "p": 1, "m_kib": 64}}', "kdf"),
])
def test_a_corrupted_store_names_the_file(tmp_path: Path, text: str, where: str) -> None:
    store_at(tmp_path).init()
    path = tmp_path / "security" / POLICY_FILE
    reader = store_at(tmp_path)
    path.write_text(text)
    for attempt in (lambda: store_at(tmp_path), reader.refresh):
        with pytest.raises(ConfigError) as exc:
            attempt()
        assert exc.value.file == str(path) and str(exc.value).startswith(f"{path}: ")
        assert exc.value.key_path == where


def test_a_short_server_key_is_not_used(tmp_path: Path) -> None:
    store_at(tmp_path).init()
    (tmp_path / "security" / SECRET_FILE).write_bytes(b"short")
    s = store_at(tmp_path)
    assert len(s.server_secret) == SECRET_BYTES and s.server_secret.value != b"short"


def test_repr_shows_no_secret(tmp_path: Path) -> None:
    s = store_at(tmp_path)
    s.set_user("alice", PASSWORD, Right.READ)
    rec = s.users()["alice"].record
    keys = [s.server_secret.value, rec.verifier, rec.salt]
    for obj in (s, s.users(), s.users()["alice"], rec, s.server_secret):
        assert_redacted(obj, keys, PASSWORD)


def test_the_store_drives_logins_and_reevaluation(tmp_path: Path) -> None:
    s = store_at(tmp_path)
    s.init()
    s.set_user("alice", PASSWORD, Right.READ)
    g = SessionGuard(SCHEMA, CELL, IID, Protection.FULL, s)
    anon = login(g, DEFAULT_USER, "")
    alice = login(g, "alice", PASSWORD)
    with pytest.raises(AuthenticationFailed):
        login(g, "alice", "guess")
    assert can_read(anon, event(g)) and can_read(alice, event(g))
    other = store_at(tmp_path)  # the ubi command's writer
    other.set_enabled("alice", False)
    assert s.refresh()
    g.reevaluate()
    assert set(g.sessions) == {anon.session_id}
    with pytest.raises(AuthenticationFailed):
        login(g, "alice", PASSWORD)
    other.remove_user(DEFAULT_USER)  # anonymous access off
    assert s.refresh()
    g.reevaluate()
    assert not g.sessions
    ev = event(g)
    assert not can_read(anon, ev) and not can_read(alice, ev)


# --- StaticPolicy ---------------------------------------------------------------------------------


def test_static_policy() -> None:
    p = StaticPolicy(SITE, groups={Right.UPDATE: ["an administrator"]}, levels={"A::B": Protection.FULL}, fake_params=KDF)
    assert not p.refresh()
    p.add_user("alice", PASSWORD, Right.READ, kdf=KDF)
    assert p.refresh() and not p.refresh()
    assert p.verifier("alice") is not None and p.verifier("bob") is None
    assert p.right("alice", "A::B", "c") is Right.READ and p.right("bob", "A::B", "c") is Right.NONE
    assert p.granting_groups("A::B", "c", Right.UPDATE) == ["an administrator"]
    assert p.granting_groups("A::B", "c", Right.READ) == []
    groups = p.granting_groups("A::B", "c", Right.UPDATE)
    groups.append("mutated")
    assert p.granting_groups("A::B", "c", Right.UPDATE) == ["an administrator"]
    assert p.level("A::B") is Protection.FULL and p.level("X::Y") is None
    p.set_level("A::B", None)
    p.set_right("alice", Right.UPDATE)
    assert p.refresh() and p.level("A::B") is None and p.right("alice", "", "") is Right.UPDATE
    p.remove_user("alice")
    assert p.refresh() and p.verifier("alice") is None
    assert_redacted(p, [p.server_secret.value], PASSWORD)
    assert len(p.server_secret) == SECRET_BYTES
    assert StaticPolicy(SITE).server_secret != p.server_secret


def test_guard_level_follows_the_store(tmp_path: Path) -> None:
    # What an instance does on refresh: the level named by the store, else its own.
    s = store_at(tmp_path)
    s.init()
    g = make_guard(Protection.UPDATE)
    s.set_level(SCHEMA, Protection.FULL)
    assert g.set_level(s.level(SCHEMA) or Protection.UPDATE) and g.level is Protection.FULL
    s.set_level(SCHEMA, None)
    assert g.set_level(s.level(SCHEMA) or Protection.UPDATE) and g.level is Protection.UPDATE
    assert os.listdir(tmp_path / "security")
