"""Where the time goes during a drill: Triton's queue and compute per ensemble step, from its metrics.

Why: a 2x burst's latency can sit in HAProxy (queueing for a server, a server timeout and a retry), in Triton's
queues, or in compute; every limit change is judged against this breakdown (issue 9, section 1). This module
reads each instance's cumulative counters before and after a window and turns the deltas into per-request
averages per model (every composing model of ``recommend`` and ``search`` is a step). HAProxy's per-request
timers come from its access log (the Router writes it); the client's own lag from the probe's records.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence

from recserve.control.monitoring.promtext import fetch, model_sums
from recserve.control.routing.accesslog import AccessEntry
from recserve.control.stats import percentile

COUNTERS = ("nv_inference_request_success", "nv_inference_request_failure", "nv_inference_queue_duration_us",
            "nv_inference_compute_input_duration_us", "nv_inference_compute_infer_duration_us",
            "nv_inference_compute_output_duration_us", "nv_inference_exec_count")


def scrape(metrics_urls: Mapping[str, str], timeout_s: float = 2.0) -> dict[str, dict[str, dict[str, float]]]:
    """instance -> model -> counter -> value, for the instances that answered."""
    out = {}
    for iid, url in metrics_urls.items():
        text = fetch(url, timeout_s)
        if text is not None:
            out[iid] = model_sums(text, COUNTERS)
    return out


def triton_steps(before: Mapping[str, Mapping[str, Mapping[str, float]]],
                 after: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict]:
    """model -> requests, failures, mean queue / compute milliseconds per request and mean batch size over the
    window, summed over instances present in both scrapes (a restarted instance's counters start again at 0:
    it is left out, and the figure says how many instances were counted)."""
    totals: dict[str, dict[str, float]] = {}
    counted: dict[str, int] = {}
    for iid, models in after.items():
        if iid not in before:
            continue
        for model, now in models.items():
            was = before[iid].get(model, {})
            delta = {k: now.get(k, 0.0) - was.get(k, 0.0) for k in COUNTERS}
            if any(v < 0 for v in delta.values()):
                continue  # counters went back: restarted in the window
            acc = totals.setdefault(model, dict.fromkeys(COUNTERS, 0.0))
            for k, v in delta.items():
                acc[k] += v
            counted[model] = counted.get(model, 0) + 1
    out = {}
    for model, t in sorted(totals.items()):
        n = t["nv_inference_request_success"]
        out[model] = {
            "requests": int(n), "failures": int(t["nv_inference_request_failure"]),
            "queue_ms": _per_request_ms(t["nv_inference_queue_duration_us"], n),
            "compute_ms": _per_request_ms(sum(t[k] for k in COUNTERS[3:6]), n),
            "infer_ms": _per_request_ms(t["nv_inference_compute_infer_duration_us"], n),
            "mean_batch": round(n / t["nv_inference_exec_count"], 2) if t["nv_inference_exec_count"] else None,
            "instances_counted": counted[model],
        }
    return out


def route_kind(e: AccessEntry) -> str:
    """Where HAProxy sent a request: an instance, the degraded-answer server, its own refusal (admission), or
    nowhere (the front door's 403s and other replies written in the frontend)."""
    if e.backend.endswith("_fallback"):  # no server: the wait for a fallback slot ran out (the refusal)
        return "refused after waiting" if e.server == "<NOSRV>" else "degraded"
    if e.backend.endswith("_shed"):
        return "refused"
    return "instances" if e.backend.startswith("be_") else "front door"


def haproxy_timers(entries: Sequence[AccessEntry], t_from: float, t_to: float) -> dict[str, dict]:
    """Per route kind, over the requests HAProxy accepted in [t_from, t_to): how many, p50/p99 of the time
    waiting for a server slot (Tw), the server's answer (Tr) and the request's active time in HAProxy (Ta:
    received to answered, without the connection's idle time before it), requests retried and redispatched,
    and the statuses other than 200 (issue 9, section 1: HAProxy's share of the time)."""
    groups: dict[str, list[AccessEntry]] = {}
    for e in entries:
        if t_from <= e.accepted < t_to:
            groups.setdefault(route_kind(e), []).append(e)
    out = {}
    for kind in ("instances", "degraded", "refused after waiting", "refused", "front door"):
        es = groups.get(kind)
        if not es:
            continue
        row: dict = {"requests": len(es)}
        for name in ("tw", "tr", "ta"):
            vals = [getattr(e, name) for e in es if getattr(e, name) >= 0]
            row[f"{name}_p50_ms"] = _r(percentile(vals, 50))
            row[f"{name}_p99_ms"] = _r(percentile(vals, 99))
        row["retried"] = sum(e.retries > 0 for e in es)
        row["redispatched"] = sum(e.redispatched for e in es)
        # with the termination state where HAProxy ended it (e.g. "503 sQ": timed out queued for a server slot)
        row["statuses"] = {k: n for k, n in sorted(Counter(
            f"{e.status} {e.termination[:2]}".strip() for e in es if e.status != 200).items())}
        out[kind] = row
    return out


def _per_request_ms(total_us: float, requests: float) -> float | None:
    return round(total_us / requests / 1000.0, 3) if requests else None


def client_lag(lags_ms: Sequence[float]) -> dict:
    """How late the open-loop probe sent its requests against its own schedule: a lagging client offers less
    than the spec says (on 2 cores it competes with the fleet), so the figure travels with every latency."""
    return {"p50_ms": _r(percentile(lags_ms, 50)), "p99_ms": _r(percentile(lags_ms, 99)),
            "max_ms": _r(max(lags_ms) if lags_ms else None)}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
