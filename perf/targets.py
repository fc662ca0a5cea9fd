"""Where requests go: one embedded Triton (direct), our own HAProxy in front of it, or a running fleet.

Each endpoint knows its gRPC URL, the metrics URLs and the server pids behind it, so every load point
can carry server-side figures regardless of the path the requests took.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from recserve.control.runtime.triton import (
    ADMIN_HEADER_GRPC,
    REPO_ROOT,
    STATS_KEY_FILE,
    TritonConfig,
    TritonServer,
    free_port,
    servable_models,
    tensorrt_available,
)


@dataclass
class Endpoint:
    """A gRPC address plus what lies behind it."""

    via: str
    grpc_url: str
    metrics_urls: list[str] = field(default_factory=list)
    pids: list[int] = field(default_factory=list)
    detail: str = ""
    #: HAProxy processes on the path (their CPU per request is reported apart from the server's).
    proxy_pids: list[int] = field(default_factory=list)
    #: gRPC headers perf_analyzer sends: the statistics key (Triton and HAProxy's front door guard model statistics;
    #: that key opens nothing else, so it may sit on perf_analyzer's command line).
    headers: dict[str, str] = field(default_factory=dict)


class Unavailable(RuntimeError):
    """An endpoint cannot be used on this host; the message is the one line the report prints."""


def check_models(repository: Path, models: list[str]) -> tuple[list[str], dict[str, str]]:
    """Split ``models`` into loadable ones and skipped ones with a reason (missing, not built, no GPU)."""
    gpu = tensorrt_available()
    servable = set(servable_models(repository, with_tensorrt=gpu))
    ok, skipped = [], {}
    for m in models:
        cfg = repository / m / "config.pbtxt"
        if not cfg.exists():
            skipped[m] = f"model '{m}' does not exist in {repository}"
        elif m in servable:
            ok.append(m)
        elif ("tensorrt" in cfg.read_text() or m.endswith("_trt")) and not gpu:
            skipped[m] = f"'{m}' needs TensorRT and an NVIDIA GPU: {_why_no_tensorrt()} (skipped)"
        else:
            skipped[m] = f"model '{m}' (or a step of it) has no built version in {repository}: run 'make models'"
    return ok, skipped


def _why_no_tensorrt() -> str:
    """Which half of ``tensorrt_available`` is missing, so a GPU host without the package is told so."""
    import importlib.util

    if importlib.util.find_spec("tensorrt") is None:
        return "the tensorrt package is not installed (the project's gpu extra, tensorrt-cu12)"
    return "no CUDA GPU is visible to torch"


def start_server(repository: Path, models: list[str], workdir: Path) -> TritonServer:
    """One embedded tritonserver loading ``models``; the caller stops it (``finally``)."""
    server = TritonServer(TritonConfig(model_repository=repository, workdir=workdir, models=models, name="perf"))
    server.start()
    return server


def _stats_header(key: str | None) -> dict[str, str]:
    return {ADMIN_HEADER_GRPC: key} if key else {}


def direct(server: TritonServer) -> Endpoint:
    return Endpoint("direct", server.grpc_url, [server.metrics_url], [server.pid] if server.pid else [],
                    headers=_stats_header(server.stats_key))


class LocalProxy:
    """control.routing.haproxy's HAProxy with one slot bound to our server: the fleet's data path, minus the fleet."""

    def __init__(self, server: TritonServer, workdir: Path):
        from recserve.control.routing.frontdoor import FrontDoorConfig
        from recserve.control.routing.haproxy import HAProxy, HAProxyConfig

        self.server = server
        # statistics pass the front door with the server's statistics key (perf_analyzer reads them every window)
        front = FrontDoorConfig(admin_key_file=server.config.workdir / STATS_KEY_FILE)
        self.proxy = HAProxy(HAProxyConfig(workdir=workdir, grpc_port=free_port(), http_port=free_port(), slots=1,
                                           frontdoor=front))

    def start(self, timeout_s: float = 10.0) -> Endpoint:
        c = self.server.config
        self.proxy.start()
        self.proxy.bind_slot(0, c.grpc_port, c.http_port)
        self.proxy.set_state(0, "ready")
        deadline = time.monotonic() + timeout_s
        while not self.proxy.slot_up(0):
            if time.monotonic() > deadline:
                raise Unavailable(f"haproxy never saw the server healthy; see {self.proxy.config.workdir}/haproxy.log")
            time.sleep(0.1)
        pids = [self.server.pid] if self.server.pid else []
        return Endpoint(
            "haproxy",
            f"127.0.0.1:{self.proxy.config.grpc_port}",
            [self.server.metrics_url],
            pids,
            "own HAProxy (control.routing.haproxy, one slot) in front of the embedded server",
            [self.proxy.pid] if self.proxy.pid else [],
            _stats_header(self.server.stats_key),
        )

    def stop(self) -> None:
        self.proxy.stop()


def fleet(timeout_s: float = 15.0) -> Endpoint:
    """The running fleet's HAProxy gRPC endpoint from ``recctl status --json``; Unavailable when none runs."""
    cmd = [sys.executable, "-m", "recserve.control.recctl", "status", "--json"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, cwd=str(REPO_ROOT))
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise Unavailable(f"no fleet: 'recctl status --json' did not answer ({exc})") from exc
    if proc.returncode != 0:
        why = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        raise Unavailable(
            f"no fleet running ('recctl status --json' exit {proc.returncode}: {why[0]}); 'make fleet-up' starts one"
        )
    try:
        doc = json.loads(proc.stdout)
    except ValueError as exc:
        raise Unavailable(f"'recctl status --json' printed no JSON: {proc.stdout[:200]!r}") from exc
    endpoints = doc.get("endpoints") or {}
    url = endpoints.get("grpc") or endpoints.get("grpc_url")
    if not url:
        raise Unavailable(f"'recctl status --json' names no gRPC endpoint (endpoints: {endpoints})")
    url = url.split("://")[-1]
    instances = [i for i in doc.get("instances", []) if i.get("pid")]
    return Endpoint(
        "fleet",
        url,
        [f"http://127.0.0.1:{i['metrics_port']}/metrics" for i in instances if i.get("metrics_port")],
        [int(i["pid"]) for i in instances],
        f"fleet HAProxy {url} over {len(instances)} instance(s)",
        headers=_fleet_stats_header(),
    )


def _fleet_stats_header() -> dict[str, str]:
    """The fleet's statistics key as perf_analyzer's statistics header, when this user can read it (else the front
    door refuses statistics and the server-side columns stay empty). Never an admin key: those are per instance."""
    import os

    root = Path(os.environ.get("RECSERVE_ROOT", REPO_ROOT / ".recserve"))
    try:
        return _stats_header((root / STATS_KEY_FILE).read_text().strip())
    except OSError:
        return {}
