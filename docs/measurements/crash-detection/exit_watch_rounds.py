"""Does seeing an instance's exit at once change the crash drill? Two fleets side by side at one knee.

Until the control plane reacts to a dead instance, HAProxy keeps its share of the host's in-flight limit and the
instance left carries the whole load on half the limit: a burst then fills it and gets degraded answers. The exit
watch (control/fleet/exits.py) reacts on the process's pidfd; without it (test switch ``no-exit-watch``) the next
deep check finds the exit. This starts two private fleets at once on the committed repository, measures the knee
on the first, and runs the shipped crash drill on each at that knee, alternating which goes first each round,
recording detection, RTO, degraded answers and failures. Both fleets stay up throughout, so the idle one's
background work falls on every run alike.

    .venv/bin/python docs/measurements/crash-detection/exit_watch_rounds.py ROUNDS OUT.json [KNEE_RPS] [--hog N]
        [--hog-nice K]

KNEE_RPS: size the load and the limits by this knee instead of measuring one (a lower knee than the host's gives
smaller in-flight limits at a lower rate: the shape of a run on a slower or busier host). ``--hog N``: N busy
processes at nice 0 (``--hog-nice K``: at K; 5 is the instances' own) run from before the knee is measured to the
end (a noisy neighbour, as on a shared CI host).
"""

from __future__ import annotations

import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from experiment import alternating, drill_row, fleet_knee, header, log, write  # noqa: E402  (docs/measurements/experiment.py)

from recserve.control.testswitch import ENV  # noqa: E402
from recserve.drills.session import FleetOwner  # noqa: E402
from recserve.drills.spec import load_all  # noqa: E402

SETTINGS = {"exit watch": {}, "deep checks only": {ENV: "no-exit-watch"}}


def hogs(n: int, nice: int) -> list[subprocess.Popen]:
    """``n`` processes that burn a core each until killed, at niceness ``nice``."""
    return [subprocess.Popen(["nice", "-n", str(nice), sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> int:
    argv = sys.argv[1:]
    opts = {"--hog": 0, "--hog-nice": 0}
    for flag in opts:
        if flag in argv:
            i = argv.index(flag)
            opts[flag] = int(argv[i + 1])
            del argv[i:i + 2]
    hog, hog_nice = opts["--hog"], opts["--hog-nice"]
    rounds, out = int(argv[0]), Path(argv[1])
    spec = load_all()["crash"]
    doc: dict = {**header("docs/measurements/crash-detection/exit_watch_rounds.py", sys.argv[1:]),
                 "settings": {k: v or "(defaults)" for k, v in SETTINGS.items()}, "runs": []}
    with ExitStack() as stack:
        fleets = {name: stack.enter_context(FleetOwner(private=True, log=log, env=env))
                  for name, env in SETTINGS.items()}
        first = fleets["exit watch"]
        for p in hogs(hog, hog_nice):
            stack.callback(p.wait)
            stack.callback(p.kill)
        doc["hog_processes"], doc["hog_nice"] = hog, hog_nice
        if len(argv) > 2:
            knee, source, mean = float(argv[2]), "fixed by the command line", None
        elif (measured := fleet_knee(first)) is not None:
            knee, source, mean = measured
        else:
            return 1
        doc["knee_rps"], doc["knee_source"], doc["knee_mean_ms"] = knee, f"exit-watch fleet: {source}", mean
        for r, name, res, detected, degraded_at in alternating(spec, fleets, rounds, (knee, source, mean), "detected"):
            row = {"round": r, "setting": name, **drill_row(res), "detection_ms": res.get("detection_ms"),
                   "rto_ms": res.get("rto_ms"), "detected": detected, "degraded_after_fault_s": degraded_at}
            doc["runs"].append(row)
            log(f"round {r} {name}: detection {row['detection_ms']} ms, rto {row['rto_ms']} ms, "
                f"degraded {row['degraded']}, failed {row['failed']}/{row['total']}")
    write(out, doc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
