"""Instance processes: start, check, adopt, reload and stop the tritonserver of one instance.

Each instance runs in its own session with a pid file, so a control plane that dies leaves it serving and the
next one adopts it (when it serves exactly the versions its record names).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from recserve.control.client import RecClient
from recserve.control.fleet.config import FAULT_DIR_ENV, FleetConfig, FleetError
from recserve.control.fleet.golden import Golden
from recserve.control.fleet.health import Probe, deep_check, ready_versions
from recserve.control.fleet.spec_golden import SpecGolden
from recserve.control.fleet.versions import Catalog
from recserve.control.fleet.warmup import REQUEST_TIMEOUT_S, Endpoint, WarmupConfig, WarmupResult, warm_up_instance
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.routing.haproxy import HAProxyError
from recserve.control.routing.router import Router, RouterError
from recserve.control.runtime.procs import can_raise_priority, kill_group, pid_alive
from recserve.control.runtime.triton import (
    ADMIN_KEY_FILE,
    TritonConfig,
    TritonError,
    TritonServer,
    port_in_use,
    remove_shm_regions,
    shm_prefix,
)
from recserve.control.state.snapshots import RepositoryError
from recserve.control.state.store import InstanceRecord, State

if TYPE_CHECKING:
    from recserve.control.fleet.supervision import Supervisor


class Instances:
    """The fleet's tritonserver processes, one per instance record: it owns their handles and gRPC clients.

    It asks the ``Catalog`` what to load, marks an instance busy with the ``Supervisor`` while it (re)starts or
    reloads (health results are then ignored) and tells it the check that passed after; routing is the Router's.
    """

    def __init__(self, config: FleetConfig, root: Path, repository: Path, stats_key: str, state: State,
                 router: Router, metrics: ControlMetrics, catalog: Catalog, golden: Golden | SpecGolden,
                 supervisor: Supervisor, lock: threading.RLock):
        self._config = config
        self._root = root
        self._repository = repository
        self._stats_key = stats_key
        self._state = state
        self._router = router
        self._metrics = metrics
        self._catalog = catalog
        self._golden = golden
        self._supervisor = supervisor
        self._lock = lock
        self._servers: dict[str, TritonServer] = {}
        self._clients: dict[str, RecClient] = {}

    def server(self, rec: InstanceRecord) -> TritonServer:
        """The handle on ``rec``'s tritonserver: the one this control plane started, else one that reaches the
        running process at the record's ports (adoption)."""
        srv = self._servers.get(rec.id)
        if srv is None:
            env = {FAULT_DIR_ENV: str(Path(rec.workdir) / "faults"), **self._config.extra_env}
            srv = TritonServer(TritonConfig(
                model_repository=self._repository, workdir=Path(rec.workdir), http_port=rec.http_port,
                grpc_port=rec.grpc_port, metrics_port=rec.metrics_port, models=[], stats_key=self._stats_key,
                startup_timeout_s=self._config.instance_start_timeout_s, extra_env=env, name=rec.id))
            self._servers[rec.id] = srv
        return srv

    def loaded(self, rec: InstanceRecord) -> dict[str, list[int]] | None:
        """The versions Triton reports ready on ``rec`` (an empty dict when it cannot say), or None when this
        control plane holds no handle on it or it is not healthy, drained or broken (not asked)."""
        srv = self._servers.get(rec.id)
        if srv is None or rec.state not in ("healthy", "drained", "broken"):
            return None
        return ready_versions(srv, timeout=0.5) or {}

    def pid(self, rec: InstanceRecord) -> int:
        """The pid of ``rec``'s process: the one this control plane started, else the record's."""
        srv = self._servers.get(rec.id)
        return srv.pid if srv is not None and srv.pid else rec.pid

    def client(self, iid: str) -> RecClient:
        c = self._clients.get(iid)
        rec = self._state.instance(iid)
        if c is None or getattr(c, "_port", None) != rec.grpc_port:
            from recserve.control.fleet.health import INFER_TIMEOUT_S

            # no priority: the composing models have no priority levels (they would bring back Triton 2.51's
            # ~500 ms holds, perf/holds.py); probes go to instance ports directly and wait behind at most the
            # instance's in-flight limit of client requests, which admission keeps
            c = RecClient(f"127.0.0.1:{rec.grpc_port}", timeout_s=INFER_TIMEOUT_S, retry_policy=None)
            c._port = rec.grpc_port
            self._clients[iid] = c
        return c

    def close_clients(self) -> None:
        for c in self._clients.values():
            try:
                c.close()
            except Exception:
                pass

    def load_versions(self, server: TritonServer, versions: dict[str, list[int]], only: list[str] | None = None
                      ) -> None:
        self._catalog.load_versions(server, versions, self._config.instance_start_timeout_s, only=only)

    def metrics_url(self, iid: str) -> str:
        """Triton's Prometheus endpoint of one instance (the rollout gates read its request counters)."""
        return f"http://127.0.0.1:{self._state.instance(iid).metrics_port}/metrics"

    def alive(self, rec: InstanceRecord) -> bool:
        srv = self._servers.get(rec.id)
        if srv is not None and srv.process is not None:  # started by this control plane
            return srv.is_alive()
        return pid_alive(rec.pid)

    def kill(self, rec: InstanceRecord) -> None:
        """Stop ``rec``'s process group (by pid when another control plane started it) and forget its handles."""
        srv = self._servers.get(rec.id)
        if srv is not None and srv.process is not None:
            srv.kill()
        elif rec.pid:
            kill_group(rec.pid)
            deadline = time.monotonic() + 10
            while pid_alive(rec.pid) and time.monotonic() < deadline:
                time.sleep(0.05)
        remove_shm_regions(shm_prefix(Path(rec.workdir), rec.id))  # a killed server's stubs leave them behind
        self._servers.pop(rec.id, None)
        c = self._clients.pop(rec.id, None)
        if c is not None:
            try:
                c.close()
            except Exception:
                pass
        (Path(rec.workdir) / "triton.pid").unlink(missing_ok=True)
        (Path(rec.workdir) / ADMIN_KEY_FILE).unlink(missing_ok=True)  # that process's key: it opens nothing now

    def start(self, iid: str) -> None:
        """(Re)start one instance: fresh process, exactly its versions, golden answer, then into HAProxy."""
        rec = self._state.instance(iid)
        self._supervisor.hold(iid)
        try:
            self._router.set_state(rec.slot, "maint")
            if rec.pid:  # also when it died: its process group still holds the Python backend stubs
                self.kill(rec)
            self._servers.pop(iid, None)
            for attr in ("grpc_port", "http_port", "metrics_port"):  # keep ports when free, else new ones
                if getattr(rec, attr) and port_in_use(getattr(rec, attr)):
                    setattr(rec, attr, 0)
            srv = self.server(rec)
            # out of rotation until its golden check passes: load it without taking CPU from serving instances
            serving_nice = self._config.instance_nice
            srv.config.nice = 19 if can_raise_priority() else serving_nice
            self._state.update_instance(iid, state="starting", detail="")
            srv.start(wait=True)
            rec.grpc_port, rec.http_port, rec.metrics_port = (srv.config.grpc_port, srv.config.http_port,
                                                              srv.config.metrics_port)
            rec.pid = srv.pid
            (Path(rec.workdir) / "triton.pid").write_text(f"{rec.pid}\n")
            self._state.update_instance(iid, pid=rec.pid, grpc_port=rec.grpc_port, http_port=rec.http_port,
                                       metrics_port=rec.metrics_port, state="loading")
            rec = self._state.instance(iid)
            self.load_versions(srv, rec.versions)
            probe = self.settle(iid)
            if not probe.ok:
                raise FleetError(f"{iid} failed its deep check after start: {probe.stage}: {probe.reason}")
            self.renice(rec, serving_nice)  # before it can take traffic (and before its warm-up is judged)
            self.warm_up(iid)
            self._router.bind(rec.slot, rec.grpc_port, rec.http_port)
            # The monitor ignores probes while an instance is busy, so without this the last probe on record is
            # the failure that caused the restart, and promote() would refuse the instance it just started.
            self._supervisor.passed(iid, probe)
            self._state.update_instance(iid, state="healthy", last_healthy=time.time(), detail="")
            self._metrics.instance_healthy.labels(iid).set(1)
            if rec.role != "canary" and rec.state != "drained":
                self._router.set_state(rec.slot, "ready")
        finally:
            self._supervisor.release(iid)

    def warm_up(self, iid: str, only: list[str] | None = None) -> WarmupResult | None:
        """Warm ``iid`` up after a load that passed its golden check, before it takes traffic
        (control/fleet/warmup.py): the models in ``only`` (None: all), judged against a serving instance. The
        one path of starts, restarts, scale-out, rollovers and rollbacks; never fails them (events say how it
        went)."""
        rec = self._state.instance(iid)
        cfg = WarmupConfig(self._config.warmup_rounds, self._config.warmup_ratio, self._config.warmup_deadline_s)
        if rec is None or cfg.rounds <= 0:
            return None
        try:
            client = RecClient(f"127.0.0.1:{rec.grpc_port}", timeout_s=REQUEST_TIMEOUT_S, retry_policy=None)
            try:
                result = warm_up_instance(
                    self.server(rec), client, self._stats_key, rec.versions, self._reference(iid), self._golden,
                    cfg, only, progress=lambda msg: self._state.event("warmup", f"{iid}: {msg}", iid))
            finally:
                client.close()
        except Exception as exc:  # noqa: BLE001 - a warm-up that breaks must not fail the load it follows
            self._state.event("warmup", f"{iid}: warm-up failed: {type(exc).__name__}: {str(exc)[:300]}", iid)
            return None
        self._state.event("warmup", f"{iid}: {result.text()}", iid)
        return result

    def _reference(self, iid: str) -> Endpoint | None:
        """What a warm-up is judged against: a healthy instance the route sends clients to (the primary first)."""
        serving = self._router.serving_slots()
        recs = [r for r in self._state.instances()
                if r.id != iid and r.state == "healthy" and r.slot in serving and r.http_port]
        if not recs:
            return None
        ref = min(recs, key=lambda r: r.role != "primary")
        return Endpoint(self.server(ref).http_url, self._stats_key, {m: max(v) for m, v in ref.versions.items() if v})

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
        rec = self._state.instance(iid)
        if rec is None:
            return Probe(False, "membership", "removed", time.time(), fatal=True)
        srv = self.server(rec)
        probe = deep_check(srv, self.alive(rec), rec.versions, self._golden, self.client(iid))
        self._metrics.check_seconds.labels(iid).set(probe.latency_s)
        return probe

    def new(self, role: str) -> InstanceRecord:
        """A new instance record in the first free slot, to serve the desired versions (started by ``start``)."""
        used = {r.slot for r in self._state.instances()}
        free = [s for s in range(self._config.slots) if s not in used]
        if not free:
            raise FleetError(f"no free slot: the fleet has {self._config.slots} slots, all used", "RESOURCE_EXHAUSTED")
        slot = free[0]
        n = 1
        ids = {r.id for r in self._state.instances()}
        while f"t{n}" in ids:
            n += 1
        iid = f"t{n}"
        rec = InstanceRecord(id=iid, slot=slot, role=role, state="new", grpc_port=0, http_port=0, metrics_port=0,
                             workdir=str(self._root / "instances" / iid), versions=self._catalog.desired())
        Path(rec.workdir, "faults").mkdir(parents=True, exist_ok=True)
        self._state.save_instance(rec)
        self._state.event("membership", f"instance {iid} added as {role} in slot {slot}", iid)
        return rec

    def start_with_retry(self, iid: str, attempts: int) -> None:
        for i in range(attempts):
            try:
                return self.start(iid)
            except (TritonError, FleetError, HAProxyError, RouterError, RepositoryError) as exc:
                self._state.update_instance(iid, state="broken", detail=str(exc)[:500])
                if i == attempts - 1:
                    raise

    def adopt(self, rec: InstanceRecord, fresh_proxy: bool) -> bool:
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
            self._state.event("adopt", f"not adopting pid {rec.pid}: {probe.stage}: {probe.reason}", rec.id)
            return False
        if fresh_proxy:
            self._router.bind(rec.slot, rec.grpc_port, rec.http_port)
            if rec.role != "canary" and rec.state != "drained":
                self._router.set_state(rec.slot, "ready")
        self._state.update_instance(rec.id, state="healthy" if rec.state != "drained" else "drained")
        self._state.event("adopt", f"adopted running instance pid {rec.pid}", rec.id)
        return True

    def reload(self, iid: str, versions: dict[str, list[int]], only: list[str] | None = None) -> None:
        """Record, then load, new versions on one instance; raises when the instance then fails its check.

        Active-active: an instance in the pool leaves it while it loads (when another healthy instance serves),
        and loads at CPU priority 19 until its golden check passes: on a 2-core host an instance out of
        rotation still shares the cores with the ones serving.
        """
        with self._lock:
            self._state.update_instance(iid, versions=versions)
        rec = self._state.instance(iid)
        self._supervisor.hold(iid)
        out = at_serving_nice = False
        serving_nice = self._config.instance_nice
        try:
            if self._config.mode == "active-active" and rec.slot in self._router.pool_slots():
                others = [r for r in self._state.instances() if r.id != iid and r.state == "healthy"
                          and r.slot in self._router.pool_slots()]
                if others:
                    self._router.set_pool(self._router.pool_slots() - {rec.slot})
                    out = True
                    self._state.event("rollover", f"{iid} out of rotation while it loads {only or 'all'}", iid)
            # Taking traffic on the route in force: during a canary rollout's promote phase the old primary is
            # still a pool member but has weight 0, while the canary alone serves every request.
            taking = rec.slot in self._router.serving_slots()
            # never slow down one that clients wait on
            self.renice(rec, serving_nice if taking or not can_raise_priority() else 19)
            self.load_versions(self.server(rec), versions, only=only)
            probe = self.settle(iid)
            if not probe.ok:
                raise FleetError(f"{iid} failed its deep check after loading {versions}: {probe.stage}: "
                                 f"{probe.reason}", "ABORTED")
            if not taking:
                self.renice(rec, serving_nice)  # its warm-up is judged against a serving instance's compute
            at_serving_nice = True
            self.warm_up(iid, only)
            self._supervisor.passed(iid, probe)
        finally:
            if not at_serving_nice:  # a failed load still leaves it at the serving nice
                self.renice(rec, serving_nice)
            if out:
                cur = self._state.instance(iid)
                if cur is not None and cur.state == "healthy" and cur.role in ("primary", "active"):
                    self._router.set_pool(self._router.pool_slots() | {rec.slot})
            self._supervisor.release(iid)

    def renice(self, rec: InstanceRecord, nice: int) -> None:
        """CPU priority of the instance's whole process group (tritonserver and its Python stubs)."""
        if not rec.pid or not pid_alive(rec.pid):
            return
        try:
            os.setpriority(os.PRIO_PGRP, os.getpgid(rec.pid), nice)
        except OSError as exc:  # raising priority back needs CAP_SYS_NICE: say so, keep serving
            self._state.event("renice", f"could not set nice {nice} on {rec.id}: {exc}", rec.id)
