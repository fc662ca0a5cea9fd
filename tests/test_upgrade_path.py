"""Issue 20 item 7, the upgrade path: a fleet started by the previous layout is adopted by the new one.

Commit 1a13390 is the last one with the flat control/ (control/fleet.py, control/server.py, control/fallback_app.py);
the next one moved the modules into subpackages. Here a git worktree of 1a13390 (its own gRPC stubs generated,
the checkout's artifacts/ and built model versions shared) starts a real fleet; its control plane is SIGKILLed
(instances, HAProxy and the old fallback server serve on), and this checkout's ``recctl up`` starts on the same
root. Checked: the running tritonservers are adopted (same pids, no restart), the old state database is read
(desired versions, instance records, events), a closed-loop gRPC client through the front door never fails during
the switch, and this checkout's ``recctl down`` stops everything the old code started, its fallback server
included, leaving no process that names the root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recserve.control.runtime.procs import cmdline, pid_alive
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, free_port
from tests.fleet_fixtures import LoadClient, all_healthy_exact, fleet_repository, has_built_versions

CHECKOUT = Path(__file__).resolve().parents[1]
OLD = "1a13390"  # the last commit with the flat control/ layout


def _have_old_commit() -> bool:
    if shutil.which("git") is None or not (CHECKOUT / ".git").exists():
        return False
    r = subprocess.run(["git", "-C", str(CHECKOUT), "cat-file", "-e", f"{OLD}^{{commit}}"], capture_output=True)
    return r.returncode == 0


pytestmark = [
    pytest.mark.timeout(420),
    pytest.mark.skipif(not (_have_old_commit() and has_built_versions(DEFAULT_REPOSITORY)),
                       reason=f"needs git with commit {OLD} and the built model versions (make models)"),
]


def _old_env(tree: Path) -> dict[str, str]:
    """The old code's environment: ``import recserve`` resolves to the worktree's recserve/ (cwd and PYTHONPATH
    first; the venv's editable finder for this checkout sits after the path finder)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSERVE_")}
    env["PYTHONPATH"] = str(tree)
    return env


def _new_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RECSERVE_")}
    env.pop("PYTHONPATH", None)
    return env


def _processes_mentioning(marker: str) -> dict[int, str]:
    me = os.getpid()
    found = {}
    for d in os.listdir("/proc"):
        if d.isdigit() and int(d) != me and pid_alive(int(d)) and marker in (line := cmdline(int(d))):
            found[int(d)] = line[:200]
    return found


@pytest.fixture
def old_tree(tmp_path):
    """A worktree of the old commit with what its code needs beside the committed files: generated gRPC stubs
    (its ``make proto``) and the checkout's artifacts/ (the fallback server's catalogue, the golden answers)."""
    tree = tmp_path / "old"
    subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "add", "--detach", str(tree), OLD],
                   check=True, capture_output=True)
    try:
        protos = sorted(str(p.relative_to(tree)) for p in (tree / "control" / "proto").glob("*.proto"))
        subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", "--python_out=.", "--grpc_python_out=.",
                        *protos], cwd=tree, check=True, capture_output=True)
        for f in (tree / "control" / "proto").glob("*_pb2_grpc.py"):  # the sed of its Makefile
            f.write_text(re.sub(r"(?m)^from control\.proto import", "from recserve.control.proto import",
                                f.read_text()))
        (tree / "artifacts").symlink_to(CHECKOUT / "artifacts")
        yield tree
    finally:
        subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "remove", "--force", str(tree)], capture_output=True)
        subprocess.run(["git", "-C", str(CHECKOUT), "worktree", "prune"], capture_output=True)


