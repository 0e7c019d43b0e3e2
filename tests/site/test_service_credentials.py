"""Service credentials on real processes (issue 5): ``ubi core``, ``ubi controller`` and
``ubi site up`` as child processes of a site made by ``write_site`` (which caches the
service user ``site-service`` in the dataset's ``credentials.dat``).

- no cache: ``controller -d`` (and without -d, with no terminal) exits 78 at once with one
  line naming ``ubi-cache-credentials --site FILE``; ``site up -d`` fails the same way and
  leaves nothing running;
- with the cache: a core and a ``controller -d`` come up and the host's instances
  register; after ``ubi security users passwd site-service`` a controller with -d exits 78,
  "out of date";
- no test, log line or file other than ``credentials.dat`` (and the policy's verifiers)
  holds the service user's password or its cached scalar, with every process logging at
  debug level;
- on a terminal, a controller without a cache asks for a service user and a password
  (hidden), checks them online and comes up, handing them to its instances in memory; a
  wrong password is one line and a non-zero exit.

Every process runs in its own process group and is stopped (SIGTERM, then SIGKILL of the
group) whatever happens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import pty
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from ubicore.client import NAMING_CELL, NAMING_SCHEMA, Client
from ubicore.config import SiteConfig, load_site
from ubicore.credentials.cache import CachedCredential, cache_path, read_cache
from ubicore.credentials.service import service_credentials
from ubicore.errors import RemoteError
from ubicore.runtime import SERVICE_USER, add_service_user, offline_policy, perm_path
from ubicore.security.amp import make_verifier
from ubicore.sessions import Credentials
from ubicore.testing.processes import write_site
from ubicore.testing.site import OPERATOR, TEST_KDF

from ..pty_support import TTY_WRAPPER

pytestmark = pytest.mark.timeout(60)

CONFIG = "ULocationSystem::ConfigurationUpdate"
POSITIONS = "ULocation::Positions"
HOST_A = [(CONFIG, "Site"), (POSITIONS, "Zone-A")]
ALL = [*HOST_A, (POSITIONS, "Zone-B")]
EX_CONFIG = 78
PASSWORD = "k3pt-Service-Pa55word-xyzzy"
ENV = {k: v for k, v in os.environ.items() if not k.startswith("UBI_")}


def ubi(path: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ubicore.tools.cli", "--site", str(path), *args]


class Processes:
    """Child processes, each in its own group, their output in files under ``logs``;
    :meth:`close` stops whatever still runs (SIGTERM, then SIGKILL of the group)."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        logs.mkdir(exist_ok=True)
        self.procs: list[subprocess.Popen[bytes]] = []
        self._files: list[IO[bytes]] = []
        self._count = 0

    def start(self, name: str, argv: list[str], *, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        self._count += 1
        out = open(self.logs / f"{self._count:02d}-{name}.out", "wb")
        err = open(self.logs / f"{self._count:02d}-{name}.err", "wb")
        self._files += [out, err]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=err, start_new_session=True,
                                env=env if env is not None else ENV)
        self.procs.append(proc)
        return proc

    def run(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
            timeout_s: float = 20.0) -> tuple[int, str, str]:
        """Run to the end: (exit status, stdout, stderr)."""
        proc = self.start(name, argv, env=env)
        try:
            code = proc.wait(timeout_s)
        finally:
            self.stop(proc)
        return code, *self.output(proc)

    def output(self, proc: subprocess.Popen[bytes]) -> tuple[str, str]:
        i = self.procs.index(proc)
        out, err = self._files[2 * i], self._files[2 * i + 1]
        out.flush()
        err.flush()
        return Path(out.name).read_text(errors="replace"), Path(err.name).read_text(errors="replace")

    @staticmethod
    def stop(proc: subprocess.Popen[bytes], timeout_s: float = 15.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)  # any child left behind in its group

    def close(self) -> None:
        for proc in reversed(self.procs):
            with contextlib.suppress(Exception):
                self.stop(proc, 10.0)
        for f in self._files:
            f.close()


@pytest.fixture
def procs(tmp_path: Path) -> Iterator[Processes]:
    p = Processes(tmp_path / "logs")
    try:
        yield p
    finally:
        p.close()


def group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, text
    assert "Traceback" not in text
    return lines[0]


async def registered(site: SiteConfig, keys: list[tuple[str, str]], timeout_s: float = 20.0) -> dict[tuple[str, str], int]:
    """Wait until naming shows every (schema, cell) of ``keys``: their pids."""
    async with Client.for_site(site, timeout_s=2.0) as client:
        deadline = time.monotonic() + timeout_s
        table: dict[tuple[str, str], int] = {}
        while time.monotonic() < deadline:
            try:
                rows = (await client.naming()).table("instances")
                table = {k: rows[k].pid for k in keys if k in rows}  # type: ignore[attr-defined]
            except RemoteError:
                pass
            if len(table) == len(keys):
                return table
            await asyncio.sleep(0.1)
        raise AssertionError(f"not registered within {timeout_s:g} s: {sorted(set(keys) - set(table))}")


