"""The client SDK: find services, call their operations, cache and follow their state.

::

    async with Client.for_site(load_site("cells/demo.yaml")) as client:
        await client.call("Site", "ULocationSystem::ConfigurationUpdate", "set_rate",
                          sensor="S-001", rate_hz=5.0)
        positions = await client.cache("Zone-A", "ULocation::Positions")
        positions.on_update("positions", lambda old, new: print(new))

A client follows the naming registry (``UNaming::Registry``) as a cache of its own, so
``find`` is a local lookup, and every cache or follower it made rebinds by itself when
the registry shows that its instance restarted (new instance id) or moved (new
endpoints). Calls have deadlines and never hang; errors are the typed tree of
:mod:`ubicore.errors`. See :mod:`ubicore.blocking` for the blocking facade.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from .cache import Binding, Cache, Follower, _Joined
from .config.model import SiteConfig
from .errors import (
    AuthenticationFailed,
    AuthenticationRequired,
    CallTimeout,
    LockedOut,
    NotFound,
    PermissionDenied,
    Unavailable,
)
from .localipc import trusted_endpoint
from .login import MAX_ATTEMPTS, CredentialProvider, CredentialRequest, ask, requirement
from .protocol.channel import Batch
from .security.amp import CredentialsOutOfDate
from .security.guard import OPEN_UNDER_UPDATE
from .security.session import ClientSession
from .sessions import Credentials, SessionManager
from .transport.rpc import RpcConnection

__all__ = ["Client", "Credentials", "ServiceInfo", "DEFAULT_TIMEOUT_S", "NAMING_SCHEMA", "NAMING_CELL"]

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 5.0
NAMING_SCHEMA = "UNaming::Registry"
NAMING_CELL = "Site"
NAMING_LEVEL = "update"
"""Naming is read by anyone and updated by service users only (services/naming.py)."""
CORE_LEVELS = {"UPerm::Config": "full", "UAudit::Log": "full", "UAudit::Alerts": "full"}
"""The fixed levels of the core's services: a client never believes a registration that
says less (naming is read in the clear, so anyone on the path could say so)."""
_RANK = {"open": 0, "update": 1, "full": 2}


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """Where one instance runs, as naming knows it."""

    schema: str
    cell: str
    host: str
    rpc: str
    events: str
    instance_id: bytes
    protection: str
    pid: int
    started: float
    local: str = ""
    """The instance's ``ipc://`` endpoint on its own host (local logins), if it has one."""

    def binding(self, rpc: str | None = None) -> Binding:
        return Binding(self.schema, self.cell, rpc or self.rpc, self.events, self.instance_id, self.protection)


def needs_session(level: str, operation: str) -> bool:
    """Whether ``operation`` at ``level`` is sent inside a session (DESIGN.md §5)."""
    if level == "full":
        return True
    return level == "update" and operation not in OPEN_UNDER_UPDATE


