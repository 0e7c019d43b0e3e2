"""Serving the core and single instances inside one asyncio loop.

Processes (``ubi core``, the instances a controller starts) and in-process tests use
the same two coroutines: :func:`serve_core` runs the core schema services on the site's
fixed core endpoints, :func:`serve_instance` runs one planned instance on a free port of
its host's address and keeps its registration with naming true until it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import pwd
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from . import localipc
from .cache import Cache
from .client import NAMING_CELL, NAMING_SCHEMA, Client
from .config.model import InstancePlan, SiteConfig
from .dispatch import InstanceCore
from .errors import AuthenticationFailed, ConfigError, PermissionDenied, RemoteError, SchemaError
from .security.amp import CredentialsOutOfDate
from .schema import Protection, Schema, registered_schemas
from .security.model import PolicyModel
from .security.policy import DEFAULT_USER, PolicySource, SecurityPolicy, StaticPolicy
from .security.primitives import DEFAULT_KDF, KdfParams
from .sessions import Credentials
from .service import DEFAULT_HEARTBEAT_S, InstanceServer
from .store import Store, Transaction, udata_path

log = logging.getLogger(__name__)

BUILTIN_SERVICE_MODULES = (
    "ubicore.services.naming",
    "ubicore.services.perm",
    "ubicore.services.configuration",
    "ubicore.services.positions",
)
REGISTRATION_CHECK_S = 2.0
PERM_SCHEMA = "UPerm::Config"
SERVICE_USER = "site-service"
"""The service user ``ubi site init --service-user`` and the test harnesses make."""
POLICY_WATCH_S = 0.25
POLICY_STALE_WARN_S = 10.0


def load_schemas(site: SiteConfig) -> None:
    """Import the shipped services and the site's ``imports`` so their schemas register."""
    for name in BUILTIN_SERVICE_MODULES:
        importlib.import_module(name)
    for i, name in enumerate(site.imports):
        try:
            importlib.import_module(name)
        except SchemaError:
            raise
        except Exception as exc:
            raise ConfigError(str(site.source), f"imports[{i}]", f"cannot import {name}: {exc}") from None


def resolve_schema(site: SiteConfig, name: str) -> type[Schema]:
    load_schemas(site)
    cls = registered_schemas().get(name)
    if cls is None:
        raise ConfigError(str(site.source), "deployments", f"no schema {name} is declared (missing import?)")
    return cls


def cell_parents(site: SiteConfig) -> dict[str, str | None]:
    return {name: cell.parent for name, cell in site.cells.items()}


def ipc_endpoint(site: SiteConfig, schema: str, cell: str) -> str:
    """The ``ipc://`` endpoint (schema, cell) binds on this host (ubicore/localipc.py)."""
    localipc.ensure_run_dir(site)
    return localipc.endpoint(site, schema, cell)


def perm_path(site: SiteConfig) -> Path:
    return udata_path(site.dataset, NAMING_CELL, PERM_SCHEMA)


def check_initialised(site: SiteConfig) -> None:
    """ConfigError (with the command that fixes it) unless ``ubi site init`` made the site."""
    if not perm_path(site).exists():
        raise ConfigError(str(site.source), "dataset",
                          f"the site is not initialised (no {perm_path(site)}): run 'ubi site init {site.source}'")


