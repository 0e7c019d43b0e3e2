"""The audit trail's cost: update operations per second with and without auditing, the
shipping lag to ``UAudit::Log`` and the core's append rate, against raw pyzmq in the
same run.

Three processes, as a site deploys them (the machine has 2 cores):

- the **core child** (``python bench/measure_audit.py core SITE``): :func:`serve_core`
  (naming, ``UPerm::Config``, ``UAudit::Log`` with its ``CoreWriter``: chain, MAC,
  SQLite, a signed checkpoint every 100 records). It wraps ``CoreWriter._write`` to
  stamp (``time.perf_counter``, the system-wide monotonic clock) every commit that
  holds records of the audited instance, and answers JSON-line commands on its stdin
  (``mark``, ``wait``: see :class:`CoreControl`); it stops when stdin closes.
- the **instances child** (``... instances SITE``): two ``UTest::Counter`` instances at
  ``update`` protection, ``Audit-On`` served with ``serve_instance(..., audit=True)``
  (every update operation is spooled with ``Spool.put``: msgpack + one ``os.write``
  before the reply; a ``Shipper`` sends batches to ``UAudit::Log.append`` as the
  site's service user) and ``Audit-Off`` with ``audit=False`` (nothing recorded).
- the **bench process**: one ``Client`` logged in as the test operator (update right),
  calling ``bump(name="audit")`` (an update operation that commits, sealed in the
  operator's session).

Per round, audited and unaudited alternate (their order swaps every round):
*window*: ``calls`` bumps from ``WINDOW`` tasks that each keep one call in flight; ops/s
from the first send to the last reply. For the audited run, the core child then waits
until it has committed every record of the run: ``lag`` runs from the last reply to the
commit that holds the last record; ``append_rate`` is the records of the run over the
time from the first to the last such commit. CPU time of each process (``/proc``) is
read around each run, the audited one up to that last commit. *sequential*: bumps one at
a time, p50/p99 latency. *raw*: a blocking DEALER against ``raw_child.py echo`` (the
``rpc`` section's baseline), sequential and with ``WINDOW`` outstanding. The ratio
``audited / unaudited`` is taken per round; we report its median and minimum.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import select
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import (
    MEASURE_TIMEOUT_S,
    Child,
    log,
    median,
    percentile_us,
    ratio,
    write_site,
)
from measure_levels import bump_latencies
from measure_rpc import RawRpc

from ubicore.client import Client
from ubicore.config import load_site
from ubicore.runtime import current_os_user, init_site
from ubicore.sessions import Credentials
from ubicore.testing.schemas import COUNTER
from ubicore.testing.site import OPERATOR, TEST_KDF

SITE_NAME = "ubench-audit"
AUDITED = "Audit-On"
UNAUDITED = "Audit-Off"
CELLS = {"audited": AUDITED, "unaudited": UNAUDITED}
PROTECTION = "update"
COUNTER_NAME = "audit"
WINDOW = 8
"""Calls kept in flight by the window runs (as the rpc section's ``in_flight8``)."""
TARGET_RATIO = 0.8
"""Audited update ops/s ≥ 0.8 × unaudited, same run."""
FIND_WAIT_S = 15.0
LAG_WAIT_S = 20.0
CONTROL_TIMEOUT_S = LAG_WAIT_S + 5.0
CHILD_CHECK_S = 0.5
_CLK_TCK = os.sysconf("SC_CLK_TCK")
T = TypeVar("T")


def write_audit_site(directory: Path) -> Path:
    """The site file (two Counters at ``update``) and its factory policy: the test
    operator as administrator, test KDF costs, this account as the OS service user, the
    site's service user cached in ``credentials.dat`` (the instances log in as it)."""
    path = write_site(directory, SITE_NAME, directory / "dataset", "ubicore.testing.schemas",
                      [{"schema": COUNTER, "cell": cell, "protection": PROTECTION} for cell in CELLS.values()])
    init_site(load_site(path), OPERATOR[1], admin_user=OPERATOR[0], kdf=TEST_KDF, os_user=current_os_user())
    return path


# --- the children ---------------------------------------------------------------------------------


def _profiled(main: Callable[[], None]) -> None:
    """Run ``main`` under cProfile when ``UBENCH_PROFILE`` names a file (as ubicore_child)."""
    profile_to = os.environ.get("UBENCH_PROFILE")
    if not profile_to:
        main()
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        main()
    finally:
        prof.disable()
        prof.dump_stats(profile_to)


class _Stamps:
    """Commits of the core's writer holding records of the audited instance
    (``CoreWriter._write`` wrapped: it chains, MACs and commits one batch)."""

    def __init__(self, writer: Any) -> None:
        self.records = 0  # cumulative records of the audited instance
        self.stamps: list[tuple[float, int, int]] = []  # (perf_counter, cumulative, in this commit)
        self.changed = asyncio.Event()
        write = writer._write

        def stamped(events: list[tuple[Any, str]], *args: Any, **kwargs: Any) -> Any:
            result = write(events, *args, **kwargs)
            n = sum(1 for event, _ in events if event.cell == AUDITED and event.action == "update")
            if n:
                self.records += n
                self.stamps.append((time.perf_counter(), self.records, n))
                self.changed.set()
            return result

        writer._write = stamped

    def mark(self) -> dict[str, Any]:
        self.stamps.clear()
        return {"records": self.records}

    async def wait(self, target: int, timeout_s: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while self.records < target and time.monotonic() < deadline:
            self.changed.clear()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.changed.wait(), max(0.001, deadline - time.monotonic()))
        reached = next((t for t, cum, _ in self.stamps if cum >= target), None)
        return {"ok": reached is not None, "records": self.records, "t_reached": reached,
                "t_first": self.stamps[0][0] if self.stamps else None,
                "first_batch": self.stamps[0][2] if self.stamps else 0,
                "commits": sum(1 for t, cum, _ in self.stamps if cum <= target)}


def _stdin_commands(loop: asyncio.AbstractEventLoop,
                    handle: Callable[[dict[str, Any]], Coroutine[Any, Any, Any]],
                    stop: asyncio.Event) -> None:
    """Read JSON-line commands on stdin (a thread); answer each with one JSON line on
    stdout; set ``stop`` when stdin closes."""
    fd = sys.stdin.fileno()
    buf = b""
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                answer: Any
                try:
                    answer = asyncio.run_coroutine_threadsafe(handle(json.loads(line)), loop).result(CONTROL_TIMEOUT_S)
                except Exception as exc:  # noqa: BLE001 - answered to the bench, which raises it
                    answer = {"error": f"{type(exc).__name__}: {exc}"}
                sys.stdout.write(json.dumps(answer) + "\n")
                sys.stdout.flush()
    except (OSError, ValueError):
        pass
    finally:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(stop.set)


async def _serve_core(site_path: str) -> None:
    from ubicore.runtime import serve_core

    site = load_site(site_path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    async with serve_core(site) as server:
        stamps = _Stamps(server.companions["UAudit::Log"].core.obj.writer)

        async def handle(cmd: dict[str, Any]) -> Any:
            if cmd["cmd"] == "mark":
                return stamps.mark()
            if cmd["cmd"] == "wait":
                return await stamps.wait(int(cmd["target"]), float(cmd["timeout_s"]))
            raise ValueError(f"unknown command {cmd['cmd']!r}")

        print("READY " + json.dumps({"pid": os.getpid()}), flush=True)
        threading.Thread(target=_stdin_commands, args=(loop, handle, stop), daemon=True).start()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), 600.0)


