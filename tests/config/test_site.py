"""Tests for the site file parser: the demo site, queries, parsing, frozenness."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
from .site_docs import CONFIG_UPDATE, DEMO, MINIMAL, POSITIONS, REPO, SOURCE, minimal_doc, parse_doc

from ubicore.config import (
    CellConfig,
    CoreConfig,
    HostConfig,
    InstancePlan,
    SiteConfig,
    load_site,
    parse_site,
)



# -- the demo site ----------------------------------------------------------------------


def test_demo_parses_with_expected_instances_and_hosts() -> None:
    site = load_site(DEMO)
    assert site.name == "demo"
    assert site.source == DEMO
    assert site.dataset == (REPO / ".ubicore" / "demo")
    assert site.dataset.is_absolute()
    assert site.imports == ()
    assert dict(site.hosts) == {
        "host-a": HostConfig("host-a", "127.0.0.1"),
        "host-b": HostConfig("host-b", "127.0.0.2"),
    }
    assert site.core == CoreConfig("host-a", "127.0.0.1", 7700, 7701)
    assert site.core.rpc_endpoint == "tcp://127.0.0.1:7700"
    assert site.core.event_endpoint == "tcp://127.0.0.1:7701"
    assert site.levels == ("site", "building", "zone")
    assert list(site.cells) == ["Site", "Building-1", "Zone-A", "Zone-B", "Building-2", "Zone-C"]
    assert site.cells["Site"] == CellConfig("Site", "site", "host-a", None, ("Building-1", "Building-2"))
    assert site.cells["Building-2"] == CellConfig("Building-2", "building", "host-b", "Site", ("Zone-C",))
    opts = {"rate_hz": 5, "tags": 6}
    assert [(i.schema, i.cell, i.host, i.protection, dict(i.options)) for i in site.instances] == [
        (CONFIG_UPDATE, "Site", "host-a", None, {}),
        (POSITIONS, "Zone-A", "host-a", None, opts),
        (POSITIONS, "Zone-B", "host-b", None, opts),
        (POSITIONS, "Zone-C", "host-b", "full", opts),
    ]
    assert [(i.schema, i.cell) for i in site.instances_for_host("host-a")] == [
        (CONFIG_UPDATE, "Site"), (POSITIONS, "Zone-A")]
    assert [(i.schema, i.cell) for i in site.instances_for_host("host-b")] == [
        (POSITIONS, "Zone-B"), (POSITIONS, "Zone-C")]
    assert site.cells_at_level("zone") == ("Zone-A", "Zone-B", "Zone-C")
    assert site.cells_at_level("building") == ("Building-1", "Building-2")
    plan = site.instance(POSITIONS, "Zone-B")
    assert isinstance(plan, InstancePlan) and plan.host == "host-b"
    assert site.instance(POSITIONS, "Site") is None
    assert site.instance("No::Such", "Zone-A") is None
    assert [(d.level, d.cell) for d in site.deployments] == [
        ("site", None), (None, "Zone-A"), (None, "Zone-B"), (None, "Zone-C")]


def test_load_site_accepts_str_path() -> None:
    assert load_site(str(DEMO)).name == "demo"


def test_ancestors_and_is_within() -> None:
    site = load_site(DEMO)
    assert site.ancestors("Zone-C") == ("Building-2", "Site")
    assert site.ancestors("Building-1") == ("Site",)
    assert site.ancestors("Site") == ()
    assert site.is_within("Zone-A", "Building-1")
    assert site.is_within("Zone-A", "Site")
    assert site.is_within("Zone-A", "Zone-A")
    assert not site.is_within("Zone-C", "Building-1")
    assert not site.is_within("Site", "Zone-A")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.ancestors("Nope"),
        lambda s: s.is_within("Nope", "Site"),
        lambda s: s.is_within("Site", "Nope"),
        lambda s: s.instance(POSITIONS, "Nope"),
        lambda s: s.cells_at_level("floor"),
        lambda s: s.instances_for_host("host-z"),
    ],
)
def test_unknown_names_in_queries_raise_value_error(call: Callable[[SiteConfig], object]) -> None:
    site = load_site(DEMO)
    with pytest.raises(ValueError, match="Nope|floor|host-z"):
        call(site)


def test_relative_dataset_is_relative_to_the_site_file(tmp_path: Path) -> None:
    (tmp_path / "cells").mkdir()
    path = tmp_path / "cells" / "site.yaml"
    path.write_text(MINIMAL.replace("dataset: data", "dataset: ../store/x"), encoding="utf-8")
    assert load_site(path).dataset == tmp_path / "store" / "x"
    absolute = tmp_path / "elsewhere"
    path.write_text(MINIMAL.replace("dataset: data", f"dataset: {absolute}"), encoding="utf-8")
    assert load_site(path).dataset == absolute


def test_parse_site_resolves_dataset_against_source(tmp_path: Path) -> None:
    site = parse_site(MINIMAL, tmp_path / "a" / "site.yaml")
    assert site.dataset == tmp_path / "a" / "data"
    assert site.source == tmp_path / "a" / "site.yaml"


def test_host_inheritance_and_derived_levels() -> None:
    site = parse_site(MINIMAL, SOURCE)
    assert site.cells["B1"].host == "h"
    assert site.cells["Z1"].host == "h"
    assert site.cells["Z2"].host == "g"
    assert site.levels == ("site", "building", "zone")  # no `levels:` given: tree order
    assert [(i.cell, i.host) for i in site.instances] == [("Z1", "h"), ("Z2", "g")]


def test_ipv6_core_endpoint_and_host_names() -> None:
    doc = minimal_doc()
    doc["hosts"]["h"]["address"] = "::1"
    doc["hosts"]["g"]["address"] = "node-2.example.org"
    site = parse_doc(doc)
    assert site.core.rpc_endpoint == "tcp://[::1]:7700"
    assert site.core.event_endpoint == "tcp://[::1]:7701"


def test_deployment_by_cell_protection_options_and_imports() -> None:
    doc = minimal_doc()
    doc["imports"] = ["mypkg.schemas", "other"]
    doc["deployments"].append({"schema": "X::Y", "cell": "B1", "protection": "full",
                               "options": {"a": [1, {"b": None}], "c": {"d": 1.5}}})
    site = parse_doc(doc)
    assert site.imports == ("mypkg.schemas", "other")
    plan = site.instance("X::Y", "B1")
    assert plan is not None and plan.protection == "full" and plan.host == "h"
    assert plan.options["a"] == (1, {"b": None})
    assert site.deployments[1].cell == "B1" and site.deployments[1].level is None


# -- frozenness -------------------------------------------------------------------------


def test_objects_are_frozen_and_mappings_read_only() -> None:
    site = load_site(DEMO)
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.name = "other"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.cells["Site"].host = "host-b"  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        site.core.rpc_port = 1  # type: ignore[misc]
    with pytest.raises(TypeError):
        site.hosts["host-c"] = HostConfig("host-c", "127.0.0.3")  # type: ignore[index]
    with pytest.raises(TypeError):
        site.cells["Site"] = site.cells["Zone-A"]  # type: ignore[index]
    with pytest.raises(TypeError):
        site.instances[0].options["x"] = 1  # type: ignore[index]
    with pytest.raises(TypeError):
        site.deployments[1].options["rate_hz"] = 1  # type: ignore[index]
    # A new attribute is refused too (slots); CPython 3.11 reports it as TypeError.
    with pytest.raises((AttributeError, TypeError)):
        site.extra = 1  # type: ignore[attr-defined]
    assert isinstance(site.instances, tuple) and isinstance(site.cells["Site"].children, tuple)


def test_nested_options_are_frozen() -> None:
    doc = minimal_doc()
    doc["deployments"][0]["options"] = {"a": [1, 2], "m": {"k": [3]}}
    options = parse_doc(doc).instances[0].options
    assert options["a"] == (1, 2)
    with pytest.raises(TypeError):
        options["m"]["k"] = 1
