"""A whole site in one process, for tests: core, instances and a client on loopback.

::

    @run_async
    async def test_rate(tmp_path: Path) -> None:
        async with running_site(tmp_path) as rs:
            await rs.client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=5.0)
            await rs.restart_instance(CONFIG_UPDATE, "Site")

:func:`site_yaml` writes a small site file like ``cells/demo.yaml`` (hosts ``host-a`` on
127.0.0.1 and ``host-b`` on 127.0.0.2; cells ``Site > Building-1 > Zone-A, Zone-B``;
``ULocationSystem::ConfigurationUpdate`` at the site, ``ULocation::Positions`` in each
zone) on free ports. :func:`running_site` serves it with the same coroutines the real
processes use (:func:`ubicore.runtime.serve_core`, :func:`ubicore.runtime.serve_instance`),
waits until every instance it started is registered with naming and hands over a
:class:`RunningSite`: a :class:`~ubicore.client.Client`, the servers, and ways to stop,
start and restart an instance or the core. Everything is closed on the way out, also
when the block raises.

pytest-asyncio is not needed: :func:`run_async` turns an ``async def`` test into a plain
one that runs under ``asyncio.run`` with a hard timeout, and fails a test that leaves
ZeroMQ sockets open.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Iterable,
    Mapping,
    Sequence,
)
from pathlib import Path
from typing import Any, TypeVar, overload

import yaml

from ..cache import Cache, Follower
from ..client import Client
from ..config import parse_site
from ..config.model import InstancePlan, SiteConfig
from ..runtime import serve_core, serve_instance
from ..runtime import current_os_user, init_site
from .policy import PolicyEditor
from ..security.primitives import KdfParams
from ..service import InstanceServer
from ..sessions import Credentials
from ..transport.sockets import context
from .schemas import COUNTER

__all__ = [
    "CONFIG_UPDATE", "COUNTER", "DEFAULT_TEST_TIMEOUT_S", "OPERATOR", "POSITIONS", "REGISTER_WAIT_S", "TEST_KDF",
    "TEST_DEPLOYMENTS", "TEST_IMPORTS", "LeakedSockets", "RunningSite", "free_port", "free_ports",
    "run_async", "running_site", "site_yaml",
]

CONFIG_UPDATE = "ULocationSystem::ConfigurationUpdate"
POSITIONS = "ULocation::Positions"
TEST_IMPORTS: tuple[str, ...] = ("ubicore.testing.schemas",)
TEST_DEPLOYMENTS: tuple[Mapping[str, Any], ...] = ({"schema": COUNTER, "cell": "Site"},)
"""What :func:`running_site` adds to the site by default: ``UTest::Counter`` at ``Site``."""
REGISTER_WAIT_S = 5.0
DEFAULT_TEST_TIMEOUT_S = 20.0
TEST_KDF = KdfParams(t=1, p=1, m_kib=64)
"""Argon2id costs for test users: tiny, so that logins cost microseconds, not 100 ms."""
OPERATOR = ("operator", "operator-password")
"""The test site's user with the update right; :attr:`RunningSite.client` logs in as it."""

Key = tuple[str, str]
T = TypeVar("T")


