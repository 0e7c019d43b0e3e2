"""Protection levels: event throughput and update round trips at ``open``, ``update`` and
``full``, against raw pyzmq (and raw pyzmq sealing every message) in the same run.

The ubicore child serves a second site (:func:`write_security_site`): the core and three
instances of ``UTest::Counter`` (:mod:`ubicore.testing.schemas`), one per level, each
level set by the deployment's ``protection`` override. Its security store (written here
before the child starts) holds ``default`` and the test operator (update right) with the
test suite's tiny Argon2id costs, and ``bench-a2id`` with the default costs (t=3, p=4,
64 MiB) for the login benchmark of :mod:`measure_handshake`.

**events**: the bench process holds a ``Cache`` of the instance and counts the
``counters`` changes in an ``on_change`` callback; the clock starts when ``burst(n,
keys=1024, size=64)`` is called and stops at the n-th callback. ``burst`` commits n
separate transactions back to back without yielding, so they leave as deltas of 256
batches (``service.MAX_COALESCED_BATCHES``); at ``full`` each delta is sealed once under
the group key and opened once by the cache. Raw: one PUB message per event (``raw``),
and one AES-128-GCM sealed PUB message per event, opened by the SUB (``raw_aead``).

**rpc**: ``bump(name="rpc")`` one call at a time; at ``update`` and ``full`` the call is
sealed inside the operator's session (logged in before the clock starts). Raw: the
blocking DEALER/ROUTER echo of :mod:`measure_rpc`, and the same echo with both
directions sealed and opened with AES-128-GCM (``raw_aead``).

Levels and baselines alternate within each repetition, so drift in machine load hits
them alike; the level ratios are medians of per-repetition ratios (events) or ratios of
pooled percentiles (rpc).
"""

from __future__ import annotations

import contextlib
import struct
import time
from pathlib import Path
from typing import Any

import msgpack
import zmq
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from harness import MEASURE_TIMEOUT_S, Child, log, median, paired_ratio, percentile_us, ratio, write_site
from measure_events import RAW_HWM, CountingCache, RawEvents
from measure_rpc import RawRpc
from raw_aead_child import AD_CONTEXT, BE8, PREFIX_C2S, PREFIX_EVENT, PREFIX_S2C

from ubicore.client import Client
from ubicore.config import load_site
from ubicore.runtime import current_os_user, init_site, offline_policy
from ubicore.security.amp import make_verifier
from ubicore.security.primitives import DEFAULT_KDF
from ubicore.testing.schemas import COUNTER
from ubicore.testing.site import OPERATOR, TEST_KDF

LEVELS = ("open", "update", "full")
CELLS = {"open": "Sec-Open", "update": "Sec-Update", "full": "Sec-Full"}
SITE_NAME = "ubench-sec"
A2ID_USER = ("bench-a2id", "bench-a2id-password")
"""A user whose verifier has the default Argon2id costs (the login-with-KDF benchmark)."""
EVENT_SIZE = 64
EVENT_KEYS = 1024
RPC_COUNTER = "rpc"
BURST_DONE_WAIT_S = 10.0
TARGET_FULL_EVENTS = 0.8
"""full events/s ≥ 0.8 × open events/s of the same run."""
TARGET_UPDATE_RPC = 1.2
"""update RPC p50 ≤ 1.2 × open RPC p50."""
_ID = struct.Struct("<Q")


def write_security_site(directory: Path) -> Path:
    """The site file and its security store (operator with test costs, bench-a2id with
    the default Argon2id costs)."""
    dataset = directory / "dataset"
    path = write_site(directory, SITE_NAME, dataset, "ubicore.testing.schemas",
                      [{"schema": COUNTER, "cell": CELLS[lv], "protection": lv} for lv in LEVELS])
    site = load_site(path)
    init_site(site, OPERATOR[1], admin_user=OPERATOR[0], kdf=TEST_KDF, os_user=current_os_user())
    rec = make_verifier(A2ID_USER[0], SITE_NAME, A2ID_USER[1], DEFAULT_KDF)  # the default costs
    with offline_policy(site) as (perm, tx):
        type(perm).add_user(perm, tx, A2ID_USER[0], salt=rec.salt, verifier=rec.verifier, t=rec.params.t,
                            p=rec.params.p, m_kib=rec.params.m_kib, groups=["everyone"])
    return path


