"""Fixtures shared by the key-exchange tests: the users' verifier records and the frozen vectors."""

from __future__ import annotations

from typing import Any

import pytest

from ubicore.security.amp import VerifierRecord

from .amp_reference import load_vectors, make_records


@pytest.fixture(scope="module")
def records() -> dict[str, VerifierRecord]:
    return make_records()


@pytest.fixture(scope="module")
def vectors() -> dict[str, Any]:
    return load_vectors()
