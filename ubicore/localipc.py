"""Where a site's ``ipc://`` endpoints live on a host, and why a client may trust them.

Every instance also answers on an ipc socket, where OS users of its host log in by uid
(:mod:`ubicore.security.local`). The sockets of a site live in its *run directory*: the
site file's ``run_dir``, else ``<dataset>/run``. The instances make it if needed, never
remove it, and refuse to start if it is a symlink, another account's, or writable by
others. Each socket is mode 0666 (connecting needs write permission); the instance then
learns the peer's uid from the kernel.

Who may reach the sockets is the operator's choice, made with directory permissions:
under the default (the dataset is private, 0700) only the site's own account can, which
is what its instances need. For OS users of other accounts, name a ``run_dir`` they can
traverse (made by the site account, mode 0711: they connect to a socket whose name they
know, and nobody else creates, renames or lists anything in it).

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
from pathlib import Path

from .config.model import SiteConfig
from .errors import ConfigError

__all__ = ["bind_path", "endpoint", "ensure_run_dir", "run_dir", "socket_path", "trusted_endpoint"]

DIR_MODE = 0o711
SOCKET_MODE = 0o666
MAX_SOCKET_PATH = 107


def run_dir(site: SiteConfig) -> Path:
    """The directory of the site's ipc sockets on this host."""
    return site.run_dir if site.run_dir is not None else Path(site.dataset) / "run"


def socket_path(site: SiteConfig, schema: str, cell: str) -> Path:
    name = hashlib.sha256(f"{schema}@{cell}".encode()).hexdigest()[:12]
    return run_dir(site) / f"{name}.ipc"


def endpoint(site: SiteConfig, schema: str, cell: str) -> str:
    """The ``ipc://`` endpoint of (schema, cell); ConfigError if the path is too long for
    a Unix socket (then name a shorter ``run_dir`` in the site file)."""
    path = socket_path(site, schema, cell)
    if len(str(path).encode()) > MAX_SOCKET_PATH:
        raise ConfigError(str(site.source), "run_dir", f"{path.parent} is too long a path for Unix sockets; "
                                                        "name a shorter run_dir in the site file")
    return f"ipc://{path}"


def ensure_run_dir(site: SiteConfig) -> Path:
    """The run directory, made if needed (server side); ConfigError if it is a symlink,
    another account's, or writable by others."""
    path = run_dir(site)
    with contextlib.suppress(FileExistsError):
        path.mkdir(mode=DIR_MODE)
    try:
        st = os.lstat(path)
    except OSError as exc:
        raise ConfigError(str(site.source), "run_dir", f"cannot make the ipc directory {path}: {exc.strerror}") from None
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise ConfigError(str(site.source), "run_dir", f"{path} is not a directory of this account")
    if st.st_mode & 0o022:
        raise ConfigError(str(site.source), "run_dir", f"others can write in {path}; fix it with: chmod go-w {path}")
    return path


class BoundSocket:
    """A socket file this process bound: removed at the end only if it is still that file
    (a newer instance of the same (schema, cell) may have bound the path since)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.chmod(path, SOCKET_MODE)  # every account may connect; the uid decides what it may do
        st = os.lstat(path)
        self._id = (st.st_dev, st.st_ino)

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._id:
                self.path.unlink()


def bind_path(endpoint: str) -> Path | None:
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def trusted_endpoint(site: SiteConfig, schema: str, cell: str) -> str | None:
    """The ipc endpoint of (schema, cell) if it exists here and can only have been made by
    the dataset's owner; None otherwise."""
    path = socket_path(site, schema, cell)
    try:
        owner = os.stat(Path(site.dataset).resolve()).st_uid
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
