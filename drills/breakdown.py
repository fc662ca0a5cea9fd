"""Where the time goes during a drill: Triton's queue and compute per ensemble step, from its metrics.

Why: a 2x burst's latency can sit in HAProxy (queueing for a server, a server timeout and a retry), in Triton's
queues, or in compute; every limit change is judged against this breakdown (issue 9, section 1). This module
reads each instance's cumulative counters before and after a window and turns the deltas into per-request
averages per model (every composing model of ``recommend`` and ``search`` is a step). HAProxy's per-request
timers come from its access log (the Router writes it); the client's own lag from the probe's records.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from recserve.control.promtext import fetch, model_sums
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


def _per_request_ms(total_us: float, requests: float) -> float | None:
    return round(total_us / requests / 1000.0, 3) if requests else None


def client_lag(lags_ms: Sequence[float]) -> dict:
    """How late the open-loop probe sent its requests against its own schedule: a lagging client offers less
    than the spec says (on 2 cores it competes with the fleet), so the figure travels with every latency."""
    return {"p50_ms": _r(percentile(lags_ms, 50)), "p99_ms": _r(percentile(lags_ms, 99)),
            "max_ms": _r(max(lags_ms) if lags_ms else None)}


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)
