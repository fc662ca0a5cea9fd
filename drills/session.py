"""Find the fleet the drills drive, or start one (and stop exactly what was started).

Why a private fleet when none runs: drills kill processes and add model versions; on a fleet they
started themselves (own state root, free ports, a copy of the model repository) nothing of anyone
else's can be hit, and ``close`` takes down only that fleet.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from recserve.control.runtime.process import ManagedProcess, ProcessError
from recserve.control.runtime.procs import cmdline
from recserve.control.runtime.triton import DEFAULT_REPOSITORY, REPO_ROOT, free_port, remove_shm_regions, shm_prefix
from recserve.drills.fleet import RUNTIME, FleetAPI, FleetError, read_stats_key, read_token, recctl_status

START_TIMEOUT_S = 300.0


@dataclass
class FleetHandle:
    """A fleet the drills may use: its API, repository, client endpoint, and the control plane process
    when this run started it (only then can control-plane-crash kill and restart it)."""

    fleet: FleetAPI
    repository: Path
    grpc_url: str
    control: Any = None
    workdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="recserve-drill-")))
    fixture_models: bool = False
    #: The fleet's statistics key (statistics through the front door, for the background perf_analyzer; it can
    #: read statistics and nothing else).
    stats_key: str | None = None
    #: HAProxy's access log when the fleet's runtime root is known here (its timers go into the report).
    access_log: Path | None = None
    #: The serving spec (control/spec/spec.py) of a user's repository, read against ``repository``: the drills
    #: send, judge and roll its models (drills/serving.py). None: the demo's recommend/search.
    spec: Any = None
    #: The model the rolling faults roll with a spec (``--roll-model`` or the spec's first ONNX step), and why;
    #: None with the reason when there is none.
    roll_model: str | None = None
    roll_why: str = ""

    @property
    def private(self) -> bool:
        """This run started the fleet (and stops it): its settings are the drills' to change."""
        return isinstance(self.control, ControlPlaneProcess)

    @property
    def stats_headers(self) -> dict[str, str]:
        """gRPC headers perf_analyzer needs through HAProxy's front door (it reads model statistics)."""
        from recserve.control.runtime.triton import ADMIN_HEADER_GRPC

        return {ADMIN_HEADER_GRPC: self.stats_key} if self.stats_key else {}


class ControlPlaneProcess:
    """The control plane as its own process (``python -m recserve.control.server``), so a drill can SIGKILL and restart
    it; a restarted one adopts the running instances and HAProxy."""

    def __init__(self, root: Path, repository: Path, grpc_port: int, http_port: int, control_port: int,
                 metrics_port: int, env: dict[str, str] | None = None, args: list[str] | None = None):
        self.root, self.repository = root, repository
        self.env = dict(env or {})  # added to this process's environment (the drills' test switches)
        self.args = list(args or [])  # more server flags (a control's --mode)
        self.ports = {"grpc": grpc_port, "http": http_port, "control": control_port, "metrics": metrics_port}
        self._proc: ManagedProcess | None = None

    @property
    def process(self) -> subprocess.Popen | None:
        """The control-plane process of the last ``start()``."""
        return self._proc.popen if self._proc is not None else None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.ports['control']}"

    def command(self) -> list[str]:
        p = self.ports
        return [sys.executable, "-m", "recserve.control.server", "--root", str(self.root), "--repository",
                str(self.repository), "--grpc-port", str(p["grpc"]), "--http-port", str(p["http"]),
                "--control-port", str(p["control"]), "--metrics-port", str(p["metrics"]), *self.args]

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._proc = ManagedProcess("control plane", self.command(), env={**os.environ, **self.env}, cwd=REPO_ROOT,
                                    log_path=self.root / "control-plane.log", stop_timeout_s=30).start()
        try:
            self._proc.wait_ready(self._fleet_healthy, timeout_s, interval_s=0.5, detail=lambda: self.log_tail(),
                                  stop=False)
        except ProcessError as exc:
            if exc.timed_out:
                raise FleetError(f"control plane not ready after {timeout_s:.0f}s: {exc.detail}") from None
            raise FleetError(f"control plane exited with {exc.code}: {exc.detail}") from None

    def _fleet_healthy(self) -> bool:
        fleet = FleetAPI(self.address, read_token(self.root))
        try:
            st = fleet.status(events=1)
            return bool(st.get("instances")) and all(i.get("state") == "healthy" for i in st["instances"])
        except FleetError:
            return False
        finally:
            fleet.close()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def kill(self) -> int | None:
        """SIGKILL of the control-plane process only (its fleet keeps running): the drill's fault."""
        if not self.alive():
            return None
        return self._proc.kill(group=False)

    def stop_everything(self) -> None:
        """Control plane first (it detaches, leaving the data path), then every instance and HAProxy it
        started under our private root - found by pid file and killed only if its command line names that
        root, so a reused pid can never hit someone else's process."""
        if self._proc is not None:
            self._proc.stop()  # SIGTERM, up to 30 s, then SIGKILL
        for _ in range(3):
            if not kill_owned(self.root, self.root.parent):
                break
            time.sleep(0.5)
        for pid in processes_mentioning(self.root.parent):  # orphans (backend stubs of killed servers)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        remove_stub_regions((self.root / "instances").glob("*"))  # the killed servers' stub IPC regions

    def log_tail(self, n: int = 15) -> str:
        p = self.root / "control-plane.log"
        return " | ".join(p.read_text(errors="replace").splitlines()[-n:]) if p.exists() else "(no log)"


