"""Running requests against one instance, sans-IO.

:class:`InstanceCore` holds a schema object, its store and the channel sequencer. It is
given request frames and answers with reply frames; commits leave change batches in the
sequencer for the I/O layer to publish. Nothing here touches a socket, so the tests drive
it directly and fuzz it with arbitrary frames.

Every request ends in exactly one reply: a result, or a typed error (DESIGN.md §4). An
operation that raises rolls its transaction back and answers ``remote_failure`` with the
exception's message only; the traceback stays in the instance's log. Frames that are not
a request are counted in ``stats.malformed`` and answered with ``protocol_error`` when a
correlation id can be read, else dropped.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .config.model import SecurityConfig
from .errors import (
    AuthenticationFailed,
    BadArguments,
    ConstraintViolation,
    DecryptionFailed,
    NotFound,
    PermissionDenied,
    ProtocolError,
    RemoteError,
    RemoteFailure,
    RemoteProtocolError,
    StoreError,
)
from .protocol.channel import ChannelSequencer
from .protocol.codec import (
    MAX_FRAME_BYTES,
    encode_error,
    encode_reply_packed,
    pack,
    parse_client_message,
    unpack,
)
from .protocol.messages import INSTANCE_ID_BYTES, MAGIC, Change, Request, Sealed
from .schema import (
    INT64_MAX,
    INT64_MIN,
    OperationSpec,
    OpKind,
    Param,
    Protection,
    Schema,
)
from .security.guard import AUTH_OPERATIONS, AuditHook, SessionGuard, no_audit
from .security.policy import DEFAULT_USER, SecurityPolicy, StaticPolicy
from .security.session import ServerSession
from .store import Store, Transaction

log = logging.getLogger(__name__)

MAX_RESULT_BYTES = MAX_FRAME_BYTES - 64
"""A packed result must leave room for the reply's array header and correlation id."""

_TYPE_CHECKS: Mapping[str, Callable[[Any], bool]] = {
    "str": lambda v: type(v) is str,
    "int": lambda v: type(v) is int and INT64_MIN <= v <= INT64_MAX,
    "float": lambda v: type(v) in (float, int),
    "bool": lambda v: type(v) is bool,
    "bytes": lambda v: type(v) is bytes,
    "list": lambda v: type(v) is list,
    "map": lambda v: type(v) is dict,
    "any": lambda v: True,
}


@dataclass(slots=True)
class InstanceStats:
    """What an instance counts; served by ``get_stats``."""

    requests: int = 0
    errors: int = 0
    malformed: int = 0
    commits: int = 0
    changes: int = 0
    deltas_sent: int = 0
    rejected: int = 0


def check_arguments(spec: OperationSpec, args: Mapping[str, Any]) -> dict[str, Any]:
    """The arguments, validated against the declaration; else :class:`BadArguments`."""
    known = {p.name: p for p in spec.params}
    unknown = sorted(str(k) for k in args if k not in known)  # msgpack keys may be bytes
    if unknown:
        raise BadArguments(f"{spec.name}: unknown argument {unknown[0]!r}", {"argument": unknown[0]})
    out: dict[str, Any] = {}
    for p in spec.params:
        if p.name not in args:
            if p.required:
                raise BadArguments(f"{spec.name}: missing argument {p.name!r}", {"argument": p.name})
            continue
        out[p.name] = _check_param(spec, p, args[p.name])
    return out


def _check_param(spec: OperationSpec, p: Param, value: Any) -> Any:
    if value is None and p.nullable:
        return None
    if not _TYPE_CHECKS[p.type_name](value):
        raise BadArguments(
            f"{spec.name}: argument {p.name!r} must be {p.type_name}, got {type(value).__name__}",
            {"argument": p.name, "expected": p.type_name},
        )
    if p.type_name == "float" and type(value) is int:
        return float(value)
    return value


