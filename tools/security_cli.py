"""``ubi security``: being rewritten over ``UPerm::Config``."""

from __future__ import annotations

import click


def register(cli: click.Group) -> None:
    pass
