"""Receiving an event channel over a SUB socket."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import zmq

from ..errors import ProtocolError
from ..protocol.codec import parse_channel_message
from ..protocol.messages import ChannelMessage, Welcome
from .sockets import Pump, connect, make_socket

log = logging.getLogger(__name__)

SUB_HWM = 100_000


class Subscription:
    """A SUB socket on one event endpoint; parsed messages go to ``on_message``.

    Malformed or foreign messages are dropped and counted in ``malformed``. ``welcomed``
    is set once the publisher has confirmed the subscription (its welcome message):
    from then on nothing it publishes is missed, so that is the moment to dump.
    """

    def __init__(
        self, endpoint: str, on_message: Callable[[ChannelMessage], None], *, hwm: int | None = None
    ) -> None:
        self.endpoint = endpoint
        self.malformed = 0
        self.welcomed = asyncio.Event()
        self._on_message = on_message
        sock = make_socket(zmq.SUB, hwm=SUB_HWM if hwm is None else hwm)  # read at call time: tests patch it
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        try:
            connect(sock, endpoint)
        except Exception:
            sock.close(0)
            raise
        self._pump = Pump(sock, self._on_frames)

    def _on_frames(self, frames: list[bytes]) -> None:
        try:
            msg = parse_channel_message(frames)
        except ProtocolError as exc:
            self.malformed += 1
            log.debug("dropped a malformed channel message from %s: %s", self.endpoint, exc)
            return
        if isinstance(msg, Welcome):
            self.welcomed.set()
            return
        self._on_message(msg)

    def close(self) -> None:
        self._pump.close()
