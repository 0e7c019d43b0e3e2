"""Where the security decisions come from: the policy interface and its interim store.

An instance asks a :class:`SecurityPolicy` three things: a user's verifier record (for
the key exchange), a principal's right on (schema, cell), and the level a schema must run
at. The security-model issue plugs ``UPerm::Config`` in behind the same interface; until
then :class:`FileSecurityStore` keeps users and schema levels in one JSON file in the
core's dataset (``<dataset>/security/policy.json``), written atomically by the
``ubi security`` commands and re-read by every instance when it changes.

In this interim store each user carries one right for the whole site (``none``, ``read``
or ``update``). The user ``default`` (empty password) is what anonymous clients log in
as; a new store holds it with ``read``, and removing it turns anonymous access off.
"""

from __future__ import annotations

import contextlib
import enum
import fcntl
import json
import os
import re
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import ConfigError
from ..schema import Protection
from .amp import VerifierRecord, make_verifier
from .primitives import DEFAULT_KDF, KdfParams, Secret

DEFAULT_USER = "default"
POLICY_FILE = "policy.json"
SECRET_FILE = "server.key"
SECRET_BYTES = 32
_USER_RE = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


class Right(enum.IntEnum):
    """What a principal may do; ordered none < read < update."""

    NONE = 0
    READ = 1
    UPDATE = 2

    @property
    def label(self) -> str:
        return self.name.lower()