def test_a_fleet_started_by_the_flat_layout_is_adopted_by_the_new_one(tmp_path, old_tree):
    # the old code really is the old code: its recserve.control.fleet is the flat module
    probe = subprocess.run([sys.executable, "-c", "import recserve.control.fleet as f; print(f.__file__)"],
                           cwd=old_tree, env=_old_env(old_tree), capture_output=True, text=True, check=True)
    assert Path(probe.stdout.strip()) == old_tree / "control" / "fleet.py", probe.stdout

    root = tmp_path / "runtime"
    repository = fleet_repository(tmp_path / "model_repository")
    ports = {"grpc": free_port(), "http": free_port(), "control": free_port(), "metrics": free_port()}
    up_args = ["up", "--repository", str(repository), "--grpc-port", str(ports["grpc"]),
               "--http-port", str(ports["http"]), "--control-port", str(ports["control"]),
               "--metrics-port", str(ports["metrics"]), "--instances", "2"]

    def recctl(code: str, *args: str, timeout: float = 300, check: bool = True):
        cwd, env = (old_tree, _old_env(old_tree)) if code == "old" else (CHECKOUT, _new_env())
        r = subprocess.run([sys.executable, "-m", "recserve.control.recctl", "--root", str(root), *args],
                           cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise AssertionError(f"{code} recctl {' '.join(args)} exited {r.returncode}: {r.stdout[-3000:]} "
                                 f"{r.stderr[-3000:]}\ncontrol.log: {_tail(root / 'control.log')}")
        return r

    def wait_status(code: str, predicate, what: str, timeout: float = 180.0) -> dict:
        deadline, st = time.monotonic() + timeout, None
        while time.monotonic() < deadline:
            r = recctl(code, "status", "-o", "json", "--events", "50", check=False)
            if r.returncode == 0:
                st = json.loads(r.stdout)
                if predicate(st):
                    return st
            time.sleep(0.5)
        raise AssertionError(f"timed out after {timeout}s waiting for {what}; last status: {st}\n"
                             f"control.log: {_tail(root / 'control.log')}")

    load = None
    old_pids: set[int] = set()
    try:
        # ---- the previous layout starts the fleet
        recctl("old", *up_args)
        st_old = wait_status("old", all_healthy_exact, "the old fleet: two healthy instances")
        old_control = int((root / "control.pid").read_text())
        assert os.readlink(f"/proc/{old_control}/cwd") == str(old_tree), cmdline(old_control)
        haproxy_pid = (root / "haproxy" / "haproxy.pid").read_text().split()[0]
        old_fallback = int((root / "haproxy" / "fallback.pid").read_text().split()[0])
        assert "recserve.control.fallback_app" in cmdline(old_fallback), cmdline(old_fallback)
        instances_old = {i["id"]: (i["pid"], i["slot"], i["role"]) for i in st_old["instances"]}
        old_pids = {old_control, int(haproxy_pid), old_fallback, *(v[0] for v in instances_old.values())}
        db = sqlite3.connect(str(root / "state.db"))
        try:
            desired_rows = {m: json.loads(v) for m, v in db.execute("SELECT model, versions FROM desired")}
            old_events = db.execute("SELECT seq, kind, message FROM events ORDER BY seq").fetchall()
        finally:
            db.close()
        assert desired_rows == st_old["desired"] and old_events

        load = LoadClient(f"127.0.0.1:{ports['grpc']}", threads=2, max_seconds=300).start()
        time.sleep(1.5)
        mark = load.mark()

        # ---- its control plane dies (SIGKILL); instances, HAProxy and the fallback server serve on
        os.kill(old_control, signal.SIGKILL)
        killed_at = time.monotonic()
        while pid_alive(old_control) and time.monotonic() < killed_at + 10:
            time.sleep(0.1)
        assert not pid_alive(old_control)
        time.sleep(2)

        # ---- this checkout's control plane starts on the same root and adopts what runs
        recctl("new", *up_args)
        st = wait_status("new", all_healthy_exact, "the new control plane: the adopted fleet healthy")
        new_control = int((root / "control.pid").read_text())
        assert new_control != old_control and os.readlink(f"/proc/{new_control}/cwd") == str(CHECKOUT)
        adopted_at = time.monotonic()
        time.sleep(2)
        records = load.since(mark)
        load.stop()

        failed = load.failed(records)
        assert not failed, f"{len(failed)} of {len(records)} requests failed: {failed[0].error}"
        headless = [r for r in records if killed_at < r.t < adopted_at]
        assert len(headless) >= 10 and records[-1].t > adopted_at, (len(records), len(headless))
        # adopted, not restarted: the same tritonservers in the same slots and roles, the same HAProxy
        assert {i["id"]: (i["pid"], i["slot"], i["role"]) for i in st["instances"]} == instances_old, st["instances"]
        assert all(i["restarts"] == 0 for i in st["instances"]), st["instances"]
        assert (root / "haproxy" / "haproxy.pid").read_text().split()[0] == haproxy_pid
        # the old fallback server is found by its old module name and replaced (a new control plane never
        # adopts one: it does not know its ports), by this layout's recserve.control.fallback.app
        new_fallback = int((root / "haproxy" / "fallback.pid").read_text().split()[0])
        assert not pid_alive(old_fallback) and new_fallback != old_fallback
        assert "recserve.control.fallback.app" in cmdline(new_fallback), cmdline(new_fallback)
        # the old state database is read: desired versions, instance records (above), events kept and added to
        assert st["desired"] == desired_rows
        db = sqlite3.connect(str(root / "state.db"))
        try:
            events = db.execute("SELECT seq, kind, message FROM events ORDER BY seq").fetchall()
        finally:
            db.close()
        assert events[:len(old_events)] == old_events and len(events) > len(old_events)
        new_events = [(k, m) for _, k, m in events[len(old_events):]]
        adopted = [m for k, m in new_events if k == "adopt" and "adopted running instance" in m]
        assert sorted(adopted) == sorted(f"adopted running instance pid {v[0]}" for v in instances_old.values()), \
            new_events
        assert ("haproxy", f"adopted haproxy (pid {haproxy_pid})") in new_events, new_events
        shown = {(e["kind"], e["message"]) for e in st["events"]}
        assert {(k, m) for _, k, m in old_events if k in ("membership", "haproxy")} <= shown, st["events"]

        # ---- this checkout's down stops everything, what the old code started included
        recctl("new", "down", "--repository", str(repository), timeout=180)
        deadline = time.monotonic() + 15
        while (left := _processes_mentioning(str(root))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not left, left
        alive = {p: cmdline(p) for p in old_pids | {new_control, new_fallback} if pid_alive(p)}
        assert not alive, alive
    finally:
        if load is not None:
            load.stop()
        if (root / "state.db").exists():
            recctl("new", "down", "--repository", str(repository), timeout=120, check=False)
        for pid in _processes_mentioning(str(tmp_path)):  # what a failure left, never a reused pid
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass


def _tail(path: Path, n: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(none)"
