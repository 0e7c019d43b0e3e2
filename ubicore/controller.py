"""The controller of one host, and the processes of a site.

:func:`run_controller` runs the instances planned for one host of the site file, each
in its own process (``ubi instance``), restarts those that crash, and reports every
instance's actual state to naming's ``services`` relation, re-reporting periodically so
a restarted core learns it again. :func:`run_site` is ``ubi site up``: the core and one
controller per host, all on this machine, supervised the same way. :func:`run_core` and
:func:`run_instance` are the bodies of ``ubi core`` and ``ubi instance``.

Controllers and instances log in as the site's service user (ubicore/credentials):
with the credentials cached in the dataset, or with ones a parent obtained from a
prompt and hands its children on their standard input. A controller checks them
against naming before it starts anything, and exits with ``EX_CONFIG`` (78, which its
supervisor does not restart) and one line naming ``ubi-cache-credentials`` when the
site refuses them.

Every process stops cleanly on SIGINT or SIGTERM, and (when told its parent supervises
it) when its parent disappears, so nothing is orphaned even after a SIGKILL upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from collections.abc import AsyncIterator, Callable, Sequence

from .client import NAMING_CELL, NAMING_SCHEMA, Client
from .config.model import SiteConfig
from .errors import (
    AuthenticationFailed,
    CallTimeout,
    ConfigError,
    CredentialsError,
    LockedOut,
    RemoteError,
    Unavailable,
)
from .security.amp import CredentialsOutOfDate
from .runtime import audit_trail, cache_tool_hint, check_initialised, resolve_schema, serve_core, serve_instance
from .sessions import Credentials
from .supervisor import Child, Supervisor, watch_parent

log = logging.getLogger(__name__)

REPORT_PERIOD_S = 5.0
STALE_WARN_S = 60.0
CHECK_PERIOD_S = 0.5
SHUTDOWN_REPORT_TIMEOUT_S = 0.3


def _child_of_me() -> tuple[str, str]:
    """Command-line words that make a child stop when this process is gone."""
    return ("--parent-pid", str(os.getpid()))


def ubi_argv(site: SiteConfig, *args: str) -> list[str]:
    """The command line of a ``ubi`` sub-command in a child process."""
    return [sys.executable, "-m", "ubicore.tools.cli", "--site", str(site.source), *args]


@contextlib.asynccontextmanager
async def _watching_parent(stop: asyncio.Event, parent_pid: int | None) -> AsyncIterator[None]:
    """Set ``stop`` if the supervising parent, named by pid on the command line, goes
    (a child that read its parent pid only after starting could miss a parent that
    died meanwhile)."""
    watcher = None if parent_pid is None else asyncio.create_task(watch_parent(parent_pid, stop))
    try:
        yield
    finally:
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def run_core(site: SiteConfig, stop: asyncio.Event, *, parent_pid: int | None = None) -> None:
    async with _watching_parent(stop, parent_pid), serve_core(site):
        log.info("core of site %s up on %s", site.name, site.core.rpc_endpoint)
        await stop.wait()


async def run_instance(
    site: SiteConfig, schema: str, cell: str, stop: asyncio.Event, *, parent_pid: int | None = None,
    credentials: Credentials | None = None,
) -> None:
    plan = site.instance(schema, cell)
    if plan is None:
        raise ConfigError(str(site.source), "deployments", f"no deployment runs {schema} at {cell}")
    async with _watching_parent(stop, parent_pid), contextlib.AsyncExitStack() as stack:
        # An instance waits for the site's policy before it serves; a stop meanwhile ends the wait.
        entering = asyncio.ensure_future(stack.enter_async_context(serve_instance(site, plan, credentials=credentials)))
        stopping = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([entering, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not entering.done():
                entering.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await entering
        if entering.cancelled():
            return
        await stop.wait()


class HostController:
    """Runs and reports the instances of one host."""

    def __init__(
        self, site: SiteConfig, host: str, credentials: Credentials, handoff: bytes | None = None
    ) -> None:
        if host not in site.hosts:
            raise ConfigError(str(site.source), "hosts", f"no host {host!r}; hosts are {', '.join(site.hosts)}")
        self.site = site
        self.host = host
        self.plans = {f"{p.schema}@{p.cell}": p for p in site.instances_for_host(host)}
        self.client = Client.for_site(site, timeout_s=2.0, credentials=credentials)
        self.supervisor = Supervisor(self._report)
        self.stopping = False
        self._stale_warned = -STALE_WARN_S
        self.audit: Callable[[str, str, str, str, str], None] = lambda *event: None
        self.own_client = True
        """Whether :meth:`run` closes the client at its end (run_controller closes it later,
        after the audit trail had its last word)."""
        handed = ("--credentials-stdin",) if handoff is not None else ()
        for name, plan in self.plans.items():
            self.supervisor.add(name, ubi_argv(site, "instance", plan.schema, plan.cell, *handed, *_child_of_me()),
                                stdin=handoff)

    async def _report(self, child: Child) -> None:
        plan = self.plans[child.name]
        detail = "" if child.last_exit is None else f"last exit status {child.last_exit}"
        if child.state in ("crashed", "failed"):
            then = "restarting it" if child.state == "crashed" else "not restarting it (status 78: fix and restart)"
            self.audit("stop", "failed", "", "", f"{child.name} exited with status {child.last_exit}; {then}")
        try:
            await self.client.call(
                NAMING_CELL, NAMING_SCHEMA, "report", schema=plan.schema, cell=plan.cell, host=self.host,
                actual=child.state, restarts=child.restarts, detail=detail,
                timeout_s=SHUTDOWN_REPORT_TIMEOUT_S if self.stopping else None,
            )
        except (RemoteError, CredentialsError) as exc:
            log.debug("report of %s not delivered: %s", child.name, exc)

    async def _check(self, stop: asyncio.Event) -> None:
        """Mark children running once they registered; re-report everything now and then."""
        last_report = 0.0
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            try:
                naming = await self.client.naming()
                table = naming.table("instances")
                for name, child in self.supervisor.children.items():
                    plan = self.plans[name]
                    row = table.get((plan.schema, plan.cell))
                    if child.state == "starting" and row is not None and row.pid == child.pid:  # type: ignore[attr-defined]
                        await self.supervisor.mark_running(name)
                if loop.time() - last_report > REPORT_PERIOD_S:
                    last_report = loop.time()
                    for child in self.supervisor.children.values():
                        await self._report(child)
            except RemoteError as exc:
                log.debug("naming not reachable: %s", exc)
            except CredentialsError as exc:  # the cache went stale while we ran: say so, keep going
                if loop.time() - self._stale_warned > STALE_WARN_S:
                    self._stale_warned = loop.time()
                    log.error("%s", exc)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), CHECK_PERIOD_S)

    async def run(self, stop: asyncio.Event) -> None:
        self.supervisor.start()
        checker = asyncio.create_task(self._check(stop))
        try:
            await stop.wait()
        finally:
            self.stopping = True
            checker.cancel()
            try:
                await checker
            except BaseException as exc:  # whatever ended the checker, the children stop
                if not isinstance(exc, asyncio.CancelledError):
                    log.error("the controller's checker failed: %s", exc)
            finally:
                await self.supervisor.stop()
                if self.own_client:
                    await self.client.close()


async def run_controller(
    site: SiteConfig, host: str, stop: asyncio.Event, *, credentials: Credentials, handoff: bytes | None = None,
    parent_pid: int | None = None,
) -> None:
    """``ubi controller``: check ``credentials`` against naming (waiting for the core),
    then run the host's instances until ``stop``. ``handoff``: what its instances get on
    their standard input instead of reading the cache."""
    controller = HostController(site, host, credentials, handoff)
    for plan in controller.plans.values():
        resolve_schema(site, plan.schema)  # a bad deployment fails here, not in a crash loop
    async with _watching_parent(stop, parent_pid):
        try:
            await wait_for_login(controller.client, site, stop)
        except BaseException:
            await controller.client.close()
            raise
        if stop.is_set():
            await controller.client.close()
            return
        controller.own_client = False
        try:
            async with audit_trail(site, controller.client, f"controller-{host}", host=host) as auditor:
                controller.audit = auditor
                auditor("start", "ok", "", "", f"controller of {host}, pid {os.getpid()}, "
                                               f"{len(controller.plans)} instances")
                try:
                    await controller.run(stop)
                finally:
                    auditor("stop", "ok", "", "", f"controller of {host}, pid {os.getpid()}")
        finally:
            await controller.client.close()


async def wait_for_login(client: Client, site: SiteConfig, stop: asyncio.Event | None = None) -> None:
    """Log in to naming with ``client``'s credentials, waiting while the core does not
    answer: a process checks its service credentials before it starts anything.
    CredentialsError (naming the tool to run) when the site refuses them."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    warned = False
    stale_warned = -STALE_WARN_S
    while stop is None or not stop.is_set():
        try:
            await client.login(NAMING_CELL, NAMING_SCHEMA, timeout_s=2.0)
            log.info("logged in to site %s as the service user %s", site.name, client.user)
            return
        except (CallTimeout, Unavailable) as exc:
            if not warned and loop.time() - started > 10.0:
                log.warning("waiting for the core of site %s to check the service credentials: %s", site.name, exc)
                warned = True
            await asyncio.sleep(0.25)
        except CredentialsOutOfDate as exc:
            # The salt and costs of pass 2 are not authenticated yet: a process pretending
            # to be the core could say anything. So this is reported, not final: the
            # process waits for its cache to be renewed (the secret re-reads the file).
            if loop.time() - stale_warned > STALE_WARN_S:
                stale_warned = loop.time()
                log.error("%s (waiting for new credentials)", exc)
            await asyncio.sleep(1.0)
        except LockedOut as exc:
            log.error("the service user %s is locked out (%s); waiting", client.user, exc.message)
            await asyncio.sleep(min(max(exc.retry_after_s, 1.0), 60.0))
        except AuthenticationFailed as exc:
            raise CredentialsError(f"site {site.name} refused the service credentials of {client.user} "
                                   f"({exc.message}): {cache_tool_hint(site)}") from None


