"""Run the ubicore benchmark suite; print one JSON document on stdout.

Usage: ``python bench/run.py [--quick] [--only SECTION] [--out FILE] [--profile DIR]``
with SECTION one of events, rpc, join, levels, handshake, rotation, revocation, audit, or
``security`` (the last five).

Each measurement runs against raw pyzmq doing the same transfers in the same run, and is
reported as a ratio (see bench/README.md). The instance under test runs in a child
process (``ubicore_child.py``: core + instances of a generated site file on free
127.0.0.1 ports); the subscriber or client runs in this process. The protection-level
sections serve a second site (``measure_levels.write_security_site``: three
``UTest::Counter`` instances at ``open``, ``update`` and ``full``) in a second child,
started after the first one stopped; ``rotation`` needs no child, and ``revocation``
serves its own site in this process (``ubicore.testing.running_site``: core, one
``full`` Counter, 100 caching clients; see ``measure_revocation.py``); ``audit`` serves
its own site in two children of its own (``measure_audit.py``: the core, and an audited
and an unaudited ``update`` Counter). Progress goes to
stderr. Exit status 0 when every section ran (missed targets included), 1 when a
section failed with an error (recorded in the JSON under that section's ``error``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import harness  # noqa: E402
from harness import Child, log, machine  # noqa: E402
from measure_events import bench_events  # noqa: E402
from measure_join import bench_join  # noqa: E402
from measure_revocation import bench_revocation  # noqa: E402
from measure_rotation import bench_rotation  # noqa: E402
from measure_rpc import bench_rpc  # noqa: E402

from ubicore.client import Client  # noqa: E402
from ubicore.config import SiteConfig, load_site  # noqa: E402
from ubicore.runtime import current_os_user, init_site  # noqa: E402
from ubicore.sessions import Credentials  # noqa: E402
from ubicore.testing.schemas import COUNTER  # noqa: E402
from ubicore.testing.site import OPERATOR, TEST_KDF  # noqa: E402

BASIC_SECTIONS = ("events", "rpc", "join")
SECURITY_SECTIONS = ("levels", "handshake", "rotation", "revocation", "audit")
SECTIONS = BASIC_SECTIONS + SECURITY_SECTIONS
FULL = {"events_n": 200_000, "events_reps": 3, "rpc_calls": 10_000, "rpc_reps": 3, "join_rows": 100_000,
        "join_reps": 3,
        "levels_events_n": 200_000, "levels_events_reps": 3, "levels_rpc_calls": 5000, "levels_rpc_reps": 3,
        "handshake_samples": 300, "handshake_kdf_samples": 5, "handshake_loopback_samples": 200,
        "rotation_sessions": 1000, "rotation_reps": 20,
        "revocation_sessions": 100, "revocation_reps": 20, "check_queries": 50_000, "check_reps": 3,
        "audit_calls": 20_000, "audit_seq_calls": 2000, "audit_rounds": 5}
QUICK = {"events_n": 100_000, "events_reps": 1, "rpc_calls": 5000, "rpc_reps": 1, "join_rows": 100_000,
         "join_reps": 1,
         "levels_events_n": 50_000, "levels_events_reps": 1, "levels_rpc_calls": 2000, "levels_rpc_reps": 1,
         "handshake_samples": 100, "handshake_kdf_samples": 1, "handshake_loopback_samples": 50,
         "rotation_sessions": 1000, "rotation_reps": 5,
         "revocation_sessions": 100, "revocation_reps": 5, "check_queries": 20_000, "check_reps": 1,
         "audit_calls": 2000, "audit_seq_calls": 500, "audit_rounds": 2}
FIND_WAIT_S = 15.0
CHILD_CHECK_S = 0.5


def write_site(directory: Path) -> Path:
    """The UBench site: ``UBench::Stream`` at ``Bench-A``, ``UBench::Table`` at ``Bench-B``;
    initialised with the factory policy (the test operator as administrator, test KDF
    costs, this account as the OS service user the instances follow the policy as)."""
    path = harness.write_site(directory, "ubench", directory / "dataset", "schemas",
                              [{"schema": "UBench::Stream", "cell": "Bench-A"},
                               {"schema": "UBench::Table", "cell": "Bench-B"}])
    init_site(load_site(path), OPERATOR[1], admin_user=OPERATOR[0], kdf=TEST_KDF, os_user=current_os_user())
    return path


async def _watched(section: Awaitable[dict[str, Any]], child: Child) -> dict[str, Any]:
    """Run a section; cancel it at once if the ubicore child dies under it."""
    task = asyncio.ensure_future(section)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=CHILD_CHECK_S)
            if done:
                return task.result()
            if child.proc.poll() is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
                raise RuntimeError(f"the ubicore child died (exit status {child.proc.returncode})")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


def _wanted(args: argparse.Namespace, name: str) -> bool:
    if args.only is None:
        return True
    if args.only == "security":
        return name in SECURITY_SECTIONS
    return bool(args.only == name)


async def _run_one(name: str, section: Awaitable[dict[str, Any]], result: dict[str, Any]) -> bool:
    """Run one section into ``result[name]``; False if it raised."""
    log(f"[{name}] running")
    t0 = time.perf_counter()
    ok = True
    try:
        result[name] = await section
    except Exception as exc:
        ok = False
        result[name] = {"error": f"{type(exc).__name__}: {exc}"}
        log(f"[{name}] FAILED: {type(exc).__name__}: {exc}")
    log(f"[{name}] done in {time.perf_counter() - t0:.1f} s")
    return ok


async def run_sections(args: argparse.Namespace, cfg: dict[str, Any], result: dict[str, Any]) -> bool:
    """Run the chosen sections into ``result``; False if any raised."""
    ok = True
    groups = ((BASIC_SECTIONS, run_basic_sections), (("levels", "handshake"), run_security_sections))
    for names, run in groups:
        wanted = [name for name in names if _wanted(args, name)]
        if not wanted:
            continue
        try:
            ok = await run(args, cfg, result) and ok
        except Exception as exc:  # the child did not start, or the client could not find it
            ok = False
            log(f"FAILED: {type(exc).__name__}: {exc}")
            for name in wanted:
                result.setdefault(name, {"error": f"{type(exc).__name__}: {exc}"})
    if _wanted(args, "rotation"):
        ok = await _run_one("rotation", _sync(bench_rotation, cfg["rotation_sessions"], cfg["rotation_reps"]),
                            result) and ok
    if _wanted(args, "revocation"):
        ok = await _run_one("revocation", bench_revocation(cfg["revocation_sessions"], cfg["revocation_reps"],
                                                           cfg["check_queries"], cfg["check_reps"]), result) and ok
    if _wanted(args, "audit"):
        from measure_audit import bench_audit  # here: a section whose module no longer imports fails alone

        ok = await _run_one("audit", bench_audit(cfg["audit_calls"], cfg["audit_seq_calls"], cfg["audit_rounds"],
                                                 args.profile), result) and ok
    return ok


async def _sync(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    return fn(*args)  # synchronous and short, in-process: no child, nothing else on the loop


Runner = Callable[[Client, SiteConfig], Awaitable[dict[str, Any]]]


async def _against_child(args: argparse.Namespace, result: dict[str, Any], site_path: Path, profile_name: str,
                         what: str, credentials: Credentials | None, finds: Sequence[tuple[str, str]],
                         runners: dict[str, Runner]) -> bool:
    """Serve ``site_path`` in a ubicore child, find ``finds`` (cell, schema) with a client,
    then run the wanted ``runners`` into ``result``; False if any raised."""
    ok = True
    env = {"UBENCH_PROFILE": str(Path(args.profile).resolve() / profile_name)} if args.profile else None
    log(f"starting the ubicore child{what} ({site_path})")
    child = Child("ubicore_child.py", str(site_path), env=env)
    client: Client | None = None
    try:
        site = load_site(site_path)
        client = Client.for_site(site, credentials=credentials)
        for cell, schema in finds:
            await client.find(cell, schema, wait_s=FIND_WAIT_S)
        for name, runner in runners.items():
            if _wanted(args, name):
                ok = await _run_one(name, _watched(runner(client, site), child), result) and ok
    finally:
        if client is not None:
            await client.close()
        status = child.close()
        if status not in (0, None):
            log(f"ubicore child exited with {status}:\n{child.log_tail()}")
    return ok


async def run_security_sections(args: argparse.Namespace, cfg: dict[str, Any], result: dict[str, Any]) -> bool:
    """levels and handshake, against the security site in its own ubicore child."""
    # imported here: a section whose module no longer imports fails alone (its error in the JSON)
    from measure_handshake import bench_handshake
    from measure_levels import CELLS, bench_levels, write_security_site

    runners: dict[str, Runner] = {
        "levels": lambda c, _: bench_levels(c, cfg["levels_events_n"], cfg["levels_events_reps"],
                                            cfg["levels_rpc_calls"], cfg["levels_rpc_reps"]),
        "handshake": lambda c, site: bench_handshake(c, site.dataset, cfg["handshake_samples"],
                                                     cfg["handshake_kdf_samples"], cfg["handshake_loopback_samples"]),
    }
    with tempfile.TemporaryDirectory(prefix="ubench-sec-") as tmp:
        return await _against_child(args, result, write_security_site(Path(tmp)), "server-security.prof",
                                    " for the protection levels", Credentials.password(*OPERATOR),
                                    [(cell, COUNTER) for cell in CELLS.values()], runners)


async def run_basic_sections(args: argparse.Namespace, cfg: dict[str, Any], result: dict[str, Any]) -> bool:
    """events, rpc and join, against the UBench site."""
    runners: dict[str, Runner] = {
        "events": lambda c, _: bench_events(c, cfg["events_n"], cfg["events_reps"]),
        "rpc": lambda c, _: bench_rpc(c, cfg["rpc_calls"], cfg["rpc_reps"]),
        "join": lambda c, _: bench_join(c, cfg["join_rows"], cfg["join_reps"]),
    }
    with tempfile.TemporaryDirectory(prefix="ubench-") as tmp:
        return await _against_child(args, result, write_site(Path(tmp)), "server.prof", "", None,
                                    [("Bench-A", "UBench::Stream"), ("Bench-B", "UBench::Table")], runners)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="ubicore benchmarks against raw pyzmq")
    parser.add_argument("--quick", action="store_true", help="smaller counts, one repetition (~30 s)")
    parser.add_argument("--only", choices=(*SECTIONS, "security"),
                        help="run one section (security: levels, handshake, rotation, revocation and audit)")
    parser.add_argument("--out", type=Path, help="also write the JSON document to FILE")
    parser.add_argument("--profile", type=Path, metavar="DIR",
                        help="cProfile the bench process (client.prof) and the ubicore children"
                             " (server.prof, server-security.prof, audit-core.prof, audit-instances.prof)")
    args = parser.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    result: dict[str, Any] = {"machine": machine(), "config": {"quick": args.quick, **cfg}}
    prof = None
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    try:
        ok = asyncio.run(run_sections(args, cfg, result))
    except Exception as exc:
        ok = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {result['error']}")
    finally:
        if prof is not None:
            prof.disable()
            prof.dump_stats(str(args.profile / "client.prof"))
    result["elapsed_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