def set_password_offline(site: SiteConfig, user: str, password: str) -> None:
    rec = make_verifier(user, site.name, password, TEST_KDF)
    with offline_policy(site) as (obj, tx):
        obj.set_password(tx, user, salt=rec.salt, verifier=rec.verifier, t=TEST_KDF.t, p=TEST_KDF.p,
                         m_kib=TEST_KDF.m_kib)


# --- no cache ---------------------------------------------------------------------------------------


def test_without_a_cache_controllers_and_site_up_exit_78_naming_the_tool(tmp_path: Path, procs: Processes) -> None:
    path = write_site(tmp_path)
    site = load_site(path)
    cache_path(site.dataset).unlink()
    hint = f"ubi-cache-credentials --site {path}"

    for args in (("controller", "--host", "host-a", "-d"), ("controller", "--host", "host-a")):
        started = time.monotonic()
        code, out, err = procs.run("controller", ubi(path, *args))  # stdin is not a terminal
        assert code == EX_CONFIG, (args, err)
        assert time.monotonic() - started < 5.0
        line = one_line(err)
        assert line.startswith("ubi: ") and hint in line, line
        assert str(cache_path(site.dataset)) in line
        assert out == ""

    proc = procs.start("site-up", ubi(path, "site", "up", "-d"))
    code = proc.wait(20)
    out, err = procs.output(proc)
    assert code != 0
    assert hint in one_line(err)
    assert "up:" not in out
    time.sleep(0.2)
    assert group_gone(proc.pid), "site up left processes running"
    assert port_free(site.core.rpc_port) and port_free(site.core.event_port)
    assert not cache_path(site.dataset).exists()  # nobody wrote one


# --- with the cache ---------------------------------------------------------------------------------


def test_a_controller_with_d_comes_up_on_the_cache_and_reports_it_out_of_date_until_recached(
    tmp_path: Path, procs: Processes
) -> None:
    path = write_site(tmp_path)
    site = load_site(path)
    assert read_cache(cache_path(site.dataset))[site.name].user == SERVICE_USER

    core = procs.start("core", ubi(path, "core", "-d"))
    controller = procs.start("controller-a", ubi(path, "controller", "--host", "host-a", "-d"))
    pids = asyncio.run(registered(site, HOST_A))
    assert len(set(pids.values())) == 2 and controller.pid not in pids.values()
    assert controller.poll() is None and core.poll() is None
    assert procs.stop(controller) == 0

    # The operator gives site-service a new password over the wire; the cache is now stale.
    env = {**ENV, "UBI_USER": OPERATOR[0], "UBI_PASSWORD": OPERATOR[1], "UBI_NEW_PASSWORD": "a-new-one-1234"}
    code, out, err = procs.run("passwd", ubi(path, "security", "users", "passwd", SERVICE_USER), env=env)
    assert code == 0, err
    assert f"password of {SERVICE_USER} changed" in out

    # A controller started now says so at once, naming the tool, and waits: the salt that
    # told it is not authenticated (an impostor core could say the same), so it neither
    # gives up for good nor comes up.
    stale = procs.start("controller-a2", ubi(path, "controller", "--host", "host-a", "-d"))
    deadline = time.monotonic() + 10.0
    while "out of date" not in procs.output(stale)[1] and time.monotonic() < deadline:
        time.sleep(0.1)
    err = procs.output(stale)[1]
    assert "out of date" in err and f"ubi-cache-credentials --site {path}" in err, err
    assert "Traceback" not in err
    assert stale.poll() is None and core.poll() is None

    # Caching the new password brings it up, without a restart.
    cached = subprocess.run(
        [sys.executable, "-m", "ubicore.credentials.tool", "--site", str(path), "--user", SERVICE_USER,
         "--password-stdin"], input="a-new-one-1234\n", capture_output=True, text=True, env=ENV, timeout=30)
    assert cached.returncode == 0, cached.stderr
    asyncio.run(registered(site, HOST_A))
    assert stale.poll() is None


# --- secrets ----------------------------------------------------------------------------------------


def _forms(secret: bytes) -> list[bytes]:
    return [secret, secret.hex().encode(), secret.hex().upper().encode(), base64.b64encode(secret)]


