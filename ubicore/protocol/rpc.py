"""RPC correlation on the caller's side, sans-IO.

Theory of operation: a caller owns one :class:`RpcCaller` per connection. ``start``
gives each call a fresh correlation id, remembers its deadline and returns the frames
to send. Every frame sequence that arrives goes to ``receive``, which answers with the
call it completes and its outcome (a result or a typed :class:`RemoteError`), or ``None``
for a reply nobody waits for any more (late, duplicated or foreign: counted in
``stats``). ``expire(now)`` ends every call whose deadline passed with
:class:`CallTimeout`, so no call outlives its deadline whatever the peer does. Time is
passed in, never read, so the tests drive it by hand.

A call made inside a session (``start(..., session=s)``) is sealed with it, and only two
answers can end it: a sealed reply that opens under that session, or a clear
``auth_required`` / ``protocol_error`` (the instance could not use the session at all;
the caller logs in again). A clear *result* for a sealed call is refused and counted in
``stats.rejected``: nobody on the path can forge one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..errors import (
    CallTimeout,
    DecryptionFailed,
    ProtocolError,
    RemoteError,
    remote_error_from_wire,
)
from .codec import encode_request, encode_sealed_request, parse_server_message
from .messages import ErrorReply, Reply, Request, Sealed

if TYPE_CHECKING:
    from ..security.session import ClientSession

_CLEAR_FOR_SEALED = frozenset({"auth_required", "protocol_error"})

_MAX_CORR = 2**63


@dataclass(slots=True)
class CallerStats:
    """Counters a caller keeps: replies nobody waited for, and malformed frames."""

    unmatched_replies: int = 0
    malformed: int = 0
    timeouts: int = 0
    rejected: int = 0


@dataclass(frozen=True, slots=True)
class Outcome:
    """How one call ended: ``error`` is None on success."""

    corr_id: int
    result: Any = None
    error: RemoteError | None = None


@dataclass(slots=True)
class RpcCaller:
    """Correlates requests and replies on one connection."""

    stats: CallerStats = field(default_factory=CallerStats)
    _deadlines: dict[int, float] = field(default_factory=dict)
    _sessions: dict[int, ClientSession] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def start(
        self,
        schema: str,
        cell: str,
        operation: str,
        args: Mapping[str, Any],
        timeout_s: float,
        now: float,
        session: ClientSession | None = None,
    ) -> tuple[int, list[bytes]]:
        """Begin a call (sealed under ``session`` if given); its correlation id and the
        frames to send."""
        if not (timeout_s > 0 and math.isfinite(timeout_s)):
            raise ValueError("timeout_s must be positive and finite")
        corr = next(self._ids) % _MAX_CORR
        # Encode first: args or a timeout that cannot travel raise ValueError before the
        # call is registered, so no phantom call waits for a reply that never comes.
        req = Request(corr, schema, cell, operation, args, max(1, int(timeout_s * 1000)))
        if session is None:
            frames = encode_request(req)
        else:
            frames = encode_sealed_request(session.seal_request(req))
            self._sessions[corr] = session
        self._deadlines[corr] = now + timeout_s
        return corr, frames

    def receive(self, frames: list[bytes]) -> Outcome | None:
        """Feed a received frame sequence; the outcome of the call it completes, if any."""
        try:
            outer = parse_server_message(frames)
        except ProtocolError:
            self.stats.malformed += 1
            return None
        if outer.corr_id not in self._deadlines:
            self.stats.unmatched_replies += 1
            return None
        session = self._sessions.get(outer.corr_id)
        if type(outer) is Sealed:
            if session is None:
                self.stats.rejected += 1
                return None
            try:
                msg = session.open_reply(outer)
            except DecryptionFailed:
                self.stats.rejected += 1
                return None
        elif session is not None and not (type(outer) is ErrorReply and outer.code in _CLEAR_FOR_SEALED):
            self.stats.rejected += 1
            return None
        else:
            msg = outer  # type: ignore[assignment]
        del self._deadlines[msg.corr_id]
        self._sessions.pop(msg.corr_id, None)
        match msg:
            case Reply(corr_id=corr, result=result):
                return Outcome(corr, result=result)
            case ErrorReply(corr_id=corr, code=code, message=message, detail=detail):
                return Outcome(corr, error=remote_error_from_wire(code, message, detail))
        raise AssertionError("unreachable")  # pragma: no cover

    def cancel(self, corr_id: int) -> None:
        """Forget a call (its caller gave up); a late reply will count as unmatched."""
        self._deadlines.pop(corr_id, None)
        self._sessions.pop(corr_id, None)

    def expire(self, now: float) -> list[Outcome]:
        """End every call whose deadline is at or before ``now`` with CallTimeout."""
        late = [c for c, d in self._deadlines.items() if d <= now]
        for corr in late:
            del self._deadlines[corr]
            self._sessions.pop(corr, None)
        self.stats.timeouts += len(late)
        return [Outcome(c, error=CallTimeout("no reply before the deadline")) for c in late]

    def next_deadline(self) -> float | None:
        """The earliest pending deadline, to schedule the next ``expire``."""
        return min(self._deadlines.values(), default=None)

    def fail_all(self, error: RemoteError) -> list[Outcome]:
        """End every pending call with ``error`` (the connection is being closed)."""
        out = [Outcome(c, error=error) for c in self._deadlines]
        self._deadlines.clear()
        self._sessions.clear()
        return out

    @property
    def pending(self) -> int:
        return len(self._deadlines)