async def _serve_instances(site_path: str) -> None:
    import childproc

    from ubicore.runtime import serve_instance

    site = load_site(site_path)
    stop = childproc.stop_event()
    async with contextlib.AsyncExitStack() as stack:
        for kind, cell in CELLS.items():
            plan = site.instance(COUNTER, cell)
            assert plan is not None
            await stack.enter_async_context(serve_instance(site, plan, audit=kind == "audited"))
        childproc.ready(pid=os.getpid())
        await childproc.until_stopped(stop)


def child_main(argv: list[str]) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    mode, site_path = argv[1], argv[2]
    serve = {"core": _serve_core, "instances": _serve_instances}[mode]
    _profiled(lambda: asyncio.run(serve(site_path)))


# --- the bench side -------------------------------------------------------------------------------


class CoreControl:
    """The bench's end of the core child's stdin/stdout commands."""

    def __init__(self, child: Child) -> None:
        self.child = child
        self._buf = b""

    def request(self, **cmd: Any) -> dict[str, Any]:
        proc = self.child.proc
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write((json.dumps(cmd) + "\n").encode())
        proc.stdin.flush()
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + CONTROL_TIMEOUT_S
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"the core child did not answer {cmd}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"the core child exited:\n{self.child.log_tail()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        answer: dict[str, Any] = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"the core child: {answer['error']}")
        return answer


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _CLK_TCK


