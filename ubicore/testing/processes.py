"""Whole sites as real processes, for tests: ``ubi site up`` in a child process.

``write_site`` writes a two-host site file (127.0.0.1 and 127.0.0.2, free core ports),
``start_site`` / ``stop_site`` run and stop ``ubi site up`` on it, ``alive`` tells whether
a pid is still a live process (zombies count as gone).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ..client import Client
from ..config import SiteConfig
from .site import free_ports

__all__ = ["LiveSite", "alive", "start_site", "stop_site", "write_site"]

SITE_TEMPLATE = """\
site: proc-test
dataset: {dataset}
core: {{host: host-a, rpc_port: {rpc}, event_port: {events}}}
hosts:
  host-a: {{address: 127.0.0.1}}
  host-b: {{address: 127.0.0.2}}
cells:
  Site:
    level: site
    host: host-a
    children:
      Zone-A: {{level: zone}}
      Zone-B: {{level: zone, host: host-b}}
deployments:
  - schema: ULocationSystem::ConfigurationUpdate
    level: site
  - schema: ULocation::Positions
    level: zone
    options: {{rate_hz: 20, tags: 3}}
"""


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie awaiting its parent's wait() is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@dataclass
class LiveSite:
    site: SiteConfig
    proc: subprocess.Popen[bytes]
    path: Path

    def client(self, *, anonymous: bool = False) -> Client:
        """A client logged in as :data:`~ubicore.testing.site.OPERATOR` (or as ``default``)."""
        from ..sessions import Credentials
        from .site import OPERATOR

        creds = None if anonymous else Credentials.password(*OPERATOR)
        return Client.for_site(self.site, timeout_s=5.0, credentials=creds)


def write_site(tmp: Path) -> Path:
    """A site file on free ports, initialised with the factory policy
    (:data:`~ubicore.testing.site.OPERATOR` administers; tiny Argon2 costs)."""
    rpc, events = free_ports(2)
    path = tmp / "site.yaml"
    path.write_text(SITE_TEMPLATE.format(dataset=tmp / "dataset", rpc=rpc, events=events))
    from ..config import load_site
    from ..runtime import current_os_user, init_site
    from .site import OPERATOR, TEST_KDF

    site = load_site(path)
    init_site(site, OPERATOR[1], admin_user=OPERATOR[0], kdf=TEST_KDF, os_user=current_os_user())
    return path


def start_site(path: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ubicore.tools.cli", "--site", str(path), "site", "up"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
    )


def stop_site(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()
