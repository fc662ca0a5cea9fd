"""Health reactions: deep-check results and HAProxy's checks decide busy, hung or broken; broken instances
leave traffic at once and are restarted with backoff until healthy (they return as standbys)."""

from __future__ import annotations

import threading
import time

from recserve.control.fleet.health import Probe
from recserve.control.fleet.progress import sample
from recserve.control.monitoring import promtext
from recserve.control.routing.haproxy import HAProxyError
from recserve.control.state.store import InstanceRecord
from recserve.control.testswitch import broken

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


class Supervision:
    """Mixin of ``Fleet``: needs ``state``, ``router``, ``metrics``, ``busy``, ``fails``, ``last_probe``..."""

    def monitored_ids(self) -> list[str]:
        self.targets.sync_instances(self.state.instances())  # instances came, went or changed ports
        self.ensure_haproxy()
        self.watch_haproxy()
        return [r.id for r in self.state.instances() if r.id not in self.busy and r.state not in ("restarting",)]

    def watch_haproxy(self) -> None:
        """Fast path for hangs: when HAProxy's own check (every 200 ms) takes a healthy instance down, a 0.3 s
        liveness call decides at once instead of waiting for a deep check stuck on a hung inference."""
        try:
            rows = self.router.proxy.servers()
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
        """HAProxy is the data path: the Router restarts it (and the fallback) and restores its state."""
        if self._stopping.is_set():
            return
        try:
            self.router.ensure_running()
        except Exception:
            self.metrics.reconcile_errors.inc()
        try:
            self.router.shedding()  # keeps the shedding window current for status and rollouts
            self.router.rotate_access_log()
            for slot, ld in self.router.load().items():
                self.metrics.server_limit.labels(str(slot)).set(ld.limit)
                self.metrics.server_inflight.labels(str(slot)).set(ld.in_flight)
            self.metrics.shed_requests.set(self.router.shed_seen)
            now = time.monotonic()
            if self.config.adaptive_limits and now - getattr(self, "_last_adapt", 0.0) >= 1.0:
                self._last_adapt = now
                self.router.adapt()
        except Exception:  # HAProxy restarting: the next tick reads again
            pass

    def _stalled(self, rec: InstanceRecord) -> str | None:
        """Why ``rec`` is hung (requests pending, no execution across two checks), or None (it progresses, or its
        metrics cannot be read: then busy stands, as before)."""
        if broken("no-progress"):  # test switch: busy stands, as it did before the progress signal
            return None
        text = promtext.fetch(self.metrics_url(rec.id), 0.3) if rec.metrics_port else None
        return None if text is None else self.progress.observe(rec.id, sample(text, time.time()))

    def _at_limit(self, slot: int) -> bool:
        try:
            ld = self.router.load().get(slot)
        except HAProxyError:
            return False
        return ld is not None and (ld.queued > 0 or (ld.limit > 0 and ld.in_flight >= ld.limit))

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
            self.progress.reset(iid)
            self.metrics.instance_healthy.labels(iid).set(1)
            if rec.state != "healthy" and rec.state not in ("drained", "restarting", "starting", "loading"):
                self.state.update_instance(iid, state="healthy", detail="")
            self.state.update_instance(iid, last_healthy=probe.ts)
            return
        if rec.state in ("broken", "restarting", "starting", "loading"):
            return
        if shed_probe(probe):
            self.metrics.probes_shed.labels(iid).inc()
        at_limit = self._at_limit(rec.slot)
        if classify(probe, at_limit) == "busy":
            stalled = self._stalled(rec)
            if stalled is None:
                self.fails[iid] = 0  # saturated but correct: never marked broken, never restarted
                self.metrics.busy_probes.labels(iid).inc()
                return
            # live and at its limit, but executing nothing while requests wait: hung, not busy (second witness)
            probe.reason += f"; hung, not busy: {stalled}"
            self.mark_broken(rec, probe)
            return
        self.fails[iid] = self.fails.get(iid, 0) + 1
        if not probe.fatal and self.fails[iid] < self.config.fail_threshold:
            # A second, independent witness: HAProxy's own checks already took the slot out (hang, crash).
            try:
                confirmed = not self.router.proxy.slot_up(rec.slot)
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
                self.router.set_state(rec.slot, "maint")
            except HAProxyError as exc:
                self.state.event("haproxy-error", str(exc), iid)
            self.state.update_instance(iid, state="broken", detail=reason[:500])
            self.metrics.instance_healthy.labels(iid).set(0)
            self.metrics.detections.labels(iid, probe.stage).inc()
            self.state.event("detected", f"{rec.role} {iid} broken at check started {probe.ts:.3f}: {reason}", iid)
            if rec.role == "canary":
                self.canary_broken[iid] = reason  # the rollout rolls back; it owns this instance
                return
            if rec.role in ("primary", "active"):
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
                role = "standby" if rec.role in ("primary", "active") else rec.role
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
