"""The service-credentials cache ``credentials.dat``: its format and its file handling.

A host's services log in as service users without a password on disk. The file holds,
per site, what the key exchange needs instead (DESIGN.md §7): the user name, the
password-derived scalar π with its salt and Argon2id costs, when it was cached and how it
was checked. One entry per site name; caching again for a site replaces its entry.

The file format (version 1)
---------------------------

All of the file, in order; nothing may follow the checksum::

    offset  size  field
    ------  ----  ---------------------------------------------------------------
    0       8     magic: the bytes 55 42 49 43 52 45 44 0A (ASCII "UBICRED\\n")
    8       1     format version: 0x01
    9       n     body: one MessagePack object (n = file size - 41), below
    9+n     32    checksum: SHA-256 over bytes 0 .. 9+n-1 (magic, version, body)

The body is a MessagePack map with exactly one key, ``"entries"`` (a str), whose value
is an array of entry maps. Each entry map has exactly these nine str keys (a writer
emits them in this order, readers accept any order) and nothing else:

    ============  ==========  =====================================================
    key           msgpack     value
    ============  ==========  =====================================================
    site          str         the site name, UTF-8, not empty; unique in the file
    user          str         the service user's name, UTF-8, not empty
    salt          bin         the user's Argon2id salt, at least 16 bytes
    t             int         Argon2id passes, 1..64
    p             int         Argon2id lanes, 1..64
    m_kib         int         Argon2id memory in KiB, 8*p .. 4194304
    scalar        bin         π, the password-derived scalar, exactly 32 bytes
    cached_at     float       when it was cached, seconds since the Unix epoch,
                              finite and not negative (a writer emits float 64)
    checked       str         ``"online"`` (by logging in to the site) or
                              ``"offline"`` (against the site's verifier record in a
                              local dataset)
    ============  ==========  =====================================================

Strings use the str family (never bin), byte strings the bin family (never str). A writer
orders entries by site name. A reader refuses, as damaged, anything else: another magic,
another version, a checksum that does not match (the file was truncated or corrupted), a
body that is not exactly one MessagePack object, a missing, extra or mistyped key, a
value out of range, a site named twice. The checksum detects accidents, not attackers:
what keeps the file safe is who may read and write it (below). The file carries no
password.

Writing
-------

Writers hold an exclusive ``flock`` on the containing directory for the whole
read-modify-write, so two writers never lose each other's entries. The new contents go
to a temporary file in the same directory, ``.credentials.dat.<pid>.<random hex>.tmp``,
created with ``O_EXCL | O_NOFOLLOW`` and mode 0600; it is written in full, given its
final mode (0600, or 0640 and the named reader group), fsynced, renamed onto
``credentials.dat`` (``os.replace``), and the directory is fsynced. Any failure removes
the temporary file and leaves the old file exactly as it was; a writer killed midway
leaves a temporary file (which holds secrets) that the next successful write or removal
deletes. A symlink at the final path is refused, never followed.

Reading
-------

:func:`check_file` refuses a file that others could have read or changed, each refusal a
:class:`CredentialsUnsafe` whose one line names the path and the command that fixes it:
a symlink or anything but a regular file; an owner other than the reader or root; any
mode bit beyond owner read/write and group read (0640: the group is the explicitly named
reader group), so others' bits, group write, execute and setuid/setgid/sticky are all
refused; a containing directory that others can write unless it is sticky. The file is
then opened without following symlinks and ``fstat`` must show the very inode that was
checked, passing the same checks, so what is read is what was checked.

Errors (:class:`CredentialsError` is :class:`ubicore.errors.CredentialsError`, the root
that :class:`~ubicore.security.amp.CredentialsOutOfDate` shares)::

    UbiError
    └── CredentialsError        one readable line naming the file, never a secret
        ├── CredentialsMissing  no file, or no entry for the site
        ├── CredentialsUnsafe   owner, mode, symlink or directory problem; says the fix
        └── CredentialsDamaged  not this format, unknown version, checksum, bad field
"""

from __future__ import annotations

import logging
import contextlib
import errno
import fcntl
import grp
import hashlib
import hmac
import math
import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack

