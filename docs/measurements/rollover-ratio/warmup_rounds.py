"""Does the warm-up set rollover-under-load's p99 during / before? Two fleets side by side at one knee.

The warm-up (control/fleet/warmup.py) runs its rounds on the canary at the serving priority before it takes
traffic: on a small host that CPU is taken from the instances serving the drill's load, while skipping it leaves
the canary's first client requests cold. This starts two private fleets at once on the committed repository, one
with the default warm-up and one with ``--warmup-rounds 0``, measures the knee on the first and runs the shipped
rollover-under-load drill on each at that knee, alternating which goes first each round, recording each run's
p99 during / before, failed requests, HAProxy's timers and the warm-up events. Both fleets stay up throughout, so
the idle one's background work falls on every run alike.

    .venv/bin/python docs/measurements/rollover-ratio/warmup_rounds.py ROUNDS OUT.json
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from drill_row import drill_row  # beside this file

from recserve.drills.capacity import KNEE_SLO_MS, capacity_rps, knee_mean_ms
from recserve.drills.runner import DrillRun
from recserve.drills.session import FleetOwner
from recserve.drills.spec import load_all

SETTINGS = {"default warm-up": [], "no warm-up": ["--warmup-rounds", "0"]}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main() -> int:
    rounds, out = int(sys.argv[1]), Path(sys.argv[2])
    spec = load_all()["rollover-under-load"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc: dict = {"command": " ".join(["docs/measurements/rollover-ratio/warmup_rounds.py", *sys.argv[1:]]),
                 "host": platform.node(), "cpus": os.cpu_count(), "commit": commit,
                 "loadavg_before": Path("/proc/loadavg").read_text().split()[:3],
                 "settings": {k: v or "(defaults)" for k, v in SETTINGS.items()}, "runs": []}
    with ExitStack() as stack:
        fleets = {name: stack.enter_context(FleetOwner(private=True, log=log, server_args=args))
                  for name, args in SETTINGS.items()}
        first = fleets["default warm-up"]
        knee, source, ladder = capacity_rps(first.grpc_url, "recommend", KNEE_SLO_MS, first.workdir,
                                            headers=first.stats_headers)
        if not knee:
            log(f"no knee: {source}")
            return 1
        mean = knee_mean_ms(knee, ladder)
        doc["knee_rps"], doc["knee_source"], doc["knee_mean_ms"] = knee, f"default warm-up fleet: {source}", mean
        for r in range(rounds):
            order = list(SETTINGS) if r % 2 == 0 else list(reversed(SETTINGS))
            for name in order:
                session = fleets[name]
                t0 = time.time()
                res = DrillRun(spec, session, log=log, knee=(knee, source), knee_mean_ms=mean).run()
                warm = [e.get("message", "") for e in session.fleet.events_since(t0) if e.get("kind") == "warmup"]
                row = {"round": r + 1, "setting": name, **drill_row(res), "warmup_events": warm}
                doc["runs"].append(row)
                log(f"round {r + 1} {name}: ratio {row['p99_during_ratio']}, p99 {row['p99_ms']}, "
                    f"failed {row['failed']}/{row['total']}, warm-up events {len(warm)}")
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
