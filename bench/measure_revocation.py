"""Revocation latency over 100 sessions, and permission checks per second.

**latency** (in this process, :func:`ubicore.testing.running_site` in a temporary
directory): the core (naming, ``UPerm::Config``) and ``UTest::Counter`` at ``Site`` at
``full`` (the deployment's ``protection`` override), following the policy as every
instance does (a ``PolicyFollower``: a cache of ``UPerm::Config`` over ipc). ``sessions``
password users, each a member of ``everyone`` (read), each hold a ``Cache`` of the
Counter through a client of their own (one login, one session each). A writer commits
one counter change every :data:`WRITE_INTERVAL_S`, so sealed events flow to all the
caches throughout; a raw observer (a ``Subscription`` on the instance's channel)
timestamps what the instance publishes.

- ``read``: one user (the victim, another one each repetition) leaves ``everyone``
  (``remove_member``, committed in the core's ``UPerm::Config`` by the schema's own
  operation, as ``ubi security`` would). Timed from the end of that commit: the core's
  policy model rebuilt (``core_model``), the instance's follower has the change and its
  model (``instance_model``), the revoking REKEY seen on the channel (``rekey``), the
  first event sealed under the new key seen on the channel (``first_sealed_event``), and
  on the victim's side the first event its cache fails to open (``victim_undecryptable``,
  polled every :data:`POLL_S`). Afterwards (untimed) the victim is put back, its client
  replaced, so every repetition revokes one of ``sessions`` sessions.
- ``update``: one user is made a member of ``admin`` (and shown to be able to ``bump``),
  then leaves ``admin``; its client calls ``bump`` back to back until one returns
  PermissionDenied (bounded: :data:`WAIT_S`). Timed from the end of the commit to that
  reply; ``calls_before_denied`` counts the calls admitted in between.

The path a change takes (DESIGN.md §6): the commit in the core's ``UPerm::Config`` → the
core's ``PolicySource`` (rebuilt once per loop turn) → the change published on the
policy's channel → the instance's ``PolicyFollower`` cache → its ``PolicySource.update``
→ the ``InstanceServer`` runs a security tick at once (``ModelPolicy.refresh``,
``SessionGuard.reevaluate``: the session that lost the read right ends, the group key
rotates away from it). Everything shares one event loop with the 100 caches, so the
figures include waiting for the loop.

**checks** (in memory, no loop): ``PolicyModel.right`` on a generated policy (1,000
users, 50 groups with implications, 5,000 memberships over a 50-cell tree, 200 rules,
100 schemas) for distinct (user, schema, cell) queries: ``cold`` on a fresh model
(every query evaluated: effective groups, implication closure, rule precedence, the
explain path) and ``memoised`` (the same queries again). ``admit``: an instance's
``SessionGuard`` at ``full`` over a ``ModelPolicy`` of that model, ``admit(session,
"get", False)`` for sessions of 1,000 users; ``open_admit``: ``guard.open`` of a sealed
request (decryption, replay window, the request parsed) then ``admit``. Baseline: a loop
of dict lookups with the same keys in the same run; ``ratio_to_dict`` = checks/s ÷
lookups/s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from harness import log, median, percentile

from ubicore.cache import Cache
from ubicore.client import Client
from ubicore.errors import PermissionDenied
from ubicore.protocol.messages import Rekey, Request, SealedEvent
from ubicore.schema import Protection
from ubicore.security.guard import SessionGuard
from ubicore.security.model import Group, Membership, PolicyModel, Rule, User
from ubicore.security.policy import PolicySource, Right
from ubicore.security.primitives import random_key
from ubicore.security.session import (
    SessionGrant,
    client_session,
    new_session_keys,
    server_session,
)
from ubicore.service import InstanceServer
from ubicore.sessions import Credentials
from ubicore.testing.schemas import COUNTER
from ubicore.testing.site import RunningSite, running_site
from ubicore.transport.channel import Subscription

CELL = "Site"
TARGET_S = 1.0
"""A revocation takes effect (read and update) in under a second."""
WRITE_INTERVAL_S = 0.005
POLL_S = 0.001
WAIT_S = 5.0
JOIN_BATCH = 20
JOIN_TIMEOUT_S = 20.0
PASSWORD = "bench-revocation-password"


def _user(i: int) -> str:
    return f"bench-{i:03d}"


def _ms(values_s: list[float]) -> dict[str, Any]:
    if not values_s:
        return {"p50_ms": None, "max_ms": None, "samples": 0}
    s = sorted(values_s)
    return {"p50_ms": round(percentile(s, 0.5) * 1e3, 2), "max_ms": round(s[-1] * 1e3, 2),
            "min_ms": round(s[0] * 1e3, 2), "samples": len(s)}


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The victim's cache warns every second that it may no longer read: not progress."""
    logger = logging.getLogger("ubicore")
    before = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(before)


