"""An instance's security state, sans-IO: logins, sessions, rights and group keys.

Theory of operation. Every instance owns one :class:`SessionGuard`. It answers the two
clear login operations (``auth_hello`` = pass 1 → 2, ``auth_confirm`` = pass 3 → 4 of
:mod:`ubicore.security.amp`), keeps the sessions they create, opens sealed requests and
seals their replies, decides what a request needs (:meth:`admit`, the table of
DESIGN.md §5), and keeps the channel's group keys (:class:`GroupKeys`): sealing events at
``full``, rotating them on a timer, when a key nears its message limit, on demand, and
when the policy takes the read right from a live session.

Half-done logins are one-shot, expire after ``pending_timeout_s`` and are capped per
peer and in total. A failed confirmation, a sealed message that does not open and a
request refused for lack of a session or a right are counted in :class:`GuardStats`.
Time and randomness are injected, so the tests drive expiry and rotation by hand.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..config.model import SecurityConfig
from ..errors import (
    AuthenticationFailed,
    AuthenticationRequired,
    DecryptionFailed,
    LockedOut,
    PermissionDenied,
)
from ..protocol.codec import encode_rekey, encode_sealed_event, encode_sealed_reply
from ..protocol.messages import Rekey, Request, Sealed
from ..schema import Protection
from .amp import Challenge, Confirm, Hello, ServerHandshake
from .local import server_grant
from .policy import Right, SecurityPolicy
from .primitives import KdfParams, Rng
from .session import (
    MAX_MESSAGES_PER_KEY,
    GroupKeys,
    ServerSession,
    SessionExhausted,
    SessionGrant,
    delivery_context,
    new_session_keys,
    server_session,
)

log = logging.getLogger(__name__)

AUTH_OPERATIONS = frozenset({"auth_hello", "auth_confirm", "auth_local"})
OPEN_UNDER_UPDATE = frozenset({"get_group", "get_dump"})
MAX_PENDING = 4096
MAX_PENDING_PER_PEER = 16
MAX_SESSIONS = 100_000
MAX_SESSIONS_PER_USER = 10_000
HANDSHAKE_ID_BYTES = 16


@dataclass(slots=True)
class GuardStats:
    logins: int = 0
    login_failures: int = 0
    rejected: int = 0
    unknown_sessions: int = 0
    auth_required: int = 0
    denied: int = 0
    rotations: int = 0
    sessions: int = 0
    locked_out: int = 0


AuditHook = Callable[[str, str, str, str, str], None]
"""(action, outcome, principal, client address, detail): where the guard reports what the
audit trail records (ubicore/audit/trail.py)."""


def no_audit(action: str, outcome: str, principal: str, address: str, detail: str) -> None:
    return None


class SessionTable(dict[bytes, ServerSession]):
    """The live sessions by id, also grouped by user (oldest first), so that the caps on
    sessions cost O(1) a login, not a scan of every session."""

    def __init__(self) -> None:
        super().__init__()
        self.by_user: dict[str, dict[bytes, ServerSession]] = {}

    def __setitem__(self, sid: bytes, session: ServerSession) -> None:
        if sid in self:
            del self[sid]
        super().__setitem__(sid, session)
        self.by_user.setdefault(session.user, {})[sid] = session

    def __delitem__(self, sid: bytes) -> None:
        session = self[sid]
        super().__delitem__(sid)
        mine = self.by_user[session.user]
        del mine[sid]
        if not mine:
            del self.by_user[session.user]

    def pop(self, sid: bytes, default: Any = None) -> Any:
        if sid not in self:
            return default
        session = self[sid]
        del self[sid]
        return session

    def clear(self) -> None:
        super().clear()
        self.by_user.clear()


class _Pending:
    __slots__ = ("hs", "peer", "started", "address")

    def __init__(self, hs: ServerHandshake, peer: bytes, started: float, address: str) -> None:
        self.hs, self.peer, self.started, self.address = hs, peer, started, address


def _params_map(p: KdfParams) -> dict[str, Any]:
    return {"alg": "argon2id", "t": p.t, "p": p.p, "m_kib": p.m_kib}


def _bytes_arg(args: Mapping[str, Any], name: str) -> bytes:
    v = args.get(name)
    if type(v) is not bytes:
        raise AuthenticationFailed("authentication failed")
    return v


class SessionGuard:
    """See the module docstring."""

    def __init__(
        self,
        schema: str,
        cell: str,
        instance_id: bytes,
        level: Protection,
        policy: SecurityPolicy,
        *,
        settings: SecurityConfig = SecurityConfig(),
        clock: Callable[[], float] = time.monotonic,
        rng: Rng = os.urandom,
    ) -> None:
        self.schema, self.cell, self.instance_id = schema, cell, instance_id
        self.level = level
        self.policy = policy
        self.settings = settings
        self._clock = clock
        self._rng = rng
        self.stats = GuardStats()
        self.sessions = SessionTable()
        self._pending: OrderedDict[bytes, _Pending] = OrderedDict()
        self.keys = GroupKeys(schema, cell, instance_id, rng=rng,
                              max_messages=min(settings.rotate_after_messages, MAX_MESSAGES_PER_KEY))
        self.level_epoch = self.keys.epoch
        self._rotated_at = clock()
        self._context = delivery_context(schema, cell, instance_id)
        # What each session was made with, so that a policy change can tell whether it
        # still holds: the uid of an OS user's session, the verifier of a password login
        # (a new password ends the sessions made with the old one).
        self._made_with: dict[bytes, int | bytes] = {}
        self.audit: AuditHook = no_audit
        self._wall = time.time

    @property
    def epoch(self) -> int:
        return self.keys.epoch

    # --- logging in ----------------------------------------------------------------------------

    def hello(self, peer: bytes, args: Mapping[str, Any], address: str = "") -> dict[str, Any]:
        """Pass 1 → pass 2. Never says whether the user exists. A user or client address
        that failed too often (the policy's lockouts) is refused with LockedOut."""
        self._expire_pending()
        user, g1 = args.get("user"), _bytes_arg(args, "g1")
        if type(user) is not str:
            raise AuthenticationFailed("authentication failed")
        self._refuse_if_locked_out(user, address)
        if sum(p.peer == peer for p in self._pending.values()) >= MAX_PENDING_PER_PEER:
            raise AuthenticationFailed("too many logins in progress; retry shortly")
        hs = ServerHandshake(self.policy.site, self.policy.verifier, self.policy.server_secret,
                             fake_params=self.policy.fake_params, rng=self._rng)
        try:
            ch: Challenge = hs.challenge(Hello(user, g1))
        except AuthenticationFailed:
            self.stats.login_failures += 1
            self.audit("login", "failed", user, address, "a malformed first pass")
            raise
        hs_id = self._rng(HANDSHAKE_ID_BYTES)
        if len(self._pending) >= MAX_PENDING:
            # The oldest half-done login gives way. Refusing instead would let anyone with
            # 256 connections (peer ids cost nothing) lock every login out for 10 s at a time.
            self._pending.popitem(last=False)
        self._pending[hs_id] = _Pending(hs, peer, self._clock(), address)
        return {"hs": hs_id, "g2": ch.g2, "salt": ch.salt, "params": _params_map(ch.params),
                "site": self.policy.site, "instance_id": self.instance_id}

    def _refuse_if_locked_out(self, user: str, address: str) -> None:
        now = self._wall()
        until = self.policy.locked_out(user, address, now)
        if until is not None:
            self.stats.locked_out += 1
            wait = until - now
            self.audit("login", "refused", user, address, f"locked out for {wait:.0f} s more")
            raise LockedOut(f"too many failed logins: logins are refused for {wait:.0f} s",
                            {"retry_after_s": round(wait, 1)})

    def confirm(self, peer: bytes, args: Mapping[str, Any]) -> dict[str, Any]:
        """Pass 3 → pass 4. A wrong confirmation raises AuthenticationFailed, no pass 4; a
        user or address locked out since pass 1 raises LockedOut (a guesser cannot start
        many logins before a lockout and finish them during it)."""
        self._expire_pending()
        hs_id = _bytes_arg(args, "hs")
        pending = self._pending.get(hs_id)
        if pending is None or pending.peer != peer:  # another connection's login stays intact
            # No such login here (timed out, pushed out of a full table, used, never made):
            # not a failed guess. The caller starts again, and the SDK does so by itself.
            raise AuthenticationRequired("no such login in progress; log in again", {"reason": "login"})
        del self._pending[hs_id]  # one-shot from here on, whatever the outcome
        hs = pending.hs
        self._refuse_if_locked_out(hs.user, pending.address)
        try:
            hs.confirm(Confirm(_bytes_arg(args, "h_c")))
        except AuthenticationFailed:
            self.stats.login_failures += 1
            self.audit("login", "failed", hs.user, pending.address, "wrong password or unknown user")
            raise
        if not hs.known_user:  # cannot happen: nobody knows a fake record's π
            raise AuthenticationFailed("authentication failed")
        self._make_room(hs.user)
        sid, c2s, s2c = new_session_keys(self._rng)
        may_read = self.level is Protection.FULL and self._right(hs.user) >= Right.READ
        grant = SessionGrant(sid, c2s, s2c, self.epoch, self.level.value, self.settings.session_ttl_s, hs.user,
                             self.keys.delivered() if may_read else ())
        pass4, k_sess = hs.grant(grant.encode(), self._context, self.epoch)
        self.sessions[sid] = server_session(self.schema, self.cell, self.instance_id, grant, k_sess,
                                            self._clock() + self.settings.session_ttl_s, peer=peer, may_read=may_read)
        self._made_with[sid] = hs.record_verifier
        self.stats.logins += 1
        self.audit("login", "ok", hs.user, pending.address, "")
        self.stats.sessions = len(self.sessions)
        return {"h_s": pass4.h_s, "nonce": pass4.nonce, "keys": pass4.wrapped, "version": pass4.version}

    def local_login(self, peer: bytes, uid: int, args: Mapping[str, Any]) -> dict[str, Any]:
        """``auth_local`` from an ipc connection whose peer the kernel says is ``uid``:
        a session for the site's OS user with that uid (security/local.py)."""
        user = self.policy.os_user(uid)
        if user is None:
            self.stats.login_failures += 1
            self.audit("login", "failed", f"uid {uid}", f"uid {uid}", "not an OS user of this site")
            raise AuthenticationFailed(f"authentication failed: uid {uid} is not an OS user of this site")
        self._make_room(user)
        sid, c2s, s2c = new_session_keys(self._rng)
        may_read = self.level is Protection.FULL and self._right(user) >= Right.READ
        grant = SessionGrant(sid, c2s, s2c, self.epoch, self.level.value, self.settings.session_ttl_s, user,
                             self.keys.delivered() if may_read else ())
        lg, k_sess = server_grant(user, self.policy.site, self._context, args.get("pk"), grant.encode(), self.epoch,
                                  rng=self._rng)
        self.sessions[sid] = server_session(self.schema, self.cell, self.instance_id, grant, k_sess,
                                            self._clock() + self.settings.session_ttl_s, peer=peer, may_read=may_read)
        self._made_with[sid] = uid
        self.stats.logins += 1
        self.audit("login", "ok", user, f"uid {uid}", "local login")
        self.stats.sessions = len(self.sessions)
        return {"user": user, "pk": lg.pk, "nonce": lg.nonce, "keys": lg.wrapped, "version": lg.version,
                "site": self.policy.site, "instance_id": self.instance_id}

    def _expire_pending(self) -> None:
        limit = self._clock() - self.settings.pending_timeout_s
        while self._pending:
            hs_id, p = next(iter(self._pending.items()))
            if p.started > limit:
                break
            del self._pending[hs_id]

    def _make_room(self, user: str) -> None:
        """Before a new session of ``user``: past MAX_SESSIONS_PER_USER its own oldest
        session gives way (so a flood of logins as one user, ``default`` say, only ever
        evicts that user's sessions); past MAX_SESSIONS the oldest of the user with the
        most sessions does."""
        by_user = self.sessions.by_user
        mine = by_user.get(user, {})
        if len(mine) < MAX_SESSIONS_PER_USER and len(self.sessions) < MAX_SESSIONS:
            return
        if len(mine) < MAX_SESSIONS_PER_USER:  # the table is full: scan the users, not the sessions
            mine = by_user[max(by_user, key=lambda u: len(by_user[u]))]
        del self.sessions[next(iter(mine))]  # oldest first: every session gets the same lifetime

    # --- sealed requests -----------------------------------------------------------------------

    def open(self, msg: Sealed) -> tuple[ServerSession, Request]:
        """The session and the request inside a sealed message.

        AuthenticationRequired (answered in the clear) when the session is unknown,
        expired or from an earlier level; DecryptionFailed (dropped, counted) when the
        message does not open.
        """
        session = self.sessions.get(msg.session_id)
        if session is None or session.expires_at <= self._clock() or session.epoch < self.level_epoch:
            if session is not None:
                del self.sessions[msg.session_id]
                self.stats.sessions = len(self.sessions)
            self.stats.unknown_sessions += 1
            raise AuthenticationRequired("session expired; log in again", {"reason": "session"})
        try:
            req = session.open_request(msg)
        except DecryptionFailed:
            self.stats.rejected += 1
            raise
        return session, req

    def seal_reply(self, session: ServerSession, frames: list[bytes], corr_id: int) -> list[bytes] | None:
        try:
            return encode_sealed_reply(session.seal_reply(frames, corr_id))
        except SessionExhausted:
            self.sessions.pop(session.session_id, None)
            return None

    # --- rights --------------------------------------------------------------------------------

    def _right(self, user: str) -> Right:
        return self.policy.right(user, self.schema, self.cell)

    def admit(self, session: ServerSession | None, operation: str, updates: bool) -> None:
        """Raise the error that refuses ``operation`` at the current level, if any."""
        level = self.level
        if level is Protection.OPEN:
            return
        if level is Protection.UPDATE and operation in OPEN_UNDER_UPDATE:
            return
        if session is None:
            self.stats.auth_required += 1
            raise AuthenticationRequired(
                f"{operation} on {self.schema} at {self.cell} needs a session ({level.value} protection)",
                {"level": level.value},
            )
        need = Right.UPDATE if updates else Right.READ
        if self._right(session.user) < need:
            self.stats.denied += 1
            raise PermissionDenied(
                f"{session.user} may not {need.label} {self.schema} at {self.cell}",
                {"groups": self.policy.granting_groups(self.schema, self.cell, need), "right": need.label},
            )

    def group_keys_for(self, session: ServerSession | None) -> list[list[Any]]:
        """``get_keys``: the current and next group keys, for a session with the read right."""
        if self.level is not Protection.FULL:
            return []
        if session is None:
            raise AuthenticationRequired("get_keys needs a session")
        self.admit(session, "get_keys", False)
        session.may_read = True
        return [[e, k.value] for e, k in self.keys.delivered()]

    # --- the channel ----------------------------------------------------------------------------

    def seal_event(self, frames: list[bytes]) -> list[list[bytes]]:
        """What to publish for one clear delta or heartbeat at the current level: the frames
        themselves below ``full``; at ``full`` the sealed event, after a rekey if the
        current key has reached its message limit."""
        if self.level is not Protection.FULL:
            return [frames]
        out: list[list[bytes]] = []
        if self.keys.exhausted:
            out += self.rotate("message limit")
        return [*out, encode_sealed_event(self.keys.seal(frames))]

    def rotate(self, reason: str, *, entitled: Callable[[ServerSession], bool] | None = None) -> list[list[bytes]]:
        """Rotate the group key now; the rekey message to publish (empty below ``full``).

        With ``entitled``, only the sessions it accepts keep going: the others end (their
        next request is told to log in again, and a new login checks the rights afresh),
        and the next key already handed out is replaced too, so whoever is left out cannot
        read a single event sealed after this call. Without it, every session with the read
        right is served and the next key (already delivered) becomes current, so nobody
        misses an event.
        """
        if entitled is not None:  # at every level: a session left out ends
            for sid in [sid for sid, s in self.sessions.items() if not entitled(s)]:
                del self.sessions[sid]
            self.stats.sessions = len(self.sessions)
        if self.level is not Protection.FULL:
            return []
        epoch, keys = self.keys.rotate(exclude_next=entitled is not None)
        self._rotated_at = self._clock()
        self.stats.rotations += 1
        entries = tuple(s.wrap_group_keys(epoch, keys) for s in self.sessions.values() if s.may_read)
        log.info("%s@%s: group key rotated to epoch %d (%s), %d sessions served",
                 self.schema, self.cell, self.keys.epoch, reason, len(entries))
        self.audit("key_rotation", "ok", "", "", f"epoch {self.keys.epoch}: {reason}; {len(entries)} sessions served")
        return [encode_rekey(Rekey(self.instance_id, epoch, entries))]

    def revoke(self, session_ids: set[bytes] | frozenset[bytes], reason: str = "revoked") -> list[list[bytes]]:
        """End these sessions and rotate the group key away from them."""
        for sid in session_ids:
            self.sessions.pop(sid, None)
        self.stats.sessions = len(self.sessions)
        return self.rotate(reason, entitled=lambda s: s.session_id not in session_ids)

    def reevaluate(self) -> list[list[bytes]]:
        """After a policy change: end sessions of users who are gone or disabled, or whose
        password changed since they logged in, and rotate away from those and from sessions
        that lost the read right."""
        self._made_with = {sid: m for sid, m in self._made_with.items() if sid in self.sessions}
        gone = {sid for sid, s in self.sessions.items() if not self._still_known(sid, s.user)}
        for sid in gone:
            del self.sessions[sid]
        self.stats.sessions = len(self.sessions)
        losing = {sid for sid, s in self.sessions.items() if s.may_read and self._right(s.user) < Right.READ}
        if not (gone or losing) or self.level is not Protection.FULL:
            return []
        return self.rotate("policy change", entitled=lambda s: s.session_id not in losing and s.session_id not in gone)

    def _still_known(self, sid: bytes, user: str) -> bool:
        made_with = self._made_with.get(sid)
        if isinstance(made_with, int):
            return self.policy.os_user(made_with) == user
        record = self.policy.verifier(user)
        return record is not None and (made_with is None or record.verifier == made_with)

    def set_level(self, level: Protection) -> bool:
        """Move to another level: a new epoch, new group keys, every session ends (clients
        log in again and learn the new level; logins under way finish at the new level).
        True if the level changed."""
        if level is self.level:
            return False
        self.level = level
        self.keys = GroupKeys(self.schema, self.cell, self.instance_id, epoch=self.keys.epoch + 2, rng=self._rng,
                              max_messages=self.keys.max_messages)
        self.level_epoch = self.keys.epoch
        self.sessions.clear()  # half-done logins go on: their grant is made at the new level
        self.stats.sessions = 0
        self._rotated_at = self._clock()
        log.info("%s@%s: now %s protection, epoch %d", self.schema, self.cell, level.value, self.epoch)
        return True

    def tick(self) -> list[list[bytes]]:
        """Periodic work: expire sessions and half-done logins, rotate when due."""
        now = self._clock()
        expired = [sid for sid, s in self.sessions.items() if s.expires_at <= now]
        for sid in expired:
            del self.sessions[sid]
        self.stats.sessions = len(self.sessions)
        if len(self._made_with) > len(self.sessions):  # sessions ended elsewhere (evicted, a level change...)
            self._made_with = {sid: m for sid, m in self._made_with.items() if sid in self.sessions}
        self._expire_pending()
        if self.level is Protection.FULL and now - self._rotated_at >= self.settings.rotation_s:
            return self.rotate("periodic")
        return []
