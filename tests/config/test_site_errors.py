"""Tests for the site file parser: every error names the file and key path; fuzzing."""

from __future__ import annotations

import copy
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from .site_docs import DEMO, MINIMAL, POSITIONS, SOURCE, config_error, demo_doc, parse_doc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ubicore.config import SiteConfig, load_site, parse_site
from ubicore.config.model import AuditConfig, Threshold
from ubicore.errors import ConfigError


# -- errors: each names the file and the exact key path ---------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return mutate


def _delete(path: tuple[Any, ...]) -> Callable[[dict[str, Any]], None]:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        del target[path[-1]]
    return mutate


B1 = ("cells", "Site", "children", "Building-1")
B1_PATH = "cells.Site.children.Building-1"

ERROR_CASES: list[tuple[str, Callable[[dict[str, Any]], None], str, str]] = [
    ("unknown top key", _set(("colour",), "red"), "colour", "unknown key"),
    ("unknown core key", _set(("core", "tls"), True), "core.tls", "unknown key"),
    ("unknown host key", _set(("hosts", "host-a", "port"), 1), "hosts.host-a.port", "unknown key"),
    ("unknown cell key", _set((*B1, "colour"), "red"), f"{B1_PATH}.colour", "unknown key"),
    ("unknown deep cell key", _set((*B1, "children", "Zone-A", "x"), 1),
     f"{B1_PATH}.children.Zone-A.x", "unknown key"),
    ("unknown deployment key", _set(("deployments", 1, "rate"), 1), "deployments[1].rate",
     "unknown key"),
    ("missing site", _delete(("site",)), "site", "missing required key"),
    ("missing cell level", _delete((*B1, "level")), f"{B1_PATH}.level", "missing required key"),
    ("missing root host", _delete(("cells", "Site", "host")), "cells.Site.host",
     "missing required key"),
    ("missing address", _delete(("hosts", "host-b", "address")), "hosts.host-b.address",
     "missing required key"),
    ("hosts not a mapping", _set(("hosts",), ["host-a"]), "hosts", "expected a mapping, got list"),
    ("cell not a mapping", _set((*B1, "children", "Zone-A"), "zone"),
     f"{B1_PATH}.children.Zone-A", "expected a mapping, got string"),
    ("deployments not a list", _set(("deployments",), {}), "deployments",
     "expected a list, got mapping"),
    ("bad address", _set(("hosts", "host-b", "address"), "not an address"),
     "hosts.host-b.address", "not an IP address"),
    ("bad dotted quad", _set(("hosts", "host-b", "address"), "127.0.0.999"),
     "hosts.host-b.address", "not an IP address"),
    ("address not a string", _set(("hosts", "host-b", "address"), 10), "hosts.host-b.address",
     "expected a string, got integer"),
    ("bad host name", _set(("hosts", "host c"), {"address": "::1"}), "hosts.host c",
     "invalid host name"),
    ("port out of range", _set(("core", "rpc_port"), 70000), "core.rpc_port", "out of range"),
    ("port zero", _set(("core", "event_port"), 0), "core.event_port", "out of range"),
    ("port as string", _set(("core", "rpc_port"), "7700"), "core.rpc_port",
     "expected an integer, got string"),
    ("port as bool", _set(("core", "rpc_port"), True), "core.rpc_port",
     "expected an integer, got boolean"),
    ("duplicate port", _set(("core", "event_port"), 7700), "core.event_port", "rpc_port"),
    ("core unknown host", _set(("core", "host"), "host-z"), "core.host", "unknown host"),
    ("cell unknown host", _set((*B1, "host"), "host-z"), f"{B1_PATH}.host", "unknown host"),
    ("bad schema name", _set(("deployments", 1, "schema"), "ULocation.Positions"),
     "deployments[1].schema", "invalid schema name"),
    ("schema with three parts", _set(("deployments", 0, "schema"), "A::B::C"),
     "deployments[0].schema", "invalid schema name"),
    ("level and cell", _set(("deployments", 1, "cell"), "Zone-A"), "deployments[1]",
     "exactly one of level or cell"),
    ("neither level nor cell", _delete(("deployments", 0, "level")), "deployments[0]",
     "exactly one of level or cell"),
    ("deployment unknown level", _set(("deployments", 1, "level"), "floor"),
     "deployments[1].level", "unknown level"),
    ("cell unknown level", _set((*B1, "level"), "floor"), f"{B1_PATH}.level", "unknown level"),
    ("deployment unknown cell", lambda d: d["deployments"].append({"schema": "A::B", "cell": "Z"}),
     "deployments[2].cell", "unknown cell"),
    ("bad protection", _set(("deployments", 0, "protection"), "secret"),
     "deployments[0].protection", "open, update, full"),
    ("bad option value", _set(("deployments", 1, "options", "since"), {1: 2}),
     "deployments[1].options.since", "keys must be strings"),
    ("duplicate cell name", _set(("cells", "Site", "children", "Building-2", "children", "Zone-A"),
                                 {"level": "zone"}),
     "cells.Site.children.Building-2.children.Zone-A", "duplicate cell name"),
    ("duplicate cell name of root", _set((*B1, "children", "Site"), {"level": "zone"}),
     f"{B1_PATH}.children.Site", "duplicate cell name"),
    ("duplicate instance", lambda d: d["deployments"].append({"schema": POSITIONS, "cell": "Zone-B"}),
     "deployments[2]", "already deployed"),
    ("bad cell name", _set((*B1, "children", "Zone D"), {"level": "zone"}),
     f"{B1_PATH}.children.Zone D", "invalid cell name"),
    ("bad site name", _set(("site",), "my site"), "site", "invalid site name"),
    ("bad import", _set(("imports",), ["ok.mod", "not-a-module"]), "imports[1]", "invalid module"),
    ("duplicate level", _set(("levels",), ["site", "zone", "site"]), "levels[2]", "duplicate level"),
    ("root not named Site", lambda d: d.__setitem__("cells", {"Campus": d["cells"]["Site"]}),
     "cells.Campus", "must be named 'Site'"),
    ("two roots", _set(("cells", "Other"), {"level": "site", "host": "host-a"}), "cells",
     "exactly one root"),
    ("no root", _set(("cells",), {}), "cells", "exactly one root"),
    ("top not a mapping", lambda d: d.clear(), "site", "missing required key"),
]


