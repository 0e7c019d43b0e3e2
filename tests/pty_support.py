"""Running ``ubi`` on a pseudo-terminal, for tests of its prompts."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

TTY_WRAPPER = (
    "import fcntl, os, sys, termios\n"
    "fcntl.ioctl(0, termios.TIOCSCTTY, 0)\n"  # the pty becomes the controlling terminal (getpass opens /dev/tty)
    "os.execv(sys.executable, [sys.executable, '-m', 'ubicore.tools.cli', *sys.argv[1:]])\n"
)


def in_terminal(args: list[str], answers: list[tuple[str, str]], timeout_s: float = 20.0) -> tuple[int, str]:
    """Run ``ubi ARGS`` on a pseudo-terminal; answer each prompt (text awaited, line to
    type) in turn; (exit status, everything the terminal showed)."""
    master, slave = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("UBI_")}
    proc = subprocess.Popen([sys.executable, "-c", TTY_WRAPPER, *args], stdin=slave, stdout=slave, stderr=slave,
                            start_new_session=True, env=env, close_fds=True)
    os.close(slave)
    seen = b""
    deadline = time.monotonic() + timeout_s
    pending = list(answers)
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # the child closed the terminal
                    break
                if not chunk:
                    break
                seen += chunk
            if pending and pending[0][0].encode() in seen.rsplit(b"\n", 1)[-1]:
                os.write(master, pending.pop(0)[1].encode() + b"\n")
            if proc.poll() is not None and not ready:
                break
        code = proc.wait(max(0.1, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    assert not pending, f"not asked {pending}; the terminal showed {seen!r}"
    return code, seen.decode(errors="replace").replace("\r\n", "\n")