class InstanceCore:
    """One running instance of a schema in a cell (see module docstring)."""

    def __init__(
        self,
        schema: type[Schema],
        cell: str,
        store: Store,
        *,
        options: Mapping[str, Any] | None = None,
        protection: Protection | None = None,
        instance_id: bytes | None = None,
        on_commit: Callable[[], None] | None = None,
        policy: SecurityPolicy | None = None,
        security: SecurityConfig = SecurityConfig(),
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.schema = schema
        self.cell = cell
        self.store = store
        self.obj = schema(cell, options)
        self.instance_id = instance_id or os.urandom(INSTANCE_ID_BYTES)
        self.policy: SecurityPolicy = policy or StaticPolicy("")
        self.configured_protection = protection or schema.default_protection
        level = self.policy.level(schema.schema_name) or self.configured_protection
        self.guard = SessionGuard(schema.schema_name, cell, self.instance_id, level, self.policy,
                                  settings=security, clock=clock)
        self.sequencer = ChannelSequencer(self.instance_id)
        self.stats = InstanceStats()
        self.started = time.time()
        self.endpoints: dict[str, str] = {}
        self._on_commit = on_commit or (lambda: None)
        self.audit: AuditHook = no_audit
        self.update_action = "policy" if schema.schema_name.startswith("UPerm::") else "update"
        """How the trail names this schema's update operations: changes of the security model
        are ``policy``; the core sets ``register`` for naming's and "" for the trail's own
        appends (recorded: none)."""

    def use_audit(self, hook: AuditHook) -> None:
        """Report logins, denials, update operations, rejected messages and key rotations
        to ``hook`` (ubicore/audit/trail.py)."""
        self.audit = hook
        self.guard.audit = hook

    @property
    def name(self) -> str:
        return self.schema.schema_name

    @property
    def protection(self) -> Protection:
        """The level the instance runs at now (it can change while it runs)."""
        return self.guard.level

    @property
    def epoch(self) -> int:
        return self.guard.epoch

    # --- requests ------------------------------------------------------------------------

    def handle(
        self, frames: list[bytes], peer: bytes = b"", uid: int | None = None, address: str = ""
    ) -> list[bytes] | None:
        """Answer one request's frames with reply frames (None: dropped). ``peer`` names
        the connection it came on (the ROUTER identity), for the login caps; ``uid`` is
        the kernel's word on who is at the other end of an ipc connection (local logins);
        ``address`` is the client's network address, for the audit trail and lockouts."""
        try:
            msg = parse_client_message(frames)
        except ProtocolError as exc:
            self.stats.malformed += 1
            log.debug("%s@%s: malformed request dropped: %s", self.name, self.cell, exc)
            self.audit("rejected", "refused", DEFAULT_USER, address, f"a malformed request: {exc}")
            corr = _salvage_corr_id(frames)
            if corr is None:
                return None
            return encode_error(corr, RemoteProtocolError.code, str(exc), {})
        if type(msg) is Sealed:
            return self._handle_sealed(msg, address)
        assert isinstance(msg, Request)
        self.stats.requests += 1
        try:
            if msg.operation in AUTH_OPERATIONS:
                return encode_reply_packed(msg.corr_id, self._login(msg, peer, uid, address))
            return encode_reply_packed(msg.corr_id, self.execute(msg, None, address))
        except RemoteError as err:
            return self._error(msg, err)

    def _handle_sealed(self, msg: Sealed, address: str = "") -> list[bytes] | None:
        try:
            session, req = self.guard.open(msg)
        except DecryptionFailed:
            self.stats.rejected += 1
            log.debug("%s@%s: a sealed request did not open; dropped", self.name, self.cell)
            self.audit("rejected", "refused", DEFAULT_USER, address,
                       "a sealed request did not open (tampered, replayed or foreign)")
            return None
        except RemoteError as err:  # no session: answered in the clear
            self.stats.errors += 1
            return encode_error(msg.corr_id, err.code, err.message, err.detail)
        self.stats.requests += 1
        try:
            if req.operation in AUTH_OPERATIONS:
                raise BadArguments(f"{req.operation} is not sent inside a session")
            reply = encode_reply_packed(req.corr_id, self.execute(req, session, address))
        except RemoteError as err:
            reply = self._error(req, err)
        return self.guard.seal_reply(session, reply, req.corr_id)

    def _error(self, req: Request, err: RemoteError) -> list[bytes]:
        self.stats.errors += 1
        log.debug("%s@%s: %s -> %s: %s", self.name, self.cell, req.operation, err.code, err.message)
        try:
            detail = {str(k): v for k, v in err.detail.items()}  # receivers take string keys only
            return encode_error(req.corr_id, err.code, str(err.message), detail)
        except ValueError:  # a detail that cannot travel: send the rest
            return encode_error(req.corr_id, err.code, str(err.message), {})

    def _login(self, req: Request, peer: bytes, uid: int | None = None, address: str = "") -> bytes:
        if req.schema != self.name or req.cell != self.cell:
            raise NotFound(f"this endpoint serves {self.name} at {self.cell}, not {req.schema} at {req.cell}")
        if req.operation == "auth_hello":
            return pack(self.guard.hello(peer, req.args, address))
        if req.operation == "auth_local":
            if uid is None:
                raise BadArguments("auth_local is answered only on the instance's ipc endpoint", {"argument": "operation"})
            return pack(self.guard.local_login(peer, uid, req.args))
        try:
            return pack(self.guard.confirm(peer, req.args))
        except AuthenticationFailed:
            log.info("%s@%s: a login failed", self.name, self.cell)
            raise

    def execute(self, req: Request, session: ServerSession | None = None, address: str = "") -> bytes:
        """Run a request; its result, packed. Raises the typed error to answer with. Denials
        and update operations (done or failed) are audited."""
        if req.schema != self.name or req.cell != self.cell:
            raise NotFound(f"this endpoint serves {self.name} at {self.cell}, not {req.schema} at {req.cell}")
        spec = self.schema.operations.get(req.operation)
        updating = spec is not None and spec.kind is OpKind.UPDATE
        try:
            self.guard.admit(session, req.operation, updating)
        except PermissionDenied as err:
            self.audit("denied", "denied", session.user if session is not None else DEFAULT_USER, address,
                       f"{req.operation}: {err.message}")
            raise
        match req.operation:
            # Built-in results are ours (string keys throughout): no key check, which
            # for a dump would mean unpacking megabytes again.
            case "get_dump":
                return pack_result(self.dump(), check_keys=False)
            case "get_group":
                return pack_result(self.group(), check_keys=False)
            case "get_stats":
                return pack_result({**asdict(self.stats), "security": asdict(self.guard.stats)}, check_keys=False)
            case "get_keys":
                return pack_result(self.guard.group_keys_for(session), check_keys=False)
        if spec is None:
            raise NotFound(f"{self.name} has no operation {req.operation!r}")
        args = check_arguments(spec, req.args)
        principal = session.user if session is not None else DEFAULT_USER
        self.obj.caller = principal
        if not updating or not self.update_action:
            return self.run_operation(spec, args)
        try:
            body = self.run_operation(spec, args)
        except PermissionDenied as err:  # the operation's own refusal (naming's registrations)
            self.audit("denied", "denied", principal, address, f"{spec.name}: {err.message}")
            raise
        except RemoteError as err:
            self.audit(self.update_action, "failed", principal, address, f"{spec.name}: {err.code}: {err.message}")
            raise
        self.audit(self.update_action, "ok", principal, address, self.describe_update(spec.name, args))
        return body

    def describe_update(self, operation: str, args: Mapping[str, Any]) -> str:
        """The audit detail of an update operation: its name, and for the security model
        its arguments (never bytes: salts and verifiers stay out of the trail)."""
        if self.update_action != "policy":
            return operation
        shown = ", ".join(f"{k}={v!r}" for k, v in args.items() if not isinstance(v, (bytes, bytearray)))
        return f"{operation}({shown})"

    def run_operation(self, spec: OperationSpec, args: Mapping[str, Any]) -> bytes:
        """Run a declared operation in a transaction; its result, packed."""
        tx = self.store.transaction(writable=spec.kind is OpKind.UPDATE)
        try:
            result = spec.func(self.obj, tx, **args)
        except RemoteError:
            tx.rollback()
            raise
        except ConstraintViolation as exc:
            tx.rollback()
            raise RemoteFailure(str(exc)) from None
        except Exception as exc:
            tx.rollback()
            log.exception("%s@%s: operation %s raised", self.name, self.cell, spec.name)
            raise RemoteFailure(f"{spec.name} failed: {type(exc).__name__}: {exc}") from None
        try:  # a result that cannot travel fails before anything commits
            body = pack_result(result)
        except RemoteFailure as exc:
            tx.rollback()
            raise RemoteFailure(f"{spec.name} failed: {exc.message}") from None
        self.commit(tx)
        return body

    def commit(self, tx: Transaction) -> tuple[Change, ...]:
        """Commit a transaction and stage its changes for the channel."""
        try:
            changes = tx.commit()
        except StoreError as exc:
            log.error("%s@%s: %s", self.name, self.cell, exc)
            raise RemoteFailure("the instance could not store the change") from None
        if changes:
            self.sequencer.commit(changes)
            self.stats.commits += 1
            self.stats.changes += len(changes)
            self._on_commit()
        return changes

    # --- built-in operations ------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        return {"instance_id": self.instance_id, "seq": self.sequencer.seq, "relations": self.store.snapshot()}

    def group(self) -> dict[str, Any]:
        return {
            "instance_id": self.instance_id,
            "seq": self.sequencer.seq,
            "protection": self.protection.value,
            "epoch": self.epoch,
            "rpc": self.endpoints.get("rpc", ""),
            "events": self.endpoints.get("events", ""),
            "schema": self.schema.describe(),
        }


_SCALARS = frozenset({type(None), bool, int, float, str, bytes})


def pack_result(result: Any, *, check_keys: bool = True) -> bytes:
    """A result packed for a reply, or RemoteFailure saying why it cannot travel: too
    large, not msgpack-able, or (``check_keys``) holding a map key a caller would refuse."""
    try:
        body = pack(result)
    except ValueError as exc:
        raise RemoteFailure(f"its result {exc}") from None
    if len(body) > MAX_RESULT_BYTES:
        raise RemoteFailure(f"its result is {len(body)} bytes, over {MAX_RESULT_BYTES}")
    if check_keys and type(result) not in _SCALARS:  # only containers hold map keys
        try:
            unpack(body)
        except ProtocolError:
            raise RemoteFailure("its result cannot travel (map keys must be strings)") from None
    return body


def _salvage_corr_id(frames: list[bytes]) -> int | None:
    """The correlation id of a request too broken to run, if it can be read.

    The header's version and kind are not required to be right: a peer speaking another
    protocol version is told so (``protocol_error``) instead of waiting for a timeout.
    """
    if len(frames) != 2 or len(frames[0]) != 4 or bytes(frames[0][:2]) != MAGIC:
        return None
    try:
        body = unpack(bytes(frames[1]))
    except ProtocolError:
        return None
    if isinstance(body, list) and body and type(body[0]) is int and 0 <= body[0] < 2**64:
        return body[0]
    return None