async def wait_until_up(site: SiteConfig, timeout_s: float, client: Client | None = None) -> list[str]:
    """Wait until every planned instance is registered; the ones still missing."""
    own = client is None
    client = client or Client.for_site(site, timeout_s=2.0)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    missing = [f"{p.schema}@{p.cell}" for p in site.instances]
    try:
        while loop.time() < deadline:
            try:
                table = (await client.naming()).table("instances")
            except RemoteError:
                await asyncio.sleep(0.2)
                continue
            missing = [f"{p.schema}@{p.cell}" for p in site.instances if (p.schema, p.cell) not in table]
            if not missing:
                break
            await asyncio.sleep(0.1)
    finally:
        if own:
            await client.close()
    return missing


async def run_site(
    site: SiteConfig,
    stop: asyncio.Event,
    *,
    on_up: Callable[[Sequence[str]], None] | None = None,
    up_timeout_s: float = 30.0,
    handoff: bytes | None = None,
) -> None:
    """``ubi site up``: the core and a controller per host, until ``stop`` is set. The
    controllers run with ``-d`` on the cached service credentials, or get ``handoff``
    (credentials a prompt obtained) on their standard input."""
    check_initialised(site)
    for plan in site.instances:
        resolve_schema(site, plan.schema)
    # Two supervisors, so that controllers stop (and their instances deregister) while
    # the core still answers, and the core stops last.
    core = Supervisor()
    core.add("core", ubi_argv(site, "core", *_child_of_me()))
    hosts = Supervisor()
    for host in site.hosts:
        if site.instances_for_host(host):
            how = ("--credentials-stdin",) if handoff is not None else ("-d",)
            hosts.add(f"controller {host}", ubi_argv(site, "controller", "--host", host, *how, *_child_of_me()),
                      stdin=handoff)
    core.start()
    hosts.start()
    try:
        waiter = asyncio.create_task(wait_until_up(site, up_timeout_s))
        done, _ = await asyncio.wait([waiter, asyncio.create_task(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
        if waiter in done and on_up is not None:
            on_up(waiter.result())
        elif waiter not in done:
            waiter.cancel()
        await stop.wait()
    finally:
        core.hold()
        await hosts.stop()
        await core.stop()
