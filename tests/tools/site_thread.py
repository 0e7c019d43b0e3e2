"""A ``running_site`` served by a loop in another thread, for CLI tests whose commands run
``asyncio.run`` in the test's own thread."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from ubicore.testing.site import RunningSite, running_site

T = TypeVar("T")


class SiteThread:
    """See the module docstring. ``site_args`` go to ``running_site``."""

    def __init__(self, tmp_path: Path, **site_args: Any) -> None:
        self.tmp_path = tmp_path
        self.site_args = site_args
        self.rs: RunningSite | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="site", daemon=True)

    def _main(self) -> None:
        async def serve() -> None:
            self.loop = asyncio.get_running_loop()
            self._stop = asyncio.Event()
            async with running_site(self.tmp_path, **self.site_args) as rs:
                self.rs = rs
                self._ready.set()
                await self._stop.wait()

        try:
            asyncio.run(serve())
        except BaseException as exc:  # noqa: BLE001  (reported by start() or stop())
            self._error = exc
        finally:
            self._ready.set()

    def start(self) -> RunningSite:
        self._thread.start()
        self._ready.wait(30)
        if self.rs is None:
            raise RuntimeError("the site did not start") from self._error
        return self.rs

    def run(self, coro: Coroutine[Any, Any, T], timeout_s: float = 10.0) -> T:
        """Run ``coro`` on the site's loop; its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def call(self, fn: Callable[[], T], timeout_s: float = 10.0) -> T:
        """Run ``fn()`` on the site's loop (where its servers live)."""
        async def wrapped() -> T:
            return fn()

        return self.run(wrapped(), timeout_s)

    def stop(self) -> None:
        if self.loop is not None and self._stop is not None:
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)
        assert not self._thread.is_alive(), "the site thread did not stop"
        if self._error is not None:
            raise self._error