# --- ports and the site file --------------------------------------------------------------


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (held open while picked)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            socks.append(s)
            s.bind((host, 0))
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on ``host`` right now (the OS picks it; another may take it later)."""
    return free_ports(1, host)[0]


def site_yaml(
    dataset: Path,
    *,
    core_port: int,
    event_port: int,
    extra_deployments: Iterable[Mapping[str, Any]] = (),
    imports: Iterable[str] = (),
    positions_rate_hz: float = 0.0,
    positions_tags: int = 4,
    name: str = "test",
    security: Mapping[str, Any] | None = None,
    run_dir: Path | None = None,
    audit: Mapping[str, Any] | None = None,
) -> str:
    """The text of a small valid site file whose core listens on the given ports.

    ``ULocation::Positions`` runs its simulator at ``positions_rate_hz`` (0: paused, the
    default, so that nothing changes unless a test asks). ``extra_deployments`` are
    appended as written (e.g. ``{"schema": "UTest::Counter", "cell": "Site"}``) and
    ``imports`` name the modules that declare their schemas.
    """
    doc: dict[str, Any] = {
        "site": name,
        "dataset": str(Path(dataset).absolute()),
        "imports": list(imports),
        "core": {"host": "host-a", "rpc_port": core_port, "event_port": event_port},
        "hosts": {"host-a": {"address": "127.0.0.1"}, "host-b": {"address": "127.0.0.2"}},
        "levels": ["site", "building", "zone"],
        "cells": {"Site": {"level": "site", "host": "host-a", "children": {"Building-1": {
            "level": "building",
            "children": {
                "Zone-A": {"level": "zone", "host": "host-a"},
                "Zone-B": {"level": "zone", "host": "host-b"},
            },
        }}}},
        "deployments": [
            {"schema": CONFIG_UPDATE, "level": "site"},
            {"schema": POSITIONS, "level": "zone",
             "options": {"rate_hz": float(positions_rate_hz), "tags": positions_tags, "seed": 1}},
            *(dict(d) for d in extra_deployments),
        ],
    }
    if not doc["imports"]:
        del doc["imports"]
    if security:
        doc["security"] = dict(security)
    if audit:
        doc["audit"] = dict(audit)
    if run_dir is not None:
        doc["run_dir"] = str(run_dir)
    header = "# A site for tests, written by ubicore.testing.site.site_yaml.\n"
    return header + str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))


# --- the running site ---------------------------------------------------------------------


class RunningSite:
    """A site served in this process; made by :func:`running_site`, not by hand.

    ``servers`` maps (schema, cell) to the :class:`InstanceServer` of each running
    instance; ``core`` is the naming registry's server (None while stopped).
    """

    def __init__(self, site: SiteConfig, client: Client, *, register_wait_s: float) -> None:
        self.site = site
        self.client = client
        self.policy = PolicyEditor(self._perm_server, site.name, TEST_KDF)
        """Edits the site's ``UPerm::Config`` in process; instances apply a change at once."""
        self.servers: dict[Key, InstanceServer] = {}
        self.core: InstanceServer | None = None
        self.register_wait_s = register_wait_s
        self._instances: dict[Key, contextlib.AsyncExitStack] = {}
        self._core_stack: contextlib.AsyncExitStack | None = None
        self._clients: list[Client] = []

    # --- lookups ----------------------------------------------------------------------------

    def _perm_server(self) -> InstanceServer:
        if self.core is None:
            raise RuntimeError("the core is not running")
        return self.core.companions["UPerm::Config"]

    def plan(self, schema: str, cell: str) -> InstancePlan:
        """The site's plan for (schema, cell); ValueError if it is not deployed there."""
        plan = self.site.instance(schema, cell)
        if plan is None:
            raise ValueError(f"{schema} is not deployed at {cell}")
        return plan

    def server(self, schema: str, cell: str) -> InstanceServer:
        """The running server of (schema, cell); KeyError if it is not running."""
        return self.servers[(schema, cell)]

    def new_client(self, *, timeout_s: float | None = None, credentials: Credentials | None = None,
                   user: tuple[str, str] | None = None, anonymous: bool = False) -> Client:
        """Another client of this site, closed with the site. It logs in as ``user``
        (name, password) or with ``credentials``; as ``default`` with ``anonymous``; else
        as :data:`OPERATOR`, like :attr:`client`."""
        if anonymous:
            credentials = None
        elif user is not None:
            credentials = Credentials.password(*user)
        elif credentials is None:
            credentials = Credentials.password(*OPERATOR)
        client = Client.for_site(self.site, timeout_s=timeout_s or self.client.timeout_s, credentials=credentials)
        self._clients.append(client)
        return client

    # --- core ------------------------------------------------------------------------------

    async def start_core(self) -> InstanceServer:
        """Serve the naming registry on the site's core ports."""
        if self._core_stack is not None:
            raise RuntimeError("the core is already running")
        # The core's ports are fixed; a quick restart may find them still held for a
        # moment, which the instance server itself retries (service.BIND_RETRY_S).
        stack = contextlib.AsyncExitStack()
        try:
            core = await stack.enter_async_context(serve_core(self.site))
        except BaseException:
            await stack.aclose()
            raise
        self.core, self._core_stack = core, stack
        return core

    async def stop_core(self) -> None:
        """Stop the naming registry (instances keep running and re-register later)."""
        stack, self._core_stack, self.core = self._core_stack, None, None
        if stack is not None:
            await stack.aclose()

    async def restart_core(self, *, wait_s: float | None = None) -> InstanceServer:
        """Stop and start the core; wait until every running instance is registered again
        and :attr:`client` follows the new registry."""
        await self.stop_core()
        core = await self.start_core()
        await self.wait_all_registered(wait_s)
        return core

    # --- instances -------------------------------------------------------------------------

    async def start_instance(self, schema: str, cell: str, *, wait_s: float | None = None) -> InstanceServer:
        """Serve (schema, cell) and wait until :attr:`client` finds it registered."""
        key = (schema, cell)
        if key in self._instances:
            raise RuntimeError(f"{schema} at {cell} is already running")
        plan = self.plan(schema, cell)
        stack = contextlib.AsyncExitStack()
        server = await stack.enter_async_context(serve_instance(self.site, plan))
        self._instances[key] = stack
        self.servers[key] = server
        await self.wait_registered(schema, cell, wait_s)
        return server

    async def stop_instance(self, schema: str, cell: str) -> None:
        """Stop (schema, cell): it deregisters from naming and closes its sockets."""
        key = (schema, cell)
        stack = self._instances.pop(key, None)
        self.servers.pop(key, None)
        if stack is None:
            raise KeyError(f"{schema} at {cell} is not running")
        await stack.aclose()

    async def restart_instance(self, schema: str, cell: str, *, wait_s: float | None = None) -> InstanceServer:
        """Stop (schema, cell) and serve it anew: a new instance id on new ports."""
        await self.stop_instance(schema, cell)
        return await self.start_instance(schema, cell, wait_s=wait_s)

    # --- registration ----------------------------------------------------------------------

    async def wait_registered(self, schema: str, cell: str, wait_s: float | None = None) -> None:
        """Wait until :attr:`client`'s naming copy shows the running instance of
        (schema, cell) with its current instance id; CallTimeout after ``wait_s``."""
        server = self.servers[(schema, cell)]
        iid, rpc = server.core.instance_id, server.rpc_endpoint

        def registered(c: Any) -> bool:
            row = c.table("instances").get((schema, cell))
            return row is not None and row.instance_id == iid and row.rpc == rpc

        naming = await self.client.naming()
        await naming.wait_for(registered, self.register_wait_s if wait_s is None else wait_s)

    async def wait_all_registered(self, wait_s: float | None = None) -> None:
        """Wait until :attr:`client` follows the running core and sees every running
        instance registered (after a core restart, say)."""
        timeout = self.register_wait_s if wait_s is None else wait_s
        deadline = time.monotonic() + timeout
        naming = await self.client.naming()
        if self.core is not None:
            core_iid = self.core.core.instance_id
            await naming.wait_for(
                lambda c: c.instance_id == core_iid and c.live, max(0.01, deadline - time.monotonic())
            )
        for schema, cell in list(self.servers):
            await self.wait_registered(schema, cell, max(0.01, deadline - time.monotonic()))

    async def settle(
        self, joined: Cache | Follower, commit: Callable[[], Awaitable[object]], timeout_s: float = REGISTER_WAIT_S
    ) -> None:
        """Wait until a cache or follower is live at a commit made now by ``commit()``.

        Joins are tight (the instance welcomes each subscription before the dump is
        taken), so this is a liveness check: after it, every batch arrives as a delta,
        in order, and a test can count them.
        """
        server = self.servers[(joined.schema, joined.cell)]
        await commit()
        iid, target = server.core.instance_id, server.core.sequencer.seq
        async with asyncio.timeout(timeout_s):
            while not (joined.live and joined.instance_id == iid and joined.seq >= target):
                await asyncio.sleep(0.005)

    # --- closing ---------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the clients, stop every instance (at once), then the core."""
        errors: list[BaseException] = []
        for client in [*self._clients, self.client]:
            try:
                await client.close()
            except Exception as exc:  # keep closing the rest
                errors.append(exc)
        self._clients.clear()
        stacks = list(self._instances.values())
        self._instances.clear()
        self.servers.clear()
        errors += [r for r in await asyncio.gather(*(s.aclose() for s in stacks), return_exceptions=True) if r]
        try:
            await self.stop_core()
        except Exception as exc:
            errors.append(exc)
        if errors:
            raise errors[0]