@pytest.mark.parametrize(("mutate", "key_path", "problem"),
                         [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors_name_the_key_path(mutate: Callable[[dict[str, Any]], None], key_path: str,
                                  problem: str) -> None:
    doc = demo_doc()
    parse_doc(doc)  # the unmutated demo is fine
    mutate(doc)
    err = config_error(doc)
    assert err.key_path == key_path
    assert problem in err.problem
    assert str(err).startswith(f"{SOURCE}: {key_path}: " if key_path else f"{SOURCE}: ")


def test_deployment_at_level_without_cells() -> None:
    doc = demo_doc()
    doc["levels"].append("floor")
    doc["deployments"].append({"schema": "A::B", "level": "floor"})
    err = config_error(doc)
    assert (err.key_path, err.problem) == ("deployments[2].level", "no cell has level 'floor'")


@pytest.mark.parametrize("text", ["[1, 2]", "", "just a string"])
def test_document_not_a_mapping(text: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_site(text, SOURCE)
    assert info.value.key_path == ""
    assert "expected a mapping" in info.value.problem


def test_yaml_syntax_error_has_line_number() -> None:
    text = "site: demo\nhosts: {a: [1, 2}\n"
    with pytest.raises(ConfigError) as info:
        parse_site(text, SOURCE)
    assert info.value.key_path == ""
    assert "line 2" in info.value.problem


def test_duplicate_yaml_key_is_an_error() -> None:
    text = DEMO.read_text(encoding="utf-8").replace("site: demo\n", "site: demo\nsite: other\n")
    with pytest.raises(ConfigError) as info:
        parse_site(text, SOURCE)
    assert info.value.key_path == ""
    assert "duplicate key 'site'" in info.value.problem


@pytest.mark.parametrize("text", ["d: 2020-13-45", "a: &x [*x]", "a: !!binary '*'",
                                  "a: !!python/object:os.system {}", "\x00", "[" * 5000])
def test_hostile_yaml_is_a_config_error(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_site(text, SOURCE)


def test_recursive_options_are_refused() -> None:
    text = DEMO.read_text(encoding="utf-8").replace("options: {rate_hz: 5, tags: 6}",
                                                    "options: {loop: &l [*l]}", 1)
    with pytest.raises(ConfigError) as info:
        parse_site(text, SOURCE)
    assert info.value.key_path.startswith("deployments[1].options.loop")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_site(path)
    assert info.value.file == str(path)
    assert info.value.key_path == ""
    assert info.value.problem.startswith("cannot read: ")


def test_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_site(tmp_path)  # a directory
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"site: \xff\xfe\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load_site(binary)


def test_error_uses_path_as_given(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(MINIMAL.replace("rpc_port: 7700", "rpc_port: -1"), encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_site("s.yaml")
    assert str(info.value).startswith("s.yaml: core.rpc_port: ")


# -- property: any mutation parses or raises ConfigError --------------------------------

_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=3)
                       | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=3),
                       max_leaves=8)


def _slots(node: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path inside the document (mapping keys and list indexes)."""
    out: list[tuple[Any, ...]] = []
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, child in items:
        out.append((*path, key))
        out.extend(_slots(child, (*path, key)))
    return out


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_demo_parses_or_raises_config_error(data: st.DataObject) -> None:
    doc = copy.deepcopy(_DEMO_DOC)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        slots = _slots(doc)
        if not slots:
            break
        path = data.draw(st.sampled_from(slots), label="path")
        target: Any = doc
        for key in path[:-1]:
            target = target[key]
        if data.draw(st.booleans(), label="delete"):
            del target[path[-1]]
        else:
            target[path[-1]] = data.draw(_values, label="value")
    try:
        site = parse_doc(doc)
    except ConfigError as err:
        assert err.file == SOURCE
    else:
        assert isinstance(site, SiteConfig)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_arbitrary_text_parses_or_raises_config_error(text: str) -> None:
    try:
        parse_site(text, SOURCE)
    except ConfigError:
        pass


@settings(max_examples=200, deadline=None)
@given(cut=st.integers(0, 2000), junk=st.text(max_size=10))
def test_spliced_demo_text_parses_or_raises_config_error(cut: int, junk: str) -> None:
    text = _DEMO_TEXT[:cut] + junk + _DEMO_TEXT[cut:]
    try:
        parse_site(text, SOURCE)
    except ConfigError:
        pass


_DEMO_TEXT = textwrap.dedent(DEMO.read_text(encoding="utf-8"))
_DEMO_DOC = demo_doc()


@pytest.mark.parametrize("value, problem", [("", "non-empty"), ("/r/" + "x" * 100, "too long"), (7, "string")])
def test_a_bad_run_dir_is_named(value: Any, problem: str) -> None:
    doc = demo_doc()
    doc["run_dir"] = value
    err = config_error(doc)
    assert err.key_path == "run_dir" and problem in err.problem


def test_run_dir_is_relative_to_the_site_file_and_defaults_to_the_dataset() -> None:
    doc = demo_doc()
    assert parse_doc(doc).run_dir is None
    doc["run_dir"] = "run-here"
    assert parse_doc(doc).run_dir == Path(SOURCE).resolve().parent / "run-here"


# -- the audit section ---------------------------------------------------------------------


AUDIT_ERROR_CASES: list[tuple[str, Any, str, str]] = [
    ("not a mapping", [1], "audit", "expected a mapping, got list"),
    ("unknown key", {"lockout_s": 30}, "audit.lockout_s", "unknown key"),
    ("empty skip", {"skip_users_containing": ""}, "audit.skip_users_containing", "non-empty"),
    ("skip not a string", {"skip_users_containing": 7}, "audit.skip_users_containing",
     "expected a string, got integer"),
    ("skip null", {"skip_users_containing": None}, "audit.skip_users_containing",
     "expected a string, got null"),
    ("threshold not a mapping", {"failed_logins_per_user": 5}, "audit.failed_logins_per_user",
     "expected a mapping, got integer"),
    ("threshold unknown key", {"denials_per_user": {"count": 5, "window": 60}},
     "audit.denials_per_user.window", "unknown key"),
    ("count zero", {"failed_logins_per_address": {"count": 0}},
     "audit.failed_logins_per_address.count", "expected an integer 1..100000, got 0"),
    ("count too big", {"rejected_per_address": {"count": 100_001}},
     "audit.rejected_per_address.count", "expected an integer 1..100000"),
    ("count a float", {"failed_logins_per_user": {"count": 5.0}},
     "audit.failed_logins_per_user.count", "expected an integer"),
    ("count a bool", {"failed_logins_per_user": {"count": True}},
     "audit.failed_logins_per_user.count", "expected an integer"),
    ("window zero", {"failed_logins_per_user": {"window_s": 0}},
     "audit.failed_logins_per_user.window_s", "expected seconds > 0, got 0"),
    ("window a string", {"denials_per_user": {"window_s": "60"}},
     "audit.denials_per_user.window_s", "expected seconds > 0"),
    ("window infinite", {"denials_per_user": {"window_s": float("inf")}},
     "audit.denials_per_user.window_s", "expected seconds > 0"),
    ("lockout not a mapping", {"lockout": 30}, "audit.lockout", "expected a mapping, got integer"),
    ("lockout unknown key", {"lockout": {"base": 30}}, "audit.lockout.base", "unknown key"),
    ("lockout base negative", {"lockout": {"base_s": -1}}, "audit.lockout.base_s",
     "expected seconds > 0"),
    ("lockout max a bool", {"lockout": {"max_s": True}}, "audit.lockout.max_s",
     "expected seconds > 0"),
    ("lockout forget zero", {"lockout": {"forget_s": 0}}, "audit.lockout.forget_s",
     "expected seconds > 0"),
    ("max below base", {"lockout": {"base_s": 60, "max_s": 59}}, "audit.lockout.max_s",
     "at least lockout.base_s"),
    ("base above the default max", {"lockout": {"base_s": 7200}}, "audit.lockout.base_s",
     "at least lockout.base_s (7200)"),
    ("checkpoint not a mapping", {"checkpoint": []}, "audit.checkpoint",
     "expected a mapping, got list"),
    ("checkpoint unknown key", {"checkpoint": {"records": 10, "s": 1}}, "audit.checkpoint.s",
     "unknown key"),
    ("checkpoint records zero", {"checkpoint": {"records": 0}}, "audit.checkpoint.records",
     "expected an integer"),
    ("checkpoint seconds zero", {"checkpoint": {"seconds": 0}}, "audit.checkpoint.seconds",
     "expected seconds > 0"),
    ("key_file empty", {"key_file": ""}, "audit.key_file", "non-empty path"),
    ("checkpoint_file not a string", {"checkpoint_file": 3}, "audit.checkpoint_file",
     "expected a string"),
    ("spool_dir with NUL", {"spool_dir": "a\0b"}, "audit.spool_dir", "non-empty path"),
    ("key file is the checkpoint file", {"key_file": "a/k", "checkpoint_file": "a/../a/k"},
     "audit.checkpoint_file", "must not be the key file"),
]


@pytest.mark.parametrize(("section", "key_path", "problem"),
                         [c[1:] for c in AUDIT_ERROR_CASES], ids=[c[0] for c in AUDIT_ERROR_CASES])
def test_audit_errors_name_the_key_path(section: Any, key_path: str, problem: str) -> None:
    doc = demo_doc()
    doc["audit"] = section
    err = config_error(doc)
    assert err.key_path == key_path
    assert problem in err.problem
    assert str(err).startswith(f"{SOURCE}: {key_path}: ")


def test_audit_defaults_when_absent_or_empty() -> None:
    doc = demo_doc()
    doc.pop("audit", None)
    assert parse_doc(doc).audit == AuditConfig()
    doc["audit"] = {}
    assert parse_doc(doc).audit == AuditConfig()
    doc["audit"] = {"lockout": {}, "checkpoint": {}, "denials_per_user": {}}
    assert parse_doc(doc).audit == AuditConfig()


def test_audit_section_parses_every_key() -> None:
    doc = demo_doc()
    doc["audit"] = {
        "skip_users_containing": "[Automated]",
        "failed_logins_per_user": {"count": 3, "window_s": 30},
        "failed_logins_per_address": {"count": 10},
        "denials_per_user": {"window_s": 2.5},
        "rejected_per_address": {"count": 100, "window_s": 600},
        "lockout": {"base_s": 10, "max_s": 10, "forget_s": 86400},
        "checkpoint": {"records": 1000, "seconds": 0.5},
        "key_file": "/srv/audit.key",
        "checkpoint_file": "keys/checkpoints",
        "spool_dir": "../spool",
    }
    here = Path(SOURCE).resolve().parent
    assert parse_doc(doc).audit == AuditConfig(
        skip_users_containing="[Automated]",
        failed_logins_per_user=Threshold(3, 30.0),
        failed_logins_per_address=Threshold(10, 60.0),
        denials_per_user=Threshold(20, 2.5),
        rejected_per_address=Threshold(100, 600.0),
        lockout_base_s=10.0, lockout_max_s=10.0, lockout_forget_s=86400.0,
        checkpoint_records=1000, checkpoint_s=0.5,
        key_file=Path("/srv/audit.key"),
        checkpoint_file=here / "keys" / "checkpoints",
        spool_dir=here.parent / "spool",
    )
    audit = parse_doc(doc).audit
    assert isinstance(audit.lockout_base_s, float) and isinstance(audit.checkpoint_s, float)
    assert isinstance(audit.failed_logins_per_user.window_s, float)


def test_audit_section_in_yaml_text() -> None:
    text = MINIMAL + textwrap.dedent("""\
        audit:
          skip_users_containing: "[Automated]"
          lockout: {base_s: 30, max_s: 3600, forget_s: 3600}
          checkpoint: {records: 100, seconds: 10}
        """)
    audit = parse_site(text, SOURCE).audit
    assert audit.skip_users_containing == "[Automated]"
    assert (audit.lockout_base_s, audit.checkpoint_records) == (30.0, 100)
    with pytest.raises(ConfigError) as info:
        parse_site(text.replace("base_s: 30,", "base_s: 3601,"), SOURCE)
    assert info.value.key_path == "audit.lockout.max_s"
