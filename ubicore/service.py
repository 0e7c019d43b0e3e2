"""Running one instance over ZeroMQ: a ROUTER for operations, a PUB for its channel.

The :class:`~ubicore.dispatch.InstanceCore` does the work; this module only moves its
frames. Commits made back to back inside one loop turn leave the instance as one delta
message (at most ``MAX_COALESCED_BATCHES`` batches each), which is how the channel beats
one-message-per-event. Heartbeats, sent after any pending delta, carry the last
sequence so that followers notice a lost tail. The PUB socket never blocks: a subscriber
that falls past its high-water mark loses messages, notices the gap and re-dumps.

At ``full`` protection every delta and heartbeat leaves sealed under the group key
(:class:`~ubicore.security.guard.SessionGuard`). A security tick re-reads the policy
(level changes move the instance to a new epoch; lost rights rotate the group key away
from the sessions that lost them), expires sessions and rotates the group key when due.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from typing import Any

from .dispatch import InstanceCore
from .localipc import BoundSocket, bind_path
from .protocol.codec import HEADER_WELCOME, encode_delta_batches, encode_heartbeat
from .protocol.messages import Heartbeat
from .schema import Protection
from .security.local import peer_uid
from .security.session import ServerSession
from .store import Transaction
from .transport.sockets import Pump, bind, bind_retrying, make_publisher, make_router, recv_frames_with_peer

log = logging.getLogger(__name__)

MAX_COALESCED_BATCHES = 256
DEFAULT_HEARTBEAT_S = 1.0
BIND_RETRY_S = 2.0
PUB_HWM = 100_000
"""Messages queued per subscriber before the channel drops (each up to 256 batches)."""
ROUTER_HWM = 100_000
"""Replies queued per caller before they are dropped (the caller then times out)."""
SECURITY_TICK_S = 0.25
"""How often the policy is re-read and sessions, logins and key rotation are checked."""


def _discard(frames: list[bytes]) -> None:
    pass


class InstanceContext:
    """What a schema's ``run(self, ctx)`` gets: its cell, options and transactions."""

    def __init__(self, server: InstanceServer) -> None:
        self._server = server
        self.cell = server.core.cell
        self.options: Mapping[str, Any] = server.core.obj.options

    def transaction(self) -> contextlib.AbstractContextManager[Transaction]:
        """Commit on leaving the block and publish the changes; roll back on error."""
        return self._server.transaction()


class _CommitOnExit:
    """The context manager of :meth:`InstanceContext.transaction` (a class rather than a
    generator: simulators commit at high rates and this is on their path)."""

    __slots__ = ("_core", "_tx")

    def __init__(self, core: InstanceCore) -> None:
        self._core = core
        self._tx: Transaction | None = None

    def __enter__(self) -> Transaction:
        self._tx = self._core.store.transaction()
        return self._tx

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        tx = self._tx
        assert tx is not None
        if exc_type is not None:
            tx.rollback()
            return
        self._core.commit(tx)


