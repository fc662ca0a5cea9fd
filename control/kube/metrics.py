"""The operator's fleet series: what the cluster's alerts read, computed at scrape time from the operator's state.

The operator exports ``ControlMetrics`` (the local control plane's registry: instance health, detections, rollout
phases and gate values, reconcile errors) and, from this collector, the per-pod state the cluster rules select on:
``recserve_instance_state`` (role and state per pod), ``recserve_instance_golden_mismatch`` (the pod's last deep
check got a wrong golden answer), ``recserve_fleet_members`` / ``recserve_fleet_healthy_instances`` /
``recserve_fleet_ready_instances`` (pods, pods whose last deep check passed, pods whose golden readiness gate is open)
and ``recserve_rollout_last_finished_timestamp_seconds`` (the last ModelRollout's end per model and how it ended).
The single-host-only series (serving mode, healthy standbys, backups, HAProxy) are not exported here, and the
cluster's rule set does not read them (``control/kube/promrule.py``).
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client.core import GaugeMetricFamily

#: What the operator writes into an instance's detail when a deep check's golden answer was wrong.
GOLDEN_WRONG = "golden: wrong answer"


class KubeFleetCollector:
    """prometheus_client collector over a running ``control.kube.operator.Operator``."""

    def __init__(self, operator: Any):
        self.operator = operator

    def collect(self):
        op = self.operator
        pool = op.pool
        state = GaugeMetricFamily("recserve_instance_state", "1 for the pod's current role and state (the "
                                  "operator's record)", labels=["instance", "role", "state"])
        golden = GaugeMetricFamily("recserve_instance_golden_mismatch",
                                   "1 when the pod's last deep check got a wrong golden answer", labels=["instance"])
        recs = pool.state.instances() if pool is not None else []
        for r in recs:
            state.add_metric([r.id, r.role, r.state], 1)
            golden.add_metric([r.id], 1 if r.state == "broken" and (r.detail or "").startswith(GOLDEN_WRONG) else 0)
        yield state
        yield golden
        yield GaugeMetricFamily("recserve_fleet_members", "Triton pods the operator manages", value=len(recs))
        yield GaugeMetricFamily("recserve_fleet_healthy_instances", "pods whose last deep check passed",
                                value=sum(1 for r in recs if r.state == "healthy"))
        gates = getattr(op, "gates", {})
        yield GaugeMetricFamily("recserve_fleet_ready_instances", "pods whose golden readiness gate is open "
                                "(endpoints of the serving Services)", value=sum(1 for r in recs if gates.get(r.id)))
        last = GaugeMetricFamily("recserve_rollout_last_finished_timestamp_seconds",
                                 "unix time the model's latest rollout ended, labelled with how it ended",
                                 labels=["model", "status"])
        for model in _models(pool):
            r = pool.state.latest_rollout(model)
            if r is not None and r.status != "running" and r.finished:
                last.add_metric([model, r.status], float(r.finished))
        yield last
        yield GaugeMetricFamily("recserve_collector_timestamp_seconds", "when this scrape was computed",
                                value=time.time())


def _models(pool: Any) -> list[str]:
    if pool is None:
        return []
    try:
        return pool.versioned_models()
    except Exception:  # a repository being synced: no rollout series this scrape
        return []


def register(operator: Any) -> KubeFleetCollector:
    """Add the collector to the operator's registry (once, at start)."""
    collector = KubeFleetCollector(operator)
    operator.pool.metrics.registry.register(collector)
    return collector
