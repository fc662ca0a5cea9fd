"""Figures from a recorded probe timeline: RTO, percentiles, before/during/after windows, overload.

Why pure functions over records: the same numbers are computed live (abort checks), at the end of a
drill (report) and in unit tests on hand-made timelines, so RTO and p99 mean one thing everywhere.

Definitions (also written into report.md):
- a request is *good* when it succeeded, its answer was not wrong, and its latency <= the SLO;
- RTO = time from the fault to the start of the first full second (a sliding 1 s window, by send
  time) in which every probe request is good; 0 when no request ever went bad;
- percentiles are nearest-rank (control/stats.py) over the latencies of successful requests;
- *rejected* (shed) requests are the front door's own refusals: RESOURCE_EXHAUSTED (gRPC) with admission's
  message (``control.routing.haproxy.OVERLOADED``). Any other UNAVAILABLE or RESOURCE_EXHAUSTED (an instance that
  vanished, a refused connection, Triton's full queue, a request timeout) is a failure: admitted traffic
  cannot fill Triton's queues, so only admission may refuse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from recserve.control.routing.haproxy import OVERLOADED
from recserve.control.stats import percentile
from recserve.drills.probe import Record

#: The status of admission's refusal; shed only together with its message (``is_shed``).
SHED_STATUS = "RESOURCE_EXHAUSTED"


def is_shed(r: Record) -> bool:
    """Refused by the front door's admission (the only shedding): RESOURCE_EXHAUSTED naming ``OVERLOADED``."""
    return r.status == SHED_STATUS and OVERLOADED in r.detail


def is_good(r: Record, slo_ms: float) -> bool:
    """A good answer: the real models', right, in time. A degraded (fallback) answer is served, never good."""
    return r.ok and not r.degraded and r.matched is not False and r.latency_ms <= slo_ms


def rto_ms(records: Sequence[Record], fault_t: float, slo_ms: float, end_t: float | None = None,
           window_s: float = 1.0) -> float | None:
    """Client-measured recovery time; None if no full good second followed the fault before ``end_t``.

    The candidate window starts at the fault, and after each bad request at the next request's send
    time; the first window that is fully recorded, holds at least one request and no bad one wins.
    """
    after = [r for r in sorted(records, key=lambda r: r.t_send) if r.t_send >= fault_t]
    if not after:
        return None
    end_t = end_t if end_t is not None else after[-1].t_send
    start, i = fault_t, 0
    while start + window_s <= end_t + 1e-9:
        window = [r for r in after[i:] if r.t_send < start + window_s]
        bad = [k for k, r in enumerate(window) if not is_good(r, slo_ms)]
        if window and not bad:
            return round((start - fault_t) * 1000.0, 1)
        i += (bad[-1] + 1) if bad else len(window)
        if i >= len(after):
            return None
        start = after[i].t_send
    return None


#: The tail that p99 hides: requests slower than this many times the SLO are counted (``over_4x_slo``).
TAIL_SLO_FACTOR = 4.0

#: With ``steady_state.rto: before``: the share of the before-phase's good answers per second a window must reach.
RTO_GOOD_SHARE = 0.9


def rto_vs_before_ms(records: Sequence[Record], fault_t: float, slo_ms: float, good_rps_before: float,
                     end_t: float | None = None, window_s: float = 1.0, step_s: float = 0.1) -> float | None:
    """Recovery time for drills above the knee, where shedding (fast refusals, degraded answers) and a tail over
    the SLO are the steady state: the first full window after the fault with no unshed failure, no wrong
    answer, and good answers per second at >= ``RTO_GOOD_SHARE`` of the before-phase's; windows start at the
    fault and every ``step_s`` after it. None when none did before ``end_t`` (or nothing good came before)."""
    if good_rps_before <= 0:
        return None
    rs = [r for r in records if r.t_send >= fault_t]
    if not rs:
        return None
    end_t = end_t if end_t is not None else max(r.t_send for r in rs)
    start = fault_t
    while start + window_s <= end_t + 1e-9:
        w = window_stats(rs, start, start + window_s, slo_ms)
        if w["total"] and not w["failed_unshed"] and not w["wrong"] \
                and w["goodput_rps"] >= RTO_GOOD_SHARE * good_rps_before:
            return round((start - fault_t) * 1000.0, 1)
        start += step_s
    return None


def window_stats(records: Sequence[Record], t_from: float, t_to: float, slo_ms: float) -> dict:
    """Counts, rates and latency percentiles of the requests sent in [t_from, t_to)."""
    rs = [r for r in records if t_from <= r.t_send < t_to]
    span = max(t_to - t_from, 1e-9)
    ok = [r for r in rs if r.ok]
    shed = [r for r in rs if is_shed(r)]
    degraded = [r for r in ok if r.degraded]
    wrong = [r for r in ok if r.matched is False]
    good = [r for r in rs if is_good(r, slo_ms)]
    lat = [r.latency_ms for r in ok]
    return {
        "seconds": round(span, 3),
        "total": len(rs),
        "ok": len(ok),
        "failed": len(rs) - len(ok),
        "failed_unshed": len(rs) - len(ok) - len(shed),
        "degraded": len(degraded),
        "served": len(ok) - len(degraded),
        "wrong": len(wrong),
        "rejected": len(shed),
        "error_rate": round((len(rs) - len(ok)) / len(rs), 4) if rs else 0.0,
        "p50_ms": _r(percentile(lat, 50)),
        "p99_ms": _r(percentile(lat, 99)),
        "p999_ms": _r(percentile(lat, 99.9)),
        # the tail beyond p99: requests (answered or not) that took longer than 4x the SLO
        "over_4x_slo": sum(r.latency_ms > TAIL_SLO_FACTOR * slo_ms for r in rs),
        "throughput_rps": round(len(ok) / span, 2),
        "goodput_rps": round(len(good) / span, 2),
        "shed_rate": round(len(shed) / len(rs), 4) if rs else 0.0,
        "rejected_p99_ms": _r(percentile([r.latency_ms for r in shed], 99)),
    }