class _Observer:
    """A raw subscriber of the instance's channel: when each REKEY and sealed event of a
    new epoch arrives."""

    def __init__(self, endpoint: str) -> None:
        self.rekeys: list[tuple[float, int]] = []
        self.events: list[tuple[float, int]] = []
        self.sub = Subscription(endpoint, self._on)

    def _on(self, msg: Any) -> None:
        now = time.perf_counter()
        if isinstance(msg, Rekey):
            self.rekeys.append((now, msg.epoch))
        elif isinstance(msg, SealedEvent) and (not self.events or self.events[-1][1] != msg.epoch):
            self.events.append((now, msg.epoch))

    def rekey_after(self, t0: float, epoch: int) -> float | None:
        return next((t for t, e in self.rekeys if t >= t0 and e > epoch), None)

    def event_after(self, t0: float, epoch: int) -> float | None:
        return next((t for t, e in self.events if t >= t0 and e > epoch), None)

    def close(self) -> None:
        self.sub.close()


class _Stamps:
    """When each ``PolicySource.update`` ran, on the core and on the instance, and when
    the instance's guard returned a revoking rekey to publish (``reevaluate`` wrapped on
    the instance's guard object while the benchmark runs)."""

    def __init__(self, rs: RunningSite, server: InstanceServer) -> None:
        self.core: list[float] = []
        self.instance: list[float] = []
        self.published: list[float] = []
        assert rs.core is not None
        core_source: PolicySource = rs.core.companions["UPerm::Config"].core.policy.source  # type: ignore[attr-defined]
        instance_source: PolicySource = server.core.policy.source  # type: ignore[attr-defined]
        self._off = [core_source.subscribe(lambda: self.core.append(time.perf_counter())),
                     instance_source.subscribe(lambda: self.instance.append(time.perf_counter()))]
        guard = server.core.guard
        reevaluate = guard.reevaluate

        def timed() -> list[list[bytes]]:
            frames = reevaluate()
            if frames:
                self.published.append(time.perf_counter())
            return frames

        guard.reevaluate = timed  # type: ignore[method-assign]
        self._off.append(lambda: delattr(guard, "reevaluate"))

    @staticmethod
    def after(stamps: list[float], t0: float) -> float | None:
        return next((t for t in stamps if t >= t0), None)

    def close(self) -> None:
        for off in self._off:
            off()


