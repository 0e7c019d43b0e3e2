"""The files kept apart from the trail: the audit key file and the checkpoint file.

The audit key file
------------------

Holds the MAC key that proves a record was written by the trail's writer, and the seed
of the Ed25519 key that signs checkpoints. It is the owner's alone: mode 0600 (or
stricter), owned by this account or root, never a symlink. Its bytes, 105 in all:

=======  =====  ============================================================
offset   size   contents
=======  =====  ============================================================
0        8      magic ``b"UBIAUDK\\n"``
8        1      version, 1
9        32     MAC key (HMAC-SHA256 over each record's hash)
41       32     Ed25519 signing seed (checkpoints)
73       32     SHA-256 of bytes 0–72 (catches a damaged file)
=======  =====  ============================================================

:func:`create_keys` writes it atomically (a 0600 temp file beside it, fsync, then moved
into place without overwriting anything, then the directory fsynced) and never replaces
an existing key file: losing the key loses the proof of every record MACed under it.

The checkpoint file
-------------------

An append-only text file, one JSON object per line, each line ending in ``\\n``::

    {"seq": 120, "time": 1714557600.25, "hash": "<64 hex digits>", "signature": "<128 hex digits>"}

``time`` is written as the shortest decimal that reads back as the same double (Python's
``repr``), so the signed bytes are recovered exactly. :func:`append_checkpoint` writes
one line with one ``write`` under an exclusive lock and fsyncs; a crash can leave only
an unterminated last line, which :func:`read_checkpoints` ignores and the next append
cuts away. Any other malformed line is an :class:`~ubicore.audit.chain.AuditError`
naming the line. Checkpoints carry their own signatures, so the file needs no secrecy;
it needs keeping where the trail's writer cannot edit it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import pwd
import re
import stat
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey, VerifyKey

from ..security.primitives import Rng, Secret, sha256
from .chain import (
    HASH_BYTES,
    MAX_SEQ,
    SIGNATURE_BYTES,
    AuditError,
    AuditKeyError,
    Checkpoint,
)

__all__ = [
    "KEY_FILE_BYTES",
    "KEY_MAGIC",
    "AuditKeys",
    "append_checkpoint",
    "create_keys",
    "encode_checkpoint",
    "load_keys",
    "load_or_create_keys",
    "parse_checkpoint",
    "read_checkpoints",
]

KEY_MAGIC = b"UBIAUDK\n"
KEY_VERSION = 1
KEY_BYTES = 32
KEY_FILE_BYTES = len(KEY_MAGIC) + 1 + KEY_BYTES + KEY_BYTES + 32
MAX_CHECKPOINT_LINE_BYTES = 1024

PathLike = str | os.PathLike[str]


class AuditKeys:
    """The audit MAC key and checkpoint signing key. Secrets never leave through
    ``repr``/``str`` or pickling; the public :attr:`verify_key` checks checkpoints."""

    __slots__ = ("_mac_key", "_seed", "_signing")

    def __init__(self, mac_key: Secret | bytes, signing_seed: Secret | bytes) -> None:
        mac = mac_key if isinstance(mac_key, Secret) else Secret(mac_key)
        seed = signing_seed if isinstance(signing_seed, Secret) else Secret(signing_seed)
        if len(mac) != KEY_BYTES or len(seed) != KEY_BYTES:
            raise ValueError(f"the audit MAC key and signing seed are {KEY_BYTES} bytes each")
        self._mac_key = mac
        self._seed = seed
        self._signing = SigningKey(seed.value)

    @classmethod
    def generate(cls, rng: Rng = os.urandom) -> AuditKeys:
        return cls(Secret(rng(KEY_BYTES)), Secret(rng(KEY_BYTES)))

    @property
    def mac_key(self) -> Secret:
        return self._mac_key

    @property
    def signing_seed(self) -> Secret:
        return self._seed

    @property
    def verify_key(self) -> VerifyKey:
        return self._signing.verify_key

    def sign(self, message: bytes) -> bytes:
        """The detached Ed25519 signature (64 bytes) of ``message``."""
        return bytes(self._signing.sign(message).signature)

    def fingerprint(self) -> str:
        """A short public name for the key pair: the first 8 bytes of the verify key, hex."""
        return bytes(self.verify_key)[:8].hex()

    def __repr__(self) -> str:
        return f"<AuditKeys {self.fingerprint()} secrets redacted>"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("audit keys are not picklable")

    def _encode(self) -> bytes:
        body = KEY_MAGIC + bytes([KEY_VERSION]) + self._mac_key.value + self._seed.value
        return body + sha256(body)


def _parse_keys(data: bytes, file: str) -> AuditKeys:
    if not data.startswith(KEY_MAGIC):
        raise AuditKeyError(f"{file}: not an audit key file (wrong magic)")
    if len(data) < len(KEY_MAGIC) + 1:
        raise AuditKeyError(f"{file}: the audit key file is damaged (truncated)")
    version = data[len(KEY_MAGIC)]
    if version != KEY_VERSION:
        raise AuditKeyError(f"{file}: audit key file version {version} is not supported (expected {KEY_VERSION})")
    if len(data) != KEY_FILE_BYTES:
        raise AuditKeyError(f"{file}: the audit key file is damaged ({len(data)} bytes, expected {KEY_FILE_BYTES})")
    body, digest = data[:-32], data[-32:]
    if sha256(body) != digest:
        raise AuditKeyError(f"{file}: the audit key file is damaged (checksum mismatch)")
    start = len(KEY_MAGIC) + 1
    return AuditKeys(Secret(body[start : start + KEY_BYTES]), Secret(body[start + KEY_BYTES :]))


def _read_all(fd: int, limit: int | None) -> bytes:
    """Up to ``limit`` bytes (all if None) of an open regular file."""
    chunks = []
    total = 0
    while limit is None or total < limit:
        chunk = os.read(fd, 65536 if limit is None else limit - total)
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _account(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def create_keys(path: PathLike, rng: Rng = os.urandom) -> AuditKeys:
    """Make a new audit key file at ``path`` (its directory must exist) and return its
    keys. AuditKeyError if a file (or symlink) is already there: it is never replaced."""
    target = Path(path)
    file = str(target)
    if os.path.lexists(target):
        raise AuditKeyError(f"{file}: an audit key file already exists; refusing to overwrite it")
    keys = AuditKeys.generate(rng)
    temp = target.with_name(f".{target.name}.{os.getpid()}.{rng(6).hex()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(temp, flags, 0o600)
    except OSError as exc:
        raise AuditKeyError(f"{file}: cannot create the audit key file: {exc.strerror}") from None
    try:
        try:
            os.fchmod(fd, 0o600)
            data = keys._encode()
            written = 0
            while written < len(data):
                written += os.write(fd, data[written:])
            os.fsync(fd)
        finally:
            os.close(fd)
        try:  # a hard link moves it into place and, unlike a rename, never overwrites
            os.link(temp, target)
        except FileExistsError:
            raise AuditKeyError(f"{file}: an audit key file already exists; refusing to overwrite it") from None
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
                raise
            if os.path.lexists(target):  # a file system without hard links: rename
                raise AuditKeyError(f"{file}: an audit key file already exists; refusing to overwrite it") from None
            os.replace(temp, target)
        _fsync_dir(target.parent)
    except OSError as exc:
        raise AuditKeyError(f"{file}: cannot create the audit key file: {exc.strerror}") from None
    finally:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
    return keys


def load_keys(path: PathLike) -> AuditKeys:
    """Read the audit key file. AuditKeyError, one line naming the fix, for a missing
    file, a symlink, a file of another account, a mode beyond 0600, or damaged bytes."""
    file = str(path)
    try:  # one open, no symlink followed: what is checked is what is read
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AuditKeyError(f"{file}: the audit key file is a symlink; name the file itself") from None
        if exc.errno == errno.ENOENT:
            raise AuditKeyError(f"{file}: no audit key file here") from None
        raise AuditKeyError(f"{file}: cannot read the audit key file: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuditKeyError(f"{file}: the audit key file is not a regular file")
        euid = os.geteuid()
        if st.st_uid not in (euid, 0):
            raise AuditKeyError(
                f"{file}: the audit key file belongs to {_account(st.st_uid)}, not to this account; "
                f"fix it with: chown {_account(euid)} {file}"
            )
        mode = stat.S_IMODE(st.st_mode)
        if mode & ~0o600:
            raise AuditKeyError(f"{file}: the audit key file has mode {mode:04o}, more than 0600; fix it with: chmod 600 {file}")
        data = _read_all(fd, KEY_FILE_BYTES + 1)
    except OSError as exc:
        raise AuditKeyError(f"{file}: cannot read the audit key file: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _parse_keys(data, file)


def load_or_create_keys(path: PathLike, rng: Rng = os.urandom) -> AuditKeys:
    """The keys of the audit key file at ``path``, creating it when there is none."""
    if not os.path.lexists(path):
        try:
            return create_keys(path, rng)
        except AuditKeyError:
            if not os.path.lexists(path):  # not lost to a concurrent creator: a real failure
                raise
    return load_keys(path)


# --- the checkpoint file ------------------------------------------------------------------------

_HEX_HASH = re.compile(rf"[0-9a-f]{{{2 * HASH_BYTES}}}")
_HEX_SIGNATURE = re.compile(rf"[0-9a-f]{{{2 * SIGNATURE_BYTES}}}")


def encode_checkpoint(cp: Checkpoint) -> bytes:
    """One line of the checkpoint file, ``\\n`` included. ValueError for a checkpoint that
    is not well formed (its signature is not checked here)."""
    if not isinstance(cp.seq, int) or isinstance(cp.seq, bool) or not 0 <= cp.seq <= MAX_SEQ:
        raise ValueError("checkpoint seq must be a 64-bit number")
    if not isinstance(cp.time, (int, float)) or isinstance(cp.time, bool) or not math.isfinite(cp.time):
        raise ValueError("checkpoint time must be a finite number")
    if not isinstance(cp.hash, bytes) or len(cp.hash) != HASH_BYTES:
        raise ValueError(f"checkpoint hash must be {HASH_BYTES} bytes")
    if not isinstance(cp.signature, bytes) or len(cp.signature) != SIGNATURE_BYTES:
        raise ValueError(f"checkpoint signature must be {SIGNATURE_BYTES} bytes")
    doc = {"seq": cp.seq, "time": float(cp.time), "hash": cp.hash.hex(), "signature": cp.signature.hex()}
    return json.dumps(doc, allow_nan=False).encode() + b"\n"


def parse_checkpoint(line: bytes) -> Checkpoint:
    """One line of the checkpoint file (without its ``\\n``); ValueError saying what is wrong."""
    if len(line) > MAX_CHECKPOINT_LINE_BYTES:
        raise ValueError("line too long")
    try:
        doc = json.loads(line.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a JSON object") from None
    if not isinstance(doc, dict):
        raise ValueError("not a JSON object")
    if set(doc) != {"seq", "time", "hash", "signature"}:
        raise ValueError("expected exactly the keys seq, time, hash, signature")
    seq, time, h, sig = doc["seq"], doc["time"], doc["hash"], doc["signature"]
    if type(seq) is not int or not 0 <= seq <= MAX_SEQ:
        raise ValueError("seq is not a 64-bit number")
    try:
        time = float(time) if type(time) in (int, float) else None
    except OverflowError:
        time = None
    if time is None or not math.isfinite(time):
        raise ValueError("time is not a finite number")
    if type(h) is not str or not _HEX_HASH.fullmatch(h):
        raise ValueError(f"hash is not {2 * HASH_BYTES} lowercase hex digits")
    if type(sig) is not str or not _HEX_SIGNATURE.fullmatch(sig):
        raise ValueError(f"signature is not {2 * SIGNATURE_BYTES} lowercase hex digits")
    return Checkpoint(seq, bytes.fromhex(h), time, bytes.fromhex(sig))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number here")


def append_checkpoint(path: PathLike, cp: Checkpoint) -> None:
    """Append one checkpoint to the file (created 0600 if missing) and fsync it. A torn
    last line left by a crash is cut away first."""
    file = str(path)
    line = encode_checkpoint(cp)
    flags = os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise AuditError(f"{file}: the checkpoint file is a symlink; name the file itself") from None
        raise AuditError(f"{file}: cannot open the checkpoint file: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise AuditError(f"{file}: the checkpoint file is not a regular file")
        size = st.st_size
        if size:
            _cut_torn_tail(fd, size, file)
        written = 0
        while written < len(line):
            written += os.write(fd, line[written:])
        os.fsync(fd)
        if size == 0:
            _fsync_dir(Path(path).parent)
    except OSError as exc:
        raise AuditError(f"{file}: cannot append to the checkpoint file: {exc.strerror}") from None
    finally:
        os.close(fd)


def _cut_torn_tail(fd: int, size: int, file: str) -> None:
    if os.pread(fd, 1, size - 1) == b"\n":
        return
    window = min(size, MAX_CHECKPOINT_LINE_BYTES + 1)
    tail = os.pread(fd, window, size - window)
    cut = tail.rfind(b"\n")
    if cut < 0 and window < size:
        raise AuditError(f"{file}: the checkpoint file ends in an overlong unterminated line; it is not a checkpoint file")
    os.ftruncate(fd, size - window + cut + 1)


def read_checkpoints(path: PathLike) -> list[Checkpoint]:
    """The checkpoints of the file, oldest first ([] if there is no file). An unterminated
    last line (a crash mid-append) is ignored; any other malformed line is an AuditError
    naming the line."""
    file = str(path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ENOENT:
            return []
        if exc.errno == errno.ELOOP:
            raise AuditError(f"{file}: the checkpoint file is a symlink; name the file itself") from None
        raise AuditError(f"{file}: cannot read the checkpoint file: {exc.strerror}") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise AuditError(f"{file}: the checkpoint file is not a regular file")
        data = _read_all(fd, None)
    except OSError as exc:
        raise AuditError(f"{file}: cannot read the checkpoint file: {exc.strerror}") from None
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    lines.pop()  # after the last "\n": empty, or a line torn by a crash
    checkpoints = []
    for number, line in enumerate(lines, 1):
        try:
            checkpoints.append(parse_checkpoint(line))
        except ValueError as exc:
            raise AuditError(f"{file}: line {number}: {exc}") from None
    return checkpoints
