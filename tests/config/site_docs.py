"""Shared helpers for the site file tests (imported by name; not a conftest, so that test folders do not collide)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ubicore.config import SiteConfig, parse_site
from ubicore.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "cells" / "demo.yaml"
SOURCE = "cells/demo.yaml"

POSITIONS = "ULocation::Positions"
CONFIG_UPDATE = "ULocationSystem::ConfigurationUpdate"

MINIMAL = """\
site: t
dataset: data
core: {host: h, rpc_port: 7700, event_port: 7701}
hosts:
  h: {address: 127.0.0.1}
  g: {address: 127.0.0.2}
cells:
  Site:
    level: site
    host: h
    children:
      B1:
        level: building
        children:
          Z1: {level: zone}
          Z2: {level: zone, host: g}
deployments:
  - {schema: A::B, level: zone}
"""


def demo_doc() -> dict[str, Any]:
    """The demo site's document with its deployments pinned to a fixed, known shape (the
    error tests address deployments by index; the demo file may deploy more)."""
    doc = yaml.safe_load(DEMO.read_text(encoding="utf-8"))
    assert isinstance(doc, dict)
    doc["deployments"] = [
        {"schema": CONFIG_UPDATE, "level": "site"},
        {"schema": POSITIONS, "level": "zone", "options": {"rate_hz": 5, "tags": 6}},
    ]
    return doc


def minimal_doc() -> dict[str, Any]:
    doc = yaml.safe_load(MINIMAL)
    assert isinstance(doc, dict)
    return doc


def parse_doc(doc: Any, source: str = SOURCE) -> SiteConfig:
    return parse_site(yaml.safe_dump(doc, sort_keys=False), source)


def config_error(doc: Any) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_doc(doc)
    assert info.value.file == SOURCE
    return info.value
