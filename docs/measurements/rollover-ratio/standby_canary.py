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

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiment import drill_row, fleet_knee, header, log, write  # noqa: E402  (docs/measurements/experiment.py)

from recserve.drills.runner import DrillRun  # noqa: E402
from recserve.drills.session import FleetOwner  # noqa: E402
from recserve.drills.spec import load_all  # noqa: E402


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
    doc: dict = {**header("docs/measurements/rollover-ratio/standby_canary.py", sys.argv[1:]), "runs": []}
    with FleetOwner(private=True, log=log) as session:
        if (measured := fleet_knee(session)) is None:
            return 1
        knee, source, mean = measured
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
    write(out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
