"""The login prompt: what the SDK does when an action is denied (DESIGN.md §5).

A denial (``permission_denied``) carries the descriptions of the groups whose members
would be allowed. A client given a *credential provider* turns it into a line such as
"This action requires an administrator or a power user." and asks the provider for
credentials; with credentials the call is retried, and the client keeps them (and the
rights they bring) until it closes. A wrong password is asked for again, up to
:data:`MAX_ATTEMPTS` times. Without a provider, or when the provider declines (returns
None), the caller gets the denial itself.

Providers: :class:`TerminalPrompt` (user and hidden password on the terminal),
:class:`CredentialsFile` (a YAML file with ``user`` and ``password``, private to its
owner), or any callable ``provider(request) -> Credentials | None`` (may be async).
"""

from __future__ import annotations

import errno
import getpass
import inspect
import os
import stat
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import yaml

from .errors import ConfigError
from .sessions import Credentials

__all__ = [
    "MAX_ATTEMPTS",
    "CredentialProvider",
    "CredentialRequest",
    "CredentialsFile",
    "TerminalPrompt",
    "ask",
    "requirement",
]

MAX_FILE_BYTES = 64 * 1024
MAX_ATTEMPTS = 3
"""How many times one denied call asks its provider (a mistyped password is asked again)."""


def requirement(groups: Sequence[str]) -> str:
    """"This action requires an administrator or a power user." from group descriptions."""
    names = list(dict.fromkeys(g for g in groups if g))
    if not names:
        return "No group of this site is allowed this action."
    if len(names) == 1:
        who = names[0]
    else:
        who = ", ".join(names[:-1]) + " or " + names[-1]
    return f"This action requires {who}."


@dataclass(frozen=True, slots=True)
class CredentialRequest:
    """What a provider is asked: which action was refused, to whom, and why."""

    schema: str
    cell: str
    operation: str
    user: str
    """Who the client is logged in as now."""
    groups: tuple[str, ...]
    """Descriptions of the groups that would allow the action."""
    message: str
    """The line to show: "This action requires an administrator." (or why a login failed)."""
    attempt: int = 1
    failed: bool = False
    """True when the previous credentials this provider gave were refused."""


CredentialProvider = Callable[[CredentialRequest], "Credentials | None | Awaitable[Credentials | None]"]


async def ask(provider: CredentialProvider, request: CredentialRequest) -> Credentials | None:
    """Ask a provider, sync or async."""
    got: Any = provider(request)
    if inspect.isawaitable(got):
        got = await got
    if got is not None and not isinstance(got, Credentials):
        raise TypeError(f"a credential provider returned {type(got).__name__}, not Credentials or None")
    return got


class TerminalPrompt:
    """Asks on the terminal: prints the request's line, then user and hidden password.
    Declines (None) when there is no terminal or the user enters no name."""

    def __init__(self, *, stream: TextIO | None = None, user: str | None = None) -> None:
        self._stream = stream
        self._user = user

    def __repr__(self) -> str:
        return "<TerminalPrompt>"

    def __call__(self, request: CredentialRequest) -> Awaitable[Credentials | None]:
        import asyncio

        return asyncio.to_thread(self._ask, request)  # input() must not block the loop

    def _ask(self, request: CredentialRequest) -> Credentials | None:
        out = self._stream or sys.stderr
        if not sys.stdin.isatty():
            return None
        if request.failed:
            print("Login failed.", file=out)
        print(f"{request.message} ({request.operation} on {request.schema} at {request.cell})", file=out)
        try:
            out.write(f"user{f' [{self._user}]' if self._user else ''}: ")
            out.flush()
            user = sys.stdin.readline().strip() or (self._user or "")
            if not user:
                return None
            password = getpass.getpass("password: ", stream=out)
        except (EOFError, KeyboardInterrupt):
            return None
        self._user = user
        return Credentials.password(user, password)


class CredentialsFile:
    """Credentials kept in a YAML file (``user:`` and ``password:``), for unattended
    programs. The file must be its owner's alone (mode 0600); anything else is a
    ConfigError naming the file and what to fix. Given once: a refused login declines."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"<CredentialsFile {self.path}>"

    def load(self) -> Credentials:
        file = str(self.path)
        try:  # one open, no symlink followed: what is checked is what is read
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(file, "", "the credentials file is a symlink; name the file itself") from None
            raise ConfigError(file, "", f"cannot read the credentials: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise ConfigError(file, "", "the credentials file is not a regular file")
            if st.st_uid != os.getuid():
                raise ConfigError(file, "", "the credentials file belongs to another account")
            if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
                raise ConfigError(file, "", f"others can read these credentials; fix it with: chmod 600 {file}")
            try:
                text = f.read(MAX_FILE_BYTES + 1).decode("utf-8")
            except UnicodeDecodeError:
                raise ConfigError(file, "", "not UTF-8 text") from None
        if len(text) > MAX_FILE_BYTES:
            raise ConfigError(file, "", "too large for a credentials file")
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError:
            raise ConfigError(file, "", "not valid YAML") from None
        if not isinstance(doc, dict):
            raise ConfigError(file, "", "expected a mapping with user and password")
        for key in ("user", "password"):
            if type(doc.get(key)) is not str:
                raise ConfigError(file, key, "missing, or not a string")
        unknown = sorted(set(doc) - {"user", "password"})
        if unknown:
            raise ConfigError(file, unknown[0], "unknown key")
        return Credentials.password(doc["user"], doc["password"])

    def __call__(self, request: CredentialRequest) -> Credentials | None:
        if request.failed:
            return None
        return self.load()
