"""Editing a running site's ``UPerm::Config`` from a test, in process and at once.

:class:`PolicyEditor` commits straight into the core's ``UPerm::Config`` instance with
the schema's own operations (so every check they make holds), and the change travels
as it would from ``ubi security``: published on the policy's channel, taken in by every
instance's cache, applied at once. ``RunningSite.policy`` is one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any

from ..schema import Protection
from ..security.amp import make_verifier
from ..security.model import PolicyModel, User
from ..security.policy import Right
from ..security.primitives import KdfParams
from ..service import InstanceServer

__all__ = ["PolicyEditor"]

_PERM = "UPerm::Config"


class PolicyEditor:
    """Synchronous edits of the core's policy; ``server()`` returns the running core's
    ``UPerm::Config`` server (it changes when the core restarts)."""

    def __init__(self, server: Callable[[], InstanceServer], site: str, kdf: KdfParams) -> None:
        self._server = server
        self.site = site
        self.kdf = kdf

    def __repr__(self) -> str:
        return f"<PolicyEditor site={self.site!r}>"

    def edit(self, operation: str, **args: Any) -> Any:
        """Run one of ``UPerm::Config``'s update operations; raises its typed error."""
        server = self._server()
        spec = server.core.schema.operations[operation]
        with server.transaction() as tx:
            return spec.func(server.core.obj, tx, **args)

    @property
    def model(self) -> PolicyModel:
        perm = importlib.import_module("ubicore.services.perm")
        core = self._server().core
        built = perm.build_model(lambda rel: core.store.tables[rel].values(), core.obj.options.get("cells"))
        model: PolicyModel = built.model
        return model

    def users(self) -> Mapping[str, User]:
        return self.model.users

    # --- the shortcuts tests use --------------------------------------------------------------

    def set_user(self, name: str, password: str, right: Right = Right.READ, *, create: bool = True) -> None:
        """Add a password user (``right``: none, read through ``everyone``, update through
        ``admin``), or give an existing one a new password (and that right)."""
        rec = make_verifier(name, self.site, password, self.kdf)
        record = {"salt": rec.salt, "verifier": rec.verifier, "t": rec.params.t, "p": rec.params.p,
                  "m_kib": rec.params.m_kib}
        if name in self.users():
            self.edit("set_password", name=name, **record)
        elif not create:
            raise KeyError(name)
        else:
            self.edit("add_user", name=name, **record)
        self.set_right(name, right)

    def set_right(self, name: str, right: Right) -> None:
        """Site-wide: ``update`` = member of admin and everyone, ``read`` = of everyone only,
        ``none`` = of neither (at Site)."""
        want = {"everyone": right >= Right.READ, "admin": right >= Right.UPDATE}
        have = {(m.group) for m in self.model.members if m.user == name and m.cell == "Site"}
        for group, member in want.items():
            if member and group not in have:
                self.edit("add_member", user=name, group=group, cell="Site")
        for group, member in want.items():
            if not member and group in have:
                self.edit("remove_member", user=name, group=group, cell="Site")

    def set_enabled(self, name: str, enabled: bool) -> None:
        self.edit("set_enabled", name=name, enabled=enabled)

    def remove_user(self, name: str) -> None:
        self.edit("remove_user", name=name)

    def set_level(self, schema: str, level: Protection | None) -> None:
        module, _, name = schema.partition("::")
        if level is None:
            self.edit("clear_level", module=module, schema=name)
        else:
            self.edit("set_level", module=module, schema=name, level=level.value)