def init_site(
    site: SiteConfig,
    admin_password: str,
    *,
    admin_user: str = "administrator",
    kdf: KdfParams = DEFAULT_KDF,
    os_user: tuple[str, int] | None = None,
    service_user: str | None = SERVICE_USER,
) -> bool:
    """Create the site's dataset and its factory policy (``services/perm.py``): the
    administrator (a member of ``admin``), ``default`` (empty password), the groups
    ``admin``, ``everyone`` and ``services``, ``os_user`` (name, uid: the account the
    site's services run as) in ``services``, and the service user ``service_user`` (in
    ``services``) whose credentials are cached in the dataset's ``credentials.dat`` for
    this host's controllers: its password is random and kept nowhere. False if the site
    was initialised already."""
    import secrets

    from .security.amp import make_verifier, password_scalar

    load_schemas(site)
    perm = importlib.import_module("ubicore.services.perm")
    schema = registered_schemas()[PERM_SCHEMA]
    store = Store(schema, perm_path(site))
    try:
        if store.tables["site"]:
            return False
        with contextlib.suppress(OSError):
            os.chmod(Path(site.dataset), 0o700)
        admin = make_verifier(admin_user, site.name, admin_password, kdf)
        default = make_verifier(DEFAULT_USER, site.name, "", kdf)
        tx = store.transaction()
        perm.write_factory_policy(tx, site.name, kdf, admin, default, os_user)
        cached = None
        if service_user is not None:
            password = secrets.token_urlsafe(24)
            rec = make_verifier(service_user, site.name, password, kdf)
            tx.users.insert(name=service_user, kind="service", salt=rec.salt, verifier=rec.verifier, kdf_t=kdf.t,
                            kdf_p=kdf.p, kdf_m_kib=kdf.m_kib, description="the service user of this site's processes")
            tx.members.insert(user=service_user, group="services", cell=NAMING_CELL)
            cached = (rec, password_scalar(password, service_user, site.name, rec.salt, kdf))
        tx.commit()
        os.chmod(perm_path(site), 0o600)
    finally:
        store.close()
    if cached is not None:
        cache = importlib.import_module("ubicore.credentials.cache")
        rec, pi = cached
        cache.store_credential(cache.cache_path(site.dataset), cache.CachedCredential(
            site.name, rec.user, rec.salt, rec.params, pi, time.time(), "offline"))
    return True


def add_service_user(site: SiteConfig, name: str, password: str, *, kdf: KdfParams | None = None,
                     description: str = "a service user of this site's controllers and instances") -> None:
    """Add the service user ``name`` (a member of ``services``) to the policy while the
    core is down (``site init``, the demo, the test harnesses). Its password is what
    ``ubi-cache-credentials`` then caches on each host."""
    from .security.amp import make_verifier

    with offline_policy(site) as (obj, tx):
        site_row = next(iter(tx.site))
        params = kdf or KdfParams(site_row.kdf_t, site_row.kdf_p, site_row.kdf_m_kib)
        rec = make_verifier(name, site.name, password, params)
        obj.add_user(tx, name, kind="service", salt=rec.salt, verifier=rec.verifier, t=params.t, p=params.p,
                     m_kib=params.m_kib, description=description, groups=["services"])


@contextlib.contextmanager
def offline_policy(site: SiteConfig) -> Iterator[tuple[Any, Transaction]]:
    """Edit ``UPerm::Config`` in the dataset while the core is *not* running: (the
    schema object, a transaction) committed on leaving the block, rolled back if an
    error leaves it. Let an operation's error leave the block: one caught inside may
    have written part of its change before it was refused. The demo uses this before it
    brings its site up; a running site is changed with ``ubi security``."""
    load_schemas(site)
    check_initialised(site)
    schema = registered_schemas()[PERM_SCHEMA]
    store = Store(schema, perm_path(site))
    try:
        tx = store.transaction()
        try:
            yield schema(NAMING_CELL, {"cells": cell_parents(site)}), tx
        except BaseException:
            tx.rollback()
            raise
        tx.commit()
    finally:
        store.close()


def current_os_user() -> tuple[str, int]:
    """(login name, uid) of this process's account: the factory policy's service account."""
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"uid{uid}"
    return name, uid


def make_core(
    site: SiteConfig, plan: InstancePlan, schema: type[Schema], policy: SecurityPolicy | None = None
) -> InstanceCore:
    """An instance core for ``plan``; without ``policy``, one that knows no users (an
    embedded or test instance of an open schema)."""
    path = udata_path(site.dataset, plan.cell, plan.schema) if any(
        r.persistent for r in schema.relations.values()
    ) else None
    store = Store(schema, path)
    protection = Protection(plan.protection) if plan.protection else None
    try:
        return InstanceCore(schema, plan.cell, store, options=plan.options, protection=protection,
                            policy=policy or StaticPolicy(site.name), security=site.security)
    except BaseException:
        store.close()
        raise


