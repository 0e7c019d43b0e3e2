"""``ubi`` errors that need no site running: bad files, bad arguments, nothing listening."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from ubicore.errors import BadArguments
from ubicore.tools.cli import cli, parse_arguments
from ubicore.tools.format import change_text, plain, result_text, table


def test_bad_site_file_is_one_line_naming_file_and_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: x\nhosts: {h: {address: 127.0.0.1, colour: red}}\n")
    res = CliRunner().invoke(cli, ["--site", str(bad), "services"])
    assert res.exit_code == 1
    assert res.output.startswith(f"ubi: {bad}: ") and len(res.output.strip().splitlines()) == 1


def test_missing_site_file(tmp_path: Path) -> None:
    res = CliRunner().invoke(cli, ["--site", str(tmp_path / "nope.yaml"), "services"])
    assert res.exit_code == 1 and "nope.yaml" in res.output and "Traceback" not in res.output


def test_unknown_host_for_controller() -> None:
    res = CliRunner().invoke(cli, ["--site", "cells/demo.yaml", "controller", "--host", "host-z"])
    assert res.exit_code == 1 and "no host 'host-z'" in res.output


def test_nothing_listening_times_out_with_one_line(tmp_path: Path) -> None:
    from ubicore.testing.processes import write_site

    path = write_site(tmp_path)  # free ports, nothing started
    res = CliRunner().invoke(cli, ["--site", str(path), "call", "Site", "A::B", "op", "--timeout", "0.5"])
    assert res.exit_code == 1 and res.output.startswith("ubi: timeout: "), res.output


def test_parse_arguments_by_type() -> None:
    params = [["n", "int", True, False], ["r", "float", True, False], ["b", "bool", True, False],
              ["s", "str", True, False], ["l", "list", True, False], ["raw", "bytes", True, False]]
    args = parse_arguments(params, ("n=0x10", "r=2.5", "b=yes", "s=a=b", "l=[1, 2]", "raw=0x00ff"))
    assert args == {"n": 16, "r": 2.5, "b": True, "s": "a=b", "l": [1, 2], "raw": b"\x00\xff"}
    for bad in ("n=ten", "b=maybe", "x=1", "novalue"):
        with pytest.raises(BadArguments):
            parse_arguments(params, (bad,))


def test_formatting_helpers() -> None:
    from collections import namedtuple

    R = namedtuple("R", "k v")
    assert plain({"a": (b"\x01", R("x", 2))}) == {"a": ["01", {"k": "x", "v": 2}]}
    assert result_text(None) == "ok" and result_text([1, 2]) == "1\n2"
    assert table(["a", "bb"], [(1, "x")]).splitlines() == ["A  BB", "1  x"]
    assert change_text("r", R("x", 1), R("x", 2), (0,)) == "~ r [x] v 1 → 2"
    assert change_text("r", None, R("x", 1)) == "+ r k=x v=1"
    assert change_text("r", R("x", 1), None) == "- r k=x v=1"