@contextlib.asynccontextmanager
async def running_site(
    tmp_path: Path,
    *,
    instances: Iterable[Key] | None = None,
    extra_deployments: Iterable[Mapping[str, Any]] = TEST_DEPLOYMENTS,
    imports: Iterable[str] = TEST_IMPORTS,
    positions_rate_hz: float = 0.0,
    client_timeout_s: float = 5.0,
    register_wait_s: float = REGISTER_WAIT_S,
    security: Mapping[str, Any] | None = None,
    run_dir: Path | None = None,
    audit: Mapping[str, Any] | None = None,
) -> AsyncIterator[RunningSite]:
    """Serve a :func:`site_yaml` site under ``tmp_path`` while the block runs.

    ``instances`` lists the (schema, cell) pairs to start (default: every planned one);
    the others can be started later with :meth:`RunningSite.start_instance`. The site
    file is written to ``tmp_path/site.yaml`` and the dataset lives in
    ``tmp_path/dataset``. Its policy is the factory one (``ubi site init``) with
    :data:`OPERATOR` as the administrator and :data:`TEST_KDF` costs; this process's
    account is an OS user in ``services``, and the service user ``site-service`` has its
    credentials cached in the dataset (instances log in with them, and spool their audit
    records under ``<dataset>/spool``); :attr:`RunningSite.client` logs in as the operator. ``security`` and ``audit`` become the site file's sections of those names.
    """
    core_port, event_port = free_ports(2)
    text = site_yaml(tmp_path / "dataset", core_port=core_port, event_port=event_port,
                     extra_deployments=extra_deployments, imports=imports,
                     positions_rate_hz=positions_rate_hz, security=security, run_dir=run_dir,
                     audit=audit)
    path = tmp_path / "site.yaml"
    path.write_text(text, encoding="utf-8")
    site = parse_site(text, path)
    wanted: Sequence[Key]
    if instances is None:
        wanted = [(p.schema, p.cell) for p in site.instances]
    else:
        wanted = list(instances)
        for schema, cell in wanted:
            if site.instance(schema, cell) is None:
                raise ValueError(f"{schema} is not deployed at {cell} in the test site")
    init_site(site, OPERATOR[1], admin_user=OPERATOR[0], kdf=TEST_KDF, os_user=current_os_user())
    client = Client.for_site(site, timeout_s=client_timeout_s, credentials=Credentials.password(*OPERATOR))
    rs = RunningSite(site, client, register_wait_s=register_wait_s)
    try:
        await rs.start_core()
        for schema, cell in wanted:
            await rs.start_instance(schema, cell)
        yield rs
    finally:
        await rs.aclose()


