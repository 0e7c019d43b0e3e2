"""A real site: separate processes, two loopback hosts, restarts, durability, shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import pytest

from ubicore.client import Client
from ubicore.config import SiteConfig, load_site
from ubicore.controller import wait_until_up
from ubicore.errors import RemoteError

from ubicore.testing.processes import LiveSite, alive, start_site, stop_site, write_site

CONFIG = "ULocationSystem::ConfigurationUpdate"
POSITIONS = "ULocation::Positions"
pytestmark = pytest.mark.timeout(90)


def test_hosts_are_separate_processes_on_their_own_addresses(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as client:
            a = await client.find("Zone-A", POSITIONS)
            b = await client.find("Zone-B", POSITIONS)
            cfg = await client.find("Site", CONFIG)
            assert a.rpc.startswith("tcp://127.0.0.1:") and a.events.startswith("tcp://127.0.0.1:")
            assert b.rpc.startswith("tcp://127.0.0.2:") and b.events.startswith("tcp://127.0.0.2:")
            assert len({a.pid, b.pid, cfg.pid, live_site.proc.pid}) == 4
            assert all(alive(p) for p in (a.pid, b.pid, cfg.pid))
            # Follow the host-b instance live from this process.
            cache = await client.cache("Zone-B", POSITIONS)
            seen: list[object] = []
            cache.on_update("positions", lambda old, new: seen.append(new))
            await cache.wait_for(lambda c: len(seen) >= 3, 10.0)
            assert {r.tag for r in cache.rows("positions")} == {"T-001", "T-002", "T-003"}  # type: ignore[attr-defined]
            services = await client.services()
            states = {(r["schema"], r["cell"]): r["actual"] for r in services["services"]}
            await asyncio.sleep(0)
            assert states.get((POSITIONS, "Zone-B")) in ("running", "starting")

    asyncio.run(body())


def test_controller_restarts_a_killed_instance_and_clients_rebind(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as client:
            before = await client.find("Zone-A", POSITIONS)
            cache = await client.cache("Zone-A", POSITIONS)
            await client.call("Zone-A", POSITIONS, "place", tag="MARK", x=1.0, y=2.0)
            await cache.wait_for(lambda c: ("MARK",) in c.table("positions"))
            os.kill(before.pid, signal.SIGKILL)
            naming = await client.naming()
            await naming.wait_for(
                lambda n: (row := n.table("instances").get((POSITIONS, "Zone-A"))) is not None
                and row.pid != before.pid, 20.0)  # type: ignore[attr-defined]
            after = await client.find("Zone-A", POSITIONS)
            assert after.instance_id != before.instance_id
            # The cache rebinds by itself: the volatile MARK row is gone, ticks flow again.
            await cache.wait_for(lambda c: c.instance_id == after.instance_id and ("MARK",) not in c.table("positions")
                                 and len(c.table("positions")) == 3, 20.0)
            assert await client.call("Zone-A", POSITIONS, "where", tag="T-001")
            await naming.wait_for(
                lambda n: (s := n.table("services").get((POSITIONS, "Zone-A"))) is not None
                and s.restarts >= 1 and s.actual == "running", 20.0)  # type: ignore[attr-defined]

    asyncio.run(body())


def test_acknowledged_updates_survive_kill_9(live_site: LiveSite) -> None:
    async def body() -> None:
        async with live_site.client() as client:
            info = await client.find("Site", CONFIG)
            acked: list[str] = []
            killed = False
            for i in range(400):
                name = f"K-{i:04d}"
                try:
                    await client.call("Site", CONFIG, "add_sensor", sensor=name, rate_hz=1.0 + i % 7, timeout_s=1.0)
                    acked.append(name)
                except RemoteError:
                    break  # the instance is gone
                if i == 60 and not killed:
                    # Kill in the middle of the stream: further calls are in flight or queued.
                    asyncio.get_running_loop().call_later(0.01, os.kill, info.pid, signal.SIGKILL)
                    killed = True
            assert killed and len(acked) >= 60
            naming = await client.naming()
            await naming.wait_for(
                lambda n: (r := n.table("instances").get((CONFIG, "Site"))) is not None and r.pid != info.pid, 20.0)
            cache = await client.cache("Site", CONFIG)
            sensors = cache.table("sensors")
            missing = [n for n in acked if (n,) not in sensors]
            assert missing == []
            for n in acked:
                i = int(n[2:])
                assert sensors[(n,)].rate_hz == 1.0 + i % 7  # type: ignore[attr-defined]

    asyncio.run(body())


def start_fresh_site(tmp_path: Path) -> tuple[SiteConfig, subprocess.Popen[bytes]]:
    path = write_site(tmp_path)
    return load_site(path), start_site(path)


async def running_pids(site: SiteConfig) -> list[int]:
    """Once the site is up, the pids of every registered instance."""
    assert await wait_until_up(site, 30.0) == []
    async with Client.for_site(site) as client:
        return [r["pid"] for r in (await client.services())["instances"]]


def test_site_up_stops_cleanly_leaving_no_process(tmp_path: Path) -> None:
    site, proc = start_fresh_site(tmp_path)
    pids: list[int] = []
    try:
        pids = asyncio.run(running_pids(site))
    finally:
        code = stop_site(proc)
    assert code == 0
    assert len(pids) == 7  # naming, UPerm::Config and UAudit's two (the core), configuration, two zones
    assert len(set(pids)) == 4
    assert [p for p in pids if alive(p)] == []
    # and the core ports are free again
    import socket

    for port in (site.core.rpc_port, site.core.event_port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_blocking_facade_against_the_live_site(live_site: LiveSite) -> None:
    from ubicore.blocking import BlockingClient
    from ubicore.errors import NotFound

    from ubicore.sessions import Credentials
    from ubicore.testing.site import OPERATOR

    with BlockingClient.for_site(live_site.site, credentials=Credentials.password(*OPERATOR)) as client:
        assert client.find("Site", CONFIG).host == "host-a"
        client.call("Site", CONFIG, "set_sink", sensor="S-003", sink="udp://sink-1")
        cache = client.cache("Site", CONFIG)
        assert cache.get("sensors", "S-003").sink == "udp://sink-1"
        seen: list[str] = []
        cache.on_change(lambda rel, old, new: seen.append(new.sink))
        client.call("Site", CONFIG, "set_sink", sensor="S-003", sink="udp://sink-2")
        cache.wait_for(lambda c: c.table("sensors")[("S-003",)].sink == "udp://sink-2")
        assert seen == ["udp://sink-2"]
        assert any(r.sensor == "S-003" for r in cache.rows("sensors"))
        with pytest.raises(NotFound):
            client.call("Site", CONFIG, "get_sensor", sensor="S-999")


def test_ctrl_c_stops_the_site_in_order_without_restarts(tmp_path: Path) -> None:
    # A terminal's Ctrl-C sends SIGINT to the whole foreground process group.
    site, proc = start_fresh_site(tmp_path)
    pids: list[int] = []
    try:
        pids = asyncio.run(running_pids(site))
        os.killpg(proc.pid, signal.SIGINT)
        assert proc.wait(20) == 0
        assert proc.stderr is not None
        log = proc.stderr.read().decode()
        assert "restarting" not in log, log
    finally:
        stop_site(proc)
    assert [p for p in pids if alive(p)] == []


def test_a_child_whose_supervisor_is_already_gone_stops_at_once(tmp_path: Path) -> None:
    # The supervisor's pid comes on the command line: a child that starts after its
    # supervisor died (and was re-parented) notices at once instead of running forever.
    import sys

    path = write_site(tmp_path)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    child = subprocess.Popen(
        [sys.executable, "-m", "ubicore.tools.cli", "--site", str(path), "core", "--parent-pid", str(gone.pid)],
        stderr=subprocess.PIPE,
    )
    try:
        assert child.wait(30) == 0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        assert child.stderr is not None
        err = child.stderr.read().decode()
        child.stderr.close()
    assert f"parent process {gone.pid} is gone" in err