class _Cpu:
    def __init__(self, core: Child, instances: Child) -> None:
        self.pids = {"core": core.proc.pid, "instances": instances.proc.pid}

    def now(self) -> dict[str, float]:
        out = {k: _cpu_s(pid) for k, pid in self.pids.items()}
        out["client"] = time.process_time()
        return out

    @staticmethod
    def since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
        return {k: after[k] - before[k] for k in before}


async def window_run(client: Client, cell: str, calls: int, timeout_s: float) -> dict[str, Any]:
    """``calls`` bumps from WINDOW tasks, each keeping one call in flight."""
    call, clock = client.call, time.perf_counter
    sent = 0
    done = 0
    top = 0
    t0 = clock()
    deadline = t0 + timeout_s

    async def worker() -> None:
        nonlocal sent, done, top
        while sent < calls and clock() < deadline:
            sent += 1
            value = await call(cell, COUNTER, "bump", name=COUNTER_NAME)
            done += 1
            top = max(top, value)

    await asyncio.gather(*(worker() for _ in range(WINDOW)))
    t_end = clock()
    return {"ops_per_s": done / (t_end - t0), "calls": done, "complete": done >= calls, "t0": t0,
            "t_end": t_end, "top": top}


class _Audit:
    """The measurements of one run; records the audited instance's trail lag."""

    def __init__(self, client: Client, ctl: CoreControl, cpu: _Cpu) -> None:
        self.client, self.ctl, self.cpu = client, ctl, cpu
        self.last_value = {cell: 0 for cell in CELLS.values()}

    async def window(self, kind: str, calls: int) -> dict[str, Any]:
        cell = CELLS[kind]
        mark = await asyncio.to_thread(self.ctl.request, cmd="mark") if kind == "audited" else None
        cpu0 = self.cpu.now()
        run = await window_run(self.client, cell, calls, MEASURE_TIMEOUT_S)
        if run["top"] != self.last_value[cell] + run["calls"] and self.last_value[cell]:
            raise RuntimeError(f"{cell}: counter at {run['top']} after {run['calls']} bumps from "
                               f"{self.last_value[cell]}")
        self.last_value[cell] = run["top"]
        out: dict[str, Any] = {"ops_per_s": run["ops_per_s"], "calls": run["calls"], "complete": run["complete"]}
        if mark is not None:
            target = mark["records"] + run["calls"]
            got = await asyncio.to_thread(self.ctl.request, cmd="wait", target=target, timeout_s=LAG_WAIT_S)
            out["trail_complete"] = bool(got["ok"])
            out["records"] = got["records"] - mark["records"]
            if got["ok"]:
                out["lag_s"] = got["t_reached"] - run["t_end"]
                span = got["t_reached"] - got["t_first"]
                # the first commit's records arrived before its stamp: count the rest over the span
                out["append_rate"] = (run["calls"] - got["first_batch"]) / span if span > 0 else None
                out["append_commits"] = got["commits"]
        cpu = _Cpu.since(cpu0, self.cpu.now())
        out["cpu_us_per_op"] = {k: v / max(1, run["calls"]) * 1e6 for k, v in cpu.items()}
        return out

    async def sequential(self, kind: str, calls: int) -> list[float]:
        cell = CELLS[kind]
        mark = await asyncio.to_thread(self.ctl.request, cmd="mark") if kind == "audited" else None
        lat = await bump_latencies(self.client, cell, COUNTER_NAME, calls, MEASURE_TIMEOUT_S)
        self.last_value[cell] += len(lat)
        if mark is not None:  # let the trail drain, untimed, before the next run
            got = await asyncio.to_thread(self.ctl.request, cmd="wait", target=mark["records"] + len(lat),
                                          timeout_s=LAG_WAIT_S)
            if not got["ok"]:
                raise RuntimeError("the core did not get the sequential run's records")
        return lat