# --- running async tests ------------------------------------------------------------------


class LeakedSockets(AssertionError):
    """Raised when a test leaves ZeroMQ sockets open. Close every client, cache and
    connection the test made (``async with`` or try/finally)."""


def _open_sockets() -> set[Any]:
    # pyzmq keeps a weak set of a context's sockets (Context._sockets) for destroy().
    return {s for s in list(getattr(context(), "_sockets", None) or ()) if not s.closed}


@overload
def run_async(fn: Callable[..., Awaitable[T]], /) -> Callable[..., T]: ...
@overload
def run_async(
    *, timeout_s: float = ..., check_sockets: bool = ...
) -> Callable[[Callable[..., Awaitable[T]]], Callable[..., T]]: ...


def run_async(
    fn: Callable[..., Awaitable[Any]] | None = None,
    /,
    *,
    timeout_s: float = DEFAULT_TEST_TIMEOUT_S,
    check_sockets: bool = True,
) -> Any:
    """Make an ``async def`` test a plain function run by ``asyncio.run``.

    The coroutine is cancelled after ``timeout_s`` (its cleanup still runs) and the test
    fails with TimeoutError, so nothing hangs. With ``check_sockets`` the test also fails
    with :class:`LeakedSockets` if it left open any ZeroMQ socket of the process-wide
    context that it created (those sockets are closed first). Use as ``@run_async`` or
    ``@run_async(timeout_s=5)``; pytest fixtures in the signature work as usual.
    """

    def decorate(func: Callable[..., Awaitable[Any]]) -> Callable[..., Any]:
        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            before = _open_sockets() if check_sockets else set()

            async def main() -> Any:
                limit = asyncio.timeout(timeout_s)
                try:
                    async with limit:
                        return await func(*args, **kwargs)
                except TimeoutError as exc:
                    if limit.expired():
                        raise TimeoutError(
                            f"{func.__name__} did not finish within {timeout_s:g} s"
                        ) from exc
                    raise

            try:
                result = asyncio.run(main())
            finally:
                leaked = _open_sockets() - before if check_sockets else set()
                for sock in leaked:  # closed even when the test failed, so no fd outlives it
                    sock.close(linger=0)
            if leaked:
                kinds = sorted(_socket_kind(s) for s in leaked)
                raise LeakedSockets(f"{func.__name__} left {len(leaked)} socket(s) open: {kinds}")
            return result

        return wrapper

    if fn is not None:
        return decorate(fn)
    return decorate


def _socket_kind(sock: Any) -> str:
    try:
        return str(getattr(sock.type, "name", sock.type))
    except Exception:
        return "?"

