"""The fleet: Triton instances (real tritonserver processes) behind one HAProxy, supervised by deep health.

The fleet owns membership, roles and the exact versions each instance serves; every change is written to the
state database first, then applied. Routing changes go through HAProxy's runtime API only. Instances and
HAProxy run in their own sessions with pid files, so a control plane that dies leaves the data path serving,
and the next one adopts them.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2

from recserve.control.client import RecClient
from recserve.control.frontdoor import FrontDoorConfig
from recserve.control.golden import Golden
from recserve.control.haproxy import HAProxy, HAProxyConfig, HAProxyError
from recserve.control.health import HealthMonitor, Probe, deep_check
from recserve.control.keys import read_secret
from recserve.control.metrics import ControlMetrics
from recserve.control.procs import kill_group, pid_alive
from recserve.control.snapshots import RepositoryError, has_manifests, verify_version, versions_on_disk
from recserve.control.state import InstanceRecord, State
from recserve.control.targets import TargetFiles, targets_dir
from recserve.control.triton import (
    DEFAULT_REPOSITORY,
    REPO_ROOT,
    TritonConfig,
    TritonError,
    TritonServer,
    ensemble_steps,
    port_in_use,
    remove_shm_regions,
    servable_models,
    shm_prefix,
    shm_usage,
)

FAULT_DIR_ENV = "RECSERVE_FAULT_DIR"
ROLES = ("primary", "standby", "canary")


class FleetError(RuntimeError):
    """A fleet operation was refused or failed; ``code`` names the gRPC status to answer with."""

    def __init__(self, message: str, code: str = "FAILED_PRECONDITION"):
        super().__init__(message)
        self.code = code


@dataclass
class FleetConfig:
    root: Path = REPO_ROOT / ".recserve"
    repository: Path = DEFAULT_REPOSITORY
    grpc_port: int = 8001
    http_port: int = 8000
    instances: int = 2
    slots: int = 4
    #: Top-level models to serve; None = every servable ensemble (recommend, search; *_trt on GPU hosts).
    models: list[str] | None = None
    health_interval_s: float = 0.3
    #: Consecutive failed deep checks before an instance is marked broken (1 for fatal failures).
    fail_threshold: int = 2
    restart_backoff_s: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
    instance_start_timeout_s: float = 180.0
    extra_env: dict[str, str] = field(default_factory=dict)
    #: HAProxy's Prometheus exporter port (0 = none).
    haproxy_metrics_port: int = 0
    #: Client front door: bind address, TLS, limits (control/frontdoor.py); its admin key file is the fleet's.
    frontdoor: FrontDoorConfig = field(default_factory=FrontDoorConfig)


def model_config(repository: Path, model: str, versions: list[int]) -> dict:
    """The model's config.pbtxt as Triton's JSON config, pinned to exactly ``versions``.

    A load with a config override replaces the whole config, so the override is the full committed config.
    """
    text = (repository / model / "config.pbtxt").read_text()
    msg = text_format.Parse(text, model_config_pb2.ModelConfig())
    cfg = json_format.MessageToDict(msg, preserving_proto_field_name=True)
    cfg["version_policy"] = {"specific": {"versions": [int(v) for v in sorted(versions)]}}
    return cfg




class Fleet:
    def __init__(self, config: FleetConfig, metrics: ControlMetrics | None = None):
        self.config = config
        self.root = Path(config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repository = Path(config.repository).resolve()
        self.metrics = metrics or ControlMetrics()
        self.state = State(self.root / "state.db")
        self.admin_key = read_secret(self.root / "admin.key")
        config.frontdoor.admin_key_file = self.root / "admin.key"  # its holders may read statistics via HAProxy
        self.haproxy = HAProxy(HAProxyConfig(workdir=self.root / "haproxy", grpc_port=config.grpc_port,
                                             http_port=config.http_port, slots=config.slots,
                                             metrics_port=config.haproxy_metrics_port,
                                             frontdoor=config.frontdoor))
        self.targets = TargetFiles(targets_dir(self.root))  # Prometheus file_sd: one target per instance
        self.golden = Golden(self.repository, metrics=self.metrics, event=lambda msg: self.state.event("golden", msg))
        self.servers: dict[str, TritonServer] = {}
        self.clients: dict[str, RecClient] = {}
        self.lock = threading.RLock()
        self.busy: set[str] = set()  # instances being (re)started or reloaded: health results ignored
        self.fails: dict[str, int] = {}
        self.last_probe: dict[str, Probe] = {}
        self.canary_broken: dict[str, str] = {}
        self._restart_count: dict[str, list[float]] = {}
        self._stopping = threading.Event()
        self.monitor: HealthMonitor | None = None

    # ================================================================== models and versions
    def top_models(self) -> list[str]:
        servable = servable_models(self.repository)
        if self.config.models is not None:
            missing = [m for m in self.config.models if m not in servable]
            if missing:
                raise FleetError(f"models {missing} cannot be served from {self.repository} (not built?)",
                                 "FAILED_PRECONDITION")
            return list(self.config.models)
        return [m for m in servable if 'platform: "ensemble"' in (self.repository / m / "config.pbtxt").read_text()]

    def model_closure(self) -> list[str]:
        """Every model the fleet serves, leaves before the ensembles that compose them."""
        out: list[str] = []
        for top in self.top_models():
            for step in ensemble_steps(self.repository / top):
                if step not in out:
                    out.append(step)
        for top in self.top_models():
            if top not in out:
                out.append(top)
        return out

    def versioned_models(self) -> list[str]:
        """Models built with manifests: the ones rollouts move between versions."""
        return [m for m in self.model_closure() if has_manifests(self.repository, m)]

    def initial_desired(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for m in self.model_closure():
            versions = versions_on_disk(self.repository, m)
            if has_manifests(self.repository, m):
                good = [v for v in versions if verify_version(self.repository, m, v).verified]
                if not good:
                    raise FleetError(f"model {m!r}: no version passes its manifest sha256 check", "FAILED_PRECONDITION")
                out[m] = [good[-1]]
            else:
                out[m] = [versions[-1]]
        return out

    def desired(self) -> dict[str, list[int]]:
        d = self.state.desired()
        return {m: d[m] for m in self.model_closure() if m in d}

    def check_version(self, model: str, version: int) -> None:
        """Refuse a version that is unknown or fails its sha256 (RepositoryError names which and why)."""
        info = verify_version(self.repository, model, version)
        if has_manifests(self.repository, model) and not info.verified:
            raise RepositoryError(f"model {model!r} version {version} fails verification: {info.problem}")

    def load_versions(self, server: TritonServer, versions: dict[str, list[int]], only: list[str] | None = None
                      ) -> None:
        """Load exactly ``versions`` (leaves first, then ensembles); Triton loads before it unloads."""
        for m in self.model_closure():
            if only is not None and m not in only:
                continue
            for v in versions[m]:
                self.check_version(m, v)
            server.load_model(m, config=model_config(self.repository, m, versions[m]),
                              timeout=self.config.instance_start_timeout_s)

    # ================================================================== instances
    def _server(self, rec: InstanceRecord) -> TritonServer:
        srv = self.servers.get(rec.id)
        if srv is None:
            env = {FAULT_DIR_ENV: str(Path(rec.workdir) / "faults"), **self.config.extra_env}
            srv = TritonServer(TritonConfig(
                model_repository=self.repository, workdir=Path(rec.workdir), http_port=rec.http_port,
                grpc_port=rec.grpc_port, metrics_port=rec.metrics_port, models=[], admin_key=self.admin_key,
                startup_timeout_s=self.config.instance_start_timeout_s, extra_env=env, name=rec.id))
            self.servers[rec.id] = srv
        return srv

    def client(self, iid: str) -> RecClient:
        c = self.clients.get(iid)
        rec = self.state.instance(iid)
        if c is None or getattr(c, "_port", None) != rec.grpc_port:
            from recserve.control.health import INFER_TIMEOUT_S

            c = RecClient(f"127.0.0.1:{rec.grpc_port}", timeout_s=INFER_TIMEOUT_S, retry_policy=None)
            c._port = rec.grpc_port
            self.clients[iid] = c
        return c

    def metrics_url(self, iid: str) -> str:
        """Triton's Prometheus endpoint of one instance (the rollout gates read its request counters)."""
        return f"http://127.0.0.1:{self.state.instance(iid).metrics_port}/metrics"

    def alive(self, rec: InstanceRecord) -> bool:
        srv = self.servers.get(rec.id)
        if srv is not None and srv.process is not None:
            return srv.process.poll() is None
        return pid_alive(rec.pid)

    def _kill(self, rec: InstanceRecord) -> None:
        srv = self.servers.get(rec.id)
        if srv is not None and srv.process is not None:
            kill_group(srv.process.pid)
            try:
                srv.process.wait(10)
            except Exception:
                pass
            srv.stop(timeout_s=1)
        elif rec.pid:
            kill_group(rec.pid)
            deadline = time.monotonic() + 10
            while pid_alive(rec.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        remove_shm_regions(shm_prefix(Path(rec.workdir), rec.id))  # a killed server's stubs leave them behind
        self.servers.pop(rec.id, None)
        c = self.clients.pop(rec.id, None)
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
        (Path(rec.workdir) / "triton.pid").unlink(missing_ok=True)

    def start_instance(self, iid: str) -> None:
        """(Re)start one instance: fresh process, exactly its versions, golden answer, then into HAProxy."""
        rec = self.state.instance(iid)
        self.busy.add(iid)
        try:
            self.haproxy.set_state(rec.slot, "maint")
            if rec.pid:  # also when it died: its process group still holds the Python backend stubs
                self._kill(rec)
            self.servers.pop(iid, None)
            for attr in ("grpc_port", "http_port", "metrics_port"):  # keep ports when free, else new ones
                if getattr(rec, attr) and port_in_use(getattr(rec, attr)):
                    setattr(rec, attr, 0)
            srv = self._server(rec)
            self.state.update_instance(iid, state="starting", detail="")
            srv.start(wait=True)
            rec.grpc_port, rec.http_port, rec.metrics_port = (srv.config.grpc_port, srv.config.http_port,
                                                              srv.config.metrics_port)
            rec.pid = srv.pid
            (Path(rec.workdir) / "triton.pid").write_text(f"{rec.pid}\n")
            self.state.update_instance(iid, pid=rec.pid, grpc_port=rec.grpc_port, http_port=rec.http_port,
                                       metrics_port=rec.metrics_port, state="loading")
            rec = self.state.instance(iid)
            self.load_versions(srv, rec.versions)
            probe = self.settle(iid)
            if not probe.ok:
                raise FleetError(f"{iid} failed its deep check after start: {probe.stage}: {probe.reason}")
            self.haproxy.bind_slot(rec.slot, rec.grpc_port, rec.http_port)
            self.fails[iid] = 0
            # The monitor ignores probes while an instance is busy, so without this the last probe on record is
            # the failure that caused the restart, and promote() would refuse the instance it just started.
            self.last_probe[iid] = probe
            self.state.update_instance(iid, state="healthy", last_healthy=time.time(), detail="")
            self.metrics.instance_healthy.labels(iid).set(1)
            if rec.role != "canary" and rec.state != "drained":
                self.haproxy.set_state(rec.slot, "ready")
        finally:
            self.busy.discard(iid)

    def settle(self, iid: str, timeout_s: float = 30.0) -> Probe:
        """Deep-check until green or ``timeout_s``: after a load, dependent ensembles reload in the background
        and readiness is briefly 400; a version that never settles fails with the last reason."""
        deadline = time.monotonic() + timeout_s
        while True:
            probe = self.check(iid)
            if probe.ok or probe.fatal or probe.stage == "golden" or time.monotonic() > deadline:
                return probe
            time.sleep(0.2)

    def check(self, iid: str) -> Probe:
        rec = self.state.instance(iid)
        if rec is None:
            return Probe(False, "membership", "removed", time.time(), fatal=True)
        srv = self._server(rec)
        probe = deep_check(srv, self.alive(rec), rec.versions, self.golden, self.client(iid))
        self.metrics.check_seconds.labels(iid).set(probe.latency_s)
        return probe

    def new_instance(self, role: str) -> InstanceRecord:
        used = {r.slot for r in self.state.instances()}
        free = [s for s in range(self.config.slots) if s not in used]
        if not free:
            raise FleetError(f"no free slot: the fleet has {self.config.slots} slots, all used", "RESOURCE_EXHAUSTED")
        slot = free[0]
        n = 1
        ids = {r.id for r in self.state.instances()}
        while f"t{n}" in ids:
            n += 1
        iid = f"t{n}"
        rec = InstanceRecord(id=iid, slot=slot, role=role, state="new", grpc_port=0, http_port=0, metrics_port=0,
                             workdir=str(self.root / "instances" / iid), versions=self.desired())
        Path(rec.workdir, "faults").mkdir(parents=True, exist_ok=True)
        self.state.save_instance(rec)
        self.state.event("membership", f"instance {iid} added as {role} in slot {slot}", iid)
        return rec

    # ================================================================== lifecycle
    def up(self, recover: Callable[[], None] | None = None) -> None:
        """Adopt or start HAProxy and every instance in the state; create the default fleet on first run.

        ``recover`` runs before adoption: it settles interrupted rollouts so the records say what to serve.
        """
        if not self.haproxy.adopt():
            self.haproxy.start()
            self.state.event("haproxy", f"haproxy started (pid {self.haproxy.pid})")
            fresh_proxy = True
        else:
            self.state.event("haproxy", f"adopted haproxy (pid {self.haproxy.pid})")
            fresh_proxy = False
        if not self.state.desired():
            for m, v in self.initial_desired().items():
                self.state.set_desired(m, v)
        if recover is not None:
            recover()
        recs = self.state.instances()
        if not recs:
            for i in range(self.config.instances):
                self.new_instance("primary" if i == 0 else "standby")
            recs = self.state.instances()
        to_start = []
        for rec in recs:
            if self._adopt(rec, fresh_proxy):
                continue
            to_start.append(rec.id)
        with ThreadPoolExecutor(max_workers=max(1, len(to_start))) as pool:
            futures = {iid: pool.submit(self._start_with_retry, iid, 2) for iid in to_start}
        errors = {iid: f.exception() for iid, f in futures.items() if f.exception()}
        self.ensure_primary()
        for iid, exc in errors.items():
            self.state.event("start-failed", str(exc), iid)
            self.schedule_restart(iid, f"start failed: {exc}")
        if len(errors) == len(recs):
            raise FleetError(f"no instance could start: {errors}", "UNAVAILABLE")
        exp = self.golden.expected(self.desired())
        self.state.event("golden", f"expected answers for the desired versions come from "
                         f"{exp.source if exp else 'nowhere yet'}")
        self.monitor = HealthMonitor(self.monitored_ids, self.check, self.on_probe,
                                     self.config.health_interval_s).start()

    def _start_with_retry(self, iid: str, attempts: int) -> None:
        for i in range(attempts):
            try:
                return self.start_instance(iid)
            except (TritonError, FleetError, HAProxyError, RepositoryError) as exc:
                self.state.update_instance(iid, state="broken", detail=str(exc)[:500])
                if i == attempts - 1:
                    raise

    def _adopt(self, rec: InstanceRecord, fresh_proxy: bool) -> bool:
        """Keep a running instance from an earlier control plane when it serves exactly its versions."""
        if not rec.pid or not pid_alive(rec.pid):
            return False
        probe = self.check(rec.id)
        for _ in range(10):  # a slow answer on a busy host is not a reason to restart a serving instance
            if probe.ok or probe.fatal or probe.stage in ("versions", "golden"):
                break
            time.sleep(0.5)
            probe = self.check(rec.id)
        if not probe.ok and probe.stage in ("versions", "golden"):
            try:  # alive, but not serving what the record says (interrupted rollout): reload in place
                self.reload(rec.id, rec.versions)
                probe = self.check(rec.id)
            except Exception as exc:
                probe = Probe(False, "reload", str(exc), time.time())
        if not probe.ok:
            self.state.event("adopt", f"not adopting pid {rec.pid}: {probe.stage}: {probe.reason}", rec.id)
            return False
        if fresh_proxy:
            self.haproxy.bind_slot(rec.slot, rec.grpc_port, rec.http_port)
            if rec.role != "canary" and rec.state != "drained":
                self.haproxy.set_state(rec.slot, "ready")
        self.state.update_instance(rec.id, state="healthy" if rec.state != "drained" else "drained")
        self.state.event("adopt", f"adopted running instance pid {rec.pid}", rec.id)
        return True

    def ensure_primary(self) -> None:
        """Exactly one primary, healthy when possible; HAProxy's route points at it."""
        with self.lock:
            recs = self.state.instances()
            if any(r.role == "canary" for r in recs) or self.state.get("route") == "split":
                return  # a rollout owns routing
            prim = [r for r in recs if r.role == "primary"]
            healthy = [r for r in recs if r.state == "healthy" and r.role in ("primary", "standby")]
            cur = prim[0] if prim else None
            if cur is None or cur.state != "healthy":
                choice = next((r for r in healthy if r.role == "standby"), None) or (healthy[0] if healthy else None)
                if choice is not None and (cur is None or choice.id != cur.id):
                    self.promote(choice.id, reason="primary unavailable")
                    return
            if cur is not None:
                self.route_first(cur.slot)
            self.metrics.fleet_degraded.set(0 if self.standbys_healthy() else 1)

    def route_first(self, slot: int) -> None:
        self.haproxy.route("first", slot)
        self.state.put("route", f"first:{slot}")

    def standbys_healthy(self) -> int:
        return sum(1 for r in self.state.instances() if r.role == "standby" and r.state == "healthy")

    def promote(self, iid: str, reason: str = "operator") -> InstanceRecord:
        with self.lock:
            rec = self.state.instance(iid)
            if rec is None:
                raise FleetError(f"unknown instance {iid!r}", "NOT_FOUND")
            if reason == "operator" and self.state.running_rollouts():
                raise FleetError("a rollout is running: promote after it ends (or roll back)", "FAILED_PRECONDITION")
            probe = self.last_probe.get(iid)
            failing = probe is not None and not probe.ok and rec.state != "drained"
            if rec.state not in ("healthy", "drained") or failing:
                raise FleetError(f"instance {iid} is {rec.state}: only a healthy instance can become primary",
                                 "FAILED_PRECONDITION")
            old = [r for r in self.state.instances() if r.role == "primary" and r.id != iid]
            self.haproxy.set_state(rec.slot, "ready")
            self.route_first(rec.slot)
            with self.state.transaction():
                for o in old:
                    self.state.update_instance(o.id, role="standby")
                self.state.update_instance(iid, role="primary", state="healthy")
            for o in old:
                self.metrics.set_role(o.id, "standby")
            self.metrics.set_role(iid, "primary")
            if reason != "operator":
                self.metrics.failovers.inc()
            self.state.event("failover" if reason != "operator" else "promote",
                             f"{iid} is primary ({reason}); was {[o.id for o in old]}", iid)
            return self.state.instance(iid)

    def drain(self, iid: str) -> InstanceRecord:
        with self.lock:
            rec = self.state.instance(iid)
            if rec is None:
                raise FleetError(f"unknown instance {iid!r}", "NOT_FOUND")
            if rec.role == "primary":
                other = next((r for r in self.state.instances() if r.id != iid and r.state == "healthy"
                              and r.role == "standby"), None)
                if other is None:
                    raise FleetError(f"{iid} is the primary and no healthy standby can take its traffic",
                                     "FAILED_PRECONDITION")
                self.promote(other.id, reason="operator")
            self.haproxy.set_state(rec.slot, "drain")
            self.state.update_instance(iid, state="drained", role="standby")
            self.state.event("drain", f"{iid} drained (no new requests)", iid)
            return self.state.instance(iid)

    def add_instance(self, role: str) -> InstanceRecord:
        if role not in ("standby", "primary"):
            raise FleetError(f"role must be 'standby' or 'primary', got {role!r}", "INVALID_ARGUMENT")
        with self.lock:
            rec = self.new_instance("standby")
        try:
            self.start_instance(rec.id)
        except Exception as exc:
            self.state.event("start-failed", str(exc), rec.id)
            self.schedule_restart(rec.id, f"start failed: {exc}")
            raise FleetError(f"instance {rec.id} did not start: {exc}", "UNAVAILABLE") from exc
        if role == "primary":
            return self.promote(rec.id)
        return self.state.instance(rec.id)

    def remove_instance(self, iid: str) -> InstanceRecord:
        with self.lock:
            rec = self.state.instance(iid)
            if rec is None:
                raise FleetError(f"unknown instance {iid!r}", "NOT_FOUND")
            if rec.role == "canary":
                raise FleetError(f"{iid} is the canary of a running rollout", "FAILED_PRECONDITION")
            others = [r for r in self.state.instances() if r.id != iid and r.state == "healthy"]
            if not others:
                raise FleetError(f"removing {iid} would leave no healthy instance serving", "FAILED_PRECONDITION")
            if rec.role == "primary":
                self.promote(next((r for r in others if r.role == "standby"), others[0]).id)
            self.busy.add(iid)
            self.haproxy.set_state(rec.slot, "maint")
            self.state.delete_instance(iid)
        self._kill(rec)
        self.busy.discard(iid)
        self.state.event("membership", f"instance {iid} removed", iid)
        rec.state = "removed"
        return rec

    def monitored_ids(self) -> list[str]:
        self.targets.sync_instances(self.state.instances())  # instances came, went or changed ports
        self.ensure_haproxy()
        self.watch_haproxy()
        return [r.id for r in self.state.instances() if r.id not in self.busy and r.state not in ("restarting",)]

    def watch_haproxy(self) -> None:
        """Fast path for hangs: when HAProxy's own check (every 200 ms) takes a healthy instance down, a 0.3 s
        liveness call decides at once instead of waiting for a deep check stuck on a hung inference."""
        try:
            rows = self.haproxy.servers()
        except HAProxyError:
            return
        for rec in self.state.instances():
            if rec.state != "healthy" or rec.id in self.busy or rec.role == "canary":
                continue
            row = rows.get(f"chk/s{rec.slot}")
            if row is None or row.get("srv_op_state") != "0":
                continue
            srv = self.servers.get(rec.id) or self._server(rec)
            t0 = time.time()
            if srv.live(timeout=0.3):
                continue
            self.mark_broken(rec, Probe(False, "live", "no answer within 0.3 s and HAProxy's check marks it down",
                                        t0, time.time() - t0, fatal=True))

    def ensure_haproxy(self) -> None:
        """HAProxy is the data path: if it died, start it again and restore slots, states and the route."""
        if self.haproxy.is_alive() or self._stopping.is_set():
            return
        with self.lock:
            if self.haproxy.is_alive():
                return
            self.state.event("haproxy", "haproxy is gone: starting it again")
            try:
                self.haproxy.process = None
                self.haproxy._pid = None
                self.haproxy.start()
                for r in self.state.instances():
                    if r.grpc_port and r.state in ("healthy", "drained"):
                        self.haproxy.bind_slot(r.slot, r.grpc_port, r.http_port)
                        if r.role != "canary":
                            self.haproxy.set_state(r.slot, "drain" if r.state == "drained" else "ready")
                route = self.state.get("route", "") or ""
                if route.startswith("first:"):
                    self.haproxy.route("first", int(route.split(":")[1]))
                elif route == "split":
                    for r in self.state.instances():
                        self.haproxy.set_weight(r.slot, int(self.state.get(f"weight:{r.id}", "0") or 0))
                    self.haproxy.route("split")
                self.state.event("haproxy", f"haproxy restarted (pid {self.haproxy.pid})")
            except (HAProxyError, OSError) as exc:
                self.metrics.reconcile_errors.inc()
                self.state.event("haproxy-error", f"restart failed: {exc}"[:500])

    # ================================================================== health reactions
    def on_probe(self, iid: str, probe: Probe) -> None:
        if iid in self.busy or self._stopping.is_set():
            return
        rec = self.state.instance(iid)
        if rec is None:
            return
        self.last_probe[iid] = probe
        self.metrics.set_role(iid, rec.role)
        if probe.ok:
            self.fails[iid] = 0
            self.metrics.instance_healthy.labels(iid).set(1)
            if rec.state != "healthy" and rec.state not in ("drained", "restarting", "starting", "loading"):
                self.state.update_instance(iid, state="healthy", detail="")
            self.state.update_instance(iid, last_healthy=probe.ts)
            return
        self.fails[iid] = self.fails.get(iid, 0) + 1
        if rec.state in ("broken", "restarting", "starting", "loading"):
            return
        if not probe.fatal and self.fails[iid] < self.config.fail_threshold:
            # A second, independent witness: HAProxy's own checks already took the slot out (hang, crash).
            try:
                confirmed = not self.haproxy.slot_up(rec.slot)
            except HAProxyError:
                confirmed = False
            if not confirmed:
                return
            probe.reason += " (HAProxy's health check agrees: slot down)"
        self.mark_broken(rec, probe)

    def mark_broken(self, rec: InstanceRecord, probe: Probe) -> None:
        with self.lock:
            iid = rec.id
            cur = self.state.instance(iid)
            if cur is None or cur.state in ("broken", "restarting", "starting", "loading") or iid in self.busy:
                return  # already handled (the monitor and the HAProxy watch can both see one failure)
            reason = f"{probe.stage}: {probe.reason}"
            try:
                self.haproxy.set_state(rec.slot, "maint")
            except HAProxyError as exc:
                self.state.event("haproxy-error", str(exc), iid)
            self.state.update_instance(iid, state="broken", detail=reason[:500])
            self.metrics.instance_healthy.labels(iid).set(0)
            self.metrics.detections.labels(iid, probe.stage).inc()
            self.state.event("detected", f"{rec.role} {iid} broken at check started {probe.ts:.3f}: {reason}", iid)
            if rec.role == "canary":
                self.canary_broken[iid] = reason  # the rollout rolls back; it owns this instance
                return
            if rec.role == "primary":
                self.ensure_primary()
            self.metrics.fleet_degraded.set(0 if self.standbys_healthy() else 1)
        self.schedule_restart(iid, reason)

    def schedule_restart(self, iid: str, reason: str) -> None:
        rec = self.state.instance(iid)
        if rec is None or self._stopping.is_set():
            return
        self.state.update_instance(iid, state="restarting", detail=reason[:500])
        threading.Thread(target=self._restart_loop, args=(iid, reason), name=f"restart-{iid}", daemon=True).start()

    def _restart_loop(self, iid: str, reason: str) -> None:
        """Restart with backoff until healthy; the instance returns as a standby with the desired versions."""
        while not self._stopping.is_set():
            now = time.time()
            recent = [t for t in self._restart_count.get(iid, []) if now - t < 120]
            delay = self.config.restart_backoff_s[min(len(recent), len(self.config.restart_backoff_s) - 1)]
            self._restart_count[iid] = recent + [now]
            if self._stopping.wait(delay):
                return
            rec = self.state.instance(iid)
            if rec is None or rec.role == "canary":
                return
            with self.lock:
                role = "standby" if rec.role == "primary" else rec.role
                self.state.update_instance(iid, role=role, state="restarting", restarts=rec.restarts + 1,
                                           versions=self._target_versions(rec))
            self.metrics.restarts.labels(iid).inc()
            self.metrics.set_role(iid, role)
            self.state.event("restart", f"restarting {iid} ({reason})", iid)
            try:
                self.start_instance(iid)
            except Exception as exc:
                self.metrics.reconcile_errors.inc()
                self.state.update_instance(iid, state="restarting", detail=f"restart failed: {exc}"[:500])
                self.state.event("restart-failed", str(exc)[:500], iid)
                continue
            self.state.event("recovered", f"{iid} back as {role}", iid)
            try:  # a failure to re-route is not a failed restart: the process is healthy and stays up
                self.ensure_primary()
            except Exception as exc:
                self.metrics.reconcile_errors.inc()
                self.state.event("route-failed", f"after {iid} recovered: {exc}"[:500], iid)
            return

    def _target_versions(self, rec: InstanceRecord) -> dict[str, list[int]]:
        """What a restarted non-canary instance serves: the desired versions."""
        return self.desired()

    # ================================================================== reconcile and shutdown
    def reload(self, iid: str, versions: dict[str, list[int]], only: list[str] | None = None) -> None:
        """Record, then load, new versions on one instance; raises when the instance then fails its check."""
        with self.lock:
            self.state.update_instance(iid, versions=versions)
        rec = self.state.instance(iid)
        self.busy.add(iid)
        try:
            self.load_versions(self._server(rec), versions, only=only)
            probe = self.settle(iid)
            if not probe.ok:
                raise FleetError(f"{iid} failed its deep check after loading {versions}: {probe.stage}: "
                                 f"{probe.reason}", "ABORTED")
            self.fails[iid] = 0
            self.last_probe[iid] = probe
        finally:
            self.busy.discard(iid)

    def status(self) -> dict:
        recs = self.state.instances()
        loaded: dict[str, dict[str, list[int]]] = {}
        for r in recs:
            srv = self.servers.get(r.id)
            if srv is not None and r.state in ("healthy", "drained", "broken"):
                from recserve.control.health import ready_versions

                loaded[r.id] = ready_versions(srv, timeout=0.5) or {}
        route = self.state.get("route", "") or ""
        weights = {}
        for r in recs:
            if route == "split":
                weights[r.id] = int(self.state.get(f"weight:{r.id}", "0") or 0)
            else:  # balance first: the instance in the routed slot takes everything
                weights[r.id] = 100 if route == f"first:{r.slot}" else 0
        warnings = []
        if not any(r.role == "standby" and r.state == "healthy" for r in recs):
            warnings.append("no healthy standby: a primary failure would interrupt serving")
        if not any(r.state == "healthy" for r in recs):
            warnings.append("no healthy instance")
        warnings += self.golden.problems()
        health = "ok" if not warnings else ("down" if not any(r.state == "healthy" for r in recs) else "degraded")
        shm = {r.id: shm_usage(shm_prefix(Path(r.workdir), r.id)) for r in recs}
        return {"instances": recs, "loaded": loaded, "weights": weights, "desired": self.desired(),
                "warnings": warnings, "health": health, "route": self.state.get("route", ""), "shm": shm}

    def stop_monitor(self) -> None:
        self._stopping.set()
        if self.monitor:
            self.monitor.stop()

    def down(self) -> None:
        """Stop every instance and HAProxy this fleet started (by pid), and forget the membership."""
        self.stop_monitor()
        for rec in self.state.instances():
            self._kill(rec)
            self.state.delete_instance(rec.id)
        if not self.haproxy.pid:
            self.haproxy.adopt()
        self.haproxy.stop()
        for key in ("route",):
            self.state.put(key, "")
        self.state.event("down", "fleet stopped")

    def detach(self) -> None:
        """Leave the data path running (control plane exit/restart)."""
        self.stop_monitor()
        for c in self.clients.values():
            try:
                c.close()
            except Exception:
                pass


def status_json(fleet: Fleet, endpoints: dict[str, str]) -> dict:
    """The ``recctl status --json`` document."""
    st = fleet.status()
    return {
        "endpoints": endpoints,
        "health": st["health"],
        "warnings": st["warnings"],
        "route": st["route"],
        "desired": st["desired"],
        "instances": [
            {"id": r.id, "role": r.role, "state": r.state, "pid": r.pid, "grpc_port": r.grpc_port,
             "http_port": r.http_port, "metrics_port": r.metrics_port, "weight": st["weights"].get(r.id, 0),
             "models": st["loaded"].get(r.id, {}), "detail": r.detail, "restarts": r.restarts, "slot": r.slot,
             "last_healthy_unix": r.last_healthy, "shm_regions": st["shm"][r.id][0], "shm_bytes": st["shm"][r.id][1]}
            for r in st["instances"]
        ],
    }


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
