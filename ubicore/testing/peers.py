"""In-memory peer pairs: a caller and an instance, a publisher and a follower, no sockets.

:class:`RpcPair` wires an :class:`~ubicore.protocol.rpc.RpcCaller` to an
:class:`~ubicore.dispatch.InstanceCore` through lists of frames, so a test (of ubicore,
or of an application's schema) runs real requests and replies through the real codec
without an event loop (``login`` makes its later calls sealed, for protected schemas).
:class:`ChannelPair` carries the instance's committed batches
to a :class:`~ubicore.protocol.channel.ChannelFollower` through a channel the test
controls: it can drop, duplicate or reorder messages to play a lossy network.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..dispatch import InstanceCore
from ..protocol.channel import Batch, ChannelFollower
from ..protocol.codec import (
    encode_delta_batches,
    encode_heartbeat,
    parse_channel_message,
)
from ..protocol.messages import Delta, Heartbeat, Welcome
from ..protocol.rpc import Outcome, RpcCaller
from ..security.amp import ClientHandshake, PasswordSecret
from ..security.session import ClientSession
from ..sessions import finish_login, parse_challenge

__all__ = ["ChannelPair", "RpcPair"]


@dataclass
class RpcPair:
    """A caller and an instance joined by two in-memory frame queues."""

    core: InstanceCore
    caller: RpcCaller = field(default_factory=RpcCaller)
    now: float = 0.0
    to_server: list[list[bytes]] = field(default_factory=list)
    to_client: list[list[bytes]] = field(default_factory=list)
    session: ClientSession | None = None

    def login(self, user: str, password: str) -> ClientSession:
        """Log in to the instance as ``user`` (the four passes, over this pair); from now
        on every call is sealed under the session. Raises AuthenticationFailed."""
        self.session = None
        hs = ClientHandshake(user, None, PasswordSecret(password))
        hello = hs.start()
        hs_id, challenge, site, instance_id = parse_challenge(self.call("auth_hello", user=user, g1=hello.g1))
        confirm = hs.respond(challenge, site)
        reply = self.call("auth_confirm", hs=hs_id, h_c=confirm.h_c)
        self.session = finish_login(hs, reply, self.core.name, self.core.cell, instance_id, self.now)
        return self.session

    def send(self, operation: str, args: Mapping[str, Any] | None = None, *, timeout_s: float = 5.0) -> int:
        """Queue a request (sealed once logged in); its correlation id."""
        corr, frames = self.caller.start(
            self.core.name, self.core.cell, operation, args or {}, timeout_s, self.now, self.session
        )
        self.to_server.append(frames)
        return corr

    def serve(self) -> None:
        """Let the instance answer everything queued for it."""
        while self.to_server:
            reply = self.core.handle(self.to_server.pop(0), b"rpc-pair")
            if reply is not None:
                self.to_client.append(reply)

    def deliver(self) -> list[Outcome]:
        """Hand every queued reply to the caller; the outcomes they complete."""
        out = []
        while self.to_client:
            outcome = self.caller.receive(self.to_client.pop(0))
            if outcome is not None:
                out.append(outcome)
        return out

    def call(self, operation: str, **args: Any) -> Any:
        """One whole round trip; the result, or the typed error raised."""
        corr = self.send(operation, args)
        self.serve()
        for outcome in self.deliver():
            if outcome.corr_id == corr:
                if outcome.error is not None:
                    raise outcome.error
                return outcome.result
        raise AssertionError("the instance did not answer")


@dataclass
class ChannelPair:
    """An instance's channel feeding a follower through a channel the test controls."""

    core: InstanceCore
    follower: ChannelFollower = field(default_factory=ChannelFollower)
    wire: list[list[bytes]] = field(default_factory=list)
    applied: list[Batch] = field(default_factory=list)
    dumps: int = 0

    def publish(self) -> None:
        """Put the batches committed since the last publish on the wire as one delta."""
        taken = self.core.sequencer.take_batches()
        if taken is not None:
            self.wire.append(encode_delta_batches(self.core.instance_id, taken[0], taken[1]))

    def heartbeat(self) -> None:
        self.publish()
        self.wire.append(encode_heartbeat(Heartbeat(self.core.instance_id, self.core.sequencer.seq)))

    def join(self) -> None:
        """Take a dump now (the follower has been buffering since it subscribed)."""
        dump = self.core.dump()
        self.dumps += 1
        self._after(self.follower.dump_received(dump["instance_id"], dump["seq"]))

    def flow(self) -> None:
        """Deliver everything on the wire, re-dumping whenever the follower asks."""
        while self.wire:
            msg = parse_channel_message(self.wire.pop(0))
            assert isinstance(msg, (Delta, Heartbeat, Welcome)), "the peer pair carries clear channels only"
            res = self.follower.feed(msg)
            self._after(res)

    def _after(self, res: Any) -> None:
        self.applied.extend(res.batches)
        if res.resync is not None:
            self.join()
