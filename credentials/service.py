"""Service users at work: the credentials a site's processes log in with (DESIGN.md §7).

Controllers and instances authenticate like any client, as a *service user* (a user of
``UPerm::Config`` in the group ``services``), without anyone typing a password and
without a password on disk: ``ubi-cache-credentials`` logs in once and writes the
password-derived scalar π, with the salt and Argon2id costs it was derived for, to
``<dataset>/credentials.dat`` (:mod:`ubicore.credentials.cache`). A process loads it
with :func:`service_credentials`; its logins then run no KDF at all.

When the site's record no longer matches the cache (the password was changed, the user
removed or disabled, the costs raised) pass 2 of a login brings another salt or other
costs, and the login fails before pass 3 with :class:`CredentialsOutOfDate`, whose
message names the tool to run. A process whose cache was renewed while it ran picks
the new entry up at its next login: the secret re-reads the file on a mismatch.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ubicore.client import NAMING_CELL, NAMING_SCHEMA, Client
from ubicore.config.model import SiteConfig
from ubicore.runtime import CACHE_TOOL as TOOL
from ubicore.runtime import cache_tool_hint as tool_hint
from ubicore.errors import AuthenticationFailed, CallTimeout, PermissionDenied, RemoteError, Unavailable
from ubicore.security.amp import CredentialsOutOfDate, PasswordSecret, ScalarSecret, password_scalar
from ubicore.security.model import UserKind
from ubicore.security.policy import Right
from ubicore.security.primitives import KdfParams, Secret, base_mul, ct_equal
from ubicore.sessions import Credentials
from .cache import (
    CachedCredential,
    CredentialsError,
    CredentialsMissing,
    cache_path,
    encode_cache,
    load_credential,
    parse_cache,
)

PERM_SCHEMA = "UPerm::Config"
EX_CONFIG = 78
"""Exit status of a process whose credentials are missing, unsafe or refused (sysexits'
EX_CONFIG): supervisors do not restart it, since only an operator can fix that."""

__all__ = [
    "EX_CONFIG",
    "TOOL",
    "CachedSecret",
    "ServiceRights",
    "check_offline",
    "check_online",
    "credentials_of",
    "obtain",
    "service_credentials",
    "tool_hint",
]




def _out_of_date(site: SiteConfig, user: str) -> CredentialsOutOfDate:
    return CredentialsOutOfDate(
        f"cached credentials of {user} for site {site.name} are out of date (the password was changed, the "
        f"user removed or disabled, or the site raised its Argon2 costs): {tool_hint(site)}")


class CachedSecret(ScalarSecret):
    """π from ``credentials.dat``. On a salt or cost mismatch it re-reads the file once
    (an operator may have cached anew while the process ran) before it gives up with
    :class:`CredentialsOutOfDate`."""

    __slots__ = ("_path", "_site", "_user", "_mtime")

    def __init__(self, cred: CachedCredential, path: Path | None, site: SiteConfig) -> None:
        super().__init__(cred.scalar, cred.salt, cred.params)
        self._path, self._site, self._user = path, site, cred.user
        self._mtime = _mtime(path)

    def scalar(self, user: str, site: str, salt: bytes, params: KdfParams) -> Secret:
        if ct_equal(salt, self.salt) and params == self.params:
            return self._pi
        if self._path is not None and _mtime(self._path) != self._mtime:
            self._mtime = _mtime(self._path)
            with contextlib.suppress(CredentialsError):
                fresh = load_credential(self._path, self._site.name)
                if fresh.user == user:
                    self._pi, self.salt, self.params = fresh.scalar, fresh.salt, fresh.params
                    if ct_equal(salt, self.salt) and params == self.params:
                        return self._pi
        raise _out_of_date(self._site, user)

    def __repr__(self) -> str:
        return "<CachedSecret redacted>"


def _mtime(path: Path | None) -> int:
    if path is None:
        return 0
    try:
        return os.stat(path).st_mtime_ns
    except OSError:
        return 0


def credentials_of(cred: CachedCredential, site: SiteConfig, path: Path | None = None) -> Credentials:
    """Credentials that log in with a cached credential (``path``: the file it came from,
    re-read when the site's record changed; None for one handed over in memory)."""
    return Credentials(cred.user, CachedSecret(cred, path, site))


def service_credentials(site: SiteConfig, dataset: Path | None = None) -> Credentials:
    """The service credentials cached for ``site`` in ``dataset`` (default: the site's):
    CredentialsMissing (naming the tool to run), CredentialsUnsafe or CredentialsDamaged
    when there are none a process may use."""
    path = cache_path(dataset if dataset is not None else site.dataset)
    try:
        cred = load_credential(path, site.name)
    except CredentialsMissing:
        raise CredentialsMissing(f"no cached service credentials for site {site.name} in {path}: "
                                 f"{tool_hint(site)}") from None
    return credentials_of(cred, site, path)


@dataclass(frozen=True, slots=True)
class ServiceRights:
    """What a service user may do, as far as its processes need it."""

    read_policy: bool
    register: bool

    def warnings(self, user: str) -> list[str]:
        if self.read_policy and self.register:
            return []
        missing = [what for what, ok in (("read the security policy (UPerm::Config)", self.read_policy),
                                         ("register instances with naming (UNaming::Registry)", self.register))
                   if not ok]
        return [f"{user} may not {' or '.join(missing)}: its controllers and instances will not come up; "
                f"add it to the group services: ubi security members add {user} services"]


class _Recording(PasswordSecret):
    """A password that remembers the salt, costs and π of its last derivation."""

    __slots__ = ("seen",)

    def __init__(self, password: str) -> None:
        super().__init__(password)
        self.seen: tuple[bytes, KdfParams, Secret] | None = None

    def scalar(self, user: str, site: str, salt: bytes, params: KdfParams) -> Secret:
        pi = super().scalar(user, site, salt, params)
        self.seen = (salt, params, pi)
        return pi

    def __repr__(self) -> str:
        return "<PasswordSecret redacted>"


async def check_online(
    site: SiteConfig, user: str, password: str, *, wait_s: float = 0.0, timeout_s: float = 10.0,
) -> tuple[CachedCredential, ServiceRights | None]:
    """Log in to the site's naming registry as ``user``: the credential to cache, and what
    the user may do (None if that could not be asked). AuthenticationFailed for a wrong
    password or an unknown user; while the core does not answer, waits up to ``wait_s``."""
    secret = _Recording(password)
    async with Client.for_site(site, credentials=Credentials(user, secret), timeout_s=timeout_s) as client:
        loop_deadline = time.monotonic() + wait_s
        while True:
            try:
                await client.login(NAMING_CELL, NAMING_SCHEMA, timeout_s=timeout_s)
                break
            except (CallTimeout, Unavailable):
                if time.monotonic() >= loop_deadline:
                    raise
        if secret.seen is None:  # pragma: no cover - a login always derives π
            raise AuthenticationFailed("authentication failed")
        salt, params, pi = secret.seen
        cred = CachedCredential(site.name, user, salt, params, pi, time.time(), "online")
        rights: ServiceRights | None
        try:
            answer = await client.call(NAMING_CELL, PERM_SCHEMA, "explain", user=user, schema=NAMING_SCHEMA,
                                       cell=NAMING_CELL, right="update")
            rights = ServiceRights(read_policy=True, register=bool(answer.get("allowed")))
        except PermissionDenied:
            rights = ServiceRights(read_policy=False, register=False)
        except (RemoteError, CredentialsOutOfDate, AttributeError):
            rights = None
        return cred, rights


def check_offline(site: SiteConfig, user: str, password: str) -> tuple[CachedCredential, ServiceRights]:
    """Check ``password`` against ``user``'s verifier record in this host's copy of the
    site's policy (the core's dataset): the credential to cache and what the user may do.
    AuthenticationFailed for a wrong password; CredentialsMissing when this dataset holds
    no policy (not the core's host: check online instead)."""
    from ubicore.runtime import cell_parents, check_initialised, offline_policy, perm_path

    build_model = importlib.import_module("ubicore.services.perm").build_model

    try:
        check_initialised(site)
    except Exception:
        raise CredentialsMissing(f"--offline needs the site's policy in this dataset ({perm_path(site)} is "
                                 "missing): run on the core's host, or check online") from None
    with offline_policy(site) as (_, tx):
        row = tx.users.get(user)
        model = build_model(lambda rel: tx[rel], cell_parents(site)).model
    if row is None or not row.enabled or row.kind == UserKind.OS or not row.verifier:
        raise AuthenticationFailed(f"{user} is not an enabled user with a password on site {site.name}")
    params = KdfParams(row.kdf_t, row.kdf_p, row.kdf_m_kib).check()
    pi = password_scalar(password, user, site.name, row.salt, params)
    if not ct_equal(base_mul(pi.value), row.verifier):
        raise AuthenticationFailed(f"wrong password for {user}")
    rights = ServiceRights(read_policy=model.right(user, PERM_SCHEMA, NAMING_CELL) >= Right.READ,
                           register=model.right(user, NAMING_SCHEMA, NAMING_CELL) >= Right.UPDATE)
    return CachedCredential(site.name, user, row.salt, params, pi, time.time(), "offline"), rights


MAX_HANDOFF_BYTES = 64 * 1024
Prompt = Callable[[str, bool], str]
"""(question, hide the answer) → the answer: how a process asks a person."""


def obtain(
    site: SiteConfig, *, daemon: bool, from_stdin: bool = False, prompt: Prompt | None = None,
    check: str = "online", wait_s: float = 30.0,
) -> tuple[Credentials, bytes | None]:
    """The service credentials of a controller (or of ``ubi site up``), and what to hand
    its children on their standard input (None: they read the cache themselves).

    In order: a credential handed over on standard input (``from_stdin``: a parent that
    prompted), the site's ``credentials.dat``, and, only when not ``daemon`` and a
    ``prompt`` is given, a service user and password asked for and checked against the
    site (``check``: "online" logs in to naming, waiting up to ``wait_s`` for the core;
    "offline" checks this dataset's policy). The password is then kept as π in memory
    only. CredentialsError when none of these gives usable credentials."""
    if from_stdin:
        data = sys.stdin.buffer.read(MAX_HANDOFF_BYTES + 1)
        if len(data) > MAX_HANDOFF_BYTES:
            raise CredentialsError("the credentials on standard input are too long")
        cred = parse_cache(data, "standard input").get(site.name)
        if cred is None:
            raise CredentialsMissing(f"no credentials for site {site.name} on standard input")
        return credentials_of(cred, site), data
    try:
        return service_credentials(site), None
    except CredentialsMissing:
        if daemon or prompt is None:
            raise
    user = prompt(f"service user for site {site.name}", False).strip()
    password = prompt(f"password for {user}", True)
    rights: ServiceRights | None
    if check == "offline":
        cred, rights = check_offline(site, user, password)
    else:
        cred, rights = asyncio.run(check_online(site, user, password, wait_s=wait_s))
    for warning in rights.warnings(user) if rights is not None else ():
        print(f"ubi: warning: {warning}", file=sys.stderr)
    return credentials_of(cred, site), encode_cache([cred])


def ensure_cached(site: SiteConfig, user: str | None = None) -> bool:
    """On the core's host with the core down (the demo): make sure ``credentials.dat``
    holds usable credentials of ``user`` (default: the site's service user), giving it a
    new random password (kept nowhere) and caching that if not. True if it cached."""
    import secrets

    from ubicore.runtime import SERVICE_USER, add_service_user, offline_policy

    from .cache import store_credential

    user = user or SERVICE_USER
    path = cache_path(site.dataset)
    with offline_policy(site) as (_, tx):
        row = tx.users.get(user)
    with contextlib.suppress(CredentialsMissing):
        cred = load_credential(path, site.name)
        if row is not None and cred.user == user and row.enabled and ct_equal(cred.salt, row.salt):
            return False
    password = secrets.token_urlsafe(24)
    if row is None:
        add_service_user(site, user, password)
    else:
        from ubicore.security.amp import make_verifier

        params = KdfParams(row.kdf_t, row.kdf_p, row.kdf_m_kib)
        rec = make_verifier(user, site.name, password, params)
        with offline_policy(site) as (obj, tx):
            obj.set_password(tx, user, salt=rec.salt, verifier=rec.verifier, t=params.t, p=params.p,
                             m_kib=params.m_kib)
            obj.set_enabled(tx, user, True)
    cred, _ = check_offline(site, user, password)
    store_credential(path, cred)
    return True
