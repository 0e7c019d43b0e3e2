"""Pumping a ZeroMQ socket from an asyncio loop.

ZeroMQ exposes one file descriptor per socket that is *edge*-triggered: it signals that
the socket's event state may have changed, not that a message waits. So the pump drains
until ``EAGAIN`` on every wake-up, and checks ``ZMQ_EVENTS`` after each send (a send can
swallow the edge that a reply arrived; reading the events re-arms it, and a message
already waiting is drained on the next loop turn). Draining is bounded per wake-up so a flood on one
socket cannot starve the loop; the rest is picked up on the next turn.

This adds one callback per wake-up and no future per message, which keeps a request
round trip within a few microseconds of a blocking raw-pyzmq loop.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Sequence

import zmq

from ..errors import Unavailable
from ..protocol.codec import MAX_FRAME_BYTES

log = logging.getLogger(__name__)

MAX_DRAIN_PER_WAKEUP = 512
LINGER_MS = 0
# Plain ints: pyzmq's enum constants cost about a microsecond per call on these hot
# paths, and an EAGAIN raised as zmq.Again several more.
_EVENTS = int(zmq.EVENTS)
_POLLIN = int(zmq.POLLIN)
NOBLOCK = int(zmq.NOBLOCK)
_SNDMORE = int(zmq.SNDMORE)
_RCVMORE = int(zmq.RCVMORE)
COPY_BELOW_BYTES = 64 * 1024
"""Frames smaller than this are copied into libzmq (cheaper than tracking a zero-copy frame)."""


def context() -> zmq.Context[zmq.Socket[bytes]]:
    """The process-wide ZeroMQ context."""
    return zmq.Context.instance()


def make_socket(kind: int, *, hwm: int | None = None) -> zmq.Socket[bytes]:
    sock = context().socket(kind)
    sock.setsockopt(zmq.LINGER, LINGER_MS)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_FRAME_BYTES + 1024)  # libzmq drops bigger peers' messages unbuffered
    if hwm is not None:
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.RCVHWM, hwm)
    return sock


def bind(sock: zmq.Socket[bytes], endpoint: str) -> str:
    """Bind and return the endpoint actually bound (``tcp://addr:*`` picks a free port)."""
    _allow_ipv6(sock, endpoint)
    try:
        sock.bind(endpoint)
    except zmq.ZMQError as exc:
        raise Unavailable(f"cannot bind {endpoint}: {exc.strerror}", {"errno": exc.errno}) from None
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) else str(last)


async def bind_retrying(sock: zmq.Socket[bytes], endpoint: str, retry_s: float) -> str:
    """Bind; a fixed port still held by a process that just stopped is retried for
    ``retry_s`` (libzmq releases a closed socket's port a moment after ``close``)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + retry_s
    while True:
        try:
            return bind(sock, endpoint)
        except Unavailable as exc:
            in_use = exc.detail.get("errno") == errno.EADDRINUSE
            if endpoint.endswith(":*") or not in_use or loop.time() > deadline:
                raise
            await asyncio.sleep(0.05)


def make_publisher(*, hwm: int, welcome: bytes) -> zmq.Socket[bytes]:
    """An event channel's socket: an XPUB that sends ``welcome`` to each new subscriber
    once its subscription is in place (and hands subscriptions up, to be drained)."""
    sock = make_socket(zmq.XPUB, hwm=hwm)
    sock.setsockopt(zmq.XPUB_WELCOME_MSG, welcome)
    return sock


def make_router(*, hwm: int) -> zmq.Socket[bytes]:
    """An instance's request socket."""
    return make_socket(zmq.ROUTER, hwm=hwm)


def _allow_ipv6(sock: zmq.Socket[bytes], endpoint: str) -> None:
    # Only for IPv6 endpoints: with IPV6 on, IPv4 addresses would be reported mapped.
    if "://[" in endpoint:
        sock.setsockopt(zmq.IPV6, 1)


def connect(sock: zmq.Socket[bytes], endpoint: str) -> None:
    _allow_ipv6(sock, endpoint)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise Unavailable(f"cannot connect to {endpoint}: {exc.strerror}") from None