from ubicore.errors import CredentialsError
from ubicore.security.primitives import SCALAR_BYTES, KdfParams, Secret

__all__ = [
    "CHECKED_VALUES",
    "FILE_NAME",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_FILE_BYTES",
    "MIN_SALT_BYTES",
    "CachedCredential",
    "CredentialsDamaged",
    "CredentialsError",
    "CredentialsMissing",
    "CredentialsUnsafe",
    "cache_path",
    "check_file",
    "copy_cache",
    "encode_cache",
    "load_credential",
    "parse_cache",
    "read_cache",
    "remove_credential",
    "store_credential",
    "write_cache",
]

log = logging.getLogger(__name__)

FILE_NAME = "credentials.dat"
FORMAT_VERSION = 1
MAGIC = b"UBICRED\n"
CHECKSUM_BYTES = 32
HEADER_BYTES = len(MAGIC) + 1
MIN_SALT_BYTES = 16
MAX_FILE_BYTES = 16 * 1024 * 1024
"""Larger files are refused as damaged before they are parsed."""
CHECKED_VALUES = ("online", "offline")
FILE_MODE = 0o600
GROUP_FILE_MODE = 0o640
ALLOWED_MODE_BITS = 0o640
"""Owner read/write and group read: every other permission bit makes a file unsafe."""

_ENTRY_KEYS = ("site", "user", "salt", "t", "p", "m_kib", "scalar", "cached_at", "checked")
_FIX = "cache the credentials again with ubi-cache-credentials"


class CredentialsMissing(CredentialsError):
    """Raised when there is no cache file, or no entry for the site. Cache the site's
    credentials (``ubi-cache-credentials``)."""


class CredentialsUnsafe(CredentialsError):
    """Raised when others could read or change the file (owner, mode, symlink, directory).
    The message gives the ``chmod`` / ``chown`` command that fixes it; nothing was read."""


class CredentialsDamaged(CredentialsError):
    """Raised when the file is not a version-1 credentials cache or was truncated or
    corrupted. Cache the credentials again; the damaged file is never half-used."""


@dataclass(frozen=True, slots=True)
class CachedCredential:
    """One site's service credential: what the key exchange needs, never the password.

    ``scalar`` is π derived from the password with ``salt`` and ``params``; ``cached_at``
    is Unix time; ``checked`` is ``"online"`` or ``"offline"``. Construction validates
    every field (``ValueError`` / ``TypeError``); ``repr`` never shows the scalar.
    """

    site: str
    user: str
    salt: bytes
    params: KdfParams
    scalar: Secret = field(repr=False)
    cached_at: float
    checked: str

    def __post_init__(self) -> None:
        for name in ("site", "user", "checked"):
            if type(getattr(self, name)) is not str:
                raise TypeError(f"{name} must be a str")
        if not self.site:
            raise ValueError("site must not be empty")
        if not self.user:
            raise ValueError("user must not be empty")
        if type(self.salt) is not bytes:
            raise TypeError("salt must be bytes")
        if len(self.salt) < MIN_SALT_BYTES:
            raise ValueError(f"salt must be at least {MIN_SALT_BYTES} bytes")
        if not isinstance(self.params, KdfParams):
            raise TypeError("params must be KdfParams")
        for name in ("t", "p", "m_kib"):
            if type(getattr(self.params, name)) is not int:
                raise TypeError(f"params.{name} must be an int")
        self.params.check()
        if not isinstance(self.scalar, Secret):
            raise TypeError("scalar must be a Secret")
        if len(self.scalar) != SCALAR_BYTES:
            raise ValueError(f"scalar must be exactly {SCALAR_BYTES} bytes")
        if type(self.cached_at) not in (float, int):
            raise TypeError("cached_at must be a number")
        if not math.isfinite(self.cached_at) or self.cached_at < 0:
            raise ValueError("cached_at must be a finite, non-negative Unix time")
        if self.checked not in CHECKED_VALUES:
            raise ValueError(f"checked must be one of {', '.join(CHECKED_VALUES)}")


# --- the format (sans-IO) --------------------------------------------------------------------


