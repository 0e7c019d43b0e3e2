"""Benchmark child: the core (naming) and every instance a site file plans, in one loop.

Usage: ``python bench/ubicore_child.py SITE_FILE``. The site imports :mod:`schemas`
(this directory is ``sys.path[0]`` when run as a script). Prints
``READY {"pid": ...}`` once serving; stops cleanly when stdin closes, on SIGTERM or
SIGINT, and after ``MAX_LIFETIME_S`` whatever happens. With ``UBENCH_PROFILE=FILE`` in
the environment it runs under cProfile and writes the stats to FILE when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ubicore.config import load_site  # noqa: E402
from ubicore.runtime import serve_core, serve_instance  # noqa: E402

MAX_LIFETIME_S = 600.0


def _watch_stdin(loop: asyncio.AbstractEventLoop, stop: asyncio.Event) -> None:
    try:
        while sys.stdin.buffer.read(4096):
            pass
    except (OSError, ValueError):
        pass
    with contextlib.suppress(RuntimeError):  # the loop is already closed
        loop.call_soon_threadsafe(stop.set)


async def serve(site_path: str) -> None:
    site = load_site(site_path)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    threading.Thread(target=_watch_stdin, args=(loop, stop), daemon=True).start()
    async with serve_core(site), contextlib.AsyncExitStack() as stack:
        for plan in site.instances:
            await stack.enter_async_context(serve_instance(site, plan))
        print("READY " + json.dumps({"pid": os.getpid()}), flush=True)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), MAX_LIFETIME_S)


def main() -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    profile_to = os.environ.get("UBENCH_PROFILE")
    if not profile_to:
        asyncio.run(serve(sys.argv[1]))
        return
    import cProfile

    prof = cProfile.Profile()
    prof.enable()
    try:
        asyncio.run(serve(sys.argv[1]))
    finally:
        prof.disable()
        prof.dump_stats(profile_to)


if __name__ == "__main__":
    main()
