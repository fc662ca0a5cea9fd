"""Health reactions: deep-check results and HAProxy's checks decide busy, hung or broken; broken instances
leave traffic at once and are restarted with backoff until healthy (they return as standbys)."""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from recserve.control.fleet.config import FleetConfig
from recserve.control.fleet.exits import ExitWatch
from recserve.control.fleet.health import HealthMonitor, Probe
from recserve.control.fleet.progress import Progress, sample
from recserve.control.monitoring import promtext
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.monitoring.targets import TargetFiles
from recserve.control.routing.haproxy import HAProxyError
from recserve.control.routing.router import Router
from recserve.control.state.store import InstanceRecord, State
from recserve.control.testswitch import broken

if TYPE_CHECKING:
    from recserve.control.fleet.instances import Instances
    from recserve.control.fleet.membership import Membership
    from recserve.control.fleet.versions import Catalog

#: Failed-probe reasons that mean "too much work", not "wrong": a deadline passed or Triton's queue was full.
BUSY_SIGNS = ("deadline", "timed out", "timeout", "exceeds maximum queue size", "resource_exhausted")


def shed_probe(probe: Probe) -> bool:
    """The golden inference ran out of time or met a full queue: load, not a wrong answer, kept it from an answer
    (counted as ``recserve_probes_shed``: health probes must never be shed, whatever the verdict on the instance)."""
    return not probe.ok and probe.stage == "golden" and any(s in probe.reason.lower() for s in BUSY_SIGNS)


def classify(probe: Probe, at_limit: bool) -> str:
    """``ok``, ``busy`` or ``failing``: the one rule that tells a saturated instance from a hung/broken one.

    Busy = the live endpoint answered (the probe got past the ``live`` stage to the golden inference), the
    golden inference only ran out of time or met a full queue (never a wrong answer), AND HAProxy shows the
    instance at its in-flight limit (or queueing). A hung instance fails at ``live`` (the HTTP endpoint is
    silent), a broken one answers wrongly or has lost versions: both are ``failing``.
    """
    if probe.ok:
        return "ok"
    return "busy" if shed_probe(probe) and at_limit and not probe.fatal else "failing"