def test_no_log_line_or_file_but_credentials_dat_holds_the_secret(tmp_path: Path, procs: Processes) -> None:
    path = write_site(tmp_path)
    site = load_site(path)
    first: CachedCredential = read_cache(cache_path(site.dataset))[site.name]  # init_site's random password's π

    # A known password for site-service (set while the site is down), cached with the tool.
    set_password_offline(site, SERVICE_USER, PASSWORD)
    tool = [sys.executable, "-m", "ubicore.credentials.tool", "--site", str(path), "--offline",
            "--user", SERVICE_USER, "--password-stdin"]
    cached = subprocess.run(tool, input=PASSWORD + "\n", capture_output=True, text=True, timeout=20, env=ENV)
    assert cached.returncode == 0, cached.stderr
    second: CachedCredential = read_cache(cache_path(site.dataset))[site.name]
    assert not second.scalar.equals(first.scalar)

    up = procs.start("site-up", ubi(path, "--log-level", "debug", "site", "up", "-d"))
    try:
        asyncio.run(registered(site, ALL))

        async def log_in() -> None:
            for creds in (Credentials.password(SERVICE_USER, PASSWORD), service_credentials(site)):
                async with Client.for_site(site, timeout_s=5.0, credentials=creds) as client:
                    assert await client.login(NAMING_CELL, NAMING_SCHEMA) == SERVICE_USER
                    await client.call(NAMING_CELL, "UPerm::Config", "settings")
                    await client.login("Site", CONFIG)

        asyncio.run(log_in())
    finally:
        assert procs.stop(up) == 0
    out, err = procs.output(up)
    assert "DEBUG" in err and "site-service" in err  # the logs were at debug level and speak of the user

    needles = [PASSWORD.encode(), *_forms(first.scalar.value), *_forms(second.scalar.value)]
    texts = {"tool stdout": cached.stdout.encode(), "tool stderr": cached.stderr.encode()}
    allowed = {cache_path(site.dataset), perm_path(site)}
    scanned = 0
    for root, _, names in os.walk(tmp_path):
        for name in names:
            file = Path(root) / name
            if file in allowed or not file.is_file() or file.is_symlink():
                continue
            texts[str(file)] = file.read_bytes()
            scanned += 1
    assert scanned >= 4 and str(path) in texts  # the site file, the logs, the instances' stores
    assert {f.name for f in (tmp_path / "logs").iterdir()} <= {Path(k).name for k in texts}
    leaks = [(where, needles.index(n)) for where, data in texts.items() for n in needles if n in data]
    assert leaks == [], leaks
    # the cache itself holds π (and only π: never the password)
    data = cache_path(site.dataset).read_bytes()
    assert second.scalar.value in data and PASSWORD.encode() not in data


# --- the prompt on a terminal --------------------------------------------------------------------


class Terminal:
    """``ubi ARGS`` on a pseudo-terminal that runs on (unlike pty_support.in_terminal,
    which waits for the command to end): a thread keeps reading what it shows."""

    def __init__(self, args: list[str]) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", TTY_WRAPPER, *args], stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True, env=ENV, close_fds=True)
        os.close(slave)
        self._seen = b""
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while True:
            try:
                ready, _, _ = select.select([self.master], [], [], 0.05)
                if not ready:
                    if self.proc.poll() is not None:
                        return
                    continue
                chunk = os.read(self.master, 4096)
            except (OSError, ValueError):  # the child closed the terminal, or we did
                return
            if not chunk:
                return
            with self._lock:
                self._seen += chunk

    @property
    def seen(self) -> str:
        with self._lock:
            return self._seen.decode(errors="replace").replace("\r\n", "\n")

    def answer(self, prompt: str, line: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while prompt not in self.seen.rsplit("\n", 1)[-1]:
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise AssertionError(f"not asked {prompt!r}; the terminal showed {self.seen!r}")
            time.sleep(0.02)
        os.write(self.master, line.encode() + b"\n")

    def close(self) -> None:
        try:
            Processes.stop(self.proc)
        finally:
            self._reader.join(2.0)
            os.close(self.master)


@contextlib.contextmanager
def terminal(path: Path, *args: str) -> Iterator[Terminal]:
    t = Terminal(["--site", str(path), *args])
    try:
        yield t
    finally:
        t.close()


def test_on_a_terminal_a_controller_asks_for_a_service_user_and_comes_up(tmp_path: Path, procs: Processes) -> None:
    path = write_site(tmp_path)
    site = load_site(path)
    cache_path(site.dataset).unlink()
    add_service_user(site, "svc", PASSWORD, kdf=TEST_KDF)
    procs.start("core", ubi(path, "core"))

    wrong = "not-" + PASSWORD
    for user, password in (("svc", wrong), ("nobody-such", PASSWORD)):
        with terminal(path, "controller", "--host", "host-a") as t:
            t.answer(f"service user for site {site.name}", user)
            t.answer(f"password for {user}", password)
            code = t.proc.wait(20)
            shown = t.seen
        assert code != 0, shown
        errors = [ln for ln in shown.split(f"password for {user}", 1)[1].splitlines() if ln.strip(" :")]
        assert len(errors) == 1 and errors[0].startswith("ubi: "), shown
        assert password not in shown  # hidden input
        assert "Traceback" not in shown

    with terminal(path, "controller", "--host", "host-a") as t:
        t.answer(f"service user for site {site.name}", "svc")
        t.answer("password for svc", PASSWORD)
        pids = asyncio.run(registered(site, HOST_A))
        assert t.proc.poll() is None and t.proc.pid not in pids.values()
        assert PASSWORD not in t.seen  # the answer was not echoed
        # the instances got the credentials in memory: nothing was cached on disk
        assert not cache_path(site.dataset).exists()
        assert Processes.stop(t.proc) == 0
        assert "Traceback" not in t.seen, t.seen