# --- events -------------------------------------------------------------------------------------


class LevelEvents(CountingCache):
    """A Cache of one level's Counter and a callback counting ``counters`` changes."""

    def __init__(self, client: Client, level: str) -> None:
        super().__init__(client, CELLS[level], COUNTER)
        self.level = level

    def _on_change(self, relation: str, old: Any, new: Any) -> None:
        if relation == "counters":
            self.count += 1
            if self.count == self.target:
                self.t_end = time.perf_counter()
                self.done.set()

    async def run(self, n: int, timeout_s: float) -> dict[str, Any]:
        cache = self.cache
        assert cache is not None
        await self.arm(n)
        resyncs, undecryptable, rejected = cache.resyncs, cache.undecryptable, cache.rejected
        t0 = time.perf_counter()
        burst = await self.client.call(self.cell, COUNTER, "burst", n=n, keys=EVENT_KEYS, size=EVENT_SIZE)
        elapsed = await self.wait(t0, timeout_s)
        if elapsed is None:
            elapsed = time.perf_counter() - t0
        received = self.count
        # the instance marks the burst done after its last commit: wait for it before the next run
        row_done = lambda c: (r := c.table("bursts").get((burst,))) is not None and r.done  # noqa: E731
        await cache.wait_for(row_done, BURST_DONE_WAIT_S)
        return {"eps": received / elapsed, "received": received, "elapsed_s": elapsed, "complete": received >= n,
                "resyncs": cache.resyncs - resyncs, "undecryptable": cache.undecryptable - undecryptable,
                "rejected": cache.rejected - rejected}


class RawAeadEvents(RawEvents):
    """The raw baseline that opens every event with AES-128-GCM (``raw_aead_child.py pub``)."""

    def __init__(self, child: Child) -> None:
        super().__init__(child)
        self.aead = AESGCM(bytes.fromhex(child.info["key"]))
        self.failures = 0

    def _receive(self, n: int, size: int, t0: float, deadline: float) -> tuple[int, float]:
        sub_recv, decrypt = self.sub.recv, self.aead.decrypt
        count = 0
        t_end = t0
        try:
            while count < n:
                msg = sub_recv()
                c = msg[:8]
                plain = decrypt(PREFIX_EVENT + c, msg[8:], AD_CONTEXT + c)
                if len(plain) != size:
                    self.failures += 1
                count += 1
                if not count & 1023:
                    t_end = time.perf_counter()
                    if t_end > deadline:
                        break
            t_end = time.perf_counter()
        except zmq.Again:
            pass
        return count, t_end


# --- rpc ----------------------------------------------------------------------------------------


RPC_CHUNK = 100
"""Calls a level makes before the next level's turn (see ``_rpc``)."""


async def ours_bump(client: Client, level: str, calls: int, timeout_s: float) -> list[float]:
    return await bump_latencies(client, CELLS[level], RPC_COUNTER, calls, timeout_s)


async def bump_latencies(client: Client, cell: str, name: str, calls: int, timeout_s: float) -> list[float]:
    """Seconds each of up to ``calls`` sequential ``bump`` calls of counter ``name`` at
    ``cell`` took (stopping at ``timeout_s``); RuntimeError if a count is skipped."""
    lat: list[float] = []
    call, clock = client.call, time.perf_counter
    deadline = clock() + timeout_s
    last = None
    for _ in range(calls):
        t0 = clock()
        value = await call(cell, COUNTER, "bump", name=name)
        t1 = clock()
        if last is not None and value != last + 1:
            raise RuntimeError(f"bump at {cell} answered {value} after {last}")
        last = value
        lat.append(t1 - t0)
        if t1 > deadline:
            break
    return lat


