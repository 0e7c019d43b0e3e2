"""``ubi demo`` on a site of its own: it initialises the site, logs in and shows a denial."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ubicore.testing.processes import SITE_TEMPLATE
from ubicore.testing.site import free_ports


def test_the_demo_initialises_its_site_and_shows_who_may_update(tmp_path: Path) -> None:
    rpc, events = free_ports(2)
    path = tmp_path / "site.yaml"
    path.write_text(SITE_TEMPLATE.format(dataset=tmp_path / "dataset", rpc=rpc, events=events))
    done = subprocess.run([sys.executable, "-m", "ubicore.tools.cli", "--site", str(path), "demo", "--duration", "4"],
                          check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    admin = next(line for line in out.splitlines() if line.startswith("new site proc-test: user administrator"))
    password = admin.rsplit(": ", 1)[1]
    assert "This action requires an administrator." in out  # the anonymous update, refused
    assert "> call Site ULocationSystem::ConfigurationUpdate set_rate" in out  # the operator's, done
    assert "error:" not in out
    assert "controllers run with -d on the service credentials cached in " in out
    # a login with a wrong password fails, and the audit trail has its record
    lines = out.splitlines()
    wrong = next(i for i, line in enumerate(lines) if "a wrong password) call " in line)
    assert lines[wrong + 1].strip() == "auth_failed: authentication failed"
    trail = lines[wrong + 2].strip()
    assert trail.startswith("the audit trail has it: #"), trail
    assert " login failed" in trail and "from 127.0.0.1" in trail
    # Shown once, and nowhere else: not in the dataset, not on stderr.
    assert out.count(password) == 1 and password not in done.stderr
    for f in (tmp_path / "dataset").rglob("*"):
        if f.is_file():
            assert password.encode() not in f.read_bytes()
