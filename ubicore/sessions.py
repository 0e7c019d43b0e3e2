"""The client's sessions: logging in to instances and keeping the sessions alive.

A client holds at most one session per (instance endpoint, schema, cell). It logs in
the first time a call needs one (the four passes of :mod:`ubicore.security.amp` over
two clear operations, ``auth_hello`` and ``auth_confirm``), with the client's
:class:`Credentials`, or as ``default`` with the empty password when none were given.
A session past its lifetime, or one the instance no longer knows (it restarted, or its
level changed), is dropped and the call logs in again, once, without the application
noticing. Concurrent calls that need the same session share one login.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .errors import AuthenticationFailed, CallTimeout, DecryptionFailed, RemoteError
from .security.amp import Challenge, ClientHandshake, Grant, PasswordSecret, UserSecret
from .security.local import LocalClient, LocalGrant
from .security.policy import DEFAULT_USER
from .security.primitives import KdfParams
from .security.session import (
    ClientSession,
    SessionGrant,
    client_session,
    delivery_context,
)
from .transport.rpc import RpcConnection

LOCAL_USER = "(os user)"
"""The name local credentials carry until an instance names the OS user."""

__all__ = ["Credentials", "SessionManager", "RENEW_MARGIN", "finish_login", "parse_challenge"]

RENEW_MARGIN = 0.9
"""A session is renewed once this fraction of its lifetime has passed."""
MAX_KDF_TIME = 16
MAX_KDF_MEMORY_KIB = 1024 * 1024
"""The highest Argon2id costs a client accepts from an instance (16 passes, 1 GiB)."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """Who a client logs in as. ``Credentials.password("alice", "...")``; the password
    itself is held by a :class:`~ubicore.security.amp.UserSecret` and never shown."""

    user: str
    secret: UserSecret = field(repr=False)

    @classmethod
    def password(cls, user: str, password: str) -> Credentials:
        return cls(user, PasswordSecret(password))

    @classmethod
    def anonymous(cls) -> Credentials:
        return cls(DEFAULT_USER, PasswordSecret(""))

    @classmethod
    def local(cls) -> Credentials:
        """Log in as the OS user of this process's Unix account, without a password,
        over the instances' ``ipc://`` endpoints (the client must run on their host)."""
        return cls(LOCAL_USER, LocalSecret())

    @property
    def is_local(self) -> bool:
        return isinstance(self.secret, LocalSecret)


class LocalSecret(UserSecret):
    """No secret: the kernel vouches for the uid (local logins)."""

    def __repr__(self) -> str:
        return "<LocalSecret>"


def parse_challenge(reply: Any) -> tuple[bytes, Challenge, str, bytes]:
    try:
        p = reply["params"]
        if p.get("alg") != "argon2id":
            raise ValueError
        params = KdfParams(int(p["t"]), int(p["p"]), int(p["m_kib"])).check()
        if params.t > MAX_KDF_TIME or params.m_kib > MAX_KDF_MEMORY_KIB:
            raise ValueError  # a client spends at most this much on anyone's say-so
        hs, g2, salt, site, iid = (reply[k] for k in ("hs", "g2", "salt", "site", "instance_id"))
        if not (type(hs) is bytes and type(g2) is bytes and type(salt) is bytes and type(site) is str and type(iid) is bytes):
            raise ValueError
        return hs, Challenge(g2, salt, params), site, iid
    except (KeyError, TypeError, ValueError, AttributeError):
        raise AuthenticationFailed("authentication failed (malformed challenge)") from None


def _grant(reply: Any) -> Grant:
    try:
        h_s, nonce, keys, version = (reply[k] for k in ("h_s", "nonce", "keys", "version"))
        if not (type(h_s) is bytes and type(nonce) is bytes and type(keys) is bytes and type(version) is int):
            raise ValueError
        return Grant(h_s, nonce, keys, version)
    except (KeyError, TypeError, ValueError):
        raise AuthenticationFailed("authentication failed") from None


