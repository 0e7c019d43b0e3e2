"""The ``ubi`` client commands against a live site (click's CliRunner, in process)."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner, Result

from ubicore.testing.processes import LiveSite
from ubicore.testing.site import OPERATOR
from ubicore.tools.cli import cli

CONFIG = "ULocationSystem::ConfigurationUpdate"
pytestmark = pytest.mark.timeout(60)


def ubi(live_site: LiveSite, *args: str, user: tuple[str, str] | None = OPERATOR) -> Result:
    env = {"UBI_USER": user[0], "UBI_PASSWORD": user[1]} if user else {"UBI_USER": "", "UBI_PASSWORD": None}
    return CliRunner().invoke(cli, ["--site", str(live_site.path), *args], catch_exceptions=False, env=env)


def test_an_update_needs_a_user_with_the_update_right(live_site: LiveSite) -> None:
    args = ("call", "Site", CONFIG, "set_rate", "sensor=S-002", "rate_hz=3")
    anonymous = ubi(live_site, *args, user=None)
    assert anonymous.exit_code == 1
    assert anonymous.output.strip() == (f"ubi: permission_denied: default may not update {CONFIG} at Site. "
                                       "This action requires an administrator.")
    wrong = ubi(live_site, *args, user=(OPERATOR[0], "not-the-password"))
    assert (wrong.exit_code, wrong.output.strip()) == (1, "ubi: auth_failed: authentication failed")
    assert "Traceback" not in anonymous.output + wrong.output
    assert ubi(live_site, *args).exit_code == 0


def test_services_lists_every_instance_with_state(live_site: LiveSite) -> None:
    res = ubi(live_site, "services")
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split()[:4] == ["SCHEMA", "CELL", "HOST", "STATE"]
    assert any(CONFIG in ln and "Site" in ln and "host-a" in ln for ln in lines)
    rows = json.loads(ubi(live_site, "services", "--json").output)
    assert {(r["schema"], r["cell"], r["host"]) for r in rows} >= {
        (CONFIG, "Site", "host-a"), ("ULocation::Positions", "Zone-B", "host-b"), ("UNaming::Registry", "Site", "host-a")}


def test_call_converts_arguments_by_declared_type_and_prints_result(live_site: LiveSite) -> None:
    res = ubi(live_site, "call", "Site", CONFIG, "set_rate", "sensor=S-002", "rate_hz=12.5")
    assert (res.exit_code, res.output.strip()) == (0, "ok")
    res = ubi(live_site, "call", "Site", CONFIG, "get_sensor", "sensor=S-002", "--json")
    assert res.exit_code == 0
    assert json.loads(res.output)["rate_hz"] == 12.5
    res = ubi(live_site, "call", "Site", CONFIG, "get_sensor", "sensor=S-002")
    assert "rate_hz" in res.output and "12.5" in res.output


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("set_rate", "sensor=S-404", "rate_hz=2"), "not_found: no sensor 'S-404'"),
        (("set_rate", "sensor=S-001", "rate_hz=fast"), "bad_arguments: argument 'rate_hz': 'fast' is not a float"),
        (("set_rate", "sensor=S-001", "rate_hz=-1"), "bad_arguments: rate_hz must be in"),
        (("set_rate", "sensor=S-001"), "bad_arguments: set_rate: missing argument 'rate_hz'"),
        (("set_rate", "sensor=S-001", "colour=red"), "bad_arguments: unknown argument 'colour'"),
        (("set_rate", "sensorS-001"), "bad_arguments: expected key=value"),
        (("explode",), "not_found: ULocationSystem::ConfigurationUpdate has no operation 'explode'"),
    ],
)
def test_call_errors_are_one_line_and_nonzero(live_site: LiveSite, args: tuple[str, ...], expected: str) -> None:
    res = CliRunner().invoke(cli, ["--site", str(live_site.path), "call", "Site", CONFIG, *args],
                             env={"UBI_USER": OPERATOR[0], "UBI_PASSWORD": OPERATOR[1]})
    assert res.exit_code == 1
    assert res.exception is None or isinstance(res.exception, SystemExit)
    out = res.output.strip()
    assert len(out.splitlines()) == 1 and out.startswith("ubi: " + expected), out
    assert "Traceback" not in res.output


def test_call_unknown_service_and_cell(live_site: LiveSite) -> None:
    res = CliRunner().invoke(cli, ["--site", str(live_site.path), "call", "Zone-Q", CONFIG, "list_sensors"])
    assert res.exit_code == 1 and res.output.startswith("ubi: not_found: no instance of")


def test_dump_prints_tables(live_site: LiveSite) -> None:
    res = ubi(live_site, "dump", "Site", CONFIG)
    assert res.exit_code == 0
    lines = res.output.splitlines()
    assert lines[0].startswith("sensors (") and lines[1].split()[:3] == ["SENSOR", "SINK", "RATE_HZ"]
    assert any(ln.startswith("S-001") for ln in lines)
    doc = json.loads(ubi(live_site, "dump", "Site", CONFIG, "--json").output.splitlines()[0])
    assert doc["relation"] == "sensors" and any(r["sensor"] == "S-001" for r in doc["rows"])


def test_watch_prints_dump_then_changes(live_site: LiveSite) -> None:
    res = ubi(live_site, "watch", "Zone-A", "ULocation::Positions", "--duration", "0.6", "--json")
    assert res.exit_code == 0
    docs = [json.loads(ln) for ln in res.output.splitlines()]
    assert docs[0]["relation"] == "positions"
    changes = [d for d in docs if "op" in d]
    assert changes and all(d["op"] in ("insert", "update", "delete") for d in changes)
    assert any(d["op"] == "update" and d["old"]["tag"] == d["new"]["tag"] for d in changes)