async def _watched(section: Awaitable[T], children: list[Child]) -> T:
    """Run ``section``; cancel it at once if a child dies under it."""
    task = asyncio.ensure_future(section)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=CHILD_CHECK_S)
            if done:
                return task.result()
            for child in children:
                if child.proc.poll() is not None:
                    raise RuntimeError(f"the {child.name} child died (exit status {child.proc.returncode}):\n"
                                       f"{child.log_tail()}")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _ms(values_s: list[float]) -> dict[str, Any]:
    if not values_s:
        return {"p50_ms": None, "max_ms": None}
    return {"p50_ms": round(median(values_s) * 1e3, 1), "max_ms": round(max(values_s) * 1e3, 1)}


async def _measure(client: Client, ctl: CoreControl, cpu: _Cpu, raw: RawRpc, calls: int, seq_calls: int,
                   rounds: int) -> dict[str, Any]:
    for cell in CELLS.values():
        await client.find(cell, COUNTER, wait_s=FIND_WAIT_S)
    audit = _Audit(client, ctl, cpu)
    for kind in CELLS:  # log in (the session), warm up, drain
        await audit.sequential(kind, 300)
        await audit.window(kind, min(calls, 1000))
    raw.sequential(300, MEASURE_TIMEOUT_S)
    raw.in_flight(1000, MEASURE_TIMEOUT_S)

    runs: dict[str, list[dict[str, Any]]] = {k: [] for k in CELLS}
    seq: dict[str, list[float]] = {k: [] for k in (*CELLS, "raw")}
    raw_window: list[float] = []
    for rnd in range(rounds):
        order = list(CELLS) if rnd % 2 == 0 else list(reversed(CELLS))
        for kind in order:
            runs[kind].append(await audit.window(kind, calls))
        this: dict[str, list[float]] = {}
        for kind in order:
            this[kind] = await audit.sequential(kind, seq_calls)
        this["raw"] = raw.sequential(seq_calls, MEASURE_TIMEOUT_S)
        t0 = time.perf_counter()
        n = len(raw.in_flight(calls, MEASURE_TIMEOUT_S))
        raw_window.append(n / (time.perf_counter() - t0))
        for k, v in this.items():
            seq[k].extend(v)
        a, u = runs["audited"][-1], runs["unaudited"][-1]
        log(f"[audit] round {rnd + 1}/{rounds}: window{WINDOW} audited {a['ops_per_s']:,.0f} ops/s, "
            f"unaudited {u['ops_per_s']:,.0f} ops/s (ratio {a['ops_per_s'] / u['ops_per_s']:.3f}), "
            f"raw {raw_window[-1]:,.0f} ops/s; lag {a.get('lag_s', float('nan')) * 1e3:.1f} ms, "
            f"core append {a.get('append_rate') or float('nan'):,.0f} rec/s; sequential p50 "
            + ", ".join(f"{k} {percentile_us(v, 0.5)} µs" for k, v in this.items()))

    ratios = [ratio(a["ops_per_s"], u["ops_per_s"]) for a, u in zip(runs["audited"], runs["unaudited"])]
    defined = [r for r in ratios if r is not None]
    med_ratio = median(defined) if defined else None

    def ops(kind: str) -> dict[str, Any]:
        values = [r["ops_per_s"] for r in runs[kind]]
        cpu = {k: round(median([r["cpu_us_per_op"][k] for r in runs[kind]]), 1)
               for k in ("client", "instances", "core")}
        return {"ops_per_s": round(median(values)), "runs_ops_per_s": [round(v) for v in values],
                "complete": all(r["complete"] for r in runs[kind]), "cpu_us_per_op": cpu}

    audited = ops("audited")
    lags = [r["lag_s"] for r in runs["audited"] if "lag_s" in r]
    rates = [r["append_rate"] for r in runs["audited"] if r.get("append_rate")]
    audited["trail_complete"] = all(r.get("trail_complete") for r in runs["audited"])
    audited["shipping_lag"] = _ms(lags)
    core_cpu = audited["cpu_us_per_op"]["core"]
    audited["core_append_rate"] = {"records_per_s": round(median(rates)) if rates else None,
                                   "core_cpu_us_per_record": core_cpu,
                                   "capacity_records_per_s": round(1e6 / core_cpu) if core_cpu else None,
                                   "runs": [round(v) for v in rates],
                                   "commits_per_run": [r.get("append_commits") for r in runs["audited"]]}
    raw50 = percentile_us(seq["raw"], 0.5)
    a50, u50 = percentile_us(seq["audited"], 0.5), percentile_us(seq["unaudited"], 0.5)
    raw_ops = median(raw_window)
    return {
        "operation": "bump", "protection": PROTECTION, "window": WINDOW, "calls_per_run": calls,
        "sequential_calls_per_run": seq_calls, "rounds": rounds,
        "window_ops": {
            "audited": audited, "unaudited": ops("unaudited"),
            "raw_ops_per_s": round(raw_ops), "raw_runs_ops_per_s": [round(v) for v in raw_window],
            "ratio": med_ratio, "ratio_min": min(defined) if defined else None, "runs_ratio": ratios,
            "ratio_raw": {"audited": ratio(audited["ops_per_s"], raw_ops),
                          "unaudited": ratio(ops("unaudited")["ops_per_s"], raw_ops)},
            "target": f"ratio >= {TARGET_RATIO}", "met": med_ratio is not None and med_ratio >= TARGET_RATIO,
        },
        "sequential": {
            "audited": {"p50_us": a50, "p99_us": percentile_us(seq["audited"], 0.99)},
            "unaudited": {"p50_us": u50, "p99_us": percentile_us(seq["unaudited"], 0.99)},
            "raw_p50_us": raw50, "raw_p99_us": percentile_us(seq["raw"], 0.99),
            "ratio_p50": ratio(a50, u50), "ratio_p50_raw": {"audited": ratio(a50, raw50),
                                                            "unaudited": ratio(u50, raw50)},
        },
    }


