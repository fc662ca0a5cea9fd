"""Prometheus metrics of the control plane, and a reader for Triton's own request counters (rollout gates)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server

from recserve.control.monitoring import promtext

ROLES = ("primary", "active", "standby", "canary")


class ControlMetrics:
    """One registry per control plane (tests run several in one process)."""

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.instance_healthy = Gauge("recserve_instance_healthy", "1 when the last deep check passed",
                                      ["instance"], registry=r)
        self.instance_role = Gauge("recserve_instance_role", "1 for the instance's current role",
                                   ["instance", "role"], registry=r)
        self.failovers = Counter("recserve_failovers", "primary replaced by another instance", registry=r)
        self.restarts = Counter("recserve_instance_restarts", "instance restarts", ["instance"], registry=r)
        self.detections = Counter("recserve_instance_failures_detected", "instances marked broken",
                                  ["instance", "stage"], registry=r)
        self.check_seconds = Gauge("recserve_health_check_seconds", "duration of the last deep check",
                                   ["instance"], registry=r)
        self.rollout_phase = Gauge("recserve_rollout_phase", "1 for the phase of the model's running rollout",
                                   ["model", "phase"], registry=r)
        self.rollout_results = Counter("recserve_rollout_results", "finished rollouts", ["model", "status"],
                                       registry=r)
        self.gate_value = Gauge("recserve_rollout_gate_value", "last measured gate value", ["model", "gate"],
                                registry=r)
        self.reconcile_errors = Counter("recserve_reconcile_errors", "failed reconcile/restart attempts",
                                        registry=r)
        self.fleet_degraded = Gauge("recserve_fleet_degraded", "1 when no healthy standby is left", registry=r)
        self.golden_reference_ok = Gauge("recserve_golden_reference_ok", "1 when build.reference computed the "
                                         "expected golden answers of every version set checked", registry=r)
        self.golden_expectations = Gauge("recserve_golden_expectations", "version sets whose expected golden "
                                         "answers come from this source", ["source"], registry=r)
        # Backups (control/backup/manager.py); the stale-backup alert compares time() - last_success with max_age.
        self.backup_last_success = Gauge("recserve_backup_last_success_timestamp_seconds",
                                         "unix time of the last verified backup (0: none)", registry=r)
        self.backup_last_size = Gauge("recserve_backup_last_size_bytes", "size of the last verified backup",
                                      registry=r)
        self.backup_failures = Counter("recserve_backup_failures", "backups that failed or failed verification",
                                       registry=r)
        self.backup_max_age = Gauge("recserve_backup_max_age_seconds", "policy: schedule interval plus slack "
                                    "(0: no backup policy)", registry=r)
        # With no verified backup known (0 above: a fresh target, or before the target was read at start), the
        # stale-backup alert counts the age from here, not from 1970.
        self.backup_policy_start = Gauge("recserve_backup_policy_start_timestamp_seconds", "unix time this "
                                         "control plane took its backup policy on (0: no backup policy)", registry=r)

        # Admission (control/routing/router.py): limits, load and shedding as HAProxy counts them.
        self.busy_probes = Counter("recserve_busy_probes", "failed deep checks judged busy (saturated, at its "
                                   "limit, live), not broken", ["instance"], registry=r)
        self.probes_shed = Counter("recserve_probes_shed", "deep checks whose golden inference ran out of time or "
                                   "met a full queue (load kept the probe from its answer), busy or not",
                                   ["instance"], registry=r)
        self.server_limit = Gauge("recserve_server_inflight_limit", "in-flight limit (HAProxy maxconn) per slot",
                                  ["slot"], registry=r)
        self.server_inflight = Gauge("recserve_server_inflight", "requests in flight per slot (HAProxy scur)",
                                     ["slot"], registry=r)
        self.shed_requests = Gauge("recserve_shed_requests", "requests shed so far (fallback or 429/"
                                   "RESOURCE_EXHAUSTED) since HAProxy started", registry=r)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        start_http_server(port, addr=host, registry=self.registry)

    def set_role(self, instance: str, role: str) -> None:
        for r in ROLES:
            self.instance_role.labels(instance, r).set(1 if r == role else 0)

    def set_phase(self, model: str, phase: str, phases: tuple[str, ...]) -> None:
        for p in phases:
            self.rollout_phase.labels(model, p).set(1 if p == phase else 0)


def triton_request_counts(metrics_url: str, models: tuple[str, ...] = ("recommend", "search"),
                          timeout: float = 1.0) -> tuple[float, float] | None:
    """(successes, failures) summed over ``models`` from Triton's /metrics; None when unreachable."""
    text = promtext.fetch(metrics_url, timeout)
    if text is None:
        return None
    names = ("nv_inference_request_success", "nv_inference_request_failure")
    sums = promtext.model_sums(text, names)
    per = [sums.get(m, {}) for m in models]
    return sum(d.get(names[0], 0.0) for d in per), sum(d.get(names[1], 0.0) for d in per)
