"""The drills CLI as a user runs it (a real subprocess): help, list, and spec errors before any fleet."""

from __future__ import annotations

import subprocess
import sys

from recserve.control.runtime.triton import REPO_ROOT


def drills(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "recserve.drills", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})


def test_help_lists_the_commands():
    p = drills("--help")
    assert p.returncode == 0
    for word in ("list", "validate", "run", "smoke"):
        assert word in p.stdout


def test_list_shows_every_spec():
    p = drills("list")
    assert p.returncode == 0
    for name in ("crash", "hang", "gpu-lost", "overload", "rollover-under-load", "network-partition"):
        assert name in p.stdout


def test_unknown_drill_is_refused_before_any_fleet_starts():
    p = drills("run", "crash", "meteor-strike")
    assert p.returncode == 2
    assert "unknown drill(s) ['meteor-strike']" in p.stdout
    assert "starting a private fleet" not in p.stdout


def test_a_drill_named_twice_is_refused_before_any_fleet_starts():
    p = drills("run", "crash", "hang", "crash")
    assert p.returncode == 2
    assert "drill(s) ['crash'] named more than once" in p.stdout
    assert "starting a private fleet" not in p.stdout


def test_validate_names_the_broken_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: bad\ntargets: [recommend]\nload: {duration_s: 10, probe_rps: 5}\n"
                   "steady_state: {slo_p99_ms: 50, error_rate_max: 0}\n"
                   "method: [{fault: gpu-hang, at_s: 4, duration_s: 9}]\nexpect: {failed_requests_max: 0}\n")
    p = drills("validate", str(bad))
    assert p.returncode == 2
    assert "method[0].at_s" in p.stdout and "load.duration_s >= 16" in p.stdout
