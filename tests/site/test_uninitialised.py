"""Sites that are not (or not yet) able to serve say so and stop cleanly."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

from ubicore.testing.processes import SITE_TEMPLATE, write_site
from ubicore.testing.site import free_ports


def _ubi(site: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "ubicore.tools.cli", "--site", str(site), *args]


def test_site_up_on_a_site_never_initialised_says_how_to_fix_it(tmp_path: Path) -> None:
    rpc, events = free_ports(2)
    path = tmp_path / "site.yaml"
    path.write_text(SITE_TEMPLATE.format(dataset=tmp_path / "dataset", rpc=rpc, events=events))
    done = subprocess.run(_ubi(path, "site", "up"), capture_output=True, text=True, timeout=30)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "not initialised" in lines[0] and "ubi site init" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


def test_an_instance_waiting_for_the_policy_stops_at_once_on_sigterm(tmp_path: Path) -> None:
    """Found by the docs pass: an instance whose core is not up waits for the policy, and
    did not heed SIGTERM while it waited (it had to be killed)."""
    path = write_site(tmp_path)  # initialised, but no core runs
    proc = subprocess.Popen(_ubi(path, "instance", "ULocationSystem::ConfigurationUpdate", "Site"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(1.5)  # well into its wait for UPerm::Config
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        code = proc.wait(10)
        assert time.monotonic() - t0 < 3.0
        assert code == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
