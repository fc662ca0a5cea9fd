"""What Prometheus scrapes and the control-plane series its alerts need.

``TargetFiles`` keeps the file_sd files under ``<root>/monitoring/targets/`` current (Prometheus re-reads them
on change): one target per Triton instance, labelled with the control plane's instance id, plus the control
plane's and HAProxy's exporters. ``FleetCollector`` exports, at scrape time, series computed from the state
database and the last deep checks (so they are never stale after an instance is removed or the control plane
restarts): instance states, healthy standbys, the serving mode, golden mismatches, the last rollout's end per model.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client.core import GaugeMetricFamily

DEFAULT_FLEET = os.environ.get("RECSERVE_FLEET_NAME", "recserve")


def targets_dir(root: Path) -> Path:
    return Path(root) / "monitoring" / "targets"


class TargetFiles:
    """Owner of the file_sd files of one fleet; writes atomically and only when the content changed."""

    def __init__(self, directory: Path, fleet: str = DEFAULT_FLEET):
        self.dir, self.fleet = Path(directory), fleet
        self._last: dict[str, str] = {}

    def _write(self, name: str, groups: list[dict[str, Any]]) -> bool:
        text = json.dumps(groups, indent=1, sort_keys=True)
        if self._last.get(name) == text:
            return False
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{name}.tmp"
        tmp.write_text(text)
        os.replace(tmp, self.dir / name)
        self._last[name] = text
        return True

    def sync_instances(self, records: list) -> bool:
        """One target per instance record with a metrics port (called as membership and ports change)."""
        groups = [{"targets": [f"127.0.0.1:{r.metrics_port}"], "labels": {"instance": r.id, "fleet": self.fleet}}
                  for r in sorted(records, key=lambda r: r.id) if getattr(r, "metrics_port", 0)]
        return self._write("triton.json", groups)

    def set_static(self, job: str, address: str | None, instance: str) -> bool:
        """The control plane's or HAProxy's exporter (``address`` host:port; None empties the file)."""
        groups = [{"targets": [address], "labels": {"instance": instance, "fleet": self.fleet}}] if address else []
        return self._write(f"{job}.json", groups)


class FleetCollector:
    """prometheus_client collector over a ``control.fleet.fleet.Fleet``; registered once by the control plane."""

    def __init__(self, fleet: Any):
        self.fleet = fleet

    def collect(self):
        from recserve.control.routing.router import MODES  # the control plane has it loaded; `recctl status` need not

        f = self.fleet
        recs = f.state.instances()
        state = GaugeMetricFamily("recserve_instance_state", "1 for the instance's current role and state "
                                  "(from the control plane's state database)", labels=["instance", "role", "state"])
        golden = GaugeMetricFamily("recserve_instance_golden_mismatch",
                                   "1 when the instance's last deep check got a wrong golden answer",
                                   labels=["instance"])
        for r in recs:
            state.add_metric([r.id, r.role, r.state], 1)
            p = f.last_probe(r.id)
            wrong = p is not None and not p.ok and p.stage == "golden" and p.reason.startswith("wrong answer")
            golden.add_metric([r.id], 1 if wrong else 0)
        yield state
        yield golden
        healthy = [r for r in recs if r.state == "healthy"]
        yield GaugeMetricFamily("recserve_fleet_members", "instances in the fleet's membership", value=len(recs))
        yield GaugeMetricFamily("recserve_fleet_healthy_instances", "members whose last deep check passed",
                                value=len(healthy))
        yield GaugeMetricFamily("recserve_fleet_healthy_standbys", "healthy instances in the standby role",
                                value=sum(1 for r in healthy if r.role == "standby"))
        # Alerts that only mean something in one mode select on it: active-active has no standby by design,
        # so RecserveNoHealthyStandby reads recserve_fleet_mode{mode="primary-standby"} == 1.
        mode = GaugeMetricFamily("recserve_fleet_mode", "1 for the fleet's serving mode (recctl up --mode), 0 for "
                                 "the others", labels=["mode"])
        for m in MODES:
            mode.add_metric([m], 1 if m == f.config.mode else 0)
        yield mode
        last = GaugeMetricFamily("recserve_rollout_last_finished_timestamp_seconds",
                                 "unix time the model's latest rollout ended, labelled with how it ended",
                                 labels=["model", "status"])
        for model in _models(f):
            r = f.state.latest_rollout(model)
            if r is not None and r.status != "running" and r.finished:
                last.add_metric([model, r.status], float(r.finished))
        yield last
        yield GaugeMetricFamily("recserve_collector_timestamp_seconds", "when this scrape was computed",
                                value=time.time())


def _models(fleet: Any) -> list[str]:
    try:
        return fleet.versioned_models()
    except Exception:  # a repository being rewritten (restore drill): no rollout series this scrape
        return []


def remembered_port(path: Path) -> int:
    """A port picked free once and kept in ``path``: an adopted HAProxy keeps listening where it was told."""
    from recserve.control.runtime.procs import free_port

    try:
        return int(Path(path).read_text().split()[0])
    except (OSError, ValueError, IndexError):
        port = free_port()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(f"{port}\n")
        return port
