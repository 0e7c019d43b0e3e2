"""The in-process site harness itself: ports, the site file, run_async, cleanup."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest

import ubicore.runtime
from ubicore.config import parse_site
from ubicore.testing import (
    CONFIG_UPDATE,
    COUNTER,
    POSITIONS,
    LeakedSockets,
    free_port,
    free_ports,
    run_async,
    running_site,
    site_yaml,
)
from ubicore.transport.sockets import context


def test_free_ports_are_distinct_and_bindable() -> None:
    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in [*ports, free_port()]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_site_yaml_is_a_valid_site(tmp_path: Path) -> None:
    text = site_yaml(
        tmp_path / "data", core_port=5001, event_port=5002,
        extra_deployments=[{"schema": COUNTER, "cell": "Zone-A", "options": {"k": 1}}],
        imports=["ubicore.testing.schemas"], positions_rate_hz=2.5,
    )
    site = parse_site(text, tmp_path / "site.yaml")
    assert site.core.rpc_endpoint == "tcp://127.0.0.1:5001"
    assert site.core.event_endpoint == "tcp://127.0.0.1:5002"
    assert {h.name: h.address for h in site.hosts.values()} == {"host-a": "127.0.0.1", "host-b": "127.0.0.2"}
    assert list(site.cells) == ["Site", "Building-1", "Zone-A", "Zone-B"]
    assert site.cells["Zone-B"].host == "host-b" and site.cells["Building-1"].host == "host-a"
    assert site.dataset == (tmp_path / "data").absolute()
    assert site.imports == ("ubicore.testing.schemas",)
    assert [(p.schema, p.cell, p.host) for p in site.instances] == [
        (CONFIG_UPDATE, "Site", "host-a"),
        (POSITIONS, "Zone-A", "host-a"),
        (POSITIONS, "Zone-B", "host-b"),
        (COUNTER, "Zone-A", "host-a"),
    ]
    assert site.instances[1].options["rate_hz"] == 2.5
    assert dict(site.instances[3].options) == {"k": 1}


@run_async
async def test_running_site_starts_what_is_asked(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not deployed"):
        async with running_site(tmp_path, instances=[(COUNTER, "Zone-A")]):
            pass
    async with running_site(tmp_path, instances=[(POSITIONS, "Zone-B")]) as rs:
        assert list(rs.servers) == [(POSITIONS, "Zone-B")]
        assert rs.server(POSITIONS, "Zone-B").rpc_endpoint.startswith("tcp://127.0.0.2:")
        assert (tmp_path / "site.yaml").is_file()
        with pytest.raises(RuntimeError, match="already running"):
            await rs.start_instance(POSITIONS, "Zone-B")
        with pytest.raises(KeyError):
            await rs.stop_instance(COUNTER, "Site")
        server = await rs.start_instance(COUNTER, "Site")
        assert (await rs.client.find("Site", COUNTER)).instance_id == server.core.instance_id


@run_async
async def test_running_site_closes_everything_when_the_block_raises(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="boom"):
        async with running_site(tmp_path) as rs:
            endpoints = [rs.site.core.rpc_endpoint, rs.site.core.event_endpoint]
            endpoints += [e for s in rs.servers.values() for e in (s.rpc_endpoint, s.event_endpoint)]
            raise RuntimeError("boom")
    assert len(endpoints) == 10
    for endpoint in endpoints:
        host, port = endpoint.removeprefix("tcp://").rsplit(":", 1)
        assert await listener_gone(host, int(port)), f"{endpoint} still listens"


async def listener_gone(host: str, port: int) -> bool:
    """Whether nothing listens on (host, port) any more. ZeroMQ closes a socket's file
    descriptors in its I/O thread shortly after ``close()`` returns, so allow a moment;
    SO_REUSEADDR lets connections that linger in TIME_WAIT pass."""
    for _ in range(100):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
                s.listen()
                return True
            except OSError:
                pass
        await asyncio.sleep(0.02)
    return False


@run_async
async def test_restart_core_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ubicore.runtime, "REGISTRATION_CHECK_S", 0.2)
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        assert rs.core is not None
        old = rs.core.core.instance_id
        for _ in range(2):  # the fixed core ports are bound again at once
            core = await rs.restart_core()
            assert core.core.instance_id != old and rs.core is core
            old = core.core.instance_id
            naming = await rs.client.naming()
            assert naming.instance_id == old
            row = naming.table("instances")[(COUNTER, "Site")]
            assert row.instance_id == rs.server(COUNTER, "Site").core.instance_id  # type: ignore[attr-defined]


def test_run_async_passes_fixtures_and_returns(tmp_path: Path) -> None:
    @run_async
    async def body(path: Path) -> Path:
        await asyncio.sleep(0)
        return path

    assert body(tmp_path) == tmp_path


def test_run_async_has_a_hard_timeout() -> None:
    cleaned = []

    @run_async(timeout_s=0.2)
    async def hangs() -> None:
        try:
            await asyncio.Event().wait()
        finally:
            cleaned.append(True)

    with pytest.raises(TimeoutError, match="did not finish within 0.2 s"):
        hangs()
    assert cleaned == [True]


def test_run_async_fails_a_test_that_leaks_sockets() -> None:
    kept: list[object] = []

    @run_async
    async def leaks() -> None:
        kept.append(context().socket(1))  # a PUB socket, referenced and never closed

    with pytest.raises(LeakedSockets, match="1 socket"):
        leaks()
    assert kept[0].closed  # type: ignore[attr-defined]  # closed by the check

    @run_async(check_sockets=False)
    async def allowed() -> None:
        kept.append(context().socket(1))

    allowed()
    assert not kept[1].closed  # type: ignore[attr-defined]
    kept[1].close(0)  # type: ignore[attr-defined]
