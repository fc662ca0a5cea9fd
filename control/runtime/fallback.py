"""Degraded-answer fallback server: one class owns one ``python -m recserve.control.fallback.app`` process.

Why a process of its own: it must keep answering when every tritonserver is full or gone, and HAProxy reaches it
as just another backend (gRPC and HTTP, KServe v2). What it answers and how it marks answers as degraded is in
``control/fallback/app.py``; this module only starts, watches and stops it, in the style of
``control/runtime/triton.py`` (typed config, explicit start/stop, readiness wait, captured log file, SIGTERM then
SIGKILL of its group).
"""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from recserve.control.runtime.process import ManagedProcess, ProcessError
from recserve.control.runtime.procs import free_port, port_in_use, port_listening
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, REPO_ROOT

__all__ = ["FallbackConfig", "FallbackError", "FallbackServer"]

DATA_DIR = REPO_ROOT / "artifacts" / "data"


class FallbackError(RuntimeError):
    """The fallback server could not be started; the message quotes its log."""


@dataclass
class FallbackConfig:
    """Everything one fallback server needs; ports of 0 are picked free at start."""

    workdir: Path = REPO_ROOT / ".recserve" / "fallback"
    host: str = "127.0.0.1"
    grpc_port: int = 0
    http_port: int = 0
    #: The model repository whose ensembles' contract (config.pbtxt, rule modules) the server enforces.
    model_repository: Path = DEFAULT_REPOSITORY
    #: The build's data: popularity from the events, categories and titles from the catalogue.
    events_csv: Path = DATA_DIR / "events.csv"
    catalog_csv: Path = DATA_DIR / "catalog.csv"
    #: A serving spec (``recctl up --spec``): answer its models as their ``degraded`` says, refuse the others'
    #: shed requests (RESOURCE_EXHAUSTED); ``model_repository`` is then its repository. None: the demo's ensembles.
    spec: Path | None = None
    workers: int = 4
    #: CPU niceness (0..19): degraded answers get the CPU that full answers leave (instances serve at nice 5).
    nice: int = 10
    #: gRPC calls in progress or queued for a worker; beyond it the server answers RESOURCE_EXHAUSTED at once.
    max_concurrent: int = 64
    startup_timeout_s: float = 60.0
    stop_timeout_s: float = 5.0
    name: str = "fallback"

    def validate(self) -> None:
        """FallbackError naming the field and the rule."""
        for field_name in ("grpc_port", "http_port"):
            port = getattr(self, field_name)
            if not 0 <= port <= 65535:
                rule = "must be 0 (pick a free one) or 1..65535"
                raise FallbackError(f"fallback config: {field_name} {rule}, got {port}")
        if self.grpc_port and self.grpc_port == self.http_port:
            raise FallbackError(f"fallback config: grpc_port and http_port must differ, both are {self.grpc_port}")
        if not 0 <= self.nice <= 19:
            raise FallbackError(f"fallback config: nice must be 0..19, got {self.nice}")
        for field_name in ("workers", "max_concurrent"):
            if getattr(self, field_name) < 1:
                raise FallbackError(f"fallback config: {field_name} must be >= 1, got {getattr(self, field_name)}")
        for field_name in ("startup_timeout_s", "stop_timeout_s"):
            if not getattr(self, field_name) > 0:
                raise FallbackError(f"fallback config: {field_name} must be > 0, got {getattr(self, field_name)}")


class FallbackServer:
    """Owns one fallback server process: start, readiness wait, log, stop."""

    def __init__(self, config: FallbackConfig):
        self.config = config
        self._proc: ManagedProcess | None = None  # the process of this object's last start()

    @property
    def process(self) -> subprocess.Popen | None:
        """The server process this object started (None before ``start()``)."""
        return self._proc.popen if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.config.workdir / f"{self.config.name}.log"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def command(self) -> list[str]:
        c = self.config
        return [
            sys.executable, "-m", "recserve.control.fallback.app",
            "--host", c.host,
            "--grpc-port", str(c.grpc_port),
            "--http-port", str(c.http_port),
            "--repository", str(c.model_repository),
            "--events", str(c.events_csv),
            "--catalog", str(c.catalog_csv),
            "--workers", str(c.workers),
            "--max-concurrent", str(c.max_concurrent),
            *(["--spec", str(c.spec)] if c.spec is not None else []),
        ]  # fmt: skip

    def start(self, wait: bool = True) -> FallbackServer:
        c = self.config
        c.validate()
        if self.is_alive():
            raise FallbackError(f"{c.name}: already running (pid {self.pid})")
        for path, what in ((c.events_csv, "events_csv"), (c.catalog_csv, "catalog_csv")):
            # with a spec the data is read only for a provider's answers (the program says so if it is missing)
            if c.spec is None and not Path(path).is_file():
                raise FallbackError(f"{c.name}: {what} {path} not found (run 'make models' to build the data)")
        for attr in ("grpc_port", "http_port"):
            port = getattr(c, attr)
            if port == 0:
                setattr(c, attr, free_port(c.host))
            elif port_in_use(port, c.host):
                raise FallbackError(f"{c.name}: {attr.replace('_', ' ')} {port} is already in use on {c.host}")
        c.workdir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        # This checkout's control/ package, whatever the caller's working directory.
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        # nice (coreutils) execs the server: same pid, priority set before any thread starts
        self._proc = ManagedProcess(c.name, self.command(), env=env, cwd=c.workdir, nice=c.nice,
                                    log_path=self.log_path, stop_timeout_s=c.stop_timeout_s).start()
        if wait:
            self.wait_ready()
        return self

    def ready(self) -> bool:
        """HTTP ready and the gRPC port accepting connections."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=1.0) as resp:
                http_ok = resp.status == 200
        except (urllib.error.URLError, OSError, TimeoutError):
            return False
        return http_ok and port_listening(self.config.grpc_port, self.config.host)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until ready; stop it and raise with its log tail otherwise."""
        if self._proc is None:
            raise FallbackError(f"{self.config.name}: not started")
        try:
            self._proc.wait_ready(self.ready, timeout_s or self.config.startup_timeout_s, interval_s=0.1,
                                  detail=self.log_tail)
        except ProcessError as exc:
            raise FallbackError(str(exc)) from None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM its process group, SIGKILL after the timeout; returns the exit code."""
        if self._proc is None:
            return None
        return self._proc.stop(timeout_s or self.config.stop_timeout_s)

    def log_tail(self, lines: int = 8) -> str:
        if self._proc is None:
            return ManagedProcess(self.config.name, log_path=self.log_path).log_tail(lines)
        return self._proc.log_tail(lines)

    def __enter__(self) -> FallbackServer:
        return self.start() if not self.is_alive() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()
