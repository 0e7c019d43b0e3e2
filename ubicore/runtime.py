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
import time
from collections.abc import AsyncIterator

from .client import NAMING_CELL, NAMING_SCHEMA, Client
from .config.model import InstancePlan, SiteConfig
from .dispatch import InstanceCore
from .errors import ConfigError, RemoteError, SchemaError
from .schema import Protection, Schema, registered_schemas
from .security.policy import FileSecurityStore, SecurityPolicy
from .service import DEFAULT_HEARTBEAT_S, InstanceServer
from .store import Store, udata_path

log = logging.getLogger(__name__)

BUILTIN_SERVICE_MODULES = (
    "ubicore.services.naming",
    "ubicore.services.configuration",
    "ubicore.services.positions",
)
REGISTRATION_CHECK_S = 2.0


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


def site_policy(site: SiteConfig) -> FileSecurityStore:
    """The security store of the site's dataset (users, schema levels)."""
    return FileSecurityStore(site.dataset, site.name)


def make_core(
    site: SiteConfig, plan: InstancePlan, schema: type[Schema], policy: SecurityPolicy | None = None
) -> InstanceCore:
    path = udata_path(site.dataset, plan.cell, plan.schema) if any(
        r.persistent for r in schema.relations.values()
    ) else None
    store = Store(schema, path)
    protection = Protection(plan.protection) if plan.protection else None
    try:
        return InstanceCore(schema, plan.cell, store, options=plan.options, protection=protection,
                            policy=policy or site_policy(site), security=site.security)
    except BaseException:
        store.close()
        raise


@contextlib.asynccontextmanager
async def serve_core(site: SiteConfig, *, heartbeat_s: float = DEFAULT_HEARTBEAT_S) -> AsyncIterator[InstanceServer]:
    """Run the naming registry on the site's core endpoints while the block runs."""
    registry = resolve_schema(site, NAMING_SCHEMA)
    plan = InstancePlan(NAMING_SCHEMA, NAMING_CELL, site.core.host, None, {})
    store = site_policy(site)
    if store.init():
        log.info("created the security store %s (user default, read)", store.path)
    core = make_core(site, plan, registry, store)
    server = InstanceServer(
        core, address=site.core.address, rpc_port=site.core.rpc_port, event_port=site.core.event_port,
        heartbeat_s=heartbeat_s,
    )
    await _start_or_close(server)
    try:
        with server.transaction() as tx:
            tx.instances.upsert(
                schema=NAMING_SCHEMA, cell=NAMING_CELL, host=site.core.host, rpc=server.rpc_endpoint,
                events=server.event_endpoint, instance_id=core.instance_id,
                protection=core.protection.value, pid=os.getpid(), started=time.time(),
            )
        yield server
    finally:
        await server.stop()


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
        protection=core.protection.value, pid=os.getpid(),
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
        except RemoteError as exc:
            log.warning("%s@%s: naming unreachable (%s); retrying", plan.schema, plan.cell, exc)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(wake.wait(), REGISTRATION_CHECK_S)


@contextlib.asynccontextmanager
async def serve_instance(
    site: SiteConfig, plan: InstancePlan, *, heartbeat_s: float = DEFAULT_HEARTBEAT_S,
    policy: SecurityPolicy | None = None,
) -> AsyncIterator[InstanceServer]:
    """Run one planned instance, registered with naming, while the block runs."""
    schema = resolve_schema(site, plan.schema)
    core = make_core(site, plan, schema, policy)
    server = InstanceServer(core, address=site.hosts[plan.host].address, heartbeat_s=heartbeat_s)
    await _start_or_close(server)
    client = Client.for_site(site)
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
        await client.close()
        await server.stop()
