"""One class per monitoring process: Prometheus, Alertmanager and the webhook receiver
(control/monitoring/alertsink.py).

Like control/runtime/triton.py: a typed config, explicit start/stop, a readiness wait, a captured log file. Each runs
in its own session with a pid file, so ``make monitor-up`` can return and ``make monitor-down`` (another
process) stops exactly what was started: a pid is only signalled when its command line names our workdir.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from recserve.control.runtime.process import ManagedProcess, ProcessError
from recserve.control.runtime.procs import free_port, port_in_use
from recserve.control.runtime.triton import REPO_ROOT


class MonitorError(RuntimeError):
    """A monitoring process could not start (the message quotes its log) or its binary is missing."""


def binary(name: str) -> str | None:
    """Path of a Debian monitoring binary, or None (``make setup`` installs them)."""
    return shutil.which(name)


@dataclass
class ProcConfig:
    """Where one monitoring process lives; port 0 is picked free at start."""

    workdir: Path
    port: int = 0
    host: str = "127.0.0.1"
    startup_timeout_s: float = 60.0
    stop_timeout_s: float = 10.0


class BackgroundProcess:
    """Owns one long-running process: start (own session, log file, pid file), readiness, adopt, stop."""

    name = "process"
    ready_path = "/-/ready"

    def __init__(self, config: ProcConfig):
        self.config = config
        # an adopted pid counts only while its command line names our workdir (a reused pid is never ours)
        self._proc = ManagedProcess(self.name, log_path=self.log_path, pid_path=self.pid_path,
                                    marker=str(config.workdir), stop_timeout_s=config.stop_timeout_s)

    @property
    def process(self) -> subprocess.Popen | None:
        """The process this object started (None when adopted or not started)."""
        return self._proc.popen

    @property
    def log_path(self) -> Path:
        return self.config.workdir / f"{self.name}.log"

    @property
    def pid_path(self) -> Path:
        return self.config.workdir / f"{self.name}.pid"

    @property
    def url(self) -> str:
        return f"http://{self.config.host}:{self.config.port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    def command(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        """Write config files before start."""

    def environment(self) -> dict[str, str] | None:
        return None

    def is_alive(self) -> bool:
        return self._proc.alive()

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + self.ready_path, timeout=1.0) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def adopt(self) -> bool:
        """Take over a running process from an earlier start (pid file + command line naming our workdir)."""
        try:
            pid, port = (int(x) for x in self._proc.read_pid_file()[:2])
        except ValueError:
            return False
        self.config.port = port
        return self._proc.adopt(pid)

    def start(self, wait: bool = True) -> BackgroundProcess:
        c = self.config
        if self.is_alive():
            raise MonitorError(f"{self.name}: already running (pid {self.pid})")
        if c.port == 0:
            c.port = free_port(c.host)
        elif port_in_use(c.port, c.host):
            raise MonitorError(f"{self.name}: port {c.port} is already in use on {c.host}")
        c.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self._proc.argv, self._proc.cwd = self.command(), c.workdir
        env = self.environment()
        self._proc.env = dict(env) if env is not None else None
        self._proc.start()
        self._proc.write_pid_file(c.port)
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self) -> None:
        try:
            self._proc.wait_ready(self.ready, self.config.startup_timeout_s, interval_s=0.2, stop=False)
        except ProcessError as exc:
            if exc.timed_out:
                self.stop()
                raise MonitorError(str(exc)) from None
            raise MonitorError(f"{self.name} exited during start: {exc.detail}") from None

    def stop(self) -> None:
        """SIGTERM the process group, SIGKILL after the timeout; removes the pid file."""
        self._proc.stop(self.config.stop_timeout_s, kill_wait_s=5)
        self.pid_path.unlink(missing_ok=True)

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds the process has used so far (from /proc), None when gone."""
        pid = self.pid
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError, TypeError):
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def log_tail(self, n: int = 8) -> str:
        return self._proc.log_tail(n)


class Prometheus(BackgroundProcess):
    """Debian's prometheus on loopback; config rendered by the caller into ``workdir/prometheus.yml``.
    No --web.enable-lifecycle / admin API: the admin surface stays closed."""

    name = "prometheus"

    def command(self) -> list[str]:
        exe = binary("prometheus")
        if exe is None:
            raise MonitorError("prometheus is not installed: run 'make setup' (Debian package prometheus)")
        c = self.config
        return [exe, f"--config.file={c.workdir / 'prometheus.yml'}", f"--storage.tsdb.path={c.workdir / 'data'}",
                f"--web.listen-address={c.host}:{c.port}", "--storage.tsdb.retention.time=2d",
                "--log.level=warn"]

    def query(self, expr: str, timeout_s: float = 5.0) -> dict:
        """One instant query through the HTTP API; returns Prometheus's JSON answer (errors included)."""
        import json
        from urllib.parse import urlencode

        req = urllib.request.Request(f"{self.url}/api/v1/query", data=urlencode({"query": expr}).encode())
        try:
            with urllib.request.urlopen(req, timeout=timeout_s) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as err:
            return json.loads(err.read() or b"{}") or {"status": "error", "error": f"HTTP {err.code}"}


class Alertmanager(BackgroundProcess):
    """Debian's prometheus-alertmanager on loopback, clustering off (no gossip port on all interfaces)."""

    name = "alertmanager"

    def command(self) -> list[str]:
        exe = binary("prometheus-alertmanager") or binary("alertmanager")
        if exe is None:
            raise MonitorError("alertmanager is not installed: run 'make setup' (Debian prometheus-alertmanager)")
        c = self.config
        return [exe, f"--config.file={c.workdir / 'alertmanager.yml'}", f"--storage.path={c.workdir / 'data'}",
                f"--web.listen-address={c.host}:{c.port}", "--cluster.listen-address=", "--log.level=warn"]


class AlertReceiver(BackgroundProcess):
    """The webhook receiver (control/monitoring/alertsink.py) writing ``workdir/notifications.jsonl``."""

    name = "receiver"

    @property
    def out(self) -> Path:
        return self.config.workdir / "notifications.jsonl"

    def command(self) -> list[str]:
        c = self.config
        return [sys.executable, "-m", "recserve.control.monitoring.alertsink", "--host", c.host, "--port", str(c.port),
                "--out", str(self.out)]

    def environment(self) -> dict[str, str]:
        """The receiver is our own module: import it from this checkout whatever the caller's cwd."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        return env

    def prepare(self) -> None:
        self.config.workdir.mkdir(parents=True, exist_ok=True)


__all__ = ["REPO_ROOT", "AlertReceiver", "Alertmanager", "BackgroundProcess", "MonitorError", "ProcConfig",
           "Prometheus", "binary"]
