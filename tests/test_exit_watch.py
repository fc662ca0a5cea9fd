"""control/fleet/exits.py: a watched process's exit is reported once, at once; unwatched ones never are.

Real processes (``sleep``) and real pidfds; waits are for an event with a generous timeout, never a timing assert.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading

import pytest

from recserve.control.fleet import exits
from recserve.control.fleet.exits import ExitWatch

pytestmark = pytest.mark.skipif(not ExitWatch(dict, lambda i, p: None).available,
                                reason="no pidfd_open on this host: the deep checks find exits")


class Seen:
    def __init__(self):
        self.calls: list[tuple[str, int]] = []
        self.event = threading.Event()

    def __call__(self, iid: str, pid: int) -> None:
        self.calls.append((iid, pid))
        self.event.set()


def test_a_killed_process_is_reported_once_and_a_live_one_never():
    seen = Seen()
    victim = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    watch = ExitWatch(lambda: {"t1": victim.pid, "t2": bystander.pid}, seen, interval_s=0.05).start()
    try:
        os.kill(victim.pid, signal.SIGKILL)
        assert seen.event.wait(10), "the exit was never reported"
        victim.wait(5)
        seen.event.clear()
        assert not seen.event.wait(0.5)  # several more rounds of the loop: no second report
        assert seen.calls == [("t1", victim.pid)]
    finally:
        watch.stop()
        for p in (victim, bystander):
            p.kill()
            p.wait(5)


def test_a_pid_already_gone_is_reported_and_one_taken_off_the_list_is_not():
    seen = Seen()
    gone = subprocess.Popen(["true"])
    gone.wait(5)  # reaped: no such process any more
    leaving = subprocess.Popen(["sleep", "60"])
    want = {"t1": gone.pid, "t2": leaving.pid}
    watch = ExitWatch(lambda: dict(want), seen, interval_s=0.05).start()
    try:
        assert seen.event.wait(10)
        assert seen.calls == [("t1", gone.pid)]
        want.pop("t1")
        want.pop("t2")  # a planned stop takes it off the list first
        seen.event.clear()
        threading.Event().wait(0.3)
        leaving.kill()
        leaving.wait(5)
        assert not seen.event.wait(0.5), seen.calls
    finally:
        watch.stop()
        leaving.kill()


def test_a_failing_reaction_does_not_stop_the_watch():
    calls = []

    def react(iid: str, pid: int) -> None:
        calls.append(iid)
        if iid == "t1":
            raise RuntimeError("bug in the reaction")

    a, b = subprocess.Popen(["sleep", "60"]), subprocess.Popen(["sleep", "60"])
    watch = ExitWatch(lambda: {"t1": a.pid, "t2": b.pid}, react, interval_s=0.05).start()
    try:
        a.kill()
        a.wait(5)
        b.kill()
        b.wait(5)
        done = threading.Event()
        for _ in range(200):
            if sorted(calls) == ["t1", "t2"]:
                done.set()
                break
            threading.Event().wait(0.05)
        assert done.is_set(), calls
    finally:
        watch.stop()


def test_without_pidfds_the_watch_says_why_and_starts_nothing(monkeypatch):
    def refuse(pid: int) -> int:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(exits.os, "pidfd_open", refuse)
    watch = ExitWatch(dict, lambda i, p: None).start()
    assert not watch.available and "Function not implemented" in watch.why
    watch.stop()


def test_the_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval_s must be > 0"):
        ExitWatch(dict, lambda i, p: None, interval_s=0)
