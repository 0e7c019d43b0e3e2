"""Awaitable remote operations over a DEALER socket."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import zmq

from ..errors import Unavailable
from ..protocol.rpc import Outcome, RpcCaller
from .sockets import Pump, connect, make_socket

if TYPE_CHECKING:
    from ..security.session import ClientSession

RPC_HWM = 10_000


class RpcConnection:
    """One DEALER connection to an instance's RPC endpoint; many calls in flight."""

    def __init__(self, endpoint: str, *, clock: Any = time.monotonic) -> None:
        self.endpoint = endpoint
        self.caller = RpcCaller()
        self._clock = clock
        self._loop = asyncio.get_running_loop()
        self._futures: dict[int, asyncio.Future[Any]] = {}
        sock = make_socket(zmq.DEALER, hwm=RPC_HWM)
        try:
            connect(sock, endpoint)
        except Unavailable:
            sock.close(0)
            raise
        self._pump = Pump(sock, self._on_frames, self._loop)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self.closed = False

    def _on_frames(self, frames: list[bytes]) -> None:
        outcome = self.caller.receive(frames)
        if outcome is not None:
            self._settle(outcome)

    def _settle(self, outcome: Outcome) -> None:
        fut = self._futures.pop(outcome.corr_id, None)
        if fut is None or fut.done():
            return
        if outcome.error is not None:
            fut.set_exception(outcome.error)
        else:
            fut.set_result(outcome.result)

    def _expire(self) -> None:
        self._timer = None
        for outcome in self.caller.expire(self._clock()):
            self._settle(outcome)
        self._arm()

    def _arm(self) -> None:
        nxt = self.caller.next_deadline()
        if nxt is None:
            return
        if self._timer is not None:
            if self._timer_at <= nxt:
                return
            self._timer.cancel()  # a call with an earlier deadline than the armed one
        self._timer_at = nxt
        delay = max(0.0, nxt - self._clock())
        self._timer = self._loop.call_later(delay, self._expire)

    async def call(
        self,
        schema: str,
        cell: str,
        operation: str,
        args: Mapping[str, Any],
        timeout_s: float,
        session: ClientSession | None = None,
    ) -> Any:
        """Call (sealed under ``session`` if given) and wait for the reply; raises the
        typed error, or CallTimeout."""
        if self.closed:
            raise Unavailable(f"connection to {self.endpoint} is closed")
        corr, frames = self.caller.start(schema, cell, operation, args, timeout_s, self._clock(), session)
        fut: asyncio.Future[Any] = self._loop.create_future()
        self._futures[corr] = fut
        try:
            self._pump.send(frames)
        except Unavailable:
            self._futures.pop(corr, None)
            self.caller.cancel(corr)
            raise
        self._arm()
        try:
            return await fut
        finally:
            if not fut.done():  # cancelled by our caller
                self._futures.pop(corr, None)
                self.caller.cancel(corr)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        for outcome in self.caller.fail_all(Unavailable("connection closed")):
            self._settle(outcome)
        self._pump.close()
