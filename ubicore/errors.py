"""The error tree: everything ubicore raises on purpose.

::

    UbiError                       root: catch this to catch everything ubicore means to raise
    ├── ConfigError                a site file is wrong; names the file and the key path
    ├── SchemaError                a schema declaration is wrong; names the schema and member
    ├── CredentialsError           cached service credentials are missing, unsafe, damaged or out of date
    ├── ProtocolError              bytes that are not a valid ubicore message
    ├── StoreError                 the embedded database failed or holds foreign data
    ├── ConstraintViolation        an operation broke a relation's key or column rules
    ├── DecryptionFailed           a sealed message did not open (tampered, replayed, wrong key)
    └── RemoteError                an operation call failed; ``code`` is its wire code
        ├── NotFound               no such schema, cell or operation
        ├── BadArguments           arguments missing, unknown or of the wrong type
        ├── AuthenticationRequired the action needs a session and there is none
        ├── AuthenticationFailed   the credentials were refused
        │   └── LockedOut          too many failed logins: the user or address waits ``retry_after_s``
        ├── PermissionDenied       the principal lacks the right; ``groups`` would allow it
        ├── Unavailable            the instance is not running or not reachable
        ├── CallTimeout            no reply before the deadline (also a ``TimeoutError``)
        ├── RemoteFailure          the operation raised; ``message`` is all that crosses
        └── RemoteProtocolError    the peer could not parse what we sent

Foreign exceptions (zmq, msgpack, sqlite3, yaml) are translated where they arise.
API misuse by a caller stays ``TypeError`` / ``ValueError``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

__all__ = [
    "AuthenticationFailed",
    "AuthenticationRequired",
    "BadArguments",
    "CallTimeout",
    "ConfigError",
    "ConstraintViolation",
    "CredentialsError",
    "DecryptionFailed",
    "LockedOut",
    "NotFound",
    "PermissionDenied",
    "ProtocolError",
    "RemoteError",
    "RemoteFailure",
    "RemoteProtocolError",
    "SchemaError",
    "StoreError",
    "UbiError",
    "Unavailable",
    "remote_error_from_wire",
]


class UbiError(Exception):
    """Root of every error ubicore raises on purpose."""


class ConfigError(UbiError):
    """Raised when a site file cannot be used. Fix the file at ``key_path``.

    ``str(err)`` reads ``cells/demo.yaml: hosts.host-b.address: <problem>``.
    """

    def __init__(self, file: str, key_path: str, problem: str) -> None:
        self.file = file
        self.key_path = key_path
        self.problem = problem
        where = f"{file}: {key_path}" if key_path else file
        super().__init__(f"{where}: {problem}")


class SchemaError(UbiError):
    """Raised at import when a schema declaration is wrong. Fix the named member."""


class CredentialsError(UbiError):
    """Raised when a process's service credentials cannot be used (ubicore/credentials:
    missing, unsafe, damaged, or out of date for the site). The message is one line that
    names the file or the tool that fixes it, and never holds a secret."""


class ProtocolError(UbiError):
    """Raised when bytes received are not a valid ubicore message.

    Receivers drop the message, count it and keep serving; the text says what was wrong
    and never echoes secret material.
    """


class StoreError(UbiError):
    """Raised when an instance's embedded database fails or holds data of another shape."""


class ConstraintViolation(UbiError):
    """Raised inside an operation that inserts a duplicate key, updates a missing row or
    gives a column a value of the wrong type. The transaction is rolled back."""


class DecryptionFailed(UbiError):
    """Raised when a sealed message does not open: tampered, truncated, replayed, stale,
    or sealed under a key this side does not hold. Receivers drop it and count it; the
    text never says which check failed."""

    def __init__(self, message: str = "decryption failed") -> None:
        super().__init__(message)


class RemoteError(UbiError):
    """An operation call failed. ``code`` is the wire code; ``message`` is for people."""

    code: ClassVar[str] = "remote_failure"

    def __init__(self, message: str = "", detail: Mapping[str, Any] | None = None) -> None:
        if not message:
            message = (type(self).__doc__ or "remote error").split(".")[0]
        self.message = message
        self.detail: dict[str, Any] = dict(detail or {})
        super().__init__(self.message)

    def to_wire(self) -> dict[str, Any]:
        """The error as it travels in a reply body (docs/protocol.md, Errors)."""
        return {"code": self.code, "message": self.message, "detail": self.detail}


class NotFound(RemoteError):
    """No such schema, cell or operation. Check the names with ``ubi services``."""

    code = "not_found"


class BadArguments(RemoteError):
    """The arguments were missing, unknown or of the wrong type. Fix the call."""

    code = "bad_arguments"


class AuthenticationRequired(RemoteError):
    """The action needs an authenticated session. Log in and retry."""

    code = "auth_required"


class AuthenticationFailed(RemoteError):
    """The credentials were refused. Check the user name and password."""

    code = "auth_failed"


class LockedOut(AuthenticationFailed):
    """Too many failed logins locked the user or the client's address out (DESIGN.md §8).
    Retry after ``retry_after_s`` seconds, or ask an operator to clear the lockout
    (``ubi security lockouts clear``)."""

    code = "locked_out"

    @property
    def retry_after_s(self) -> float:
        value = self.detail.get("retry_after_s")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


class PermissionDenied(RemoteError):
    """The principal lacks the right. ``groups`` lists descriptions of groups that would allow it."""

    code = "permission_denied"

    @property
    def groups(self) -> Sequence[str]:
        """Descriptions of the groups that would allow the action (empty if unknown)."""
        groups = self.detail.get("groups")
        if not isinstance(groups, (list, tuple)):
            return ()
        return tuple(g for g in groups if isinstance(g, str))


class Unavailable(RemoteError):
    """The instance is not running or not reachable. Retry later or check the controller."""

    code = "unavailable"


class CallTimeout(RemoteError, TimeoutError):
    """No reply came before the deadline. The operation may or may not have run."""

    code = "timeout"


class RemoteFailure(RemoteError):
    """The operation raised. Only its message crosses the wire, never a traceback."""

    code = "remote_failure"


class RemoteProtocolError(RemoteError):
    """The peer could not parse what we sent: a version or codec mismatch."""

    code = "protocol_error"


_BY_CODE: dict[str, type[RemoteError]] = {
    cls.code: cls
    for cls in (
        NotFound,
        BadArguments,
        AuthenticationRequired,
        AuthenticationFailed,
        LockedOut,
        PermissionDenied,
        Unavailable,
        CallTimeout,
        RemoteFailure,
        RemoteProtocolError,
    )
}


def remote_error_from_wire(code: str, message: str, detail: Mapping[str, Any]) -> RemoteError:
    """Rebuild the typed error from a reply; an unknown code becomes ``RemoteFailure``."""
    cls = _BY_CODE.get(code, RemoteFailure)
    return cls(message, detail)
