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
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    admin = next(line for line in out.splitlines() if line.startswith("new site proc-test: user administrator"))
    password = admin.rsplit(": ", 1)[1]
    assert "This action requires an administrator." in out  # the anonymous update, refused
    assert "> call Site ULocationSystem::ConfigurationUpdate set_rate" in out  # the operator's, done
    assert "error:" not in out
    # Shown once, and nowhere else: not in the dataset, not on stderr.
    assert out.count(password) == 1 and password not in done.stderr
    for f in (tmp_path / "dataset").rglob("*"):
        if f.is_file():
            assert password.encode() not in f.read_bytes()
