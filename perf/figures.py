"""Pure computations on measured load points: saturation, capacity under an SLO, ratios.

Kept free of I/O so the unit tests can feed recorded perf_analyzer output and check the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from statistics import median

from recserve.control.defaults import SLO_P99_MS
from recserve.perf.analyzer import Row

DEFAULT_SLO_MS = SLO_P99_MS
#: A rate point only counts as served when the achieved throughput reaches this share of the offered rate.
KEEP_UP = 0.9


def saturation(rows: Iterable[Row]) -> float:
    """Highest measured throughput (inferences/s) of a sweep; 0 for an empty sweep."""
    return max((r.infer_per_sec for r in rows), default=0.0)


@dataclass(frozen=True)
class Capacity:
    """Highest offered request rate whose p99 stayed under the SLO while the server kept up."""

    capacity_rps: float
    slo_ms: float
    p99_ms_at_capacity: float | None
    first_violation_rps: float | None
    reason: str
    #: Mean latency at the capacity rate (perf_analyzer's "Avg latency"): the admission's ``mean`` limit rule
    #: multiplies the knee by it (control/routing/admission.py ``limit_latency``).
    mean_ms_at_capacity: float | None = None


def capacity(points: Iterable[Row], slo_ms: float = DEFAULT_SLO_MS, keep_up: float = KEEP_UP) -> Capacity:
    """Capacity from a request-rate sweep (rows carry ``request_rate``).

    A rate passes when p99 <= SLO and achieved >= ``keep_up`` x offered. Capacity is the highest rate
    that passes below the first failing rate: a pass above a failure is noise, not capacity.
    """
    rows = sorted((r for r in points if r.request_rate is not None), key=lambda r: r.request_rate or 0.0)
    if not rows:
        return Capacity(0.0, slo_ms, None, None, "no request-rate points were measured")
    best: Row | None = None
    for r in rows:
        rate = r.request_rate or 0.0
        too_slow = r.p99_ms > slo_ms
        behind = r.infer_per_sec < keep_up * rate
        if too_slow or behind:
            why = (
                f"p99 {r.p99_ms:.1f} ms > SLO {slo_ms:.0f} ms"
                if too_slow
                else (f"served {r.infer_per_sec:.0f}/s of {rate:.0f}/s offered")
            )
            if best is None:
                return Capacity(0.0, slo_ms, None, rate, f"the lowest rate measured already failed: {why}")
            return Capacity(
                best.request_rate or 0.0, slo_ms, best.p99_ms, rate, f"next rate {rate:.0f}/s failed: {why}",
                _mean_ms(best),
            )
        best = r
    assert best is not None
    return Capacity(
        best.request_rate or 0.0, slo_ms, best.p99_ms, None, "every measured rate passed (capacity is a lower bound)",
        _mean_ms(best),
    )


def _mean_ms(row: Row) -> float | None:
    """The row's mean latency in ms; None when perf_analyzer gave none."""
    return round(row.avg_us / 1000, 3) if row.avg_us else None


def ratio(numerator: float, denominator: float) -> float | None:
    """``numerator / denominator``, or None when the denominator is missing (a run failed)."""
    if not denominator or numerator is None:
        return None
    return numerator / denominator


def paired_ratio(pairs: Iterable[tuple[float, float]]) -> float | None:
    """Median of per-round ratios numerator/denominator, each round measured back to back.

    Why paired and median: on a shared host the background load drifts by 2x within minutes, so a
    ratio of two best-ofs taken at different times mixes the drift in; a ratio per round cancels most
    of it, and the median drops the round a neighbour's burst landed in.
    """
    values = sorted(n / d for n, d in pairs if n and d)
    if not values:
        return None
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else (values[mid - 1] + values[mid]) / 2