async def bench_audit(calls: int, seq_calls: int, rounds: int, profile_dir: Path | None = None) -> dict[str, Any]:
    def env(name: str) -> dict[str, str] | None:
        return {"UBENCH_PROFILE": str(profile_dir.resolve() / name)} if profile_dir else None

    with tempfile.TemporaryDirectory(prefix="ubench-audit-") as tmp, contextlib.ExitStack() as stack:
        site_path = write_audit_site(Path(tmp))
        site = load_site(site_path)
        log(f"  starting the core and instances children ({site_path})")
        core = stack.enter_context(Child("measure_audit.py", "core", str(site_path), env=env("audit-core.prof")))
        instances = stack.enter_context(Child("measure_audit.py", "instances", str(site_path),
                                              env=env("audit-instances.prof")))
        raw_child = stack.enter_context(Child("raw_child.py", "echo"))
        raw = RawRpc(raw_child.info["rpc"])
        stack.callback(raw.close)
        client = Client.for_site(site, credentials=Credentials.password(*OPERATOR))
        try:
            return await _watched(_measure(client, CoreControl(core), _Cpu(core, instances), raw, calls, seq_calls,
                                           rounds), [core, instances])
        finally:
            await client.close()


if __name__ == "__main__":
    child_main(sys.argv)