def per_second(records: Sequence[Record], t0: float, t_end: float) -> list[dict]:
    """One row per second since ``t0`` (by send time): sent, ok, errors, wrong, p99 of successes."""
    n = max(0, math.ceil(t_end - t0))
    buckets: list[list[Record]] = [[] for _ in range(n)]
    for r in records:
        k = int(r.t_send - t0)
        if 0 <= k < n:
            buckets[k].append(r)
    rows = []
    for k, b in enumerate(buckets):
        ok = [r for r in b if r.ok]
        rows.append({"t": k, "sent": len(b), "ok": len(ok), "errors": len(b) - len(ok),
                     "wrong": sum(r.matched is False for r in ok),
                     "p99_ms": _r(percentile([r.latency_ms for r in ok], 99))})
    return rows


def phases(records: Sequence[Record], t0: float, fault_t: float, fault_end_t: float, t_end: float,
           slo_ms: float) -> dict[str, dict]:
    """Before [t0, fault), during [fault, fault end), after [fault end, end)."""
    return {"before": window_stats(records, t0, fault_t, slo_ms),
            "during": window_stats(records, fault_t, fault_end_t, slo_ms),
            "after": window_stats(records, fault_end_t, t_end, slo_ms)}


def steady_state_ok(stats: dict, slo_ms: float, error_rate_max: float) -> bool:
    """The hypothesis: p99 within the SLO and errors within the budget (no traffic: not met)."""
    return stats["total"] > 0 and stats["p99_ms"] is not None and stats["p99_ms"] <= slo_ms \
        and stats["error_rate"] <= error_rate_max and stats["wrong"] == 0


def failed_or_wrong_after(records: Sequence[Record], t: float) -> int:
    """Requests sent at or after ``t`` that failed or answered wrongly (slowness not counted): for gpu-lost,
    bad answers are allowed only until the control plane detected the broken instance."""
    return sum(1 for r in records if r.t_send >= t and (not r.ok or r.matched is False))


def failure_samples(records: Sequence[Record], t0: float, fault_t: float, limit: int = 8) -> list[dict]:
    """Failed requests grouped by status and message, the most frequent first, each with the send time of its
    first occurrence (s from the drill's start and from the fault) and its latency: a failure count alone
    does not say whether a request was refused, timed out or hit a missing model version."""
    groups: dict[tuple[str, str], dict] = {}
    for r in sorted(records, key=lambda r: r.t_send):
        if r.ok:
            continue
        g = groups.setdefault((r.status, r.detail[:160]), {
            "status": r.status, "detail": r.detail[:160], "count": 0, "first_at_s": _r(r.t_send - t0),
            "first_after_fault_s": _r(r.t_send - fault_t), "first_latency_ms": _r(r.latency_ms)})
        g["count"] += 1
    return sorted(groups.values(), key=lambda g: -g["count"])[:limit]


def error_budget_used(failed: int, total: int, error_rate_max: float) -> float | None:
    """Share of the allowed failures that was spent; None when the budget is zero but was exceeded."""
    allowed = error_rate_max * total
    if allowed <= 0:
        return 0.0 if failed == 0 else None
    return round(failed / allowed, 4)


def abort_reason(records: Sequence[Record], now: float, slo_ms: float, error_budget: float,
                 p99_ceiling_ms: float, p99_over_for_s: float, min_requests: int) -> str | None:
    """Why the drill must stop now, or None: error budget burnt, or p99 over the ceiling too long."""
    done = [r for r in records if r.t_send + r.latency_ms / 1000.0 <= now]
    if len(done) >= min_requests:
        failed = sum(not r.ok for r in done)
        if failed / len(done) > error_budget:
            return f"error budget burnt: {failed}/{len(done)} failed > {error_budget:.0%}"
    seconds = math.floor(p99_over_for_s)
    if seconds < 1 or not done:
        return None
    last = max(r.t_send for r in done) + 1e-6  # the newest second with answers, not an empty one
    over = 0
    for k in range(seconds, 0, -1):
        lat = [r.latency_ms for r in done if last - k <= r.t_send < last - k + 1 and r.ok]
        p = percentile(lat, 99)
        over += p is not None and p > p99_ceiling_ms
    if over == seconds:
        return f"p99 over the {p99_ceiling_ms:.0f} ms ceiling for {seconds}s"
    return None


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
