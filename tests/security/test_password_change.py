"""A new password ends the sessions made with the old one (and only those)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from ubicore.errors import AuthenticationFailed
from ubicore.schema import Protection
from ubicore.security.policy import Right
from ubicore.testing import COUNTER, run_async, running_site


@run_async
async def test_a_changed_password_ends_that_users_sessions(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(COUNTER, "Site")]) as rs:
        rs.policy.set_level(COUNTER, Protection.UPDATE)
        rs.policy.set_user("pat", "old-password", Right.UPDATE)
        server = rs.server(COUNTER, "Site")
        async with asyncio.timeout(5):
            while server.core.protection is not Protection.UPDATE:
                await asyncio.sleep(0.01)
        pat = rs.new_client(user=("pat", "old-password"))
        other = rs.new_client()
        assert await pat.call("Site", COUNTER, "bump", name="a") == 1
        assert await other.call("Site", COUNTER, "bump", name="a") == 2
        before = {s.user for s in server.core.guard.sessions.values()}
        assert {"pat", "operator"} <= before
        other_logins = other.sessions.logins

        rs.policy.set_user("pat", "new-password", Right.UPDATE)  # e.g. after a leak
        async with asyncio.timeout(5):
            while "pat" in {s.user for s in server.core.guard.sessions.values()}:
                await asyncio.sleep(0.01)
        with pytest.raises(AuthenticationFailed):  # its session is gone, the old password no longer logs in
            await pat.call("Site", COUNTER, "bump", name="a")
        assert await other.call("Site", COUNTER, "bump", name="a") == 3
        assert other.sessions.logins == other_logins  # the operator's session was not touched
        fresh = rs.new_client(user=("pat", "new-password"))
        assert await fresh.call("Site", COUNTER, "bump", name="a") == 4
