"""The shipped drills, each run ROUNDS times on one private fleet at one knee: the "N of N runs" figures.

Measures the knee once on the fleet, then runs every named drill once per round (in the order given), recording
each run's verdict, p99 during / before, failures, degraded answers and HAProxy's timers.

    .venv/bin/python docs/measurements/drill_rounds.py ROUNDS OUT.json DRILL [DRILL ...]
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment import drill_row, fleet_knee, header, log, write  # noqa: E402  (beside this file)

from recserve.drills.runner import DrillRun  # noqa: E402
from recserve.drills.session import FleetOwner  # noqa: E402
from recserve.drills.spec import load_all  # noqa: E402


def main() -> int:
    if len(sys.argv) < 4:
        print(__doc__, file=sys.stderr)
        return 2
    rounds, out, names = int(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
    specs = load_all()
    unknown = [n for n in names if n not in specs]
    if unknown:
        log(f"unknown drill(s) {unknown}; known: {', '.join(sorted(specs))}")
        return 2
    doc: dict = {**header("docs/measurements/drill_rounds.py", sys.argv[1:]), "runs": []}
    with FleetOwner(private=True, log=log) as session:
        if (measured := fleet_knee(session)) is None:
            return 1
        knee, source, mean = measured
        doc["knee_rps"], doc["knee_source"], doc["knee_mean_ms"] = knee, source, mean
        for r in range(rounds):
            for name in names:
                res = DrillRun(specs[name], session, log=log, knee=(knee, source), knee_mean_ms=mean).run()
                row = {"round": r + 1, "drill": name, **drill_row(res)}
                doc["runs"].append(row)
                log(f"round {r + 1} {name}: passed {row['passed']}, ratio {row['p99_during_ratio']}, "
                    f"failed {row['failed']}/{row['total']}, degraded {row['degraded']}")
    write(out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
