"""``ubi demo``: the demo site and a live client that shows state changes as they happen.

The client logs in as ``demo-operator`` (a user with the update right, given a fresh
password at every start), caches the sensor configuration at ``Site`` and the positions
of every zone, prints each configuration change as it arrives and a line a second per
zone with its tags, and every few seconds calls an update operation (change a sensor's
rate) so that the whole path (login → sealed call → commit → channel → cache → callback)
is on screen. The three protection levels run side by side (``cells/demo.yaml``), and an
eavesdropper with no session subscribes to the fully protected zone: it counts what it
receives and shows that none of it is readable.

The controllers run with ``-d`` on the service credentials cached in the dataset (the
site's service user, ``site-service``). At start the demo shows an anonymous update
refused (with the line the login prompt would show) and a login with a wrong password,
then that failed login's record in the audit trail (``UAudit::Log``).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import itertools
import secrets
import time
from collections.abc import Callable
from typing import Any

from ubicore.cache import Cache
from ubicore.client import Client
from ubicore.config.model import SiteConfig
from ubicore.controller import run_site
from ubicore.errors import AuthenticationFailed, PermissionDenied, RemoteError
from ubicore.login import requirement
from ubicore.protocol.messages import Delta, Heartbeat, Rekey, SealedEvent

from ubicore.runtime import current_os_user, init_site, offline_policy
from ubicore.security.amp import make_verifier
from ubicore.security.primitives import DEFAULT_KDF
from ubicore.sessions import Credentials
from ubicore.transport.channel import Subscription

from .audit_cli import record_line
from .format import change_text, table

CONFIG = "ULocationSystem::ConfigurationUpdate"
POSITIONS = "ULocation::Positions"
ACTION_PERIOD_S = 4.0
DEMO_USER = "demo-operator"


class Eavesdropper:
    """A subscriber with no session: it sees every message of a channel, reads none of a
    ``full`` one."""

    def __init__(self, endpoint: str) -> None:
        self.sealed = self.readable = self.rekeys = 0
        self.epochs: set[int] = set()
        self._sub = Subscription(endpoint, self._on_message)

    def _on_message(self, msg: Any) -> None:
        if isinstance(msg, SealedEvent):
            self.sealed += 1
            self.epochs.add(msg.epoch)
        elif isinstance(msg, Rekey):
            self.rekeys += 1
        elif isinstance(msg, (Delta, Heartbeat)):
            self.readable += 1

    def report(self) -> str:
        text = (f"eavesdropper (no session): {self.sealed} sealed messages (epochs {sorted(self.epochs)}), "
                f"{self.rekeys} rekeys, {self.readable} readable")
        self.sealed = self.readable = self.rekeys = 0
        return text

    def close(self) -> None:
        self._sub.close()


def prepare_demo_user(site: SiteConfig) -> tuple[Credentials, str, str | None]:
    """Initialise the site if it is new (the administrator's password is generated), and
    give ``demo-operator`` (a member of ``admin``) a fresh password for this run, before
    the site comes up; (its credentials, its password, the administrator's password if
    the site was made now), the passwords to be shown once."""
    admin_password = secrets.token_urlsafe(12)
    made = init_site(site, admin_password, os_user=current_os_user())
    password = secrets.token_urlsafe(12)
    rec = make_verifier(DEMO_USER, site.name, password, DEFAULT_KDF)
    record = {"salt": rec.salt, "verifier": rec.verifier, "t": rec.params.t, "p": rec.params.p, "m_kib": rec.params.m_kib}
    with offline_policy(site) as (perm, tx):
        importlib.import_module("ubicore.services.perm").add_missing_service_rules(tx)  # a dataset of an older demo
        if tx.users.get(DEMO_USER) is None:
            type(perm).add_user(perm, tx, DEMO_USER, groups=["admin", "everyone"], description="the demo's live client",
                                **record)
        else:
            type(perm).set_password(perm, tx, DEMO_USER, **record)
    return Credentials.password(DEMO_USER, password), password, admin_password if made else None


def _counter(counts: dict[str, int], cell: str) -> Callable[[str, Any, Any], None]:
    def count(relation: str, old: Any, new: Any) -> None:
        counts[cell] += 1

    return count


async def live_client(
    site: SiteConfig, stop: asyncio.Event, say: Callable[[str], None], credentials: Credentials | None = None
) -> None:
    async with Client.for_site(site, credentials=credentials) as client:
        services = await client.services()
        say(table(["schema", "cell", "host", "protection", "rpc"],
                  sorted((r["schema"], r["cell"], r["host"], r["protection"], r["rpc"]) for r in services["instances"])))
        caches: dict[str, Cache] = {}
        counts: dict[str, int] = {}
        spies: dict[str, Eavesdropper] = {}
        for plan in site.instances:
            if plan.schema == POSITIONS:
                cache = await client.cache(plan.cell, POSITIONS)
                counts[plan.cell] = 0
                cache.on_change(_counter(counts, plan.cell))
                caches[plan.cell] = cache
                info = await client.find(plan.cell, POSITIONS)
                if info.protection == "full":
                    spies[plan.cell] = Eavesdropper(info.events)
        await show_denial(site, say)
        await show_failed_login(site, client, say)
        try:
            await _show(site, client, caches, counts, spies, stop, say)
        finally:
            for spy in spies.values():
                spy.close()


async def show_failed_login(site: SiteConfig, client: Client, say: Callable[[str], None]) -> None:
    """A login with a wrong password fails, and ``client`` (an administrator) finds its
    record in the audit trail."""
    config_cell = next((p.cell for p in site.instances if p.schema == CONFIG), None)
    if config_cell is None:
        return
    started = time.time()
    async with Client.for_site(site, credentials=Credentials.password(DEMO_USER, "not-the-password")) as guesser:
        say(f"> (as {DEMO_USER}, a wrong password) call {config_cell} {CONFIG} set_rate sensor=S-001 rate_hz=3")
        try:
            await guesser.call(config_cell, CONFIG, "set_rate", sensor="S-001", rate_hz=3.0)
        except AuthenticationFailed as exc:
            say(f"  {exc.code}: {exc.message}")
    deadline = time.monotonic() + 5.0
    while time.monotonic() < deadline:
        try:
            found = await client.call("Site", "UAudit::Log", "search", user=DEMO_USER, action="login",
                                      outcome="failed", since=started)
        except RemoteError as exc:
            say(f"  (the audit trail cannot be read: {exc.code}: {exc.message})")
            return
        if found:
            say(f"  the audit trail has it: {record_line(found[-1])}")
            return
        await asyncio.sleep(0.1)
    say("  (its audit record has not reached the core yet)")


async def show_denial(site: SiteConfig, say: Callable[[str], None]) -> None:
    """An anonymous client tries an update: the denial says who may act (the login prompt's line)."""
    config_cell = next((p.cell for p in site.instances if p.schema == CONFIG), None)
    if config_cell is None:
        return
    async with Client.for_site(site) as anonymous:
        say(f"> (anonymous) call {config_cell} {CONFIG} set_rate sensor=S-001 rate_hz=3")
        try:
            await anonymous.call(config_cell, CONFIG, "set_rate", sensor="S-001", rate_hz=3.0)
            say("  done (the site's policy lets anyone update it)")
        except PermissionDenied as exc:
            say(f"  {exc.code}: {exc.message}. {requirement(exc.groups)}")
        except RemoteError as exc:
            say(f"  {exc.code}: {exc.message}")


async def _show(
    site: SiteConfig, client: Client, caches: dict[str, Cache], counts: dict[str, int],
    spies: dict[str, Eavesdropper], stop: asyncio.Event, say: Callable[[str], None],
) -> None:
    if True:
        config_cell = next((p.cell for p in site.instances if p.schema == CONFIG), None)
        if config_cell is not None:
            config = await client.cache(config_cell, CONFIG)
            keys = {r: info.key_index for r, info in config.infos.items()}
            config.on_change(lambda r, o, n: say(f"[{config_cell}] {CONFIG}: {change_text(r, o, n, keys[r])}"))
        rates = itertools.cycle([2.0, 5.0, 0.5, 1.0])
        sensors = itertools.cycle(["S-001", "S-002", "S-003", "S-004"])
        next_action = time.monotonic() + 1.0
        while not stop.is_set():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
            for cell, cache in caches.items():
                tags = sorted(cache.rows("positions"))[:3]
                shown = "  ".join(f"{t.tag} ({t.x:5.1f},{t.y:5.1f})" for t in tags)  # type: ignore[attr-defined]
                level = cache.binding.protection
                say(f"[{cell}] {POSITIONS} ({level}): {len(cache.table('positions'))} tags, "
                    f"{counts[cell]} changes/s  {shown} …")
                counts[cell] = 0
                if cell in spies:
                    say(f"[{cell}] {spies[cell].report()}")
            if config_cell is not None and time.monotonic() >= next_action:
                next_action = time.monotonic() + ACTION_PERIOD_S
                sensor, rate = next(sensors), next(rates)
                current = config.table("sensors").get((sensor,))
                if current is not None and current.rate_hz == rate:  # type: ignore[attr-defined]  # a no-op publishes nothing
                    rate = next(rates)
                try:
                    say(f"> call {config_cell} {CONFIG} set_rate sensor={sensor} rate_hz={rate:g}")
                    await client.call(config_cell, CONFIG, "set_rate", sensor=sensor, rate_hz=rate)
                except RemoteError as exc:
                    say(f"  error: {exc.code}: {exc.message}")


async def run_demo(site: SiteConfig, stop: asyncio.Event, say: Callable[[str], None], duration_s: float | None) -> None:
    up = asyncio.Event()
    missing: list[str] = []

    def on_up(still_missing: Any) -> None:
        missing.extend(still_missing)
        up.set()

    credentials, password, admin_password = prepare_demo_user(site)
    if admin_password is not None:
        say(f"new site {site.name}: user administrator, password (shown once): {admin_password}")
    service = importlib.import_module("ubicore.credentials.service")
    if service.ensure_cached(site) and admin_password is None:
        say("the site's service user site-service has new cached credentials")
    say(f"controllers run with -d on the service credentials cached in {site.dataset / 'credentials.dat'}")
    say(f"user {DEMO_USER} is in admin (updates everything); its password for this run (shown once): {password}")
    say(f"  e.g. UBI_PASSWORD=... ubi --user {DEMO_USER} call Site {CONFIG} set_rate sensor=S-001 rate_hz=2")
    site_task = asyncio.create_task(run_site(site, stop, on_up=on_up))
    try:
        waiter = asyncio.create_task(up.wait())
        await asyncio.wait([waiter, site_task], return_when=asyncio.FIRST_COMPLETED)
        if site_task.done():
            site_task.result()
            return
        if missing:
            say(f"not up in time: {', '.join(missing)}")
        say(f"site {site.name} up: {len(site.instances)} instances on {len(site.hosts)} hosts (Ctrl-C stops it)")
        if duration_s is not None:
            asyncio.get_running_loop().call_later(duration_s, stop.set)
        await live_client(site, stop, say, credentials)
    finally:
        stop.set()
        await site_task
        say("site stopped")