def clean_paired_ratio(pairs: list[tuple[float, float]], stalled: list[bool]) -> tuple[float | None, int]:
    """``paired_ratio`` over the rounds without stalls (all rounds when every one had some), and how many
    rounds were left out.

    Why: a ~500 ms scheduler stall (Triton 2.51's dynamic batcher with a queue policy) blocks a client for
    hundreds of requests' time and lands on either side at random; it is a server defect reported on its
    own (``stalls`` per load point), not a cost of the layer being compared.
    """
    clean = [p for p, bad in zip(pairs, stalled, strict=True) if not bad]
    use = clean or pairs
    return paired_ratio(use), len(pairs) - len(use)


def serving_cpu_ceiling(inprocess_cpu_ms: list[float], served_cpu: list[dict[str, float]]) -> dict[str, float]:
    """What served_vs_inprocess can reach when the host is CPU-bound: in-process CPU per batch over the
    served CPU per request (stubs + server, and with the load generator on the same cores).

    Why: it separates what serving costs (stub IPC, tritonserver) from what the shared 2-core host costs
    (perf_analyzer competing for the same cores), which a throughput ratio alone mixes.
    """
    if not inprocess_cpu_ms or not served_cpu:
        return {}
    ref = median(inprocess_cpu_ms)
    stubs = median([x.get("stubs", 0.0) for x in served_cpu])
    server = median([x.get("server", 0.0) for x in served_cpu])
    client = median([x.get("perf_analyzer", 0.0) for x in served_cpu])
    return {
        "inprocess_cpu_ms_per_batch": round(ref, 3),
        "stubs_cpu_ms_per_request": round(stubs, 3),
        "server_cpu_ms_per_request": round(server, 3),
        "client_cpu_ms_per_request": round(client, 3),
        "cpu_ceiling_without_client": round(ref / (stubs + server), 3) if stubs + server else 0.0,
        "cpu_ceiling_with_client": round(ref / (stubs + server + client), 3) if stubs + server + client else 0.0,
    }


def batching_cpu_ceiling(with_cpu: list[dict[str, float]], without_cpu: list[dict[str, float]]) -> dict[str, float]:
    """What dynamic_batching_gain can reach when the host is CPU-bound: all CPU per request (server, stubs,
    load generator) without dynamic batching over the same with it (medians of the sweeps' top points).

    Why: CPU seconds per request hold steady while throughput swings with the neighbours, so this is the
    figure the gain is judged against (perf/check.py); a batcher that idles or stalls shows up as a gain
    far below it, a batcher that costs more CPU as a ceiling below 1.
    """
    if not with_cpu or not without_cpu:
        return {}
    w = median([sum(x.values()) for x in with_cpu])
    wo = median([sum(x.values()) for x in without_cpu])
    return {
        "with_cpu_ms_per_request": round(w, 3),
        "without_cpu_ms_per_request": round(wo, 3),
        "cpu_bound_gain": round(wo / w, 3) if w else 0.0,
    }


def proxy_cpu_share(samples: Iterable[dict[str, float]]) -> dict[str, float]:
    """HAProxy's CPU per request next to everything else's, from the proxied load points (medians).

    Why: when the host is CPU-bound, throughput through the proxy is at most all/(all + proxy) of direct;
    CPU seconds per request are far steadier than throughput on a shared host, so this bound is reported
    beside the measured ratio.
    """
    rows = [x for x in samples if "haproxy" in x]
    if not rows:
        return {}

    proxy = median([x["haproxy"] for x in rows])
    rest = median([sum(v for k, v in x.items() if k != "haproxy") for x in rows])
    return {
        "haproxy_cpu_ms_per_request": round(proxy, 3),
        "other_cpu_ms_per_request": round(rest, 3),
        "cpu_bound_ratio": round(rest / (rest + proxy), 3) if rest + proxy else 0.0,
    }


def rate_ladder(
    saturation_ips: float, fractions: Iterable[float], batch_size: int = 1, floor: float = 1.0
) -> list[float]:
    """Request rates to probe for capacity, as fractions of the measured saturation throughput."""
    per_request = saturation_ips / max(1, batch_size)
    return sorted({max(floor, round(per_request * f)) for f in fractions})
