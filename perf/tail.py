"""The tail through the front door against direct to one instance, at the same per-instance rate, in one run.

Issue 22's rule for "clean tails": at a fraction of the knee (default 0.5x) through the front door, the requests
over 4x the SLO and the p99.9 must be no worse than direct to one instance at the same per-instance rate (the front
door's rate divided by the instances it spreads over). One private fleet on the committed repository: the knee is
measured first by the drills' open-loop ladder through the front door, then each round runs three legs: the front
door; direct to one instance at the per-instance rate (the issue's comparison, on a host doing half the work); and
direct to every serving instance at once, the front door's rate split evenly by the client (the same host load:
only HAProxy differs). Rounds repeat the three so that a change on the host hits them alike. Each leg is preceded
by 10 s at its rate, not counted. For the front door, HAProxy's own timers (its access log: ``Tr``, the server's
answer, and the requests it retried) are reported beside the client's: the client's figures include the load
generator.

Each leg also records the cores each group of processes used (HAProxy, the tritonservers, the Python stubs, the
load generator): on a small host the front door's own CPU competes with the instances.

    python -m recserve.perf.tail [--x-knee 0.5] [--seconds 120] [--rounds 1] [--knee RPS] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

from recserve.control.defaults import SLO_P99_MS
from recserve.control.stats import percentile
from recserve.drills.timeline import TAIL_SLO_FACTOR, window_stats


def _send(urls: list[str], cases: list, rps: float, seconds: float) -> list:
    """The drills' open-loop probe at ``rps`` in all, split evenly over ``urls`` (one probe each, together)."""
    from recserve.drills.probe import OpenLoopProbe, constant

    each = rps / len(urls)
    probes = [OpenLoopProbe(u, cases, constant(each), seconds, timeout_s=3.0,
                            max_requests=int(each * seconds) + 10).start() for u in urls]
    return [r for p in probes for r in p.join(seconds + 30)]


def cpu_reading(root_pid: int | None) -> dict[int, tuple[str, float]]:
    """CPU seconds used so far per process: this one (the load generator) and the fleet's under ``root_pid`` (the
    control plane), each with its group (``perf.metrics.fleet_group``)."""
    import psutil

    from recserve.perf.metrics import fleet_cpu_s, process_cpu_s

    return {os.getpid(): ("load generator", process_cpu_s(psutil.Process())),
            **(fleet_cpu_s(root_pid) if root_pid else {})}


def cores_used(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
               seconds: float) -> dict[str, float]:
    """Cores each group used between two ``cpu_reading``s ``seconds`` apart (per pid: a process started in
    between counts from 0, one gone in between counts nothing)."""
    from recserve.perf.metrics import cpu_delta

    return {k: round(v / seconds, 3) for k, v in sorted(cpu_delta(before, after, kinds=()).items())}


def server_connections(stats_socket: Path) -> dict[str, int]:
    """HAProxy's connections to the instances so far, over every gRPC backend's servers: ``new`` (opened) and
    ``reused`` (a request sent on one already open). A request on a new connection pays its set-up."""
    from recserve.control.routing.haproxy import runtime_exchange

    return count_connections(runtime_exchange(stats_socket, "show stat", check=False))


def count_connections(show_stat: str) -> dict[str, int]:
    """``server_connections`` from the text of HAProxy's ``show stat``."""
    from recserve.control.routing.haproxy import parse_stat

    rows = [r for r in parse_stat(show_stat)
            if r.get("pxname", "").startswith("be_grpc_") and r.get("svname", "").startswith("s")]
    return {"new": sum(int(r.get("connect") or 0) for r in rows),
            "reused": sum(int(r.get("reuse") or 0) for r in rows)}


def leg(urls: list[str], cases: list, rps: float, seconds: float, slo_ms: float, access_log: Path | None,
        root_pid: int | None = None) -> dict:
    """One measured leg at ``rps`` in all over ``urls`` (10 s at the same rates first, not counted), with the cores
    each group of processes used during it (the host has ``os.cpu_count()``)."""
    from recserve.control.routing import accesslog

    _send(urls, cases, rps, 10.0)
    offset = accesslog.size(access_log) if access_log else 0
    started = time.time()
    cpu_before = cpu_reading(root_pid)
    sock = access_log.parent / "haproxy.sock" if access_log else None
    conns_before = server_connections(sock) if sock else None
    records = _send(urls, cases, rps, seconds)
    cores = cores_used(cpu_before, cpu_reading(root_pid), time.time() - started)
    conns = server_connections(sock) if sock else None
    w = window_stats(records, started, float("inf"), slo_ms)  # every request of the leg (all sent after ``started``)
    lat = [r.latency_ms for r in records if r.ok]
    row = {"rps": round(rps, 1), "seconds": seconds, "started": started, "requests": w["total"],
           "failed": w["failed"], "p50_ms": w["p50_ms"], "p99_ms": w["p99_ms"], "p999_ms": w["p999_ms"],
           "max_ms": max(lat) if lat else None, "over_4x_slo": w["over_4x_slo"],
           "cores_used": cores}
    if access_log:
        entries = [e for e in accesslog.read_from(access_log, offset)[0] if e.slot is not None]  # instances
        tr = [e.tr for e in entries if e.tr >= 0]
        row["haproxy"] = {"requests": len(entries), "tr_p99_ms": percentile(tr, 99), "tr_p999_ms": percentile(tr, 99.9),
                          "tr_over_4x_slo": sum(t > TAIL_SLO_FACTOR * slo_ms for t in tr),
                          "retried": sum(e.retries > 0 for e in entries),
                          "server_connections_opened": conns["new"] - conns_before["new"],
                          "requests_on_open_connections": conns["reused"] - conns_before["reused"]}
    return row