def encode_cache(entries: Iterable[CachedCredential]) -> bytes:
    """The file's bytes for ``entries`` (ordered by site). ``ValueError`` if a site is
    named twice."""
    by_site: dict[str, CachedCredential] = {}
    for cred in entries:
        if not isinstance(cred, CachedCredential):
            raise TypeError("entries must be CachedCredential")
        if cred.site in by_site:
            raise ValueError(f"site {cred.site!r} is given twice")
        by_site[cred.site] = cred
    body = {
        "entries": [
            {
                "site": c.site,
                "user": c.user,
                "salt": c.salt,
                "t": c.params.t,
                "p": c.params.p,
                "m_kib": c.params.m_kib,
                "scalar": c.scalar.value,
                "cached_at": float(c.cached_at),
                "checked": c.checked,
            }
            for c in (by_site[s] for s in sorted(by_site))
        ]
    }
    packed: bytes = msgpack.packb(body, use_bin_type=True)
    head = MAGIC + bytes([FORMAT_VERSION]) + packed
    return head + hashlib.sha256(head).digest()


def parse_cache(data: bytes, source: str = FILE_NAME) -> dict[str, CachedCredential]:
    """The entries of a file's bytes, by site. Any other input is
    :class:`CredentialsDamaged` (naming ``source``), never another exception."""

    def damaged(problem: str) -> CredentialsDamaged:
        return CredentialsDamaged(f"{source} is damaged: {problem}; {_FIX}")

    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise damaged("not bytes")
    data = bytes(data)
    if len(data) > MAX_FILE_BYTES:
        raise damaged("too large for a credentials cache")
    if data[: len(MAGIC)] != MAGIC[: len(data)]:
        raise CredentialsDamaged(f"{source} is not a ubicore credentials cache; {_FIX}")
    if len(data) < HEADER_BYTES + CHECKSUM_BYTES:
        raise damaged("truncated")
    version = data[len(MAGIC)]
    if version != FORMAT_VERSION:
        raise CredentialsDamaged(
            f"{source} is format version {version}, this ubicore reads version {FORMAT_VERSION}; {_FIX}"
        )
    head, digest = data[:-CHECKSUM_BYTES], data[-CHECKSUM_BYTES:]
    if not hmac.compare_digest(hashlib.sha256(head).digest(), digest):
        raise damaged("checksum mismatch (the file was truncated or corrupted)")
    try:
        body = msgpack.unpackb(head[HEADER_BYTES:], raw=False, strict_map_key=True, use_list=True)
    except Exception:  # msgpack raises many types (ExtraData, ValueError, StackError, ...)
        raise damaged("the body is not one MessagePack object") from None
    if not isinstance(body, dict) or set(body) != {"entries"} or not isinstance(body["entries"], list):
        raise damaged('the body is not a map holding only "entries" (an array)')
    out: dict[str, CachedCredential] = {}
    for i, raw in enumerate(body["entries"]):
        cred = _parse_entry(raw, i, damaged)
        if cred.site in out:
            raise damaged(f"site {cred.site!r} has two entries")
        out[cred.site] = cred
    return out


def _parse_entry(raw: Any, i: int, damaged: Callable[[str], CredentialsDamaged]) -> CachedCredential:
    where = f"entry {i}"
    if not isinstance(raw, dict):
        raise damaged(f"{where} is not a map")
    keys = set(raw)
    if keys != set(_ENTRY_KEYS):
        missing = sorted(set(_ENTRY_KEYS) - keys)
        extra = sorted(repr(k) for k in keys - set(_ENTRY_KEYS))
        what = "; ".join(
            part for part in (
                f"missing {', '.join(missing)}" if missing else "",
                f"unknown key {', '.join(extra)}" if extra else "",
            ) if part
        )
        raise damaged(f"{where}: {what}")
    expected = {"site": str, "user": str, "salt": bytes, "t": int, "p": int, "m_kib": int,
                "scalar": bytes, "cached_at": float, "checked": str}
    for key, typ in expected.items():
        if type(raw[key]) is not typ:
            raise damaged(f"{where}: {key} is not {_TYPE_NAMES[typ]}")
    try:
        return CachedCredential(
            site=raw["site"],
            user=raw["user"],
            salt=raw["salt"],
            params=KdfParams(t=raw["t"], p=raw["p"], m_kib=raw["m_kib"]),
            scalar=Secret(raw["scalar"]),
            cached_at=raw["cached_at"],
            checked=raw["checked"],
        )
    except (TypeError, ValueError) as exc:  # the messages name fields, never values
        raise damaged(f"{where}: {exc}") from None


