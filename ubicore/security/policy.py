"""Where the security decisions come from: the policy interface and its sources.

An instance asks a :class:`SecurityPolicy` what it needs to decide: a user's verifier
record (for the key exchange), the OS user of a Unix uid (for local logins), a
principal's right on (schema, cell), the groups that would grant a right (for the login
prompt), and the level a schema must run at. ``refresh()`` tells the instance, at its
security tick, that the policy changed so that it re-evaluates its live sessions.

The policy of a site is ``UPerm::Config`` (``services/perm.py``). A :class:`PolicySource`
holds its latest :class:`~ubicore.security.model.PolicyModel` (fed by the core's own
store, or by an instance's cache of ``UPerm::Config``); each instance reads it through a
:class:`ModelPolicy` of its own. :class:`StaticPolicy` serves unit tests and embedded
instances with a fixed set of users.
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

from ..schema import Protection
from .amp import VerifierRecord, make_verifier
from .primitives import DEFAULT_KDF, KdfParams, Secret

if TYPE_CHECKING:
    from .model import PolicyModel

DEFAULT_USER = "default"
SECRET_BYTES = 32
_USER_RE = re.compile(r"[A-Za-z0-9_.@\[\]-]{1,64}")


class Right(enum.IntEnum):
    """What a principal may do; ordered none < read < update."""

    NONE = 0
    READ = 1
    UPDATE = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class SecurityPolicy(Protocol):
    """What an instance needs to decide (see the module docstring)."""

    site: str

    @property
    def server_secret(self) -> Secret: ...

    @property
    def fake_params(self) -> KdfParams: ...

    def verifier(self, user: str) -> VerifierRecord | None: ...

    def right(self, user: str, schema: str, cell: str) -> Right: ...

    def granting_groups(self, schema: str, cell: str, right: Right) -> list[str]: ...

    def os_user(self, uid: int) -> str | None: ...

    def level(self, schema: str) -> Protection | None: ...

    def locked_out(self, user: str, address: str, now: float) -> float | None: ...

    def refresh(self) -> bool: ...


def check_user_name(name: str) -> str:
    if not _USER_RE.fullmatch(name):
        raise ValueError(f"user name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ - [ ]")
    return name


class PolicySource:
    """The latest policy model of a site, as one process knows it; instances read it
    through their own :class:`ModelPolicy`. ``ready`` once a first model arrived (before
    that nobody is known, and every protected action is refused)."""

    def __init__(self, site: str, *, fake_params: KdfParams = DEFAULT_KDF) -> None:
        from .model import PolicyModel

        self.site = site
        self.model: PolicyModel = PolicyModel()
        self.version = 0
        self.server_secret = Secret(os.urandom(SECRET_BYTES))
        self.fake_params = fake_params
        self._listeners: list[Callable[[], None]] = []

    def __repr__(self) -> str:
        return f"<PolicySource site={self.site!r} v{self.version} {self.model!r}>"

    def update(self, model: PolicyModel, *, fake_key: bytes = b"", kdf: KdfParams | None = None) -> None:
        """Install a new model (and the site's fake-record key and costs, if given)."""
        self.model = model
        if len(fake_key) == SECRET_BYTES:
            self.server_secret = Secret(fake_key)
        if kdf is not None:
            self.fake_params = kdf
        self.version += 1
        for listener in list(self._listeners):
            listener()

    @property
    def ready(self) -> bool:
        """True once a first model arrived."""
        return self.version > 0

    def subscribe(self, listener: Callable[[], None]) -> Callable[[], None]:
        """Call ``listener()`` after every update; returns the unsubscribe function."""
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def policy(self) -> ModelPolicy:
        return ModelPolicy(self)


class ModelPolicy:
    """One instance's view of a :class:`PolicySource`: it moves to a new model only at
    :meth:`refresh`, so that the instance re-evaluates its sessions against the model
    it then decides with."""

    def __init__(self, source: PolicySource) -> None:
        self.source = source
        self.site = source.site
        self._seen = source.version
        self.model = source.model

    def __repr__(self) -> str:
        return f"<ModelPolicy {self.source!r}>"

    @property
    def server_secret(self) -> Secret:
        return self.source.server_secret

    @property
    def fake_params(self) -> KdfParams:
        return self.source.fake_params

    def refresh(self) -> bool:
        if self._seen == self.source.version:
            return False
        self._seen = self.source.version
        self.model = self.source.model
        return True

    def verifier(self, user: str) -> VerifierRecord | None:
        return self.model.verifier(user)

    def os_user(self, uid: int) -> str | None:
        u = self.model.os_user(uid)
        return None if u is None else u.name

    def right(self, user: str, schema: str, cell: str) -> Right:
        return self.model.right(user, schema, cell)

    def granting_groups(self, schema: str, cell: str, right: Right) -> list[str]:
        return [g.label for g in self.model.granting_groups(schema, right)]

    def level(self, schema: str) -> Protection | None:
        return self.model.level(schema)

    def locked_out(self, user: str, address: str, now: float) -> float | None:
        return self.model.locked_out(user, address, now)


class StaticPolicy:
    """An in-memory policy: for tests, embedded sites, and instances with no store.

    ``users`` maps a name to (record, right); ``levels`` maps schema → level.
    """

    def __init__(
        self,
        site: str,
        users: Mapping[str, tuple[VerifierRecord, Right]] | None = None,
        levels: Mapping[str, Protection] | None = None,
        *,
        server_secret: Secret | None = None,
        fake_params: KdfParams = DEFAULT_KDF,
        groups: Mapping[Right, list[str]] | None = None,
    ) -> None:
        self.site = site
        self.users: dict[str, tuple[VerifierRecord, Right]] = dict(users or {})
        self.levels: dict[str, Protection] = dict(levels or {})
        self.server_secret = server_secret or Secret(os.urandom(SECRET_BYTES))
        self.fake_params = fake_params
        self.groups = dict(groups or {})
        self.os_users: dict[int, str] = {}
        self.lockouts: dict[tuple[str, str], float] = {}
        self._changed = False

    def __repr__(self) -> str:
        return f"<StaticPolicy site={self.site!r} users={sorted(self.users)}>"

    def add_user(self, name: str, password: str, right: Right, *, kdf: KdfParams | None = None) -> None:
        self.users[name] = (make_verifier(name, self.site, password, kdf or self.fake_params), right)
        self._changed = True

    def set_right(self, name: str, right: Right) -> None:
        self.users[name] = (self.users[name][0], right)
        self._changed = True

    def remove_user(self, name: str) -> None:
        self.users.pop(name, None)
        self._changed = True

    def set_level(self, schema: str, level: Protection | None) -> None:
        if level is None:
            self.levels.pop(schema, None)
        else:
            self.levels[schema] = level
        self._changed = True

    def verifier(self, user: str) -> VerifierRecord | None:
        entry = self.users.get(user)
        return entry[0] if entry else None

    def os_user(self, uid: int) -> str | None:
        return self.os_users.get(uid)

    def right(self, user: str, schema: str, cell: str) -> Right:
        entry = self.users.get(user)
        return entry[1] if entry else Right.NONE

    def granting_groups(self, schema: str, cell: str, right: Right) -> list[str]:
        return list(self.groups.get(right, []))

    def level(self, schema: str) -> Protection | None:
        return self.levels.get(schema)

    def locked_out(self, user: str, address: str, now: float) -> float | None:
        until = max(self.lockouts.get(("user", user), 0.0), self.lockouts.get(("address", address), 0.0))
        return until if until > now else None

    def refresh(self) -> bool:
        changed, self._changed = self._changed, False
        return changed
