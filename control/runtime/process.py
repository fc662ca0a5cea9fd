"""One class owns one OS process: ``ManagedProcess``.

Every long-running process recserve starts (tritonserver, the fallback server, HAProxy, Prometheus/Alertmanager,
the drills' control plane) is started, watched and stopped the same way, in the style of PyTriton's
``server/triton_server.py``: a command line, an environment and a working directory; its own session (so its whole
process group, children included, can be signalled); output captured in a log file; a readiness wait that names
the process and quotes its log when it dies or does not become ready; adoption of a process an earlier owner
started (pid file + a marker its command line must contain, so a reused pid is never taken for ours); and a stop
that is SIGTERM to the group, a wait, then SIGKILL to the group.

The owners (``TritonServer``, ``FallbackServer``, ``HAProxy``, ``BackgroundProcess``, the drills' control plane)
keep their own typed configs, errors and readiness checks; this class is only the process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from recserve.control.runtime.procs import cmdline, kill_group, pid_alive

__all__ = ["ManagedProcess", "ProcessError"]


class ProcessError(RuntimeError):
    """A managed process died before it was ready, or was not ready in time; names it and quotes its log."""

    def __init__(self, message: str, name: str, code: int | None = None, timeout_s: float | None = None,
                 detail: str = ""):
        super().__init__(message)
        self.name, self.code, self.timeout_s, self.detail = name, code, timeout_s, detail

    @classmethod
    def exited(cls, name: str, code: int | None, detail: str) -> ProcessError:
        return cls(f"{name} exited during start (code {code}): {detail}", name, code=code, detail=detail)

    @classmethod
    def not_ready(cls, name: str, timeout_s: float, detail: str) -> ProcessError:
        return cls(f"{name} not ready after {timeout_s:.0f}s: {detail}", name, timeout_s=timeout_s, detail=detail)

    @property
    def timed_out(self) -> bool:
        """True when the process was still running when the wait gave up (False: it died)."""
        return self.timeout_s is not None


class ManagedProcess:
    """Owns one OS process: start (own session, log capture, optional nice), readiness wait, adopt, alive, stop.

    ``argv`` may be set (or replaced) until ``start``: owners that pick ports at start build it then.
    ``log_path`` receives stdout and stderr, unless ``stdout_path`` is given (then stdout goes there and stderr to
    ``log_path``: HAProxy's access log and its own log). ``pid_path`` is what ``adopt()`` reads (its first word)
    and what ``write_pid_file`` writes; ``marker`` is a string the command line of an adopted pid must contain.
    """

    def __init__(self, name: str, argv: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
                 cwd: str | Path | None = None, nice: int = 0, log_path: str | Path | None = None,
                 stdout_path: str | Path | None = None, pid_path: str | Path | None = None,
                 marker: str | None = None, stop_timeout_s: float = 10.0):
        self.name = name
        self.argv = list(argv)
        self.env = dict(env) if env is not None else None
        self.cwd = Path(cwd) if cwd is not None else None
        self.nice = nice
        self.log_path = Path(log_path) if log_path is not None else None
        self.stdout_path = Path(stdout_path) if stdout_path is not None else None
        self.pid_path = Path(pid_path) if pid_path is not None else None
        self.marker = marker
        self.stop_timeout_s = stop_timeout_s
        self.popen: subprocess.Popen | None = None
        self._adopted: int | None = None

    # ------------------------------------------------------------------ state
    @property
    def pid(self) -> int | None:
        """The pid of the process this object started (even once it exited), else of the adopted one."""
        if self.popen is not None:
            return self.popen.pid
        return self._adopted

    @property
    def returncode(self) -> int | None:
        """Exit code of a process this object started and that has exited (None otherwise)."""
        return self.popen.poll() if self.popen is not None else None

    @property
    def adopted(self) -> bool:
        return self.popen is None and self._adopted is not None

    def alive(self) -> bool:
        """Running (not a zombie). An adopted pid counts only while its command line still names the marker."""
        if self.popen is not None:
            return self.popen.poll() is None
        pid = self._adopted
        if pid is None or not pid_alive(pid):
            return False
        return self.marker is None or self.marker in cmdline(pid)

    # ------------------------------------------------------------------ lifecycle
    def command(self) -> list[str]:
        """The argv as exec'd: coreutils ``nice`` execs the program (same pid, priority set before any thread)."""
        if not self.argv:
            raise ValueError(f"{self.name}: no command to start")
        if not 0 <= self.nice <= 19:
            raise ValueError(f"{self.name}: nice must be 0..19, got {self.nice}")
        return ["nice", "-n", str(self.nice), *self.argv] if self.nice else list(self.argv)

    def start(self) -> ManagedProcess:
        """Start the command in its own session with its output in the log file(s); does not wait."""
        if self.alive():
            raise ProcessError(f"{self.name}: already running (pid {self.pid})", self.name)
        cmd = self.command()
        for p in (self.log_path, self.stdout_path):
            if p is not None:
                p.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab") if self.log_path is not None else subprocess.DEVNULL
        out = open(self.stdout_path, "ab") if self.stdout_path is not None else log
        try:
            self.popen = subprocess.Popen(
                cmd, stdout=out, stderr=log if self.stdout_path is not None else subprocess.STDOUT,
                env=self.env, cwd=str(self.cwd) if self.cwd is not None else None,
                start_new_session=True,  # its own process group: stop() reaches its children too
            )
        finally:
            for f in {id(log): log, id(out): out}.values():
                if f is not subprocess.DEVNULL:
                    f.close()  # the child holds its own descriptors
        self._adopted = None
        return self

    def write_pid_file(self, *extra: object) -> None:
        """``<pid> [extra...]`` into ``pid_path`` (what a later owner's ``adopt()`` reads)."""
        if self.pid_path is None or self.pid is None:
            return
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.write_text(" ".join(str(x) for x in (self.pid, *extra)) + "\n")

    def read_pid_file(self) -> list[str]:
        """The words of ``pid_path`` (empty when there is none or it cannot be read)."""
        if self.pid_path is None:
            return []
        try:
            return self.pid_path.read_text().split()
        except OSError:
            return []

    def adopt(self, pid: int | None = None) -> bool:
        """Take over a process started earlier: ``pid``, else the first word of ``pid_path``. Adopted only when it
        runs and (with a ``marker``) its command line contains the marker; True when adopted."""
        if pid is None:
            words = self.read_pid_file()
            try:
                pid = int(words[0])
            except (IndexError, ValueError):
                return False
        if self.popen is not None and self.popen.poll() is None:
            return self.popen.pid == pid
        self.popen, self._adopted = None, pid
        if not self.alive():
            self._adopted = None
            return False
        return True

    def forget(self) -> None:
        """Drop the handle on the process without signalling it (reaping it when it was our child and exited)."""
        if self.popen is not None:
            self.popen.poll()
        self.popen, self._adopted = None, None

    def wait_ready(self, ready: Callable[[], bool], timeout_s: float, interval_s: float = 0.2,
                   detail: Callable[[], str] | None = None, stop: bool = True) -> None:
        """Poll ``ready()`` until it is true; ProcessError (naming the process, quoting ``detail()`` or the log
        tail) when the process dies first or ``timeout_s`` passes. ``stop``: stop the process before raising."""
        deadline = time.monotonic() + timeout_s
        describe = detail or self.log_tail
        while time.monotonic() < deadline:
            if not self.alive():
                code = self.returncode
                text = describe()
                if stop:
                    self.stop()
                raise ProcessError.exited(self.name, code, text)
            if ready():
                return
            time.sleep(interval_s)
        text = describe()
        if stop:
            self.stop()
        raise ProcessError.not_ready(self.name, timeout_s, text)

    def wait(self, timeout_s: float) -> bool:
        """Wait up to ``timeout_s`` for the process to end; True when it is gone."""
        if self.popen is not None:
            try:
                self.popen.wait(timeout_s)
            except subprocess.TimeoutExpired:
                return False
            return True
        deadline = time.monotonic() + timeout_s
        while self.alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self.alive()

    def signal(self, sig: int, group: bool = True) -> bool:
        """Send ``sig`` to the process group (``group``) or the process alone, if it runs; True when sent."""
        pid = self.pid
        if pid is None or not self.alive():
            return False
        if group:
            kill_group(pid, sig)
        else:
            try:
                os.kill(pid, sig)
            except (ProcessLookupError, PermissionError):
                return False
        return True

    def kill(self, group: bool = True, timeout_s: float = 10.0) -> int | None:
        """SIGKILL (the group, or the process alone) and wait for it; returns its pid when it was running."""
        pid = self.pid
        if not self.signal(signal.SIGKILL, group=group):
            return None
        self.wait(timeout_s)
        return pid

    def stop(self, timeout_s: float | None = None, kill_wait_s: float = 10.0) -> int | None:
        """SIGTERM to the process group, wait up to ``timeout_s``, then SIGKILL to the group; any member the
        leader left behind (a child that ignored SIGTERM) is killed too. Fine on a process that is already gone.
        Returns the exit code of a process this object started (None for an adopted one)."""
        pid = self.pid
        if pid is None:
            return None
        timeout_s = self.stop_timeout_s if timeout_s is None else timeout_s
        if self.alive():
            kill_group(pid, signal.SIGTERM)
            if not self.wait(timeout_s):
                kill_group(pid, signal.SIGKILL)
                self.wait(kill_wait_s)
        if self.popen is not None or self.marker is None or self.marker in cmdline(pid) or not pid_alive(pid):
            try:  # the rest of the group (only a group: a lone pid may have been reused by now)
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        return self.returncode

    # ------------------------------------------------------------------ logs
    def log_lines(self, n: int) -> list[str]:
        if self.log_path is None:
            return []
        try:
            return self.log_path.read_text(errors="replace").splitlines()[-n:] if n > 0 else []
        except OSError:
            return []

    def log_tail(self, n: int = 8) -> str:
        """The last ``n`` log lines joined by `` | ``, and where the log is; ``(no log)`` when there is none."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return " | ".join(ln.strip() for ln in self.log_lines(n)) + f" (log: {self.log_path})"
