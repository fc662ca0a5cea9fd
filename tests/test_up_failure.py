"""Issue 18 item 5: a ``recctl up`` whose fleet cannot come up stops every process it started before it exits, and
says so: nothing of that fleet is left running and its ports are free for the next ``up``.

One real start attempt: a private copy of the model repository whose ranker (a step of the ``recommend`` ensemble)
names a backend that does not exist, so the tritonserver starts but no instance can load the models.
"""

from __future__ import annotations

import os
import sqlite3
import time

import pytest

from recserve.control.runtime.procs import cmdline, pid_alive, port_in_use
from tests.fleet_fixtures import FleetProcess, fleet_repository

pytestmark = pytest.mark.timeout(600)


def _processes_mentioning(marker: str) -> dict[int, str]:
    me = os.getpid()
    found = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me and pid_alive(int(d)) and marker in (line := cmdline(int(d))):
            found[int(d)] = line[:200]
    return found


def test_a_failed_up_stops_every_process_it_started_and_says_so(tmp_path):
    repo = fleet_repository(tmp_path / "model_repository")
    cfg = repo / "ranker" / "config.pbtxt"
    text = cfg.read_text()
    assert 'backend: "onnxruntime"' in text
    cfg.write_text(text.replace('backend: "onnxruntime"', 'backend: "recserve_no_such_backend"', 1))
    f = FleetProcess(tmp_path / "runtime", repo, instances=1)
    try:
        r = f.up(check=False)
        out = " ".join((r.stdout + r.stderr).split())  # rich wraps long lines
        assert r.returncode == 1, out
        assert "control plane exited (code 1)" in out and "fleet did not come up" in out, out
        # the control plane said which processes it stopped (its last log lines, quoted by recctl)
        assert "stopped what the bring-up started:" in out and "instance t1 (pid" in out, out
        assert "haproxy (pid" in out, out
        log = (f.root / "control.log").read_text()
        assert "stopped what the bring-up started: instance t1 (pid" in log and "haproxy (pid" in log

        # nothing of this fleet runs: no tritonserver, haproxy or fallback server names its root or repository
        deadline = time.monotonic() + 10
        while (left := _processes_mentioning(str(tmp_path))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, left
        for pid in f.all_pids():  # pid files and the state's pids: none alive
            assert not pid_alive(pid), (pid, cmdline(pid))
        # its ports are free for the next `recctl up`, the instance's included
        db = sqlite3.connect(str(f.root / "state.db"))
        try:
            inst = db.execute("SELECT grpc_port, http_port, metrics_port, pid, state FROM instances").fetchall()
            events = [m for (m,) in db.execute("SELECT message FROM events WHERE kind='up-failed' ORDER BY seq")]
        finally:
            db.close()
        ports = [*f.ports.values(), *(p for row in inst for p in row[:3] if p)]
        assert not [p for p in ports if port_in_use(p)], ports
        assert [row[3:] for row in inst] == [(0, "broken")]  # records kept, no pid a later up could mistake
        assert len(events) == 2 and "no instance could start" in events[0]
        assert events[1].startswith("stopped what the bring-up started: instance t1 (pid")
        # no files that say otherwise: pid files and HAProxy's socket are gone
        for name in ("control.pid", "haproxy/haproxy.pid", "haproxy/haproxy.sock", "haproxy/fallback.pid",
                     "instances/t1/triton.pid", "instances/t1/admin.key"):
            assert not (f.root / name).exists(), name
    finally:
        f.close()
