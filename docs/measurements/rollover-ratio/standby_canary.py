"""Does the canary leaving the pool set rollover-under-load's p99 during / before? Side by side in one fleet.

In active-active with two instances and no standby, a rollover's canary is the second active: it leaves the pool
while it loads, and one instance serves 0.7x the two-instance knee alone (docs/holds.md found the worst phases
where one instance serves alone). With a healthy standby the rollover takes the standby as its canary and the pool
keeps both actives. This runs the shipped rollover-under-load drill on one private fleet (one knee), alternating
"standby" (a standby added first: the canary is a third instance) and "no standby" (the standby removed first),
and records each run's p99 during / before, failed requests and the HAProxy timers.

    .venv/bin/python docs/measurements/rollover-ratio/standby_canary.py ROUNDS OUT.json
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from drill_row import drill_row  # beside this file

from recserve.drills.capacity import KNEE_SLO_MS, capacity_rps, knee_mean_ms
from recserve.drills.runner import DrillRun
from recserve.drills.session import FleetOwner
from recserve.drills.spec import load_all


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def standbys(session) -> list[str]:
    return [i.id for i in session.fleet.instances() if i.role == "standby" and i.state == "healthy"]


def set_standby(session, want: bool) -> None:
    """One healthy standby (``want``) or none; waits until the fleet says so."""
    have = standbys(session)
    if want and not have:
        session.fleet.call("AddInstance", session.fleet.pb.AddInstanceRequest(role="standby"), timeout_s=180)
    for iid in (have if not want else have[1:]):
        session.fleet.call("RemoveInstance", session.fleet.pb.InstanceRequest(id=iid), timeout_s=60)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and (bool(standbys(session)) != want):
        time.sleep(0.5)
    time.sleep(5)  # the pool settles before the drill's own steady-state check


def main() -> int:
    rounds, out = int(sys.argv[1]), Path(sys.argv[2])
    spec = load_all()["rollover-under-load"]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc: dict = {"command": " ".join(["docs/measurements/rollover-ratio/standby_canary.py", *sys.argv[1:]]),
                 "host": platform.node(), "cpus": os.cpu_count(), "commit": commit,
                 "loadavg_before": Path("/proc/loadavg").read_text().split()[:3], "runs": []}
    with FleetOwner(private=True, log=log) as session:
        knee, source, ladder = capacity_rps(session.grpc_url, "recommend", KNEE_SLO_MS, session.workdir,
                                            headers=session.stats_headers)
        if not knee:
            log(f"no knee: {source}")
            return 1
        mean = knee_mean_ms(knee, ladder)
        doc["knee_rps"], doc["knee_mean_ms"] = knee, mean
        for r in range(rounds):
            for want in (True, False):
                set_standby(session, want)
                roles = {i.id: i.role for i in session.fleet.instances()}
                drill = DrillRun(spec, session, log=log, knee=(knee, source), knee_mean_ms=mean)
                res = drill.run()
                row = {"round": r + 1, "standby": want, "roles_before": roles, **drill_row(res)}
                doc["runs"].append(row)
                log(f"round {r + 1} standby={want}: ratio {row['p99_during_ratio']}, p99 {row['p99_ms']}, "
                    f"failed {row['failed']}/{row['total']}, roles before {roles}")
    out.write_text(json.dumps(doc, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
