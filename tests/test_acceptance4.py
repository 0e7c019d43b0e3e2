"""Acceptance review of issue 4: what the review found missing (fixed since)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ubicore.client import Client
from ubicore.login import CredentialRequest
from ubicore.sessions import Credentials
from ubicore.testing.site import CONFIG_UPDATE, OPERATOR, run_async, running_site


class Recorder:
    """A credential provider that records each request and gives its answers in turn."""

    def __init__(self, *answers: Credentials | None) -> None:
        self.answers = list(answers)
        self.requests: list[CredentialRequest] = []

    def __call__(self, request: CredentialRequest) -> Credentials | None:
        self.requests.append(request)
        return self.answers.pop(0) if len(self.answers) > 1 else self.answers[0]


@run_async
async def test_the_prompt_after_a_wrong_password_still_names_the_groups(tmp_path: Path) -> None:
    async with running_site(tmp_path, instances=[(CONFIG_UPDATE, "Site")]) as rs:
        provider = Recorder(Credentials.password(OPERATOR[0], "not-the-password"), Credentials.password(*OPERATOR))
        client: Any = Client.for_site(rs.site, timeout_s=5.0, credential_provider=provider)
        rs._clients.append(client)  # closed with the site
        await client.call("Site", CONFIG_UPDATE, "set_rate", sensor="S-001", rate_hz=4.0)
        first, second = provider.requests
        assert (second.attempt, second.failed) == (2, True)
        assert second.groups == first.groups == ("an administrator",)
        assert second.message == "This action requires an administrator."
