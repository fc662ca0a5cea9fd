"""capacity_rps (the knee) for sizing overload drills: measured fresh, in the drill session, open-loop.

Why fresh and open-loop: a capacity taken from an older perf report, or a closed-loop perf_analyzer sweep that
stops at its first failed request, was a lower bound; "2x capacity" then was no overload at all (issue 9). The
knee here is the highest offered request rate the fleet serves through the front door with every request
answered, p99 under the SLO and throughput keeping up with the offer, found on a ladder of open-loop rates by
the drills' own error-tolerant probe; the ladder around the knee goes into the journal and the report. The perf
report's figure, when there is one, only picks where the ladder starts.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

from recserve.control.defaults import SLO_P99_MS
from recserve.perf import report_reader
from recserve.perf.report_reader import PERF_REPORT

#: The knee is always taken at the fleet's admission SLO (the Router's default p99 target, perf's SLO), whatever
#: SLO a drill judges its RTO by: the fleet sizes its in-flight limits from that knee, so "0.7x the knee" is
#: below what admission lets through, and every drill of a session shares one ladder.
KNEE_SLO_MS = SLO_P99_MS


def from_perf_report(model: str, path: Path = PERF_REPORT) -> float | None:
    """``capacity_rps`` of ``model`` in the perf report (perf's reader, recserve.perf.report_reader)."""
    return report_reader.capacity_rps(model, path)


def measure(grpc_url: str, model: str, slo_ms: float, workdir: Path,
            levels: tuple[int, ...] = (1, 2, 4, 8, 16), points: list | None = None,
            headers: dict[str, str] | None = None) -> float:
    """Highest throughput whose p99 stays under the SLO, over perf_analyzer concurrency points; stops at the
    first point over the SLO or one that adds under 5% throughput (saturated)."""
    from recserve.drills.background import input_data
    from recserve.drills.probe import golden_cases
    from recserve.perf.analyzer import LoadPoint, PerfAnalyzerError, run

    data = input_data(golden_cases(), model, workdir / "capacity_input.json")
    best = 0.0
    for c in levels:
        # stability is not required (a shared 2-core host is never stable); three 1.5 s windows per point
        point = LoadPoint(model=model, url=grpc_url, mode="concurrency", value=c, input_data=data,
                          measurement_ms=1500, stability_pct=1000, max_trials=3, timeout_s=60, headers=headers or {})
        try:
            row = run(point, workdir / f"capacity_c{c}.csv")
            if row.p99_ms > slo_ms:  # a violation must repeat to count (a shared host has hiccups)
                if points is not None:
                    points.append({"concurrency": c, "infer_per_sec": round(row.infer_per_sec, 1),
                                   "p99_ms": round(row.p99_ms, 2), "repeated": True})
                row = run(point, workdir / f"capacity_c{c}_again.csv")
        except PerfAnalyzerError as exc:
            if points is not None:
                points.append({"concurrency": c, "error": str(exc)[:300]})
            break
        if points is not None:
            points.append({"concurrency": c, "infer_per_sec": round(row.infer_per_sec, 1),
                           "p99_ms": round(row.p99_ms, 2)})
        if row.p99_ms > slo_ms:
            break
        if row.infer_per_sec < best * 1.05:
            best = max(best, row.infer_per_sec)
            break
        best = row.infer_per_sec
    return best


@dataclass(frozen=True)
class Step:
    """One rung of the knee ladder: what was offered open-loop for a few seconds and what came back."""

    offered_rps: float
    sent: int
    ok: int
    failed: int
    achieved_rps: float
    p99_ms: float | None
    #: CPU seconds per second the drill process (the load generator) used: near 1.0 means the client, not the
    #: fleet, may be what limits this rung on a 2-core host.
    client_cpu: float = 0.0
    repeated: bool = False
    #: A bisection rung between the last rate that passed and the first that missed.
    refined: bool = False
    #: The warm-up before the first rung: shown, never judged.
    warmup: bool = False
    #: Mean latency of the rung's answered requests (ms): at the knee, what the ``mean`` limit rule multiplies
    #: the knee by (Little's law: in flight = throughput x MEAN latency).
    mean_ms: float | None = None

    def within(self, slo_ms: float) -> bool:
        """Served: nothing failed, p99 under the SLO, and the fleet kept up with the offer (>= 95%)."""
        return (self.failed == 0 and self.p99_ms is not None and self.p99_ms <= slo_ms
                and self.achieved_rps >= 0.95 * self.offered_rps)


def knee_ladder(grpc_url: str, model: str, slo_ms: float, start_rps: float = 50.0, factor: float = 1.3,
                step_s: float = 3.0, max_steps: int = 14, max_rps: float = 5000.0, min_rps: float = 10.0,
                refine: int = 2, warm_s: float = 15.0, cases: list | None = None) -> tuple[float, list[Step]]:
    """(knee, ladder): offered rates rise by ``factor`` from ``start_rps`` until a rung misses the SLO twice in
    a row (a shared 2-core host has hiccups: a miss counts only when the same rate misses again); then ``refine``
    rungs bisect (geometrically) between the last rate that passed and the one that missed, because every goal
    of the overload drills is a multiple of the knee and one rung of ``factor`` is 30% of it. The knee is the
    highest rate that passed. When ``start_rps`` itself misses, rates fall by ``factor`` (not below ``min_rps``)
    until one passes, and the bisection runs between it and the last miss. Bounded: at most 2 x ``max_steps`` +
    ``refine`` rungs of ``step_s`` s (each repeated at most once), loopback only.

    First ``warm_s`` seconds at ``start_rps``, shown but not judged: a fleet that just started answers some
    requests ~0.5 s late in its first seconds (Triton 2.51; measured at 50 rps on a fresh fleet: 6 such
    requests in the first 12 s, 3 in the 28 s after), and two of them in one 3 s rung read as a missed SLO
    at 50 rps: a clean-clone CI run measured no knee at all that way.

    ``cases``: the requests the ladder sends (a serving spec's golden requests); default the demo's golden
    request of ``model``."""
    from recserve.drills.probe import OpenLoopProbe, constant, golden_cases
    from recserve.drills.timeline import window_stats

    cases = cases if cases is not None else [c for c in golden_cases() if c.model == model]
    ladder: list[Step] = []

    def measure(rate: float, seconds: float, again: bool, refining: bool, warmup: bool = False) -> Step:
        probe = OpenLoopProbe(grpc_url, cases, constant(rate), duration_s=seconds, timeout_s=2.0,
                              max_requests=int(rate * seconds) + 10)
        cpu0, wall0 = time.process_time(), time.monotonic()
        recs = probe.start().join()
        cpu = (time.process_time() - cpu0) / max(time.monotonic() - wall0, 1e-9)
        t0 = probe.t0 or (recs[0].t_send if recs else 0.0)
        w = window_stats(recs, t0, t0 + seconds, slo_ms)
        lat = [r.latency_ms for r in recs if r.ok and t0 <= r.t_send < t0 + seconds]
        step = Step(round(rate, 1), w["total"], w["ok"], w["failed"], round(w["ok"] / seconds, 1), w["p99_ms"],
                    client_cpu=round(cpu, 2), repeated=again, refined=refining, warmup=warmup,
                    mean_ms=round(sum(lat) / len(lat), 2) if lat else None)
        ladder.append(step)
        return step

    def rung(rate: float, refining: bool) -> bool:
        for again in (False, True):
            if measure(rate, step_s, again, refining).within(slo_ms):
                return True
        return False

    if warm_s > 0:
        measure(float(start_rps), warm_s, False, False, warmup=True)

    knee, rate, missed = 0.0, float(start_rps), None
    for _ in range(max_steps):
        if not rung(rate, False):
            missed = rate
            break
        knee = rate
        if rate >= max_rps:
            break
        rate = min(rate * factor, max_rps)
    # the first rate already missed (a start taken from a perf report's capacity, which perf_analyzer measured
    # direct to one instance, can lie past the front door's knee): step down by ``factor`` until a rate passes
    for _ in range(max_steps):
        if knee or missed is None or missed / factor < min_rps:
            break
        rate = missed / factor
        if rung(rate, False):
            knee = rate
        else:
            missed = rate
    for _ in range(refine if knee and missed else 0):
        mid = (knee * missed) ** 0.5
        if rung(mid, True):
            knee = mid
        else:
            missed = mid
    return knee, ladder


def never_missed(ladder: list[Step], slo_ms: float) -> bool:
    """No rung missed (a miss counts only when its repeat missed too): the ladder ran out of rungs or reached its
    ``max_rps``, and the rate it returns is a lower bound of the knee, not the knee."""
    return not any(s.repeated and not s.within(slo_ms) for s in ladder if not s.warmup)


def knee_mean_ms(knee_rps: float | None, ladder: list[dict], slo_ms: float = KNEE_SLO_MS) -> float | None:
    """Mean latency (ms) at the knee: of the ladder's rung at the knee's rate that passed (the last such rung,
    warm-up left out); None when the ladder has no such rung or it measured no mean (a knee from elsewhere)."""
    if not knee_rps:
        return None
    for row in reversed(ladder):
        if row.get("warmup") or row.get("mean_ms") is None or round(row.get("offered_rps", -1), 1) != round(
                knee_rps, 1):
            continue
        if Step(**{k: row[k] for k in Step.__dataclass_fields__ if k in row}).within(slo_ms):
            return float(row["mean_ms"])
    return None


def capacity_rps(grpc_url: str, model: str, slo_ms: float, workdir: Path,
                 use_report: bool = True, fresh: bool = True, headers: dict[str, str] | None = None,
                 cases: list | None = None) -> tuple[float | None, str, list[dict]]:
    """(capacity, where it came from, the knee ladder's rungs) at ``slo_ms``; ``use_report`` False when the
    fleet does not serve the built models. The perf report's capacity is at perf's SLO (default 50 ms): specs
    that use it should share it. ``fresh`` (the default): the knee ladder decides; the report's figure, if
    any, only says where to start. ``headers`` go with perf_analyzer's statistics calls (the statistics key).
    ``cases``: what the ladder sends instead of the demo's golden request of ``model`` (a serving spec's; then
    ``model`` is only the label the knee is kept under, and only the fresh ladder can measure it)."""
    key = (grpc_url, model, slo_ms, use_report, fresh)
    if key not in _MEASURED:
        _MEASURED[key] = _capacity_rps(grpc_url, model, slo_ms, workdir, use_report, fresh, headers, cases)
    return _MEASURED[key]


#: One knee per fleet endpoint, model and SLO for the whole drill session (``python -m recserve.drills run``):
#: every drill that sizes its load by it uses the same figure, and the ladder runs once.
_MEASURED: dict[tuple, tuple[float | None, str, list[dict]]] = {}


def forget(grpc_url: str) -> int:
    """Drop the knees measured at ``grpc_url`` (the next drill measures afresh); how many were dropped. For a knee
    an overload proved wrong: its multiple was served whole within the SLO (``DrillRun.overload_not_felt``)."""
    stale = [k for k in _MEASURED if k[0] == grpc_url]
    for k in stale:
        del _MEASURED[k]
    return len(stale)


def _capacity_rps(grpc_url: str, model: str, slo_ms: float, workdir: Path, use_report: bool,
                  fresh: bool, headers: dict[str, str] | None, cases: list | None = None
                  ) -> tuple[float | None, str, list[dict]]:
    hint = from_perf_report(model) if use_report else None
    if fresh:
        start = max(20.0, 0.5 * hint) if hint else 50.0
        knee, ladder = knee_ladder(grpc_url, model, slo_ms, start_rps=start, cases=cases)
        rows = [asdict(s) for s in ladder]
        if not knee:
            return None, f"no offered rate from {start:.0f} rps kept every request under {slo_ms:.0f} ms", rows
        if never_missed(ladder, slo_ms):
            return knee, (f"a lower bound, not the knee: no rung of the open-loop ladder through the front door "
                          f"missed (0 failed, p99 <= {slo_ms:.0f} ms, >= 95% of the offer served) up to its top, "
                          f"{knee:.0f} rps, so the fleet serves at least that (its client CPU column says whether "
                          f"the load generator could offer more)"), rows
        return knee, (f"knee measured fresh by the drill: open-loop ladder through the front door with the "
                      f"error-tolerant probe, highest rate with 0 failed, p99 <= {slo_ms:.0f} ms and >= 95% of the "
                      f"offer served (a miss counts when it repeats)"), rows
    if cases is not None:
        return None, "only the fresh ladder measures the knee of a serving spec's requests", []
    cap = hint
    if cap:
        return cap, f"perf report {PERF_REPORT.resolve()}", []
    points: list[dict] = []
    try:
        cap = measure(grpc_url, model, slo_ms, workdir, points=points, headers=headers)
    except Exception as exc:  # perf not installed or broken: overload then has no target and says so
        return None, f"not measured: {exc}", []
    if not cap:
        return None, f"no concurrency kept p99 <= {slo_ms:.0f} ms: {points}", points
    return cap, (f"measured by the drill: perf_analyzer concurrency sweep through HAProxy, highest "
                 f"throughput with p99 <= {slo_ms:.0f} ms (the drill's SLO)"), points


# ----------------------------------------------------------------------------- one pod's knee, for the cluster's Job
def one_address(target: str) -> tuple[str, int, str]:
    """(address, port, how it was picked) of ONE server behind ``HOST:PORT``: the lowest IPv4 address HOST resolves
    to (a headless Service answers with every pod; the knee is per pod)."""
    import socket

    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--target must be HOST:PORT, got {target!r}")
    addrs = sorted({i[4][0] for i in socket.getaddrinfo(host, int(port), socket.AF_INET, socket.SOCK_STREAM)},
                   key=lambda a: tuple(int(x) for x in a.split(".")))
    if not addrs:
        raise OSError(f"{host} resolves to no IPv4 address")
    return addrs[0], int(port), f"{addrs[0]} (1 of {len(addrs)} addresses of {host})"


def main(argv: list[str] | None = None) -> int:
    """``python -m recserve.drills.capacity``: the knee ladder against one pod, as JSON (the measuring container of
    the cluster's knee Job, deploy/k8s/components/knee-job; control/kube/knee.py writes it where the operator reads
    it). With ``--spec`` it sends the spec's golden requests at its strictest ``sloP99Ms``."""
    import argparse
    import json
    import sys

    p = argparse.ArgumentParser(prog="python -m recserve.drills.capacity", description=main.__doc__.split(":")[0])
    p.add_argument("--target", required=True, help="HOST:PORT (gRPC); the ladder runs against one of its addresses")
    p.add_argument("--spec", type=Path, help="serving spec: its golden requests and strictest sloP99Ms")
    p.add_argument("--repository", type=Path, help="the model repository of the spec's models")
    p.add_argument("--output", type=Path, required=True, help="the result as JSON")
    p.add_argument("--start-rps", type=float, default=50.0)
    p.add_argument("--step-s", type=float, default=3.0)
    p.add_argument("--warm-s", type=float, default=15.0)
    p.add_argument("--max-steps", type=int, default=14)
    p.add_argument("--max-rps", type=float, default=5000.0)
    p.add_argument("--refine", type=int, default=2)
    a = p.parse_args(argv)
    try:
        ip, port, picked = one_address(a.target)
    except (OSError, ValueError) as exc:
        print(f"knee not measured: {exc}", file=sys.stderr, flush=True)
        return 2
    slo, cases, model = KNEE_SLO_MS, None, "recommend"
    if a.spec is not None:
        from recserve.control.spec.spec import load_spec
        from recserve.drills.serving import cases as spec_cases

        spec = load_spec(a.spec, a.repository)
        slo, cases, model = min(m.slo_p99_ms for m in spec.models.values()), spec_cases(spec), next(iter(spec.models))
    print(f"knee ladder against {picked} at p99 <= {slo:g} ms", flush=True)
    knee, ladder = knee_ladder(f"{ip}:{port}", model, slo, start_rps=a.start_rps, factor=1.3, step_s=a.step_s,
                               max_steps=a.max_steps, max_rps=a.max_rps, refine=a.refine, warm_s=a.warm_s,
                               cases=cases)
    rows = [asdict(s) for s in ladder]
    out = {"knee_rps": round(knee, 1) if knee else None, "mean_ms": knee_mean_ms(knee, rows, slo), "slo_ms": slo,
           "lower_bound": bool(knee) and never_missed(ladder, slo),
           "pod": ip, "picked": picked, "ladder": rows}
    a.output.write_text(json.dumps(out, indent=1))
    for r in rows:
        print(json.dumps(r), flush=True)
    bound = " (a lower bound: no rung missed)" if out["lower_bound"] else ""
    print(f"knee {out['knee_rps']} rps{bound} (mean {out['mean_ms']} ms) on {picked}", flush=True)
    return 0 if knee else 1


if __name__ == "__main__":
    raise SystemExit(main())