class SessionManager:
    """Sessions of one client (see the module docstring)."""

    def __init__(
        self, credentials: Credentials | None = None, *, site: str | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.credentials = credentials or Credentials.anonymous()
        self.site = site
        self._clock = clock
        self._sessions: dict[tuple[str, str, str], ClientSession] = {}
        self._logins: dict[tuple[str, str, str], asyncio.Task[ClientSession]] = {}
        self._held: set[tuple[str, str, str]] = set()
        self.logins = 0
        self.local_user: str | None = None
        """The OS user local credentials logged in as (the instances name it)."""

    def __repr__(self) -> str:
        return f"<SessionManager user={self.credentials.user!r} sessions={len(self._sessions)}>"

    def current(self, endpoint: str, schema: str, cell: str) -> ClientSession | None:
        """The live session for this instance, if there is one."""
        s = self._sessions.get((endpoint, schema, cell))
        if s is not None and s.expires_at <= self._clock():
            return None
        return s

    def latest(self, endpoint: str, schema: str, cell: str) -> ClientSession | None:
        """The newest session with this instance, live or past its lifetime: its group
        keys still open the channel until the key rotates away from it."""
        return self._sessions.get((endpoint, schema, cell))

    def expired(self, session: ClientSession) -> bool:
        return session.expires_at <= self._clock()

    def held(self, endpoint: str, schema: str, cell: str) -> bool:
        """True once any session was made with this instance (even if expired): calls to it
        stay sealed from then on, whatever a later, unauthenticated answer claims."""
        return (endpoint, schema, cell) in self._held

    def switch(self, credentials: Credentials) -> None:
        """Log in as someone else from now on: every session is dropped (its group keys
        still open the channel until a rotation), the next call logs in anew."""
        self.credentials = credentials
        self.local_user = None
        for s in self._sessions.values():
            s.expires_at = 0.0

    def drop(self, endpoint: str, schema: str, cell: str) -> None:
        s = self._sessions.get((endpoint, schema, cell))
        if s is not None:
            s.expires_at = 0.0  # keep it known (``held``) but force a new login

    async def session(self, conn: RpcConnection, schema: str, cell: str, timeout_s: float) -> ClientSession:
        """The live session with this instance, logging in if needed (shared by callers)."""
        key = (conn.endpoint, schema, cell)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            s = self.current(*key)
            if s is not None:
                return s
            login = self._logins.get(key)
            joined = login is not None and not login.done()
            if login is None or login.done():
                # The login is a task of its own that every caller waits for with its own
                # deadline: one that gives up or is cancelled takes nobody else's login down
                # (nor hands them its CancelledError).
                login = loop.create_task(self._login(conn, schema, cell, max(0.001, deadline - loop.time())))
                self._logins[key] = login
                login.add_done_callback(lambda task: self._logged_in(key, task))
            try:
                return await asyncio.wait_for(asyncio.shield(login), max(0.0, deadline - loop.time()))
            except TimeoutError as exc:
                if not isinstance(exc, RemoteError):
                    raise CallTimeout(f"no session with {schema} at {cell} within {timeout_s:.3g} s") from None
                if not joined or deadline <= loop.time():  # the login's own CallTimeout, in our time
                    raise
                # The login ran out of the time of the caller that started it, not ours: again.

    def _logged_in(self, key: tuple[str, str, str], task: asyncio.Task[ClientSession]) -> None:
        if self._logins.get(key) is task:
            del self._logins[key]
        if task.cancelled() or task.exception() is not None:  # retrieved, waited for or not
            return
        new = task.result()
        old = self._sessions.get(key)
        if old is not None:
            new.group.adopt(old.group)  # a renewal reads on: no keys, no window lost
        self._sessions[key] = new
        self._held.add(key)

    async def _login(self, conn: RpcConnection, schema: str, cell: str, timeout_s: float) -> ClientSession:
        deadline = self._clock() + timeout_s
        creds = self.credentials
        if creds.is_local:
            return await self._local_login(conn, schema, cell, timeout_s)
        hs = ClientHandshake(creds.user, self.site, creds.secret)  # None: the site named in pass 2
        hello = hs.start()
        reply = await conn.call(schema, cell, "auth_hello", {"user": hello.user, "g1": hello.g1}, timeout_s)
        hs_id, challenge, site, instance_id = parse_challenge(reply)
        if creds.secret.ready(creds.user, self.site or site, challenge.salt, challenge.params):
            confirm = hs.respond(challenge, site)  # no KDF to run: ~1 ms, not worth a thread hop
        else:  # Argon2id (~100 ms at the default costs) off the event loop
            confirm = await asyncio.to_thread(hs.respond, challenge, site)
        remaining = max(0.001, deadline - self._clock())
        reply = await conn.call(schema, cell, "auth_confirm", {"hs": hs_id, "h_c": confirm.h_c}, remaining)
        session = finish_login(hs, reply, schema, cell, instance_id, self._clock(), RENEW_MARGIN)
        self.logins += 1
        return session


    async def _local_login(self, conn: RpcConnection, schema: str, cell: str, timeout_s: float) -> ClientSession:
        if not conn.endpoint.startswith("ipc://"):
            raise AuthenticationFailed(f"{schema} at {cell} has no ipc endpoint here: "
                                       "an OS user logs in only on the instance's own host")
        lc = LocalClient()
        reply = await conn.call(schema, cell, "auth_local", {"pk": lc.pk}, timeout_s)
        try:
            grant = LocalGrant(*(reply[k] for k in ("user", "pk", "nonce", "keys", "version")))
            site, instance_id = reply["site"], reply["instance_id"]
            if type(site) is not str or type(instance_id) is not bytes or type(grant.version) is not int:
                raise ValueError
            if self.site is not None and site != self.site:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise AuthenticationFailed("authentication failed (malformed local grant)") from None
        payload, k_sess = lc.finish(grant, site, delivery_context(schema, cell, instance_id))
        try:
            sg = SessionGrant.decode(payload)
        except DecryptionFailed:
            raise AuthenticationFailed("authentication failed") from None
        if sg.epoch != grant.version or sg.user != grant.user:
            raise AuthenticationFailed("authentication failed")
        self.logins += 1
        self.local_user = sg.user
        return client_session(schema, cell, instance_id, sg, k_sess, self._clock() + sg.ttl_s * RENEW_MARGIN)


def finish_login(
    hs: ClientHandshake, reply: Any, schema: str, cell: str, instance_id: bytes, now: float, margin: float = 1.0
) -> ClientSession:
    """Pass 4 taken in: check H_S, open the grant, make the client's session (its end
    counted from ``now`` at ``margin`` of the granted lifetime). AuthenticationFailed if
    anything does not hold."""
    grant = _grant(reply)
    payload, k_sess = hs.finish(grant, delivery_context(schema, cell, instance_id))
    try:
        sg = SessionGrant.decode(payload)
    except DecryptionFailed:
        raise AuthenticationFailed("authentication failed") from None
    if sg.epoch != grant.version:
        raise AuthenticationFailed("authentication failed")
    return client_session(schema, cell, instance_id, sg, k_sess, now + sg.ttl_s * margin)
