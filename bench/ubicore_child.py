"""Benchmark child: the core (naming) and every instance a site file plans, in one loop.

Usage: ``python bench/ubicore_child.py SITE_FILE``. The site imports :mod:`schemas`
(this directory is ``sys.path[0]`` when run as a script). Prints
``READY {"pid": ...}`` once serving; stops cleanly when stdin closes, on SIGTERM or
SIGINT, and after ``MAX_LIFETIME_S`` whatever happens (:mod:`childproc`). With
``UBENCH_PROFILE=FILE`` in the environment it runs under cProfile and writes the stats
to FILE when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import childproc  # noqa: E402
from ubicore.config import load_site  # noqa: E402
from ubicore.runtime import serve_core, serve_instance  # noqa: E402


async def serve(site_path: str) -> None:
    site = load_site(site_path)
    stop = childproc.stop_event()
    async with serve_core(site), contextlib.AsyncExitStack() as stack:
        for plan in site.instances:
            await stack.enter_async_context(serve_instance(site, plan))
        childproc.ready(pid=os.getpid())
        await childproc.until_stopped(stop)


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