class InstanceServer:
    """Serves one instance core on ``address`` (ports 0: any free port)."""

    def __init__(
        self,
        core: InstanceCore,
        *,
        address: str = "127.0.0.1",
        rpc_port: int = 0,
        event_port: int = 0,
        heartbeat_s: float = DEFAULT_HEARTBEAT_S,
        local: str | None = None,
    ) -> None:
        """``local``: an ``ipc://`` endpoint to answer requests on too, where OS users of
        this host log in without a password (the kernel names the peer's uid)."""
        self.core = core
        self._local_endpoint = local
        self._local: Pump | None = None
        self._local_socket: BoundSocket | None = None
        self._address = address
        self._ports = (rpc_port, event_port)
        self._heartbeat_s = heartbeat_s
        self._router: Pump | None = None
        self._pub: Pump | None = None
        self._flush_scheduled = False
        self._tasks: list[asyncio.Task[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self.on_level_change: Callable[[Protection], None] | None = None
        self._unsubscribe: Callable[[], None] = lambda: None
        self.companions: dict[str, InstanceServer] = {}
        """Core services served beside this one, by schema (the core's naming server
        lists ``UPerm::Config`` here)."""
        core._on_commit = self._committed

    def transaction(self) -> contextlib.AbstractContextManager[Transaction]:
        """A transaction on the instance that commits and publishes on leaving the block."""
        return _CommitOnExit(self.core)

    @property
    def rpc_endpoint(self) -> str:
        return self.core.endpoints["rpc"]

    @property
    def event_endpoint(self) -> str:
        return self.core.endpoints["events"]

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        host = f"[{self._address}]" if ":" in self._address else self._address
        pub = make_publisher(hwm=PUB_HWM, welcome=HEADER_WELCOME)  # welcomes each subscriber
        router = make_router(hwm=ROUTER_HWM)
        try:
            events = await bind_retrying(pub, f"tcp://{host}:{self._ports[1] or '*'}", BIND_RETRY_S)
            rpc = await bind_retrying(router, f"tcp://{host}:{self._ports[0] or '*'}", BIND_RETRY_S)
        except BaseException:
            pub.close(0)
            router.close(0)
            raise
        if self._local_endpoint is not None:
            local = make_router(hwm=ROUTER_HWM)
            try:
                self.core.endpoints["local"] = bind(local, self._local_endpoint)
            except BaseException:
                for sock in (pub, router, local):
                    sock.close(0)
                raise
            bound = bind_path(self.core.endpoints["local"])
            self._local_socket = BoundSocket(bound) if bound is not None else None
            self._local = Pump(local, self._on_local_request, self._loop, recv=recv_frames_with_peer)
        # The publisher hands subscriptions up; nothing needs them, but they must be read.
        self._pub = Pump(pub, _discard, self._loop)
        self.core.endpoints.update(rpc=rpc, events=events)
        # Each request comes with its connection's Peer-Address (the client's IP), for the
        # audit trail and the lockout of addresses that keep failing to log in.
        self._router = Pump(router, self._on_request, self._loop, recv=recv_frames_with_peer)
        self._tasks.append(asyncio.create_task(self._heartbeats(), name="heartbeats"))
        self._tasks.append(asyncio.create_task(self._security(), name="security"))
        source = getattr(self.core.policy, "source", None)
        if source is not None:  # a policy change is applied at once, not at the next tick
            loop = self._loop
            self._unsubscribe = source.subscribe(lambda: loop.call_soon(self._policy_changed))
        if hasattr(self.core.obj, "run"):
            self._tasks.append(asyncio.create_task(self._run_schema(), name="schema-run"))
        log.info("%s@%s serving rpc %s events %s", self.core.name, self.core.cell, rpc, events)

    async def _run_schema(self) -> None:
        try:
            await self.core.obj.run(InstanceContext(self))  # type: ignore[attr-defined]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s@%s: run() raised; the instance keeps serving", self.core.name, self.core.cell)

    def _on_request(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            self.core.stats.malformed += 1
            return
        reply = self.core.handle(frames[2:], frames[1], None, frames[0].decode(errors="replace"))
        if reply is not None and self._router is not None:
            try:
                self._router.send([frames[1], *reply])
            except Exception as exc:
                log.warning("%s@%s: reply not sent: %s", self.core.name, self.core.cell, exc)

    def _on_local_request(self, frames: list[bytes]) -> None:
        if len(frames) < 3:
            self.core.stats.malformed += 1
            return
        uid = peer_uid(frames[0].decode(errors="replace"))
        reply = self.core.handle(frames[2:], b"ipc:" + frames[1], uid, "" if uid is None else f"uid {uid}")
        if reply is not None and self._local is not None:
            try:
                self._local.send([frames[1], *reply])
            except Exception as exc:
                log.warning("%s@%s: reply not sent: %s", self.core.name, self.core.cell, exc)

    def _committed(self) -> None:
        if self.core.sequencer.pending_batches >= MAX_COALESCED_BATCHES:
            self.flush()
        elif not self._flush_scheduled and self._loop is not None:
            self._flush_scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send every batch committed since the last flush as one delta message."""
        self._flush_scheduled = False
        if self._pub is None:
            return
        taken = self.core.sequencer.take_batches()
        if taken is None:
            return
        frames = encode_delta_batches(self.core.instance_id, taken[0], taken[1])
        self._publish(self.core.guard.seal_event(frames))
        self.core.stats.deltas_sent += 1

    def _publish(self, messages: list[list[bytes]]) -> None:
        if self._pub is not None:
            for frames in messages:
                self._pub.send(frames)

    def heartbeat(self) -> None:
        self.flush()
        if self._pub is not None:
            hb = Heartbeat(self.core.instance_id, self.core.sequencer.seq)
            self._publish(self.core.guard.seal_event(encode_heartbeat(hb)))

    # --- security ---------------------------------------------------------------------------

    def rotate_group_key(
        self, reason: str = "on demand", *, entitled: Callable[[ServerSession], bool] | None = None
    ) -> None:
        """Rotate the channel's group key now (``full`` only). With ``entitled``, only the
        sessions it accepts get the new key; the others end and cannot read a single event
        published after this call."""
        self.flush()  # what was committed before the rotation goes under the old key
        self._publish(self.core.guard.rotate(reason, entitled=entitled))

    def revoke(self, session_ids: set[bytes] | frozenset[bytes], reason: str = "revoked") -> None:
        """End these sessions and rotate the group key away from them."""
        self.flush()
        self._publish(self.core.guard.revoke(session_ids, reason))

    def set_level(self, level: Protection) -> bool:
        """Move to another protection level now (a new epoch; clients log in again)."""
        self.flush()
        changed = self.core.guard.set_level(level)
        if changed and self.on_level_change is not None:
            self.on_level_change(level)
        return changed

    def security_tick(self) -> None:
        """Re-read the policy and apply it; expire sessions; rotate when due."""
        core = self.core
        try:
            changed = core.policy.refresh()
        except Exception as exc:  # a broken store must not stop the instance; keep the last good one
            log.error("%s@%s: security policy not re-read: %s", core.name, core.cell, exc)
            changed = False
        if changed:
            self.set_level(core.policy.level(core.name) or core.configured_protection)
            self.flush()
            self._publish(core.guard.reevaluate())
        self.flush()  # what was committed before a rotation goes under the key it was made under
        self._publish(core.guard.tick())

    def _policy_changed(self) -> None:
        if self._pub is None:
            return
        try:
            self.security_tick()
        except Exception:
            log.exception("%s@%s: security tick failed", self.core.name, self.core.cell)

    async def _security(self) -> None:
        while True:
            await asyncio.sleep(SECURITY_TICK_S)
            try:
                self.security_tick()
            except Exception:
                log.exception("%s@%s: security tick failed", self.core.name, self.core.cell)

    async def _heartbeats(self) -> None:
        while True:
            self.heartbeat()
            await asyncio.sleep(self._heartbeat_s)

    async def stop(self) -> None:
        self._unsubscribe()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._pub is not None:
            self.flush()
            self._pub.close()  # closes the socket
            self._pub = None
        for pump in (self._router, self._local):
            if pump is not None:
                pump.close()
        if self._local_socket is not None:
            self._local_socket.remove()
            self._local_socket = None
        self._router = self._local = None
        self.core.store.close()