@contextlib.asynccontextmanager
async def serve_core(site: SiteConfig, *, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> AsyncIterator[InstanceServer]:
    """Run the core schema services while the block runs: the naming registry on the
    site's core endpoints, ``UPerm::Config`` on free ports of the core's address.
    ConfigError if the site was never initialised (``ubi site init``)."""
    check_initialised(site)
    if perm_path(site).stat().st_mode & 0o077:
        raise ConfigError(str(perm_path(site)), "", "the security policy is open to other accounts (it holds "
                                                    f"verifier records); fix it with: chmod 600 {perm_path(site)}")
    registry = resolve_schema(site, NAMING_SCHEMA)
    perm = resolve_schema(site, PERM_SCHEMA)
    source = PolicySource(site.name)
    perm_core = make_core(site, InstancePlan(PERM_SCHEMA, NAMING_CELL, site.core.host, None,
                                             {"cells": cell_parents(site)}), perm, source.policy())
    feed_policy(source, lambda rel: perm_core.store.tables[rel].values(), cell_parents(site))
    perm_core.policy.refresh()
    perm_server = InstanceServer(perm_core, address=site.core.address, heartbeat_s=heartbeat_s,
                                 local=ipc_endpoint(site, PERM_SCHEMA, NAMING_CELL))
    _after_commits(perm_server, lambda: feed_policy(source, lambda rel: perm_core.store.tables[rel].values(),
                                                    cell_parents(site)))
    plan = InstancePlan(NAMING_SCHEMA, NAMING_CELL, site.core.host, None, {})
    try:
        core = make_core(site, plan, registry, source.policy())
    except BaseException:
        perm_core.store.close()
        raise
    core.obj.level_floor = lambda schema, cell: level_floor(site, source, schema, cell)  # type: ignore[attr-defined]
    server = InstanceServer(
        core, address=site.core.address, rpc_port=site.core.rpc_port, event_port=site.core.event_port,
        heartbeat_s=heartbeat_s, local=ipc_endpoint(site, NAMING_SCHEMA, NAMING_CELL),
    )
    try:
        await _start_or_close(perm_server)
    except BaseException:
        core.store.close()
        raise
    try:
        await _start_or_close(server)
    except BaseException:
        await perm_server.stop()
        raise
    try:
        with server.transaction() as tx:
            for s in (server, perm_server):
                tx.instances.upsert(
                    schema=s.core.name, cell=NAMING_CELL, host=site.core.host, rpc=s.rpc_endpoint,
                    events=s.event_endpoint, instance_id=s.core.instance_id, protection=s.core.protection.value,
                    pid=os.getpid(), started=time.time(), local=s.core.endpoints.get("local", ""),
                )
        server.companions[PERM_SCHEMA] = perm_server
        yield server
    finally:
        await server.stop()
        await perm_server.stop()


CACHE_TOOL = "ubi-cache-credentials"


def cache_tool_hint(site: SiteConfig) -> str:
    """What an operator runs when a process has no usable service credentials."""
    return f"run '{CACHE_TOOL} --site {site.source}'"


def cached_service_credentials(site: SiteConfig) -> Credentials:
    """The service credentials cached in the site's dataset (ubicore/credentials)."""
    found: Credentials = importlib.import_module("ubicore.credentials.service").service_credentials(site)
    return found


def level_floor(site: SiteConfig, source: PolicySource, schema: str, cell: str) -> str | None:
    """The level (schema, cell) runs at on this site, as naming holds registrations to
    it: the policy's level for the schema, else its deployment's, else its declaration's
    (None if the core knows none of them)."""
    level = source.model.level(schema) if "::" in schema else None
    if level is not None:
        return level.value
    plan = site.instance(schema, cell) if cell in site.cells else None
    if plan is not None and plan.protection:
        return plan.protection
    cls = registered_schemas().get(schema)
    return cls.default_protection.value if cls is not None else None


def feed_policy(source: PolicySource, rows: Callable[[str], Iterable[Any]], parents: dict[str, str | None]) -> None:
    """Build the policy model from ``UPerm::Config`` rows and install it in ``source``."""
    built = importlib.import_module("ubicore.services.perm").build_model(rows, parents)
    source.update(built.model, fake_key=built.fake_key, kdf=built.kdf)


def _after_commits(server: InstanceServer, then: Callable[[], None]) -> None:
    """Run ``then`` once after the commits of a loop turn (a policy rebuild per batch)."""
    committed = server.core._on_commit
    scheduled = False

    def run() -> None:
        nonlocal scheduled
        scheduled = False
        then()

    def on_commit() -> None:
        nonlocal scheduled
        committed()
        if not scheduled:
            scheduled = True
            asyncio.get_running_loop().call_soon(run)

    server.core._on_commit = on_commit


async def _start_or_close(server: InstanceServer) -> None:
    try:
        await server.start()
    except BaseException:
        server.core.store.close()  # the database was opened before the sockets failed
        raise


async def _register(client: Client, plan: InstancePlan, server: InstanceServer) -> None:
    core = server.core
    await client.call(
        NAMING_CELL, NAMING_SCHEMA, "register",
        schema=plan.schema, cell=plan.cell, host=plan.host, rpc=server.rpc_endpoint,
        events=server.event_endpoint, instance_id=core.instance_id,
        protection=core.protection.value, pid=os.getpid(), local=core.endpoints.get("local", ""),
    )


async def _keep_registered(client: Client, plan: InstancePlan, server: InstanceServer) -> None:
    """Register, then re-register whenever naming lost us (a core restart) or our level
    changed (clients learn it from naming)."""
    wake = asyncio.Event()
    server.on_level_change = lambda level: wake.set()
    while True:
        wake.clear()
        try:
            row = (await client.naming()).table("instances").get((plan.schema, plan.cell))
            if (row is None or row.instance_id != server.core.instance_id  # type: ignore[attr-defined]
                    or row.protection != server.core.protection.value):  # type: ignore[attr-defined]
                await _register(client, plan, server)
                log.info("%s@%s registered with naming (%s)", plan.schema, plan.cell, server.core.protection.value)
        except PermissionDenied as exc:
            log.error("%s@%s: naming refused the registration (%s); retrying", plan.schema, plan.cell, exc.message)
        except (RemoteError, CredentialsOutOfDate) as exc:
            log.warning("%s@%s: naming unreachable or refusing us (%s); retrying", plan.schema, plan.cell, exc)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), REGISTRATION_CHECK_S)


