"""Helpers for tests of ubicore and of applications built on it.

:mod:`.site` serves a whole site in one process (core, instances, a client) on
loopback with free ports, and runs ``async def`` tests under a hard timeout;
:mod:`.schemas` declares ``UTest::Counter``, the schema those tests deploy;
:mod:`.peers` joins a caller and an instance, or a publisher and a follower, in memory
(no sockets, no loop); :mod:`.processes` runs ``ubi site up`` as real processes.
"""

from .schemas import COUNTER, Counter
from .site import (
    CONFIG_UPDATE,
    DEFAULT_TEST_TIMEOUT_S,
    OPERATOR,
    POSITIONS,
    REGISTER_WAIT_S,
    TEST_DEPLOYMENTS,
    TEST_IMPORTS,
    TEST_KDF,
    LeakedSockets,
    RunningSite,
    free_port,
    free_ports,
    run_async,
    running_site,
    site_yaml,
)

__all__ = [
    "CONFIG_UPDATE",
    "COUNTER",
    "DEFAULT_TEST_TIMEOUT_S",
    "OPERATOR",
    "POSITIONS",
    "REGISTER_WAIT_S",
    "TEST_DEPLOYMENTS",
    "TEST_IMPORTS",
    "TEST_KDF",
    "Counter",
    "LeakedSockets",
    "RunningSite",
    "free_port",
    "free_ports",
    "run_async",
    "running_site",
    "site_yaml",
]
