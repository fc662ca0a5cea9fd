"""Membership and roles: which instances serve, which wait, adding, removing, draining and scaling.

Roles: ``primary`` (primary-standby: the one instance taking traffic; active-active: the actives' reference for
rollouts, itself an active), ``active`` (further pool members in active-active), ``standby`` (healthy, loaded,
out of rotation), ``canary`` (owned by a running rollout). Every routing consequence is asked of the Router.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING

from recserve.control.fleet.config import FleetConfig, FleetError
from recserve.control.monitoring.metrics import ControlMetrics
from recserve.control.routing.router import Router
from recserve.control.state.store import InstanceRecord, State

if TYPE_CHECKING:
    from recserve.control.fleet.instances import Instances
    from recserve.control.fleet.supervision import Supervisor

#: Roles that take client traffic.
SERVING = ("primary", "active")
#: Longest wait for a draining instance's in-flight requests before it is stopped anyway (scale-in).
DRAIN_TIMEOUT_S = 30.0


class Membership:
    """Who serves: roles, the primary or the active-active pool, adding, removing, draining and scaling.

    New instances come from ``Instances``; a start that fails is the ``Supervisor``'s to restart, and its last
    probe decides whether an instance may become the primary.
    """

    def __init__(self, config: FleetConfig, state: State, router: Router, metrics: ControlMetrics,
                 instances: Instances, supervisor: Supervisor, lock: threading.RLock):
        self._config = config
        self._state = state
        self._router = router
        self._metrics = metrics
        self._instances = instances
        self._supervisor = supervisor
        self._lock = lock

    def active_target(self) -> int:
        """How many instances serve: ``recctl scale --active N`` in active-active, 1 in primary-standby."""
        if self._config.mode != "active-active":
            return 1
        return int(self._state.get("active_target", "") or self._config.active)

    def ensure_primary(self) -> None:
        """Serving as the mode says: one healthy primary (primary-standby), or ``active_target`` healthy actives
        with one of them the primary (active-active); failed actives leave the pool, standbys fill it."""
        with self._lock:
            recs = self._state.instances()
            if any(r.role == "canary" for r in recs) or self._router.splitting():
                return  # a rollout owns routing
            if self._config.mode == "active-active":
                self._ensure_pool(recs)
                return
            prim = [r for r in recs if r.role == "primary"]
            healthy = [r for r in recs if r.state == "healthy" and r.role in ("primary", "standby")]
            cur = prim[0] if prim else None
            if cur is None or cur.state != "healthy":
                choice = next((r for r in healthy if r.role == "standby"), None) or (healthy[0] if healthy else None)
                if choice is not None and (cur is None or choice.id != cur.id):
                    self.promote(choice.id, reason="primary unavailable")
                    return
            if cur is not None:
                self._router.serve(cur.slot)
            self._metrics.fleet_degraded.set(0 if self.standbys_healthy() else 1)

    def _ensure_pool(self, recs: list[InstanceRecord]) -> None:
        serving = [r for r in recs if r.role in SERVING and r.state == "healthy"]
        for r in recs:  # a failed active is out of rotation already (maint); it comes back as a standby
            if r.role in SERVING and r.state != "healthy":
                self._state.update_instance(r.id, role="standby")
                self._metrics.set_role(r.id, "standby")
        standbys = [r for r in recs if r.role == "standby" and r.state == "healthy"]
        target = self.active_target()
        while len(serving) < target and standbys:
            s = standbys.pop(0)
            self._state.update_instance(s.id, role="active")
            s.role = "active"
            self._metrics.set_role(s.id, "active")
            self._metrics.failovers.inc()
            self._state.event("failover", f"{s.id} joins the pool (pool below {target} actives)", s.id)
            serving.append(s)
        if serving and not any(r.role == "primary" for r in serving):
            first = next(r for r in serving)
            self._state.update_instance(first.id, role="primary")
            self._metrics.set_role(first.id, "primary")
            first.role = "primary"
        self._router.set_pool({r.slot for r in serving})
        self._router.serve(None)
        self._metrics.fleet_degraded.set(0 if len(serving) + len(standbys) >= 2 else 1)

    def route_first(self, slot: int) -> None:
        """All traffic on ``slot`` (a blue-green switch)."""
        self._router.route("first", slot)

    def route_serving(self, slot: int) -> None:
        """Back to normal serving after a rollout, with the instance in ``slot`` as the primary."""
        self._router.serve(slot)

    def ensure_canary_out(self, slot: int) -> None:
        """A rollout took the instance in ``slot`` as its canary: it leaves the active-active pool (drains)."""
        if self._config.mode == "active-active" and slot in self._router.pool_slots():
            self._router.set_pool(self._router.pool_slots() - {slot})
            iid = next((r.id for r in self._state.instances() if r.slot == slot), "")
            self._state.event("rollover", f"canary {iid} out of rotation while it loads the new version", iid)

    def shedding(self) -> bool:
        """The pool is refusing or degrading requests now (or was within the Router's window)."""
        return self._router.shedding()

    def standbys_healthy(self) -> int:
        return sum(1 for r in self._state.instances() if r.role == "standby" and r.state == "healthy")

    def promote(self, iid: str, reason: str = "operator") -> InstanceRecord:
        with self._lock:
            rec = self._state.instance(iid)
            if rec is None:
                raise FleetError(f"unknown instance {iid!r}", "NOT_FOUND")
            if reason == "operator" and self._state.running_rollouts():
                raise FleetError("a rollout is running: promote after it ends (or roll back)", "FAILED_PRECONDITION")
            probe = self._supervisor.last_probe(iid)
            failing = probe is not None and not probe.ok and rec.state != "drained"
            if rec.state not in ("healthy", "drained") or failing:
                raise FleetError(f"instance {iid} is {rec.state}: only a healthy instance can become primary",
                                 "FAILED_PRECONDITION")
            old = [r for r in self._state.instances() if r.role == "primary" and r.id != iid]
            self._router.set_state(rec.slot, "ready")
            demoted = "active" if self._config.mode == "active-active" else "standby"
            with self._state.transaction():
                for o in old:
                    self._state.update_instance(o.id, role=demoted)
                self._state.update_instance(iid, role="primary", state="healthy")
            if self._config.mode == "active-active":
                serving = [r for r in self._state.instances() if r.role in SERVING and r.state == "healthy"]
                extra = [r for r in serving if r.id != iid][: max(0, len(serving) - self.active_target())]
                for r in extra:  # the promoted one took a pool place: keep the pool at its size
                    self._state.update_instance(r.id, role="standby")
                    self._metrics.set_role(r.id, "standby")
                self._ensure_pool(self._state.instances())
            else:
                self._router.serve(rec.slot)
            for o in old:
                self._metrics.set_role(o.id, demoted)
            self._metrics.set_role(iid, "primary")
            if reason != "operator":
                self._metrics.failovers.inc()
            self._state.event("failover" if reason != "operator" else "promote",
                             f"{iid} is primary ({reason}); was {[o.id for o in old]}", iid)
            return self._state.instance(iid)

    def drain(self, iid: str) -> InstanceRecord:
        with self._lock:
            rec = self._state.instance(iid)
            if rec is None:
                raise FleetError(f"unknown instance {iid!r}", "NOT_FOUND")
            if self._config.mode == "active-active":
                others = [r for r in self._state.instances() if r.id != iid and r.state == "healthy"
                          and r.role in (*SERVING, "standby")]
                if rec.role in SERVING and not others:
                    raise FleetError(f"{iid} is the only serving instance: draining it would stop serving",
                                     "FAILED_PRECONDITION")
                self._router.set_pool(self._router.pool_slots() - {rec.slot})
            elif rec.role == "primary":
                other = next((r for r in self._state.instances() if r.id != iid and r.state == "healthy"
                              and r.role == "standby"), None)
                if other is None:
                    raise FleetError(f"{iid} is the primary and no healthy standby can take its traffic",
                                     "FAILED_PRECONDITION")
                self.promote(other.id, reason="operator")
            self._router.set_state(rec.slot, "drain")
            self._state.update_instance(iid, state="drained", role="standby")
            self._state.event("drain", f"{iid} drained (no new requests)", iid)
            self.ensure_primary()
            return self._state.instance(iid)

    def add_instance(self, role: str) -> InstanceRecord:
        if role not in ("standby", "primary", "active"):
            raise FleetError(f"role must be 'standby', 'primary' or 'active', got {role!r}", "INVALID_ARGUMENT")
        if role == "active" and self._config.mode != "active-active":
            raise FleetError("role 'active' needs mode active-active (use 'recctl scale --active N')",
                             "INVALID_ARGUMENT")
        with self._lock:
            rec = self._instances.new("standby")
        try:
            self._instances.start(rec.id)  # loaded, warmed up and golden-checked before it takes traffic
        except Exception as exc:
            self._state.event("start-failed", str(exc), rec.id)
            self._supervisor.schedule_restart(rec.id, f"start failed: {exc}")
            raise FleetError(f"instance {rec.id} did not start: {exc}", "UNAVAILABLE") from exc
        if role == "primary":
            return self.promote(rec.id)
        if role == "active":
            with self._lock:
                self._state.put("active_target", str(self.active_target() + 1))
                self.ensure_primary()
        return self._state.instance(rec.id)

    def remove_instance(self, iid: str) -> InstanceRecord:
        with self._lock:
            rec = self._state.instance(iid)
            if rec is None:
                raise FleetError(f"unknown instance {iid!r}", "NOT_FOUND")
            if rec.role == "canary":
                raise FleetError(f"{iid} is the canary of a running rollout", "FAILED_PRECONDITION")
            others = [r for r in self._state.instances() if r.id != iid and r.state == "healthy"]
            if not others:
                raise FleetError(f"removing {iid} would leave no healthy instance serving", "FAILED_PRECONDITION")
            if rec.role == "primary" and self._config.mode != "active-active":
                self.promote(next((r for r in others if r.role == "standby"), others[0]).id)
            self._supervisor.hold(iid)
            if self._config.mode == "active-active":
                self._router.set_pool(self._router.pool_slots() - {rec.slot})
            self._router.set_state(rec.slot, "maint")
            self._state.delete_instance(iid)
            self.ensure_primary()
        self._instances.kill(rec)
        self._supervisor.release(iid)
        self._state.event("membership", f"instance {iid} removed", iid)
        rec.state = "removed"
        return rec

    def scale(self, active: int, drain_timeout_s: float = DRAIN_TIMEOUT_S) -> list[InstanceRecord]:
        """Set the number of actives. Scale-out starts new instances (loaded, warmed, golden-checked) and only
        then adds them to the pool; scale-in drains actives (no new requests, in-flight ones finish), then
        stops them. Standbys are kept either way."""
        if self._config.mode != "active-active":
            raise FleetError("scale needs mode active-active (this fleet runs primary-standby)", "FAILED_PRECONDITION")
        if not isinstance(active, int) or not 1 <= active <= self._config.slots:
            raise FleetError(f"active must be an integer within 1..{self._config.slots} (slots), got {active!r}",
                             "INVALID_ARGUMENT")
        if self._state.running_rollouts():
            raise FleetError("a rollout is running: scale after it ends", "FAILED_PRECONDITION")
        with self._lock:
            serving = [r for r in self._state.instances() if r.role in SERVING and r.state == "healthy"]
            free = self._config.slots - len(self._state.instances())
            if active - len(serving) > free:
                raise FleetError(f"scaling to {active} actives needs {active - len(serving)} new instances, only "
                                 f"{free} of {self._config.slots} slots are free", "RESOURCE_EXHAUSTED")
        self._state.event("scale", f"scaling from {len(serving)} to {active} actives")
        if active > len(serving):
            for _ in range(active - len(serving)):
                self.add_instance("standby")
            with self._lock:
                self._state.put("active_target", str(active))
                self.ensure_primary()
        elif active < len(serving):
            with self._lock:
                self._state.put("active_target", str(active))
                victims = sorted((r for r in serving if r.role != "primary"), key=lambda r: r.id,
                                 reverse=True)[: len(serving) - active]
                self._router.set_pool(self._router.pool_slots() - {r.slot for r in victims})
                for v in victims:
                    self._supervisor.hold(v.id)
                    self._router.set_state(v.slot, "drain")
                    self._state.update_instance(v.id, state="drained", role="standby")
            for v in victims:
                self._wait_drained(v, drain_timeout_s)
                self.remove_instance(v.id)
                self._supervisor.release(v.id)
        return self._state.instances()

    def _wait_drained(self, rec: InstanceRecord, timeout_s: float) -> None:
        """Until HAProxy counts no request in flight on the slot (or ``timeout_s``, recorded as an event)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            ld = self._router.load().get(rec.slot)
            if ld is None or ld.in_flight == 0 and ld.queued == 0:
                self._state.event("drain", f"{rec.id} has no request in flight", rec.id)
                return
            time.sleep(0.05)
        self._state.event("drain", f"{rec.id} still had requests in flight after {timeout_s:.0f}s: stopping it",
                         rec.id)