class AdoptedControlPlane:
    """The control plane of a fleet this run did not start (``make fleet-up``): SIGKILLed through its pid file
    and started again exactly as ``recctl up`` starts it (same root, repository and ports), so it adopts the
    data path. Used only by the control-plane-crash drill."""

    def __init__(self, root: Path, repository: Path, endpoints: dict[str, str]):
        self.root, self.repository = root, repository
        port = lambda url: int(url.rstrip("/").split("/metrics")[0].rsplit(":", 1)[1])  # noqa: E731
        self.ports = {k: port(endpoints[k]) for k in ("grpc", "http", "control", "metrics")}

    def pid(self) -> int | None:
        try:
            return int((self.root / "control.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None

    def alive(self) -> bool:
        pid = self.pid()
        return pid is not None and Path(f"/proc/{pid}").exists() and "control.server" in cmdline(pid)

    def kill(self) -> int | None:
        pid = self.pid()
        if not self.alive():
            return None
        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and "control.server" in cmdline(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return pid

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        p = self.ports
        cmd = [sys.executable, "-m", "recserve.control.recctl", "--root", str(self.root), "up", "--repository",
               str(self.repository), "--grpc-port", str(p["grpc"]), "--http-port", str(p["http"]),
               "--control-port", str(p["control"]), "--metrics-port", str(p["metrics"])]
        done = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise FleetError(f"recctl up failed ({done.returncode}): {(done.stdout + done.stderr)[-500:]}")


def remove_stub_regions(instance_dirs: Iterable[Path]) -> None:
    """Remove the /dev/shm regions of the servers these instance directories belong to: a killed server's Python
    backend stubs leave theirs behind, and only the directory (its path and name) says what they are called."""
    for inst in instance_dirs:
        if inst.is_dir():
            remove_shm_regions(shm_prefix(inst, inst.name))


def processes_mentioning(marker: Path) -> list[int]:
    """Pids whose command line names ``marker`` (our private temp root: nobody else's process does)."""
    me = os.getpid()
    return [int(d.name) for d in Path("/proc").iterdir()
            if d.name.isdigit() and int(d.name) != me and str(marker) in cmdline(int(d.name))]


def kill_owned(root: Path, marker: Path) -> list[int]:
    """SIGKILL the process group of every pid file under ``root`` whose process mentions ``marker``."""
    killed = []
    for pidfile in root.rglob("*.pid"):
        try:
            pid = int(pidfile.read_text().split()[0])
        except (ValueError, IndexError, OSError):
            continue
        if pid > 1 and str(marker) in cmdline(pid):
            for kill in (os.killpg, os.kill):
                try:
                    kill(pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            killed.append(pid)
    return killed


class FleetOwner:
    """Context manager: a FleetHandle on a running fleet, or on a private one it starts and later stops."""

    def __init__(self, control: str | None = None, repository: Path | None = None, private: bool = False,
                 fixture_models: bool = False, log=print, monitor: bool = False, env: dict[str, str] | None = None,
                 mode: str | None = None, spec: Path | None = None, roll_model: str | None = None,
                 server_args: list[str] | None = None):
        """``env``: added to a private fleet's control-plane environment (the negative controls' test switches;
        a running fleet is never changed); ``mode``: a private fleet's --mode (default: the server's);
        ``spec``: a serving spec: a private fleet serves a copy of its repository with ``--spec`` (a running
        fleet must already serve its models); ``roll_model``: the model rolling faults roll (default: the spec's
        first ONNX step); ``server_args``: more ``recserve.control.server`` flags for a private fleet (a
        measurement comparing settings side by side; refused for a running fleet, which is never changed)."""
        if spec is not None and fixture_models:
            raise FleetError("--spec and --fixture-models: the fixture models are the demo's; give one of them")
        self.spec_path, self.roll_model = (Path(spec).resolve() if spec else None), roll_model
        self.control, self.repository, self.private, self.log = control, repository, private, log
        self.env, self.mode, self.server_args = env, mode, list(server_args or [])
        self.fixture_models = fixture_models
        self.monitor = monitor  # start a 1 s Prometheus/Alertmanager/receiver for the alert expectations
        self.stack = None
        self.started: ControlPlaneProcess | None = None
        self.tmp: Path | None = None
        self.session: FleetHandle | None = None

    def __enter__(self) -> FleetHandle:
        if self.control or not (self.private or self.fixture_models):
            st = None if self.control else recctl_status()
            control = self.control or (st or {}).get("endpoints", {}).get("control")
            if control and self.server_args:
                raise FleetError(f"server flags {self.server_args} set up a private fleet; the running fleet at "
                                 f"{control} is never changed (start a private one)")
            if control:
                fleet = FleetAPI(control, read_token())
                endpoints = fleet.status(events=1)["endpoints"]
                repo = self.repository or DEFAULT_REPOSITORY
                serving, why = None, ""
                if self.spec_path is not None:
                    serving = self._load_spec(self.repository)
                    repo = serving.repository
                    why = self._not_serving(fleet, serving)
                    if why and self.control:
                        raise FleetError(why)
                if serving is not None and why:  # a running fleet of other models is left alone
                    fleet.close()
                    self.log(f"not using the running fleet: {why}; starting a private one")
                    return self._private()
                adopted = None
                if endpoints.get("control") == control and (RUNTIME / "control.pid").exists():
                    adopted = AdoptedControlPlane(RUNTIME, repo, endpoints)
                self.log(f"using the running fleet: control {control}, clients {endpoints['grpc']}")
                self.session = FleetHandle(fleet, repo, endpoints["grpc"], control=adopted,
                                           stats_key=read_stats_key(RUNTIME),
                                           access_log=RUNTIME / "haproxy" / "access.log" if adopted else None)
                self._attach_spec(serving)
                self.session.monitor = self._start_monitor(RUNTIME)
                return self.session
        return self._private()

    def _private(self) -> FleetHandle:
        source = self._load_spec(self.repository).repository if self.spec_path is not None else None
        self.tmp = Path(tempfile.mkdtemp(prefix="recserve-drills-"))
        repo = self.tmp / "model_repository"
        if self.fixture_models:
            from recserve.drills.fixture_models import make_repository

            make_repository(self.repository or DEFAULT_REPOSITORY, repo)
            self.log("models: synthetic fixture models (drills/fixture_models.py), not the trained build")
        serving = None
        if source is not None:  # the spec's repository (or --repository), copied: drills add versions
            shutil.copytree(source, repo, symlinks=True)
            serving = self._load_spec(repo)
            self.log(f"serving spec {self.spec_path}: models {', '.join(serving.models)} (repository {source}, "
                     "copied)")
        elif not self.fixture_models:
            shutil.copytree(self.repository or DEFAULT_REPOSITORY, repo, symlinks=True)
        args = ["--mode", self.mode] if self.mode else []
        args += ["--spec", str(self.spec_path)] if serving is not None else []
        args += self.server_args
        self.started = ControlPlaneProcess(self.tmp / "runtime", repo, free_port(), free_port(), free_port(),
                                           free_port(), env=self.env, args=args or None)
        self.log(f"starting a private fleet under {self.tmp} (control {self.started.address}) ...")
        t = time.monotonic()
        try:
            self.started.start()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.log(f"fleet up in {time.monotonic() - t:.0f}s")
        fleet = FleetAPI(self.started.address, read_token(self.started.root))
        self.session = FleetHandle(fleet, repo, f"127.0.0.1:{self.started.ports['grpc']}", control=self.started,
                               workdir=self.tmp / "work", fixture_models=self.fixture_models,
                               stats_key=read_stats_key(self.started.root),
                               access_log=self.started.root / "haproxy" / "access.log")
        self.session.workdir.mkdir(parents=True, exist_ok=True)
        self._attach_spec(serving)
        self.session.monitor = self._start_monitor(self.started.root)
        return self.session

    def _load_spec(self, repository: Path | None):
        """The serving spec read against ``repository`` (None: the spec's own); a bad one is a FleetError that
        names the file and the field, before anything starts."""
        from recserve.control.spec.repository import RepositoryReadError
        from recserve.control.spec.spec import SpecError, load_spec

        try:
            return load_spec(self.spec_path, Path(repository) if repository else None)
        except (SpecError, RepositoryReadError) as exc:
            raise FleetError(f"--spec: {exc}") from None

    @staticmethod
    def _not_serving(fleet: FleetAPI, serving) -> str:
        """Why a running fleet cannot be drilled with the spec ('' when it can): it must serve the spec's models
        (started with recctl up --spec)."""
        for inst in fleet.instances():
            missing = sorted(set(serving.models) - set(inst.models))
            if missing:
                return (f"the running fleet's instance {inst.id} does not serve {missing} of {serving.path} "
                        f"(start it with 'recctl up --spec {serving.path}')")
        return ""

    def _attach_spec(self, serving) -> None:
        if serving is None:
            return
        from recserve.drills.serving import roll_model

        self.session.spec = serving
        self.session.roll_model, self.session.roll_why = roll_model(serving, self.roll_model)
        self.log(f"rolling faults roll: {self.session.roll_model or 'nothing'} ({self.session.roll_why})")

    def _start_monitor(self, root: Path):
        """Prometheus + Alertmanager + receiver at 1 s intervals over the fleet's file_sd targets (own dir)."""
        if not self.monitor:
            return None
        from recserve.control.monitoring.stack import MonitorConfig, MonitorStack, missing_binaries
        from recserve.control.runtime.promstack import MonitorError

        missing = missing_binaries()
        if missing:
            self.log(f"monitoring: {', '.join(missing)} not installed ('make setup'): alert expectations will fail")
            return None
        # inside a private fleet's temp root, so its marker-based cleanup covers the stack too
        workdir = self.tmp / "monitoring" if self.tmp else Path(tempfile.mkdtemp(prefix="recserve-mon-"))
        self.stack = MonitorStack(MonitorConfig(root=root, workdir=workdir, fast=True))
        try:
            ep = self.stack.up()
        except MonitorError as exc:
            self.log(f"monitoring did not start: {exc}")
            self.stack = None
            return None
        self.log(f"monitoring (1 s scrape/evaluation): Prometheus {ep['prometheus']}, receiver {ep['receiver']}")
        return self.stack

    def __exit__(self, *exc: object) -> None:
        if self.stack is not None:
            self.stack.down()
            shutil.rmtree(self.stack.config.dir, ignore_errors=True)
            self.stack = None
        if self.session is not None:
            self.session.fleet.close()
            shutil.rmtree(self.session.workdir, ignore_errors=True)
        if self.started is not None:
            self.log("stopping the private fleet ...")
            self.started.stop_everything()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