def send_frames(sock: zmq.Socket[bytes], frames: Sequence[bytes], flags: int = NOBLOCK) -> None:
    """Send one multipart message: pyzmq's ``send_multipart`` with plain-int flags (it
    builds an ``IntFlag`` per frame) and zero-copy only for large frames. libzmq
    accepts all the parts of a message once it has accepted the first."""
    send, more = sock.send, flags | _SNDMORE
    for frame in frames[:-1]:
        send(frame, more, copy=len(frame) < COPY_BELOW_BYTES)
    last = frames[-1]
    send(last, flags, copy=len(last) < COPY_BELOW_BYTES)


def recv_frames(sock: zmq.Socket[bytes]) -> list[bytes]:
    """Receive one multipart message without blocking (``zmq.Again`` if none waits)."""
    recv = sock.recv
    more: Callable[[int], int] = sock.getsockopt  # type: ignore[assignment]
    frames = [recv(NOBLOCK)]
    while more(_RCVMORE):
        frames.append(recv(NOBLOCK))
    return frames


def recv_frames_with_peer(sock: zmq.Socket[bytes]) -> list[bytes]:
    """:func:`recv_frames`, with the connection's ``Peer-Address`` (for ipc,
    ``host:uid:gid:pid`` from the kernel) as an extra first frame."""
    first = sock.recv(NOBLOCK, copy=False)
    try:
        address = first.get("Peer-Address")
    except zmq.ZMQError:
        address = ""
    frames = [str(address or "").encode(), first.bytes]
    more: Callable[[int], int] = sock.getsockopt  # type: ignore[assignment]
    while more(_RCVMORE):
        frames.append(sock.recv(NOBLOCK))
    return frames


class Pump:
    """Calls ``on_frames(frames)`` for each message arriving on ``sock``, in the loop."""

    def __init__(
        self,
        sock: zmq.Socket[bytes],
        on_frames: Callable[[list[bytes]], None],
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        recv: Callable[[zmq.Socket[bytes]], list[bytes]] = recv_frames,
    ) -> None:
        self.sock = sock
        self._on_frames = on_frames
        self._recv = recv
        self._loop = loop or asyncio.get_running_loop()
        self._fd: int = int(sock.getsockopt(zmq.FD))
        # getsockopt(EVENTS) is an int; pyzmq's stubs only know it as int | bytes.
        self._events: Callable[[int], int] = sock.getsockopt  # type: ignore[assignment]
        self._scheduled = False
        self._closed = False
        self._loop.add_reader(self._fd, self._drain)
        self.kick()

    def kick(self) -> None:
        """Drain on the next loop turn (after a send, or when more may be waiting)."""
        if not self._scheduled and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        if self._closed:
            return
        sock, on_frames, recv = self.sock, self._on_frames, self._recv
        events = self._events
        for _ in range(MAX_DRAIN_PER_WAKEUP):
            try:
                if not events(_EVENTS) & _POLLIN:  # also re-arms the edge-triggered FD
                    return
                frames = recv(sock)
            except zmq.Again:
                return
            except zmq.ZMQError as exc:
                log.warning("receive failed: %s", exc.strerror)
                return
            try:
                on_frames(frames)
            except Exception:  # a handler bug must not stop the pump
                log.exception("message handler failed")
        self.kick()

    def send(self, frames: Sequence[bytes]) -> None:
        """Send without blocking; a full queue is :class:`Unavailable`."""
        try:
            send_frames(self.sock, frames)
        except zmq.Again:
            raise Unavailable("send queue full") from None
        except zmq.ZMQError as exc:
            raise Unavailable(f"send failed: {exc.strerror}") from None
        finally:
            # Reading EVENTS re-arms the edge-triggered FD: a message arriving later
            # wakes the reader. One already waiting would not, so drain it next turn.
            # (Cheaper than a loop turn after every send.)
            if not self._closed and self._events(_EVENTS) & _POLLIN:
                self.kick()

    def close(self) -> None:
        """Stop pumping and close the socket."""
        if self._closed:
            return
        self._closed = True
        try:
            self._loop.remove_reader(self._fd)
        except (ValueError, OSError, RuntimeError):
            pass
        self.sock.close(linger=LINGER_MS)
