"""Side by side: the overload drill at 2x the knee under each in-flight limit rule, on one private fleet.

Why: the fixed limit was knee x SLO p99, but Little's law relates requests in flight to throughput x MEAN latency;
at the knee (mean ~20 ms, p99 ~50 ms on a 2-core host) that admits ~2.5x the concurrency the knee ran at, and
under 2x overload the excess waits inside the instances (issue 22 item 3). This runs one private fleet, measures
its knee once with the drills' open-loop ladder (the rung at the knee gives the knee's p99 and mean), then runs
the overload drill once per rule, in turn (``p99, mean, sqrt, p99, mean, sqrt`` for ``--rounds 2``), each after
``recctl limits --knee-rps K --knee-mean-ms M --limit-rule R`` with the same knee and mean. Reported per run from
HAProxy's own timers (access log: ``Tr`` server response and ``Ta`` active time of requests sent to instances,
``Tw`` queue; the load generator excluded), the client's accepted p99, goodput / knee, restarts, shed share, the
host limit the rule gave, and the CPU: this process's (the load generator's) share of a core and the host's busy
cores during the drill, so a tail set by a CPU shared with the load generator shows as such.

    python -m recserve.drills.limit_rules --rounds 2 --out docs/measurements/limits/<date>.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from recserve.drills.capacity import KNEE_SLO_MS, Step, capacity_rps, knee_mean_ms

RULES = ("p99", "mean", "sqrt")


def _cpu_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole host from /proc/stat."""
    with open("/proc/stat") as f:
        v = [float(x) for x in f.readline().split()[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0.0)
    return sum(v) - idle, sum(v)


def knee_rung(knee: float, ladder: list[dict]) -> dict | None:
    """The last rung at the knee's rate that passed (warm-up left out): its p99 is the knee's p99."""
    for row in reversed(ladder):
        if row.get("warmup") or round(row.get("offered_rps", -1), 1) != round(knee, 1):
            continue
        if Step(**{k: row[k] for k in Step.__dataclass_fields__ if k in row}).within(KNEE_SLO_MS):
            return row
    return None


def at_knee(session, knee: float, seconds: float = 6.0) -> dict:
    """``seconds`` open-loop at the knee's rate through the front door, under the rule in force: HAProxy's timers
    of the requests sent to instances (the knee's own p99 and mean by HAProxy, the reference the overload runs
    are compared with), and the share the limit shed at 1x."""
    from recserve.control.routing import accesslog
    from recserve.drills.breakdown import haproxy_timers, route_kind
    from recserve.drills.probe import OpenLoopProbe, constant, golden_cases
    from recserve.drills.timeline import is_shed

    cases = [c for c in golden_cases() if c.model == "recommend"]
    offset = accesslog.size(session.access_log)
    t_from = time.time()
    probe = OpenLoopProbe(session.grpc_url, cases, constant(knee), duration_s=seconds, timeout_s=2.0,
                          max_requests=int(knee * seconds) + 10)
    recs = probe.start().join()
    time.sleep(0.5)
    entries, _ = accesslog.read_from(session.access_log, offset)
    timers = haproxy_timers(entries, t_from, time.time())
    tr = [e.tr for e in entries if route_kind(e) == "instances" and e.tr >= 0]
    inst = timers.get("instances") or {}
    return {"seconds": seconds, "sent": len(recs), "shed_share": round(sum(is_shed(r) for r in recs) / len(recs), 4)
            if recs else None, "tr_p99_ms": inst.get("tr_p99_ms"), "tr_mean_ms": round(sum(tr) / len(tr), 2)
            if tr else None, "haproxy": timers}


def summarize(rule: str, result: dict, knee: float, knee_p99_ms: float | None, cpu: dict) -> dict:
    """One row of the comparison from a drill result."""
    inst = (result.get("haproxy_timers") or {}).get("instances") or {}
    lim = (result.get("knee") or {}).get("limits") or {}
    tr = inst.get("tr_p99_ms")
    return {
        "rule": rule,
        "status": result.get("status"),
        "passed": result.get("passed"),
        "limit_rule": lim.get("limit_rule"),
        "host_limit": lim.get("host_limit"),
        "offered_rps": result.get("offered_rps"),
        "haproxy_instances": inst,
        "admitted_tr_p99_ms": tr,
        "admitted_ta_p99_ms": inst.get("ta_p99_ms"),
        "admitted_tr_p99_vs_knee_p99": round(tr / knee_p99_ms, 2) if tr is not None and knee_p99_ms else None,
        "client_accepted_p99_ms": result.get("accepted_p99_ms"),
        "goodput_rps": result.get("goodput_rps"),
        "goodput_ratio": result.get("goodput_ratio"),
        "restarts": result.get("restarts"),
        "shed_rate": result.get("shed_rate"),
        "failed_unshed": result.get("failed_unshed"),
        "client_lag": result.get("client_lag"),
        "cpu": cpu,
        "reason": result.get("reason"),
    }


def table(rows: list[dict], knee: float, knee_p99_ms: float | None, knee_mean: float | None) -> str:
    head = (f"knee {knee:g} rps (p99 {knee_p99_ms} ms, mean {knee_mean} ms at the knee, client side)\n"
            "| run | rule | host limit | at 1x: Tr p99 / mean ms, shed | 2x: HAProxy Tr p99 ms (x knee p99) | "
            "Ta p99 ms | client accepted p99 ms | goodput / knee | restarts | shed share | load gen CPU | "
            "host busy cores |\n"
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    lines = [head]
    for i, r in enumerate(rows, 1):
        k = r.get("at_knee") or {}
        lines.append(f"| {i} | {r['rule']} | {r['host_limit']} | {k.get('tr_p99_ms')} / {k.get('tr_mean_ms')}, "
                     f"{k.get('shed_share')} | {r['admitted_tr_p99_ms']} "
                     f"({r['admitted_tr_p99_vs_knee_p99']}x) | {r['admitted_ta_p99_ms']} | "
                     f"{r['client_accepted_p99_ms']} | {r['goodput_ratio']} | {r['restarts']} | {r['shed_rate']} | "
                     f"{r['cpu'].get('load_generator_cores')} | {r['cpu'].get('host_busy_cores')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.drills.limit_rules", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=2, help="rounds of every rule (p99, mean, sqrt, in turn)")
    p.add_argument("--rules", default=",".join(RULES), help="the rules to compare, comma-separated (default "
                   "%(default)s)")
    p.add_argument("--drill", default="overload", help="the drill spec to run (drills/specs/<name>.yaml)")
    p.add_argument("--out", type=Path, help="write the JSON here")
    args = p.parse_args(argv)
    rules = [r.strip() for r in args.rules.split(",") if r.strip()]
    if not rules or any(r not in RULES for r in rules):
        p.error(f"--rules: each must be one of {', '.join(RULES)}, got {args.rules!r}")

    from recserve.drills.runner import DrillRun
    from recserve.drills.session import FleetOwner
    from recserve.drills.spec import load_all

    spec = load_all()[args.drill]
    spec = dataclasses.replace(spec, alerts=())  # no Prometheus here: the alert is not what is compared
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    doc: dict = {"command": "python -m recserve.drills.limit_rules " + " ".join(argv or sys.argv[1:]),
                 "host": platform.node(), "cpus": os.cpu_count(),
                 "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                          text=True).stdout.strip(),
                 "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "drill": args.drill, "runs": []}
    with FleetOwner(private=True, log=log) as session:
        doc["loadavg_before_knee"] = Path("/proc/loadavg").read_text().split()[:3]
        knee, source, ladder = capacity_rps(session.grpc_url, "recommend", KNEE_SLO_MS, session.workdir,
                                            headers=session.stats_headers)
        if not knee:
            log(f"no knee: {source}")
            doc["knee"] = {"capacity_rps": None, "source": source, "ladder": ladder}
            _write(doc, args.out)
            return 1
        mean = knee_mean_ms(knee, ladder)
        rung = knee_rung(knee, ladder) or {}
        knee_p99 = rung.get("p99_ms")
        doc["knee"] = {"capacity_rps": knee, "source": source, "mean_ms": mean, "p99_ms": knee_p99,
                       "client_cpu": rung.get("client_cpu"), "ladder": ladder}
        log(f"knee {knee:g} rps, p99 {knee_p99} ms, mean {mean} ms")
        for rule in [r for _ in range(args.rounds) for r in rules]:
            st = session.fleet.set_knee(knee, mean, rule)
            log(f"rule {rule}: host limit {st.get('host_limit')} ({st.get('limit_rule')}); "
                f"load {Path('/proc/loadavg').read_text().split()[:3]}")
            ref = at_knee(session, knee)
            log(f"  at 1x the knee: HAProxy Tr p99 {ref['tr_p99_ms']} ms, mean {ref['tr_mean_ms']} ms, shed "
                f"{ref['shed_share']}")
            drill = DrillRun(spec, session, log=log, knee=(knee, source), knee_mean_ms=mean)
            b0, t0 = _cpu_busy()
            c0, w0 = time.process_time(), time.monotonic()
            try:
                result = drill.run()
            except Exception as exc:  # one failed run must not hide the others
                result = drill._result({}, status="failed", reason=f"{type(exc).__name__}: {exc}")
            wall = max(time.monotonic() - w0, 1e-9)
            b1, t1 = _cpu_busy()
            cpu = {"load_generator_cores": round((time.process_time() - c0) / wall, 2),
                   "host_busy_cores": round((b1 - b0) / max(t1 - t0, 1e-9) * (os.cpu_count() or 1), 2),
                   "wall_s": round(wall, 1)}
            row = summarize(rule, result, knee, knee_p99, cpu) | {"at_knee": ref}
            if row["admitted_tr_p99_ms"] is not None and ref.get("tr_p99_ms"):
                row["admitted_tr_p99_vs_at_knee_tr_p99"] = round(row["admitted_tr_p99_ms"] / ref["tr_p99_ms"], 2)
            doc["runs"].append(row)
            log(f"  {rule}: Tr p99 {row['admitted_tr_p99_ms']} ms, goodput {row['goodput_ratio']}, restarts "
                f"{row['restarts']}, shed {row['shed_rate']}, cpu {cpu}")
    doc["table"] = table(doc["runs"], knee, knee_p99, mean)
    print(doc["table"])
    _write(doc, args.out)
    return 0


def _write(doc: dict, out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2, default=str) + "\n")


if __name__ == "__main__":
    sys.exit(main())
