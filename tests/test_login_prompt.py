"""The login prompt's pure parts (ubicore/login.py, issue 4): the line a denial becomes,
the credentials file and its errors, asking sync and async providers, the terminal
prompt. The prompt against a live site is in tests/integration/test_security_model.py."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path
from typing import Any

import pytest

from ubicore.errors import ConfigError
from ubicore.login import CredentialRequest, CredentialsFile, TerminalPrompt, ask, requirement
from ubicore.security.amp import PasswordSecret
from ubicore.sessions import Credentials
from ubicore.testing import TEST_KDF


def request(**kw: Any) -> CredentialRequest:
    base: dict[str, Any] = {"schema": "UTest::Counter", "cell": "Site", "operation": "bump", "user": "default",
                            "groups": ("an administrator",), "message": "This action requires an administrator."}
    base.update(kw)
    return CredentialRequest(**base)


# --- requirement(): the line a denial becomes --------------------------------------------------------


@pytest.mark.parametrize(("groups", "line"), [
    (["an administrator"], "This action requires an administrator."),
    (["an administrator", "a power user"], "This action requires an administrator or a power user."),
    (["an administrator", "a power user", "an operator"],
     "This action requires an administrator, a power user or an operator."),
    (["an administrator", "an administrator", "", "a power user"],
     "This action requires an administrator or a power user."),
    ([], "No group of this site is allowed this action."),
    ([""], "No group of this site is allowed this action."),
])
def test_requirement_names_the_groups_that_would_allow_it(groups: list[str], line: str) -> None:
    assert requirement(groups) == line


# --- CredentialsFile ---------------------------------------------------------------------------------


def creds_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "creds.yaml"
    path.write_text(text, encoding="utf-8")
    os.chmod(path, mode)
    return path


def test_a_private_credentials_file_gives_its_user_and_password(tmp_path: Path) -> None:
    path = creds_file(tmp_path, "user: alice\npassword: s3cret-pw\n")
    provider = CredentialsFile(path)
    got = provider(request())
    assert got is not None and got.user == "alice"
    salt = b"s" * 16
    assert got.secret.scalar("alice", "t", salt, TEST_KDF).value == \
        PasswordSecret("s3cret-pw").scalar("alice", "t", salt, TEST_KDF).value
    assert "s3cret-pw" not in repr(got) and "s3cret-pw" not in repr(provider)
    # Asked again after a refused login, the file declines: it has nothing else to offer.
    assert provider(request(failed=True, attempt=2)) is None


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700 | 0o010])
def test_a_credentials_file_others_can_read_is_refused_with_the_fix(tmp_path: Path, mode: int) -> None:
    path = creds_file(tmp_path, "user: alice\npassword: s3cret-pw\n", mode)
    with pytest.raises(ConfigError) as err:
        CredentialsFile(path).load()
    assert err.value.file == str(path)
    assert f"chmod 600 {path}" in str(err.value)
    assert "s3cret-pw" not in str(err.value)


@pytest.mark.parametrize(("text", "key", "problem"), [
    ("user: [unclosed\n", "", "not valid YAML"),
    ("- alice\n- pw\n", "", "expected a mapping with user and password"),
    ("password: pw\n", "user", "missing, or not a string"),
    ("user: alice\n", "password", "missing, or not a string"),
    ("user: alice\npassword: 1234\n", "password", "missing, or not a string"),
    ("user: alice\npassword: pw\nsite: x\n", "site", "unknown key"),
])
def test_credentials_file_errors_name_the_file_and_the_key(tmp_path: Path, text: str, key: str, problem: str) -> None:
    path = creds_file(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        CredentialsFile(path).load()
    assert (err.value.file, err.value.key_path) == (str(path), key)
    assert problem in err.value.problem
    assert str(err.value).startswith(f"{path}: ")


def test_a_missing_credentials_file_says_it_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.yaml"
    with pytest.raises(ConfigError) as err:
        CredentialsFile(path)(request())
    assert err.value.file == str(path) and "cannot read the credentials" in str(err.value)


# --- ask(): sync and async providers ------------------------------------------------------------------


def test_ask_takes_sync_and_async_providers_and_checks_what_they_return() -> None:
    creds = Credentials.password("alice", "pw")
    seen: list[CredentialRequest] = []

    def sync(req: CredentialRequest) -> Credentials:
        seen.append(req)
        return creds

    async def later(req: CredentialRequest) -> Credentials | None:
        seen.append(req)
        await asyncio.sleep(0)
        return None

    async def main() -> None:
        assert await ask(sync, request()) is creds
        assert await ask(later, request(attempt=2)) is None
        with pytest.raises(TypeError, match="not Credentials or None"):
            await ask(lambda req: ("alice", "pw"), request())  # type: ignore[arg-type,return-value]

    asyncio.run(main())
    assert [r.attempt for r in seen] == [1, 2]


# --- TerminalPrompt -------------------------------------------------------------------------------------


def prompt_once(prompt: TerminalPrompt, req: CredentialRequest) -> Credentials | None:
    return asyncio.run(ask(prompt, req))


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_terminal_prompt_shows_the_line_and_asks_user_and_hidden_password(
        monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    asked: list[str] = []

    def getpass(prompt: str, stream: Any = None) -> str:
        asked.append(prompt)
        return "typed-secret"

    monkeypatch.setattr("sys.stdin", _Tty("alice\n"))
    monkeypatch.setattr("getpass.getpass", getpass)
    got = prompt_once(TerminalPrompt(stream=out), request(failed=True, attempt=2))
    assert got is not None and got.user == "alice"
    text = out.getvalue()
    assert "Login failed." in text
    assert "This action requires an administrator. (bump on UTest::Counter at Site)" in text
    assert asked == ["password: "] and "typed-secret" not in text
    # The name is remembered as the default of the next prompt; an empty line takes it.
    monkeypatch.setattr("sys.stdin", _Tty("\n"))
    prompt = TerminalPrompt(stream=out, user="bob")
    again = prompt_once(prompt, request())
    assert again is not None and again.user == "bob" and "user [bob]: " in out.getvalue()


def test_the_terminal_prompt_declines_without_a_terminal_or_a_name(monkeypatch: pytest.MonkeyPatch) -> None:
    out = io.StringIO()
    monkeypatch.setattr("sys.stdin", io.StringIO("alice\n"))  # not a terminal
    assert prompt_once(TerminalPrompt(stream=out), request()) is None
    assert out.getvalue() == ""
    monkeypatch.setattr("sys.stdin", _Tty("\n"))  # no name entered, none remembered
    assert prompt_once(TerminalPrompt(stream=out), request()) is None


def test_a_credentials_file_reached_through_a_symlink_is_refused(tmp_path: Path) -> None:
    """Review: the file was stat-ed and then read, following symlinks; now it is opened
    once, without following one, and what is checked is what is read."""
    real = creds_file(tmp_path, "user: alice\npassword: pw-1\n")
    link = tmp_path / "link.yaml"
    link.symlink_to(real)
    with pytest.raises(ConfigError) as info:
        CredentialsFile(link).load()
    assert "symlink" in str(info.value) and "pw-1" not in str(info.value)
    assert CredentialsFile(real).load().user == "alice"


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to give the file to another account")
def test_a_credentials_file_of_another_account_is_refused(tmp_path: Path) -> None:
    path = creds_file(tmp_path, "user: alice\npassword: pw-1\n")
    os.chown(path, 65534, -1)
    with pytest.raises(ConfigError, match="another account"):
        CredentialsFile(path).load()


def test_children_do_not_inherit_passwords_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Review: ``ubi site up`` with $UBI_PASSWORD set handed it to every child process."""
    from ubicore.supervisor import child_environment

    monkeypatch.setenv("UBI_PASSWORD", "secret-1")
    monkeypatch.setenv("UBI_NEW_PASSWORD", "secret-2")
    monkeypatch.setenv("UBI_SITE", "cells/demo.yaml")
    env = child_environment()
    assert "UBI_PASSWORD" not in env and "UBI_NEW_PASSWORD" not in env
    assert env["UBI_SITE"] == "cells/demo.yaml"
