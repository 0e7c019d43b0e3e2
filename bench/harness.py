"""Plumbing shared by the benchmarks: child processes, site files on free ports,
statistics, machine facts.

A :class:`Child` runs ``python bench/<script> ...`` with a pipe on its stdin and stdout.
It prints one line ``READY <json>`` once it serves, and exits when its stdin closes
(so a bench process that dies takes its children with it; :mod:`childproc` is the
child's side). :meth:`Child.close` (or leaving ``with Child(...)``) closes stdin, waits,
then terminates and finally kills: every child ends, whatever happened.
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
from typing import Any, Self

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


SITE_TEMPLATE = """\
site: {site}
dataset: {dataset}
imports: [{imports}]
core: {{host: bench, rpc_port: {rpc}, event_port: {events}}}
hosts:
  bench: {{address: 127.0.0.1}}
cells:
  Site:
    level: site
    host: bench
    children:
{zones}deployments:
{deployments}"""


def write_site(directory: Path, site: str, dataset: Path, imports: str,
               deployments: Sequence[Mapping[str, str]]) -> Path:
    """Write ``directory/<site>.yaml``: one host (127.0.0.1), the core on two free ports,
    a zone under ``Site`` for each deployment's cell, the deployments (each a flow
    mapping of its items, in order)."""
    rpc = free_port()
    events = free_port()
    while events == rpc:
        events = free_port()
    zones = "".join(f"      {cell}: {{level: zone}}\n" for cell in dict.fromkeys(d["cell"] for d in deployments))
    lines = "".join("  - {" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}\n" for d in deployments)
    path = directory / f"{site}.yaml"
    path.write_text(SITE_TEMPLATE.format(site=site, dataset=dataset, imports=imports, rpc=rpc, events=events,
                                         zones=zones, deployments=lines))
    return path


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

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

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


def percentile_us(latencies_s: Sequence[float], q: float) -> float:
    """The q-percentile of latencies in seconds, in µs rounded to 0.1."""
    return round(percentile(sorted(latencies_s), q) * 1e6, 1)


def ratio(ours: float, raw: float) -> float | None:
    if not raw or math.isnan(ours) or math.isnan(raw):
        return None
    return round(ours / raw, 3)


def paired_ratio(ours: Sequence[float], base: Sequence[float]) -> tuple[float | None, list[float | None]]:
    """Per-repetition ratios ours[i] / base[i], and their median (None if none is defined)."""
    runs = [ratio(o, b) for o, b in zip(ours, base)]
    defined = [r for r in runs if r is not None]
    return (median(defined) if defined else None), runs


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
