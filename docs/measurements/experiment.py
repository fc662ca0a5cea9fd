"""What the side-by-side experiments under docs/measurements share: the JSON header naming the command, host and
commit, the knee measured on one fleet, one drill run as a row, and the write.

The scripts import it from their parent folder (``sys.path``), as they run from the checkout:
``.venv/bin/python docs/measurements/<topic>/<script>.py ...``.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from recserve.drills.capacity import KNEE_SLO_MS, capacity_rps, knee_mean_ms


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def header(script: str, args: list[str]) -> dict:
    """The command as run, the host, its cores, the commit and the load average before: every JSON starts so.
    From here on SIGTERM exits through the script's ``with`` blocks, so a stopped experiment stops its fleets."""
    signal.signal(signal.SIGTERM, _exit_on_term)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": " ".join([script, *args]), "host": platform.node(), "cpus": os.cpu_count(), "commit": commit,
            "loadavg_before": Path("/proc/loadavg").read_text().split()[:3]}


def _exit_on_term(signum: int, _frame) -> None:
    raise SystemExit(128 + signum)


def fleet_knee(session) -> tuple[float, str, float] | None:
    """The knee measured on ``session``'s fleet (the drills' ladder): (rps, how, mean latency there); None (and
    why, logged) when the ladder found none."""
    knee, source, ladder = capacity_rps(session.grpc_url, "recommend", KNEE_SLO_MS, session.workdir,
                                        headers=session.stats_headers)
    if not knee:
        log(f"no knee: {source}")
        return None
    return knee, source, knee_mean_ms(knee, ladder)


def alternating(spec, fleets: dict, rounds: int, knee: tuple[float, str, float | None],
                event_kind: str) -> Iterator[tuple[int, str, dict, list[str], list[float]]]:
    """Run drill ``spec`` on every fleet of ``fleets`` (name -> session) each round at one ``knee`` (rps, how,
    mean), the order reversed every other round so that going first falls on each alike; yields (round, fleet
    name, the drill's result, the messages of that fleet's ``event_kind`` events during the run, the seconds after
    the fault at which each degraded answer was sent)."""
    from recserve.drills.runner import DrillRun

    rps, source, mean = knee
    for r in range(rounds):
        for name in list(fleets) if r % 2 == 0 else list(reversed(fleets)):
            session = fleets[name]
            t0 = time.time()
            drill = DrillRun(spec, session, log=log, knee=(rps, source), knee_mean_ms=mean)
            res = drill.run()
            sent = min((x.t_send for x in drill.records), default=0.0)
            degraded = [round(x.t_send - sent - (res.get("fault_at_s") or 0.0), 3) for x in drill.records if x.degraded]
            yield r + 1, name, res, [e.get("message", "") for e in session.fleet.events_since(t0)
                                     if e.get("kind") == event_kind], degraded


def drill_row(res: dict) -> dict:
    """The drill's verdict, p99 during / before and per phase, requests, restarts, HAProxy's timers, host load."""
    return {"passed": res.get("passed"), "p99_during_ratio": res.get("p99_during_ratio"),
            "p99_ms": res.get("p99_ms"), "failed": res.get("failed_requests"), "total": res.get("total_requests"),
            "served": res.get("served_requests"), "degraded": res.get("degraded_answers"),
            "shed": res.get("shed_requests"), "restarts": res.get("restarts"),
            "haproxy_instances": (res.get("haproxy_timers") or {}).get("instances"),
            "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def write(out: Path, doc: dict) -> None:
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
