"""Embedded Triton Inference Server: one class owns one ``tritonserver`` process.

The server binary, Python backend and its stubs come from the ``nvidia-pytriton`` wheel (Triton 2.51.0,
the server of NGC ``tritonserver:24.10-py3``). We run the binary directly, with a backend directory laid
out the way ``shared/notes/runtime.md`` found to work, plus recserve's Python-based ``onnxruntime`` and
``tensorrt`` backends so the committed model configs load unchanged here and in the NGC container.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from recserve.control.defaults import DEFAULT_REPOSITORY, REPO_ROOT
from recserve.control.keys import SecretFileError, new_secret, read_existing_secret, read_secret
from recserve.control.runtime.process import ManagedProcess, ProcessError
from recserve.control.runtime.procs import free_port, port_in_use

__all__ = ["DEFAULT_REPOSITORY", "REPO_ROOT", "TritonConfig", "TritonError", "TritonServer", "free_port", "port_in_use",
           "servable_models"]

SHIM_BACKENDS = Path(__file__).resolve().parents[1] / "backends"
#: Header the control plane sends to Triton's locked repository API (gRPC adds the protocol prefix). The statistics
#: key travels in the same header: Triton matches each restricted category against its own key.
ADMIN_HEADER_HTTP = "admin-key"
ADMIN_HEADER_GRPC = "triton-grpc-protocol-admin-key"
#: Triton APIs no client may call: one shared-memory registration of an existing /dev/shm key (a Python stub's
#: IPC region, say) let a client write into the server's memory and kill it; logging and trace settings let any
#: client raise verbosity or trace every request; the repository API loads and unloads models. Each server runs
#: with these locked behind its admin key (HTTP 403; gRPC UNAVAILABLE "This protocol is restricted").
RESTRICTED_APIS = ("shared-memory", "logging", "trace", "model-repository")
#: Model statistics sit behind a second, low-privilege key of their own: perf_analyzer reads them every window and
#: carries its key on its command line (``-H``), so that key must not be able to load, unload or register anything.
STATS_APIS = ("statistics",)
#: In a server's workdir, both 0600: the admin key of the RUNNING process (a fresh one every start, so the key that
#: sat on one tritonserver's command line dies with that process; a control plane that adopts a running server reads
#: it back from here), and the statistics key (kept across starts: the front door and perf_analyzer hold it).
ADMIN_KEY_FILE = "admin.key"
STATS_KEY_FILE = "stats.key"
#: HTTP paths of RESTRICTED_APIS: the only requests that carry the admin key.
ADMIN_PATHS = ("/v2/repository", "/v2/logging", "/v2/trace", "/v2/systemsharedmemory", "/v2/cudasharedmemory")
SHM_DIR = Path("/dev/shm")


class TritonError(RuntimeError):
    """Triton could not be started, or a model call failed; the message quotes the server."""


def _site_packages() -> Path:
    import pytriton

    return Path(pytriton.__file__).resolve().parent.parent


def pytriton_server_dir() -> Path:
    """``site-packages/pytriton/tritonserver`` of the installed wheel, checked."""
    try:
        root = _site_packages() / "pytriton" / "tritonserver"
    except ImportError as exc:
        raise TritonError("nvidia-pytriton is not installed: run 'make setup'") from exc
    if not (root / "bin" / "tritonserver").exists():
        raise TritonError(f"tritonserver binary missing under {root}: reinstall nvidia-pytriton==0.7.0")
    return root




def prepare_backend_dir(dest: Path) -> Path:
    """Lay out ``dest`` as Triton's ``--backend-directory`` (idempotent).

    ``libtriton_python.so`` must be a copy: Triton refuses a symlink that escapes the backend directory.
    The stub must be a symlink: its rpath is relative to its real location in the wheel.
    """
    server = pytriton_server_dir()
    py = dest / "python"
    py.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        src = server / "backends" / "python" / name
        if not (py / name).exists() or (py / name).stat().st_size != src.stat().st_size:
            shutil.copy2(src, py / name)
    pyver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = server / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.exists():
        raise TritonError(f"no Python backend stub for Python {pyver} in {stub.parent.parent}")
    link = py / "triton_python_backend_stub"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(stub)
    for shim in SHIM_BACKENDS.iterdir():
        if (shim / "model.py").exists():
            (dest / shim.name).mkdir(parents=True, exist_ok=True)
            for src in shim.glob("*.py"):  # model.py and the modules it imports from beside it
                shutil.copy2(src, dest / shim.name / src.name)
    return dest


def tensorrt_available() -> bool:
    """True where TensorRT models can be served: the tensorrt package and a CUDA GPU (asked of libcuda through
    the shim's own engine module, not torch: the control plane does not import torch)."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return False
    spec = importlib.util.spec_from_file_location("recserve_trt_engine", SHIM_BACKENDS / "tensorrt" / "engine.py")
    engine = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(engine)
    return bool(engine.cuda_gpus())


def _config_text(model_dir: Path) -> str:
    return (model_dir / "config.pbtxt").read_text()


def _is_ensemble(model_dir: Path) -> bool:
    return 'platform: "ensemble"' in _config_text(model_dir)


def _backend(model_dir: Path) -> str:
    m = re.search(r'^\s*backend:\s*"([^"]+)"', _config_text(model_dir), re.M)
    return m.group(1) if m else ""


def _has_version(model_dir: Path) -> bool:
    return any(p.is_dir() and p.name.isdigit() and any(p.iterdir()) for p in model_dir.iterdir())


def ensemble_steps(model_dir: Path) -> list[str]:
    return re.findall(r'model_name:\s*"([^"]+)"', _config_text(model_dir))


def servable_models(repository: Path, with_tensorrt: bool | None = None) -> list[str]:
    """Ensembles and models that can load on this host: built, and TensorRT ones only with a GPU."""
    with_tensorrt = tensorrt_available() if with_tensorrt is None else with_tensorrt
    models = {p.name: p for p in sorted(repository.iterdir()) if (p / "config.pbtxt").exists()}

    def ok(name: str) -> bool:
        d = models.get(name)
        if d is None:
            return False
        if _is_ensemble(d):
            return all(ok(step) for step in ensemble_steps(d))
        if _backend(d) == "tensorrt" and not with_tensorrt:
            return False
        return _has_version(d)

    return [n for n in models if ok(n)]


def top_level_models(repository: Path, names: list[str]) -> list[str]:
    """Of ``names``, the ones no ensemble in ``names`` composes (loading them loads the rest)."""
    composed = {s for n in names if _is_ensemble(repository / n) for s in ensemble_steps(repository / n)}
    return [n for n in names if n not in composed]


@dataclass
class TritonConfig:
    """Everything one embedded server needs; ports of 0 are picked free at start."""

    model_repository: Path = DEFAULT_REPOSITORY
    workdir: Path = REPO_ROOT / ".recserve" / "triton"
    http_port: int = 0
    grpc_port: int = 0
    metrics_port: int = 0
    host: str = "127.0.0.1"
    #: Models loaded at start; None = every servable model in the repository.
    models: list[str] | None = None
    #: A FIXED key of the restricted APIs (RESTRICTED_APIS), owned by the caller (a Kubernetes Secret; a client of a
    #: server started elsewhere). None = a fresh one at every start, in ``workdir/admin.key`` (0600): a server is
    #: never started with them open, and never with the key of an earlier start (``TritonServer.admin_key``).
    admin_key: str | None = None
    #: The key of the statistics API (STATS_APIS); None = the one in ``workdir/stats.key`` (0600, created once).
    stats_key: str | None = None
    startup_timeout_s: float = 180.0
    stop_timeout_s: float = 15.0
    log_verbose: int = 0
    #: CPU niceness at start (0..19), inherited by the backend stubs: an instance that takes no traffic yet starts
    #: at 19 so that loading it does not slow the instances clients wait on; its owner renices it when it serves.
    nice: int = 0
    extra_env: dict[str, str] = field(default_factory=dict)
    extra_args: list[str] = field(default_factory=list)
    name: str = "triton"


class TritonServer:
    """Owns one tritonserver process: start, readiness wait, model control, logs, stop."""

    def __init__(self, config: TritonConfig):
        self.config = config
        self._proc: ManagedProcess | None = None  # the tritonserver process of this object's last start()
        self._admin_key: str | None = None  # generated by this object's last start()

    @property
    def process(self) -> subprocess.Popen | None:
        """The tritonserver process this object started (None before ``start()``)."""
        return self._proc.popen if self._proc is not None else None

    # ----------------------------------------------------------------- keys
    @property
    def admin_key(self) -> str | None:
        """The admin key of the running server: the caller's fixed one, else the one this object's last ``start()``
        generated, else (a server an earlier control plane started, being adopted) the one in its workdir."""
        if self.config.admin_key:
            return self.config.admin_key
        if self._admin_key is None:
            try:
                self._admin_key = read_existing_secret(self.config.workdir / ADMIN_KEY_FILE)
            except SecretFileError as exc:  # a failed call (a check fails, adoption restarts it with a fresh key)
                raise TritonError(f"{self.config.name}: {exc}") from None
        return self._admin_key

    @property
    def stats_key(self) -> str | None:
        """The statistics-only key (perf_analyzer's ``-H``, the front door's statistics pass-through)."""
        return self.config.stats_key or read_existing_secret(self.config.workdir / STATS_KEY_FILE)

    # ----------------------------------------------------------------- properties
    @property
    def log_path(self) -> Path:
        return self.config.workdir / f"{self.config.name}.log"

    @property
    def http_url(self) -> str:
        return f"{self.config.host}:{self.config.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.config.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.config.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def shm_prefix(self) -> str:
        return shm_prefix(self.config.workdir, self.config.name)

    def shm_usage(self) -> tuple[int, int]:
        """(regions, bytes) this server's Python backend stubs hold in /dev/shm."""
        return shm_usage(self.shm_prefix)

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    # ----------------------------------------------------------------- lifecycle
    def command(self, backend_dir: Path) -> list[str]:
        c = self.config
        cmd = [
            str(pytriton_server_dir() / "bin" / "tritonserver"),
            f"--model-repository={c.model_repository}",
            f"--backend-directory={backend_dir}",
            f"--http-address={c.host}",
            f"--grpc-address={c.host}",
            f"--metrics-address={c.host}",
            f"--http-port={c.http_port}",
            f"--grpc-port={c.grpc_port}",
            f"--metrics-port={c.metrics_port}",
            "--model-control-mode=explicit",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--log-verbose={c.log_verbose}",
            "--log-info=true",
            "--allow-cpu-metrics=true",
            "--metrics-interval-ms=1000",
            "--metrics-config=summary_latencies=true",  # p99 per ensemble for Prometheus (no histograms in 2.51)
        ]
        locked, stats = ",".join(RESTRICTED_APIS), ",".join(STATS_APIS)
        admin_key, stats_key = self.admin_key, self.stats_key
        if not admin_key or not stats_key:
            raise TritonError(f"{c.name}: no admin or statistics key: start() makes them")
        # Triton 2.51 takes a key nowhere but its command line (readable in /proc/<pid>/cmdline by local users unless
        # /proc is mounted hidepid: control/runtime/hostcheck.py warns). Two keys: the admin one (fresh per start)
        # and the statistics one, which can read statistics and nothing else.
        cmd += [
            f"--grpc-restricted-protocol={locked}:{ADMIN_HEADER_HTTP}={admin_key}",
            f"--http-restricted-api={locked}:{ADMIN_HEADER_HTTP}={admin_key}",
            f"--grpc-restricted-protocol={stats}:{ADMIN_HEADER_HTTP}={stats_key}",
            f"--http-restricted-api={stats}:{ADMIN_HEADER_HTTP}={stats_key}",
            # Our own region names, so exactly this server's regions can be removed when it stops or is killed
            # (a SIGKILLed server leaves its stubs' regions behind). Python-based backends share this setting.
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        models = c.models if c.models is not None else servable_models(c.model_repository)
        for m in top_level_models(c.model_repository, models) if models else []:
            cmd.append(f"--load-model={m}")
        return cmd + list(c.extra_args)

    def environment(self) -> dict[str, str]:
        """The stub embeds libpython and finds our virtualenv through PATH (PYTHONPATH is not enough)."""
        env = dict(os.environ)
        libs = _site_packages() / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env.update(self.config.extra_env)
        return env

    def start(self, wait: bool = True) -> TritonServer:
        c = self.config
        if self.is_alive():
            raise TritonError(f"{c.name}: already running (pid {self.pid})")
        if not c.model_repository.is_dir():
            raise TritonError(f"model repository not found: {c.model_repository}")
        for attr in ("http_port", "grpc_port", "metrics_port"):
            port = getattr(c, attr)
            if port == 0:
                setattr(c, attr, free_port(c.host))
            elif port_in_use(port, c.host):
                raise TritonError(f"{c.name}: {attr.replace('_', ' ')} {port} is already in use on {c.host}")
        c.workdir.mkdir(parents=True, exist_ok=True)
        # a fresh admin key for this process (written 0600 before it starts, so an adopter can always read it)
        self._admin_key = c.admin_key or new_secret(c.workdir / ADMIN_KEY_FILE)
        if not c.stats_key:
            c.stats_key = read_secret(c.workdir / STATS_KEY_FILE)
        remove_shm_regions(self.shm_prefix)  # left by an earlier run of this server that was killed
        backend_dir = prepare_backend_dir(c.workdir / "backends")
        if not 0 <= c.nice <= 19:
            raise TritonError(f"{c.name}: nice must be 0..19, got {c.nice}")
        # nice (coreutils) execs tritonserver: same pid, and no thread starts before the priority is set; its own
        # session, so stop() also reaps the backend stubs
        self._proc = ManagedProcess(c.name, self.command(backend_dir), env=self.environment(), cwd=c.workdir,
                                    nice=c.nice, log_path=self.log_path, stop_timeout_s=c.stop_timeout_s).start()
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until ``/v2/health/ready`` answers 200; raise with the server's own errors otherwise (a server
        that does not become ready in time is stopped first)."""
        if self._proc is None:
            raise TritonError(f"{self.config.name}: not started")
        try:
            self._proc.wait_ready(self.ready, timeout_s or self.config.startup_timeout_s, interval_s=0.2,
                                  detail=self.load_errors, stop=False)
        except ProcessError as exc:
            if exc.timed_out:
                self.stop()
            raise TritonError(str(exc)) from None

    def stop(self, timeout_s: float | None = None) -> int | None:
        """SIGTERM the server's process group, SIGKILL after the timeout; returns the exit code."""
        if self._proc is None:
            return None
        code = self._proc.stop(timeout_s or self.config.stop_timeout_s)  # the group: stubs of a killed server too
        remove_shm_regions(self.shm_prefix)
        if not self.config.admin_key:  # the key of a process that is gone opens nothing: do not leave it lying about
            (self.config.workdir / ADMIN_KEY_FILE).unlink(missing_ok=True)
            self._admin_key = None
        return code

    def kill(self) -> None:
        """SIGKILL the server's whole process group at once (a fault, or an instance that must go now), then
        clean up as ``stop()`` does."""
        if self._proc is not None:
            self._proc.kill()
        self.stop(timeout_s=1)

    def __enter__(self) -> TritonServer:
        return self.start() if not self.is_alive() else self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ----------------------------------------------------------------- HTTP API
    def _request(self, method: str, path: str, body: dict | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(f"http://{self.http_url}{path}", data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        key = self.admin_key if path.startswith(ADMIN_PATHS) else None  # the key goes only where it is needed
        if key:
            req.add_header(ADMIN_HEADER_HTTP, key)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read()
        except urllib.error.HTTPError as err:
            return err.code, err.read()
        except (urllib.error.URLError, OSError, TimeoutError):
            return 0, b""

    def live_status(self, timeout: float = 2.0) -> int:
        """HTTP status of /v2/health/live: 200 live, 0 no answer within ``timeout`` (hung or not listening)."""
        return self._request("GET", "/v2/health/live", timeout=timeout)[0]

    def live(self, timeout: float = 2.0) -> bool:
        return self.live_status(timeout) == 200

    def server_metadata(self) -> dict:
        """/v2: name, version and extensions of the running server."""
        status, body = self._request("GET", "/v2")
        if status != 200:
            raise TritonError(f"server metadata failed (HTTP {status}): {_error_text(body)}")
        return json.loads(body)

    def model_config(self, model: str) -> dict:
        """The configuration Triton serves ``model`` with (what it read, plus its defaults), as JSON."""
        status, body = self._request("GET", f"/v2/models/{model}/config")
        if status != 200:
            raise TritonError(f"config of model '{model}' failed (HTTP {status}): {_error_text(body)}")
        return json.loads(body)

    def ready(self) -> bool:
        return self._request("GET", "/v2/health/ready")[0] == 200

    def model_ready(self, model: str, version: int | None = None) -> bool:
        path = f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/ready"
        return self._request("GET", path)[0] == 200

    def repository_index(self, timeout: float = 2.0) -> list[dict]:
        status, body = self._request("POST", "/v2/repository/index", {}, timeout=timeout)
        if status != 200:
            raise TritonError(f"repository index failed (HTTP {status}): {body.decode(errors='replace')}")
        return json.loads(body)

    def loaded_versions(self, timeout: float = 2.0) -> dict[str, list[int]]:
        """Model name -> versions in state READY."""
        out: dict[str, list[int]] = {}
        for entry in self.repository_index(timeout):
            if entry.get("state") == "READY" and entry.get("version"):
                out.setdefault(entry["name"], []).append(int(entry["version"]))
        return {k: sorted(v) for k, v in out.items()}

    def load_model(self, model: str, config: dict | None = None, timeout: float = 300.0) -> None:
        """Load or reload ``model`` (optionally with a config override); quote Triton's error on failure."""
        body = {"parameters": {"config": json.dumps(config)}} if config is not None else {}
        status, resp = self._request("POST", f"/v2/repository/models/{model}/load", body, timeout=timeout)
        if status != 200:
            raise TritonError(f"load of model '{model}' failed (HTTP {status}): {_error_text(resp)}")

    def unload_model(self, model: str, timeout: float = 60.0) -> None:
        status, resp = self._request("POST", f"/v2/repository/models/{model}/unload", {}, timeout=timeout)
        if status != 200:
            raise TritonError(f"unload of model '{model}' failed (HTTP {status}): {_error_text(resp)}")

    def load_errors(self) -> str:
        """The server's own error lines from its log (model load failures first), for messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        lines = [ln for ln in text.splitlines() if re.search(r"^E\d{4}|failed to load|error:|UNAVAILABLE", ln, re.I)]
        tail = lines[-8:] if lines else text.splitlines()[-8:]
        return " | ".join(ln.strip() for ln in tail) + f" (log: {self.log_path})"


def shm_prefix(workdir: Path, name: str) -> str:
    """The /dev/shm region prefix of the server named ``name`` in ``workdir``: unique per server on this host
    (fleets of tests, drills and users run side by side with the same instance names), stable across restarts."""
    digest = hashlib.sha1(f"{Path(workdir).resolve()}|{name}".encode()).hexdigest()[:10]
    return f"recserve-{digest}-{name}-"


def shm_regions(prefix: str) -> list[Path]:
    try:
        return [p for p in SHM_DIR.iterdir() if p.name.startswith(prefix)]
    except OSError:
        return []


def shm_usage(prefix: str) -> tuple[int, int]:
    """(regions, bytes) in /dev/shm whose names start with ``prefix``."""
    sizes = []
    for p in shm_regions(prefix):
        try:
            sizes.append(p.stat().st_size)
        except OSError:  # removed meanwhile
            pass
    return len(sizes), sum(sizes)


def remove_shm_regions(prefix: str) -> int:
    """Remove this prefix's regions (call once the server's process group is gone); returns how many."""
    n = 0
    for p in shm_regions(prefix):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


def _error_text(body: bytes) -> str:
    try:
        return json.loads(body).get("error", body.decode(errors="replace"))
    except (ValueError, AttributeError):
        return body.decode(errors="replace")

