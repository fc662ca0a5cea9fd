"""Instance processes: start, check, adopt, reload and stop the tritonserver of one instance.

Each instance runs in its own session with a pid file, so a control plane that dies leaves it serving and the
next one adopts it (when it serves exactly the versions its record names).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from recserve.control.client import RecClient
from recserve.control.fleet.config import FAULT_DIR_ENV, FleetError
from recserve.control.fleet.health import Probe, deep_check
from recserve.control.routing.haproxy import HAProxyError
from recserve.control.routing.router import RouterError
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
from recserve.control.state.store import InstanceRecord


class InstanceLifecycle:
    """Mixin of ``Fleet``: needs ``config``, ``state``, ``router``, ``servers``, ``clients``, ``busy``..."""

    def _server(self, rec: InstanceRecord) -> TritonServer:
        srv = self.servers.get(rec.id)
        if srv is None:
            env = {FAULT_DIR_ENV: str(Path(rec.workdir) / "faults"), **self.config.extra_env}
            srv = TritonServer(TritonConfig(
                model_repository=self.repository, workdir=Path(rec.workdir), http_port=rec.http_port,
                grpc_port=rec.grpc_port, metrics_port=rec.metrics_port, models=[], stats_key=self.stats_key,
                startup_timeout_s=self.config.instance_start_timeout_s, extra_env=env, name=rec.id))
            self.servers[rec.id] = srv
        return srv

    def client(self, iid: str) -> RecClient:
        c = self.clients.get(iid)
        rec = self.state.instance(iid)
        if c is None or getattr(c, "_port", None) != rec.grpc_port:
            from recserve.control.fleet.health import INFER_TIMEOUT_S

            # no priority: the composing models have no priority levels (they would bring back Triton 2.51's
            # ~500 ms holds, perf/holds.py); probes go to instance ports directly and wait behind at most the
            # instance's in-flight limit of client requests, which admission keeps
            c = RecClient(f"127.0.0.1:{rec.grpc_port}", timeout_s=INFER_TIMEOUT_S, retry_policy=None)
            c._port = rec.grpc_port
            self.clients[iid] = c
        return c

    def metrics_url(self, iid: str) -> str:
        """Triton's Prometheus endpoint of one instance (the rollout gates read its request counters)."""
        return f"http://127.0.0.1:{self.state.instance(iid).metrics_port}/metrics"

    def alive(self, rec: InstanceRecord) -> bool:
        srv = self.servers.get(rec.id)
        if srv is not None and srv.process is not None:  # started by this control plane
            return srv.is_alive()
        return pid_alive(rec.pid)

    def _kill(self, rec: InstanceRecord) -> None:
        srv = self.servers.get(rec.id)
        if srv is not None and srv.process is not None:
            srv.kill()
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
        (Path(rec.workdir) / ADMIN_KEY_FILE).unlink(missing_ok=True)  # that process's key: it opens nothing now

    def start_instance(self, iid: str) -> None:
        """(Re)start one instance: fresh process, exactly its versions, golden answer, then into HAProxy."""
        rec = self.state.instance(iid)
        self.busy.add(iid)
        try:
            self.router.set_state(rec.slot, "maint")
            if rec.pid:  # also when it died: its process group still holds the Python backend stubs
                self._kill(rec)
            self.servers.pop(iid, None)
            for attr in ("grpc_port", "http_port", "metrics_port"):  # keep ports when free, else new ones
                if getattr(rec, attr) and port_in_use(getattr(rec, attr)):
                    setattr(rec, attr, 0)
            srv = self._server(rec)
            # out of rotation until its golden check passes: load it without taking CPU from serving instances
            serving_nice = self.config.instance_nice
            srv.config.nice = 19 if can_raise_priority() else serving_nice
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
            self.renice(rec, serving_nice)  # before it can take traffic
            self.router.bind(rec.slot, rec.grpc_port, rec.http_port)
            self.fails[iid] = 0
            # The monitor ignores probes while an instance is busy, so without this the last probe on record is
            # the failure that caused the restart, and promote() would refuse the instance it just started.
            self.last_probe[iid] = probe
            self.state.update_instance(iid, state="healthy", last_healthy=time.time(), detail="")
            self.metrics.instance_healthy.labels(iid).set(1)
            if rec.role != "canary" and rec.state != "drained":
                self.router.set_state(rec.slot, "ready")
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

    def _start_with_retry(self, iid: str, attempts: int) -> None:
        for i in range(attempts):
            try:
                return self.start_instance(iid)
            except (TritonError, FleetError, HAProxyError, RouterError, RepositoryError) as exc:
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
            self.router.bind(rec.slot, rec.grpc_port, rec.http_port)
            if rec.role != "canary" and rec.state != "drained":
                self.router.set_state(rec.slot, "ready")
        self.state.update_instance(rec.id, state="healthy" if rec.state != "drained" else "drained")
        self.state.event("adopt", f"adopted running instance pid {rec.pid}", rec.id)
        return True

    def reload(self, iid: str, versions: dict[str, list[int]], only: list[str] | None = None) -> None:
        """Record, then load, new versions on one instance; raises when the instance then fails its check.

        Active-active: an instance in the pool leaves it while it loads (when another healthy instance serves),
        and loads at CPU priority 19 until its golden check passes: on a 2-core host an instance out of
        rotation still shares the cores with the ones serving.
        """
        with self.lock:
            self.state.update_instance(iid, versions=versions)
        rec = self.state.instance(iid)
        self.busy.add(iid)
        out = taking = False
        try:
            if self.config.mode == "active-active" and rec.slot in self.router.pool_slots():
                others = [r for r in self.state.instances() if r.id != iid and r.state == "healthy"
                          and r.slot in self.router.pool_slots()]
                if others:
                    self.router.set_pool(self.router.pool_slots() - {rec.slot})
                    out = True
                    self.state.event("rollover", f"{iid} out of rotation while it loads {only or 'all'}", iid)
            # Taking traffic on the route in force: during a canary rollout's promote phase the old primary is
            # still a pool member but has weight 0, while the canary alone serves every request.
            taking = rec.slot in self.router.serving_slots()
            serving_nice = self.config.instance_nice
            # never slow down one that clients wait on
            self.renice(rec, serving_nice if taking or not can_raise_priority() else 19)
            self.load_versions(self._server(rec), versions, only=only)
            probe = self.settle(iid)
            if not probe.ok:
                raise FleetError(f"{iid} failed its deep check after loading {versions}: {probe.stage}: "
                                 f"{probe.reason}", "ABORTED")
            self.fails[iid] = 0
            self.last_probe[iid] = probe
        finally:
            if not taking:
                self.renice(rec, serving_nice)
            if out:
                cur = self.state.instance(iid)
                if cur is not None and cur.state == "healthy" and cur.role in ("primary", "active"):
                    self.router.set_pool(self.router.pool_slots() | {rec.slot})
            self.busy.discard(iid)

    def renice(self, rec: InstanceRecord, nice: int) -> None:
        """CPU priority of the instance's whole process group (tritonserver and its Python stubs)."""
        if not rec.pid or not pid_alive(rec.pid):
            return
        try:
            os.setpriority(os.PRIO_PGRP, os.getpgid(rec.pid), nice)
        except OSError as exc:  # raising priority back needs CAP_SYS_NICE: say so, keep serving
            self.state.event("renice", f"could not set nice {nice} on {rec.id}: {exc}", rec.id)