def run(x_knee: float, seconds: float, rounds: int, slo_ms: float, knee_rps: float | None = None, log=print) -> dict:
    """The knee (measured, unless ``knee_rps`` is given), then ``rounds`` x (front door at ``x_knee`` x knee, direct at
    the same per-instance rate, direct to every instance at the front door's rate)."""
    from recserve.drills.capacity import knee_ladder, never_missed
    from recserve.drills.probe import golden_cases
    from recserve.drills.session import FleetOwner

    load_before = os.getloadavg()[0]
    with FleetOwner(private=True, log=log) as session:
        cases = golden_cases()
        if knee_rps:
            knee, ladder = knee_rps, []
            log(f"knee: {knee:.1f} rps as given (--knee), not measured")
        else:
            log("measuring the knee through the front door (open-loop ladder) ...")
            knee, ladder = knee_ladder(session.grpc_url, "recommend", slo_ms, cases=cases)
        if not knee:
            raise SystemExit("no knee: no rung of the ladder kept every request under the SLO")
        serving = [i for i in session.fleet.instances() if i.role in ("primary", "active") and i.state == "healthy"]
        front_rps = x_knee * knee
        direct_rps = front_rps / max(1, len(serving))
        one = serving[0]
        legs = []
        every = [f"127.0.0.1:{i.grpc_port}" for i in serving]
        root_pid = session.control.process.pid if session.control.process else None
        for r in range(rounds):
            for via, urls, rps in (("front door", [session.grpc_url], front_rps),
                                   (f"direct to {one.id}", [f"127.0.0.1:{one.grpc_port}"], direct_rps),
                                   ("direct to each instance", every, front_rps)):
                log(f"round {r + 1}: {via} at {rps:.1f} rps in all for {seconds:.0f} s ...")
                row = leg(urls, cases, rps, seconds, slo_ms, session.access_log if via == "front door" else None,
                          root_pid=root_pid)
                row.update(round=r + 1, via=via)
                legs.append(row)
                log(f"  {row['requests']} requests, {row['failed']} failed, p99 {row['p99_ms']:.1f} ms, "
                    f"p99.9 {row['p999_ms']:.1f} ms, over {TAIL_SLO_FACTOR * slo_ms:.0f} ms: {row['over_4x_slo']}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    return {"command": "python -m recserve.perf.tail " + " ".join(sys.argv[1:]), "host": platform.node(),
            "cpus": os.cpu_count(), "commit": commit, "loadavg_before": round(load_before, 2), "slo_ms": slo_ms,
            "knee_rps": round(knee, 1), "knee_source": "--knee" if knee_rps else "measured (open-loop ladder)",
            "knee_lower_bound": bool(ladder) and never_missed(ladder, slo_ms), "x_knee": x_knee,
            "instances_serving": len(serving), "front_door_rps": round(front_rps, 1),
            "direct_rps": round(direct_rps, 1), "legs": legs, "verdict": verdict(legs)}


def verdict(legs: list[dict]) -> dict:
    """Per round and direct leg: is the front door's tail no worse (over-4x count and p99.9)? Against one instance
    (issue 22's rule: the same per-instance rate, but the host does half the work) and, where measured, against
    every instance at once (the same rate in all and the same host load: only HAProxy differs)."""
    out = {}
    for r in sorted({leg["round"] for leg in legs}):
        front = next(x for x in legs if x["round"] == r and x["via"] == "front door")
        for direct in (x for x in legs if x["round"] == r and x["via"] != "front door"):
            out[f"round {r} vs {direct['via']}"] = {
                "over_4x_no_worse": front["over_4x_slo"] <= direct["over_4x_slo"],
                "p999_no_worse": (front["p999_ms"] or 0) <= (direct["p999_ms"] or 0),
                "front_p999_ms": front["p999_ms"], "direct_p999_ms": direct["p999_ms"]}
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m recserve.perf.tail", description=__doc__.split("\n\n")[0])
    p.add_argument("--x-knee", type=float, default=0.5, help="front door rate as a multiple of the knee (default "
                   "%(default)s)")
    p.add_argument("--seconds", type=float, default=120.0, help="measured seconds per leg (default %(default)s)")
    p.add_argument("--rounds", type=int, default=1, help="rounds of (front door, direct) (default %(default)s)")
    p.add_argument("--slo-ms", type=float, default=SLO_P99_MS, help="SLO p99 (default %(default)s)")
    p.add_argument("--knee", type=float, help="the knee in rps, not measured (runs compared at one rate); default: "
                   "measured through the front door first")
    p.add_argument("--out", type=Path, help="write the result as JSON here")
    a = p.parse_args(argv)
    if not 0 < a.x_knee <= 1:
        p.error(f"--x-knee must be within (0, 1], got {a.x_knee}")
    if a.knee is not None and a.knee <= 0:
        p.error(f"--knee must be > 0 rps, got {a.knee}")
    if a.seconds < 10 or a.rounds < 1:
        p.error("--seconds must be >= 10 and --rounds >= 1")
    result = run(a.x_knee, a.seconds, a.rounds, a.slo_ms, a.knee, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(json.dumps(result["verdict"], indent=1))
    if a.out:
        a.out.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
