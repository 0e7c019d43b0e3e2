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
    "ubicore.services.audit",
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
    site's core endpoints; ``UPerm::Config``, ``UAudit::Log`` and ``UAudit::Alerts`` on
    free ports of the core's address. ConfigError if the site was never initialised
    (``ubi site init``), AuditKeyError if the audit key file cannot be used."""
    check_initialised(site)
    if perm_path(site).stat().st_mode & 0o077:
        raise ConfigError(str(perm_path(site)), "", "the security policy is open to other accounts (it holds "
                                                    f"verifier records); fix it with: chmod 600 {perm_path(site)}")
    from .audit.keys import load_or_create_keys
    from .audit.trail import AUDIT_ALERTS, AUDIT_LOG, Auditor, CoreWriter, audit_paths

    key_path, checkpoint_path, _ = audit_paths(site)
    for directory in {key_path.parent, checkpoint_path.parent}:
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    trail = udata_path(site.dataset, NAMING_CELL, AUDIT_LOG)
    if not key_path.exists() and _trail_has_records(trail):
        from .audit.chain import AuditKeyError

        raise AuditKeyError(
            f"the audit key file {key_path} is missing but the trail {trail} has records: restore the key file "
            "from its backup (under a new key every record would fail verification), or move the trail aside "
            "to start a new one")
    keys = load_or_create_keys(key_path)
    source = PolicySource(site.name)
    parents = cell_parents(site)

    def plan_of(schema: str, options: dict[str, Any] | None = None) -> InstancePlan:
        return InstancePlan(schema, NAMING_CELL, site.core.host, None, options or {})

    async with contextlib.AsyncExitStack() as stack:
        async def serve(core: InstanceCore, **where: Any) -> InstanceServer:
            server = InstanceServer(core, address=site.core.address, heartbeat_s=heartbeat_s,
                                    local=ipc_endpoint(site, core.name, NAMING_CELL), **where)
            await _start_or_close(server)
            stack.push_async_callback(server.stop)
            return server

        perm_core = make_core(site, plan_of(PERM_SCHEMA, {"cells": parents}), resolve_schema(site, PERM_SCHEMA),
                              source.policy())
        feed_policy(source, lambda rel: perm_core.store.tables[rel].values(), parents)
        perm_core.policy.refresh()
        perm_server = await serve(perm_core)
        log_core = make_core(site, plan_of(AUDIT_LOG), resolve_schema(site, AUDIT_LOG), source.policy())
        log_server = await serve(log_core)
        alerts_core = make_core(site, plan_of(AUDIT_ALERTS), resolve_schema(site, AUDIT_ALERTS), source.policy())
        with contextlib.suppress(OSError):  # who attacked whom, when: for the site's account alone
            os.chmod(udata_path(site.dataset, NAMING_CELL, AUDIT_ALERTS), 0o600)
        alerts_server = await serve(alerts_core)

        def write_lockouts(locks: list[Any]) -> None:
            with perm_server.transaction() as tx:
                keep = {(lk.kind, lk.subject) for lk in locks}
                for row in list(tx.lockouts):
                    if (row.kind, row.subject) not in keep:
                        tx.lockouts.delete(row.kind, row.subject)
                for lk in locks:
                    tx.lockouts.upsert(kind=lk.kind, subject=lk.subject, since=lk.since, until=lk.until,
                                       strikes=lk.strikes)

        def countable(user: str) -> bool:
            found = source.model.users.get(user)
            return found is not None and found.kind == "password"

        writer = CoreWriter(trail, log_core, alerts_core, keys, checkpoint_path, site.audit, write_lockouts,
                            host=site.core.host, countable=countable)
        stack.callback(writer.close)
        _restore_lockouts(writer, perm_core.store.tables["lockouts"].values())
        log_core.obj.writer = writer  # type: ignore[attr-defined]
        stack.callback(writer.checkpoint)
        stack.callback(writer.flush)
        checkpoints = asyncio.create_task(writer.run(), name="audit checkpoints")
        stack.push_async_callback(_cancelled, checkpoints)

        def policy_committed() -> None:
            feed_policy(source, lambda rel: perm_core.store.tables[rel].values(), parents)
            writer.lockouts_changed(perm_core.store.tables["lockouts"].values())

        _after_commits(perm_server, policy_committed)
        core = make_core(site, plan_of(NAMING_SCHEMA), resolve_schema(site, NAMING_SCHEMA), source.policy())
        core.obj.level_floor = lambda schema, cell: level_floor(site, source, schema, cell)  # type: ignore[attr-defined]
        server = await serve(core, rpc_port=site.core.rpc_port, event_port=site.core.event_port)
        auditor = Auditor(writer.local, host=site.core.host, config=site.audit)
        for s in (server, perm_server, log_server, alerts_server):
            s.core.use_audit(auditor.child(cell=NAMING_CELL, schema=s.core.name))
        log_core.update_action = ""  # appends are the trail itself: logins and denials are recorded, not them
        core.update_action = "register"  # naming's register, deregister and report
        auditor.child(cell=NAMING_CELL, schema="")("start", "ok", "", "", f"core of site {site.name} up")
        stack.callback(lambda: auditor.child(cell=NAMING_CELL, schema="")(
            "stop", "ok", "", "", f"core of site {site.name} stopping"))
        with server.transaction() as tx:
            for s in (server, perm_server, log_server, alerts_server):
                tx.instances.upsert(
                    schema=s.core.name, cell=NAMING_CELL, host=site.core.host, rpc=s.rpc_endpoint,
                    events=s.event_endpoint, instance_id=s.core.instance_id, protection=s.core.protection.value,
                    pid=os.getpid(), started=time.time(), local=s.core.endpoints.get("local", ""),
                )
        server.companions.update({PERM_SCHEMA: perm_server, AUDIT_LOG: log_server, AUDIT_ALERTS: alerts_server})
        yield server


def _trail_has_records(path: Path) -> bool:
    import sqlite3

    if not path.exists():
        return False
    try:
        db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            return db.execute("SELECT 1 FROM records LIMIT 1").fetchone() is not None
        finally:
            db.close()
    except sqlite3.Error:
        return True  # unreadable: not ours to start anew


async def _cancelled(task: asyncio.Task[Any]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _restore_lockouts(writer: Any, rows: Iterable[Any]) -> None:
    from .audit.watch import Lockout

    writer.watch.restore([Lockout(r.kind, r.subject, r.since, r.until, r.strikes) for r in rows])


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


async def _keep_registered(
    client: Client, plan: InstancePlan, server: InstanceServer, stop: asyncio.Event
) -> None:
    """Register, then re-register whenever naming lost us (a core restart) or our level
    changed (clients learn it from naming), until ``stop``. (The loop checks ``stop``
    itself: Python 3.11's wait_for can swallow a cancellation that races the event.)"""
    wake = asyncio.Event()
    server.on_level_change = lambda level: wake.set()
    while not stop.is_set():
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
        waiters = [asyncio.ensure_future(wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(waiters, timeout=REGISTRATION_CHECK_S, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()


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
        self.on_rejected: Callable[[str], None] | None = None
        """Told of each policy channel message that is rejected (the instance's audit trail)."""

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
            except CredentialsOutOfDate as exc:
                # Reported, not final: pass 2's salt is not authenticated, so an impostor
                # could cause this; the cache is re-read at every try.
                if not warned:
                    log.error("%s (waiting for new credentials)", exc)
                    warned = True
                await asyncio.sleep(retry_s)
                continue
            except (RemoteError, ConfigError) as exc:
                if not warned and loop.time() - started > warn_after_s:
                    log.warning("waiting for the site's security policy: %s", exc)
                    warned = True
                if isinstance(exc, AuthenticationFailed) and not warned:
                    log.warning("cannot read the site's security policy: %s", exc)
                    warned = True
                await asyncio.sleep(retry_s)
        self._feed()
        self._cache.on_rejected = self.on_rejected
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
    policy: SecurityPolicy | None = None, credentials: Credentials | None = None, audit: bool = True,
) -> AsyncIterator[InstanceServer]:
    """Run one planned instance, registered with naming, while the block runs. It logs
    in as ``credentials`` (default: the service credentials cached in the site's
    dataset, ubicore/credentials; CredentialsMissing when there are none) to register,
    to ship its audit records (spooled under the site's spool directory until the core
    has them; ``audit=False`` records nothing, for measurements) and, without ``policy``,
    to follow the site's ``UPerm::Config`` (it waits for it first; CredentialsOutOfDate
    when the site refuses the cache)."""
    schema = resolve_schema(site, plan.schema)
    client = Client.for_site(site, credentials=credentials or cached_service_credentials(site))
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(client.close)
        auditor = await stack.enter_async_context(audit_trail(site, client, f"instance-{plan.schema}@{plan.cell}",
                                                               host=plan.host, cell=plan.cell, schema=plan.schema)) \
            if audit else None
        async with _serve_instance(site, plan, schema, client, heartbeat_s, policy, auditor) as server:
            yield server


@contextlib.asynccontextmanager
async def audit_trail(
    site: SiteConfig, client: Client, name: str, *, host: str, cell: str = "", schema: str = ""
) -> AsyncIterator[Any]:
    """An Auditor whose records are spooled under the site's spool directory and shipped
    to ``UAudit::Log`` with ``client`` (ubicore/audit/trail.py) while the block runs."""
    from .audit.trail import Auditor, Shipper, Spool, audit_paths

    spool = Spool(audit_paths(site)[2], name.replace("::", "%").replace("/", "_"))

    async def call(schema_name: str, operation: str, **args: Any) -> Any:
        return await client.call(NAMING_CELL, schema_name, operation, **args)

    shipper = Shipper(spool, call)
    shipper.start()
    try:
        yield Auditor(spool.put, host=host, cell=cell, schema=schema, config=site.audit, principal=client.user)
    finally:
        await shipper.close()


@contextlib.asynccontextmanager
async def _serve_instance(
    site: SiteConfig, plan: InstancePlan, schema: type[Schema], client: Client, heartbeat_s: float,
    policy: SecurityPolicy | None, auditor: Any,
) -> AsyncIterator[InstanceServer]:
    follower: PolicyFollower | None = None
    if policy is None:
        follower = PolicyFollower(site, client)
        if auditor is not None:
            follower.on_rejected = lambda why: auditor("rejected", "refused", DEFAULT_USER, "", why)
        try:
            await follower.start()
        except BaseException:
            await follower.close()
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
        raise
    if auditor is not None:
        core.use_audit(auditor)
        auditor("start", "ok", "", "", f"pid {os.getpid()}, {core.protection.value} protection")
    stopping = asyncio.Event()
    keeper = asyncio.create_task(_keep_registered(client, plan, server, stopping))
    try:
        yield server
    finally:
        stopping.set()
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        with contextlib.suppress(RemoteError):
            await client.call(
                NAMING_CELL, NAMING_SCHEMA, "deregister", timeout_s=1.0,
                schema=plan.schema, cell=plan.cell, instance_id=core.instance_id,
            )
        if auditor is not None:
            auditor("stop", "ok", "", "", f"pid {os.getpid()}")
        await server.stop()
        if follower is not None:
            await follower.close()
