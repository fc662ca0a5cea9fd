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

import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiment import alternating, drill_row, fleet_knee, header, log, write  # noqa: E402  (docs/measurements/experiment.py)

from recserve.drills.session import FleetOwner  # noqa: E402
from recserve.drills.spec import load_all  # noqa: E402

SETTINGS = {"default warm-up": [], "no warm-up": ["--warmup-rounds", "0"]}


def main() -> int:
    rounds, out = int(sys.argv[1]), Path(sys.argv[2])
    spec = load_all()["rollover-under-load"]
    doc: dict = {**header("docs/measurements/rollover-ratio/warmup_rounds.py", sys.argv[1:]),
                 "settings": {k: v or "(defaults)" for k, v in SETTINGS.items()}, "runs": []}
    with ExitStack() as stack:
        fleets = {name: stack.enter_context(FleetOwner(private=True, log=log, server_args=args))
                  for name, args in SETTINGS.items()}
        if (measured := fleet_knee(fleets["default warm-up"])) is None:
            return 1
        knee, source, mean = measured
        doc["knee_rps"], doc["knee_source"], doc["knee_mean_ms"] = knee, f"default warm-up fleet: {source}", mean
        for r, name, res, warm, _ in alternating(spec, fleets, rounds, measured, "warmup"):
            row = {"round": r, "setting": name, **drill_row(res), "warmup_events": warm}
            doc["runs"].append(row)
            log(f"round {r} {name}: ratio {row['p99_during_ratio']}, p99 {row['p99_ms']}, "
                f"failed {row['failed']}/{row['total']}, warm-up events {len(warm)}")
    write(out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
