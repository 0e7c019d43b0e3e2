"""Where a site's ``ipc://`` endpoints live on a host, and why a client may trust them.

Every instance also answers on an ipc socket, where OS users of its host log in by uid
(:mod:`ubicore.security.local`). The sockets of a site live in one directory per
dataset, ``<tmp>/ubicore-<hash of the dataset path>/`` (a Unix socket path must stay
under 108 bytes, and other local accounts must be able to reach it, which a private
dataset directory would not let them):

- the directory is the site account's, mode 0711: others may connect to a socket whose
  name they know, nobody else may create, rename or list anything in it;
- each socket is mode 0666 (connecting needs write permission); the instance then
  learns the peer's uid from the kernel.

A client never takes a registration's word for an ipc endpoint: it computes the path
from the site file and checks that the directory and the socket are not symlinks, are
owned by the dataset's owner and are not writable by others (:func:`trusted_endpoint`),
so whoever answers there is the site's own account.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
from pathlib import Path

from .errors import ConfigError

__all__ = ["endpoint", "ensure_run_dir", "release_run_dir", "run_dir", "socket_path", "trusted_endpoint"]

DIR_MODE = 0o711
SOCKET_MODE = 0o666


def run_dir(dataset: str | os.PathLike[str]) -> Path:
    """The directory of the site's ipc sockets on this host."""
    digest = hashlib.sha256(str(Path(dataset).resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"ubicore-{digest}"


def socket_path(dataset: str | os.PathLike[str], schema: str, cell: str) -> Path:
    name = hashlib.sha256(f"{schema}@{cell}".encode()).hexdigest()[:16]
    return run_dir(dataset) / f"{name}.ipc"


def endpoint(dataset: str | os.PathLike[str], schema: str, cell: str) -> str:
    return f"ipc://{socket_path(dataset, schema, cell)}"


def ensure_run_dir(dataset: str | os.PathLike[str]) -> Path:
    """The run directory, made if needed (server side); ConfigError if it is not ours
    alone (a symlink, another account's, writable by others)."""
    path = run_dir(dataset)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(str(path), "", f"cannot make the ipc directory: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ConfigError(str(path), "", "the ipc directory is not a directory of this account "
                                         "(another account made it first?); remove it and start again")
    if stat.S_IMODE(st.st_mode) != DIR_MODE:
        os.chmod(path, DIR_MODE, follow_symlinks=False)
    return path


def release_run_dir(dataset: str | os.PathLike[str]) -> None:
    """Remove the run directory if no socket is left in it."""
    with contextlib.suppress(OSError):
        run_dir(dataset).rmdir()


def open_socket(path: Path) -> None:
    """After binding: let every local account connect (the uid decides what it may do)."""
    os.chmod(path, SOCKET_MODE)


def trusted_endpoint(dataset: str | os.PathLike[str], schema: str, cell: str) -> str | None:
    """The ipc endpoint of (schema, cell) if it exists here and can only have been made by
    the dataset's owner; None otherwise."""
    path = socket_path(dataset, schema, cell)
    try:
        owner = os.lstat(Path(dataset)).st_uid
        d = os.lstat(path.parent)
        s = os.lstat(path)
    except OSError:
        return None
    for st, kind in ((d, stat.S_ISDIR), (s, stat.S_ISSOCK)):
        if not kind(st.st_mode) or st.st_uid != owner:
            return None
    if d.st_mode & 0o022:
        return None
    return f"ipc://{path}"