class Client:
    """An asyncio client of one site; see the module docstring.

    ``credentials`` is who the client logs in as where an instance's level needs a
    session (``Credentials.password(user, password)``); without them it logs in as
    ``default`` with the empty password. ``site`` is the site name bound into every
    login (``for_site`` sets it; without it the name an instance states is used).
    """

    def __init__(
        self,
        core_rpc: str,
        core_events: str,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        credentials: Credentials | None = None,
        site: str | None = None,
        credential_provider: CredentialProvider | None = None,
        site_config: SiteConfig | None = None,
    ) -> None:
        self.timeout_s = timeout_s
        self._site_config = site_config  # where the site's ipc sockets are found (local credentials)
        self.credential_provider = credential_provider
        self._login_lock = asyncio.Lock()
        self.sessions = SessionManager(credentials, site=site)
        self._local = self.sessions.credentials.is_local
        self._naming_binding = Binding(NAMING_SCHEMA, NAMING_CELL, core_rpc, core_events, protection=NAMING_LEVEL)
        self._conns: dict[str, RpcConnection] = {}
        self._naming: Cache | None = None
        self._naming_lock: asyncio.Lock | None = None
        self._joined: list[_Joined] = []
        self.closed = False

    @classmethod
    def for_site(
        cls, site: SiteConfig, *, timeout_s: float = DEFAULT_TIMEOUT_S, credentials: Credentials | None = None,
        credential_provider: CredentialProvider | None = None,
    ) -> Client:
        return cls(site.core.rpc_endpoint, site.core.event_endpoint, timeout_s=timeout_s,
                   credentials=credentials, site=site.name, credential_provider=credential_provider,
                   site_config=site)

    @property
    def user(self) -> str:
        """Who the client logs in as now (for local credentials, the OS user an instance
        named once one was logged in to)."""
        if self.sessions.credentials.is_local and self.sessions.local_user is not None:
            return self.sessions.local_user
        return self.sessions.credentials.user

    def use_credentials(self, credentials: Credentials) -> None:
        """Log in as ``credentials`` from the next call on (sessions made so far end)."""
        self.sessions.switch(credentials)
        self._local = credentials.is_local

    async def _with_login(self, schema: str, cell: str, operation: str, attempt: Callable[[], Awaitable[T]]) -> T:
        """Run ``attempt()``; when it is denied (or the login it needs fails) and the client
        has a credential provider, ask it for credentials and run it again with them
        (ubicore/login.py). The client keeps credentials that worked."""
        denied_as = self.sessions.credentials
        try:
            return await attempt()
        except (PermissionDenied, AuthenticationFailed) as first:
            if self.credential_provider is None or isinstance(first, (CredentialsOutOfDate, LockedOut)):
                raise  # no other password helps: the cache is stale, or logins wait out a lockout
            err: PermissionDenied | AuthenticationFailed = first
        async with self._login_lock:  # one prompt at a time; a second denied call waits for it
            return await self._login_and_retry(schema, cell, operation, attempt, err, denied_as)

    async def _login_and_retry(
        self, schema: str, cell: str, operation: str, attempt: Callable[[], Awaitable[T]],
        err: PermissionDenied | AuthenticationFailed, denied_as: Credentials,
    ) -> T:
        assert self.credential_provider is not None
        if self.sessions.credentials is not denied_as:  # another call switched meanwhile: try that first
            try:
                return await attempt()
            except (PermissionDenied, AuthenticationFailed) as exc:
                err = exc
        failed = False
        groups: tuple[str, ...] = ()
        message = "This action needs a login."  # a refused login: no group is known yet
        for n in range(1, MAX_ATTEMPTS + 1):
            if isinstance(err, PermissionDenied):  # else (a wrong password) the last denial still holds
                groups = tuple(str(g) for g in err.groups)
                message = requirement(groups)
            request = CredentialRequest(schema, cell, operation, self.user, groups, message, n, failed)
            creds = await ask(self.credential_provider, request)
            if creds is None:
                raise err
            previous, logins = self.sessions.credentials, self.sessions.logins
            self.use_credentials(creds)
            try:
                return await attempt()
            except LockedOut:  # too many failures: asking again would only count more of them
                self.use_credentials(previous)
                raise
            except AuthenticationFailed as exc:  # a wrong password: back to who we were, ask again
                self.use_credentials(previous)
                err, failed = exc, True
            except PermissionDenied as exc:  # logged in, still not allowed: keep them, ask again
                err, failed = exc, False
            except BaseException:  # a timeout, say: keep them only if a login proved them
                if self.sessions.logins == logins:
                    self.use_credentials(previous)
                raise
        raise err

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- connections ----------------------------------------------------------------------

    def _connection(self, endpoint: str) -> RpcConnection:
        if self.closed:
            raise Unavailable("the client is closed")
        conn = self._conns.get(endpoint)
        if conn is None or conn.closed:
            conn = self._conns[endpoint] = RpcConnection(endpoint)
        return conn

    # --- naming ---------------------------------------------------------------------------

    async def naming(self, *, timeout_s: float | None = None) -> Cache:
        """The client's live copy of the naming registry (joined on first use, within
        ``timeout_s``, by default the client's timeout)."""
        if self._naming is not None:
            return self._naming
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        if self._naming_lock is None:
            self._naming_lock = asyncio.Lock()
        try:
            async with asyncio.timeout(timeout):
                await self._naming_lock.acquire()
        except TimeoutError:
            raise CallTimeout(f"could not join {NAMING_SCHEMA} at {NAMING_CELL} within {timeout:.3g} s") from None
        try:
            if self._naming is None:
                cache = Cache(self._naming_binding, self)
                await cache._start(self._remaining(deadline))
                cache.on_change(self._registry_changed)
                self._naming = cache
        finally:
            self._naming_lock.release()
        return self._naming

    def _registry_changed(self, relation: str, old: Any, new: Any) -> None:
        if relation != "instances":
            return
        if new is None:  # deregistered: its connection has nobody left to talk to
            self._drop_connection(self._rpc(old))
            return
        binding = Binding(new.schema, new.cell, self._rpc(new), new.events, new.instance_id, new.protection)
        for joined in self._joined:
            b = joined.binding
            if (b.schema, b.cell) == (binding.schema, binding.cell) and (
                b.instance_id != binding.instance_id or b.rpc != binding.rpc or b.events != binding.events
            ):
                joined.rebind(binding)
            elif (b.schema, b.cell) == (binding.schema, binding.cell) and b.protection != binding.protection:
                joined.binding = binding  # the level changed: the next dump follows it
        if old is not None and self._rpc(old) != self._rpc(new):
            self._drop_connection(self._rpc(old))

    def _drop_connection(self, endpoint: str) -> None:
        if endpoint == self._naming_binding.rpc:
            return
        for joined in self._joined:
            if joined.binding.rpc == endpoint:
                return  # still someone's; it moves when that one rebinds
        stale = self._conns.pop(endpoint, None)
        if stale is not None:
            stale.close()

    async def find(
        self, cell: str, schema: str, *, wait_s: float = 0.0, timeout_s: float | None = None
    ) -> ServiceInfo:
        """Where ``schema`` runs at ``cell``. Waits up to ``wait_s`` for it to register.

        Raises NotFound if naming has never heard of it, Unavailable if it is planned but
        not running now, CallTimeout if naming cannot be joined within ``timeout_s``.
        """
        if (schema, cell) == (NAMING_SCHEMA, NAMING_CELL):
            b = self._naming_binding
            return ServiceInfo(schema, cell, "", b.rpc, b.events, b.instance_id, NAMING_LEVEL, 0, 0.0)
        row = await self._registration(cell, schema, wait_s, timeout_s)
        return ServiceInfo(row.schema, row.cell, row.host, row.rpc, row.events, row.instance_id, row.protection,
                           row.pid, row.started, getattr(row, "local", ""))

    def _rpc(self, row: Any) -> str:
        """Where calls to a registered instance go: for local credentials, its ipc endpoint
        on this host, found from the site file and checked to be the site account's
        (ubicore/localipc.py; never the registration's word); else its TCP endpoint."""
        if self._local and self._site_config is not None and bool(getattr(row, "local", None)):
            local = trusted_endpoint(self._site_config, row.schema, row.cell)
            if local is not None:
                return local
        rpc: str = row.rpc
        return rpc

    async def _registration(self, cell: str, schema: str, wait_s: float, timeout_s: float | None) -> Any:
        """Naming's row for (schema, cell), or the typed error saying why there is none."""
        naming = await self.naming(timeout_s=timeout_s)
        key = (schema, cell)
        if key not in naming.table("instances") and wait_s > 0:
            try:
                await naming.wait_for(lambda c: key in c.table("instances"), wait_s)
            except TimeoutError:
                pass
        row: Any = naming.table("instances").get(key)
        if row is None:
            if key in naming.table("services"):
                state = naming.table("services")[key]
                raise Unavailable(f"{schema} at {cell} is not running ({state.actual})")  # type: ignore[attr-defined]
            raise NotFound(f"no instance of {schema} at {cell}")
        floor = CORE_LEVELS.get(schema)
        if floor is not None and _RANK.get(row.protection, -1) < _RANK[floor]:
            row = row._replace(protection=floor)  # sealed, and the login authenticates the instance
        return row

    async def services(self) -> dict[str, list[dict[str, Any]]]:
        """Every registration and every administration state, as naming knows them."""
        naming = await self.naming()
        return {
            rel: [r._asdict() for r in naming.rows(rel)]  # type: ignore[attr-defined]
            for rel in ("instances", "services")
        }

    # --- operations -----------------------------------------------------------------------

    async def call(
        self, cell: str, schema: str, operation: str, /, *, timeout_s: float | None = None, **args: Any
    ) -> Any:
        """Call ``operation`` of (schema, cell) with keyword arguments; its result.

        Raises the typed error of the reply, CallTimeout after ``timeout_s``, NotFound or
        Unavailable when naming knows no running instance.
        """
        return await self.call_args(cell, schema, operation, args, timeout_s=timeout_s)

    async def call_args(
        self, cell: str, schema: str, operation: str, args: Mapping[str, Any], *, timeout_s: float | None = None
    ) -> Any:
        """:meth:`call` with the arguments as a mapping (names that clash with ours)."""
        timeout = self.timeout_s if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout
        row: Any = None
        if (schema, cell) == (NAMING_SCHEMA, NAMING_CELL):
            rpc, level = self._naming_binding.rpc, NAMING_LEVEL
        else:  # the endpoint and level are all a call needs: no ServiceInfo built per call
            row = await self._registration(cell, schema, 0.0, timeout)
            rpc, level = self._rpc(row), row.protection
        if self.credential_provider is None:
            return await self._call(rpc, schema, cell, level, operation, args, deadline)

        async def attempt() -> Any:
            nonlocal deadline
            if deadline <= time.monotonic():  # a person answered a prompt meanwhile
                deadline = time.monotonic() + timeout
            return await self._call(self._rpc(row) if row is not None else rpc, schema, cell, level, operation,
                                    args, deadline)

        return await self._with_login(schema, cell, operation, attempt)

    async def _call(
        self, rpc: str, schema: str, cell: str, level: str, operation: str, args: Mapping[str, Any], deadline: float
    ) -> Any:
        """One call, sealed where the level (or a session already held) says so. An
        instance that answers ``auth_required`` (a session expired, the instance restarted
        or raised its level) gets one new login and the call again."""
        conn = self._connection(rpc)
        sealed = needs_session(level, operation) or self.sessions.held(rpc, schema, cell)
        for attempt in (1, 2):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise CallTimeout(f"no time left to call {operation} on {schema} at {cell}")
            try:
                if not sealed:
                    return await conn.call(schema, cell, operation, args, remaining)
                session = self.sessions.current(rpc, schema, cell)  # the common case: no await
                if session is None:
                    session = await self.sessions.session(conn, schema, cell, remaining)
                    remaining = max(0.001, deadline - time.monotonic())
                return await conn.call(schema, cell, operation, args, remaining, session)
            except AuthenticationRequired:
                if attempt == 2:
                    raise
                self.sessions.drop(rpc, schema, cell)
                sealed = True
        raise AssertionError("unreachable")  # pragma: no cover

    # --- what caches need (cache.InstanceLink) --------------------------------------------

    async def call_binding(self, binding: Binding, operation: str, args: Mapping[str, Any], timeout_s: float) -> Any:
        return await self._call(binding.rpc, binding.schema, binding.cell, binding.protection, operation, args,
                                time.monotonic() + timeout_s)

    def channel_session(self, binding: Binding) -> ClientSession | None:
        return self.sessions.latest(binding.rpc, binding.schema, binding.cell)

    def session_expired(self, session: ClientSession) -> bool:
        return self.sessions.expired(session)

    async def describe(self, cell: str, schema: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """The running instance's ``get_group``: instance id, sequence, protection, epoch,
        endpoints and its schema description (relations, operations, parameter types)."""
        group: dict[str, Any] = await self.call_args(cell, schema, "get_group", {}, timeout_s=timeout_s)
        return group

    # --- following --------------------------------------------------------------------------

    async def login(self, cell: str, schema: str, *, timeout_s: float | None = None) -> str:
        """Log in to (schema, cell) now, if no live session is held, and return who the
        client is logged in as: a check of the client's credentials. Raises
        AuthenticationFailed (or CredentialsOutOfDate) when they are refused, and
        AuthenticationFailed too when the instance is open (it takes no logins)."""
        deadline = self._deadline(timeout_s)
        if (schema, cell) == (NAMING_SCHEMA, NAMING_CELL):
            rpc, level = self._naming_binding.rpc, NAMING_LEVEL
        else:
            row = await self._registration(cell, schema, 0.0, self._remaining(deadline))
            rpc, level = self._rpc(row), row.protection
        if level == "open":
            raise AuthenticationFailed(f"{schema} at {cell} is open: it takes no logins")
        if self.sessions.current(rpc, schema, cell) is None:
            await self.sessions.session(self._connection(rpc), schema, cell, self._remaining(deadline))
        return self.user

    async def cache(self, cell: str, schema: str, *, timeout_s: float | None = None) -> Cache:
        """Join (schema, cell) and keep a live local copy of its relations."""
        async def attempt() -> Cache:
            deadline = self._deadline(timeout_s)
            info = await self.find(cell, schema, timeout_s=self._remaining(deadline))
            cache = Cache(info.binding(self._rpc(info)), self)
            await self._track(cache, self._remaining(deadline))
            return cache

        return await self._with_login(schema, cell, "get_dump", attempt)

    async def follow(
        self,
        cell: str,
        schema: str,
        on_batch: Callable[[Batch], None],
        *,
        on_dump: Callable[[Mapping[str, list[list[Any]]]], None] | None = None,
        timeout_s: float | None = None,
    ) -> Follower:
        """Receive delta batches of (schema, cell) without caching them."""
        async def attempt() -> Follower:
            deadline = self._deadline(timeout_s)
            info = await self.find(cell, schema, timeout_s=self._remaining(deadline))
            follower = Follower(info.binding(self._rpc(info)), self, on_batch, on_dump)
            await self._track(follower, self._remaining(deadline))
            return follower

        return await self._with_login(schema, cell, "get_dump", attempt)

    def _deadline(self, timeout_s: float | None) -> float:
        return time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)

    @staticmethod
    def _remaining(deadline: float) -> float:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise CallTimeout("no time left before the deadline")
        return remaining

    async def _track(self, joined: _Joined, timeout_s: float) -> None:
        self._joined.append(joined)
        joined._on_close = lambda: self._forget(joined)
        try:
            await joined._start(timeout_s)
        except BaseException:
            self._forget(joined)
            raise

    def _forget(self, joined: _Joined) -> None:
        if joined in self._joined:
            self._joined.remove(joined)

    async def close(self) -> None:
        """Close every cache, follower and connection this client made."""
        if self.closed:
            return
        for joined in list(self._joined):
            await joined.close()
        self._joined.clear()
        if self._naming is not None:
            await self._naming.close()
        self.closed = True
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