async def _until(predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    deadline = time.perf_counter() + timeout_s
    while not predicate():
        if time.perf_counter() > deadline:
            return False
        await asyncio.sleep(POLL_S)
    return True


async def _writer(server: InstanceServer, stop: asyncio.Event) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        with server.transaction() as tx:
            tx.counters.upsert(name="tick", value=i)
        await asyncio.sleep(WRITE_INTERVAL_S)


class _Clients:
    """One client and one cache of the Counter per user."""

    def __init__(self, rs: RunningSite) -> None:
        self.rs = rs
        self.clients: dict[str, Client] = {}
        self.caches: dict[str, Cache] = {}

    async def join(self, name: str) -> None:
        client = Client.for_site(self.rs.site, credentials=Credentials.password(name, PASSWORD))
        self.clients[name] = client
        self.caches[name] = await client.cache(CELL, COUNTER, timeout_s=JOIN_TIMEOUT_S)

    async def join_all(self, names: list[str]) -> None:
        for i in range(0, len(names), JOIN_BATCH):
            await asyncio.gather(*(self.join(n) for n in names[i:i + JOIN_BATCH]))

    async def drop(self, name: str) -> None:
        self.caches.pop(name, None)
        client = self.clients.pop(name, None)
        if client is not None:
            await client.close()

    def undecryptable(self, but: str | None = None) -> int:
        return sum(c.undecryptable + c.rejected for n, c in self.caches.items() if n != but)

    async def close(self) -> None:
        for name in list(self.clients):
            await self.drop(name)


def _right_at_instance(server: InstanceServer, user: str) -> Right:
    return server.core.policy.right(user, COUNTER, CELL)


async def _revoke_read(rs: RunningSite, server: InstanceServer, clients: _Clients, obs: _Observer,
                       stamps: _Stamps, victim: str) -> dict[str, Any]:
    cache = clients.caches[victim]
    before_victim = cache.undecryptable + cache.rejected
    before_others = clients.undecryptable(but=victim)
    epoch = server.core.guard.epoch
    await asyncio.sleep(0.05)  # a few events under the current key first
    rs.policy.edit("remove_member", user=victim, group="everyone", cell=CELL)
    t0 = time.perf_counter()
    victim_ok = await _until(lambda: cache.undecryptable + cache.rejected > before_victim)
    t_victim = time.perf_counter()
    await _until(lambda: obs.event_after(t0, epoch) is not None)
    t_rekey, t_event = obs.rekey_after(t0, epoch), obs.event_after(t0, epoch)
    t_core, t_inst = _Stamps.after(stamps.core, t0), _Stamps.after(stamps.instance, t0)
    t_pub = _Stamps.after(stamps.published, t0)
    rep = {
        "core_model_s": None if t_core is None else t_core - t0,
        "instance_model_s": None if t_inst is None else t_inst - t0,
        "rekey_published_s": None if t_pub is None else t_pub - t0,
        "rekey_s": None if t_rekey is None else t_rekey - t0,
        "first_sealed_event_s": None if t_event is None else t_event - t0,
        "victim_undecryptable_s": t_victim - t0 if victim_ok else None,
        "epoch_advanced": server.core.guard.epoch > epoch,
    }
    await asyncio.sleep(0.05)  # the others take the rekey and open a few events under the new key
    rep["others_failed"] = clients.undecryptable(but=victim) - before_others
    # put the victim back with a fresh client, untimed
    rs.policy.edit("add_member", user=victim, group="everyone", cell=CELL)
    await clients.drop(victim)
    if not await _until(lambda: _right_at_instance(server, victim) >= Right.READ):
        raise RuntimeError(f"{victim} did not get the read right back")
    await clients.join(victim)
    return rep


async def _revoke_update(rs: RunningSite, server: InstanceServer, clients: _Clients, stamps: _Stamps,
                         victim: str) -> dict[str, Any]:
    client = clients.clients[victim]
    rs.policy.edit("add_member", user=victim, group="admin", cell=CELL)
    if not await _until(lambda: _right_at_instance(server, victim) >= Right.UPDATE):
        raise RuntimeError(f"{victim} did not get the update right")
    await client.call(CELL, COUNTER, "bump", name=victim)  # admitted, in its session
    await asyncio.sleep(0.05)
    rs.policy.edit("remove_member", user=victim, group="admin", cell=CELL)
    t0 = time.perf_counter()
    admitted = 0
    t_denied: float | None = None
    deadline = t0 + WAIT_S
    while time.perf_counter() < deadline:
        try:
            await client.call(CELL, COUNTER, "bump", name=victim)
            admitted += 1
        except PermissionDenied:
            t_denied = time.perf_counter()
            break
    t_inst = _Stamps.after(stamps.instance, t0)
    return {"denied_s": None if t_denied is None else t_denied - t0,
            "instance_model_s": None if t_inst is None else t_inst - t0,
            "calls_before_denied": admitted}


def _summary(reps: list[dict[str, Any]], key: str) -> dict[str, Any]:
    values = [r[key] for r in reps if r.get(key) is not None]
    return {**_ms(values), "missing": len(reps) - len(values)}


async def bench_latency(sessions: int, reps: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="ubench-rev-") as tmp, _quiet():
        async with running_site(Path(tmp), instances=[(COUNTER, CELL)],
                                extra_deployments=[{"schema": COUNTER, "cell": CELL, "protection": "full"}],
                                client_timeout_s=10.0) as rs:
            server = rs.server(COUNTER, CELL)
            if server.core.protection is not Protection.FULL:
                raise RuntimeError(f"the Counter runs at {server.core.protection.value}, not full")
            names = [_user(i) for i in range(sessions)]
            t_setup = time.perf_counter()
            for name in names:
                rs.policy.set_user(name, PASSWORD, Right.READ)
            if not await _until(lambda: all(_right_at_instance(server, n) >= Right.READ for n in names)):
                raise RuntimeError("the instance never learnt the users")
            clients = _Clients(rs)
            obs = _Observer(server.event_endpoint)
            stamps = _Stamps(rs, server)
            stop = asyncio.Event()
            writer = asyncio.create_task(_writer(server, stop))
            try:
                await clients.join_all(names)
                setup_s = time.perf_counter() - t_setup
                live = len(server.core.guard.sessions)
                log(f"  {len(clients.caches)} caches joined in {setup_s:.1f} s ({live} sessions on the instance)")
                read_reps = [await _revoke_read(rs, server, clients, obs, stamps, names[i % sessions])
                             for i in range(reps)]
                update_reps = [await _revoke_update(rs, server, clients, stamps, names[(sessions // 2 + i) % sessions])
                               for i in range(reps)]
                readers_at_end = sum(1 for s in server.core.guard.sessions.values() if s.may_read)
            finally:
                stop.set()
                with contextlib.suppress(Exception):
                    await writer
                stamps.close()
                obs.close()
                await clients.close()
    read: dict[str, Any] = {key.removesuffix("_s"): _summary(read_reps, key)
            for key in ("core_model_s", "instance_model_s", "rekey_published_s", "rekey_s", "first_sealed_event_s",
                        "victim_undecryptable_s")}
    read["others_failed"] = sum(r["others_failed"] for r in read_reps)
    read["epoch_advanced_every_time"] = all(r["epoch_advanced"] for r in read_reps)
    update: dict[str, Any] = {"denied": _summary(update_reps, "denied_s"),
                              "instance_model": _summary(update_reps, "instance_model_s"),
                              "calls_before_denied": [r["calls_before_denied"] for r in update_reps]}
    worst = [read["rekey"]["max_ms"], read["victim_undecryptable"]["max_ms"], update["denied"]["max_ms"]]
    met = all(w is not None and w < TARGET_S * 1e3 for w in worst) and not read["victim_undecryptable"]["missing"] \
        and not update["denied"]["missing"]
    return {"sessions": sessions, "sessions_live": live, "readers_at_end": readers_at_end, "reps": reps,
            "setup_s": round(setup_s, 2), "write_interval_ms": WRITE_INTERVAL_S * 1e3,
            "read": read, "update": update, "target": f"read and update revocation max < {TARGET_S} s", "met": met}


# --- permission checks ---------------------------------------------------------------------------


def realistic_policy(seed: int = 4) -> tuple[PolicyModel, list[str], list[str], list[str]]:
    """1,000 users, 50 groups (each implying 0-2 others), 5,000 memberships over a 50-cell
    tree (Site, 7 buildings, 42 zones), 200 rules over 10 modules × 10 schemas; (model,
    users, schemas, cells)."""
    rng = random.Random(seed)
    buildings = [f"B{b}" for b in range(7)]
    parents: dict[str, str | None] = {"Site": None, **{b: "Site" for b in buildings}}
    for z in range(42):
        parents[f"Z{z:02d}"] = buildings[z % 7]
    cells = list(parents)
    groups = [f"g{i:02d}" for i in range(50)]
    group_rows = [Group(g, implies=frozenset(rng.sample([h for h in groups if h != g], rng.choice((0, 1, 1, 2)))))
                  for g in groups]
    users = [f"u{i:04d}" for i in range(1000)]
    members: set[Membership] = set()
    while len(members) < 5000:
        members.add(Membership(rng.choice(users), rng.choice(groups), rng.choice(cells)))
    modules = [f"M{m}" for m in range(10)]
    schemas = [f"{m}::S{s}" for m in modules for s in range(10)]
    rules: dict[tuple[str, str, str], Rule] = {}
    while len(rules) < 200:
        g, kind = rng.choice(groups), rng.random()
        module = "default" if kind < 0.1 else rng.choice(modules)
        schema = "default" if kind < 0.4 else f"S{rng.randrange(10)}"
        if module == "default":
            schema = "default"
        rules[(g, module, schema)] = Rule(g, module, schema, rng.choice((Right.NONE, Right.READ, Right.READ,
                                                                          Right.UPDATE)))
    model = PolicyModel(users=[User(u) for u in users], groups=group_rows, members=members,
                        rules=rules.values(), parents=parents)
    return model, users, schemas, cells


def _rate(n: int, seconds: float) -> float:
    return n / seconds if seconds > 0 else float("nan")


def bench_checks(queries: int, reps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    model, users, schemas, cells = realistic_policy()
    build_s = time.perf_counter() - t0
    rng = random.Random(7)
    qs: list[tuple[str, str, str]] = list(dict.fromkeys(
        (rng.choice(users), rng.choice(schemas), rng.choice(cells)) for _ in range(queries)))

    cold, memo, raw = [], [], []
    granted = 0
    for _ in range(reps):
        fresh = PolicyModel(users=model.users.values(), groups=model.groups.values(), members=model.members,
                            rules=model.rules.values(), parents=model.parents)
        right = fresh.right
        t0 = time.perf_counter()
        for u, s, c in qs:
            right(u, s, c)
        cold.append(_rate(len(qs), time.perf_counter() - t0))
        granted = sum(1 for q in qs if fresh.right(*q) >= Right.READ)
        passes = 5
        t0 = time.perf_counter()
        for _ in range(passes):
            for u, s, c in qs:
                right(u, s, c)
        memo.append(_rate(passes * len(qs), time.perf_counter() - t0))
        table = {q: fresh.right(*q) for q in qs}
        get = table.get
        t0 = time.perf_counter()
        for _ in range(passes):
            for u, s, c in qs:
                get((u, s, c))
        raw.append(_rate(passes * len(qs), time.perf_counter() - t0))

    admit, open_admit = _bench_guard(model, users, reps)
    cold_r, memo_r, raw_r = median(cold), median(memo), median(raw)
    return {
        "policy": {"users": len(model.users), "groups": len(model.groups), "members": len(model.members),
                   "rules": len(model.rules), "cells": len(model.parents), "schemas": len(schemas),
                   "build_ms": round(build_s * 1e3, 1)},
        "queries": len(qs), "granted_read": granted, "reps": reps,
        "dict_lookups_per_s": round(raw_r),
        "cold": {"checks_per_s": round(cold_r), "us_per_check": round(1e6 / cold_r, 2),
                 "ratio_to_dict": round(cold_r / raw_r, 4)},
        "memoised": {"checks_per_s": round(memo_r), "us_per_check": round(1e6 / memo_r, 3),
                     "ratio_to_dict": round(memo_r / raw_r, 3)},
        "admit": {"checks_per_s": round(median(admit)), "us_per_check": round(1e6 / median(admit), 3),
                  "ratio_to_dict": round(median(admit) / raw_r, 3)},
        "open_admit": {"requests_per_s": round(median(open_admit)),
                       "us_per_request": round(1e6 / median(open_admit), 2)},
    }


def _bench_guard(model: PolicyModel, users: list[str], reps: int) -> tuple[list[float], list[float]]:
    """``admit`` and ``open`` + ``admit`` on a guard at ``full`` whose policy is ``model``;
    sessions of the users with the read right on its (schema, cell)."""
    source = PolicySource("ubench")
    source.update(model)
    schema, cell, iid = "M3::S4", "Z17", b"\x33" * 16
    guard = SessionGuard(schema, cell, iid, Protection.FULL, source.policy())
    readers = [u for u in users if model.right(u, schema, cell) >= Right.READ] or users[:1]
    sessions, ends = [], []
    for i, u in enumerate(readers):
        sid, c2s, s2c = new_session_keys()
        k = random_key()
        grant = SessionGrant(sid, c2s, s2c, guard.epoch, "full", 3600.0, u, guard.keys.delivered())
        s = server_session(schema, cell, iid, grant, k, time.monotonic() + 3600.0, peer=b"p%d" % i, may_read=True)
        guard.sessions[sid] = s
        sessions.append(s)
        ends.append(client_session(schema, cell, iid, grant, k, time.monotonic() + 3600.0))
    admit_rates, open_rates = [], []
    per_rep = max(20_000, len(sessions))
    order = [sessions[i % len(sessions)] for i in range(per_rep)]
    for _ in range(reps):
        # a new model, as a policy change installs: each user's first check is evaluated,
        # the rest are memoised
        source.update(PolicyModel(users=model.users.values(), groups=model.groups.values(), members=model.members,
                                  rules=model.rules.values(), parents=model.parents))
        guard.policy.refresh()
        adm = guard.admit
        t0 = time.perf_counter()
        for s in order:
            adm(s, "get", False)
        admit_rates.append(_rate(len(order), time.perf_counter() - t0))
        n_sealed = min(per_rep, 5000)
        sealed = [ends[i % len(ends)].seal_request(Request(i + 1, schema, cell, "get", {"name": "x"}))
                  for i in range(n_sealed)]
        t0 = time.perf_counter()
        for msg in sealed:
            session, req = guard.open(msg)
            adm(session, req.operation, False)
        open_rates.append(_rate(n_sealed, time.perf_counter() - t0))
    return admit_rates, open_rates


async def bench_revocation(sessions: int, reps: int, check_queries: int, check_reps: int) -> dict[str, Any]:
    t0 = time.perf_counter()
    checks = bench_checks(check_queries, check_reps)
    log(f"  permission checks done in {time.perf_counter() - t0:.1f} s")
    latency = await bench_latency(sessions, reps)
    return {"latency": latency, "checks": checks}