class SecurityPolicy(Protocol):
    """What an instance needs to decide (see the module docstring)."""

    site: str
    server_secret: Secret
    fake_params: KdfParams

    def verifier(self, user: str) -> VerifierRecord | None: ...

    def right(self, user: str, schema: str, cell: str) -> Right: ...

    def granting_groups(self, schema: str, cell: str, right: Right) -> list[str]: ...

    def level(self, schema: str) -> Protection | None: ...

    def refresh(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class UserEntry:
    record: VerifierRecord
    right: Right
    enabled: bool = True


def check_user_name(name: str) -> str:
    if not _USER_RE.fullmatch(name):
        raise ValueError(f"user name {name!r}: use 1-64 of A-Z a-z 0-9 _ . @ -")
    return name


class FileSecurityStore:
    """The interim policy: users and schema levels in ``<dataset>/security/``."""

    def __init__(self, dataset: str | os.PathLike[str], site: str, *, kdf: KdfParams | None = None) -> None:
        """``kdf``: the Argon2id costs for new verifiers when the store is created (later,
        the costs the store records are used)."""
        self.dir = Path(dataset) / "security"
        self.path = self.dir / POLICY_FILE
        self.site = site
        self.kdf = kdf or DEFAULT_KDF
        self.fake_params = self.kdf
        self._users: dict[str, UserEntry] = {}
        self._levels: dict[str, Protection] = {}
        self._stamp: tuple[int, int, int, int] | None = None
        self.server_secret = Secret(b"")
        self.refresh()

    def __repr__(self) -> str:
        return f"<FileSecurityStore {self.path} users={len(self._users)}>"

    # --- reading ------------------------------------------------------------------------------

    @property
    def exists(self) -> bool:
        return self.path.exists()

    def refresh(self) -> bool:
        """Re-read the file if it changed since the last read; True if it did."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino, st.st_mode)
        except FileNotFoundError:
            stamp = None
        if stamp == self._stamp and self.server_secret.value:
            return False
        self._stamp = stamp
        self.server_secret = self._load_secret()
        if stamp is None:
            changed = bool(self._users or self._levels)
            self._users, self._levels = {}, {}
            return changed
        if st.st_mode & 0o022:
            raise ConfigError(str(self.path), "", "the security store is writable by others; "
                                                  f"fix it with: chmod go-w {self.path}")
        doc = self._read()
        users, levels = self._parse(doc)
        kdf = doc.get("kdf") if isinstance(doc, dict) else None
        if isinstance(kdf, dict):
            try:
                self.kdf = KdfParams(int(kdf["t"]), int(kdf["p"]), int(kdf["m_kib"])).check()
            except (KeyError, TypeError, ValueError):
                raise ConfigError(str(self.path), "kdf", "malformed Argon2id costs") from None
            self.fake_params = self.kdf
        changed = users != self._users or levels != self._levels
        self._users, self._levels = users, levels
        return changed

    def _read(self) -> Any:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(str(self.path), "", f"cannot read the security store: {exc}") from None

    def _parse(self, doc: Any) -> tuple[dict[str, UserEntry], dict[str, Protection]]:
        file = str(self.path)
        if not isinstance(doc, dict) or doc.get("version") != 1:
            raise ConfigError(file, "version", "expected a version 1 security store")
        users: dict[str, UserEntry] = {}
        for name, u in (doc.get("users") or {}).items():
            path = f"users.{name}"
            try:
                p = u["params"]
                params = KdfParams(int(p["t"]), int(p["p"]), int(p["m_kib"])).check()
                rec = VerifierRecord(name, bytes.fromhex(u["salt"]), params, bytes.fromhex(u["verifier"]))
                users[name] = UserEntry(rec, Right[str(u["right"]).upper()], bool(u.get("enabled", True)))
            except (KeyError, TypeError, ValueError) as exc:
                raise ConfigError(file, path, f"malformed user record ({type(exc).__name__})") from None
        levels: dict[str, Protection] = {}
        for schema, level in (doc.get("schemas") or {}).items():
            try:
                levels[schema] = Protection(level)
            except ValueError:
                raise ConfigError(file, f"schemas.{schema}", f"unknown protection level {level!r}") from None
        return users, levels

    def _load_secret(self) -> Secret:
        path = self.dir / SECRET_FILE
        try:
            raw = path.read_bytes()
        except FileNotFoundError:
            raw = b""
        except OSError as exc:
            raise ConfigError(str(path), "", f"cannot read the server secret: {exc.strerror}") from None
        if len(raw) != SECRET_BYTES:
            # No store yet: an instance still answers unknown users with fake records,
            # stable for its own life.
            return Secret(os.urandom(SECRET_BYTES))
        return Secret(raw)

    def verifier(self, user: str) -> VerifierRecord | None:
        entry = self._users.get(user)
        return entry.record if entry is not None and entry.enabled else None

    def right(self, user: str, schema: str, cell: str) -> Right:
        entry = self._users.get(user)
        return entry.right if entry is not None and entry.enabled else Right.NONE

    def granting_groups(self, schema: str, cell: str, right: Right) -> list[str]:
        return []  # the interim store has no groups

    def level(self, schema: str) -> Protection | None:
        return self._levels.get(schema)

    def users(self) -> Mapping[str, UserEntry]:
        return dict(self._users)

    def levels(self) -> Mapping[str, Protection]:
        return dict(self._levels)

    # --- writing (the ``ubi security`` commands) ------------------------------------------------

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, Any]]:
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            secret = self.dir / SECRET_FILE
            if not secret.exists():
                _write_atomic(secret, os.urandom(SECRET_BYTES))
            doc: dict[str, Any]
            if self.path.exists():
                doc = self._read()
            else:
                doc = {"version": 1, "site": self.site, "users": {}, "schemas": {},
                       "kdf": {"t": self.kdf.t, "p": self.kdf.p, "m_kib": self.kdf.m_kib}}
                doc["users"][DEFAULT_USER] = self._user_doc(make_verifier(DEFAULT_USER, self.site, "", self.kdf), Right.READ)
            yield doc
            _write_atomic(self.path, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        self._stamp = None
        self.refresh()

    @staticmethod
    def _user_doc(rec: VerifierRecord, right: Right, enabled: bool = True) -> dict[str, Any]:
        return {
            "salt": rec.salt.hex(), "verifier": rec.verifier.hex(), "right": right.label, "enabled": enabled,
            "params": {"t": rec.params.t, "p": rec.params.p, "m_kib": rec.params.m_kib},
        }

    def init(self) -> bool:
        """Create the store (with ``default``) if there is none; True if it was created."""
        if self.path.exists():
            return False
        with self._editing():
            pass
        return True

    def set_user(self, name: str, password: str, right: Right, *, create: bool = True) -> None:
        """Add a user, or give an existing one a new password (and right)."""
        check_user_name(name)
        rec = make_verifier(name, self.site, password, self.kdf)
        with self._editing() as doc:
            if not create and name not in doc["users"]:
                raise KeyError(name)
            doc["users"][name] = self._user_doc(rec, right)

    def set_right(self, name: str, right: Right) -> None:
        with self._editing() as doc:
            doc["users"][name]["right"] = right.label

    def set_enabled(self, name: str, enabled: bool) -> None:
        with self._editing() as doc:
            doc["users"][name]["enabled"] = enabled

    def remove_user(self, name: str) -> None:
        with self._editing() as doc:
            del doc["users"][name]

    def set_level(self, schema: str, level: Protection | None) -> None:
        with self._editing() as doc:
            if level is None:
                doc["schemas"].pop(schema, None)
            else:
                doc["schemas"][schema] = level.value


def _write_atomic(path: Path, data: bytes) -> None:
    """Temporary file, fsync, rename; mode 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class StaticPolicy:
    """An in-memory policy: for tests, embedded sites, and instances with no store.

    ``users`` maps a name to (record, right); ``levels`` maps schema → level.
    """

    def __init__(
        self,
        site: str,
        users: Mapping[str, tuple[VerifierRecord, Right]] | None = None,
        levels: Mapping[str, Protection] | None = None,
        *,
        server_secret: Secret | None = None,
        fake_params: KdfParams = DEFAULT_KDF,
        groups: Mapping[Right, list[str]] | None = None,
    ) -> None:
        self.site = site
        self.users: dict[str, tuple[VerifierRecord, Right]] = dict(users or {})
        self.levels: dict[str, Protection] = dict(levels or {})
        self.server_secret = server_secret or Secret(os.urandom(SECRET_BYTES))
        self.fake_params = fake_params
        self.groups = dict(groups or {})
        self._changed = False

    def __repr__(self) -> str:
        return f"<StaticPolicy site={self.site!r} users={sorted(self.users)}>"

    def add_user(self, name: str, password: str, right: Right, *, kdf: KdfParams | None = None) -> None:
        self.users[name] = (make_verifier(name, self.site, password, kdf or self.fake_params), right)
        self._changed = True

    def set_right(self, name: str, right: Right) -> None:
        self.users[name] = (self.users[name][0], right)
        self._changed = True

    def remove_user(self, name: str) -> None:
        self.users.pop(name, None)
        self._changed = True

    def set_level(self, schema: str, level: Protection | None) -> None:
        if level is None:
            self.levels.pop(schema, None)
        else:
            self.levels[schema] = level
        self._changed = True

    def verifier(self, user: str) -> VerifierRecord | None:
        entry = self.users.get(user)
        return entry[0] if entry else None

    def right(self, user: str, schema: str, cell: str) -> Right:
        entry = self.users.get(user)
        return entry[1] if entry else Right.NONE

    def granting_groups(self, schema: str, cell: str, right: Right) -> list[str]:
        return list(self.groups.get(right, []))

    def level(self, schema: str) -> Protection | None:
        return self.levels.get(schema)

    def refresh(self) -> bool:
        changed, self._changed = self._changed, False
        return changed
