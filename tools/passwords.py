"""New passwords for ``ubi site init`` and ``ubi security users add|passwd``: generated
(and shown once), from $UBI_NEW_PASSWORD, or asked twice on the terminal."""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Callable
from typing import NoReturn

import click

GENERATED_PASSWORD_BYTES = 18


def _fail(message: str) -> NoReturn:
    click.echo(f"ubi: {message}", err=True)
    sys.exit(1)


def new_password(name: str, generate: bool) -> tuple[Callable[[], str], bool]:
    """Where ``name``'s new password comes from: (a function giving it, whether it is
    generated and must be shown once). Generated with ``generate``, else
    $UBI_NEW_PASSWORD, else asked twice on the terminal; with no terminal, a one-line
    failure now, before anything is done."""
    if generate:
        password = secrets.token_urlsafe(GENERATED_PASSWORD_BYTES)
        return (lambda: password), True
    given = os.environ.get("UBI_NEW_PASSWORD")
    if given is not None:
        if not given:
            _fail("UBI_NEW_PASSWORD is empty; an empty password is only for the user default")
        return (lambda: given), False
    if not sys.stdin.isatty():
        _fail(f"no new password for {name}: set UBI_NEW_PASSWORD, use --generate-password, or run in a terminal")

    def ask() -> str:
        while True:
            entered: str = click.prompt(f"new password for {name}", hide_input=True, confirmation_prompt=True,
                                        err=True)
            if entered:
                return entered
            click.echo("an empty password is only for the user default; try again", err=True)

    return ask, False


def show_generated(name: str, password: str) -> None:
    click.echo(f"password for {name} (shown once): {password}")