class RawAeadRpc(RawRpc):
    """A blocking DEALER that seals each request and opens each reply (``raw_aead_child.py echo``)."""

    def __init__(self, child: Child) -> None:
        super().__init__(child.info["rpc"], msgpack.packb([1, COUNTER, CELLS["full"], "bump", {"name": RPC_COUNTER},
                                                            5000]))
        self.c2s = AESGCM(bytes.fromhex(child.info["c2s"]))
        self.s2c = AESGCM(bytes.fromhex(child.info["s2c"]))
        self.counter = 0

    def sequential(self, calls: int, timeout_s: float) -> list[float]:
        send, recv, clock, body = self.sock.send_multipart, self.sock.recv_multipart, time.perf_counter, self.body
        encrypt, decrypt, ctx, be8 = self.c2s.encrypt, self.s2c.decrypt, AD_CONTEXT, BE8.pack
        lat: list[float] = []
        deadline = clock() + timeout_s
        for i in range(calls):
            t0 = clock()
            self.counter += 1
            c = be8(self.counter)
            send([_ID.pack(i), c, encrypt(PREFIX_C2S + c, body, ctx + c)])
            rid, rc, ct = recv()
            plain = decrypt(PREFIX_S2C + rc, ct, ctx + rc)
            t1 = clock()
            if _ID.unpack(rid)[0] != i or plain != body:
                raise RuntimeError("raw aead echo out of order")
            lat.append(t1 - t0)
            if t1 > deadline:
                break
        return lat


# --- the section --------------------------------------------------------------------------------


async def _events(client: Client, n: int, reps: int) -> dict[str, Any]:
    ours = {lv: LevelEvents(client, lv) for lv in LEVELS}
    async with contextlib.AsyncExitStack() as stack:
        for lv in LEVELS:
            stack.push_async_callback(ours[lv].close)
        for lv in LEVELS:
            await ours[lv].setup()
            await ours[lv].run(min(n, 5000), MEASURE_TIMEOUT_S)  # warm-up; the first pass inserts the keys
        raw_child = stack.enter_context(Child("raw_child.py", "pub", str(RAW_HWM)))
        aead_child = stack.enter_context(Child("raw_aead_child.py", "pub", str(RAW_HWM)))
        raw = RawEvents(raw_child)
        stack.callback(raw.close)
        raw_aead = RawAeadEvents(aead_child)
        stack.callback(raw_aead.close)
        for r in (raw, raw_aead):
            r.handshake()
            r.run(min(n, 5000), EVENT_SIZE, MEASURE_TIMEOUT_S)
        runs: dict[str, list[dict[str, Any]]] = {k: [] for k in (*LEVELS, "raw", "raw_aead")}
        for rep in range(reps):
            for lv in LEVELS:
                runs[lv].append(await ours[lv].run(n, MEASURE_TIMEOUT_S))
            runs["raw"].append(raw.run(n, EVENT_SIZE, MEASURE_TIMEOUT_S))
            runs["raw_aead"].append(raw_aead.run(n, EVENT_SIZE, MEASURE_TIMEOUT_S))
            log(f"[levels] events rep {rep + 1}/{reps}: "
                + ", ".join(f"{k} {v[-1]['eps']:,.0f} ev/s{'' if v[-1]['complete'] else ' (INCOMPLETE)'}"
                            for k, v in runs.items()))

    def med(key: str) -> float:
        return median([x["eps"] for x in runs[key]])

    def paired(a: str, b: str) -> tuple[float | None, list[float | None]]:
        return paired_ratio([x["eps"] for x in runs[a]], [x["eps"] for x in runs[b]])

    out: dict[str, Any] = {"events": n, "payload_bytes": EVENT_SIZE, "keys": EVENT_KEYS,
                           "raw_eps": round(med("raw")), "raw_aead_eps": round(med("raw_aead")),
                           "raw_runs_eps": [round(x["eps"]) for x in runs["raw"]],
                           "raw_aead_runs_eps": [round(x["eps"]) for x in runs["raw_aead"]],
                           "raw_dropped": sum(x["dropped"] for x in runs["raw"] + runs["raw_aead"])}
    for lv in LEVELS:
        vs_raw, vs_raw_runs = paired(lv, "raw")
        vs_open, vs_open_runs = paired(lv, "open")
        entry: dict[str, Any] = {
            "ubicore_eps": round(med(lv)), "ratio_raw": vs_raw, "ratio_open": vs_open,
            "ubicore_runs_eps": [round(x["eps"]) for x in runs[lv]], "runs_ratio_raw": vs_raw_runs,
            "runs_ratio_open": vs_open_runs,
            "complete": all(x["complete"] for x in runs[lv]),
            "ubicore_resyncs": sum(x["resyncs"] for x in runs[lv]),
            "undecryptable": sum(x["undecryptable"] for x in runs[lv]),
            "rejected": sum(x["rejected"] for x in runs[lv]),
        }
        if lv == "full":
            entry["ratio_raw_aead"], entry["runs_ratio_raw_aead"] = paired(lv, "raw_aead")
            entry["target"] = f"ratio_open >= {TARGET_FULL_EVENTS}"
            entry["met"] = vs_open is not None and vs_open >= TARGET_FULL_EVENTS
        out[lv] = entry
    return out


