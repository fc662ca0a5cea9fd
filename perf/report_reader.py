"""perf's published reading of its latest report: the capacity (the knee) it measured per model.

Why a module of its own: the control plane sizes admission from this knee and the drills start their knee
ladder near it, but neither may import perf's runner, nor may the control plane import the drills (it once
read the knee through drills/capacity.py). This is the one reader of that figure, and it imports nothing
from recserve (tests/test_layering.py holds it to that).
"""

from __future__ import annotations

import json
from pathlib import Path

#: Where ``python -m recserve.perf`` writes its runs (perf/report.py) ...
REPORTS_DIR = Path(__file__).resolve().parent.parent / "reports" / "perf"
#: ... and the report of the latest one.
PERF_REPORT = REPORTS_DIR / "latest" / "report.json"


def capacity_rps(model: str, path: Path = PERF_REPORT) -> float | None:
    """``capacity_rps`` of ``model`` wherever the perf report keeps it (a mapping, or per target); None when
    the report is missing, unreadable or has no figure for ``model``."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    found: list[float] = []

    def walk(node, under_model: bool = False) -> None:
        if isinstance(node, dict):
            cap = node.get("capacity_rps")
            if isinstance(cap, dict) and isinstance(cap.get(model), int | float):
                found.append(float(cap[model]))
            elif isinstance(cap, int | float) and (under_model or model in str(node.get("target", ""))):
                found.append(float(cap))
            for k, v in node.items():
                walk(v, under_model or k == model)
        elif isinstance(node, list):
            for v in node:
                walk(v, under_model)

    walk(data)
    return found[0] if found else None


def knee_mean_ms(model: str, path: Path = PERF_REPORT) -> float | None:
    """Mean latency (ms) at ``model``'s capacity in the perf report (``capacity[*].mean_ms_at_capacity`` of the
    entry for ``model``, the direct one first); None when the report is missing or older than that figure."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    caps = data.get("capacity") if isinstance(data, dict) else None
    if not isinstance(caps, dict):
        return None
    rows = [c for c in caps.values() if isinstance(c, dict) and c.get("model") == model]
    rows.sort(key=lambda c: c.get("via") != "direct")
    for c in rows:
        v = c.get("mean_ms_at_capacity")
        if isinstance(v, int | float) and v > 0:
            return float(v)
    return None
