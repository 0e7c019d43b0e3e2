"""A whole site as real processes: ``ubi site up`` on 127.0.0.1 and 127.0.0.2."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import Iterator

import pytest

from ubicore.config import load_site
from ubicore.controller import wait_until_up
from ubicore.testing.processes import LiveSite, start_site, stop_site, write_site


@pytest.fixture(scope="module")
def live_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveSite]:
    path = write_site(tmp_path_factory.mktemp("site"))
    site = load_site(path)
    proc = start_site(path)
    try:
        missing = asyncio.run(wait_until_up(site, 30.0))
        assert not missing, f"not up: {missing}"
        yield LiveSite(site, proc, path)
    finally:
        try:
            stop_site(proc)
        finally:
            if proc.poll() is None:  # pragma: no cover - only on a failed stop
                os.killpg(proc.pid, signal.SIGKILL)