class Supervisor:
    """Health reactions over the fleet's instances, and what they go by: which instances are busy (being
    (re)started or reloaded: health results ignored), consecutive failures, the last probe of each, restart
    backoff, progress samples and the canaries found broken (the rollout owns those).

    It reacts through the fleet's other parts, given once they exist (``connect``): ``Instances`` (checks,
    restarts), ``Membership`` (who serves after a failure) and the ``Catalog`` (what a restart loads).
    """

    def __init__(self, config: FleetConfig, state: State, router: Router, metrics: ControlMetrics,
                 targets: TargetFiles, lock: threading.RLock):
        self._config = config
        self._state = state
        self._router = router
        self._metrics = metrics
        self._targets = targets
        self._lock = lock
        self._busy: set[str] = set()
        self._fails: dict[str, int] = {}
        self._last_probe: dict[str, Probe] = {}
        self._restart_times: dict[str, list[float]] = {}  # backoff: the restarts of the last two minutes
        self._progress = Progress()  # busy or hung: executions while requests wait
        self._canary_broken: dict[str, str] = {}
        self._stopping = threading.Event()
        self._last_adapt = 0.0
        self._monitor: HealthMonitor | None = None
        self._exits: ExitWatch | None = None
        self._instances: Instances | None = None
        self._membership: Membership | None = None
        self._catalog: Catalog | None = None

    def connect(self, instances: Instances, membership: Membership, catalog: Catalog) -> None:
        self._instances, self._membership, self._catalog = instances, membership, catalog

    # ------------------------------------------------------------------ what the reactions go by
    def hold(self, iid: str) -> None:
        """``iid`` is busy (being started, reloaded or removed): its health results are ignored until ``release``."""
        self._busy.add(iid)

    def release(self, iid: str) -> None:
        self._busy.discard(iid)

    def is_busy(self, iid: str) -> bool:
        return iid in self._busy

    def any_busy(self) -> bool:
        return bool(self._busy)

    def passed(self, iid: str, probe: Probe) -> None:
        """``iid`` passed ``probe`` after a start or a reload: no failures on record, and it is the last probe
        (promote() goes by it)."""
        self._fails[iid] = 0
        self._last_probe[iid] = probe

    def last_probe(self, iid: str) -> Probe | None:
        return self._last_probe.get(iid)

    def broken_canaries(self) -> dict[str, str]:
        """Canaries deep health found broken, with why: the running rollout reads and clears its own."""
        return self._canary_broken

    def stopping(self) -> bool:
        return self._stopping.is_set()

    # ------------------------------------------------------------------ the monitor
    def start_monitor(self) -> None:
        self._monitor = HealthMonitor(self.monitored_ids, self._instances.check, self.on_probe,
                                      self._config.health_interval_s).start()
        if broken("no-exit-watch"):  # test switch: exits wait for the next deep check, as before the watch
            return
        self._exits = ExitWatch(self.watched_pids, self.on_exit).start()
        if not self._exits.available:
            self._state.event("exit-watch", f"instance exits are found by the deep checks only (every "
                              f"{self._config.health_interval_s:g} s): {self._exits.why}")

    def stop(self) -> None:
        """No health reaction and no restart from here on."""
        self._stopping.set()
        if self._monitor:
            self._monitor.stop()
        if self._exits:
            self._exits.stop()

    def watched_pids(self) -> dict[str, int]:
        """The processes whose exit is a failure: healthy instances that nothing is starting, reloading or
        removing (a planned stop holds its instance first)."""
        return {r.id: self._instances.pid(r) for r in self._state.instances()
                if r.state == "healthy" and r.id not in self._busy}

    def on_exit(self, iid: str, pid: int) -> None:
        """``iid``'s process ``pid`` exited: the same reaction as a deep check that found it gone, without
        waiting for the next check."""
        rec = self._state.instance(iid)
        if rec is None or iid in self._busy or self._instances.pid(rec) != pid:
            return  # removed, being restarted, or already replaced
        self.on_probe(iid, Probe(False, "process", f"process {pid} exited (seen at once)", time.time(), fatal=True))

    def monitored_ids(self) -> list[str]:
        self._targets.sync_instances(self._state.instances())  # instances came, went or changed ports
        self.ensure_haproxy()
        self.watch_haproxy()
        return [r.id for r in self._state.instances() if r.id not in self._busy and r.state not in ("restarting",)]

    def watch_haproxy(self) -> None:
        """Fast path for hangs: when HAProxy's own check (every 200 ms) takes a healthy instance down, a 0.3 s
        liveness call decides at once instead of waiting for a deep check stuck on a hung inference."""
        try:
            rows = self._router.proxy.servers()
        except HAProxyError:
            return
        for rec in self._state.instances():
            if rec.state != "healthy" or rec.id in self._busy or rec.role == "canary":
                continue
            row = rows.get(f"chk/s{rec.slot}")
            if row is None or row.get("srv_op_state") != "0":
                continue
            srv = self._instances.server(rec)
            t0 = time.time()
            if srv.live(timeout=0.3):
                continue
            self.mark_broken(rec, Probe(False, "live", "no answer within 0.3 s and HAProxy's check marks it down",
                                        t0, time.time() - t0, fatal=True))

    def ensure_haproxy(self) -> None:
        """HAProxy is the data path: the Router restarts it (and the fallback) and restores its state."""
        if self._stopping.is_set():
            return
        try:
            self._router.ensure_running()
        except Exception:
            self._metrics.reconcile_errors.inc()
        try:
            self._router.shedding()  # keeps the shedding window current for status and rollouts
            self._router.rotate_access_log()
            for slot, ld in self._router.load().items():
                self._metrics.server_limit.labels(str(slot)).set(ld.limit)
                self._metrics.server_inflight.labels(str(slot)).set(ld.in_flight)
            self._metrics.shed_requests.set(self._router.shed_seen)
            now = time.monotonic()
            if self._config.adaptive_limits and now - self._last_adapt >= 1.0:
                self._last_adapt = now
                self._router.adapt()
        except Exception:  # HAProxy restarting: the next tick reads again
            pass

    def _stalled(self, rec: InstanceRecord) -> str | None:
        """Why ``rec`` is hung (requests pending, no execution across two checks), or None (it progresses, or its
        metrics cannot be read: then busy stands, as before)."""
        if broken("no-progress"):  # test switch: busy stands, as it did before the progress signal
            return None
        text = promtext.fetch(self._instances.metrics_url(rec.id), 0.3) if rec.metrics_port else None
        return None if text is None else self._progress.observe(rec.id, sample(text, time.time()))

    def _at_limit(self, slot: int) -> bool:
        try:
            ld = self._router.load().get(slot)
        except HAProxyError:
            return False
        return ld is not None and (ld.queued > 0 or (ld.limit > 0 and ld.in_flight >= ld.limit))

    def on_probe(self, iid: str, probe: Probe) -> None:
        if iid in self._busy or self._stopping.is_set():
            return
        rec = self._state.instance(iid)
        if rec is None:
            return
        self._last_probe[iid] = probe
        self._metrics.set_role(iid, rec.role)
        if probe.ok:
            self._fails[iid] = 0
            self._progress.reset(iid)
            self._metrics.instance_healthy.labels(iid).set(1)
            if rec.state != "healthy" and rec.state not in ("drained", "restarting", "starting", "loading"):
                self._state.update_instance(iid, state="healthy", detail="")
            self._state.update_instance(iid, last_healthy=probe.ts)
            return
        if rec.state in ("broken", "restarting", "starting", "loading"):
            return
        if shed_probe(probe):
            self._metrics.probes_shed.labels(iid).inc()
        at_limit = self._at_limit(rec.slot)
        if classify(probe, at_limit) == "busy":
            stalled = self._stalled(rec)
            if stalled is None:
                self._fails[iid] = 0  # saturated but correct: never marked broken, never restarted
                self._metrics.busy_probes.labels(iid).inc()
                return
            # live and at its limit, but executing nothing while requests wait: hung, not busy (second witness)
            probe.reason += f"; hung, not busy: {stalled}"
            self.mark_broken(rec, probe)
            return
        self._fails[iid] = self._fails.get(iid, 0) + 1
        if not probe.fatal and self._fails[iid] < self._config.fail_threshold:
            # A second, independent witness: HAProxy's own checks already took the slot out (hang, crash).
            try:
                confirmed = not self._router.proxy.slot_up(rec.slot)
            except HAProxyError:
                confirmed = False
            if not confirmed:
                return
            probe.reason += " (HAProxy's health check agrees: slot down)"
        self.mark_broken(rec, probe)

    def mark_broken(self, rec: InstanceRecord, probe: Probe) -> None:
        with self._lock:
            iid = rec.id
            cur = self._state.instance(iid)
            if cur is None or cur.state in ("broken", "restarting", "starting", "loading") or iid in self._busy:
                return  # already handled (the monitor and the HAProxy watch can both see one failure)
            reason = f"{probe.stage}: {probe.reason}"
            self._state.update_instance(iid, state="broken", detail=reason[:500])
            self._metrics.instance_healthy.labels(iid).set(0)
            self._metrics.detections.labels(iid, probe.stage).inc()
            self._state.event("detected", f"{rec.role} {iid} broken at check started {probe.ts:.3f}: {reason}", iid)
            try:
                if rec.role in ("primary", "active"):
                    # the instances left take its share before it leaves rotation: a shrinking pool raises their
                    # in-flight limits first (Router.set_pool), a primary-standby route moves to the standby
                    self._membership.ensure_primary()
            finally:
                try:
                    self._router.set_state(rec.slot, "maint")
                except HAProxyError as exc:
                    self._state.event("haproxy-error", str(exc), iid)
            if rec.role == "canary":
                self._canary_broken[iid] = reason  # the rollout rolls back; it owns this instance
                return
            self._metrics.fleet_degraded.set(0 if self._membership.standbys_healthy() else 1)
        self.schedule_restart(iid, reason)

    def schedule_restart(self, iid: str, reason: str) -> None:
        rec = self._state.instance(iid)
        if rec is None or self._stopping.is_set():
            return
        self._state.update_instance(iid, state="restarting", detail=reason[:500])
        threading.Thread(target=self._restart_loop, args=(iid, reason), name=f"restart-{iid}", daemon=True).start()

    def _restart_loop(self, iid: str, reason: str) -> None:
        """Restart with backoff until healthy; the instance returns as a standby with the desired versions."""
        while not self._stopping.is_set():
            now = time.time()
            recent = [t for t in self._restart_times.get(iid, []) if now - t < 120]
            delay = self._config.restart_backoff_s[min(len(recent), len(self._config.restart_backoff_s) - 1)]
            self._restart_times[iid] = recent + [now]
            if self._stopping.wait(delay):
                return
            rec = self._state.instance(iid)
            if rec is None or rec.role == "canary":
                return
            with self._lock:
                role = "standby" if rec.role in ("primary", "active") else rec.role
                self._state.update_instance(iid, role=role, state="restarting", restarts=rec.restarts + 1,
                                           versions=self._target_versions(rec))
            self._metrics.restarts.labels(iid).inc()
            self._metrics.set_role(iid, role)
            self._state.event("restart", f"restarting {iid} ({reason})", iid)
            try:
                self._instances.start(iid)
            except Exception as exc:
                self._metrics.reconcile_errors.inc()
                self._state.update_instance(iid, state="restarting", detail=f"restart failed: {exc}"[:500])
                self._state.event("restart-failed", str(exc)[:500], iid)
                continue
            self._state.event("recovered", f"{iid} back as {role}", iid)
            try:  # a failure to re-route is not a failed restart: the process is healthy and stays up
                self._membership.ensure_primary()
            except Exception as exc:
                self._metrics.reconcile_errors.inc()
                self._state.event("route-failed", f"after {iid} recovered: {exc}"[:500], iid)
            return

    def _target_versions(self, rec: InstanceRecord) -> dict[str, list[int]]:
        """What a restarted non-canary instance serves: the desired versions."""
        return self._catalog.desired()