async def _rpc(client: Client, calls: int, reps: int) -> dict[str, Any]:
    pooled: dict[str, list[float]] = {k: [] for k in (*LEVELS, "raw", "raw_aead")}
    with contextlib.ExitStack() as stack:
        raw_child = stack.enter_context(Child("raw_child.py", "echo"))
        aead_child = stack.enter_context(Child("raw_aead_child.py", "echo"))
        raw = RawRpc(raw_child.info["rpc"])
        stack.callback(raw.close)
        raw_aead = RawAeadRpc(aead_child)
        stack.callback(raw_aead.close)
        for lv in LEVELS:  # logs in at update and full, then warms up
            await ours_bump(client, lv, 300, MEASURE_TIMEOUT_S)
        raw.sequential(300, MEASURE_TIMEOUT_S)
        raw_aead.sequential(300, MEASURE_TIMEOUT_S)
        for rep in range(reps):
            # The levels take turns in chunks, so the machine's drift (a shared 2-core VM)
            # falls on all three alike and their ratios compare like with like.
            this: dict[str, list[float]] = {lv: [] for lv in LEVELS}
            for _ in range(max(1, calls // RPC_CHUNK)):
                for lv in LEVELS:
                    this[lv] += await ours_bump(client, lv, min(RPC_CHUNK, calls), MEASURE_TIMEOUT_S)
            this["raw"] = raw.sequential(calls, MEASURE_TIMEOUT_S)
            this["raw_aead"] = raw_aead.sequential(calls, MEASURE_TIMEOUT_S)
            for k, v in this.items():
                pooled[k].extend(v)
            log(f"[levels] rpc rep {rep + 1}/{reps}: "
                + ", ".join(f"{k} p50 {percentile_us(v, 0.5)} µs p99 {percentile_us(v, 0.99)} µs"
                            for k, v in this.items()))
    raw50, raw99 = percentile_us(pooled["raw"], 0.5), percentile_us(pooled["raw"], 0.99)
    aead50, aead99 = percentile_us(pooled["raw_aead"], 0.5), percentile_us(pooled["raw_aead"], 0.99)
    open50 = percentile_us(pooled["open"], 0.5)
    out: dict[str, Any] = {"operation": "bump", "calls_per_rep": calls,
                           "raw_p50_us": raw50, "raw_p99_us": raw99,
                           "raw_aead_p50_us": aead50, "raw_aead_p99_us": aead99}
    for lv in LEVELS:
        p50, p99 = percentile_us(pooled[lv], 0.5), percentile_us(pooled[lv], 0.99)
        entry: dict[str, Any] = {"calls": len(pooled[lv]), "sealed": lv != "open",
                                 "ubicore_p50_us": p50, "ubicore_p99_us": p99,
                                 "ratio_p50_raw": ratio(p50, raw50), "ratio_p99_raw": ratio(p99, raw99),
                                 "ratio_p50_open": ratio(p50, open50),
                                 "complete": len(pooled[lv]) >= reps * calls}
        if lv != "open":
            entry["ratio_p50_raw_aead"] = ratio(p50, aead50)
            entry["ratio_p99_raw_aead"] = ratio(p99, aead99)
        if lv == "update":
            r = entry["ratio_p50_open"]
            entry["target"] = f"ratio_p50_open <= {TARGET_UPDATE_RPC}"
            entry["met"] = r is not None and r <= TARGET_UPDATE_RPC
        out[lv] = entry
    return out


async def bench_levels(client: Client, events_n: int, events_reps: int, rpc_calls: int,
                       rpc_reps: int) -> dict[str, Any]:
    """Events and rpc at each level; ``client`` logs in as the operator."""
    return {"events": await _events(client, events_n, events_reps),
            "rpc": await _rpc(client, rpc_calls, rpc_reps)}
