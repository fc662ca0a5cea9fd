"""The fleet: Triton instances (real tritonserver processes) behind one Router (HAProxy), supervised by deep health.

The fleet owns membership, roles and the exact versions each instance serves; every change is written to the
state database first, then applied. Routing is the Router's (control/routing/router.py). Instances and HAProxy run in
their own sessions with pid files, so a control plane that dies leaves the data path serving, and the next one
adopts them. The fleet holds one part per job, each in its module: the catalog of models and versions
(control/fleet/versions.py, shared in kind with the Kubernetes pool), instance processes (control/fleet/instances.py),
the supervisor of health reactions (control/fleet/supervision.py), membership and roles (control/fleet/membership.py).
``status()`` says it all as a ``FleetStatus`` (control/fleet/status.py).
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from recserve.control import testswitch
from recserve.control.client import RecClient
from recserve.control.fleet.config import FAULT_DIR_ENV, ROLES, FleetConfig, FleetError
from recserve.control.fleet.golden import Golden
from recserve.control.fleet.health import Probe
from recserve.control.fleet.instances import Instances
from recserve.control.fleet.membership import DRAIN_TIMEOUT_S, Membership
from recserve.control.fleet.spec_golden import SpecGolden
from recserve.control.fleet.status import FleetStatus, InstanceStatus
from recserve.control.fleet.supervision import Supervisor
from recserve.control.fleet.versions import Catalog, model_config
from recserve.control.keys import read_existing_secret, read_secret
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.monitoring.targets import TargetFiles, targets_dir
from recserve.control.routing.router import Router, RouterConfig
from recserve.control.runtime.hostcheck import proc_exposure_warning
from recserve.control.runtime.procs import pid_alive
from recserve.control.runtime.triton import ADMIN_KEY_FILE, STATS_KEY_FILE, shm_prefix, shm_usage
from recserve.control.spec.spec import load_spec
from recserve.control.state.store import InstanceRecord, State

#: The one admin key every instance shared before each got its own (kept only for instances still running with it).
LEGACY_ADMIN_KEY_FILE = "admin.key"

__all__ = ["FAULT_DIR_ENV", "ROLES", "Fleet", "FleetConfig", "FleetError", "FleetStatus", "InstanceStatus", "dumps",
           "model_config"]


class Fleet:
    """The fleet holds its parts: the ``Catalog`` (models and versions), ``Instances`` (processes), the
    ``Supervisor`` (health reactions) and ``Membership`` (roles and serving), over one state store and one Router.
    Its methods are what the control API, the rollouts (``ServingPool``), monitoring and recctl call."""

    def __init__(self, config: FleetConfig, metrics: ControlMetrics | None = None):
        self.config = config
        self.root = Path(config.root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.repository = Path(config.repository).resolve()
        self.metrics = metrics or ControlMetrics()
        self.state = State(self.root / "state.db")
        # Each instance has its own admin key, fresh at every start (``<workdir>/admin.key``,
        # control/runtime/triton.py); the fleet holds only the statistics key every instance shares: it reads
        # statistics and nothing else, so it is what perf_analyzer and the front door's statistics pass-through get.
        self.stats_key = read_secret(self.root / STATS_KEY_FILE)
        config.frontdoor.admin_key_file = self.root / STATS_KEY_FILE  # its holders may read statistics via HAProxy
        self._adopt_legacy_admin_key()
        self.host_warnings = [w for w in (proc_exposure_warning(), testswitch.warning()) if w]
        for w in self.host_warnings:
            self.state.event("security", w)
        config.validate()
        self.router = Router(RouterConfig(
            workdir=self.root / "haproxy", grpc_port=config.grpc_port, http_port=config.http_port,
            slots=config.slots, metrics_port=config.haproxy_metrics_port, mode=config.mode,
            knee_rps=config.knee_rps, slo_p99_ms=config.slo_p99_ms, fallback=config.fallback,
            fallback_maxconn=config.fallback_maxconn, fallback_queue=config.fallback_queue,
            timeout_server_ms_override=config.timeout_server_ms,
            fallback_repository=self.repository, adaptive=config.adaptive_limits, frontdoor=config.frontdoor),
            self.state)
        self.targets = TargetFiles(targets_dir(self.root))  # Prometheus file_sd: one target per instance
        self.spec = load_spec(config.spec, self.repository) if config.spec is not None else None
        if self.spec is not None:
            if config.models is None:
                config.models = self.spec.model_names()
            self.golden = SpecGolden(self.spec, metrics=self.metrics,
                                     event=lambda msg: self.state.event("golden", msg))
        else:
            self.golden = Golden(self.repository, metrics=self.metrics,
                                 event=lambda msg: self.state.event("golden", msg))
        self.catalog = Catalog(self.repository, self.state, config.models)  # the repository rules KubePool shares
        self.lock = threading.RLock()
        self.supervisor = Supervisor(config, self.state, self.router, self.metrics, self.targets, self.lock)
        self.instances = Instances(config, self.root, self.repository, self.stats_key, self.state, self.router,
                                   self.metrics, self.catalog, self.golden, self.supervisor, self.lock)
        self.membership = Membership(config, self.state, self.router, self.metrics, self.instances,
                                     self.supervisor, self.lock)
        self.supervisor.connect(self.instances, self.membership, self.catalog)

    def _adopt_legacy_admin_key(self) -> None:
        """Upgrade path: instances started by a control plane before per-instance keys run with the fleet-wide
        ``<root>/admin.key``; give each live one a copy in its workdir so adoption can reach its repository API.
        Its next start replaces the copy with a fresh key of its own."""
        legacy = self.root / LEGACY_ADMIN_KEY_FILE
        key = read_existing_secret(legacy)
        if key is None:
            return
        for rec in self.state.instances():
            own = Path(rec.workdir) / ADMIN_KEY_FILE
            if rec.pid and pid_alive(rec.pid) and not own.exists():
                fd = os.open(str(own), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w") as f:
                    f.write(key)
                self.state.event("security", f"instance {rec.id} (pid {rec.pid}) still runs with the fleet-wide "
                                 f"admin key of {legacy}; its next start gives it a key of its own", rec.id)

    # ------------------------------------------------------------------ the catalog's (ServingPool, callers)
    def top_models(self) -> list[str]:
        return self.catalog.top_models()

    def model_closure(self) -> list[str]:
        return self.catalog.model_closure()

    def versioned_models(self) -> list[str]:
        return self.catalog.versioned_models()

    def initial_desired(self) -> dict[str, list[int]]:
        return self.catalog.initial_desired()

    def desired(self) -> dict[str, list[int]]:
        return self.catalog.desired()

    def check_version(self, model: str, version: int) -> None:
        self.catalog.check_version(model, version)

    # ------------------------------------------------------------------ instances (ServingPool)
    def client(self, iid: str) -> RecClient:
        return self.instances.client(iid)

    def metrics_url(self, iid: str) -> str:
        return self.instances.metrics_url(iid)

    def reload(self, iid: str, versions: dict[str, list[int]], only: list[str] | None = None) -> None:
        self.instances.reload(iid, versions, only=only)

    # ------------------------------------------------------------------ supervision (ServingPool, monitoring)
    @property
    def canary_broken(self) -> dict[str, str]:
        return self.supervisor.broken_canaries()

    def schedule_restart(self, iid: str, reason: str) -> None:
        self.supervisor.schedule_restart(iid, reason)

    def last_probe(self, iid: str) -> Probe | None:
        return self.supervisor.last_probe(iid)

    # ------------------------------------------------------------------ membership (ServingPool, the control API)
    def ensure_primary(self) -> None:
        self.membership.ensure_primary()

    def route_first(self, slot: int) -> None:
        self.membership.route_first(slot)

    def route_serving(self, slot: int) -> None:
        self.membership.route_serving(slot)

    def ensure_canary_out(self, slot: int) -> None:
        self.membership.ensure_canary_out(slot)

    def shedding(self) -> bool:
        return self.membership.shedding()

    def active_target(self) -> int:
        return self.membership.active_target()

    def promote(self, iid: str, reason: str = "operator") -> InstanceRecord:
        return self.membership.promote(iid, reason)

    def drain(self, iid: str) -> InstanceRecord:
        return self.membership.drain(iid)

    def add_instance(self, role: str) -> InstanceRecord:
        return self.membership.add_instance(role)

    def remove_instance(self, iid: str) -> InstanceRecord:
        return self.membership.remove_instance(iid)

    def scale(self, active: int, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> list[InstanceRecord]:
        return self.membership.scale(active, drain_timeout_s)

    @property
    def traffic(self) -> Router:
        """Who routes clients (the ``ServingPool`` protocol's name for it): the Router."""
        return self.router

    def up(self, recover: Callable[[], None] | None = None) -> None:
        """Adopt or start HAProxy and every instance in the state; create the default fleet on first run.

        ``recover`` runs before adoption: it settles interrupted rollouts so the records say what to serve.
        """
        fresh_proxy = self.router.start()
        if not self.state.desired():
            for m, v in self.initial_desired().items():
                self.state.set_desired(m, v)
        if recover is not None:
            recover()
        recs = self.state.instances()
        if not recs:
            actives = self.config.active if self.config.mode == "active-active" else 1
            self.state.put("active_target", str(actives))
            for i in range(self.config.instances):
                self.instances.new("primary" if i == 0 else ("active" if i < actives else "standby"))
            recs = self.state.instances()
        to_start = []
        for rec in recs:
            if self.instances.adopt(rec, fresh_proxy):
                continue
            to_start.append(rec.id)
        with ThreadPoolExecutor(max_workers=max(1, len(to_start))) as pool:
            futures = {iid: pool.submit(self.instances.start_with_retry, iid, 2) for iid in to_start}
        errors = {iid: f.exception() for iid, f in futures.items() if f.exception()}
        for iid, exc in errors.items():
            self.state.event("start-failed", str(exc), iid)
        if len(errors) == len(recs):  # no restarts scheduled: the caller stops what was started (stop_processes)
            raise FleetError(f"no instance could start: {errors}", "UNAVAILABLE")
        self.membership.ensure_primary()
        for iid, exc in errors.items():
            self.supervisor.schedule_restart(iid, f"start failed: {exc}")
        exp = self.golden.expected(self.desired())
        self.state.event("golden", f"expected answers for the desired versions come from "
                         f"{exp.source if exp else 'nowhere yet'}")
        self.supervisor.start_monitor()

    def status(self) -> FleetStatus:
        recs = self.state.instances()
        loaded = {r.id: v for r in recs if (v := self.instances.loaded(r)) is not None}
        pool = self.router.pool_slots()
        weights = self.router.shares(recs)
        try:
            load = self.router.load()
            shedding = self.router.shedding()
        except Exception:  # HAProxy down: the supervisor restarts it; status still answers
            load, shedding = {}, False
        warnings = []
        serving = [r for r in recs if r.state == "healthy" and r.role != "canary"]
        if self.config.mode == "primary-standby":
            if not any(r.role == "standby" and r.state == "healthy" for r in recs):
                warnings.append("no healthy standby: a primary failure would interrupt serving")
        elif len(serving) < 2:
            warnings.append("fewer than two healthy instances: one more failure would interrupt serving")
        if shedding:
            warnings.append("shedding: the pool is at its in-flight limit (degraded answers / overloaded replies)")
        if not any(r.state == "healthy" for r in recs):
            warnings.append("no healthy instance")
        warnings += self.golden.problems()
        health = "ok" if not warnings else ("down" if not any(r.state == "healthy" for r in recs) else "degraded")
        warnings += self.host_warnings  # the host's hardening: said at every status, but not the fleet's health
        instances = []
        for r in recs:
            regions, nbytes = shm_usage(shm_prefix(Path(r.workdir), r.id))
            ld = load.get(r.slot)
            instances.append(InstanceStatus(
                id=r.id, role=r.role, state=r.state, pid=r.pid or 0, slot=r.slot, grpc_port=r.grpc_port,
                http_port=r.http_port, metrics_port=r.metrics_port, detail=r.detail, restarts=r.restarts,
                last_healthy_unix=r.last_healthy, weight=weights.get(r.id, 0), models=loaded.get(r.id, {}),
                shm_regions=regions, shm_bytes=nbytes, in_pool=r.slot in pool,
                in_flight=int(ld.in_flight) if ld is not None else 0, queued=int(ld.queued) if ld is not None else 0,
                limit=int(ld.limit) if ld is not None else 0, limit_decision=self.router.decisions.get(r.slot, "")))
        return FleetStatus(
            health=health, warnings=warnings, route=self.router.current_route(), mode=self.config.mode,
            active_target=self.active_target(), shedding=shedding, knee_rps=self.router.config.knee(),
            knee_source=self.router.config.knee_source, host_limit=self.router.config.host_limit(),
            desired=self.desired(), instances=instances)

    def stop_monitor(self) -> None:
        self.supervisor.stop()

    def down(self) -> None:
        """Stop every instance and HAProxy this fleet started (by pid), and forget the membership."""
        self.stop_monitor()
        for rec in self.state.instances():
            self.instances.kill(rec)
            self.state.delete_instance(rec.id)
        self.router.stop()
        self.state.event("down", "fleet stopped")

    def stop_processes(self, busy_wait_s: float = 60.0) -> list[str]:
        """Stop every process of this fleet (each instance's tritonserver, HAProxy, the degraded-answer server),
        whether this control plane started or adopted it, keeping the fleet's records: what a bring-up that
        failed does before the control plane exits, so nothing holds the fleet's ports for the next ``up``.
        Returns what was stopped, one ``"<what> (pid N)"`` each."""
        self.stop_monitor()  # no health reaction and no restart from here on
        deadline = time.monotonic() + busy_wait_s
        # a restart in progress finishes first, then is stopped
        while self.supervisor.any_busy() and time.monotonic() < deadline:
            time.sleep(0.1)
        stopped = []
        for rec in self.state.instances():
            if self.instances.alive(rec):
                stopped.append(f"instance {rec.id} (pid {self.instances.pid(rec)})")
            self.instances.kill(rec)
            self.state.update_instance(rec.id, pid=0, state="broken", detail="stopped: the fleet did not come up")
            self.metrics.instance_healthy.labels(rec.id).set(0)
        stopped += self.router.stop_processes()
        self.detach()
        return stopped

    def detach(self) -> None:
        """Leave the data path running (control plane exit/restart)."""
        self.stop_monitor()
        self.instances.close_clients()


def dumps(obj: object) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
