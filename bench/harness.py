"""Plumbing shared by the benchmarks: child processes, free ports, statistics, machine facts.

A :class:`Child` runs ``python bench/<script> ...`` with a pipe on its stdin and stdout.
It prints one line ``READY <json>`` once it serves, and exits when its stdin closes
(so a bench process that dies takes its children with it). :meth:`Child.close` closes
stdin, waits, then terminates and finally kills: every child ends, whatever happened.
"""

from __future__ import annotations

import json
import math
import os
import platform
import select
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
READY_PREFIX = "READY "
READY_TIMEOUT_S = 20.0
CLOSE_TIMEOUT_S = 5.0
MEASURE_TIMEOUT_S = 30.0
"""No single measurement runs longer than this; past it, it is reported incomplete."""


def log(msg: str) -> None:
    """Progress for humans, on stderr (stdout carries only the JSON document)."""
    print(msg, file=sys.stderr, flush=True)


def free_port() -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A benchmark child process (see module docstring)."""

    def __init__(self, script: str, *args: str, env: Mapping[str, str] | None = None,
                 ready_timeout_s: float = READY_TIMEOUT_S) -> None:
        self.name = script
        self._stderr = tempfile.TemporaryFile()
        full_env = dict(os.environ)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            [sys.executable, str(BENCH_DIR / script), *args],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr, env=full_env,
        )
        try:
            self.info: dict[str, Any] = self._wait_ready(ready_timeout_s)
        except BaseException:
            self.close()
            raise

    def _wait_ready(self, timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout_s
        while b"\n" not in buf:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError(f"{self.name} not ready within {timeout_s:g} s:\n{self.log_tail()}")
            ready, _, _ = select.select([fd], [], [], remaining)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited before it was ready:\n{self.log_tail()}")
                buf += chunk
        line = buf.split(b"\n", 1)[0].decode()
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"{self.name} said {line!r} instead of READY:\n{self.log_tail()}")
        return dict(json.loads(line[len(READY_PREFIX):]))

    def log_tail(self, chars: int = 3000) -> str:
        try:
            self._stderr.seek(0)
            return self._stderr.read().decode(errors="replace")[-chars:]
        except (OSError, ValueError):
            return ""

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> int | None:
        """Close stdin (the child exits), then terminate, then kill. Its exit status."""
        proc = self.proc
        try:
            if proc.stdin is not None and not proc.stdin.closed:
                try:
                    proc.stdin.close()
                except OSError:
                    pass
            try:
                return proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.terminate()
            try:
                return proc.wait(2.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                return proc.wait(2.0)
        finally:
            if proc.stdout is not None:
                proc.stdout.close()
            self._stderr.close()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 1]) of an already sorted sequence."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)


def ratio(ours: float, raw: float) -> float | None:
    if not raw or math.isnan(ours) or math.isnan(raw):
        return None
    return round(ours / raw, 3)


def machine() -> dict[str, Any]:
    """Facts about the machine and the software under measurement."""
    import msgpack
    import zmq

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        affinity = None
    try:
        load = os.getloadavg()
    except OSError:  # pragma: no cover
        load = None
    try:
        from importlib.metadata import version

        ubicore_version = version("ubicore")
    except Exception:  # pragma: no cover - not installed
        ubicore_version = None
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "loadavg": load,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "ubicore": ubicore_version,
    }
