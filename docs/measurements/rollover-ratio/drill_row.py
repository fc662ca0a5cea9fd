"""One rollover-under-load run as a row of the experiments beside this file (what standby_canary.py and
warmup_rounds.py record of each run)."""

from __future__ import annotations

from pathlib import Path


def drill_row(res: dict) -> dict:
    """The drill's verdict, p99 during / before and per phase, requests, restarts, HAProxy's timers, host load."""
    return {"passed": res.get("passed"), "p99_during_ratio": res.get("p99_during_ratio"),
            "p99_ms": res.get("p99_ms"), "failed": res.get("failed_requests"), "total": res.get("total_requests"),
            "served": res.get("served_requests"), "degraded": res.get("degraded_answers"),
            "shed": res.get("shed_requests"), "restarts": res.get("restarts"),
            "haproxy_instances": (res.get("haproxy_timers") or {}).get("instances"),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}
