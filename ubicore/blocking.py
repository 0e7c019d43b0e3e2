"""The blocking facade: the asyncio :class:`~ubicore.client.Client`, driven from plain code.

Nothing is implemented twice: a :class:`BlockingClient` owns an event loop running in a
background thread and hands every call to the asyncio client there, waiting for the
result. Calls keep their deadlines, so a blocking call never waits longer than its
timeout. Cache callbacks run on the background thread; :meth:`BlockingCache.rows` and
:meth:`BlockingCache.get` copy rows on that thread, so reading from the caller's thread
never races an update::

    with BlockingClient.for_site(load_site("cells/demo.yaml")) as client:
        client.call("Site", "ULocationSystem::ConfigurationUpdate", "set_rate",
                    sensor="S-001", rate_hz=2.0)
        positions = client.cache("Zone-A", "ULocation::Positions")
        print(positions.rows("positions"))
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

from .cache import Cache, ChangeCallback, Row
from .client import DEFAULT_TIMEOUT_S, Client, ServiceInfo
from .config.model import SiteConfig
from .login import CredentialProvider
from .sessions import Credentials

__all__ = ["BlockingCache", "BlockingClient"]

T = TypeVar("T")


class _LoopThread:
    """An event loop running forever in a daemon thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="ubicore-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("a blocking call from a callback would deadlock; use the asyncio client there")
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()


async def _call(fn: Callable[[], T]) -> T:
    return fn()


class BlockingCache:
    """A :class:`~ubicore.cache.Cache` seen from another thread."""

    def __init__(self, cache: Cache, loop: _LoopThread) -> None:
        self._cache = cache
        self._loop = loop

    def rows(self, relation: str) -> list[Row]:
        """A copy of every row of ``relation``, taken on the loop thread."""
        return self._loop.run(_call(lambda: self._cache.rows(relation)))

    def get(self, relation: str, *key: Any) -> Row | None:
        return self._loop.run(_call(lambda: self._cache.table(relation).get(tuple(key))))

    def wait_for(self, predicate: Callable[[Cache], bool], timeout_s: float = 5.0) -> None:
        """Block until ``predicate(cache)`` holds (evaluated on the loop thread)."""
        self._loop.run(self._cache.wait_for(predicate, timeout_s))

    def on_change(self, callback: ChangeCallback) -> None:
        """``callback(relation, old, new)``, called on the loop thread."""
        self._loop.run(_call(lambda: self._cache.on_change(callback)))

    @property
    def instance_id(self) -> bytes | None:
        return self._cache.instance_id

    @property
    def resyncs(self) -> int:
        return self._cache.resyncs

    def close(self) -> None:
        self._loop.run(self._cache.close())


class BlockingClient:
    """A :class:`~ubicore.client.Client` for code without an event loop."""

    def __init__(
        self,
        core_rpc: str,
        core_events: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        credentials: Credentials | None = None,
        site: str | None = None,
        credential_provider: CredentialProvider | None = None,
    ) -> None:
        """``credential_provider``: asked for credentials when an action is denied
        (ubicore/login.py); it runs in the client's loop thread (a blocking callable is
        fine: it holds up only this client)."""
        self._loop = _LoopThread()
        self._client = Client(core_rpc, core_events, timeout_s=timeout_s, credentials=credentials, site=site,
                              credential_provider=credential_provider)

    @classmethod
    def for_site(
        cls, site: SiteConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S, credentials: Credentials | None = None,
        credential_provider: CredentialProvider | None = None,
    ) -> BlockingClient:
        return cls(site.core.rpc_endpoint, site.core.event_endpoint, timeout_s=timeout_s,
                   credentials=credentials, site=site.name, credential_provider=credential_provider)

    def __enter__(self) -> BlockingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _run(self, aw: Awaitable[T]) -> T:
        async def wrap() -> T:
            return await aw

        return self._loop.run(wrap())

    def call(self, cell: str, schema: str, operation: str, /, *, timeout_s: float | None = None, **args: Any) -> Any:
        """See :meth:`ubicore.client.Client.call`."""
        return self._run(self._client.call_args(cell, schema, operation, args, timeout_s=timeout_s))

    def call_args(self, cell: str, schema: str, operation: str, args: Mapping[str, Any], *,
                  timeout_s: float | None = None) -> Any:
        return self._run(self._client.call_args(cell, schema, operation, args, timeout_s=timeout_s))

    def find(self, cell: str, schema: str, *, wait_s: float = 0.0) -> ServiceInfo:
        return self._run(self._client.find(cell, schema, wait_s=wait_s))

    def services(self) -> dict[str, list[dict[str, Any]]]:
        return self._run(self._client.services())

    def cache(self, cell: str, schema: str, *, timeout_s: float | None = None) -> BlockingCache:
        return BlockingCache(self._run(self._client.cache(cell, schema, timeout_s=timeout_s)), self._loop)

    def close(self) -> None:
        """Close the client and stop its loop thread."""
        if self._client.closed:
            return
        self._run(self._client.close())
        self._loop.stop()