class PolicyFollower:
    """An instance's policy: a cache of ``UPerm::Config`` fed into a :class:`PolicySource`,
    joined with ``client`` (logged in as the process's service user; without one, as the
    OS user of this account over the core's ipc endpoint). DESIGN.md §6: every instance
    follows the policy as a caching client."""

    def __init__(self, site: SiteConfig, client: Client | None = None) -> None:
        self.site = site
        self.source = PolicySource(site.name)
        self._client = client or Client.for_site(site, credentials=Credentials.local())
        self._own_client = client is None
        self._cache: Cache | None = None
        self._scheduled = False
        self._closed = False  # the policy was withdrawn: nobody is known until it is back
        self._watch: asyncio.Task[None] | None = None

    async def start(self, *, retry_s: float = 1.0, warn_after_s: float = 10.0) -> None:
        """Join ``UPerm::Config``; retries until it answers (an instance serves nothing
        protected before it knows the policy)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        warned = False
        while True:
            try:
                self._cache = await self._client.cache(NAMING_CELL, PERM_SCHEMA)
                break
            except CredentialsOutOfDate:
                raise  # only an operator fixes that (ubi-cache-credentials)
            except (RemoteError, ConfigError) as exc:
                if not warned and loop.time() - started > warn_after_s:
                    log.warning("waiting for the site's security policy: %s", exc)
                    warned = True
                if isinstance(exc, AuthenticationFailed) and not warned:
                    log.warning("cannot read the site's security policy: %s", exc)
                    warned = True
                await asyncio.sleep(retry_s)
        self._feed()
        self._cache.on_change(self._changed)
        self._watch = asyncio.create_task(self._watchdog(), name="policy-watchdog")

    async def _watchdog(self) -> None:
        """Fail closed while the policy refuses us (this account lost read on it): an
        instance must not go on deciding with a policy it can no longer follow. A silent
        policy channel (the core down or cut off) is different: the last policy stays,
        and a warning says so every POLICY_STALE_WARN_S."""
        loop = asyncio.get_running_loop()
        warned = loop.time()
        while True:
            await asyncio.sleep(POLICY_WATCH_S)
            try:
                self._check(loop.time(), warned)
                cache = self._cache
                if cache is not None and loop.time() - max(cache.last_message, warned) > POLICY_STALE_WARN_S:
                    log.warning("the site's security policy has been silent for %.0f s (is the core up?); "
                                "deciding with the last one received", loop.time() - cache.last_message)
                    warned = loop.time()
            except Exception:  # the watchdog must not die: fail closed and keep watching
                log.exception("the security policy watchdog failed; refusing protected actions")
                self._close_policy()

    def _check(self, now: float, warned: float) -> None:
        cache = self._cache
        if cache is None:
            return
        if cache.refused is not None and not self._closed:
            log.error("the site's security policy refuses this instance (%s): refusing every "
                      "protected action until it is readable again", cache.refused)
            self._close_policy()
        elif cache.refused is None and self._closed and cache.live:
            self._closed = False
            log.warning("the site's security policy is readable again")
            self._feed()

    def _close_policy(self) -> None:
        if not self._closed:
            self._closed = True
            model = self.source.model
            self.source.update(PolicyModel(levels=model.levels, parents=model.parents))

    def _changed(self, relation: str, old: Any, new: Any) -> None:
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._feed)

    def _feed(self) -> None:
        self._scheduled = False
        cache = self._cache
        if cache is not None and not self._closed:
            feed_policy(self.source, lambda rel: cache.table(rel).values(), cell_parents(self.site))

    async def close(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        if self._cache is not None:
            await self._cache.close()
        if self._own_client:
            await self._client.close()


@contextlib.asynccontextmanager
async def serve_instance(
    site: SiteConfig, plan: InstancePlan, *, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    policy: SecurityPolicy | None = None, credentials: Credentials | None = None,
) -> AsyncIterator[InstanceServer]:
    """Run one planned instance, registered with naming, while the block runs. It logs
    in as ``credentials`` (default: the service credentials cached in the site's
    dataset, ubicore/credentials; CredentialsMissing when there are none) to register
    and, without ``policy``, to follow the site's ``UPerm::Config`` (it waits for it
    first; CredentialsOutOfDate when the site refuses the cache)."""
    schema = resolve_schema(site, plan.schema)
    client = Client.for_site(site, credentials=credentials or cached_service_credentials(site))
    follower: PolicyFollower | None = None
    if policy is None:
        follower = PolicyFollower(site, client)
        try:
            await follower.start()
        except BaseException:
            await follower.close()
            await client.close()
            raise
    active: SecurityPolicy = policy if policy is not None else follower.source.policy()  # type: ignore[union-attr]
    try:
        core = make_core(site, plan, schema, active)
        server = InstanceServer(core, address=site.hosts[plan.host].address, heartbeat_s=heartbeat_s,
                                local=ipc_endpoint(site, plan.schema, plan.cell))
        await _start_or_close(server)
    except BaseException:
        if follower is not None:
            await follower.close()
        await client.close()
        raise
    keeper = asyncio.create_task(_keep_registered(client, plan, server))
    try:
        yield server
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        with contextlib.suppress(RemoteError):
            await client.call(
                NAMING_CELL, NAMING_SCHEMA, "deregister", timeout_s=1.0,
                schema=plan.schema, cell=plan.cell, instance_id=core.instance_id,
            )
        await server.stop()
        if follower is not None:
            await follower.close()
        await client.close()