_TYPE_NAMES: dict[type, str] = {str: "a str", bytes: "bin", int: "an int", float: "a float"}


# --- the reader's checks ---------------------------------------------------------------------


def cache_path(dataset: Path) -> Path:
    """Where a dataset keeps its credentials cache: ``dataset / FILE_NAME``."""
    return Path(dataset) / FILE_NAME


def _mode_problem(path: Path, st: os.stat_result) -> CredentialsUnsafe | None:
    """The reader's checks on one stat result (of the path or of the open file)."""
    if stat.S_ISLNK(st.st_mode):
        return CredentialsUnsafe(
            f"{path} is a symbolic link; credentials are read only from the file itself: "
            f"remove it (rm {path}) and cache the credentials there"
        )
    if not stat.S_ISREG(st.st_mode):
        return CredentialsUnsafe(f"{path} is not a regular file: remove it and cache the credentials again")
    me = os.geteuid()
    if st.st_uid not in (me, 0):
        return CredentialsUnsafe(
            f"{path} is owned by uid {st.st_uid}, not by you (uid {me}): fix it with chown {me} {path}"
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & ~ALLOWED_MODE_BITS:
        if mode & stat.S_IROTH:
            what = "can be read by other accounts"
        elif mode & (stat.S_IWOTH | stat.S_IWGRP):
            what = "can be written by other accounts"
        elif mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
            what = "is executable"
        else:
            what = "has setuid, setgid or sticky bits"
        fix = GROUP_FILE_MODE if mode & stat.S_IRGRP and not mode & stat.S_IRWXO else FILE_MODE
        return CredentialsUnsafe(f"{path} {what} (mode {mode:04o}): fix it with chmod {fix:o} {path}")
    return None


def _check_directory(directory: Path) -> None:
    try:
        st = os.stat(directory)
    except FileNotFoundError:
        raise CredentialsError(f"the directory {directory} does not exist") from None
    except OSError as exc:
        raise CredentialsError(f"cannot examine the directory {directory}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CredentialsError(f"{directory} is not a directory")
    mode = stat.S_IMODE(st.st_mode)
    if mode & stat.S_IWOTH and not mode & stat.S_ISVTX:
        raise CredentialsUnsafe(
            f"the directory {directory} can be written by other accounts (mode {mode:04o}): "
            f"fix it with chmod o-w {directory}"
        )


def _open_checked(path: Path) -> tuple[int, os.stat_result]:
    """Check ``path`` like a reader and open it: the descriptor and its ``fstat``."""
    try:
        before = os.lstat(path)
    except FileNotFoundError:
        raise CredentialsMissing(f"no cached credentials at {path}: cache them with ubi-cache-credentials") from None
    except OSError as exc:
        raise CredentialsError(f"cannot examine {path}: {exc.strerror}") from None
    problem = _mode_problem(path, before)
    if problem is not None:
        raise problem
    _check_directory(path.parent)
    try:  # O_NONBLOCK: a FIFO swapped in after the lstat must not hang the reader
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CredentialsUnsafe(f"{path} became a symbolic link while it was checked: remove it") from None
        if exc.errno == errno.ENOENT:
            raise CredentialsMissing(f"no cached credentials at {path}: it vanished while it was checked") from None
        raise CredentialsError(f"cannot open {path}: {exc.strerror}") from None
    try:
        after = os.fstat(fd)
        if (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
            raise CredentialsUnsafe(f"{path} was replaced while it was checked: check who writes it, then retry")
        problem = _mode_problem(path, after)
        if problem is not None:
            raise problem
    except BaseException:
        os.close(fd)
        raise
    return fd, after


def check_file(path: Path) -> None:
    """Run the reader's checks on ``path`` (see the module docstring) without parsing it.

    Raises :class:`CredentialsMissing` if there is no file, :class:`CredentialsUnsafe`
    naming the fix if others could read or change it."""
    fd, _ = _open_checked(Path(path))
    os.close(fd)


def _read_checked(path: Path) -> tuple[dict[str, CachedCredential], os.stat_result]:
    fd, st = _open_checked(path)
    try:
        chunks: list[bytes] = []
        size = 0
        while size <= MAX_FILE_BYTES:
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as exc:
        raise CredentialsError(f"cannot read {path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return parse_cache(b"".join(chunks), str(path)), st


def read_cache(path: Path) -> dict[str, CachedCredential]:
    """Every cached credential in ``path``, by site, after the reader's checks.

    :class:`CredentialsMissing` if the file does not exist, :class:`CredentialsUnsafe`
    if others could read or change it, :class:`CredentialsDamaged` if it is not intact."""
    return _read_checked(Path(path))[0]


def load_credential(path: Path, site: str) -> CachedCredential:
    """The cached credential for ``site``; :class:`CredentialsMissing` naming the site and
    the file if there is none."""
    path = Path(path)
    entries = read_cache(path)
    try:
        return entries[site]
    except KeyError:
        raise CredentialsMissing(
            f"no cached credentials for site {site!r} in {path}: cache them with ubi-cache-credentials"
        ) from None


# --- writing ---------------------------------------------------------------------------------


def _group_id(reader_group: str | None) -> int | None:
    if reader_group is None:
        return None
    try:
        return grp.getgrnam(reader_group).gr_gid
    except KeyError:
        raise CredentialsError(f"there is no group named {reader_group!r} on this host") from None


def _temp_prefix(path: Path) -> str:
    return f".{path.name}."


@contextlib.contextmanager
def _locked_directory(path: Path) -> Iterator[int]:
    """The containing directory, opened and exclusively ``flock``-ed for one writer."""
    directory = path.parent
    _check_directory(directory)
    try:
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise CredentialsError(f"cannot open the directory {directory}: {exc.strerror}") from None
    try:
        fcntl.flock(dfd, fcntl.LOCK_EX)
        yield dfd
    finally:
        os.close(dfd)  # closing releases the lock


def _remove_stale_temps(dfd: int, path: Path) -> None:
    """Delete temporary files that writers killed midway left behind (they hold secrets).
    The caller holds the directory lock, so no live writer owns any of them."""
    prefix = _temp_prefix(path)
    try:
        names = os.listdir(dfd)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            with contextlib.suppress(OSError):
                os.unlink(name, dir_fd=dfd)


def _write_locked(dfd: int, path: Path, data: bytes, gid: int | None) -> None:
    """Replace ``path`` with ``data`` atomically; the caller holds the directory lock."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise CredentialsError(f"cannot examine {path}: {exc.strerror}") from None
    else:
        if stat.S_ISLNK(st.st_mode):
            raise CredentialsUnsafe(
                f"{path} is a symbolic link; credentials are never written through one: remove it (rm {path})"
            )
        if not stat.S_ISREG(st.st_mode):
            raise CredentialsUnsafe(f"{path} is not a regular file: remove it, then cache the credentials again")
    temp = f"{_temp_prefix(path)}{os.getpid()}.{secrets.token_hex(8)}.tmp"
    try:
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, FILE_MODE,
                     dir_fd=dfd)
    except OSError as exc:
        raise CredentialsError(f"cannot create a temporary file beside {path}: {exc.strerror}") from None
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if gid is not None:
                os.fchown(fd, -1, gid)
            os.fchmod(fd, FILE_MODE if gid is None else GROUP_FILE_MODE)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temp, path.name, src_dir_fd=dfd, dst_dir_fd=dfd)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(temp, dir_fd=dfd)
        if isinstance(exc, OSError):
            raise CredentialsError(f"cannot write {path}: {exc.strerror or exc}; the old file is unchanged") from None
        raise
    try:
        os.fsync(dfd)
    except OSError as exc:
        raise CredentialsError(f"{path} was written but its directory could not be synced: {exc.strerror}") from None
    _remove_stale_temps(dfd, path)


def write_cache(path: Path, entries: Iterable[CachedCredential], *, reader_group: str | None = None) -> None:
    """Replace the whole file with ``entries``, atomically (see the module docstring).

    Mode 0600, or 0640 with group ``reader_group`` (an unknown group is a
    :class:`CredentialsError` before anything is written). A symlink at ``path`` is
    :class:`CredentialsUnsafe`. On any failure the old file is left as it was."""
    path = Path(path)
    data = encode_cache(entries)
    gid = _group_id(reader_group)
    with _locked_directory(path) as dfd:
        _write_locked(dfd, path, data, gid)


def store_credential(path: Path, cred: CachedCredential, *, reader_group: str | None = None) -> None:
    """Add ``cred`` to the file, replacing the entry for its site. An existing file must
    pass the reader's checks; a damaged one (its entries unreadable anyway) is replaced
    by one holding ``cred`` alone. The write is atomic like :func:`write_cache`, and its
    mode follows ``reader_group`` the same way (none given: 0600)."""
    path = Path(path)
    if not isinstance(cred, CachedCredential):
        raise TypeError("cred must be a CachedCredential")
    gid = _group_id(reader_group)
    with _locked_directory(path) as dfd:
        try:
            entries = read_cache(path)
        except CredentialsMissing:
            entries = {}
        except CredentialsDamaged as exc:
            log.warning("%s; replacing it", exc)
            entries = {}
        entries[cred.site] = cred
        _write_locked(dfd, path, encode_cache(entries.values()), gid)


def remove_credential(path: Path, site: str | None) -> bool:
    """Forget cached credentials: ``site=None`` removes the whole file (whatever its
    state), a site drops its entry (and the file with the last one). False if there was
    nothing to remove. Temporary files of killed writers go too."""
    path = Path(path)
    with _locked_directory(path) as dfd:
        if site is None:
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                _remove_stale_temps(dfd, path)
                return False
            except OSError as exc:
                raise CredentialsError(f"cannot examine {path}: {exc.strerror}") from None
            if stat.S_ISDIR(st.st_mode):
                raise CredentialsError(f"{path} is a directory, not a credentials cache")
            _unlink_locked(dfd, path)
            return True
        try:
            entries = read_cache(path)
        except CredentialsMissing:
            _remove_stale_temps(dfd, path)
            return False
        except CredentialsDamaged:  # nothing in it can be read: removing the site's entry removes the file
            _unlink_locked(dfd, path)
            return True
        if site not in entries:
            return False
        del entries[site]
        if entries:
            st = os.lstat(path)
            gid = st.st_gid if st.st_mode & stat.S_IRGRP else None
            _write_locked(dfd, path, encode_cache(entries.values()), gid)
        else:
            _unlink_locked(dfd, path)
        return True


def _unlink_locked(dfd: int, path: Path) -> None:
    try:
        os.unlink(path.name, dir_fd=dfd)
        os.fsync(dfd)
    except OSError as exc:
        raise CredentialsError(f"cannot remove {path}: {exc.strerror}") from None
    _remove_stale_temps(dfd, path)


def copy_cache(src: Path, dst_dataset: Path, *, reader_group: str | None = None) -> Path:
    """Copy a cache to another dataset (a live/backup pair): ``src`` is checked and parsed
    like a reader, then its entries are written atomically to ``dst_dataset/FILE_NAME``,
    which is returned. The destination directory must exist. Without ``reader_group``
    the copy keeps ``src``'s reader group if it has one (mode 0640)."""
    src = Path(src)
    dst_dataset = Path(dst_dataset)
    gid = _group_id(reader_group)
    entries, st = _read_checked(src)
    if gid is None and st.st_mode & stat.S_IRGRP:
        gid = st.st_gid
    if not dst_dataset.is_dir():
        raise CredentialsError(f"the dataset directory {dst_dataset} does not exist")
    dst = cache_path(dst_dataset)
    data = encode_cache(entries.values())
    with _locked_directory(dst) as dfd:
        _write_locked(dfd, dst, data, gid)
    return dst
