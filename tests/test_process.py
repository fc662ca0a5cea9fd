"""ManagedProcess (control/runtime/process.py) on real short-lived processes: start, readiness, adopt, stop."""

from __future__ import annotations

import os
import sys
import time

import pytest

from recserve.control.runtime.process import ManagedProcess, ProcessError
from recserve.control.runtime.procs import cmdline, pid_alive

PY = sys.executable


def _gone(pid: int, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not pid_alive(pid)


def test_start_captures_log_env_cwd_and_readiness(tmp_path):
    ready_file = tmp_path / "ready"
    code = ("import os, pathlib, time; print('hello', os.environ['RECSERVE_T'], os.getcwd(), flush=True); "
            f"pathlib.Path({str(ready_file)!r}).write_text('x'); time.sleep(60)")
    p = ManagedProcess("sleeper", [PY, "-c", code], env={**os.environ, "RECSERVE_T": "v1"}, cwd=tmp_path,
                       log_path=tmp_path / "logs" / "sleeper.log")
    p.start()
    try:
        p.wait_ready(ready_file.exists, timeout_s=30, interval_s=0.05)
        assert p.alive() and os.getpgid(p.pid) == p.pid  # its own session and group
        deadline = time.monotonic() + 5
        while "hello" not in p.log_tail() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert f"hello v1 {tmp_path}" in p.log_tail(1) and "(log: " in p.log_tail()
        with pytest.raises(ProcessError, match="already running"):
            p.start()
    finally:
        code = p.stop(timeout_s=5)
    assert not p.alive() and code == -15  # ended by the SIGTERM


def test_nice_is_applied_before_the_program_runs(tmp_path):
    p = ManagedProcess("nice", [PY, "-c", "import os; print(os.nice(0))"], nice=7, log_path=tmp_path / "n.log")
    p.start()
    assert p.wait(30) and p.returncode == 0
    assert p.log_lines(1) == [str(os.nice(0) + 7 if os.nice(0) + 7 <= 19 else 19)]
    with pytest.raises(ValueError, match="nice must be 0..19"):
        ManagedProcess("bad", ["true"], nice=20).start()


def test_readiness_failure_names_the_process_and_its_log_tail(tmp_path):
    p = ManagedProcess("broken-server", [PY, "-c", "import sys; print('E0001 model xyz failed to load'); "
                                                  "sys.exit(3)"], log_path=tmp_path / "b.log")
    p.start()
    with pytest.raises(ProcessError) as info:
        p.wait_ready(lambda: False, timeout_s=30, interval_s=0.05)
    err = info.value
    assert not err.timed_out and err.code == 3 and err.name == "broken-server"
    assert "broken-server exited during start (code 3)" in str(err)
    assert "E0001 model xyz failed to load" in str(err) and str(tmp_path / "b.log") in str(err)


def test_readiness_timeout_stops_the_process(tmp_path):
    p = ManagedProcess("slow", ["sleep", "60"], log_path=tmp_path / "s.log")
    p.start()
    pid = p.pid
    with pytest.raises(ProcessError, match=r"slow not ready after 1s: ") as info:
        p.wait_ready(lambda: False, timeout_s=1.0, interval_s=0.05)
    assert info.value.timed_out
    assert _gone(pid) and not p.alive()


def test_adopt_by_pid_file_and_marker(tmp_path):
    marker = str(tmp_path / "marker-dir")
    first = ManagedProcess("svc", [PY, "-c", "import time; time.sleep(60)", marker], pid_path=tmp_path / "svc.pid",
                           marker=marker)
    first.start()
    first.write_pid_file(1234)
    try:
        deadline = time.monotonic() + 10
        while marker not in cmdline(first.pid) and time.monotonic() < deadline:  # exec'd
            time.sleep(0.02)
        assert (tmp_path / "svc.pid").read_text() == f"{first.pid} 1234\n" and marker in cmdline(first.pid)
        later = ManagedProcess("svc", pid_path=tmp_path / "svc.pid", marker=marker)
        assert later.adopt() and later.adopted and later.pid == first.pid and later.alive()
        # a pid whose command line lacks the marker (a reused pid) is never adopted
        other = ManagedProcess("svc", pid_path=tmp_path / "svc.pid", marker=str(tmp_path / "elsewhere"))
        assert not other.adopt() and other.pid is None
        assert not ManagedProcess("svc", pid_path=tmp_path / "missing.pid").adopt()
        assert not ManagedProcess("svc", marker=marker).adopt(2 ** 22 + 17)  # no such pid
        assert later.stop(timeout_s=5) is None  # an adopted process has no exit code for us
        assert _gone(first.pid)
        assert not later.alive()
    finally:
        first.stop(timeout_s=1)


def test_stop_kills_the_whole_group_including_a_child_that_ignores_sigterm(tmp_path):
    child_pid = tmp_path / "child.pid"
    child = ("import os, signal, time, pathlib; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
             f"pathlib.Path({str(child_pid)!r}).write_text(str(os.getpid())); time.sleep(120)")
    parent = f"import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)"
    p = ManagedProcess("parent", [PY, "-c", parent], log_path=tmp_path / "p.log")
    p.start()
    p.wait_ready(lambda: child_pid.exists() and child_pid.read_text().strip().isdigit(), timeout_s=30)
    cpid = int(child_pid.read_text())
    assert os.getpgid(cpid) == p.pid
    t = time.monotonic()
    p.stop(timeout_s=5)
    assert time.monotonic() - t < 5  # the leader ends on SIGTERM; its child is SIGKILLed with the group
    assert not p.alive() and _gone(cpid)


def test_stop_escalates_to_sigkill_and_tolerates_a_dead_process(tmp_path):
    stubborn = ManagedProcess("stubborn", [PY, "-c", "import signal, time; signal.signal(signal.SIGTERM, "
                                                     "signal.SIG_IGN); print('up', flush=True); time.sleep(120)"],
                              log_path=tmp_path / "s.log")
    stubborn.start()
    stubborn.wait_ready(lambda: "up" in stubborn.log_tail(), timeout_s=30, interval_s=0.05)
    assert stubborn.stop(timeout_s=0.5) == -9
    done = ManagedProcess("done", ["true"])
    done.start()
    assert done.wait(10)
    assert done.stop() == 0 and done.stop() == 0  # already dead, twice: fine
    assert ManagedProcess("never").stop() is None  # never started: nothing to do
    gone = ManagedProcess("gone", ["sleep", "60"])
    gone.start()
    assert gone.kill() == gone.pid and not gone.alive() and gone.kill() is None
    gone.forget()
    assert gone.pid is None and not gone.alive()
